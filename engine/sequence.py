"""Sequence: one request's state from arrival to finish (its prompt, sampling settings and selection policy, the
slot it holds, the tokens and text so far, why it stopped) and the one owner of its statistics; RequestOutput is
what callers see of it after each engine step."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Callable

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling_params import SamplingParams
from snapkv.policies import SelectionPolicy

# progress(stage, done, total): "prefill" counts layers of the prompt, "decode" counts generated tokens
ProgressFn = Callable[[str, int, int], None]


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    new_text: str = ""  # the text this step added (what a stream shows next)
    new_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", or "error" (see `error`)
    error: str | None = None  # why the request was refused or failed; nothing was generated then
    stats: dict = field(default_factory=dict)
    kept: list[torch.Tensor] | None = None  # with return_kept: per layer, [kv_heads, n] kept prompt positions

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Placement:
    """Where a request's prefill goes, beyond the defaults (any free slot, positions from 0, a plain prefill): a
    slot reserved for it (`LLM.reserve_slot`), the position of its first token, and a continued prefill (a
    factory of the view that supplies the `held` entries the slot holds already, e.g. sessions.ContinuedPrefill)."""
    slot: int | None = None
    start: int = 0
    held: int = 0
    view: Callable | None = None


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                 policy: SelectionPolicy, detokenizer: IncrementalDetokenizer, eos_ids: set[int],
                 return_kept: bool = False, progress: ProgressFn | None = None, mailbox: deque | None = None,
                 placement: Placement | None = None, on_finish: Callable[[Sequence], None] | None = None):
        self.request_id, self.prompt_token_ids, self.params, self.seed = request_id, prompt_token_ids, params, seed
        self.policy, self.detokenizer, self.eos_ids = policy, detokenizer, eos_ids
        self.return_kept, self.progress = return_kept, progress
        self.mailbox = mailbox  # set for requests of generate()/stream(): their outputs go there, not to step()
        self.placement, self.on_finish = placement or Placement(), on_finish
        self.status = Status.WAITING
        self.slot: int | None = None
        self.token_ids: list[int] = []
        self.reported = 0  # tokens already handed out in an output
        self.finish_reason: str | None = None
        self.error: str | None = None  # set with finish_reason "error": what went wrong while it ran
        self.cache_entries = 0  # host mirror of the slot's cache length: what the decode span must cover
        self.view = None  # the prefill's cache view, once prefilled (what it kept, per layer and kv head)
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.stats: dict = {"prompt_tokens": len(prompt_token_ids)}

    @property
    def candidates(self) -> int:
        """Entries the prefill chooses from: those its slot holds already (a continued prefill) and the new ones."""
        return self.placement.held + len(self.prompt_token_ids)

    @property
    def kept_length(self) -> int:
        return self.policy.kept_length(self.candidates)

    @property
    def kept(self) -> list[torch.Tensor] | None:
        return self.view.kept if self.view is not None else None

    @property
    def sampling_mode(self) -> str:
        """Which decode-step variant this request needs (the step runs the most general one of its batch)."""
        p = self.params
        if p.greedy:
            return "greedy"
        return "filtered" if p.top_k > 0 or p.top_p < 1.0 else "sample"

    def record(self, **stats) -> None:
        self.stats.update(stats)

    def append(self, token: int) -> None:
        """Take one generated token; decide on the host whether the request is done (eos, stop string, length)."""
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.token_ids.append(token)
        stopped = self.detokenizer.add(token)
        if (token in self.eos_ids and not self.params.ignore_eos) or stopped:
            self.finish("stop")
        elif len(self.token_ids) >= self.params.max_tokens:
            self.finish("length")
        if self.progress is not None:
            self.progress("decode", len(self.token_ids), self.params.max_tokens)

    def finish(self, reason: str, error: str | None = None) -> None:
        self.finish_reason, self.error = reason, error
        self.status = Status.FINISHED
        self.detokenizer.finish()
        self.record(generated_tokens=len(self.token_ids),
                    decode_s=time.perf_counter() - self.first_token_at if self.first_token_at else 0.0,
                    ttft_s=self.first_token_at - self.arrival if self.first_token_at else None)

    def output(self) -> RequestOutput:
        """What happened since the last output: new tokens and new text (held back while it might be the start
        of a stop string or half a character), plus the totals."""
        new_ids = self.token_ids[self.reported:]
        self.reported = len(self.token_ids)
        done = self.finish_reason is not None
        return RequestOutput(self.request_id, self.prompt_token_ids, list(self.token_ids), self.detokenizer.text,
                             self.detokenizer.take_new_text(), new_ids, self.finish_reason, self.error,
                             stats=dict(self.stats) if done else {}, kept=self.kept if done else None)
