"""Prefill once, decode many: the speed trick that makes policy comparisons and the tuning sweep affordable.

Prefill is the same computation whatever the selection policy (compression only changes what decode sees), so a
prompt is prefilled once with a capture context that keeps every layer's k/v, its last queries (enough for the
widest SnapKV window) and the last-position logits. Each policy then runs as an ordinary request of the engine's
own loop (`LLM.add_request(..., snapkv=cfg)` + `LLM.step()`), with one difference: while `decode_many` runs, the
runner's prompt forward is a replay of the capture — each layer's captured tensors handed to the request's
`PrefillView.store`, exactly what the real forward hands it — instead of a new forward pass. Selection, storage,
the decode step, sampling and stopping are the engine's, so the answers are token-identical to
`LLM(..., snapkv=cfg).generate(...)` (tests/test_eval.py checks it). The full cache's decode can also record its
decode queries, so the attention-mass recall of any policy's kept positions needs no other forward pass.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch

from engine import SamplingParams
from engine.admission import check_prompt
from snapkv.config import SnapKVConfig


class _CaptureContext:
    """AttentionContext for the one shared prefill: keeps each layer's k/v and its last `tail_queries` queries
    (all a selection policy reads). It runs the engine's own prefill path (same chunking)."""

    def __init__(self, tail_queries: int):
        self.tail_queries = tail_queries
        self.qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def past(self, layer):
        return None

    def store(self, layer, q, k, v):
        self.qkv.append((q, k, v))


class _ReplayedPrompt:
    """Stands in for the model in `ModelRunner.prefill`: hands the captured tensors to the request's view."""

    def __init__(self, prefilled: "PrefilledPrompt"):
        self.prefilled = prefilled

    def __call__(self, input_ids, ctx, last_only, chunk_size, positions=None):
        if input_ids[0].tolist() != self.prefilled.prompt_ids:
            raise RuntimeError("decode_many only replays its own prompt; run other requests outside it")
        for layer, (q, k, v) in enumerate(self.prefilled.qkv):
            ctx.store(layer, q, k, v)
        return self.prefilled.first_logits[:, None]


class _QueryRecorder:
    """Wraps a decode step's view to keep one request's post-RoPE decode queries (for attention-mass recall)."""

    def __init__(self, view, seq, queries: list[list[torch.Tensor]]):
        self.view, self.seq, self.queries = view, seq, queries

    @property
    def span(self) -> int:  # the decode step sets the span it attends over on its view: the wrapped view's
        return self.view.span

    @span.setter
    def span(self, value: int) -> None:
        self.view.span = value

    def attend(self, layer, q, k, v):
        if self.seq.slot is not None:
            self.queries[layer].append(q[self.seq.slot, :, 0].clone())  # [H, D]
        return self.view.attend(layer, q, k, v)


@dataclass
class Decoded:
    token_ids: list[int]
    kept: list[torch.Tensor]  # per layer [kv_heads, n] kept prompt positions (all of them for the full cache)
    queries: list[torch.Tensor] | None = field(default=None, repr=False)  # per layer [steps, H, D]


class PrefilledPrompt:
    """One prompt, prefilled once; `decode(cfg)` answers it under any selection policy."""

    def __init__(self, llm, prompt_ids: list[int], max_window: int = 64):
        """max_window: the largest SnapKV window that will be decoded (the capture keeps that many queries)."""
        self.llm = llm
        self.prompt_ids = check_prompt(llm, prompt_ids)
        self.max_window = max_window
        ctx = _CaptureContext(max_window)
        with torch.inference_mode():
            ids = torch.tensor([self.prompt_ids], device=llm.device)
            # the same chunking as the engine's prefill, so the computation is the engine's own
            self.first_logits = llm.model(ids, ctx=ctx, last_only=True,
                                          chunk_size=llm.prefill_chunk_size)[:, -1].float()
        self.qkv = ctx.qkv

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def decode(self, cfg: SnapKVConfig | None, max_tokens: int, ignore_eos: bool = False,
               record_queries: bool = False) -> Decoded:
        """Greedy tokens exactly as `LLM(..., snapkv=cfg).generate` would produce them (None = full cache)."""
        return self.decode_many([cfg], max_tokens, ignore_eos, record_queries)[0]

    def decode_many(self, cfgs: list[SnapKVConfig | None], max_tokens: int, ignore_eos: bool = False,
                    record_queries: bool = False, done: Callable[[list[int]], bool] | None = None) -> list[Decoded]:
        """Greedy decoding under several policies at once, one request (one batch slot) each, through the
        engine's continuous-batching loop: on a CPU one step for many slots costs far less than as many
        single-slot steps. `record_queries` keeps the first config's decode queries. `done(tokens)`, if given,
        ends a request early (the sweep stops once the answer is complete)."""
        llm = self.llm
        too_wide = [c.window for c in cfgs if c is not None and c.policy == "snapkv" and c.window > self.max_window]
        if too_wide:
            raise ValueError(f"window {too_wide[0]} exceeds the {self.max_window} queries captured at prefill; "
                             f"build PrefilledPrompt(..., max_window={too_wide[0]})")
        if llm.has_unfinished():
            raise RuntimeError("decode_many needs the engine to itself; finish or abort the other requests first")
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=ignore_eos)
        queries: list[list[torch.Tensor]] = [[] for _ in range(llm.config.num_layers)]
        with self._replaying():
            rids = [llm.add_request(prompt_token_ids=self.prompt_ids, sampling_params=params, snapkv=cfg,
                                    return_kept=True) for cfg in cfgs]
            with self._recording(llm.scheduler.find(rids[0]), queries, record_queries):
                finals = {}
                while llm.has_unfinished():
                    for out in llm.step():
                        if out.finished:
                            finals[out.request_id] = out
                        elif done is not None and done(out.token_ids):
                            seq = llm.scheduler.find(out.request_id)
                            llm.abort(out.request_id)
                            finals[out.request_id] = out
                            out.kept = seq.kept
        recorded = [torch.stack(qs) if qs else None for qs in queries] if record_queries else None
        return [Decoded(finals[rid].token_ids, finals[rid].kept, recorded if i == 0 else None)
                for i, rid in enumerate(rids)]

    @contextmanager
    def _replaying(self):
        runner = self.llm.runner
        model, runner.model = runner.model, _ReplayedPrompt(self)  # decode steps keep their own model reference
        try:
            yield
        finally:
            runner.model = model

    @contextmanager
    def _recording(self, seq, queries, enabled: bool):
        steps = self.llm.runner.steps.values() if enabled else ()
        views = {step: step.view for step in steps}
        for step, view in views.items():
            step.view = _QueryRecorder(view, seq, queries)
        try:
            yield
        finally:
            for step, view in views.items():
                step.view = view


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
        mass = attn.gather(1, idx.clamp(min=0)).masked_fill(idx < 0, 0.0)  # -1: padding of a shorter row
        recalls.append(float(mass.sum(dim=-1).mean()))
    return recalls


def token_agreement(reference: list[int], other: list[int], n: int = 64) -> float:
    """Share of the first n reference tokens that the other sequence reproduces at the same index."""
    ref = reference[:n]
    if not ref:
        return 1.0
    return sum(a == b for a, b in zip(ref, other)) / len(ref)
