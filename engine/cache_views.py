"""The two cache views the model's attention talks to (models.llama.AttentionContext).

PrefillView: one prompt into one slot. Each layer hands its full-length K/V and its last queries to `store`, and
right there the selection policy picks the entries to keep; only those are written to the static cache, so the
full-length K/V of one layer exist at a time, never of all layers. A continued prefill (sessions) subclasses it:
`past` gives the entries the slot holds already, candidates again, and `positions` maps candidates to positions.
DecodeView: one new token per slot, appended at each row's length; attention over the first `span` entries with a
per-row mask (in a captured or compiled step `span` is the capacity, so every shape is fixed).
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.kv_cache import KVCache
from models.attention import decode_attention, decode_backend
from snapkv.policies import SelectionPolicy


class PrefillView:
    def __init__(self, cache: KVCache, slot: int, policy: SelectionPolicy, record_kept: bool = False,
                 progress: Callable[[int, int], None] | None = None):
        self.cache, self.slot, self.policy, self.progress = cache, slot, policy, progress
        self.kept: list[torch.Tensor] | None = [] if record_kept else None  # per layer: [kv_heads, n] positions
        self.entries = 0  # entries held, summed over layers and kv heads
        self.longest = 0  # the most entries one (layer, kv head) row holds
        self.tail_queries = policy.queries_needed

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Entries the slot holds already, [1, kv_heads, P, head_dim] (a continued prefill's); None here."""
        return None

    def positions(self, layer: int, keep: torch.Tensor, candidates: int) -> torch.Tensor:
        """The positions of the kept candidates keep [kv_heads, n] (-1: padding): here, their indexes."""
        return keep

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Select this layer's entries among the candidates k/v (q: at least the last `tail_queries` queries) and
        write them."""
        keep = self.policy.select(q, k, layer)
        k, v = k[0], v[0]  # prefill runs one sequence: [kv_heads, candidates, head_dim]
        heads, candidates = k.shape[:2]
        if keep is None:
            keep = torch.arange(candidates, device=k.device).expand(heads, -1)
        else:
            keep = keep[0]  # [kv_heads, n], rows that keep fewer padded with -1
            gather = keep.clamp(min=0)[..., None].expand(-1, -1, k.shape[-1])
            k, v = k.gather(1, gather), v.gather(1, gather)
        positions = self.positions(layer, keep, candidates)
        self.cache.write_prefill(layer, self.slot, k, v, positions)
        counts = (keep >= 0).sum(-1).tolist()
        self.entries += sum(counts)
        self.longest = max(self.longest, *counts)
        if self.kept is not None:
            self.kept.append(positions.cpu())
        if self.progress is not None:
            self.progress(layer + 1, self.cache.shape[0])


class DecodeView:
    def __init__(self, cache: KVCache, positions: torch.Tensor, sliding_window: int | None):
        self.cache, self.positions, self.sliding_window = cache, positions, sliding_window
        self.backend = decode_backend(cache.device, cache.storage_dtype,
                                      needs_position_mask=sliding_window is not None)
        self.span = cache.capacity

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, span = self.cache, self.span
        cache.append(layer, k, v, self.positions)
        if self.backend == "flash":  # each row's first lengths + 1 entries, the one just appended included
            return decode_attention(q, cache.k[layer], cache.v[layer], None, cache.lengths[layer] + 1, "flash")
        valid = cache.visible(layer, span)
        if self.sliding_window is not None:
            valid = valid & cache.in_window(layer, self.positions, self.sliding_window, span)
        k, v = cache.read(layer, span)
        return decode_attention(q, k, v, valid, backend=self.backend)
