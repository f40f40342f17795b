"""The engine thread: one background thread calls `llm.step()` while any request is unfinished and hands each
output to its request's asyncio queue. Handlers add requests (or conversation turns) through `submit`, and abort
them through a queue the thread drains between steps, so a handler being cancelled never waits for a step. A
request that ends on the server's side (its session closed, the server shutting down, a failed step) gets an
APIError in its queue, so its response always ends."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid

from engine import LLM, RequestOutput, SamplingParams
from server.metrics import Metrics
from server.schema import APIError
from server.sessions import Sessions

log = logging.getLogger("snapkv.serve")


class QueueFull(Exception):
    pass


class EngineLoop:
    def __init__(self, llm: LLM, metrics: Metrics, max_waiting: int, sessions: Sessions):
        self.llm, self.metrics, self.max_waiting, self.sessions = llm, metrics, max_waiting, sessions
        self.streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self.aborts: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.wake = threading.Event()
        self.admission = threading.Lock()  # the queue-length check and the add happen together
        self.stopping = False
        self.deadline: float | None = None  # set by drain(): requests still running then are cancelled
        self.thread = threading.Thread(target=self._run, name="snapkv-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def drain(self, seconds: float) -> None:
        """Shutting down: take no new requests, and give the running ones this long to finish."""
        self.deadline = time.monotonic() + seconds
        self.wake.set()

    def stop(self) -> None:
        self.stopping = True
        self.wake.set()
        self.thread.join(timeout=60)

    async def submit(self, prompt_token_ids: list[int] | None, params: SamplingParams, snapkv,
                     session: tuple | None = None, return_kept: bool = False) -> tuple[str, asyncio.Queue, int]:
        """Queue a request (or, with session = ((owner, id), quota, messages, fill_max_tokens), that
        conversation's next turn); returns its id, its output queue and the tokens its prefill feeds."""
        if self.deadline is not None:
            raise APIError(503, "the server is shutting down", None, "shutting_down")
        rid = uuid.uuid4().hex
        outputs: asyncio.Queue = asyncio.Queue()
        self.streams[rid] = (asyncio.get_running_loop(), outputs)  # before the add: the first step may be quick
        try:
            prompt_tokens = await asyncio.to_thread(self._add, rid, prompt_token_ids, params, snapkv, session,
                                                    return_kept)
        except BaseException:
            self.streams.pop(rid, None)
            raise
        self.wake.set()
        return rid, outputs, prompt_tokens

    def _add(self, rid, prompt_token_ids, params, snapkv, session, return_kept) -> int:
        with self.admission:
            if self.llm.load()["waiting"] >= self.max_waiting:
                raise QueueFull
            if session is not None:
                prompt_token_ids = self.sessions.turn(*session, snapkv, params, rid)
            else:
                self.llm.add_request(prompt_token_ids=prompt_token_ids, sampling_params=params, request_id=rid,
                                     snapkv=snapkv, return_kept=return_kept)
            self.metrics.record_load(self.llm.load())
            return len(prompt_token_ids)

    def close_session(self, key: tuple) -> bool:
        """Close a session now; a turn it was running ends with a 409 for its client."""
        with self.admission:
            try:
                running = self.sessions.close(key)
            except KeyError:
                return False
            self.metrics.record_load(self.llm.load())
        if running is not None:
            self.end(running, APIError(409, f"session {key[1]!r} was closed (DELETE /v1/sessions/{{id}}) while this "
                                       "turn ran", None, "session_closed"))
        return True

    def describe_session(self, key: tuple) -> dict:
        with self.admission:
            return self.sessions.describe(key)

    def abort(self, rid: str) -> None:
        """The handler is gone: drop its request (between steps) and its queue."""
        self.streams.pop(rid, None)
        self.aborts.put(rid)
        self.wake.set()

    def end(self, rid: str, error: APIError) -> None:
        """End a request's response from the server's side with this error (it is aborted in the engine)."""
        self.aborts.put(rid)
        self.wake.set()
        target = self.streams.pop(rid, None)
        if target is not None:
            self._put(target, error)

    def _run(self) -> None:
        while not self.stopping:
            while not self.aborts.empty():
                self.llm.abort(self.aborts.get())
            with self.admission:
                self.sessions.expire()
                self.metrics.record_sessions(len(self.sessions.open), self.sessions.kv_bytes)
            self.metrics.record_load(self.llm.load())  # after every step, abort and idle second
            if self.deadline is not None and time.monotonic() >= self.deadline:
                self._end_all(APIError(503, "the server is shutting down", None, "shutting_down"))
            if not self.llm.has_unfinished():
                self.wake.wait(timeout=1.0)
                self.wake.clear()
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # the engine contains per-request faults; anything else fails what it holds
                log.exception("engine step failed")
                self._end_all(APIError(500, f"engine step failed: {e}", None, "engine_failed"))
                outputs = []
            if self.llm.last_decode_s is not None:
                self.metrics.step_seconds.observe(self.llm.last_decode_s)
            for out in outputs:
                self._deliver(out)
        self._end_all(APIError(503, "the server is shutting down", None, "shutting_down"))

    def _end_all(self, error: APIError) -> None:
        for rid in list(self.streams):
            self.end(rid, error)

    def _deliver(self, out: RequestOutput) -> None:
        target = self.streams.pop(out.request_id, None) if out.finished else self.streams.get(out.request_id)
        if target is not None:
            self._put(target, out)

    @staticmethod
    def _put(target: tuple[asyncio.AbstractEventLoop, asyncio.Queue], item) -> None:
        loop, outputs = target
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass
