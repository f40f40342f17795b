"""The static decode step: one token for every batch slot, from persistent buffers into the static cache.

Inputs live in fixed buffers (tokens, positions, active flags); the step appends K/V at each slot's length,
attends over the whole preallocated cache with a mask, and advances lengths and positions on the device. No
shape depends on the step or the data and nothing reads back to the host, so the same call can be compiled
(`torch.compile(fullgraph=True)`) or captured as a CUDA graph and replayed.
"""

from __future__ import annotations

import torch

from engine.cache_views import DecodeView
from engine.kv_cache import KVCache


class DecodeStep:
    def __init__(self, model: torch.nn.Module, cache: KVCache):
        batch = cache.shape[1]
        device = cache.device
        self.model, self.cache = model, cache
        self.tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch, dtype=torch.long, device=device)
        self.active = torch.zeros(batch, dtype=torch.long, device=device)
        self.view = DecodeView(cache, self.positions, model.config.sliding_window)

    def __call__(self) -> torch.Tensor:
        """Logits [batch, vocab] for the tokens in `self.tokens`; then lengths/positions of live slots move on."""
        logits = self.model(self.tokens[:, None], self.positions[:, None], self.view)[:, 0]
        self.cache.advance(self.active)
        self.positions.add_(self.active)
        return logits
