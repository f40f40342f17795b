"""The two cache views the model's attention talks to (models.llama.AttentionContext).

PrefillView: one prompt into one slot. The model hands each layer's full-length K/V and its last queries to
`store`; right there, inside that layer, the selection policy (SnapKV or another) picks the entries to keep and
only those are written to the static cache. So the full-length K/V of one layer exist at a time, never of all
layers. `store` runs once per layer, which is also where prefill progress comes from. A conversation's next turn
(engine.session) first reads, through `past`, the entries its slot holds; they and the new tokens are the
candidates `store` selects from.
DecodeView: one new token per batch slot, appended in place at the length of each (layer, kv head) row; attention
over the first `span` entries of the static buffer with a per-row validity mask. In a captured or compiled step
`span` is the capacity, so every shape is fixed; eager decoding narrows it to what the live slots hold.
"""

from __future__ import annotations

from typing import Callable

import torch

from engine.kv_cache import KVCache
from models.attention import decode_attention, decode_backend
from snapkv.policies import SelectionPolicy


class PrefillView:
    def __init__(self, cache: KVCache, slot: int, policy: SelectionPolicy, record_kept: bool = False,
                 progress: Callable[[int, int], None] | None = None,
                 past_positions: list[torch.Tensor] | None = None, start: int = 0,
                 past_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """past_positions: for a conversation's next turn, per layer the positions [kv_heads, P] of the entries
        the slot already holds (the new tokens sit at start, start + 1, ...); they are candidates again.
        past_kv: instead of the slot's entries, per layer the K/V [kv_heads, P, head_dim] of the whole
        conversation so far (a session that keeps its full history); this turn's own K/V are then collected in
        `turn_kv` for it."""
        self.cache, self.slot, self.policy, self.progress = cache, slot, policy, progress
        self.past_positions, self.start, self.past_kv = past_positions, start, past_kv
        self.turn_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if past_kv is not None else None
        record = record_kept or past_positions is not None
        self.kept: list[torch.Tensor] | None = [] if record else None  # per layer: [kv_heads, n] positions
        self.entries = 0  # entries held, summed over layers and kv heads
        self.longest = 0  # the most entries one (layer, kv head) row holds
        self.tail_queries = policy.queries_needed

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The entries this slot holds from earlier turns, [1, kv_heads, P, head_dim] views (read before store)."""
        if self.past_positions is None or not self.past_positions[layer].shape[-1]:
            return None
        if self.past_kv is not None:
            k, v = self.past_kv[layer]
            return k[None].to(self.cache.device, self.cache.dtype), v[None].to(self.cache.device, self.cache.dtype)
        n = self.past_positions[layer].shape[-1]
        k, v = self.cache.read_rows((layer, self.slot, slice(None), slice(0, n)))
        return k[None], v[None]

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Select this layer's entries to keep among the candidates k/v (q: at least the last `tail_queries`
        queries) and write them."""
        keep = self.policy.select(q, k, layer)
        k, v = k[0], v[0]  # prefill runs one sequence: [kv_heads, candidates, head_dim]
        heads, candidates = k.shape[:2]
        if self.turn_kv is not None:  # the new tokens' entries, for the conversation's full history
            first_new = self.past_positions[layer].shape[-1]
            self.turn_kv.append((k[:, first_new:].to("cpu", copy=True), v[:, first_new:].to("cpu", copy=True)))
        if keep is None:
            keep = torch.arange(candidates, device=k.device).expand(heads, -1)
        else:
            keep = keep[0]  # [kv_heads, n], rows that keep fewer padded with -1
            gather = keep.clamp(min=0)[..., None].expand(-1, -1, k.shape[-1])
            k, v = k.gather(1, gather), v.gather(1, gather)
        positions = keep
        if self.past_positions is not None:  # candidate index -> position in the conversation
            past = self.past_positions[layer].to(keep.device)
            new = torch.arange(self.start, self.start + candidates - past.shape[-1], device=keep.device)
            positions = torch.cat([past, new.expand(heads, -1)], dim=-1).gather(-1, keep.clamp(min=0))
            positions = positions.masked_fill(keep < 0, -1)
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
        k, v = cache.read(layer, span)
        return decode_attention(q, k, v, valid, backend=self.backend)
