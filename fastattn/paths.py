"""Faster decode attention on CUDA, registered as decode paths of models.attention: flash-attn's
`flash_attn_with_kvcache` over the static cache when that optional package imports and runs (compute capability
8.0+, fp16/bf16; not with a sliding window's per-entry mask), else CUDA_DECODE: "auto" (SDPA below SPLIT_FROM
attended entries, the split-KV path from there on), or "sdpa" / "split" forced. The split-KV path parallelizes a
long cache over splits of it (SDPA's kernel parallelizes over (batch, kv heads) only)."""

from __future__ import annotations

import torch

from models import attention

try:  # optional: there is no PyPI wheel; install it yourself on a CUDA machine and it is used for decode
    from flash_attn import flash_attn_with_kvcache
except ImportError:
    flash_attn_with_kvcache = None


@torch.library.custom_op("snapkv::flash_decode", mutates_args=())
def flash_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 cache_seqlens: torch.Tensor) -> torch.Tensor:
    """flash-attn's `flash_attn_with_kvcache`, registered as a torch op so that `torch.compile(fullgraph=True)`
    traces through it (a plain call into an extension would break the graph)."""
    return flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=cache_seqlens)


@flash_decode.register_fake
def _(q, k_cache, v_cache, cache_seqlens):
    return torch.empty_like(q)


SPLIT_LENGTH = 256  # entries per split of the split-KV decode path
SPLIT_FROM = 16384  # "auto" takes the split-KV path from this many attended entries on
# the decode path on CUDA without flash-attn: SDPA wins at short spans and split-KV at long ones (measured on an
# H200: benchmarks/results/gpu_h200.md); "auto" picks by the attended span, fixed per captured graph
CUDA_DECODE = "auto"




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


def flash_path(q, k_cache, v_cache, valid, lengths):
    """flash-attn: [batch, seqlen, heads, D]; every (sequence, kv head) row is a batch entry of its own length,
    its group of query heads attending over one kv head (a view: strides, last dim contiguous)."""
    b, hkv, g, d = q.shape
    c = k_cache.shape[2]
    return flash_decode(q.reshape(b * hkv, 1, g, d), k_cache.reshape(b * hkv, c, 1, d),
                        v_cache.reshape(b * hkv, c, 1, d), lengths.reshape(-1).to(torch.int32)).view(b, hkv, g, d)


def auto_path(q, k_cache, v_cache, valid, lengths):
    if k_cache.shape[2] >= SPLIT_FROM:
        return split_decode_attention(q, k_cache, v_cache, valid)
    return attention.sdpa_decode(q, k_cache, v_cache, valid)


def choose(device: torch.device, dtype: torch.dtype, needs_position_mask: bool) -> str | None:
    if flash_attn_with_kvcache is not None and not needs_position_mask and attention.flash_kernels_run(device, dtype):
        return "flash"
    return CUDA_DECODE if device.type in attention.FUSED_DEVICE_TYPES else None


def register() -> None:
    attention.DECODE_PATHS.update(flash=flash_path, auto=auto_path,
                                  split=lambda q, k, v, valid, lengths: split_decode_attention(q, k, v, valid))
    if choose not in attention.DECODE_CHOICES:
        attention.DECODE_CHOICES.append(choose)
