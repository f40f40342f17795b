"""Fidelity metrics: how close a compressed cache's next-token distributions and answers stay to the full cache's.
They move smoothly where exact match on a 135M model flips, so they are what defaults are tuned on.

- matched tokens: of the first 32 greedy tokens, how many equal the full cache's at the same index
  (compare.matched_tokens; both answers end at their end-of-sequence token);
- teacher-forced: the full cache's first 64 greedy tokens are fed after the prompt, once over the full cache and
  once over a policy's kept entries; per position, KL(full || compressed) of the next-token distribution and
  whether the two argmaxes agree (top-1 agreement), averaged over the 64 positions;
- Wilson 95% intervals for exact-match rates.

The teacher-forced pass is one 64-token forward that attends, per layer and kv head, to the kept prompt entries
(taken from the shared prefill, `PrefilledPrompt.qkv`) and causally to the fed tokens, built from the model's own
modules: what 64 decode steps from that cache compute, in one batched pass.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from quant.kv_int8 import dequantize_entries, quantize_entries
from models.attention import causal_mask

FORCED_TOKENS = 64
MATCHED_TOKENS = 32


def kept_for(llm, prefilled, cfg) -> list[torch.Tensor] | None:
    """Per layer, the [kv_heads, n] prompt positions `cfg`'s policy keeps (-1 padded), or None for all of them:
    the policy's own select on the shared prefill's q/k, as the engine's PrefillView calls it."""
    if cfg is None or cfg.policy == "full":
        return None
    policy, kept = llm.make_policy(cfg), []
    for layer, (q, k, _) in enumerate(prefilled.qkv):
        keep = policy.select(q, k, layer)
        kept.append(torch.arange(k.shape[2]).expand(k.shape[1], -1) if keep is None else keep[0])
    return kept


@torch.inference_mode()
def forced_logits(model, prefilled, kept: list[torch.Tensor] | None, tokens: list[int],
                  kv_int8: bool = False) -> torch.Tensor:
    """Logits [n, vocab] after each of `tokens`, fed right after the prompt (positions T..T+n-1), attending per
    layer and kv head to the kept prompt entries only (None: every prompt entry) and causally to the fed tokens.
    kv_int8: every K/V entry attended to goes through the int8 cache's quantization first, as the engine's
    int8 KV cache stores it (engine.kv_cache)."""
    cfg = model.config
    t, n = len(prefilled), len(tokens)
    ids = torch.tensor([tokens])
    x = model.model.embed_tokens(ids)
    positions = torch.arange(t, t + n)
    cos, sin = model.rotary(positions[None], x.dtype)
    own = causal_mask(n, n, x.device)  # [n, n] fed tokens among themselves
    for layer, block in enumerate(model.model.layers):
        attn = block.self_attn
        h = block.input_layernorm(x)
        q = attn.project_q(h, cos, sin)
        k_new, v_new = attn.project_kv(h, cos, sin)
        _, k_prompt, v_prompt = prefilled.qkv[layer]
        if kept is None:
            entry_pos = torch.arange(t).expand(cfg.num_kv_heads, t)
            k_kept, v_kept = k_prompt, v_prompt
        else:
            entry_pos = kept[layer].long()
            gather = entry_pos.clamp(min=0)[None, ..., None].expand(1, -1, -1, k_prompt.shape[-1])
            k_kept, v_kept = k_prompt.gather(2, gather), v_prompt.gather(2, gather)
        if kv_int8:
            k_kept, v_kept, k_new, v_new = (dequantize_entries(*quantize_entries(t), t.dtype)
                                            for t in (k_kept, v_kept, k_new, v_new))
        seen = (entry_pos >= 0)[:, None, :].expand(-1, n, -1)  # [Hkv, n, P]
        if cfg.sliding_window is not None:
            seen = seen & (entry_pos[:, None, :] > positions[None, :, None] - cfg.sliding_window)
            own_kv = own & causal_mask(n, n, x.device, cfg.sliding_window)
        else:
            own_kv = own
        mask = torch.cat([seen, own_kv.expand(cfg.num_kv_heads, -1, -1)], dim=-1)
        group = cfg.num_heads // cfg.num_kv_heads
        out = F.scaled_dot_product_attention(q, torch.cat([k_kept, k_new], 2), torch.cat([v_kept, v_new], 2),
                                             attn_mask=mask.repeat_interleave(group, 0)[None], enable_gqa=True)
        x = x + attn.output(out)
        x = x + block.mlp(block.post_attention_layernorm(x))
    return model.lm_head(model.model.norm(x))[0].float()


def kl_and_top1(reference_logits: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean over positions of KL(reference || other) in nats, and the share of positions whose argmax agrees."""
    ref, other = F.log_softmax(reference_logits.float(), -1), F.log_softmax(logits.float(), -1)
    kl = (ref.exp() * (ref - other)).sum(-1)
    top1 = (reference_logits.argmax(-1) == logits.argmax(-1)).float()
    return float(kl.mean()), float(top1.mean())


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95% by default) of a rate from n trials; fractional successes (partial credit)
    are taken as they are."""
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)
