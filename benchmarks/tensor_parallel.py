"""Tensor-parallel decode step: tp=1 against tp=N, one process per rank (the machine's cores split evenly between
them on CPU, one GPU each on CUDA), the share of the step spent in collectives, and the lm_head choice at tp > 1
(vocab-parallel, each rank computing V/N logits then an all-gather, against a replicated lm_head).

    .venv/bin/python -m benchmarks.tensor_parallel                   # CPU, gloo: the tiny test shape and a 1B shape
    python -m benchmarks.tensor_parallel --device cuda --dtype bfloat16 --shapes llama3-8b \\
        --sizes 1,2,4,8 --batches 1,8                                # a node with 8 GPUs: NCCL, CUDA graphs

Each rank builds its shard of a random-weight model (parallel.shard.TensorParallel.build; the values do not change a
step's cost) and times the engine's own decode step (benchmarks.decode.engine_step_ms: ModelRunner.decode with
`entries` random cache entries per sequence, greedy sampling and the host read included), all ranks in lockstep.
Communication is timed around each collective in an eager run (on CUDA with a synchronize on each side): it
includes waiting for the slowest rank, so it is "communication and skew". With CUDA graphs the step is timed as
replayed, the communication share still comes from the eager run. Writes benchmarks/results/tensor_parallel.md.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.decode import build_model, engine_step_ms, sync
from parallel.shard import TensorParallel

ROOT = Path(__file__).resolve().parents[1]
class TimedTensorParallel(TensorParallel):
    """The model's collectives with a stopwatch around each (eager only)."""

    def __init__(self, *args, device: torch.device, **kwargs):
        super().__init__(*args, **kwargs)
        self.device, self.durations, self.enabled = device, [], False

    def _timed(self, fn, x):
        if not self.enabled:  # e.g. while a CUDA graph is captured: no synchronize there
            return fn(x)
        sync(self.device)
        start = time.perf_counter()
        out = fn(x)
        sync(self.device)
        self.durations.append(time.perf_counter() - start)
        return out

    def all_reduce(self, x):
        return self._timed(super().all_reduce, x) if self.size > 1 else x

    def gather_vocab(self, x):
        return self._timed(super().gather_vocab, x) if self.size > 1 else x


def _rank(rank, size, port, shape, device_type, dtype, batches, entries, steps, vocab_parallel, results):
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, mp.cpu_count() // size))
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    torch.manual_seed(rank)
    tp = TimedTensorParallel(rank, size, dist.group.WORLD, vocab_parallel=vocab_parallel, device=device)
    model = build_model(shape, device, dtype, tp)
    rows = []
    for batch in batches:
        mode = "graph" if device.type == "cuda" else "eager"
        step_ms = engine_step_ms(model, batch, entries, steps, mode)
        tp.durations, tp.enabled, times = [], True, []
        engine_step_ms(model, batch, entries, steps, "eager", times=times)  # 3 warm-up steps, then `steps`
        tp.enabled = False
        per_step = len(tp.durations) // (steps + 3)  # collectives a step runs
        timed = tp.durations[len(tp.durations) - steps * per_step:]  # those of the timed steps
        rows.append(dict(batch=batch, step_ms=step_ms, eager_ms=1000 * statistics.mean(times),
                         comm_ms=1000 * sum(timed) / steps, collectives=per_step))
    if rank == 0:
        results.put(rows)
    dist.barrier()
    dist.destroy_process_group()


def measure(shape, size, device, dtype, batches, entries, steps, vocab_parallel=True) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    ranks = mp.spawn(_rank, args=(size, port, shape, device, dtype, batches, entries, steps, vocab_parallel,
                                  results), nprocs=size, join=False)
    rows = results.get()
    while not ranks.join():
        pass
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--shapes", default="tiny-tp,llama-1b", help="benchmarks.decode.SHAPES presets")
    ap.add_argument("--sizes", default="1,2")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--entries", type=int, default=512, help="cache entries per sequence (a compressed prompt)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "tensor_parallel.md"))
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    sizes, batches = [int(n) for n in args.sizes.split(",")], [int(n) for n in args.batches.split(",")]
    lines = [f"# Tensor-parallel decode step ({args.device}, {args.dtype}, {args.entries} cache entries per sequence, "
             f"median of {args.steps} steps)", "",
             "| shape | batch | tp | lm_head | step ms (median) | vs tp=1 | collectives/step | "
             "in collectives ms (eager mean) | share of the eager step (mean) |", "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    for shape in args.shapes.split(","):
        base = {}
        for size in sizes:
            for vocab_parallel in ((True, False) if size > 1 else (True,)):
                started = time.perf_counter()
                rows = measure(shape, size, args.device, dtype, batches, args.entries, args.steps, vocab_parallel)
                head = "whole" if size == 1 else "vocab-parallel" if vocab_parallel else "replicated"
                for r in rows:
                    if size == 1:
                        base[r["batch"]] = r["step_ms"]
                    line = (f"| {shape} | {r['batch']} | {size} | {head} | {r['step_ms']:.2f} | "
                            f"{base[r['batch']] / r['step_ms']:.2f}x | {r['collectives']} | {r['comm_ms']:.2f} | "
                            f"{r['comm_ms'] / r['eager_ms']:.0%} |")
                    lines.append(line)
                    print(line, f"({time.perf_counter() - started:.0f} s)", flush=True)
    lines += ["", f"Machine: {mp.cpu_count()} CPU cores" + (f", {torch.cuda.get_device_name()}" if args.device ==
                                                              "cuda" else "") + f"; torch {torch.__version__}."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
