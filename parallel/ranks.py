"""A tensor-parallel group of processes: one rank each, rank 0 driving (as nano-vllm). Ranks 1..N-1 are started
here with torch.multiprocessing (spawn) on one node, or launched by torchrun across nodes, where every process
runs the same command and a rank > 0 serves as a worker.

Rank 0 sends each call to the workers over a gloo group: a header of four integers, and for a prefill a frame,
JSON plus raw tensor bytes of plain dtypes (nothing is unpickled from a socket). Spawned workers meet on the
loopback only (the rendezvous store and gloo's sockets); torchrun's own store listens where torchrun puts it, so
multi-node groups need a trusted network. A failure inside a call leaves the ranks out of step, so it stops the
engine: rank 0 raises RankFailure naming the rank and what happened to it.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import socket
import threading

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from engine.errors import EngineFailure
from parallel.shard import TensorParallel

STOP, PREFILL, DECODE, RELEASE = range(4)  # what a header asks the workers to do
TIMEOUT = datetime.timedelta(days=7)  # a collective waits this long: idle workers wait for rank 0's next call
EXIT_WAIT_S = 5.0  # after a failed collective, how long rank 0 waits for a dying worker's exit code and message
NO_MAIN_GUARD = 75  # a spawned worker's exit code when the script that started LLM(...) has no __main__ guard
FRAME_DTYPES = {str(t): t for t in (torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16)}


class RankFailure(EngineFailure):
    """A tensor-parallel rank died or failed; the ranks are out of step and the engine has stopped."""


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


def start(size: int, device: torch.device, worker_loop, worker_main) -> Ranks:
    """Rank 0's group of `size` ranks: join torchrun's (a rank > 0 then runs worker_loop(ranks) right here and
    the process exits when rank 0 is done), or start size - 1 processes running worker_main on this node."""
    rank = torchrun_rank()
    if rank is not None:
        world = int(os.environ["WORLD_SIZE"])
        if world != size:
            raise ValueError(f"tensor parallel size {size} but torchrun started {world} processes; make them equal")
        ranks = Ranks(rank, size, rank_device(device, int(os.environ.get("LOCAL_RANK", rank))), "env://")
        if rank > 0:
            worker_loop(ranks)
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
    processes = [ctx.Process(target=worker_main, args=(r, size, device.type, rendezvous, errors), daemon=True,
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
