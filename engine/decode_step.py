"""The static decode step: one token for every batch slot, from persistent buffers into the static cache, and
the two ways to make it fast — a CUDA graph (captured once per batch bucket and cache shape, then replayed) and,
on CPU, `torch.compile(fullgraph=True)`.

Inputs live in fixed buffers (tokens, positions, active flags); the step appends K/V at each slot's length,
attends over the whole preallocated cache with a mask, and advances lengths and positions on the device. No
shape depends on the step or the data and nothing reads back to the host, so the same call can be compiled or
captured and replayed: the host only writes the next tokens into `tokens` and reads `logits`.
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

    def reset(self) -> None:
        """Empty every slot, so a new batch can reuse the buffers (and any graph captured on them)."""
        for t in (self.tokens, self.positions, self.active, self.cache.lengths):
            t.zero_()


class CompiledStep:
    """CPU (or CUDA without graphs): the same step through torch.compile; fullgraph, so any graph break is an error."""

    def __init__(self, step: DecodeStep):
        self.step = step
        self.compiled = torch.compile(step.__call__, fullgraph=True, dynamic=False)

    def __call__(self) -> torch.Tensor:
        return self.compiled()

    def reset(self) -> None:
        self.step.reset()


class CUDAGraphStep:
    """Capture the step as a CUDA graph and replay it. Capture happens on an empty cache (every slot inactive, so
    warm-up runs write only slot entries that prefill overwrites and advance nothing), before any prefill."""

    def __init__(self, step: DecodeStep, warmup: int = 2):
        self.step = step
        step.reset()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs requires
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()
        step.reset()

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits

    def reset(self) -> None:
        self.step.reset()


def batch_bucket(n: int, max_batch_size: int) -> int:
    """Batch slots for n sequences: the next power of two (1, 2, 4, 8, ...), capped at max_batch_size, so a few
    captured graphs / compiled shapes serve every batch size."""
    bucket = 1
    while bucket < n:
        bucket *= 2
    return min(bucket, max(max_batch_size, n))
