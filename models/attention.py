"""Attention math shared by the model and the engine's cache views, on SDPA: causal prefill attention (optionally
sliding-window) and single-query decode attention over a padded static cache. GQA is native in both (prefill:
SDPA's `enable_gqa`; decode: each kv head's query group attends as one short query block), so K/V are not
repeated, except on CUDA where a fused kernel could not take GQA (`prefill_repeats_kv`). Faster decode paths
(flash-attn, split-KV: the fastattn wing) register in DECODE_PATHS and are chosen through DECODE_CHOICES.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

FUSED_DEVICE_TYPES = ("cuda",)  # devices whose SDPA has flash / memory-efficient kernels (and no CPU fallback)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def device_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def flash_kernels_run(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether flash-attention kernels (flash-attn's, and SDPA's flash backend) run here: CUDA, compute
    capability 8.0 (Ampere) or later, fp16/bf16 (flash-attn refuses float32)."""
    return device.type in FUSED_DEVICE_TYPES and dtype in HALF_DTYPES and device_capability(device) >= (8, 0)


def prefill_repeats_kv(device: torch.device, dtype: torch.dtype, sliding_window: int | None) -> bool:
    """On CUDA, whether prefill attention repeats K/V to the query heads. SDPA runs GQA (`enable_gqa`) only in its
    flash kernel, and that takes no mask tensor; a sliding-window mask, float32 or a pre-Ampere GPU with GQA would
    fall back to the math kernel (fp32 scores, chunk x keys x heads). Repeated K/V let the memory-efficient kernel
    run instead. The memory model counts the repeated K/V and the mask."""
    return device.type in FUSED_DEVICE_TYPES and (sliding_window is not None or not flash_kernels_run(device, dtype))


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
    gqa = q.shape[1] != k.shape[1]
    if gqa and prefill_repeats_kv(q.device, q.dtype, sliding_window):
        group = q.shape[1] // k.shape[1]
        k, v, gqa = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False
    if sliding_window is None or sliding_window >= s:
        if t == s:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        # a query chunk after earlier keys: lower-right causal, which SDPA runs without building the mask
        mask = causal_lower_right(t, s)
    else:
        mask = causal_mask(t, s, q.device, sliding_window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


# name -> attend(q [B, Hkv, G, D], k, v [B, Hkv, C, D], valid [B, Hkv, C] or None, lengths [B, Hkv] or None)
DECODE_PATHS: dict[str, Callable] = {}
DECODE_CHOICES: list[Callable] = []  # (device, dtype, needs_position_mask) -> a DECODE_PATHS name or None


def decode_backend(device: torch.device, dtype: torch.dtype, needs_position_mask: bool) -> str:
    """The decode path for a cache: the first registered choice that takes it, else "sdpa"."""
    return next((name for choose in DECODE_CHOICES if (name := choose(device, dtype, needs_position_mask))), "sdpa")


def sdpa_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """q [B, Hkv, G, D]: each kv head's group of query heads attends as one short query block over its own row."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, :, None, :])


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, valid: torch.Tensor | None,
                     lengths: torch.Tensor | None = None, backend: str = "sdpa") -> torch.Tensor:
    """One query per sequence over a static cache: q [B, H, 1, D], k/v [B, Hkv, C, D], valid bool [B, Hkv, C]
    (True = attend); a registered path may take lengths [B, Hkv] (each row's valid prefix) instead."""
    b, h, _, d = q.shape
    grouped = q.view(b, k_cache.shape[1], h // k_cache.shape[1], d)
    if backend == "sdpa":
        return sdpa_decode(grouped, k_cache, v_cache, valid).reshape(b, h, 1, d)
    return DECODE_PATHS[backend](grouped, k_cache, v_cache, valid, lengths).reshape(b, h, 1, d)
