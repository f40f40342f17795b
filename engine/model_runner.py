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

import torch

from engine.cache_views import PrefillView
from engine.decode_step import (MODES, DecodeStep, GraphedStep, StepInputs, graph_capture_supported,
                                new_graph_pool, next_tokens)
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


class ModelRunner:
    def __init__(self, model: torch.nn.Module, slots: int, capacity: int, prefill_chunk_size: int,
                 cuda_graph: bool = True, compile: bool = False, kv_int8: bool = False):
        cfg = model.config
        self.model, self.config = model, cfg
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

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> int:
        """Prefill seq's prompt into its slot (the policy selects, layer by layer, straight into the cache), set
        the slot's decode inputs and return the first generated token. A conversation's later turn continues at
        its start position, attending to the entries its slot holds, which are candidates again."""
        ids, slot, x, first_position = seq.prompt_token_ids, seq.slot, self.inputs, seq.start_position
        progress = seq.progress
        start = time.perf_counter()
        view = PrefillView(self.cache, slot, seq.policy, record_kept=seq.return_kept,
                           progress=(lambda done, total: progress("prefill", done, total)) if progress else None,
                           past_positions=seq.past_positions, start=first_position, past_kv=seq.past_kv)
        positions = torch.arange(first_position, first_position + len(ids), device=self.device)[None]
        with PeakMeter(self.device) as meter:
            logits = self.model(torch.tensor([ids], device=self.device), positions=positions, ctx=view,
                                last_only=True, chunk_size=self.prefill_chunk_size)[:, -1].float()
        p = seq.params
        x.temperature[slot], x.top_k[slot], x.top_p[slot] = p.temperature if not p.greedy else 0.0, p.top_k, p.top_p
        x.seed[slot], x.index[slot] = seq.seed, 0
        first = next_tokens(seq.sampling_mode, logits, x.rows(slot, slot + 1))  # as the step would, at token index 0
        x.tokens[slot], x.positions[slot], x.index[slot], x.active[slot] = first[0], first_position + len(ids), 1, 1
        token = int(first[0])
        seq.cache_entries, seq.kept, seq.turn_kv = view.longest, view.kept, view.turn_kv
        rows = self.config.num_layers * self.config.num_kv_heads
        # kept_tokens: entries per (layer, kv head) on average (what the memory holds); kept_max: the largest row
        seq.stats.update(kept_tokens=round(view.entries / rows), kept_max=view.longest,
                         prefill_s=time.perf_counter() - start, measured_peak_bytes=meter.peak)
        return token

    @torch.inference_mode()
    def decode(self, live: list[Sequence]) -> list[int]:
        """One step for every slot up to the highest live one; returns the sampled token of each slot (the one
        device-to-host copy of the step)."""
        bucket = batch_bucket(max(s.slot for s in live) + 1, self.slots)
        mode = max((s.sampling_mode for s in live), key=MODES.index)
        if self.static:
            span = self.capacity
        else:
            longest = max(s.cache_entries for s in live) + 1  # the entry this step appends included
            span = min(self.capacity, -(-longest // SPAN_MULTIPLE) * SPAN_MULTIPLE)
        tokens = self.runners[bucket, mode](span).tolist()
        for s in live:
            s.cache_entries += 1
        return tokens

    def release(self, slot: int) -> None:
        """The slot's request is done: the step stops advancing it (its entries are overwritten by the next)."""
        self.inputs.active[slot] = 0
