"""ModelRunner: the model, its static KV cache, the prefill of one request into a slot, and the decode step with
its graphs — everything that touches the device.

The slots and the capacity of a slot are fixed when the runner is built, so every decode-step shape is known up
front: on CUDA one graph is captured per (batch bucket, sampling mode) right away, all sharing one memory pool;
with `compile`, each bucket's step is compiled once, on first use. A bucket of b runs the first b slots (the
scheduler packs live slots at the front). Eager decoding narrows attention to the entries the live slots hold, so a
large capacity costs memory but not time.
"""

from __future__ import annotations

import functools
import time

import torch

from engine.cache_views import PrefillView
from engine.decode_step import MODES, DecodeStep, GraphedStep, StepInputs, graph_capture_supported, new_graph_pool, \
    next_tokens
from engine.kv_cache import KVCache
from engine.memory_model import PeakMeter
from engine.sequence import Sequence

SPAN_MULTIPLE = 64  # eager attention spans are rounded up, so the kernels see few distinct lengths


def batch_buckets(max_batch_size: int) -> list[int]:
    """Powers of two up to max_batch_size, and max_batch_size itself: a few steps serve every batch size."""
    buckets = [1]
    while buckets[-1] * 2 < max_batch_size:
        buckets.append(buckets[-1] * 2)
    return buckets + [max_batch_size] if max_batch_size > 1 else buckets


def batch_bucket(n: int, max_batch_size: int) -> int:
    """The smallest bucket that covers n slots."""
    return next(b for b in batch_buckets(max_batch_size) if b >= n)


def prefill_progress(seq: Sequence):
    """seq's progress callback as a prefill view calls it (layers done, layers), or None."""
    progress = seq.progress
    return (lambda done, total: progress("prefill", done, total)) if progress else None


def sampling(seq: Sequence) -> tuple:
    """(mode, temperature, top_k, top_p, seed) of seq's first token, as the decode step samples the rest."""
    p = seq.params
    return seq.sampling_mode, 0.0 if p.greedy else p.temperature, p.top_k, p.top_p, seq.seed


class ModelRunner:
    def __init__(self, model: torch.nn.Module, slots: int, capacity: int, prefill_chunk_size: int,
                 cuda_graph: bool = True, compile: bool = False, cache_class: type[KVCache] | None = None):
        cfg = model.config
        self.model, self.config = model, cfg
        self.device, self.dtype = model.model.norm.weight.device, model.model.norm.weight.dtype
        self.slots, self.capacity, self.prefill_chunk_size = slots, capacity, prefill_chunk_size
        self.cache = (cache_class or KVCache)(cfg.num_layers, slots, cfg.num_kv_heads, capacity, cfg.head_dim,
                                              self.dtype, self.device, track_positions=cfg.sliding_window is not None)
        self.inputs = StepInputs(slots, self.device)
        self.buckets = batch_buckets(slots)
        self.steps = {b: DecodeStep(model, self.cache, self.inputs, b) for b in self.buckets}
        self.graphed = cuda_graph and graph_capture_supported(self.device)
        self.static = self.graphed or compile  # attention spans the whole capacity: shapes never change
        # (bucket, mode) -> callable(span) -> sampled tokens [bucket]
        self.runners = {(b, m): functools.partial(step.run, m) for b, step in self.steps.items() for m in MODES}
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

    def new_view(self, seq: Sequence, record_kept: bool) -> PrefillView:
        """seq's prefill view: a plain one, or its placement's (a continued prefill's)."""
        make = seq.placement.view or PrefillView
        return make(self.cache, seq.slot, seq.policy, record_kept=record_kept, progress=prefill_progress(seq))

    def prefill(self, seq: Sequence) -> int:
        """Prefill seq's prompt into its slot (the policy selects, layer by layer, straight into the cache), set
        the slot's decode inputs and return the first generated token."""
        view = self.new_view(seq, seq.return_kept)
        token, seconds, peak = self.run_prefill(seq.prompt_token_ids, seq.slot, seq.placement.start, view,
                                                sampling(seq))
        self.record_prefill(seq, view, seconds, peak)
        return token

    @torch.inference_mode()
    def run_prefill(self, ids: list[int], slot: int, start: int, view: PrefillView, sample: tuple):
        """The device work of a prefill (positions from `start`); returns (first token, seconds, peak bytes)."""
        mode, temperature, top_k, top_p, seed = sample
        began = time.perf_counter()
        positions = torch.arange(start, start + len(ids), device=self.device)[None]
        with PeakMeter(self.device) as meter:
            logits = self.model(torch.tensor([ids], device=self.device), positions=positions, ctx=view,
                                last_only=True, chunk_size=self.prefill_chunk_size)[:, -1].float()
        inputs = self.inputs
        inputs.temperature[slot], inputs.top_k[slot], inputs.top_p[slot], inputs.seed[slot], inputs.index[slot] = \
            temperature, top_k, top_p, seed, 0
        first = next_tokens(mode, logits, inputs.rows(slot, slot + 1))  # as the step would, at token index 0
        inputs.tokens[slot], inputs.positions[slot], inputs.index[slot], inputs.active[slot] = \
            first[0], start + len(ids), 1, 1
        return int(first[0]), time.perf_counter() - began, meter.peak

    def record_prefill(self, seq: Sequence, view, seconds: float, peak: int | None, ranks: int = 1) -> None:
        """What the prefill kept, in seq (view: its cache view, or every rank's merged)."""
        seq.view, seq.cache_entries = view, view.longest
        rows = self.config.num_layers * self.config.num_kv_heads * ranks
        # kept_tokens: entries per (layer, kv head) on average (what the memory holds); kept_max: the largest row
        seq.record(kept_tokens=round(view.entries / rows), kept_max=view.longest, prefill_s=seconds,
                   measured_peak_bytes=peak)

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
