"""Tensor parallelism in the engine: the ModelRunner on N ranks, one process each, rank 0 driving (as nano-vllm).

Rank 0 is the LLM's own process: it owns the tokenizer, the scheduler and the outputs, plus a runner for its own
shard. Ranks 1..N-1 are workers, started here with torch.multiprocessing (spawn) on one node, or launched by
torchrun across nodes: then every process runs the same command, and `LLM(...)` on a rank > 0 serves as a worker
and exits when rank 0 is done. Each rank loads only its slices of the weights (models.parallel), holds Hkv/N kv
heads of every layer in its static cache and runs SnapKV on them: selection is per kv head, so it needs no
communication.

Rank 0 sends each runner call to the workers over a gloo group: a header of four integers (what, and the decode
step's bucket, mode and span), and for a prefill its job as a frame, JSON plus raw tensor bytes (nothing is ever
unpickled from a socket). Then every rank runs the same call; the model's all-reduces (NCCL on GPUs, gloo on CPU)
are the only tensor traffic, and a prefill's per-rank results (kept counts and positions) come back to rank 0 as
frames too. Spawned workers meet on the loopback only (the rendezvous store and gloo's sockets); torchrun's own
store listens where torchrun puts it, so run multi-node groups on a trusted network.
A failure inside a tensor-parallel call leaves the ranks out of step, so it ends the engine: a worker that dies
or raises makes rank 0's next collective fail (gloo notices a closed connection at once), and rank 0 raises
RankFailure naming the rank and what happened to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import signal
import socket
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.decode_step import MODES
from engine.model_runner import ModelRunner, PrefillJob, PrefillResult, prefill_progress
from engine.sequence import Sequence
from models.loader import load_model
from models.parallel import TensorParallel
from snapkv.config import SnapKVConfig
from snapkv.policies import make_policy

STOP, PREFILL, DECODE, RELEASE = range(4)  # what a header asks the workers to do
TIMEOUT = datetime.timedelta(days=7)  # a collective waits this long: idle workers wait for rank 0's next call
EXIT_WAIT_S = 5.0  # after a failed collective, how long rank 0 waits for a dying worker's exit code and message
NO_MAIN_GUARD = 75  # a spawned worker's exit code when the script that started LLM(...) has no __main__ guard
FRAME_DTYPES = {str(t): t for t in (torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16)}


class RankFailure(RuntimeError):
    """A tensor-parallel rank died or failed; the ranks are out of step and the engine has stopped."""


@dataclass
class WorkerSpec:
    """What a worker loads (rank 0 sends it, so a torchrun worker needs no arguments of its own)."""
    model: str
    dtype: torch.dtype
    weights_dtype: str | None


# --- frames: what crosses the control group, as JSON and raw tensor bytes --------------------------------------------

def encode_frame(meta, tensors: list[torch.Tensor] = ()) -> torch.Tensor:
    """JSON-able meta and tensors as one uint8 tensor: a header's length, the header, then each tensor's bytes."""
    tensors = [t.detach().cpu().contiguous() for t in tensors]
    header = json.dumps({"meta": meta, "tensors": [[str(t.dtype), list(t.shape)] for t in tensors]}).encode()
    parts = [torch.tensor([len(header)]).view(torch.uint8), torch.frombuffer(bytearray(header), dtype=torch.uint8)]
    parts += [t.view(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8) for t in tensors]
    return torch.cat(parts)


def decode_frame(frame: torch.Tensor):
    """(meta, tensors) back from encode_frame's bytes; only plain numeric dtypes are accepted."""
    n = int(frame[:8].view(torch.int64))
    header = json.loads(bytes(frame[8:8 + n].tolist()))
    offset, tensors = 8 + n, []
    for dtype_name, shape in header["tensors"]:
        dtype = FRAME_DTYPES[dtype_name]
        size = dtype.itemsize * int(torch.tensor(shape).prod()) if shape else dtype.itemsize
        tensors.append(frame[offset:offset + size].clone().view(dtype).view(shape))
        offset += size
    return header["meta"], tensors


def policy_spec(policy) -> dict | None:
    """A selection policy as data: its SnapKV settings (None: the full cache); make_policy rebuilds it."""
    cfg = getattr(policy, "cfg", None)
    return None if cfg is None else dataclasses.asdict(cfg)


def job_frame(job: PrefillJob) -> torch.Tensor:
    if job.past_kv is not None:
        raise ValueError("full-history conversations are not supported with tensor parallelism")
    meta = {"ids": job.ids, "slot": job.slot, "policy": policy_spec(job.policy), "start": job.start,
            "mode": job.mode, "temperature": job.temperature, "top_k": job.top_k, "top_p": job.top_p,
            "seed": job.seed, "record_kept": job.record_kept, "past": job.past_positions is not None}
    return encode_frame(meta, job.past_positions or [])


def job_from_frame(frame: torch.Tensor, config) -> PrefillJob:
    meta, past = decode_frame(frame)
    spec = meta.pop("policy")
    policy = make_policy(None if spec is None else SnapKVConfig(**spec), config.num_layers, config.sliding_window)
    return PrefillJob(policy=policy, past_positions=past if meta.pop("past") else None, past_kv=None, **meta)


def result_frame(result: PrefillResult) -> torch.Tensor:
    meta = {"token": result.token, "entries": result.entries, "longest": result.longest, "seconds": result.seconds,
            "peak_bytes": result.peak_bytes, "kept": result.kept is not None}
    return encode_frame(meta, result.kept or [])


def result_from_frame(frame: torch.Tensor) -> PrefillResult:
    meta, kept = decode_frame(frame)
    return PrefillResult(kept=kept if meta.pop("kept") else None, turn_kv=None, **meta)


def torchrun_rank() -> int | None:
    """This process's rank when launched by torchrun (RANK and WORLD_SIZE set), else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def rank_device(device: torch.device, local_rank: int) -> torch.device:
    """A rank's device: on CUDA the node's GPU of its local rank (rank 0 keeps an explicit index it was given)."""
    if device.type != "cuda":
        return device
    if local_rank == 0 and device.index is not None:
        return device
    return torch.device("cuda", local_rank)


class Ranks:
    """One rank's handle on the group: its TensorParallel (the model's collectives), the gloo control group, and
    on rank 0 the worker processes it started (none under torchrun)."""

    def __init__(self, rank: int, size: int, device: torch.device, rendezvous, processes=(), errors=None):
        self.rank, self.size, self.device = rank, size, device
        self.processes, self.errors = list(processes), errors
        self.failed: str | None = None
        self.closed = False
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks on this machine share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", size))))
        backend = "nccl" if device.type == "cuda" else "gloo"
        if isinstance(rendezvous, str):  # torchrun's env://
            dist.init_process_group(backend, init_method=rendezvous, rank=rank, world_size=size, timeout=TIMEOUT)
        else:  # this node only: (host, port, listening socket or None) of a store on the loopback
            host, port, listener = rendezvous  # the store takes over rank 0's listening socket
            store = dist.TCPStore(host, port, size, rank == 0, timeout=TIMEOUT, wait_for_workers=False,
                                  master_listen_fd=None if listener is None else listener.detach())
            dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT)
        self.control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend == "nccl" else dist.group.WORLD
        self.tp = TensorParallel(rank, size, dist.group.WORLD)
        self.header = torch.zeros(4, dtype=torch.long)

    # --- rank 0 -> workers --------------------------------------------------------------------------------------

    def send(self, what: int, *args: int) -> None:
        self.header[:] = torch.tensor([what, *args, *[0] * (3 - len(args))])
        dist.broadcast(self.header, 0, group=self.control)

    def send_frame(self, frame: torch.Tensor) -> None:
        dist.broadcast(torch.tensor([frame.numel()]), 0, group=self.control)
        dist.broadcast(frame, 0, group=self.control)

    def receive(self) -> list[int]:
        dist.broadcast(self.header, 0, group=self.control)
        return self.header.tolist()

    def receive_frame(self) -> torch.Tensor:
        size = torch.zeros(1, dtype=torch.int64)
        dist.broadcast(size, 0, group=self.control)
        frame = torch.empty(int(size), dtype=torch.uint8)
        dist.broadcast(frame, 0, group=self.control)
        return frame

    def send_json(self, obj) -> None:
        self.send_frame(encode_frame(obj))

    def receive_json(self):
        return decode_frame(self.receive_frame())[0]

    def gather_frames(self, frame: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's frame, in rank order, on rank 0 (None on the others)."""
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([frame.numel()]), group=self.control)
        longest = max(int(n) for n in sizes)
        padded = torch.cat([frame, torch.zeros(longest - frame.numel(), dtype=torch.uint8)])
        out = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(padded, out, dst=0, group=self.control)
        return None if out is None else [f[:int(n)] for f, n in zip(out, sizes)]

    def gather(self, error: str | None) -> list[str | None] | None:
        """Every rank's error message (or None), in rank order, on rank 0 (None on the others)."""
        frames = self.gather_frames(encode_frame(error))
        return None if frames is None else [decode_frame(f)[0] for f in frames]

    @staticmethod
    def raise_first(errors: list[str | None]) -> None:
        """Rank 0, with every rank's error (or None) from a start phase: raise the first as ValueError."""
        for rank, message in enumerate(errors):
            if message is not None:
                raise ValueError(message if rank == 0 else f"tensor-parallel rank {rank}: {message}")

    # --- failures and shutdown -------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self, what: str):
        """Rank 0 around every call the workers take part in: any failure stops the engine with RankFailure."""
        if self.failed:
            raise RankFailure(self.failed)
        try:
            yield
        except Exception as e:
            self.failed = f"tensor-parallel {what} failed: {self._diagnose(e)}; the engine has stopped, start it again"
            self.close(graceful=False)
            raise RankFailure(self.failed) from None

    def _diagnose(self, error: Exception) -> str:
        """Why a collective failed: a worker's own message, a worker's exit code, or rank 0's error."""
        for p in self.processes:
            p.join(EXIT_WAIT_S if p.is_alive() else 0)
        messages = {}
        while self.errors is not None and not self.errors.empty():
            rank, message = self.errors.get()
            messages[rank] = message
        dead = []
        for rank, p in enumerate(self.processes, start=1):
            if rank in messages:
                dead.append(f"rank {rank} raised {messages[rank]}")
            elif p.exitcode is not None:
                dead.append(f"rank {rank} died ({_exit_reason(p.exitcode)})")
        if dead:
            return "; ".join(dead)
        if not self.processes:  # torchrun: the other ranks are not ours to inspect
            return f"{type(error).__name__}: {' '.join(str(error).split())} (check the other ranks' logs)"
        return f"rank 0 raised {type(error).__name__}: {' '.join(str(error).split())}"

    def close(self, graceful: bool = True) -> None:
        """Stop the workers (asked to, or terminated) and leave the process group (once)."""
        if self.closed:
            return
        self.closed = True
        if graceful and not self.failed and dist.is_initialized():
            with contextlib.suppress(Exception):
                self.send(STOP)
                dist.barrier(group=self.control)  # every rank leaves the group together
        for p in self.processes:
            p.join(EXIT_WAIT_S if graceful else 0)
            if p.is_alive():
                p.terminate()
                p.join(EXIT_WAIT_S)
        self.processes, self.errors = [], None  # the error queue's lock is released with it (no leak warning)
        if dist.is_initialized():
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _exit_reason(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def start(size: int, device: torch.device) -> Ranks:
    """Rank 0's group of `size` ranks: join torchrun's (a rank > 0 then serves as a worker right here and the
    process exits when rank 0 is done), or start size - 1 worker processes on this node."""
    rank = torchrun_rank()
    if rank is not None:
        world = int(os.environ["WORLD_SIZE"])
        if world != size:
            raise ValueError(f"tensor parallel size {size} but torchrun started {world} processes; make them equal")
        ranks = Ranks(rank, size, rank_device(device, int(os.environ.get("LOCAL_RANK", rank))), "env://")
        if rank > 0:
            serve(ranks)
            raise SystemExit(0)
        return ranks
    if device.type == "cuda" and torch.cuda.device_count() < size:
        raise ValueError(f"tensor parallel size {size} needs {size} GPUs on this node but it has "
                         f"{torch.cuda.device_count()}; use torchrun across nodes or a smaller size")
    if getattr(mp.current_process(), "_inheriting", False):  # a spawned worker re-running an unguarded script
        os._exit(NO_MAIN_GUARD)  # its parent says what to do, in one line
    on_loopback()
    listener = socket.create_server(("127.0.0.1", 0), backlog=size)  # the store serves the loopback only
    rendezvous = ("127.0.0.1", listener.getsockname()[1])
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    processes = [ctx.Process(target=_worker_main, args=(r, size, device.type, rendezvous, errors), daemon=True,
                             name=f"snapkv-rank{r}") for r in range(1, size)]
    for p in processes:
        p.start()
    try:
        return _while_watching(processes, errors, lambda: Ranks(0, size, rank_device(device, 0),
                                                                 (*rendezvous, listener), processes, errors))
    finally:
        listener.close()  # unless the store took it over


def on_loopback() -> None:
    """Have gloo's and NCCL's own sockets listen on the loopback (a single-node group needs nothing else)."""
    names = [name for _, name in socket.if_nameindex()]
    loopback = next((n for n in ("lo", "lo0") if n in names), None)
    if loopback is not None:
        for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            os.environ.setdefault(variable, loopback)


def _while_watching(processes, errors, join):
    """Run join() (the rendezvous) while watching the workers: one that dies first fails the start instead of
    leaving rank 0 waiting for it."""
    box = {}

    def run():
        try:
            box["ranks"] = join()
        except BaseException as e:
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        dead = [(r, p.exitcode) for r, p in enumerate(processes, start=1) if p.exitcode is not None]
        if dead and thread.is_alive():
            rank, code = dead[0]
            message = errors.get()[1] if not errors.empty() else _exit_reason(code)
            if code == NO_MAIN_GUARD:
                message = ("the script that starts LLM(tensor_parallel_size=...) must do it under `if __name__ == "
                           "\"__main__\":` (each worker is a new process that imports the script again)")
            for p in processes:
                p.terminate()
            raise RankFailure(f"tensor-parallel rank {rank} failed while starting: {message}")
    if "error" in box:
        raise box["error"]
    return box["ranks"]


def _worker_main(rank: int, size: int, device_type: str, rendezvous: tuple[str, int], errors) -> None:
    try:
        on_loopback()
        serve(Ranks(rank, size, rank_device(torch.device(device_type), rank), (*rendezvous, None)))
    except BaseException as e:  # rank 0 reports it (its next collective fails as this process exits)
        errors.put((rank, f"{type(e).__name__}: {' '.join(str(e).split())}"))
        raise SystemExit(1)


def serve(ranks: Ranks) -> None:
    """A worker's life: load its shard, build its runner, then run rank 0's calls until told to stop."""
    spec = WorkerSpec(**ranks.receive_json())
    spec.dtype = getattr(torch, spec.dtype)
    model, error = None, None
    try:
        model = load_model(spec.model, spec.dtype, ranks.device, None, spec.weights_dtype, ranks.tp)
    except ValueError as e:
        error = str(e)
    ranks.gather(error)
    runner_args = ranks.receive_json()
    if error or runner_args is None:  # this rank or another could not load: rank 0 gives up
        return
    runner = None
    try:
        runner = ModelRunner(model, **runner_args)
    except ValueError as e:
        error = str(e)
    ranks.gather(error)
    if runner is None:
        return
    while True:
        what, a, b, c = ranks.receive()
        if what == STOP:
            dist.barrier(group=ranks.control)
            break
        if what == PREFILL:
            result = runner.run_prefill(job_from_frame(ranks.receive_frame(), runner.config))
            ranks.gather_frames(result_frame(result))
        elif what == DECODE:
            runner.run_decode(a, MODES[b], c)
        elif what == RELEASE:
            runner.release(a)
    dist.destroy_process_group()


def load_sharded(ranks: Ranks, spec: WorkerSpec) -> torch.nn.Module:
    """Rank 0: every rank loads its shard of the model; rank 0's is returned. A rank's loading error is raised."""
    with ranks.guard("start"):
        ranks.send_json({"model": spec.model, "dtype": str(spec.dtype).removeprefix("torch."),
                         "weights_dtype": spec.weights_dtype})
    model, error = None, None
    try:
        model = load_model(spec.model, spec.dtype, ranks.device, None, spec.weights_dtype, ranks.tp)
    except ValueError as e:
        error = str(e)
    with ranks.guard("start"):
        errors = ranks.gather(error)
        if any(errors):
            ranks.send_json(None)  # the workers stop waiting for their runner's settings
    ranks.raise_first(errors)
    return model


class ParallelRunner(ModelRunner):
    """Rank 0's runner: each call goes to the workers first, then runs here on rank 0's shard."""

    def __init__(self, ranks: Ranks, model: torch.nn.Module, slots: int, capacity: int, prefill_chunk_size: int,
                 cuda_graph: bool = True, compile: bool = False, kv_int8: bool = False):
        self.ranks = ranks
        args = dict(slots=slots, capacity=capacity, prefill_chunk_size=prefill_chunk_size, cuda_graph=cuda_graph,
                    compile=compile, kv_int8=kv_int8)
        with ranks.guard("start"):
            ranks.send_json(args)
        error = None
        try:
            super().__init__(model, **args)
        except ValueError as e:
            error = str(e)
        with ranks.guard("start"):
            errors = ranks.gather(error)
        ranks.raise_first(errors)  # the workers that built theirs are stopped by LLM's clean-up

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes * self.ranks.size

    def prefill(self, seq: Sequence) -> int:
        job = PrefillJob.of(seq)
        with self.ranks.guard("prefill"):
            self.ranks.send(PREFILL)
            self.ranks.send_frame(job_frame(job))
            mine = self.run_prefill(job, prefill_progress(seq))
            frames = self.ranks.gather_frames(result_frame(mine))
        return self.finish_prefill(seq, [mine] + [result_from_frame(f) for f in frames[1:]])

    def decode(self, live: list[Sequence]) -> list[int]:
        bucket, mode, span = self.plan_decode(live)
        with self.ranks.guard("decode step"):
            self.ranks.send(DECODE, bucket, MODES.index(mode), span)
            tokens = self.run_decode(bucket, mode, span).tolist()
        for s in live:
            s.cache_entries += 1
        return tokens

    def release(self, slot: int) -> None:
        if not self.ranks.failed:
            with self.ranks.guard("release"):
                self.ranks.send(RELEASE, slot)
        super().release(slot)
