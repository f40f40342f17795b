"""snapkv-serve: an OpenAI-compatible HTTP server over the engine's step loop.

    snapkv-serve --model weights/SmolLM2-135M-Instruct --port 8000 --max-batch-size 8 --budget 1024

One background thread runs the engine: it calls `llm.step()` while any request is unfinished and hands each
step's outputs to the request's asyncio queue; the HTTP side only bridges (validate the body, tokenize, add the
request, relay its deltas as server-sent events or one JSON body). A request's own SnapKV settings ride in an
extra body field, `"snapkv": {"budget": 512, ...}` or `"snapkv": false` for the full cache. Errors have OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`: 400 for a body or prompt that cannot be served, 401 for
a wrong key, 404 for an unknown model, 429 when the waiting queue is full, 500 when a request fails while it runs
(the others go on). A client that goes away aborts its request, which frees its slot at once. On SIGTERM the
server stops accepting, lets running requests finish for --shutdown-timeout seconds, cancels the rest and exits.

Conversations: a chat request with an extra `"session_id"` keeps that conversation's compressed cache in a slot
between requests (engine.session), so the next turn prefills only its new message. Its messages must be the
session's history plus one new user message (400 otherwise: start a new session to change the past); a turn
that does not complete leaves no trace (the next one prefills the history again). Sessions hold slots: at most
--max-sessions are open, a new one beyond that gets 429, idle ones close after --session-ttl seconds (the same
id then starts over, prefilling the history it is sent), `GET /v1/sessions/{id}` shows one and
`DELETE /v1/sessions/{id}` closes one at once.

The page: `GET /` is a chat with a document (web/), and a request with the extra `"return_kept": true` gets,
in its final `snapkv` object, `kept`: the prompt's tokens and what each (layer, kv head) kept (kept_view).
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import socket
import threading
import time
import uuid
from dataclasses import fields
from pathlib import Path
from typing import Literal, Optional, Union

import anyio
import typer
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

import cli
import web
from engine import LLM, ChatSession, RequestOutput, SamplingParams
from engine.kv_cache import format_bytes
from engine.llm import ENGINE_POLICY
from kept_view import kept_data
from snapkv.config import SnapKVConfig

log = logging.getLogger("snapkv.serve")
SNAPKV_FIELDS = ("budget", "window", "kernel", "pooling", "group_agg", "policy", "sink_tokens")


# --- errors ---------------------------------------------------------------------------------------------------

class APIError(Exception):
    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             409: "conflict_error", 429: "rate_limit_error", 500: "server_error", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "server_error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's list of problems as one OpenAI-style 400 that names the first field at fault."""
    first = exc.errors()[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('msg')}", None, "invalid_json")
    param = ".".join(loc) or None
    what = f"field {param!r}" if param else "the request body"
    return APIError(400, f"{what}: {first.get('msg')}", param, "invalid_value")


# --- the request bodies ---------------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Body(BaseModel):
    """What /v1/chat/completions and /v1/completions share. Unknown fields are ignored, as OpenAI's clients send
    some that do not apply; fields whose meaning we cannot honour are refused (n > 1, logprobs)."""
    model_config = ConfigDict(extra="ignore", strict=True)

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0)
    seed: Optional[int] = Field(None, ge=0, lt=2**63)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    logprobs: Optional[Union[bool, int]] = None
    snapkv: Optional[Union[bool, dict]] = None
    return_kept: bool = False  # the final snapkv object then carries `kept` (kept_view.kept_data)

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
                                  top_p=self.top_p, seed=self.seed, stop=self.stop or [], ignore_eos=self.ignore_eos)
        except ValueError as e:
            raise APIError(400, str(e), "stop" if "stop" in str(e) else None, "invalid_value") from None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[dict]]

    def text(self, index: int) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, "only text content parts are supported", f"messages.{index}.content",
                               "invalid_value")
            parts.append(part["text"])
        return "".join(parts)


class ChatBody(Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    session_id: Optional[str] = Field(None, min_length=1, max_length=128)


class CompletionBody(Body):
    prompt: Union[str, list[int], list[str]]
    echo: bool = False


def request_snapkv(field, engine_default: SnapKVConfig | None):
    """The body's "snapkv" field as the engine takes it: absent or true -> the server's settings; false -> the
    full cache; an object -> those settings, the ones it leaves out taken from the server's (or the defaults)."""
    if field is None or field is True:
        return ENGINE_POLICY
    if field is False:
        return None
    unknown = sorted(set(field) - set(SNAPKV_FIELDS))
    if unknown:
        raise APIError(400, f"unknown snapkv setting {unknown[0]!r}; known: {', '.join(SNAPKV_FIELDS)}",
                       f"snapkv.{unknown[0]}", "invalid_value")
    base = engine_default or SnapKVConfig()
    values = {f.name: getattr(base, f.name) for f in fields(SnapKVConfig)} | field
    for name in ("budget", "window", "kernel"):
        if not isinstance(values[name], int) or isinstance(values[name], bool):
            raise APIError(400, f"snapkv.{name} must be an integer", f"snapkv.{name}", "invalid_value")
    try:
        return SnapKVConfig(**values)
    except (ValueError, TypeError) as e:
        raise APIError(400, f"snapkv: {e}", "snapkv", "invalid_value") from None



# --- metrics --------------------------------------------------------------------------------------------------

class Metrics:
    """Prometheus series for /metrics, in a registry of their own (several servers may live in one process)."""

    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("snapkv_requests", "Requests by final HTTP status (499: the client went away)",
                                ["status"], registry=r)
        self.prompt_tokens = Counter("snapkv_prompt_tokens", "Prompt tokens of admitted requests", registry=r)
        self.generation_tokens = Counter("snapkv_generation_tokens", "Generated tokens", registry=r)
        self.running = Gauge("snapkv_requests_running", "Requests holding a cache slot", registry=r)
        self.waiting = Gauge("snapkv_requests_waiting", "Requests waiting for a slot", registry=r)
        self.kv_bytes = Gauge("snapkv_kv_cache_kept_bytes", "KV bytes the running requests hold", registry=r)
        self.full_kv_bytes = Gauge("snapkv_kv_cache_full_equivalent_bytes",
                                   "KV bytes the running requests would hold with the full cache", registry=r)
        self.sessions = Gauge("snapkv_sessions_open", "Conversations (session_id) holding a cache slot", registry=r)
        self.session_kv_bytes = Gauge("snapkv_sessions_kv_bytes", "KV bytes the open conversations hold",
                                      registry=r)
        self.step_seconds = Histogram("snapkv_decode_step_seconds", "Time of one decode step (all live slots)",
                                      buckets=(.005, .01, .02, .04, .08, .15, .3, .6, 1.2, 2.5, 5), registry=r)
        self.ttft_seconds = Histogram("snapkv_time_to_first_token_seconds", "From arrival to the first token",
                                      buckets=(.05, .1, .25, .5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320), registry=r)

    def record_load(self, load: dict) -> None:
        """The engine thread's view after each change (a scrape never waits for a step)."""
        self.running.set(load["running"])
        self.waiting.set(load["waiting"])
        self.kv_bytes.set(load["kv_bytes"])
        self.full_kv_bytes.set(load["full_kv_bytes"])


# --- conversations --------------------------------------------------------------------------------------------

class Sessions:
    """The open conversations by id, each a ChatSession holding a cache slot, with the settings it started with
    and when it was last used. Used from the engine thread only (under EngineLoop.admission)."""

    def __init__(self, llm: LLM, max_sessions: int, ttl: float):
        self.llm, self.max_sessions, self.ttl = llm, max_sessions, ttl
        self.open: dict[str, tuple[ChatSession, object, float]] = {}

    def turn(self, session_id: str, messages: list[dict], fill_max_tokens: bool, snapkv, params: SamplingParams,
             rid: str) -> list[int]:
        """Queue the conversation's next turn (opening the session on its first request); returns the tokens
        it feeds."""
        if session_id in self.open:
            session, settings, _ = self.open[session_id]
            if snapkv is not ENGINE_POLICY and snapkv != settings:
                raise APIError(400, f"session {session_id!r} keeps the snapkv settings it started with; leave "
                               "snapkv out or start a new session", "snapkv", "invalid_value")
            history = session.history
            if messages[:-1] != history or messages[-1]["role"] != "user":
                raise APIError(400, f"the messages do not extend session {session_id!r}: send its {len(history)} "
                               "earlier messages unchanged and one new user message (start a new session_id to "
                               "change the past)", "messages", "history_mismatch")
        else:
            if messages[-1]["role"] != "user":
                raise APIError(400, "a session's turn ends with a user message", "messages", "invalid_value")
            if len(self.open) >= self.max_sessions:
                raise APIError(429, f"{len(self.open)} sessions are open, the most this server keeps "
                               "(--max-sessions); retry later, or end one with DELETE /v1/sessions/{id}", None,
                               "too_many_sessions")
            try:
                session = self.llm.chat_session(snapkv=snapkv)
            except ValueError as e:  # no free slot right now, or a setting a session cannot take
                raise APIError(429 if "no free cache slot" in str(e) else 400, str(e), None, "session_refused") \
                    from None
            session.keep_aborted_turns = False
            session.messages = messages[:-1]
            settings = snapkv
        try:
            seq = session.add_turn(messages[-1]["content"], params, request_id=rid, fill_max_tokens=fill_max_tokens)
        except ValueError as e:
            if session_id not in self.open:
                session.close()
            if "still running" in str(e):
                raise APIError(409, f"session {session_id!r}: {e}", None, "session_busy") from None
            raise
        self.open[session_id] = (session, settings, time.monotonic())
        return seq.prompt_token_ids

    def close(self, session_id: str) -> bool:
        entry = self.open.pop(session_id, None)
        if entry is not None:
            entry[0].close()
        return entry is not None

    def expire(self) -> None:
        """Close the sessions idle for longer than the ttl (a turn in progress counts as use)."""
        now = time.monotonic()
        for session_id, (session, settings, used) in list(self.open.items()):
            if session.busy:
                self.open[session_id] = (session, settings, now)
            elif now - used > self.ttl:
                log.info("session %s expired after %.0f s idle", session_id, now - used)
                self.close(session_id)

    def describe(self, session_id: str) -> dict:
        if session_id not in self.open:
            raise APIError(404, f"no open session {session_id!r}", "session_id", "session_not_found")
        session = self.open[session_id][0]
        return {"id": session_id, "object": "session", "messages": session.history,
                "conversation_tokens": session.conversation_tokens, "held_entries": session.held_entries,
                "kv_bytes": session.kv_bytes, "turns": session.turns}


# --- the engine thread ----------------------------------------------------------------------------------------

class QueueFull(Exception):
    pass


class EngineLoop:
    """Runs llm.step() in one background thread and routes each output to its request's asyncio queue. Aborts
    are queued to the thread, so a handler that is being cancelled never waits for a step to end."""

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
                     session: tuple[str, list[dict], bool] | None = None,
                     return_kept: bool = False) -> tuple[str, asyncio.Queue]:
        """Queue a request (or, with session = (id, messages, fill_max_tokens), that conversation's next
        turn)."""
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
        """Queue it; returns the tokens its prefill feeds (a session's turn: only the new ones)."""
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

    def close_session(self, session_id: str) -> bool:
        with self.admission:
            return self.sessions.close(session_id)

    def describe_session(self, session_id: str) -> dict:
        with self.admission:
            return self.sessions.describe(session_id)

    def abort(self, rid: str) -> None:
        self.aborts.put(rid)
        self.wake.set()

    def _run(self) -> None:
        while not self.stopping:
            while not self.aborts.empty():
                rid = self.aborts.get()
                self.llm.abort(rid)
                self.streams.pop(rid, None)
            with self.admission:
                self.sessions.expire()
                self.metrics.sessions.set(len(self.sessions.open))
                self.metrics.session_kv_bytes.set(sum(entry[0].kv_bytes for entry in self.sessions.open.values()))
            self.metrics.record_load(self.llm.load())  # after every step, abort and idle second
            if self.deadline is not None and time.monotonic() >= self.deadline:
                for out in self._fail_all("the server is shutting down"):
                    self._deliver(out)
            if not self.llm.has_unfinished():
                self.wake.wait(timeout=1.0)
                self.wake.clear()
                continue
            try:
                outputs = self.llm.step()
            except Exception as e:  # the engine contains per-request faults; anything else fails what it holds
                log.exception("engine step failed")
                outputs = self._fail_all(f"engine step failed: {e}")
            if self.llm.last_decode_s is not None:
                self.metrics.step_seconds.observe(self.llm.last_decode_s)
            for out in outputs:
                self._deliver(out)
        for out in self._fail_all("the server is shutting down"):  # whoever still waits hears so
            self._deliver(out)

    def _fail_all(self, message: str) -> list[RequestOutput]:
        outputs = []
        for rid in list(self.streams):
            self.llm.abort(rid)
            outputs.append(RequestOutput(rid, [], finish_reason="error", error=message))
        return outputs

    def _deliver(self, out: RequestOutput) -> None:
        target = self.streams.pop(out.request_id, None) if out.finished else self.streams.get(out.request_id)
        if target is None:
            return
        loop, outputs = target
        try:
            loop.call_soon_threadsafe(outputs.put_nowait, out)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


class RequireKey:
    """ASGI middleware: /v1/ endpoints need 'Authorization: Bearer <key>' (health and metrics stay open)."""

    def __init__(self, app, key: str, metrics: Metrics):
        self.app, self.expected, self.metrics = app, f"Bearer {key}".encode(), metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and \
                dict(scope["headers"]).get(b"authorization") != self.expected:
            self.metrics.requests.labels("401").inc()
            error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", None,
                             "invalid_api_key")
            return await error.response()(scope, receive, send)
        await self.app(scope, receive, send)


class EventStream(StreamingResponse):
    """Server-sent events that notice a client going away while nothing is being sent (a request still waiting
    for a slot, say): the stream is cancelled at once, and its generator aborts the request. Starlette, under
    ASGI 2.4, only notices when a write fails."""

    async def __call__(self, scope, receive, send):
        async with anyio.create_task_group() as group:
            async def stream():
                try:
                    await self.stream_response(send)
                except OSError:  # the connection broke mid-write
                    pass
                group.cancel_scope.cancel()

            group.start_soon(stream)
            await self.listen_for_disconnect(receive)
            group.cancel_scope.cancel()


# --- the app --------------------------------------------------------------------------------------------------

def create_app(llm: LLM, model_name: str, api_key: str | None = None, max_waiting: int = 256,
               max_sessions: int | None = None, session_ttl: float = 600.0) -> FastAPI:
    metrics = Metrics()
    max_sessions = max(1, llm.max_batch_size - 1) if max_sessions is None else max_sessions
    engine = EngineLoop(llm, metrics, max_waiting, Sessions(llm, max_sessions, session_ttl))

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="snapkv-serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.requests.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        return await api_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return APIError(exc.status_code, str(exc.detail), None, None).response()

    if api_key is not None:
        app.add_middleware(RequireKey, key=api_key, metrics=metrics)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(web.DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}", include_in_schema=False)
    async def page_file(name: str):
        if name not in web.ASSETS:
            raise APIError(404, f"no page file {name!r}", None, "not_found")
        return FileResponse(web.DIR / name, media_type=web.ASSETS[name])

    @app.get("/health")
    async def health():
        if llm.failed:  # a tensor-parallel rank died: nothing more can run
            return JSONResponse({"status": "failed", "error": llm.failed}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "snapkv", "max_model_len": llm.max_model_len}]}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        if llm.tokenizer.chat_template is None:
            raise APIError(400, "this model has no chat template; use /v1/completions", "messages", "no_template")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                    for i, m in enumerate(body.messages)]
        max_tokens = body.max_completion_tokens or body.max_tokens
        if body.session_id is not None:
            return await serve(body, request, None, max_tokens, chat=True, session=(body.session_id, messages))
        text = llm.tokenizer.apply_chat_template(messages)
        ids = llm.tokenizer.encode(text, add_special_tokens=False)  # the template carries its own bos
        return await serve(body, request, ids, max_tokens, chat=True)

    @app.get("/v1/sessions/{session_id}")
    async def session_info(session_id: str):
        return await asyncio.to_thread(engine.describe_session, session_id)

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str):
        if not await asyncio.to_thread(engine.close_session, session_id):
            raise APIError(404, f"no open session {session_id!r}", "session_id", "session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        if body.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (n=1)", "prompt", "invalid_value")
            prompt = prompt[0]
        ids = llm.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        return await serve(body, request, ids, body.max_tokens, chat=False)

    async def serve(body: Body, request: Request, ids: list[int] | None, max_tokens: int | None, chat: bool,
                    session: tuple[str, list[dict]] | None = None):
        arrival = time.perf_counter()
        check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs are not supported", "logprobs", "unsupported")
        snapkv = request_snapkv(body.snapkv, llm.snapkv)
        if body.return_kept and session is not None:
            raise APIError(400, "return_kept is not available with session_id (a turn prefills only its new "
                           "tokens); leave one of them out", "return_kept", "unsupported")
        if session is None and not ids:
            raise APIError(400, "the prompt is empty", "messages" if chat else "prompt", "invalid_value")
        fill = max_tokens is None and session is not None  # the session sizes it (ChatSession.add_turn)
        if max_tokens is None:
            max_tokens = 1 if fill else max(llm.room_for(len(ids), snapkv), 1)
        params = body.sampling_params(max_tokens)
        try:
            rid, outputs, prompt_tokens = await engine.submit(ids, params, snapkv, session and (*session, fill),
                                                              body.return_kept)
        except QueueFull:
            raise APIError(429, f"too many requests are waiting ({max_waiting}); retry later", None,
                           "queue_full") from None
        except ValueError as e:  # the prompt cannot fit the model or a slot, or a token id is not in the vocabulary
            raise APIError(400, str(e), "messages" if chat else "prompt", "context_length_exceeded"
                           if "positions" in str(e) or "entries" in str(e) else "invalid_value") from None
        metrics.prompt_tokens.inc(prompt_tokens)
        reply = Reply(chat, model_name, rid, prompt_tokens, arrival, metrics, body.return_kept)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(relay_stream(rid, outputs, reply, include_usage), media_type="text/event-stream")
        return await relay_whole(rid, outputs, reply, request)

    def check_model(name: str | None) -> None:
        if name not in (None, model_name):
            raise APIError(404, f"model {name!r} is not served here; GET /v1/models lists {model_name!r}", "model",
                           "model_not_found")

    async def relay_stream(rid: str, outputs: asyncio.Queue, reply: Reply, include_usage: bool):
        done = False
        try:
            yield sse(reply.chunk({"role": "assistant", "content": ""} if reply.chat else "", None))
            while True:
                out: RequestOutput = await outputs.get()
                reply.took(out)
                if out.finish_reason == "error":
                    done = True
                    metrics.requests.labels("500").inc()
                    yield sse(APIError(500, out.error or "the request failed", None, "request_failed").body())
                    break
                if out.new_text:
                    yield sse(reply.chunk({"content": out.new_text} if reply.chat else out.new_text, None))
                if out.finished:
                    done = True
                    await reply.take_kept(out, llm.tokenizer)
                    metrics.requests.labels("200").inc()
                    yield sse(reply.chunk({} if reply.chat else "", out.finish_reason, final=out, usage=include_usage))
                    if include_usage:
                        yield sse(reply.usage_chunk(out))
                    break
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the server is cancelling): free the slot
                engine.abort(rid)
                metrics.requests.labels("499").inc()

    async def relay_whole(rid: str, outputs: asyncio.Queue, reply: Reply, request: Request):
        getter = None
        try:
            while True:
                getter = getter or asyncio.ensure_future(outputs.get())
                done, _ = await asyncio.wait({getter}, timeout=1.0)
                if not done:  # nothing yet: is anyone still waiting for the answer?
                    if await request.is_disconnected():
                        engine.abort(rid)
                        metrics.requests.labels("499").inc()
                        return Response(status_code=499)
                    continue
                out: RequestOutput = getter.result()
                getter = None
                reply.took(out)
                if out.finished:
                    break
        except asyncio.CancelledError:
            if getter is not None:
                getter.cancel()
            engine.abort(rid)
            metrics.requests.labels("499").inc()
            raise
        if out.finish_reason == "error":
            raise APIError(500, out.error or "the request failed", None, "request_failed")
        await reply.take_kept(out, llm.tokenizer)
        metrics.requests.labels("200").inc()
        return reply.whole(out)

    return app


class Reply:
    """Builds one request's response objects in OpenAI's shapes, and times its first token."""

    def __init__(self, chat: bool, model: str, rid: str, prompt_tokens: int, arrival: float, metrics: Metrics,
                 return_kept: bool = False):
        self.chat, self.model, self.prompt_tokens, self.return_kept = chat, model, prompt_tokens, return_kept
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.created, self.arrival, self.metrics = int(time.time()), arrival, metrics
        self.first_token = False
        self.kept: dict | None = None

    async def take_kept(self, out: RequestOutput, tokenizer) -> None:
        """With return_kept: the kept data for the final snapkv object (off the event loop: it decodes every
        prompt token)."""
        if self.return_kept and out.kept is not None:  # a session's turn records kept positions for itself
            self.kept = await asyncio.to_thread(kept_data, tokenizer, out.prompt_token_ids, out.kept, out.token_ids,
                                                out.stats)

    def took(self, out: RequestOutput) -> None:
        if out.new_token_ids:
            self.metrics.generation_tokens.inc(len(out.new_token_ids))
            if not self.first_token:
                self.first_token = True
                self.metrics.ttft_seconds.observe(time.perf_counter() - self.arrival)

    def usage(self, out: RequestOutput) -> dict:
        n = len(out.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def snapkv(self, out: RequestOutput) -> dict:
        s = out.stats
        info = {"prompt_tokens": self.prompt_tokens, "kept_tokens": s.get("kept_tokens"),
                "kv_bytes": s.get("kv_bytes"), "full_kv_bytes": s.get("full_kv_bytes")}
        if "session" in s:  # a conversation's turn: what its slot holds after it
            info["session"] = s["session"]
        if self.kept is not None:
            info["kept"] = self.kept
        return info

    def _head(self, kind: str) -> dict:
        suffix = ".chunk" if kind == "chunk" else ""
        obj = ("chat.completion" + suffix) if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def chunk(self, delta, finish_reason: str | None, final: RequestOutput | None = None, usage: bool = False):
        choice = {"index": 0, "delta": delta} if self.chat else {"index": 0, "text": delta}
        body = self._head("chunk") | {"choices": [choice | {"logprobs": None, "finish_reason": finish_reason}]}
        if usage:
            body["usage"] = None
        if final is not None:
            body["snapkv"] = self.snapkv(final)
        return body

    def usage_chunk(self, out: RequestOutput) -> dict:
        return self._head("chunk") | {"choices": [], "usage": self.usage(out)}

    def whole(self, out: RequestOutput) -> dict:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text}} if self.chat else \
            {"index": 0, "text": out.text}
        return self._head("whole") | {"choices": [choice | {"logprobs": None, "finish_reason": out.finish_reason}],
                                      "usage": self.usage(out), "snapkv": self.snapkv(out)}


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


# --- the command ----------------------------------------------------------------------------------------------

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Serve a model over an OpenAI-compatible HTTP API, its KV cache compressed by SnapKV.")


@app.command(help="Serve /v1/chat/completions (with conversations by session_id), /v1/completions, /v1/models, "
             "/v1/sessions/{id}, /health, /metrics, and a chat page at /.")
def serve_command(
    model: Optional[Path] = cli.MODEL,
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="Cache slots: requests decoded together."),
    max_kv_len: Optional[int] = cli.MAX_KV_LEN,
    max_waiting: int = typer.Option(256, "--max-waiting", help="Requests that may wait for a slot; more get 429."),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions", help="Conversations (session_id) kept open "
                                               "at once, each holding a cache slot; more get 429.",
                                               show_default="max-batch-size - 1, at least 1"),
    session_ttl: float = typer.Option(600.0, "--session-ttl", help="Seconds an idle conversation keeps its slot."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="SNAPKV_API_KEY",
                                          help="Require 'Authorization: Bearer KEY' on /v1/ endpoints."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model's name in the API.",
                                                    show_default="the model's file or directory name"),
    shutdown_timeout: float = typer.Option(10.0, "--shutdown-timeout", help="On SIGTERM, seconds running "
                                           "requests get to finish before they are cancelled."),
    budget: int = cli.BUDGET,
    no_snapkv: bool = cli.NO_SNAPKV,
    window: int = cli.WINDOW,
    kernel: int = cli.KERNEL,
    pooling: cli.Pooling = cli.POOLING,
    group_agg: cli.GroupAgg = cli.GROUP_AGG,
    policy: cli.Policy = cli.POLICY,
    sink_tokens: Optional[int] = cli.SINK_TOKENS,
    device: cli.Device = cli.DEVICE,
    dtype: cli.DType = cli.DTYPE,
    weights_dtype: cli.WeightsDType = cli.WEIGHTS_DTYPE,
    kv_dtype: cli.KVDType = cli.KV_DTYPE,
    cuda_graph: bool = cli.CUDA_GRAPH,
    compile_step: bool = cli.COMPILE,
    prefill_chunk: Optional[int] = cli.PREFILL_CHUNK,
    allow_longer_context: bool = cli.ALLOW_LONGER_CONTEXT,
    tensor_parallel: int = cli.TENSOR_PARALLEL,
):
    import uvicorn

    if not 0 < port < 65536:
        raise cli.UserError(f"--port must be in 1..65535 (got {port})")
    if max_waiting < 1:
        raise cli.UserError(f"--max-waiting must be at least 1 (got {max_waiting})")
    if max_sessions is not None and not 0 <= max_sessions <= max_batch_size:
        raise cli.UserError(f"--max-sessions must be in 0..--max-batch-size ({max_batch_size}) (got {max_sessions})")
    if session_ttl <= 0:
        raise cli.UserError(f"--session-ttl must be > 0 seconds (got {session_ttl})")
    if shutdown_timeout < 0:
        raise cli.UserError(f"--shutdown-timeout must be >= 0 (got {shutdown_timeout})")
    model_path = cli.resolve_model(model)
    check_port_free(host, port)  # before the model loads, so a taken port fails in a second
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    snapkv = cli.snapkv_from_flags(no_snapkv, budget, window, kernel, pooling, group_agg, policy,
                                   sink_tokens)
    log.info("loading %s", model_path)
    llm = LLM(model_path, device=device.value, dtype=dtype.value, snapkv=snapkv, max_batch_size=max_batch_size,
              max_kv_len=max_kv_len, cuda_graph=cuda_graph, compile=compile_step, prefill_chunk_size=prefill_chunk,
              allow_longer_context=allow_longer_context,
              weights_dtype=weights_dtype.value, kv_dtype=kv_dtype.value, tensor_parallel_size=tensor_parallel)
    name = served_model_name or (model_path.stem if model_path.suffix == ".gguf" else model_path.name)
    cfg = llm.config
    log.info("model %s: %d layers, %d kv heads x %d, %s on %s; max %d positions", name, cfg.num_layers,
             cfg.num_kv_heads, cfg.head_dim, str(llm.dtype).removeprefix("torch."), llm.device, llm.max_model_len)
    log.info("%d slots x %d cache entries: KV cache %s (%s per slot); %s", llm.max_batch_size, llm.max_kv_len,
             format_bytes(llm.runner.cache_bytes), format_bytes(llm.runner.cache_bytes / llm.max_batch_size),
             describe_snapkv(snapkv))
    app = create_app(llm, name, api_key, max_waiting, max_sessions, session_ttl)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: the engine cancels what is left at the deadline
            app.state.engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own cancel comes a little after ours, so a cancelled stream still gets its error event
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           timeout_graceful_shutdown=shutdown_timeout + 5))
    server.run()
    if not server.started:
        raise cli.UserError(f"the server did not start on {host}:{port} (see the log above)")


def check_port_free(host: str, port: int) -> None:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise cli.UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def describe_snapkv(cfg: SnapKVConfig | None) -> str:
    if cfg is None or cfg.policy == "full":
        return "full cache"
    return "SnapKV " + ", ".join(f"{f}={getattr(cfg, f)}" for f in SNAPKV_FIELDS)


def main(argv: list[str] | None = None) -> int:
    return cli.run_app(app, argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
