"""Attention math shared by the model's default path and the engine's cache views: causal prefill attention
(optionally sliding-window) and single-query decode attention over a padded static cache, by flash-attn's
`flash_attn_with_kvcache` when that optional package is importable on CUDA, else by SDPA. GQA is native in both
(prefill: SDPA's `enable_gqa`; decode: each kv head's query group attends as one short query block), so K/V are
never repeated to the query-head count."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

try:  # optional: there is no PyPI wheel; install it yourself on a CUDA machine and it is used for decode
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


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
        # a query chunk after earlier keys: lower-right causal, which SDPA runs without building the mask
        mask = causal_lower_right(t, s)
    else:
        mask = causal_mask(t, s, q.device, sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def decode_backend(device: torch.device, needs_position_mask: bool) -> str:
    """"flash" when flash-attn is importable and the cache is on CUDA, else "sdpa". flash-attn only knows
    per-sequence lengths, so a sliding window over a compressed cache (a per-entry position mask) needs SDPA."""
    if flash_attn_with_kvcache is not None and device.type == "cuda" and not needs_position_mask:
        return "flash"
    return "sdpa"


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor | None,
                     lengths: torch.Tensor | None = None, backend: str = "sdpa") -> torch.Tensor:
    """One query per sequence over a static cache. q [B, H, 1, D], k/v [B, Hkv, C, D], valid bool [B, Hkv, C]
    (True = attend); for "flash", lengths [B, Hkv] = valid entries of each row (a prefix of it).
    The H query heads are viewed as [Hkv, group]: a kv head's group is the query length of one attention over
    that kv head's own row, so K/V are never repeated and each row keeps its own mask."""
    b, h, _, d = q.shape
    hkv = k_cache.shape[1]
    grouped = q.view(b, hkv, h // hkv, d)
    if backend == "flash":
        # flash-attn: [batch, seqlen, heads, D]; every (sequence, kv head) row is a batch entry of its own length,
        # its group of query heads attending over one kv head (a view: strides, last dim contiguous)
        c = k_cache.shape[2]
        out = flash_attn_with_kvcache(grouped.reshape(b * hkv, 1, h // hkv, d),
                                      k_cache.reshape(b * hkv, c, 1, d), v_cache.reshape(b * hkv, c, 1, d),
                                      cache_seqlens=lengths.reshape(-1).to(torch.int32))
        return out.view(b, h, 1, d)
    out = F.scaled_dot_product_attention(grouped, k_cache, v_cache, attn_mask=valid[:, :, None, :])
    return out.reshape(b, h, 1, d)
