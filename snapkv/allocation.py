"""Budget allocation: how many entries each (layer, kv head) keeps when they need not all keep the same number.

AdaKV (Feng et al., "Ada-KV"): a layer keeps `heads x per_head` prefix entries in all, chosen as the best scores
across all of its kv heads at once, so a head whose attention is concentrated gives its share to one whose
attention is spread out. A safeguard: every head first keeps its own top `floor` positions; a cap keeps any one
head at most `cap` (the static cache reserves room for the largest head of a slot).
PyramidKV (Cai et al.): budgets shrink linearly with depth (lower layers attend broadly, upper ones narrowly),
the same total over all layers as a uniform budget.
A per-head selection is a bool mask over positions; `mask_positions` turns it into the `-1`-padded index rows the
cache stores (each kv head's entries are a prefix of its own buffer row).
"""

from __future__ import annotations

import torch

ADAKV_FLOOR = 0.2  # the share of its per-head budget each head keeps whatever the others score (AdaKV's alpha)
ADAKV_CAP = 2.0  # no head keeps more than this many times the per-head budget
PYRAMID_BETA = 20  # the top layer keeps per_head / beta, the bottom one 2 * per_head - that (PyramidKV's beta)


def ranks(scores: torch.Tensor) -> torch.Tensor:
    """[..., N] -> each position's rank in its row, best first; ties go to the earlier position."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.empty_like(order).scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device)
                                            .expand_as(order))


def adakv_mask(scores: torch.Tensor, per_head: int, floor: float = ADAKV_FLOOR, cap: float = ADAKV_CAP) -> torch.Tensor:
    """scores [B, Hkv, N] -> bool [B, Hkv, N]: `Hkv * per_head` positions per layer, each head at least
    `int(floor * per_head)` and at most `int(cap * per_head)` of them (per_head <= N)."""
    b, hkv, n = scores.shape
    rank = ranks(scores)
    forced = rank < int(floor * per_head)
    eligible = rank < min(n, max(per_head, int(cap * per_head)))
    ranked = scores.float().masked_fill(~eligible, float("-inf")).masked_fill(forced, float("inf"))
    flat = ranked.reshape(b, hkv * n)
    picks = torch.sort(flat, dim=-1, descending=True, stable=True).indices[:, : hkv * per_head]
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, picks, True).view(b, hkv, n)


def pyramid_budgets(per_head: int, num_layers: int, beta: int = PYRAMID_BETA) -> list[int]:
    """Per-layer prefix budgets, largest at layer 0, shrinking linearly, summing to num_layers * per_head."""
    if num_layers == 1:
        return [per_head]
    low = per_head // beta
    high = 2 * per_head - low
    budgets = [round(high - (high - low) * i / (num_layers - 1)) for i in range(num_layers)]
    budgets[0] += num_layers * per_head - sum(budgets)  # rounding goes to the widest layer
    return budgets


def mask_positions(mask: torch.Tensor) -> torch.Tensor:
    """bool [B, Hkv, N] -> the chosen positions [B, Hkv, P] in order, P the most any row chose, rows with fewer
    padded with -1 at the end."""
    n = mask.shape[-1]
    positions = torch.arange(n, device=mask.device).expand_as(mask)
    ordered = torch.where(mask, positions, n).sort(dim=-1).values[..., : int(mask.sum(-1).max())]
    return ordered.masked_fill(ordered == n, -1)
