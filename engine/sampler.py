"""Token selection from logits: greedy, temperature, top-k and top-p, each request with its own generator."""

from __future__ import annotations

import torch

from engine.sampling_params import SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask to -inf all but the top_k tokens, then all outside the smallest set whose probability reaches top_p
    (HF order: temperature, then top-k, then top-p). logits [..., V] float32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best one always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams | None],
                  generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of logits [B, V]; rows whose params are None (finished slots) give -1."""
    greedy = logits.argmax(dim=-1)
    chosen = greedy.clone()
    for row, p in enumerate(params):
        if p is None or p.greedy:
            continue
        row_logits = filter_logits(logits[row].float() / p.temperature, p.top_k, p.top_p)
        probs = row_logits.softmax(dim=-1)
        chosen[row] = torch.multinomial(probs, 1, generator=generators[row])[0]
    return [t if p is not None else -1 for t, p in zip(chosen.tolist(), params)]
