"""Prefill once, decode many: the speed trick that makes policy comparisons and the tuning sweep affordable.

Prefill is the same computation whatever the selection policy (compression only changes what decode sees), so a
prompt is prefilled once with a capture context that keeps every layer's k/v, its last queries (enough for the
widest SnapKV window) and the last-position logits. Each
policy then selects from the captured tensors exactly as `engine.cache_views.PrefillView` would, fills a fresh
`KVCache` and decodes greedily with the engine's own `DecodeStep`, which makes the answers token-identical to
`LLM(..., snapkv=cfg).generate(...)` (tests/test_eval.py checks it). The full-cache decode also records its decode
queries so the attention-mass recall of any policy's kept positions can be measured without another forward pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine.cache_views import PrefillView
from engine.decode_step import DecodeStep
from engine.kv_cache import KVCache
from engine.llm import CAPACITY_MULTIPLE
from models.attention import prefill_attention
from snapkv.config import SnapKVConfig
from snapkv.policies import make_policy


class _CaptureContext:
    """AttentionContext for the one shared prefill: ordinary attention, plus a copy of each layer's k/v and its
    last `tail_queries` queries (all a selection policy reads). It runs the engine's own prefill path: whole-prompt
    attention (`attend`) or, for prompts longer than the LLM's prefill chunk, the chunked one (`store`)."""

    def __init__(self, sliding_window: int | None, tail_queries: int):
        self.sliding_window, self.tail_queries = sliding_window, tail_queries
        self.qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def attend(self, layer, q, k, v):
        self.store(layer, q, k, v)
        return prefill_attention(q, k, v, self.sliding_window)

    def store(self, layer, q, k, v):
        self.qkv.append((q[:, :, -self.tail_queries:], k, v))


class _QueryRecorder:
    """Wraps a DecodeView to keep each decode step's post-RoPE queries (for attention-mass recall)."""

    def __init__(self, view, layers: int):
        self.view = view
        self.queries: list[list[torch.Tensor]] = [[] for _ in range(layers)]

    def attend(self, layer, q, k, v):
        self.queries[layer].append(q[:1, :, 0].clone())  # slot 0 only: [1, H, D]
        return self.view.attend(layer, q, k, v)


@dataclass
class Decoded:
    token_ids: list[int]
    kept: list[torch.Tensor]  # per layer [kv_heads, n] kept prompt positions (all of them for the full cache)
    queries: list[torch.Tensor] | None = field(default=None, repr=False)  # per layer [steps, H, D]; slot 0 only


class PrefilledPrompt:
    """One prompt, prefilled once; `decode(cfg)` answers it under any selection policy."""

    def __init__(self, llm, prompt_ids: list[int], max_window: int = 64):
        """max_window: the largest SnapKV window that will be decoded (the capture keeps that many queries)."""
        self.llm = llm
        self.prompt_ids = list(prompt_ids)
        self.max_window = max_window
        llm._check_prompt(self.prompt_ids)
        ctx = _CaptureContext(llm.config.sliding_window, max_window)
        with torch.inference_mode():
            ids = torch.tensor([self.prompt_ids], device=llm.device)
            # the same chunking as LLM._prefill, so the prefill computation is the engine's own
            self.first_logits = llm.model(ids, ctx=ctx, last_only=True,
                                          chunk_size=llm.prefill_chunk_size)[:, -1]
        self.qkv = ctx.qkv

    def __len__(self) -> int:
        return len(self.prompt_ids)

    @torch.inference_mode()
    def decode(self, cfg: SnapKVConfig | None, max_tokens: int, ignore_eos: bool = False,
               record_queries: bool = False) -> Decoded:
        """Greedy tokens exactly as `LLM(..., snapkv=cfg).generate` would produce them (None = full cache)."""
        return self.decode_many([cfg], max_tokens, ignore_eos, record_queries)[0]

    @torch.inference_mode()
    def decode_many(self, cfgs: list[SnapKVConfig | None], max_tokens: int, ignore_eos: bool = False,
                    record_queries: bool = False, done: Callable[[list[int]], bool] | None = None) -> list[Decoded]:
        """Greedy decoding under several policies at once, one batch slot each: on a CPU one step for 32 slots
        costs far less than 32 single-slot steps (it is overhead-bound), which is what makes the sweep cheap.
        With one config the cache has LLM._run's shape, so the result is token-identical to LLM.generate;
        with several, the shared capacity pads the attention differently, which can only move float rounding.
        `done(tokens)`, if given, ends a slot early (the sweep stops once the answer is complete)."""
        llm, config = self.llm, self.llm.config
        too_wide = [c.window for c in cfgs if c is not None and c.policy == "snapkv" and c.window > self.max_window]
        if too_wide:
            raise ValueError(f"window {too_wide[0]} exceeds the {self.max_window} queries captured at prefill; "
                             f"build PrefilledPrompt(..., max_window={too_wide[0]})")
        policies = [make_policy(cfg) for cfg in cfgs]
        t = len(self.prompt_ids)
        max_new = min(max_tokens, llm.max_model_len - t)
        kept_lens = [p.kept_length(t) for p in policies]
        # LLM._run rounds capacity up the same way; equal capacity keeps even float rounding identical
        capacity = -(-(max(kept_lens) + max_new) // CAPACITY_MULTIPLE) * CAPACITY_MULTIPLE
        cache = KVCache(config.num_layers, len(cfgs), config.num_kv_heads, capacity, config.head_dim, llm.dtype,
                        llm.device, track_positions=config.sliding_window is not None)
        # the engine's own store path, one batch slot per policy (as LLM._prefill fills its slots)
        views = [PrefillView(cache, slot, policy, config.sliding_window, record_kept=True)
                 for slot, policy in enumerate(policies)]
        for layer, (q, k, v) in enumerate(self.qkv):
            for view in views:
                view.store(layer, q, k, v)
        kept = [view.kept for view in views]
        step = DecodeStep(llm.model, cache)
        recorder = None
        if record_queries:
            recorder = _QueryRecorder(step.view, config.num_layers)
            step.view = recorder
        first = int(self.first_logits.argmax(-1)[0])
        tokens = [[first] for _ in cfgs]
        live = [ignore_eos or first not in llm.eos_ids for _ in cfgs]
        for slot, kept_len in enumerate(kept_lens):
            cache.lengths[slot] = kept_len
            step.tokens[slot], step.positions[slot], step.active[slot] = first, t, int(live[slot])
        produced = 1
        while any(live) and produced < max_new:
            logits = step()
            produced += 1
            for slot, token in enumerate(logits.argmax(-1).tolist()):
                if not live[slot]:
                    continue
                tokens[slot].append(token)
                step.tokens[slot] = token
                if (not ignore_eos and token in llm.eos_ids) or (done is not None and done(tokens[slot])):
                    live[slot] = False
                    step.active[slot] = 0
        queries = [torch.stack(qs)[:, 0] if qs else None for qs in recorder.queries] if recorder else None
        return [Decoded(toks, kp, queries if slot == 0 else None)
                for slot, (toks, kp) in enumerate(zip(tokens, kept))]


def attention_recall(prefilled: PrefilledPrompt, full_queries: list[torch.Tensor],
                     kept: list[torch.Tensor], steps: int = 8) -> list[float]:
    """Per layer: the share of the full cache's attention mass on the prompt, from the first `steps` generated
    tokens' queries, that falls on the positions a policy kept (averaged over query heads and steps).
    The softmax is taken over the prompt keys only: generated tokens are kept by every policy, so the ratio of
    kept-prompt mass to all-prompt mass is the part a policy can lose."""
    recalls = []
    for layer, (q_full, keep) in enumerate(zip(full_queries, kept)):
        k = prefilled.qkv[layer][1][0].float()  # [Hkv, T, D]
        q = q_full[:steps].float()  # [S, H, D]
        hkv, _, d = k.shape
        group = q.shape[1] // hkv
        scores = torch.einsum("shd,htd->hst", q, k.repeat_interleave(group, dim=0)) / math.sqrt(d)
        attn = scores.softmax(dim=-1).mean(dim=1)  # [H, T]
        idx = keep.to(attn.device).long().repeat_interleave(group, dim=0)  # kv head -> its query heads
        recalls.append(float(attn.gather(1, idx).sum(dim=-1).mean()))
    return recalls


def token_agreement(reference: list[int], other: list[int], n: int = 64) -> float:
    """Share of the first n reference tokens that the other sequence reproduces at the same index."""
    ref = reference[:n]
    if not ref:
        return 1.0
    return sum(a == b for a, b in zip(ref, other)) / len(ref)
