"""SnapKV scoring and selection: pure tensor functions, batch-aware, no model code.

score: the last `window` queries (post-RoPE) attend, in fp32 and causally inside the window, over all prompt keys;
their attention is summed over the window queries into one vote per prefix position and query head, smoothed by
1-D pooling (stride 1, same length), and the query heads of one kv group are aggregated, so selection happens
per kv head (GQA-native: a Llama-3-style model stores Hkv heads, never repeated ones).
selection (snapkv.policies.SnapKV): the top `budget - window` prefix positions per kv head, then the window.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from snapkv.config import SnapKVConfig


def window_votes(q: torch.Tensor, k: torch.Tensor, window: int) -> torch.Tensor:
    """q [B, H, >=window, D] (the prompt's last queries; a chunked prefill passes only those), k [B, Hkv, T, D]
    -> votes [B, H, T - window] (fp32): the window's attention mass on each prefix key. One kv head's group at a
    time, so the fp32 scores take [group, window, T], not [heads, window, T] (gigabytes at 512K tokens)."""
    b, h, _, d = q.shape
    hkv, t = k.shape[1], k.shape[2]
    q_win = q[:, :, -window:].float().view(b, hkv, h // hkv, window, d)
    # the i-th window query sits at position t - window + i and must not see later window keys
    future = torch.ones(window, window, dtype=torch.bool, device=q.device).triu(1)
    votes = torch.empty(b, hkv, h // hkv, t - window, dtype=torch.float32, device=q.device)
    for g in range(hkv):
        scores = torch.einsum("bqwd,btd->bqwt", q_win[:, g], k[:, g].float()) / math.sqrt(d)
        scores[..., t - window:].masked_fill_(future, float("-inf"))
        votes[:, g] = scores.softmax(dim=-1)[..., : t - window].sum(dim=-2)
    return votes.view(b, h, t - window)


def pool_votes(votes: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """Smooth [B, H, N] votes along positions so the neighbours of a strong vote survive together."""
    if kernel == 1:
        return votes
    pool = F.max_pool1d if pooling == "max" else F.avg_pool1d
    return pool(votes, kernel_size=kernel, stride=1, padding=kernel // 2)


def group_scores(votes: torch.Tensor, num_kv_heads: int, group_agg: str) -> torch.Tensor:
    """[B, H, N] per query head -> [B, Hkv, N] per kv head (mean or max over each group's query heads)."""
    b, h, n = votes.shape
    grouped = votes.view(b, num_kv_heads, h // num_kv_heads, n)
    return grouped.mean(dim=2) if group_agg == "mean" else grouped.amax(dim=2)


def snapkv_scores(q: torch.Tensor, k: torch.Tensor, cfg: SnapKVConfig) -> torch.Tensor:
    """[B, Hkv, T - window] selection scores for the prefix positions."""
    votes = pool_votes(window_votes(q, k, cfg.window), cfg.kernel, cfg.pooling)
    return group_scores(votes, k.shape[1], cfg.group_agg)


def top_positions(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` best positions per row of [B, Hkv, N], sorted by position. Ties go to the earlier position
    (a stable sort), so the choice is deterministic even on max-pooling plateaus."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return order[..., :count].sort(dim=-1).values
