"""Token selection from logits inside the static decode step: greedy, temperature, top-k and top-p, per row.

Sampling is Gumbel-max, argmax(logits / T + g), with the noise g hashed from (seed, token index, vocab id) in
integer tensor ops rather than drawn from a torch.Generator. So a request's draws depend only on its own seed and
position, never on its batch row or its neighbours; there is no generator state to carry between steps; and every
function here has static shapes with no host sync, so it runs under torch.compile(fullgraph=True) and inside a
CUDA graph together with the forward pass.

Per-row tensors: temperature [B] float32 (0 = greedy), top_k [B] int64 (0 = off), top_p [B] float32 (1 = off),
seed [B] int64 in [0, 2^63), index [B] int64 (0 for a request's first generated token, 1 for the next, ...).
"""

from __future__ import annotations

import torch

_MASK32 = 0xFFFFFFFF


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 for x < 2^32 without int64 overflow: the high 16 bits of x only matter in their low 16 bits of
    # the product, and both partial products stay below 2^48. In place, because eager CPU sampling spends most of
    # its time allocating [B, V] int64 temporaries
    hi = x >> 16
    hi *= c
    hi &= 0xFFFF
    hi <<= 16
    x &= 0xFFFF
    x *= c
    x += hi
    x &= _MASK32
    return x


def hash32(x: torch.Tensor) -> torch.Tensor:
    """Chris Wellons' lowbias32 on an int64 tensor, taken mod 2^32 first; values in [0, 2^32)."""
    x = x & _MASK32  # a new tensor, so the in-place steps never touch the caller's
    x ^= x >> 16
    _mul32_(x, 0x21F0AAAD)
    x ^= x >> 15
    _mul32_(x, 0x735A2D97)
    x ^= x >> 15
    return x


def gumbel_noise(seed: torch.Tensor, index: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Standard Gumbel noise [B, V] float32, a pure function of (seed[b], index[b], vocab id)."""
    seed, index = seed.long(), index.long()
    # each part is hashed before it is mixed in, so the seed's two halves and the index cannot cancel by an xor
    key = hash32(hash32(hash32(seed ^ 0x9E3779B9) ^ (seed >> 32)) ^ hash32(index ^ 0x85EBCA6B))
    # hashing the vocab ids first keeps two keys that differ by a small xor from giving permuted copies of one row
    vocab = hash32(torch.arange(vocab_size, device=seed.device) ^ 0x27D4EB2F)
    bits = hash32(key[:, None] ^ vocab[None, :])
    # 23 bits, not 24: (2^24 - 0.5) / 2^24 rounds to 1.0 in float32 and would give +inf noise; with 23 bits every u
    # is exact and lies in [2^-24, 1 - 2^-24]
    u = ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))
    return -torch.log(-torch.log(u))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax per row of logits [B, V] -> [B] int64."""
    return logits.argmax(dim=-1)


def _scaled(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    # greedy rows divide by 1 instead of 0; their sampled token is replaced by the exact argmax afterwards
    return logits / torch.where(temperature > 0, temperature, 1.0)[:, None]


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, seed: torch.Tensor,
                  index: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [B, V] at each row's temperature (0 = greedy) -> [B] int64."""
    logits = logits.float()
    noisy = _scaled(logits, temperature) + gumbel_noise(seed, index, logits.shape[-1])
    return torch.where(temperature > 0, noisy.argmax(dim=-1), greedy_tokens(logits))


def filtered_sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor, seed: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One token per row of logits [B, V] after temperature, top-k (0 = off) and top-p (1 = off) -> [B] int64.

    Rows with no filtering draw the same token as sample_tokens with the same seed and index."""
    logits = logits.float()
    vocab_size = logits.shape[-1]
    scaled = _scaled(logits, temperature)
    ranked = scaled.sort(dim=-1, descending=True).values
    kth = ranked.gather(-1, (top_k.clamp(1, vocab_size) - 1)[:, None])
    # ties with the k-th value stay, as in filter_logits
    keep = (ranked >= kth) | (top_k <= 0)[:, None]
    probs = ranked.masked_fill(~keep, float("-inf")).softmax(dim=-1)
    # mass ranked strictly above each token; the shifted cumsum is monotone, so the kept tokens are a prefix
    above = torch.nn.functional.pad(probs.cumsum(dim=-1)[:, :-1], (1, 0))
    # top_p = 1 must keep everything even where rounding lets the cumsum reach 1 early
    keep = keep & ((above < top_p[:, None]) | (top_p >= 1)[:, None])
    kept = keep.sum(dim=-1).clamp(min=1)
    # a threshold value rather than a scatter of the mask: tokens tied in value are kept or dropped together
    threshold = ranked.gather(-1, (kept - 1)[:, None])
    masked = scaled.masked_fill(scaled < threshold, float("-inf"))
    noisy = masked + gumbel_noise(seed, index, vocab_size)
    return torch.where(temperature > 0, noisy.argmax(dim=-1), greedy_tokens(logits))
