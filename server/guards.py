"""What stands between the network and the routes: the Host header check (against DNS rebinding), the API keys,
the request body's size and read time, and at the connection level a deadline for a request's headers and a cap
on open connections (so slow or idle clients cannot hold the server's file descriptors)."""

from __future__ import annotations

import hashlib
import hmac

import anyio
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.schema import APIError

OPEN_PATHS = ("/health", "/")  # and the page's files under /web/: they hold no data
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def key_id(key: str) -> str:
    """A key's short public name: sessions and limits are kept per key without holding the key itself."""
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def default_allowed_hosts(host: str) -> list[str] | None:
    """The Host header values a server bound to `host` accepts by default: on a loopback address only loopback
    names (a web page cannot reach it through a DNS name of its own), on a named address that name too, on every
    interface any (None)."""
    if host in ("0.0.0.0", "::", ""):
        return None
    return sorted({*LOOPBACK_NAMES, host.strip("[]")}) if host not in LOOPBACK_NAMES else list(LOOPBACK_NAMES)


def host_name(header: bytes) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    text = header.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class Guard:
    """ASGI middleware in front of the app. For every HTTP request: the Host header must name this server (403);
    with API keys, every path but /health and the page needs exactly one 'Authorization: Bearer KEY' with a known
    key (401; two such headers: 400), compared in constant time; the body must be at most `max_body` bytes (413,
    refused from Content-Length before reading where it is sent) and arrive within `read_timeout` seconds (408).
    The body is read here, whole, before the app sees it; the key's id goes into the request's state."""

    def __init__(self, app, keys: list[str], allowed_hosts: list[str] | None, max_body: int, read_timeout: float,
                 on_refusal=lambda status: None):
        self.app, self.max_body, self.read_timeout, self.on_refusal = app, max_body, read_timeout, on_refusal
        self.keys = [(f"Bearer {k}".encode(), key_id(k)) for k in keys]
        self.allowed = None if allowed_hosts is None or "*" in allowed_hosts else \
            {h.lower().strip("[]") for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        try:
            owner = self.check_headers(scope)
            body = await self.read_body(scope, receive)
        except APIError as error:
            self.on_refusal(error.status)
            return await error.response()(scope, receive, send)
        scope.setdefault("state", {})["key_id"] = owner
        await self.app(scope, replay(body, receive), send)

    def check_headers(self, scope) -> str | None:
        headers = scope["headers"]
        hosts = [value for name, value in headers if name == b"host"]
        if self.allowed is not None and (len(hosts) != 1 or host_name(hosts[0]) not in self.allowed):
            raise APIError(403, "this server does not answer to that Host header; start it with --allowed-hosts "
                           "to add a name", None, "invalid_host")
        if not self.keys:
            return None
        given = [value for name, value in headers if name == b"authorization"]
        path = scope["path"]
        if len(given) > 1:
            raise APIError(400, "send one Authorization header, not several", None, "invalid_api_key")
        if path in OPEN_PATHS or path.startswith("/web/"):
            return None
        found = None
        for expected, name in self.keys:  # every key is compared, so the time does not tell which one matched
            if hmac.compare_digest(given[0] if given else b"", expected):
                found = name
        if found is None:
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'", None,
                           "invalid_api_key")
        return found

    async def read_body(self, scope, receive) -> list[dict]:
        """The body's messages (at most max_body bytes), read within read_timeout."""
        lengths = [value for name, value in scope["headers"] if name == b"content-length"]
        if lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                raise APIError(400, "the Content-Length header is not one number", None, "invalid_request")
            if int(lengths[0]) > self.max_body:
                raise self.too_large(int(lengths[0]))
        messages, size = [], 0
        try:
            with anyio.fail_after(self.read_timeout):
                while True:
                    message = await receive()
                    messages.append(message)
                    if message["type"] != "http.request":
                        return messages
                    size += len(message.get("body", b""))
                    if size > self.max_body:
                        raise self.too_large(size)
                    if not message.get("more_body", False):
                        return messages
        except TimeoutError:
            raise APIError(408, f"the request body did not arrive within {self.read_timeout:g} s", None,
                           "request_timeout") from None

    def too_large(self, size: int) -> APIError:
        return APIError(413, f"the request body has {'at least ' if size <= self.max_body else ''}{size} bytes; this "
                        f"server takes at most {self.max_body} (--max-request-bytes)", None, "request_too_large")


def replay(messages: list[dict], receive):
    """A receive() that hands out the body read already, then waits on the real one (for a disconnect)."""
    pending = list(messages)

    async def next_message():
        return pending.pop(0) if pending else await receive()

    return next_message


class GuardedH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with two limits it lacks: a connection must send a request's headers within
    `header_timeout` seconds of opening (or of its previous response), and past `max_connections` open
    connections a new one is closed at once. `guarded_protocol` makes one with chosen limits."""

    header_timeout = 10.0
    max_connections = 1024
    _deadline = None
    _armed_for = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            self.connections.discard(self)
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.cycle
        self._deadline = self.loop.call_later(self.header_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        idle = self.cycle is None or self.cycle.response_complete  # no request is being answered
        if self.cycle is self._armed_for and idle and not self.transport.is_closing():
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not self._armed_for:  # a request's headers arrived
            self._disarm()
            self._armed_for = self.cycle

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def guarded_protocol(header_timeout: float, max_connections: int) -> type[GuardedH11]:
    return type("GuardedH11", (GuardedH11,), {"header_timeout": header_timeout, "max_connections": max_connections})
