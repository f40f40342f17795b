"""The Llama/Mistral network: RMSNorm, RoPE (default, linear, llama3), GQA attention, SwiGLU MLP, sliding window.

Module names mirror HF transformers (model.layers.N.self_attn.q_proj, ...), so an HF state dict loads as is. Two
entry points: `prefill` runs a prompt layer-major and hands each layer's post-RoPE K/V to the cache view's `store`;
`decode` runs one token per sequence and lets the view's `attend` store its K/V and attend over the cache. The
model stores nothing and knows no selection policy: the `AttentionContext`, a cache view the engine supplies,
decides what is kept. With no context, `prefill` is plain causal attention (what parity tests compare with HF).
"""

from __future__ import annotations

import itertools
import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import prefill_attention
from models.config import ModelConfig


class AttentionContext(Protocol):
    """A cache view, supplied by the engine. Prefill: the model computes attention itself and hands each layer's
    full-length k/v [B, Hkv, T, D] (post-RoPE) and its last `tail_queries` queries to `store` (the view selects
    and keeps what it wants). A continued prefill (a conversation's next turn) first asks `past` for the entries
    the cache already holds, k/v [B, Hkv, P, D] in position order (or None): the new tokens attend to them, and
    `store` then gets past and new together, P + T candidates. Decode: `attend` takes one new token's q
    [B, H, 1, D] and k/v [B, Hkv, 1, D], stores k/v and returns attention [B, H, 1, D] over everything the cache
    holds."""

    tail_queries: int

    def past(self, layer: int) -> tuple[torch.Tensor, torch.Tensor] | None: ...

    def store(self, layer: int, q_tail: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fp32 statistics whatever the weight dtype, as HF does.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_inverse_frequencies(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
    old_len = scaling["original_max_position_embeddings"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(cfg), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, head_dim] (broadcast over heads)."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.sliding_window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def project_q(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return apply_rope(self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2), cos, sin)

    def project_kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def output(self, attention: torch.Tensor) -> torch.Tensor:
        b, _, t, _ = attention.shape
        return self.o_proj(attention.transpose(1, 2).reshape(b, t, -1))

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """One new token per sequence; the cache view stores its k/v and attends over the cache."""
        q = self.project_q(x, cos, sin)
        k, v = self.project_kv(x, cos, sin)
        return self.output(ctx.attend(self.layer, q, k, v))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """One decode step: x [B, 1, hidden]."""
        x = x + self.self_attn.decode(self.input_layernorm(x), cos, sin, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))

    def prefill(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttentionContext | None,
                chunk: int) -> torch.Tensor:
        """The layer over a whole prompt, `chunk` positions at a time, updating x in place: first this layer's
        full K/V, chunk by chunk (handed to the cache view to select and store), then each query chunk attends
        causally to the keys up to it and runs the MLP. With chunk >= T it is ordinary full attention; with a
        smaller chunk there are no [T, T] scores and no [T, intermediate] activations. A continued prefill puts the
        `past` entries the cache holds in front of the new K/V (they all precede the new positions, so the
        lower-right causal mask stays right; the engine continues only models without a sliding window)."""
        attn, t = self.self_attn, x.shape[1]
        chunks = [(s, min(s + chunk, t)) for s in range(0, t, chunk)]
        past = ctx.past(attn.layer) if ctx is not None else None
        p = 0 if past is None else past[0].shape[2]  # entries held from earlier turns: every new query sees them
        k = x.new_empty(x.shape[0], attn.num_kv_heads, p + t, attn.head_dim)
        v = torch.empty_like(k)
        if p:
            k[:, :, :p], v[:, :, :p] = past
        for s, e in chunks:
            k[:, :, p + s:p + e], v[:, :, p + s:p + e] = attn.project_kv(self.input_layernorm(x[:, s:e]),
                                                                         cos[:, :, s:e], sin[:, :, s:e])
        if ctx is not None:
            tail = max(1, min(t, ctx.tail_queries))
            ctx.store(attn.layer, attn.project_q(self.input_layernorm(x[:, t - tail:]), cos[:, :, t - tail:],
                                                 sin[:, :, t - tail:]), k, v)
        window = attn.sliding_window
        for s, e in chunks:
            q = attn.project_q(self.input_layernorm(x[:, s:e]), cos[:, :, s:e], sin[:, :, s:e])
            first = 0 if window is None else max(0, s - window)  # keys a sliding window hides are skipped
            h = x[:, s:e] + attn.output(prefill_attention(q, k[:, :, first:p + e], v[:, :, first:p + e], window))
            x[:, s:e] = h + self.mlp(self.post_attention_layernorm(h))
        return x


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Llama and Mistral (Mistral = Llama + sliding-window attention)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.rotary = RotaryEmbedding(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.prefill(input_ids, **kwargs)

    def prefill(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                ctx: AttentionContext | None = None, last_only: bool = False,
                chunk_size: int | None = None) -> torch.Tensor:
        """input_ids [B, T] (positions default to 0..T-1) -> logits [B, T, V] (or [B, 1, V] with last_only).
        Layer-major: the whole prompt goes through one layer before the next, in query chunks of `chunk_size`
        (default: the whole prompt), so memory is bounded by one layer's K/V plus the [T, hidden] residual
        stream; each layer hands its K/V to `ctx.store`."""
        t = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(t, device=input_ids.device).expand_as(input_ids)
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype)
        for layer in self.model.layers:
            x = layer.prefill(x, cos, sin, ctx, chunk_size or t)
        if last_only:
            x = x[:, -1:]  # a long prompt's full [T, vocab] logits would cost more memory than its KV cache
        return self.logits(x)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.model.norm(x))

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """One token per sequence: tokens, positions [B] -> logits [B, V]; K/V go to and come from `ctx`."""
        x = self.model.embed_tokens(tokens[:, None])
        cos, sin = self.rotary(positions[:, None], x.dtype)
        for layer in self.model.layers:
            x = layer.decode(x, cos, sin, ctx)
        return self.logits(x)[:, 0]


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds (quantized ones with their scales), each shared tensor once."""
    seen, total = set(), 0
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.data_ptr() not in seen and not name.startswith("rotary."):
            seen.add(t.data_ptr())
            total += t.nbytes
    return total
