"""ChatSession: a conversation that keeps its compressed KV cache in one slot between turns, built on the engine's
public seams (a reserved slot, `submit` with a continued prefill, an on-finish hook).

    chat = llm.chat_session(system="You answer briefly.")
    print(chat.send("Here is a report: ... What year was the bridge built?").text)
    for piece in chat.stream("And who built it?"):
        print(piece, end="")
    chat.close()  # the slot goes back to the engine

The first turn is prefilled like any prompt; the answer's tokens stay in the slot. A later turn feeds only what is
new (the last answer's final token, the template's closing of it, the new message, the generation prompt) at
positions that continue the conversation; those tokens attend to everything the slot holds, and held and new
entries are candidates together: while they fit the budget plus `reserve` all stay, past that the policy selects
again with the new turn's window voting. What one turn drops is gone for the next unless `full_history=True`,
which keeps every entry of the conversation in host memory to select from. What is new in a turn comes from the
chat template itself, rendered with a marker in place of the last answer. A turn that fails loses the slot's
entries: the next one prefills the history again. Sliding-window models and ragged policies (adakv) are refused.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections import deque
from typing import Iterator

import torch

from engine import LLM
from engine.errors import InvalidRequest, PromptTooLong, SessionBusy, SessionClosed
from engine.sampling_params import SamplingParams
from engine.sequence import Placement, ProgressFn, RequestOutput, Sequence, Status
from sessions.continued import ContinuedPrefill
from snapkv.config import WINDOW_POLICIES, SnapKVConfig
from snapkv.policies import FullCache, SelectionPolicy



def answer_marker(messages: list[dict]) -> str:
    """A stand-in for the last answer when a template is rendered to find what follows it: random, and in none of
    the messages, so no user text can forge it."""
    while True:
        marker = f"\x00snapkv-answer-{secrets.token_hex(8)}\x00"
        if not any(marker in str(m.get("content", "")) for m in messages):
            return marker


class ChatSession:
    def __init__(self, llm: LLM, system: str | None = None, snapkv: SnapKVConfig | None = None,
                 reserve: int | None = None, full_history: bool = False, keep_aborted_turns: bool = True):
        """keep_aborted_turns: an aborted turn's partial answer stays in the conversation (False: no trace)."""
        if llm.config.sliding_window is not None:
            raise InvalidRequest("conversations that keep their cache need a model without a sliding window (held "
                             "entries would need per-position masks in prefill); send each turn as a whole prompt "
                             "instead")
        if snapkv is not None and snapkv.policy == "adakv":
            raise InvalidRequest("policy adakv keeps a different number of entries per kv head, which a conversation's "
                             "next turn cannot attend to; use snapkv or pyramidkv for a chat session")
        if llm.tokenizer.chat_template is None:
            raise InvalidRequest("this model's tokenizer has no chat template; a chat session needs one")
        if full_history and llm.ranks is not None:
            raise InvalidRequest("full_history sessions are not supported with tensor parallelism (each rank holds "
                                 "its own kv heads); use full_history=False or tensor_parallel_size=1")
        self.llm, self.system, self.snapkv, self.full_history = llm, system, snapkv, full_history
        self.policy = llm.make_policy(snapkv)
        self.compressing = not isinstance(self.policy, FullCache)
        budget = self.policy.most_per_head() if self.compressing else llm.max_kv_len
        room = llm.max_kv_len - budget
        if reserve is None:
            reserve = max(room // 2, 0)
        if not isinstance(reserve, int) or isinstance(reserve, bool) or reserve < 0:
            raise InvalidRequest(f"reserve must be a non-negative integer (got {reserve!r})")
        self.budget, self.reserve = budget, reserve
        self.closed, self.keep_aborted_turns = False, keep_aborted_turns
        self._busy: Sequence | None = None
        self._user_text = ""
        self._lock = llm.lock  # the engine's: turns end inside its step
        self._clear(keep_history=False)
        self.slot = llm.reserve_slot()  # last: nothing after it can fail

    # --- state --------------------------------------------------------------------------------------------------

    def _clear(self, keep_history: bool) -> None:
        if not keep_history:
            self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        layers, heads = self.llm.config.num_layers, self.llm.config.num_kv_heads
        # per layer, the conversation position of each entry the slot holds, [kv_heads, held]
        self.positions: list[torch.Tensor] = [torch.empty(heads, 0, dtype=torch.long)] * layers
        self.token_ids: list[int] = []  # every token fed to the model, in order (their count is the next position)
        self.pending: list[int] = []  # the last answer's final token: sampled, not fed yet
        self.turns: list[dict] = []  # per finished turn: its statistics
        # full_history: per layer the K/V [kv_heads, conversation_tokens, head_dim] of every token fed, in host memory
        empty = torch.empty(heads, 0, self.llm.config.head_dim, dtype=self.llm.dtype)
        self.archive: list[tuple[torch.Tensor, torch.Tensor]] | None = [(empty, empty)] * layers \
            if self.full_history else None

    @property
    def history(self) -> list[dict]:
        """The conversation so far as chat messages (the system message first, if any)."""
        return [dict(m) for m in self.messages]

    @property
    def conversation_tokens(self) -> int:
        """Tokens fed to the model so far: the position the next turn starts at."""
        return len(self.token_ids)

    @property
    def held_entries(self) -> int:
        """The most entries one (layer, kv head) row of the slot holds now."""
        return max(p.shape[-1] for p in self.positions)

    @property
    def kv_bytes(self) -> int:
        """Bytes of K/V the slot's held entries take (summed over layers; a row's unused room not counted)."""
        entries = sum(p.shape[-1] for p in self.positions) / self.llm.config.num_layers
        return round(entries * self.llm.kv_bytes_per_entry)

    def continued(self) -> ContinuedPrefill:
        """The next turn's prefill: it selects among the slot's entries (or, keeping the full history, every
        position so far and its K/V) and its own tokens, at positions that continue the conversation."""
        if not self.full_history:
            return ContinuedPrefill(self.positions, self.conversation_tokens)
        heads, n = self.llm.config.num_kv_heads, self.conversation_tokens
        positions = [torch.arange(n).expand(heads, n)] * self.llm.config.num_layers
        return ContinuedPrefill(positions, n, self.archive)

    @property
    def history_bytes(self) -> int:
        """Bytes of the full history kept in host memory (full_history only; else 0)."""
        return sum(k.nbytes + v.nbytes for k, v in self.archive) if self.archive else 0

    @property
    def kept_positions(self) -> list[torch.Tensor]:
        """Per layer, [kv_heads, held] conversation positions the slot holds (indexes into `token_ids`)."""
        return [p.clone() for p in self.positions]

    def begin_with(self, messages: list[dict]) -> None:
        """Start the conversation from these earlier messages (prefilled with its first turn): a conversation
        that began elsewhere."""
        with self._lock:
            self._check_usable()
            if self.token_ids:
                raise InvalidRequest("this conversation has begun; reset() it first")
            self.messages = [dict(m) for m in messages]

    def reset(self) -> None:
        """Forget the conversation (the system message stays); the slot stays reserved."""
        with self._lock:
            self._check_usable()
            self._clear(keep_history=False)

    def close(self) -> None:
        """End the conversation and give its slot back to the engine (a running turn is aborted first)."""
        with self._lock:
            if self.closed:
                return
            if self._busy is not None:
                self.llm.abort(self._busy.request_id)
            self.closed = True
            self.llm.release_slot(self.slot)

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def busy(self) -> bool:
        """Whether a turn is queued or running."""
        return self._busy is not None

    @property
    def busy_request(self) -> Sequence | None:
        """The turn queued or running, or None."""
        return self._busy

    def _check_usable(self) -> None:
        if self.closed:
            raise SessionClosed("this chat session is closed; start a new one with llm.chat_session()")
        if self._busy is not None:
            raise SessionBusy("a turn of this chat session is still running; wait for it before the next one")

    # --- turns --------------------------------------------------------------------------------------------------

    def new_tokens(self, user_text: str) -> list[int]:
        """The tokens a turn with this user message feeds: the whole rendered conversation for the first turn
        (or after a lost cache), else the last answer's final token, the template's closing of it, the new
        message and the generation prompt."""
        tokenizer = self.llm.tokenizer
        user = {"role": "user", "content": user_text}
        if not self.token_ids:
            return self.llm.encode_messages(self.messages + [user])
        marker = answer_marker(self.messages + [user])
        marked = self.messages[:-1] + [{"role": "assistant", "content": marker}, user]
        after = tokenizer.apply_chat_template(marked).split(marker, 1)[-1]
        pending = self.pending
        if pending and pending[-1] in self.llm.eos_ids:  # the answer's end token is the template's closing too
            closing = tokenizer.decode(pending, skip_special_tokens=False)
            after = after.removeprefix(closing)
        return pending + tokenizer.encode(after, add_special_tokens=False)

    def turn_policy(self, candidates: int, max_tokens: int, new: int) -> SelectionPolicy:
        """Keep every candidate while they and the answer fit the slot and the budget (a first turn, compressed as
        any prompt is) or the budget plus the reserve (a later turn: the slot grows that far before it is
        compressed again); otherwise compress with the session's policy, its window no longer than the new
        tokens."""
        capacity = self.llm.max_kv_len
        limit = self.budget + (self.reserve if self.held_entries else 0)
        if candidates + max_tokens <= capacity and (not self.compressing or candidates <= limit):
            return FullCache()
        if not self.compressing:
            raise PromptTooLong(f"the conversation needs {candidates + max_tokens} cache entries ({candidates} so "
                                f"far, max_tokens {max_tokens}) but a slot holds {capacity} with the full cache; "
                                "reset the session, use SnapKV, or give the engine a larger max_kv_len")
        if self.snapkv.policy in WINDOW_POLICIES and new < self.snapkv.window:
            return self.llm.make_policy(dataclasses.replace(self.snapkv, window=new))
        return self.policy

    def add_turn(self, user_text: str, params: SamplingParams | None = None, request_id: str | None = None,
                 mailbox: deque | None = None, fill_max_tokens: bool = False,
                 progress: ProgressFn | None = None) -> Sequence:
        """Queue the next turn; `llm.step()` runs it like any request (its outputs come from step(), or go to
        `mailbox`). fill_max_tokens: replace params.max_tokens by the most this turn can have without leaving
        the budget plus the reserve (the full cache: the slot). Raises ValueError for a turn that cannot run
        (closed session, a turn still running, a conversation past the model's positions or the slot)."""
        if not isinstance(user_text, str) or not user_text:
            raise InvalidRequest("a chat turn needs a non-empty user message (a string)")
        params = params or SamplingParams()
        with self._lock:
            self._check_usable()
            ids = self.new_tokens(user_text)
            candidates = (self.conversation_tokens if self.full_history else self.held_entries) + len(ids)
            if fill_max_tokens:
                capacity = self.llm.max_kv_len
                room = capacity - self.budget - self.reserve if self.compressing else capacity - candidates
                positions = self.llm.max_model_len - self.conversation_tokens - len(ids)
                params = dataclasses.replace(params, max_tokens=max(1, min(room, positions)))
            policy = self.turn_policy(candidates, params.max_tokens, len(ids))
            turn = self.continued()
            seq = self.llm.submit(ids, params, policy=policy, request_id=request_id, progress=progress,
                                  mailbox=mailbox, on_finish=self.turn_ended,
                                  placement=Placement(self.slot, turn.start, turn.held, turn))
            self._busy, self._user_text = seq, user_text
            return seq

    def turn_ended(self, seq: Sequence) -> None:
        """Called by the engine when a turn finishes (or is aborted, or fails): fold it into the conversation."""
        with self._lock:
            self._busy = None
            if seq.view is None:  # aborted while waiting: nothing ran
                return
            lost = seq.finish_reason == "error" or seq.kept is None  # the slot's entries may be half overwritten
            if lost or (seq.finish_reason == "abort" and not self.keep_aborted_turns):
                self._clear(keep_history=True)  # the next turn prefills the history again
                return
            fed = seq.token_ids[:-1]  # every generated token but the last went through a decode step
            if self.full_history:  # the history grows by this turn's tokens and the answer's decoded entries
                cache = self.llm.runner.cache
                for layer, (kept, (turn_k, turn_v)) in enumerate(zip(seq.kept, seq.view.turn_kv)):
                    n = kept.shape[-1]
                    k, v = (c.cpu() for c in cache.read_rows((layer, self.slot, slice(None), slice(n, n + len(fed)))))
                    old_k, old_v = self.archive[layer]
                    self.archive[layer] = torch.cat([old_k, turn_k, k], dim=1), torch.cat([old_v, turn_v, v], dim=1)
            start = seq.placement.start + len(seq.prompt_token_ids)
            decoded = torch.arange(start, start + len(fed))
            self.positions = [torch.cat([kept, decoded.expand(kept.shape[0], -1)], dim=-1) for kept in seq.kept]
            self.token_ids += seq.prompt_token_ids + fed
            self.pending = seq.token_ids[-1:]
            self.messages += [{"role": "user", "content": self._user_text},
                              {"role": "assistant", "content": seq.detokenizer.text}]
            turn = {"new_tokens": len(seq.prompt_token_ids), "generated_tokens": len(seq.token_ids),
                    "held_entries": self.held_entries, "conversation_tokens": self.conversation_tokens,
                    "compressed": not isinstance(seq.policy, FullCache), "prefill_s": seq.stats.get("prefill_s"),
                    "decode_s": seq.stats.get("decode_s"), "kv_bytes": self.kv_bytes,
                    "history_bytes": self.history_bytes}
            self.turns.append(turn)
            seq.record(session=dict(turn))

    def send(self, user_text: str, params: SamplingParams | None = None,
             progress: ProgressFn | None = None) -> RequestOutput:
        """Run one turn and return its output (text, tokens, finish_reason, stats)."""
        seq = self.add_turn(user_text, params, mailbox=deque(maxlen=1), progress=progress)
        self.llm.run_until(lambda: seq.status is Status.FINISHED)
        return seq.mailbox[-1]

    def stream(self, user_text: str, params: SamplingParams | None = None, result: list | None = None,
               progress: ProgressFn | None = None) -> Iterator[str]:
        """Run one turn, yielding its text as it is produced; the final RequestOutput is appended to `result`
        (if a list). Closing the iterator early aborts the turn; what was generated stays in the conversation."""
        seq = self.add_turn(user_text, params, mailbox=deque(), progress=progress)
        return self.llm.follow(seq, result)
