"""The two cache views the model's attention talks to (models.llama.AttentionContext).

PrefillView: one sequence's full-length attention, then — right there, inside that layer — the selection policy
(SnapKV or another) picks the entries to keep and only those are written to the static cache. So the full-length
K/V of one layer exist at a time, never of all layers.
DecodeView: one new token per batch slot, appended in place at each slot's length; attention over the whole
static buffer with a validity mask, so every shape is fixed and the step can be captured/compiled.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache
from models.attention import decode_attention, decode_backend, prefill_attention
from snapkv.policies import SelectionPolicy


class PrefillView:
    def __init__(self, cache: KVCache, slot: int, policy: SelectionPolicy, sliding_window: int | None,
                 record_kept: bool = False):
        self.cache, self.slot, self.policy, self.sliding_window = cache, slot, policy, sliding_window
        self.kept: list[torch.Tensor] | None = [] if record_kept else None  # per layer: [kv_heads, n] positions
        self.kept_length = 0
        self.tail_queries = policy.queries_needed  # what a chunked prefill must hand to `store`

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = prefill_attention(q, k, v, self.sliding_window)
        self.store(layer, q, k, v)
        return out

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Select this layer's entries to keep (q: at least the last `tail_queries` queries) and write them."""
        keep = self.policy.select(q, k)
        k, v = k[0], v[0]  # prefill runs one sequence: [kv_heads, T, head_dim]
        if keep is None:
            keep = torch.arange(k.shape[1], device=k.device).expand(k.shape[0], -1)
        else:
            keep = keep[0]
            gather = keep[..., None].expand(-1, -1, k.shape[-1])
            k, v = k.gather(1, gather), v.gather(1, gather)
        self.cache.write_prefill(layer, self.slot, k, v, keep)
        self.kept_length = keep.shape[1]
        if self.kept is not None:
            self.kept.append(keep.cpu())


class DecodeView:
    def __init__(self, cache: KVCache, positions: torch.Tensor, sliding_window: int | None):
        self.cache, self.positions, self.sliding_window = cache, positions, sliding_window
        self.backend = decode_backend(cache.device, needs_position_mask=sliding_window is not None)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        cache = self.cache
        cache.append(layer, k, v, self.positions)
        if self.backend == "flash":  # entries 0..lengths[b] are valid, the one just appended included
            return decode_attention(q, cache.k[layer], cache.v[layer], None, cache.lengths + 1, "flash")
        valid = cache.valid(layer, self.positions, self.sliding_window)
        return decode_attention(q, cache.k[layer], cache.v[layer], valid)
