"""The server's open conversations: each a ChatSession holding a cache slot, found by (owner, id).

The owner is the API key that opened it (its id, never the key), or nobody when the server has no keys; a
client sees only its own key's sessions, and any other id answers 404 as an unknown one would. An id is the
client's choice or, with `new_session`, one the server makes (unguessable: the safe choice without keys).
Limits: --max-sessions in all, --max-sessions-per-key per key (per client address without keys), and
--session-ttl seconds idle. Used from the engine loop under its admission lock."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

from engine import LLM, SamplingParams
from engine.llm import ENGINE_DEFAULT
from server.schema import APIError
from sessions import ChatSession

log = logging.getLogger("snapkv.serve")


@dataclass
class Open:
    session: ChatSession
    settings: object  # the snapkv settings it started with (ENGINE_DEFAULT: the server's)
    quota: str  # whose per-key limit it counts against
    used: float


def new_session_id() -> str:
    return "sess-" + secrets.token_urlsafe(24)


class Sessions:
    def __init__(self, llm: LLM, max_sessions: int, per_key: int, ttl: float):
        self.llm, self.max_sessions, self.per_key, self.ttl = llm, max_sessions, per_key, ttl
        self.open: dict[tuple[str | None, str], Open] = {}

    def turn(self, key: tuple[str | None, str], quota: str, messages: list[dict], fill_max_tokens: bool, snapkv,
             params: SamplingParams, rid: str) -> list[int]:
        """Queue the conversation's next turn (opening the session on its first request); returns the tokens
        it feeds. Whatever fails between taking a slot and queueing the turn gives the slot back."""
        entry = self.open.get(key)
        if entry is not None:
            self.check_extends(entry, key[1], messages, snapkv)
            seq = entry.session.add_turn(messages[-1]["content"], params, request_id=rid,
                                         fill_max_tokens=fill_max_tokens)
            entry.used = time.monotonic()
            return seq.prompt_token_ids
        if messages[-1]["role"] != "user":
            raise APIError(400, "a session's turn ends with a user message", "messages", "invalid_value")
        self.check_limits(quota)
        settings = self.llm.snapkv if snapkv is ENGINE_DEFAULT else snapkv
        # a turn that does not complete leaves no trace; NoCapacity when no slot is free
        session = ChatSession(self.llm, snapkv=settings, keep_aborted_turns=False)
        try:
            session.begin_with(messages[:-1])
            seq = session.add_turn(messages[-1]["content"], params, request_id=rid, fill_max_tokens=fill_max_tokens)
        except BaseException:
            session.close()
            raise
        self.open[key] = Open(session, snapkv, quota, time.monotonic())
        return seq.prompt_token_ids

    @staticmethod
    def check_extends(entry: Open, session_id: str, messages: list[dict], snapkv) -> None:
        if snapkv is not ENGINE_DEFAULT and snapkv != entry.settings:
            raise APIError(400, f"session {session_id!r} keeps the snapkv settings it started with; leave snapkv out "
                           "or start a new session", "snapkv", "invalid_value")
        history = entry.session.history
        if messages[:-1] != history or messages[-1]["role"] != "user":
            raise APIError(400, f"the messages do not extend session {session_id!r}: send its {len(history)} "
                           "earlier messages unchanged and one new user message (start a new session to change "
                           "the past)", "messages", "history_mismatch")

    def check_limits(self, quota: str) -> None:
        if self.max_sessions == 0:
            raise APIError(400, "this server keeps no conversations (--max-sessions 0); send the whole conversation "
                           "without session_id", "session_id", "unsupported")
        if len(self.open) >= self.max_sessions:
            raise APIError(429, f"{len(self.open)} sessions are open, the most this server keeps (--max-sessions); "
                           "retry later, or end one with DELETE /v1/sessions/{id}", None, "too_many_sessions")
        mine = sum(entry.quota == quota for entry in self.open.values())
        if mine >= self.per_key:
            raise APIError(429, f"you hold {mine} open sessions, the most one API key (or client, without keys) may "
                           "(--max-sessions-per-key); end one with DELETE /v1/sessions/{id}", None,
                           "too_many_sessions")

    def close(self, key: tuple[str | None, str]) -> str | None:
        """Close a session: its slot goes back at once. Returns the id of the turn it was running (aborted), or
        None; KeyError if there is no such session."""
        entry = self.open.pop(key)
        running = entry.session.busy_request
        entry.session.close()
        return running.request_id if running is not None else None

    def expire(self) -> None:
        """Close the sessions idle for longer than the ttl (a turn in progress counts as use)."""
        now = time.monotonic()
        for key, entry in list(self.open.items()):
            if entry.session.busy:
                entry.used = now
            elif now - entry.used > self.ttl:
                log.info("session %s expired after %.0f s idle", key[1], now - entry.used)
                self.close(key)

    def describe(self, key: tuple[str | None, str]) -> dict:
        if key not in self.open:
            raise APIError(404, f"no open session {key[1]!r}", "session_id", "session_not_found")
        session = self.open[key].session
        return {"id": key[1], "object": "session", "messages": session.history,
                "conversation_tokens": session.conversation_tokens, "held_entries": session.held_entries,
                "kv_bytes": session.kv_bytes, "turns": session.turns}

    @property
    def kv_bytes(self) -> int:
        return sum(entry.session.kv_bytes for entry in self.open.values())
