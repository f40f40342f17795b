"""snapkv-serve: the command that loads the model and runs the app under uvicorn, with every limit as a flag."""

from __future__ import annotations

import logging
import socket
from typing import Optional

import typer

from engine.kv_cache import format_bytes
from options import EngineFlags, UserError, engine_options, run_app
from server.app import Limits, create_app
from server.guards import default_allowed_hosts, guarded_protocol
from server.schema import SNAPKV_FIELDS
from snapkv.config import SnapKVConfig

log = logging.getLogger("snapkv.serve")

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Serve a model over an OpenAI-compatible HTTP API, its KV cache compressed by SnapKV.")


@app.command(help="Serve /v1/chat/completions (with conversations by session_id), /v1/completions, /v1/models, "
             "/v1/sessions/{id}, /health, /metrics, and a chat page at /.")
@engine_options
def serve_command(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    max_batch_size: int = typer.Option(8, "--max-batch-size", help="Cache slots: requests decoded together."),
    max_waiting: int = typer.Option(256, "--max-waiting", help="Requests that may wait for a slot; more get 429."),
    max_sessions: Optional[int] = typer.Option(None, "--max-sessions", help="Conversations (session_id) kept open "
                                               "at once, each holding a cache slot; more get 429. Below "
                                               "--max-batch-size, so one slot always serves one-shot requests.",
                                               show_default="max-batch-size - 1"),
    max_sessions_per_key: Optional[int] = typer.Option(None, "--max-sessions-per-key", help="Conversations one API "
                                                       "key (one client address, without keys) may hold open.",
                                                       show_default="half of --max-sessions, at least 1"),
    session_ttl: float = typer.Option(600.0, "--session-ttl", help="Seconds an idle conversation keeps its slot."),
    api_key: Optional[list[str]] = typer.Option(None, "--api-key", envvar="SNAPKV_API_KEY",
                                                help="Require 'Authorization: Bearer KEY' everywhere but /health and "
                                                "the page; repeat it (or separate keys by commas) for several "
                                                "clients, each seeing only its own sessions."),
    allowed_hosts: Optional[str] = typer.Option(None, "--allowed-hosts", help="Comma-separated Host header names "
                                                "the server answers to ('*': any).",
                                                show_default="loopback names on a loopback --host, any on 0.0.0.0"),
    max_request_bytes: Optional[int] = typer.Option(None, "--max-request-bytes", help="Largest request body; "
                                                    "more gets 413 before it is read.",
                                                    show_default="16 bytes per model position, at least 64 KiB"),
    read_timeout: float = typer.Option(10.0, "--read-timeout", help="Seconds a client has to send a request's "
                                       "headers, and again its body; a slower one is disconnected (408 for a body)."),
    limit_concurrency: int = typer.Option(512, "--limit-concurrency", help="Connections and requests at once: "
                                          "past it new requests get 503, and past twice it new connections are "
                                          "closed at once."),
    timeout_keep_alive: float = typer.Option(5.0, "--timeout-keep-alive", help="Seconds an idle keep-alive "
                                             "connection stays open."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model's name in the API.",
                                                    show_default="the model's file or directory name"),
    shutdown_timeout: float = typer.Option(10.0, "--shutdown-timeout", help="On SIGTERM, seconds running "
                                           "requests get to finish before they are cancelled."),
    engine: EngineFlags = None,
):
    import uvicorn

    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535 (got {port})")
    if max_batch_size < 1:
        raise UserError(f"--max-batch-size must be at least 1 (got {max_batch_size})")
    for flag, value in (("--max-waiting", max_waiting), ("--limit-concurrency", limit_concurrency),
                        ("--max-sessions-per-key", max_sessions_per_key), ("--max-request-bytes", max_request_bytes)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if max_sessions is not None and not 0 <= max_sessions < max_batch_size:
        raise UserError(f"--max-sessions must be in 0..{max_batch_size - 1}, below --max-batch-size, so that "
                            f"one slot always serves one-shot requests (got {max_sessions})")
    for flag, value in (("--session-ttl", session_ttl), ("--read-timeout", read_timeout),
                        ("--timeout-keep-alive", timeout_keep_alive)):
        if not value > 0:
            raise UserError(f"{flag} must be > 0 seconds (got {value})")
    if shutdown_timeout < 0:
        raise UserError(f"--shutdown-timeout must be >= 0 (got {shutdown_timeout})")
    keys = [k.strip() for entry in api_key or [] for k in entry.split(",") if k.strip()]
    hosts = default_allowed_hosts(host) if allowed_hosts is None else \
        [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    model_path = engine.model_path
    check_port_free(host, port)  # before the model loads, so a taken port fails in a second
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    snapkv = engine.snapkv
    log.info("loading %s", model_path)
    llm = engine.build(max_batch_size=max_batch_size)
    name = served_model_name or (model_path.stem if model_path.suffix == ".gguf" else model_path.name)
    cfg = llm.config
    log.info("model %s: %d layers, %d kv heads x %d, %s on %s; max %d positions", name, cfg.num_layers,
             cfg.num_kv_heads, cfg.head_dim, str(llm.dtype).removeprefix("torch."), llm.device, llm.max_model_len)
    log.info("%d slots x %d cache entries: KV cache %s (%s per slot); %s", llm.max_batch_size, llm.max_kv_len,
             format_bytes(llm.runner.cache_bytes), format_bytes(llm.runner.cache_bytes / llm.max_batch_size),
             describe_snapkv(snapkv))
    limits = Limits(keys, max_waiting, max_sessions, max_sessions_per_key, session_ttl, hosts, max_request_bytes,
                    read_timeout)
    app = create_app(llm, name, limits)
    limits = app.state.limits
    log.info("limits: bodies up to %d bytes, %d sessions (%d per %s), %s; Host: %s", limits.max_request_bytes,
             limits.max_sessions, limits.max_sessions_per_key, "API key" if keys else "client address",
             f"{len(keys)} API key(s)" if keys else "no API key", ", ".join(hosts) if hosts else "any")
    if not keys and hosts is None:
        log.warning("listening on every interface with no API key: anyone who can reach %s:%d can use the model "
                    "(--api-key to require one)", host, port)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame):  # SIGTERM/SIGINT: the engine cancels what is left at the deadline
            app.state.engine.drain(shutdown_timeout)
            super().handle_exit(sig, frame)

    # uvicorn's own cancel comes a little after ours, so a cancelled stream still gets its error event
    server = DrainingServer(uvicorn.Config(app, host=host, port=port, log_level="info",
                                           http=guarded_protocol(read_timeout, 2 * limit_concurrency),
                                           limit_concurrency=limit_concurrency, timeout_keep_alive=timeout_keep_alive,
                                           timeout_graceful_shutdown=shutdown_timeout + 5))
    server.run()
    if not server.started:
        raise UserError(f"the server did not start on {host}:{port} (see the log above)")


def check_port_free(host: str, port: int) -> None:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def describe_snapkv(cfg: SnapKVConfig | None) -> str:
    if cfg is None or cfg.policy == "full":
        return "full cache"
    return "SnapKV " + ", ".join(f"{f}={getattr(cfg, f)}" for f in SNAPKV_FIELDS)


def main(argv: list[str] | None = None) -> int:
    return run_app(app, argv)
