"""Attention math shared by the model's default path and the engine's cache views: causal prefill attention
(optionally sliding-window) and single-query decode attention over a padded static cache, by flash-attn's
`flash_attn_with_kvcache` when that optional package is importable and can run (CUDA, compute capability 8.0+,
fp16/bf16), else by SDPA (or, on CUDA, optionally by a split-KV path in plain torch ops). GQA is native in both
(prefill: SDPA's `enable_gqa`; decode: each kv head's query group attends as one short query block), so K/V are not
repeated to the query-head count — except on CUDA where a fused kernel could not take GQA (see
`prefill_repeats_kv`): SDPA would then fall back to its math kernel, which builds the whole fp32 score matrix, and
repeating one layer's K/V costs far less.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

try:  # optional: there is no PyPI wheel; install it yourself on a CUDA machine and it is used for decode
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None

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


@torch.library.custom_op("snapkv::flash_decode", mutates_args=())
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cache_seqlens: torch.Tensor) -> torch.Tensor:
    """flash-attn's `flash_attn_with_kvcache`, registered as a torch op so that `torch.compile(fullgraph=True)`
    traces through it (a plain call into an extension would break the graph)."""
    return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens)


@flash_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens):
    return torch.empty_like(q)


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


SPLIT_LENGTH = 256  # entries per split of the split-KV decode path
SPLIT_FROM = 16384  # "auto" takes the split-KV path from this many attended entries on
# The decode path on CUDA without flash-attn. SDPA's kernel parallelizes over (batch, kv heads) only, 8 blocks for
# one Llama-3-8B sequence, and reads a long cache at ~0.2 TB/s; `split_decode_attention` parallelizes over splits of
# the cache too (1.5 TB/s at 128K entries) but launches more kernels. Measured on an H200 (graphed 8B step, bf16,
# benchmarks/results/gpu_h200_decode_paths.md): SDPA wins up to 8K entries (8.07 vs 10.63 ms at 1K), split-KV from
# 16K on (15.9 vs 18.0 ms; 53 vs 92 ms at 128K). "auto" picks by the attended span, which is fixed per captured
# graph; "sdpa" or "split" force one path.
CUDA_DECODE = "auto"


def decode_backend(device: torch.device, dtype: torch.dtype, needs_position_mask: bool) -> str:
    """"flash" when flash-attn is importable and runs for this cache (`flash_kernels_run`); else CUDA_DECODE on
    CUDA and "sdpa" elsewhere. flash-attn only knows per-sequence lengths, so a sliding window over a compressed
    cache (a per-entry position mask) never goes to flash."""
    if flash_attn_with_kvcache is not None and not needs_position_mask and flash_kernels_run(device, dtype):
        return "flash"
    return CUDA_DECODE if device.type in FUSED_DEVICE_TYPES else "sdpa"


def split_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Flash-decoding in plain torch ops: q [B, Hkv, G, D] (G query heads per kv head), k/v [B, Hkv, C, D], valid
    [B, Hkv, C] -> [B, Hkv, G, D]. The C entries are cut into splits of SPLIT_LENGTH (plus one for the remainder);
    each split's scores, max, exp-sum and weighted values come from batched matmuls that run over every (row,
    split) at once, and the splits are merged by their log-sum-exp. Scores and softmax are float32 (the q.k
    products are rounded to the cache dtype first, as HF's eager attention does). The splits are free views only
    when the span is a multiple of SPLIT_LENGTH; otherwise matmul copies K and V once per step."""
    c = k.shape[2]
    main = c - c % SPLIT_LENGTH
    parts = []
    if main:
        parts.append(_split_partials(q, k[:, :, :main], v[:, :, :main], valid[..., :main], main // SPLIT_LENGTH))
    if main < c:
        parts.append(_split_partials(q, k[:, :, main:], v[:, :, main:], valid[..., main:], 1))
    m, total, out = (torch.cat(x, dim=2) for x in zip(*parts))  # [B, Hkv, S, G, 1|D]
    top = m.amax(2, keepdim=True)
    weight = torch.exp(m - top)  # a split with nothing visible has m = -inf-like and weight 0
    out = (weight * out).sum(2) / (weight * total).sum(2)
    return out.to(q.dtype)


def _split_partials(q, k, v, valid, splits: int):
    b, hkv, c, d = k.shape
    n = c // splits
    scores = torch.matmul(q[:, :, None], k.reshape(b, hkv, splits, n, d).transpose(-1, -2)).float()  # [B,Hkv,S,G,n]
    scores = (scores * d ** -0.5).masked_fill(~valid.reshape(b, hkv, splits, 1, n), -1e30)
    m = scores.amax(-1, keepdim=True)
    p = torch.exp(scores - m)
    p = p * valid.reshape(b, hkv, splits, 1, n)  # a split with nothing visible: exp(0) = 1 everywhere, zeroed here
    out = torch.matmul(p.to(v.dtype), v.reshape(b, hkv, splits, n, d)).float()
    return m, p.sum(-1, keepdim=True), out


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
        out = flash_decode(grouped.reshape(b * hkv, 1, h // hkv, d), k_cache.reshape(b * hkv, c, 1, d),
                           v_cache.reshape(b * hkv, c, 1, d), lengths.reshape(-1).to(torch.int32))
        return out.view(b, h, 1, d)
    if backend == "split" or (backend == "auto" and k_cache.shape[2] >= SPLIT_FROM):
        return split_decode_attention(grouped, k_cache, v_cache, valid).reshape(b, h, 1, d)
    out = F.scaled_dot_product_attention(grouped, k_cache, v_cache, attn_mask=valid[:, :, None, :])
    return out.reshape(b, h, 1, d)
