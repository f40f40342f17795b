"""Sequence: one request's state from arrival to finish — its prompt, sampling settings and selection policy, the
cache slot it holds, the tokens and text generated so far, why it stopped, and its statistics. RequestOutput is
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


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                 policy: SelectionPolicy, detokenizer: IncrementalDetokenizer, eos_ids: set[int],
                 return_kept: bool = False, progress: ProgressFn | None = None, mailbox: deque | None = None):
        self.request_id, self.prompt_token_ids, self.params, self.seed = request_id, prompt_token_ids, params, seed
        self.policy, self.detokenizer, self.eos_ids = policy, detokenizer, eos_ids
        self.return_kept, self.progress = return_kept, progress
        self.mailbox = mailbox  # set for requests of generate()/stream(): their outputs go there, not to step()
        self.status = Status.WAITING
        self.slot: int | None = None
        self.token_ids: list[int] = []
        self.reported = 0  # tokens already handed out in an output
        self.finish_reason: str | None = None
        self.error: str | None = None  # set with finish_reason "error": what went wrong while it ran
        self.cache_entries = 0  # host mirror of the slot's cache length: what the decode span must cover
        self.kept: list[torch.Tensor] | None = None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.stats: dict = {"prompt_tokens": len(prompt_token_ids)}
        # a conversation's turn (engine.session): the session, the slot it holds, and per layer the positions of
        # the entries that slot holds already; the turn's tokens continue at start_position
        self.session = None
        self.pinned_slot: int | None = None
        self.past_positions: list[torch.Tensor] | None = None
        self.start_position = 0
        self.past_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # a full-history session's K/V
        self.turn_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # ...and this turn's, once prefilled

    @property
    def candidates(self) -> int:
        """Entries the prefill chooses from: the held ones (a conversation's later turn) and the new tokens."""
        past = max((p.shape[-1] for p in self.past_positions), default=0) if self.past_positions else 0
        return past + len(self.prompt_token_ids)

    @property
    def kept_length(self) -> int:
        return self.policy.kept_length(self.candidates)

    @property
    def sampling_mode(self) -> str:
        """Which decode-step variant this request needs (the step runs the most general one of its batch)."""
        p = self.params
        if p.greedy:
            return "greedy"
        return "filtered" if p.top_k > 0 or p.top_p < 1.0 else "sample"

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

    def finish(self, reason: str) -> None:
        self.finish_reason = reason
        self.status = Status.FINISHED
        self.detokenizer.finish()
        generated = len(self.token_ids)
        self.stats.update(generated_tokens=generated,
                          decode_s=time.perf_counter() - self.first_token_at if self.first_token_at else 0.0)

    def output(self) -> RequestOutput:
        """What happened since the last output: new tokens and new text (held back while it might be the start
        of a stop string or half a character), plus the totals."""
        new_ids = self.token_ids[self.reported:]
        self.reported = len(self.token_ids)
        done = self.finish_reason is not None
        return RequestOutput(self.request_id, self.prompt_token_ids, list(self.token_ids), self.detokenizer.text,
                             self.detokenizer.take_new_text(), new_ids, self.finish_reason, self.error,
                             stats=dict(self.stats) if done else {}, kept=self.kept if done else None)
