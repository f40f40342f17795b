"""The HTTP app: each route validates its body, tokenizes off the event loop, hands the request to the engine
loop and relays its outputs as one JSON body or as server-sent events. Every error has OpenAI's shape; a client
that goes away, streamed or not, aborts its request within about one decode step."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import web
from engine import LLM, RequestOutput
from server.engine_loop import EngineLoop, QueueFull
from server.guards import LOOPBACK_NAMES, Guard
from server.metrics import Metrics
from server.reply import Reply, sse
from server.schema import APIError, Body, ChatBody, CompletionBody, request_snapkv, validation_error
from server.sessions import Sessions, new_session_id

log = logging.getLogger("snapkv.serve")
BYTES_PER_POSITION = 16  # the default body limit: room for a prompt the model can take, as JSON text


@dataclass
class Limits:
    """What the server bounds (snapkv-serve's flags; None: derived from the model and the slots)."""
    api_keys: list[str] = field(default_factory=list)
    max_waiting: int = 256
    max_sessions: int | None = None  # default: max_batch_size - 1 (one slot always serves one-shot requests)
    max_sessions_per_key: int | None = None  # default: half of max_sessions, at least 1
    session_ttl: float = 600.0
    allowed_hosts: list[str] | None = field(default_factory=lambda: list(LOOPBACK_NAMES))  # None: any
    max_request_bytes: int | None = None  # default: BYTES_PER_POSITION per model position, at least 64 KiB
    read_timeout: float = 10.0

    def resolve(self, llm: LLM) -> Limits:
        sessions = llm.max_batch_size - 1 if self.max_sessions is None else self.max_sessions
        if not 0 <= sessions < llm.max_batch_size:
            raise ValueError(f"max_sessions must be in 0..{llm.max_batch_size - 1} (below max_batch_size, so one "
                             f"slot always serves one-shot requests; got {sessions})")
        per_key = max(1, -(-sessions // 2)) if self.max_sessions_per_key is None else self.max_sessions_per_key
        body = self.max_request_bytes or max(BYTES_PER_POSITION * min(llm.max_model_len, 1 << 22), 1 << 16)
        return Limits(self.api_keys, self.max_waiting, sessions, per_key, self.session_ttl, self.allowed_hosts,
                      body, self.read_timeout)


class EventStream(StreamingResponse):
    """Server-sent events that notice a client going away while nothing is being sent (a request still waiting
    for a slot, say): the stream is cancelled at once, and its generator aborts the request."""

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


async def disconnected(request: Request) -> None:
    """Returns once the client has gone away (the body was read already, so only a disconnect can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(llm: LLM, model_name: str, limits: Limits | None = None) -> FastAPI:
    limits = (limits or Limits()).resolve(llm)
    metrics = Metrics()
    sessions = Sessions(llm, limits.max_sessions, limits.max_sessions_per_key, limits.session_ttl)
    engine = EngineLoop(llm, metrics, limits.max_waiting, sessions)

    async def lifespan(app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="snapkv-serve", lifespan=lifespan)
    app.state.engine, app.state.limits = engine, limits
    app.add_middleware(Guard, keys=limits.api_keys, allowed_hosts=limits.allowed_hosts,
                       max_body=limits.max_request_bytes, read_timeout=limits.read_timeout,
                       on_refusal=lambda status: metrics.requests.labels(str(status)).inc())

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        metrics.requests.labels(str(exc.status)).inc()
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError):
        return await api_error(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return await api_error(request, APIError(exc.status_code, str(exc.detail), None, None, exc.headers))

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.error("request failed: %s: %s", type(exc).__name__, exc)
        return await api_error(request, APIError(500, f"the server failed: {type(exc).__name__}", None,
                                                 "server_error"))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(web.DIR / "index.html", media_type="text/html")

    @app.get("/web/{name}", include_in_schema=False)
    async def page_file(name: str):
        if name not in web.ASSETS:
            raise APIError(404, f"no page file {name[:64]!r}", None, "not_found")
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
        if body.session_id is not None and body.new_session:
            raise APIError(400, "send session_id or new_session, not both", "new_session", "invalid_value")
        if body.session_id is not None or body.new_session:
            session_id = body.session_id or new_session_id()
            return await serve(body, request, None, max_tokens, chat=True, session=(session_id, messages))
        ids = await tokenize(lambda: llm.encode_messages(messages), "messages")
        return await serve(body, request, ids, max_tokens, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        if body.echo:
            raise APIError(400, "echo is not supported", "echo", "unsupported")
        prompt = body.prompt[0] if isinstance(body.prompt, list) and body.prompt and \
            isinstance(body.prompt[0], str) else body.prompt
        ids = await tokenize(lambda: llm.tokenizer.encode(prompt), "prompt") if isinstance(prompt, str) else prompt
        return await serve(body, request, ids, body.max_tokens, chat=False)

    async def tokenize(encode, param: str) -> list[int]:
        """Text to token ids in a worker thread: a long prompt never stalls the event loop."""
        try:
            return await asyncio.to_thread(encode)
        except ValueError as e:  # text the tokenizer or the chat template refuses
            raise APIError.of(e, param) from None

    @app.get("/v1/sessions/{session_id}")
    async def session_info(session_id: str, request: Request):
        return await asyncio.to_thread(engine.describe_session, (request.state.key_id, session_id))

    @app.delete("/v1/sessions/{session_id}")
    async def end_session(session_id: str, request: Request):
        if not await asyncio.to_thread(engine.close_session, (request.state.key_id, session_id)):
            raise APIError(404, f"no open session {session_id[:128]!r}", "session_id", "session_not_found")
        return {"id": session_id, "object": "session", "deleted": True}

    async def serve(body: Body, request: Request, ids: list[int] | None, max_tokens: int | None, chat: bool,
                    session: tuple[str, list[dict]] | None = None):
        arrival = time.perf_counter()
        if body.model not in (None, model_name):
            raise APIError(404, f"model {body.model!r} is not served here; GET /v1/models lists {model_name!r}",
                           "model", "model_not_found")
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
            max_tokens = 1 if fill else max(min(llm.room_for(len(ids), snapkv), 2**31 - 1), 1)
        params = body.sampling_params(max_tokens)
        turn = None
        if session is not None:
            owner = request.state.key_id
            quota = owner or (request.client.host if request.client else "")
            turn = ((owner, session[0]), quota, session[1], fill)
        try:
            rid, outputs, prompt_tokens = await engine.submit(ids, params, snapkv, turn, body.return_kept)
        except QueueFull:
            raise APIError(429, f"too many requests are waiting ({limits.max_waiting}); retry later", None,
                           "queue_full", {"retry-after": "1"}) from None
        except ValueError as e:  # the engine refuses it: the type says why (engine.errors)
            raise APIError.of(e, "messages" if chat else "prompt") from None
        metrics.prompt_tokens.inc(prompt_tokens)
        session_id = session[0] if session else None
        reply = Reply(chat, model_name, rid, prompt_tokens, arrival, metrics, body.return_kept, session_id)
        headers = {"x-session-id": session_id} if session_id else None
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventStream(relay_stream(rid, outputs, reply, include_usage), media_type="text/event-stream",
                               headers=headers)
        answer = await relay_whole(rid, outputs, reply, request)
        return answer if isinstance(answer, Response) else JSONResponse(answer, headers=headers)

    async def relay_stream(rid: str, outputs: asyncio.Queue, reply: Reply, include_usage: bool):
        done = False
        try:
            yield sse(reply.chunk({"role": "assistant", "content": ""} if reply.chat else "", None))
            while True:
                out: RequestOutput | APIError = await outputs.get()
                if isinstance(out, APIError) or out.finish_reason == "error":
                    done = True
                    error = out if isinstance(out, APIError) else \
                        APIError(500, out.error or "the request failed", None, "request_failed")
                    metrics.requests.labels(str(error.status)).inc()
                    yield sse(error.body())
                    break
                reply.took(out)
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

    async def relay_whole(rid: str, outputs: asyncio.Queue, reply: Reply, request: Request) -> dict | Response:
        watcher = asyncio.ensure_future(disconnected(request))
        getter = None
        try:
            while True:
                getter = asyncio.ensure_future(outputs.get())
                await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():  # the client went away: nobody waits for the answer
                    engine.abort(rid)
                    metrics.requests.labels("499").inc()
                    return Response(status_code=499)
                out: RequestOutput | APIError = getter.result()
                getter = None
                if isinstance(out, APIError):
                    raise out
                reply.took(out)
                if out.finished:
                    break
        except asyncio.CancelledError:
            engine.abort(rid)
            metrics.requests.labels("499").inc()
            raise
        finally:
            watcher.cancel()
            if getter is not None:
                getter.cancel()
        if out.finish_reason == "error":
            raise APIError(500, out.error or "the request failed", None, "request_failed")
        await reply.take_kept(out, llm.tokenizer)
        metrics.requests.labels("200").inc()
        return reply.whole(out)

    return app
