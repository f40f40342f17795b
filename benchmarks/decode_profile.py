"""Where a decode step's time goes on a GPU: the decode attention paths timed alone on one layer's cache (split-KV
and SDPA, against the bytes they must read), and the top kernels of one eager engine step (torch.profiler) at the
Llama-3-8B layer shape with a few layers.

    PYTHONPATH=. python3 -m benchmarks.decode_profile --entries 16384,131072 --layers 4
    PYTHONPATH=. python3 -m benchmarks.decode_profile --crossover 1024,2048,4096,8192,16384

--crossover times the whole graphed engine step (32 layers, full cache of that many entries) with SDPA and with
split-KV decode at two split lengths, to find where split-KV starts to win.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from benchmarks.decode import SHAPES, build_model, engine_step_ms
from engine.model_runner import ModelRunner
from fastattn import paths as fast


def cuda_ms(fn, iters: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def attention_alone(entries: int, dtype: torch.dtype) -> None:
    cfg = SHAPES["llama3-8b"]
    hkv, group, d = cfg["num_kv_heads"], cfg["num_heads"] // cfg["num_kv_heads"], cfg["head_dim"]
    q = torch.randn(1, hkv, group, d, device="cuda", dtype=dtype)
    k, v = torch.randn(2, 1, hkv, entries, d, device="cuda", dtype=dtype)
    valid = torch.ones(1, hkv, entries, dtype=torch.bool, device="cuda")
    read = k.nbytes + v.nbytes
    for name, fn in (("split-KV", lambda: fast.split_decode_attention(q, k, v, valid)),
                     ("SDPA + bool mask", lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None])),
                     ("SDPA, no mask", lambda: F.scaled_dot_product_attention(q, k, v))):
        ms = cuda_ms(fn)
        print(f"attention alone, {entries} entries, {name}: {ms * 1000:.0f} us, {read / ms / 1e6:.0f} GB/s", flush=True)


def profile_step(layers: int, entries: int, dtype: torch.dtype) -> None:
    SHAPES["profile"] = dict(SHAPES["llama3-8b"], num_layers=layers)
    model = build_model("profile", torch.device("cuda"), dtype)
    runner = ModelRunner(model, 1, entries + 16, 4096, cuda_graph=False)
    runner.static = True  # attend over the whole capacity, as a captured step does
    runner.cache.lengths.fill_(entries)
    runner.inputs.positions.fill_(entries)
    runner.inputs.active.fill_(1)
    live = [SimpleNamespace(slot=0, cache_entries=entries, sampling_mode="greedy")]
    for _ in range(3):
        runner.decode(live)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.decode(live)
    print(f"\none eager step, {layers} layers, {entries} entries:", flush=True)
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=18, max_name_column_width=70), flush=True)


def crossover(entries: list[int], dtype: torch.dtype) -> None:
    model = build_model("llama3-8b", torch.device("cuda"), dtype)
    variants = (("sdpa", "sdpa", fast.SPLIT_LENGTH), ("split 256", "split", 256),
                ("split 1024", "split", 1024))
    default = fast.CUDA_DECODE, fast.SPLIT_LENGTH
    print("| entries | " + " | ".join(v[0] for v in variants) + " |", flush=True)
    for n in entries:
        cells = []
        for _, backend, length in variants:
            fast.CUDA_DECODE, fast.SPLIT_LENGTH = backend, length
            cells.append(f"{engine_step_ms(model, 1, n, 30, 'graph'):.2f}")
        print(f"| {n} | " + " | ".join(cells) + " |", flush=True)
    fast.CUDA_DECODE, fast.SPLIT_LENGTH = default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", default="16384,131072")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--crossover", default=None, help="comma-separated cache sizes: graphed step, SDPA vs split")
    args = parser.parse_args()
    if args.crossover:
        crossover([int(e) for e in args.crossover.split(",")], torch.bfloat16)
        return
    entries = [int(e) for e in args.entries.split(",")]
    for n in entries:
        attention_alone(n, torch.bfloat16)
    profile_step(args.layers, entries[-1], torch.bfloat16)


if __name__ == "__main__":
    main()
