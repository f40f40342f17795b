"""ModelRunner: the model, its static KV cache, the prefill of one request into a slot, and the decode step with
its graphs — everything that touches the device.

Both the number of slots and the capacity of a slot are fixed when the runner is built, so every decode-step
shape is known up front: on CUDA one graph is captured per (batch bucket, sampling mode) right away, all sharing
one memory pool, and never again; with `compile`, each bucket's step is compiled once, on first use. A bucket of
b runs the first b slots (the scheduler packs live slots at the front). Eager decoding, the CPU default, narrows
attention to the entries the live slots hold, so a large capacity costs memory but not time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.cache_views import PrefillView
from engine.decode_step import (MODES, DecodeStep, GraphedStep, StepInputs, graph_capture_supported,
                                new_graph_pool, next_tokens)
from engine.kv_cache import KVCache
from engine.memory_model import PeakMeter
from engine.sequence import Sequence
from snapkv.policies import SelectionPolicy

SPAN_MULTIPLE = 64  # eager attention spans are rounded up, so the kernels see few distinct lengths


@dataclass
class PrefillJob:
    """What the device needs to prefill one request: plain data, so that tensor-parallel ranks can each be sent
    the same job (engine.tensor_parallel)."""
    ids: list[int]
    slot: int
    policy: SelectionPolicy
    start: int  # the position of ids[0] (a conversation's later turn continues its positions)
    mode: str  # the sampling mode and settings of the first token
    temperature: float
    top_k: int
    top_p: float
    seed: int
    record_kept: bool
    past_positions: list[torch.Tensor] | None  # per layer [kv_heads, P]: a conversation's held entries
    past_kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # a full-history conversation's K/V

    @classmethod
    def of(cls, seq: Sequence) -> "PrefillJob":
        p = seq.params
        return cls(seq.prompt_token_ids, seq.slot, seq.policy, seq.start_position, seq.sampling_mode,
                   0.0 if p.greedy else p.temperature, p.top_k, p.top_p, seq.seed,
                   seq.return_kept or seq.past_positions is not None, seq.past_positions, seq.past_kv)


@dataclass
class PrefillResult:
    token: int  # the first generated token
    entries: int  # entries kept, summed over layers and kv heads
    longest: int  # the most one (layer, kv head) row holds
    kept: list[torch.Tensor] | None  # per layer [kv_heads, n] kept positions (padded with -1), if recorded
    turn_kv: list[tuple[torch.Tensor, torch.Tensor]] | None
    seconds: float
    peak_bytes: int


def prefill_progress(seq: Sequence):
    """seq's progress callback as the prefill view calls it (layers done, layers), or None."""
    progress = seq.progress
    return (lambda done, total: progress("prefill", done, total)) if progress else None


def merge_heads(parts: list[torch.Tensor]) -> torch.Tensor:
    """Per-rank [kv_heads, n_r] position rows -> one [all kv heads, max n_r], shorter rows padded with -1."""
    n = max(p.shape[-1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, n - p.shape[-1]), value=-1) for p in parts])


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to max_batch_size, and max_batch_size itself: a few steps serve every batch size."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return buckets + [max_batch_size] if max_batch_size > 1 else buckets


def batch_bucket(n: int, max_batch_size: int) -> int:
    """The smallest bucket that covers n slots."""
    return next(b for b in batch_buckets(max_batch_size) if b >= n)


class ModelRunner:
    def __init__(self, model: torch.nn.Module, slots: int, capacity: int, prefill_chunk_size: int,
                 cuda_graph: bool = True, compile: bool = False, kv_int8: bool = False):
        cfg = model.config
        self.model, self.config, self.tp = model, cfg, model.tp  # tp: this rank's place (models.parallel)
        self.device, self.dtype = model.model.norm.weight.device, model.model.norm.weight.dtype
        self.slots, self.capacity, self.prefill_chunk_size = slots, capacity, prefill_chunk_size
        self.cache = KVCache(cfg.num_layers, slots, cfg.num_kv_heads, capacity, cfg.head_dim, self.dtype,
                             self.device, track_positions=cfg.sliding_window is not None, int8=kv_int8)
        self.inputs = StepInputs(slots, self.device)
        self.buckets = batch_buckets(slots)
        self.steps = {b: DecodeStep(model, self.cache, self.inputs, b) for b in self.buckets}
        self.graphed = cuda_graph and graph_capture_supported(self.device)
        self.static = self.graphed or compile  # attention spans the whole capacity: shapes never change
        # (bucket, mode) -> callable(span) -> sampled tokens [bucket]
        self.runners = {(b, m): getattr(step, m) for b, step in self.steps.items() for m in MODES}
        if compile:
            self.runners = {key: torch.compile(fn, fullgraph=True, dynamic=False) for key, fn in self.runners.items()}
        if self.graphed:
            self._capture_graphs()

    @torch.inference_mode()
    def _capture_graphs(self) -> None:
        pool = new_graph_pool()
        for b in reversed(self.buckets):  # largest first: the smaller graphs reuse its memory from the pool
            for m in MODES:
                self.runners[b, m] = GraphedStep(self.runners[b, m], self.capacity, pool, self.device)
        self.inputs.active.zero_()

    def prefill(self, seq: Sequence) -> int:
        """Prefill seq's prompt into its slot (the policy selects, layer by layer, straight into the cache), set
        the slot's decode inputs and return the first generated token. A conversation's later turn continues at
        its start position, attending to the entries its slot holds, which are candidates again."""
        return self.finish_prefill(seq, [self.run_prefill(PrefillJob.of(seq), prefill_progress(seq))])

    @torch.inference_mode()
    def run_prefill(self, job: PrefillJob, progress=None) -> PrefillResult:
        """The device work of a prefill, for this runner's kv heads (under tensor parallelism, its rank's)."""
        ids, slot, x = job.ids, job.slot, self.inputs
        start = time.perf_counter()
        heads = self.config.num_kv_heads
        first_head = self.tp.rank * heads  # a conversation's held positions: this rank's kv heads
        past = [p[first_head:first_head + heads] for p in job.past_positions] if job.past_positions else None
        view = PrefillView(self.cache, slot, job.policy, record_kept=job.record_kept, progress=progress,
                           past_positions=past, start=job.start, past_kv=job.past_kv)
        positions = torch.arange(job.start, job.start + len(ids), device=self.device)[None]
        with PeakMeter(self.device) as meter:
            logits = self.model(torch.tensor([ids], device=self.device), positions=positions, ctx=view,
                                last_only=True, chunk_size=self.prefill_chunk_size)[:, -1].float()
        x.temperature[slot], x.top_k[slot], x.top_p[slot] = job.temperature, job.top_k, job.top_p
        x.seed[slot], x.index[slot] = job.seed, 0
        first = next_tokens(job.mode, logits, x.rows(slot, slot + 1))  # as the step would, at token index 0
        first = self.tp.from_first_rank(first)  # every rank continues from rank 0's token
        x.tokens[slot], x.positions[slot], x.index[slot], x.active[slot] = first[0], job.start + len(ids), 1, 1
        return PrefillResult(int(first[0]), view.entries, view.longest, view.kept, view.turn_kv,
                             time.perf_counter() - start, meter.peak)

    def finish_prefill(self, seq: Sequence, results: list[PrefillResult]) -> int:
        """Record in seq what the prefill of every rank (one without tensor parallelism) did; its first token."""
        first = results[0]
        seq.cache_entries = max(r.longest for r in results)
        seq.kept = first.kept and [merge_heads([r.kept[layer] for r in results]) for layer in range(len(first.kept))]
        seq.turn_kv = first.turn_kv
        rows = self.config.num_layers * self.config.num_kv_heads * len(results)
        # kept_tokens: entries per (layer, kv head) on average (what the memory holds); kept_max: the largest row
        seq.stats.update(kept_tokens=round(sum(r.entries for r in results) / rows), kept_max=seq.cache_entries,
                         prefill_s=first.seconds, measured_peak_bytes=first.peak_bytes)
        return first.token

    def plan_decode(self, live: list[Sequence]) -> tuple[int, str, int]:
        """The step for these sequences: its batch bucket (up to the highest live slot), sampling mode and span."""
        bucket = batch_bucket(max(s.slot for s in live) + 1, self.slots)
        mode = max((s.sampling_mode for s in live), key=MODES.index)
        if self.static:
            return bucket, mode, self.capacity
        longest = max(s.cache_entries for s in live) + 1  # the entry this step appends included
        return bucket, mode, min(self.capacity, -(-longest // SPAN_MULTIPLE) * SPAN_MULTIPLE)

    @torch.inference_mode()
    def run_decode(self, bucket: int, mode: str, span: int) -> torch.Tensor:
        return self.runners[bucket, mode](span)

    def decode(self, live: list[Sequence]) -> list[int]:
        """One step for every slot up to the highest live one; returns the sampled token of each slot (the one
        device-to-host copy of the step)."""
        tokens = self.run_decode(*self.plan_decode(live)).tolist()
        for s in live:
            s.cache_entries += 1
        return tokens

    @property
    def cache_bytes(self) -> int:
        """The static cache's bytes (every rank's, under tensor parallelism)."""
        return self.cache.nbytes

    def release(self, slot: int) -> None:
        """The slot's request is done: the step stops advancing it (its entries are overwritten by the next)."""
        self.inputs.active[slot] = 0
