"""The engine on N ranks: each loads only its shard (formats.loader with a TensorParallel), holds Hkv/N kv heads of
every layer in its static cache and runs SnapKV on them (selection is per kv head: no communication). Rank 0's
ParallelRunner sends each prefill, decode step and release to the workers, then runs it on its own shard; a
prefill's per-rank results (kept counts and positions) come back to rank 0 as frames and are merged by kv head.
`start_engine` is what `LLM(tensor_parallel_size=N)` calls (engine.wings).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from types import SimpleNamespace

import torch
import torch.distributed as dist

from engine import wings
from engine.admission import slot_capacity
from engine.cache_views import PrefillView
from engine.decode_step import MODES
from engine.kv_cache import KVCache
from engine.model_runner import ModelRunner, prefill_progress, sampling
from engine.sequence import Sequence
from formats.loader import load_model
from parallel.ranks import DECODE, PREFILL, RELEASE, STOP, Ranks, decode_frame, encode_frame, on_loopback, start
from parallel.shard import shard_config
from sessions.continued import ContinuedPrefill
from snapkv.config import SnapKVConfig
from snapkv.policies import make_policy


@dataclass
class WorkerSpec:
    """What a worker loads (rank 0 sends it, so a torchrun worker needs no arguments of its own)."""
    model: str
    dtype: str
    weights_dtype: str | None


def start_engine(llm, path, cache_class: type[KVCache] | None):
    """Rank 0's side of LLM(tensor_parallel_size=N): start the group, load every rank's shard, build the runners.
    Returns (ranks, model, runner); no worker outlives a failed start."""
    opts = llm.options
    shard_config(llm.config, opts.tensor_parallel_size)  # refuses a size that does not divide the kv heads
    ranks = start(opts.tensor_parallel_size, llm.device, worker_loop, worker_main)
    try:
        llm.device = ranks.device
        spec = WorkerSpec(str(path), str(llm.dtype).removeprefix("torch."), opts.weights_dtype)
        model = load_sharded(ranks, spec)
        settings = dict(slots=llm.max_batch_size, capacity=slot_capacity(llm, ranks.size),
                        prefill_chunk_size=llm.prefill_chunk_size, cuda_graph=opts.cuda_graph, compile=opts.compile,
                        kv_dtype=opts.kv_dtype)
        return ranks, model, ParallelRunner(ranks, model, settings)
    except BaseException:
        ranks.close()
        raise


def runner_settings(settings: dict) -> dict:
    """The runner's arguments from the settings rank 0 sends (the cache by its kv dtype's name)."""
    settings = dict(settings)
    int8 = settings.pop("kv_dtype") == "int8"
    return settings | {"cache_class": wings.need("kv_int8", "kv_dtype int8") if int8 else None}


def worker_main(rank: int, size: int, device_type: str, rendezvous: tuple[str, int], errors) -> None:
    from parallel.ranks import rank_device

    try:
        on_loopback()
        worker_loop(Ranks(rank, size, rank_device(torch.device(device_type), rank), (*rendezvous, None)))
    except BaseException as e:  # rank 0 reports it (its next collective fails as this process exits)
        errors.put((rank, f"{type(e).__name__}: {' '.join(str(e).split())}"))
        raise SystemExit(1)


def worker_loop(ranks: Ranks) -> None:
    """A worker's life: load its shard, build its runner, then run rank 0's calls until told to stop."""
    spec = WorkerSpec(**ranks.receive_json())
    model, error = None, None
    try:
        model = load_model(spec.model, getattr(torch, spec.dtype), ranks.device, None, spec.weights_dtype, ranks.tp)
    except ValueError as e:
        error = str(e)
    ranks.gather(error)
    settings = ranks.receive_json()
    if error or settings is None:  # this rank or another could not load: rank 0 gives up
        return
    runner = None
    try:
        runner = ModelRunner(model, **runner_settings(settings))
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
            ranks.gather_frames(prefill_on_rank(runner, ranks, ranks.receive_frame()))
        elif what == DECODE:
            runner.run_decode(a, MODES[b], c)
        elif what == RELEASE:
            runner.release(a)
    dist.destroy_process_group()


def load_sharded(ranks: Ranks, spec: WorkerSpec) -> torch.nn.Module:
    """Rank 0: every rank loads its shard of the model; rank 0's is returned. A rank's loading error is raised."""
    with ranks.guard("start"):
        ranks.send_json(asdict(spec))
    model, error = None, None
    try:
        model = load_model(spec.model, getattr(torch, spec.dtype), ranks.device, None, spec.weights_dtype, ranks.tp)
    except ValueError as e:
        error = str(e)
    with ranks.guard("start"):
        errors = ranks.gather(error)
        if any(errors):
            ranks.send_json(None)  # the workers stop waiting for their runner's settings
    ranks.raise_first(errors)
    return model


def job_frame(seq: Sequence) -> torch.Tensor:
    """What every rank needs to prefill seq: the ids, slot, policy (as its SnapKV settings), first position and
    sampling, and a continued prefill's held positions (every kv head's)."""
    turn = seq.placement.view
    if turn is not None and (not isinstance(turn, ContinuedPrefill) or turn.history is not None):
        raise ValueError("with tensor parallelism a prefill continues only from the entries its slot holds")
    cfg = getattr(seq.policy, "cfg", None)
    meta = {"ids": seq.prompt_token_ids, "slot": seq.slot, "policy": None if cfg is None else asdict(cfg),
            "start": seq.placement.start, "sample": list(sampling(seq)), "record_kept": seq.return_kept,
            "continued": turn is not None}
    return encode_frame(meta, turn.positions if turn is not None else [])


def prefill_on_rank(runner: ModelRunner, ranks: Ranks, frame: torch.Tensor, progress=None) -> torch.Tensor:
    """Run a job frame's prefill on this rank's kv heads; its results as a frame."""
    meta, positions = decode_frame(frame)
    cfg = runner.config
    policy = make_policy(meta["policy"] and SnapKVConfig(**meta["policy"]), cfg.num_layers, cfg.sliding_window)
    if meta["continued"]:
        turn = ContinuedPrefill(positions, meta["start"]).heads(ranks.rank * cfg.num_kv_heads, cfg.num_kv_heads)
        view = turn(runner.cache, meta["slot"], policy, progress=progress)
    else:
        view = PrefillView(runner.cache, meta["slot"], policy, record_kept=meta["record_kept"], progress=progress)
    token, seconds, peak = runner.run_prefill(meta["ids"], meta["slot"], meta["start"], view, tuple(meta["sample"]))
    result = {"token": token, "entries": view.entries, "longest": view.longest, "seconds": seconds, "peak": peak}
    return encode_frame(result, view.kept or [])


class ParallelRunner(ModelRunner):
    """Rank 0's runner: each call goes to the workers first, then runs here on rank 0's shard."""

    def __init__(self, ranks: Ranks, model: torch.nn.Module, settings: dict):
        self.ranks = ranks
        with ranks.guard("start"):
            ranks.send_json(settings)
        error = None
        try:
            super().__init__(model, **runner_settings(settings))
        except ValueError as e:
            error = str(e)
        with ranks.guard("start"):
            errors = ranks.gather(error)
        ranks.raise_first(errors)  # the workers that built theirs are stopped by the start's clean-up

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes * self.ranks.size

    def prefill(self, seq: Sequence) -> int:
        frame = job_frame(seq)
        with self.ranks.guard("prefill"):
            self.ranks.send(PREFILL)
            self.ranks.send_frame(frame)
            mine = prefill_on_rank(self, self.ranks, frame, prefill_progress(seq))
            frames = self.ranks.gather_frames(mine)
        results = [decode_frame(f) for f in frames]
        metas = [meta for meta, _ in results]
        kept = [merge_heads([k[layer] for _, k in results]) for layer in range(len(results[0][1]))] or None
        view = SimpleNamespace(kept=kept, entries=sum(m["entries"] for m in metas),
                               longest=max(m["longest"] for m in metas), turn_kv=None)
        self.record_prefill(seq, view, metas[0]["seconds"], metas[0]["peak"], ranks=self.ranks.size)
        return metas[0]["token"]

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


def merge_heads(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank [kv_heads, n_r] position rows -> one [all kv heads, max n_r], shorter rows padded with -1."""
    n = max(p.shape[-1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, n - p.shape[-1]), value=-1) for p in parts])
