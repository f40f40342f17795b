"""The two cache views the model's attention talks to (models.llama.AttentionContext).

PrefillView: one prompt into one slot. The model hands each layer's full-length K/V and its last queries to
`store`; right there, inside that layer, the selection policy (SnapKV or another) picks the entries to keep and
only those are written to the static cache. So the full-length K/V of one layer exist at a time, never of all
layers. `store` runs once per layer, which is also where prefill progress comes from.
DecodeView: one new token per batch slot, appended in place at the length of each (layer, kv head) row; attention
over the first `span` entries of the static buffer with a per-row validity mask. In a captured or compiled step `span` is the capacity,
so every shape is fixed; eager decoding narrows it to what the live slots hold.
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

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Select this layer's entries to keep (q: at least the last `tail_queries` queries) and write them."""
        keep = self.policy.select(q, k, layer)
        k, v = k[0], v[0]  # prefill runs one sequence: [kv_heads, T, head_dim]
        if keep is None:
            keep = torch.arange(k.shape[1], device=k.device).expand(k.shape[0], -1)
        else:
            keep = keep[0]  # [kv_heads, n], rows that keep fewer padded with -1
            gather = keep.clamp(min=0)[..., None].expand(-1, -1, k.shape[-1])
            k, v = k.gather(1, gather), v.gather(1, gather)
        self.cache.write_prefill(layer, self.slot, k, v, keep)
        counts = (keep >= 0).sum(-1).tolist()
        self.entries += sum(counts)
        self.longest = max(self.longest, *counts)
        if self.kept is not None:
            self.kept.append(keep.cpu())
        if self.progress is not None:
            self.progress(layer + 1, self.cache.shape[0])


class DecodeView:
    def __init__(self, cache: KVCache, positions: torch.Tensor, sliding_window: int | None):
        self.cache, self.positions, self.sliding_window = cache, positions, sliding_window
        self.backend = decode_backend(cache.device, cache.dtype, needs_position_mask=sliding_window is not None)
        self.begin_step(cache.capacity)

    def begin_step(self, span: int) -> None:
        """Before each step's forward: how many entries of each row attention looks at."""
        self.span = span

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache, span = self.cache, self.span
        cache.append(layer, k, v, self.positions)
        if self.backend == "flash":  # each row's first lengths + 1 entries, the one just appended included
            return decode_attention(q, cache.k[layer], cache.v[layer], None, cache.lengths[layer] + 1, "flash")
        valid = cache.visible(layer, span)
        if self.sliding_window is not None:
            valid = valid & cache.in_window(layer, self.positions, self.sliding_window, span)
        return decode_attention(q, cache.k[layer, :, :, :span], cache.v[layer, :, :, :span], valid,
                                backend=self.backend)
