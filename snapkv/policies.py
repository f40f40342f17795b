"""Selection policies behind one interface, so SnapKV can be compared honestly with the alternatives:
`full` (keep everything), `streaming` (StreamingLLM: attention sinks + the most recent tokens) and `snapkv`.

A policy maps one layer's prefill q and k [B, Hkv, T, D] to the indices [B, Hkv, n] of the entries to keep (sorted
by position), or None to keep all T. q [B, H, >= queries_needed, D] holds at least the prompt's last
`queries_needed` queries (a chunked prefill never has all of them at once)."""

from __future__ import annotations

from typing import Protocol

import torch

from snapkv.config import SnapKVConfig
from snapkv.select import snapkv_select


class SelectionPolicy(Protocol):
    queries_needed: int

    def kept_length(self, prompt_len: int) -> int: ...

    def select(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None: ...


class FullCache:
    queries_needed = 0

    def kept_length(self, prompt_len: int) -> int:
        return prompt_len

    def select(self, q, k):
        return None


class StreamingLLM:
    queries_needed = 0

    def __init__(self, budget: int, sink_tokens: int = 4):
        self.budget, self.sink_tokens = budget, sink_tokens

    def kept_length(self, prompt_len: int) -> int:
        return min(prompt_len, self.budget)

    def select(self, q, k):
        b, hkv, t, _ = k.shape
        if t <= self.budget:
            return None
        recent = self.budget - self.sink_tokens
        idx = torch.cat([torch.arange(self.sink_tokens, device=k.device), torch.arange(t - recent, t, device=k.device)])
        return idx.expand(b, hkv, self.budget)


class SnapKV:
    def __init__(self, cfg: SnapKVConfig):
        self.cfg = cfg
        self.queries_needed = cfg.window

    def kept_length(self, prompt_len: int) -> int:
        return min(prompt_len, self.cfg.budget)

    def select(self, q, k):
        return snapkv_select(q, k, self.cfg)


def make_policy(cfg: SnapKVConfig | None) -> SelectionPolicy:
    if cfg is None or cfg.policy == "full":
        return FullCache()
    if cfg.policy == "streaming":
        return StreamingLLM(cfg.budget, cfg.sink_tokens)
    return SnapKV(cfg)
