"""Selection policies behind one interface: `full` (keep everything) and `snapkv` here, the alternatives it is
compared with (streaming, adakv, pyramidkv, tova, keynorm) in snapkv.alternatives.

A policy maps one layer's prefill q and k [B, Hkv, T, D] to the indices [B, Hkv, n] of the entries to keep (in
position order; rows padded with -1 when heads keep different numbers), or None to keep all T. q holds at least
the prompt's last `queries_needed` queries (a chunked prefill never has all of them at once). With a sliding
window (Mistral), decode can never see a prompt key at or before `T - sliding_window`, so compressing policies
neither vote for nor keep those: they choose among the visible keys only.
"""

from __future__ import annotations

from typing import Protocol

import torch

from snapkv.config import SnapKVConfig
from snapkv.select import snapkv_scores, top_positions


class SelectionPolicy(Protocol):
    queries_needed: int

    def kept_length(self, prompt_len: int) -> int:
        """The most entries any (layer, kv head) keeps from a prompt of this length (what a slot must hold)."""

    def select(self, q: torch.Tensor, k: torch.Tensor, layer: int) -> torch.Tensor | None: ...


class FullCache:
    queries_needed = 0

    def kept_length(self, prompt_len: int) -> int:
        return prompt_len

    def select(self, q, k, layer=0):
        return None


class Compressing:
    """What every compressing policy shares: the sliding-window restriction, sinks, and the budget per layer.
    Subclasses implement `choose(q, k, budget)` over keys that are all visible and more than `budget`."""

    queries_needed = 0

    def __init__(self, cfg: SnapKVConfig, num_layers: int = 1, sliding_window: int | None = None):
        self.cfg, self.num_layers, self.sliding_window = cfg, num_layers, sliding_window

    def first_visible(self, prompt_len: int) -> int:
        """The first prompt position a decode step can ever see (its first query sits at prompt_len)."""
        return 0 if self.sliding_window is None else max(0, prompt_len - self.sliding_window + 1)

    def layer_budget(self, layer: int) -> int:
        return self.cfg.budget

    def most_per_head(self) -> int:
        return max(self.layer_budget(layer) for layer in range(self.num_layers))

    def kept_length(self, prompt_len: int) -> int:
        return min(prompt_len - self.first_visible(prompt_len), self.most_per_head())

    def select(self, q, k, layer=0):
        b, hkv, t, _ = k.shape
        first = self.first_visible(t)
        budget = self.layer_budget(layer)
        if t - first <= budget:
            return None if first == 0 else torch.arange(first, t, device=k.device).expand(b, hkv, t - first)
        keep = self.choose(q, k[:, :, first:], budget)
        return keep if first == 0 else torch.where(keep >= 0, keep + first, keep)

    def with_sinks(self, scores: torch.Tensor) -> torch.Tensor:
        sinks = self.cfg.sinks
        if sinks:
            scores = scores.clone()
            scores[..., :sinks] = float("inf")
        return scores

    def top(self, scores: torch.Tensor, count: int) -> torch.Tensor:
        return top_positions(self.with_sinks(scores), count)


class SnapKV(Compressing):
    """The last `window` queries vote (snapkv.select); the best `budget - window` prefix positions are kept with
    the window itself."""

    def __init__(self, cfg: SnapKVConfig, num_layers: int = 1, sliding_window: int | None = None):
        super().__init__(cfg, num_layers, sliding_window)
        self.queries_needed = cfg.window

    def window_positions(self, k: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
        t, w = k.shape[2], self.cfg.window
        return torch.arange(t - w, t, device=k.device).expand(*rows, w)

    def choose(self, q, k, budget):
        picks = self.top(snapkv_scores(q, k, self.cfg), budget - self.cfg.window)
        return torch.cat([picks, self.window_positions(k, picks.shape[:2])], dim=-1)


POLICY_CLASSES: dict[str, type[Compressing]] = {"snapkv": SnapKV}  # and the alternatives (snapkv.alternatives)


def make_policy(cfg: SnapKVConfig | None, num_layers: int = 1, sliding_window: int | None = None) -> SelectionPolicy:
    """The policy for `cfg` (None = full cache) on a model with `num_layers` layers and this sliding window."""
    if cfg is None or cfg.policy == "full":
        return FullCache()
    return POLICY_CLASSES[cfg.policy](cfg, num_layers, sliding_window)
