"""Attention math shared by the model's default path and the engine's cache views: causal prefill attention
(optionally sliding-window) and single-query decode attention over a padded static cache. GQA is handled by
SDPA's `enable_gqa`, so K/V are never repeated to the query-head count."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_mask(q_len: int, k_len: int, device, sliding_window: int | None = None) -> torch.Tensor:
    """Bool mask [q_len, k_len], True = attend; queries are the last q_len of the k_len positions."""
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        # HF semantics: a query at p sees keys at positions > p - sliding_window.
        mask &= k_pos > q_pos - sliding_window
    return mask


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      sliding_window: int | None = None) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, Hkv, S, D] with the queries at the last T of S positions -> [B, H, T, D]."""
    t, s = q.shape[2], k.shape[2]
    if sliding_window is None or sliding_window >= s:
        if t == s:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        mask = causal_mask(t, s, q.device)
    else:
        mask = causal_mask(t, s, q.device, sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     valid: torch.Tensor) -> torch.Tensor:
    """One query per sequence over a static cache. q [B, H, 1, D], k/v [B, Hkv, C, D], valid bool [B, Hkv|1, C]."""
    mask = valid.unsqueeze(2)  # [B, Hkv|1, 1, C]
    group = q.shape[1] // k_cache.shape[1]
    if mask.shape[1] != 1 and group != 1:
        mask = mask.repeat_interleave(group, dim=1)  # per-kv-head validity -> per query head (mask only)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask, enable_gqa=True)
