"""A continued prefill: a conversation's next turn, whose new tokens attend to the entries its slot holds already
(at positions that continue from the conversation's length) and are selected among together with them.

`ContinuedPrefill` is the data (per layer the conversation positions [kv_heads, P] the slot holds, or with the
full history every position so far and its K/V in host memory; the turn's first position); placed on a request
(`engine.sequence.Placement.view`) it makes the `ContinuedPrefillView` the runner prefills through.
"""

from __future__ import annotations

import torch

from engine.cache_views import PrefillView
from engine.kv_cache import KVCache


class ContinuedPrefill:
    def __init__(self, positions: list[torch.Tensor], start: int,
                 history: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """positions: per layer [kv_heads, P] of the candidates held (the slot's entries, or with `history`, the
        K/V [kv_heads, P, head_dim] of every position so far, which then stand in for the slot's entries)."""
        self.positions, self.start, self.history = positions, start, history

    @property
    def held(self) -> int:
        return max((p.shape[-1] for p in self.positions), default=0)

    def heads(self, first: int, count: int) -> ContinuedPrefill:
        """The same turn for kv heads first..first+count-1 only (a tensor-parallel rank's)."""
        return ContinuedPrefill([p[first:first + count] for p in self.positions], self.start, self.history)

    def __call__(self, cache: KVCache, slot: int, policy, record_kept: bool = False, progress=None):
        return ContinuedPrefillView(self, cache, slot, policy, progress)


class ContinuedPrefillView(PrefillView):
    """Records the kept positions always (the conversation tracks them) and, with a full history, this turn's own
    K/V per layer (`turn_kv`, in host memory) for the history to grow by."""

    def __init__(self, turn: ContinuedPrefill, cache: KVCache, slot: int, policy, progress=None):
        super().__init__(cache, slot, policy, record_kept=True, progress=progress)
        self.turn = turn
        self.turn_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = [] if turn.history is not None else None

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        n = self.turn.positions[layer].shape[-1]
        if not n:
            return None
        if self.turn.history is not None:
            k, v = self.turn.history[layer]
            return k[None].to(self.cache.device, self.cache.dtype), v[None].to(self.cache.device, self.cache.dtype)
        k, v = self.cache.read_rows((layer, self.slot, slice(None), slice(0, n)))
        return k[None], v[None]

    def positions(self, layer: int, keep: torch.Tensor, candidates: int) -> torch.Tensor:
        """Candidate index -> conversation position: the held positions first, then the new tokens'."""
        past = self.turn.positions[layer].to(keep.device)
        new = torch.arange(self.turn.start, self.turn.start + candidates - past.shape[-1], device=keep.device)
        positions = torch.cat([past, new.expand(keep.shape[0], -1)], dim=-1).gather(-1, keep.clamp(min=0))
        return positions.masked_fill(keep < 0, -1)

    def store(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.turn_kv is not None:  # the new tokens' entries, for the conversation's full history
            first_new = self.turn.positions[layer].shape[-1]
            self.turn_kv.append((k[0, :, first_new:].to("cpu", copy=True), v[0, :, first_new:].to("cpu", copy=True)))
        super().store(layer, q, k, v)
