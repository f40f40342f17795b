"""A seeded fuzz of snapkv-serve: a few hundred random mutations of valid requests (types, sizes, unicode,
nesting, numbers at their limits, broken JSON and bytes) against a real server process on a tiny model. Every
answer must be a 2xx or an OpenAI-shaped 4xx, never a 5xx or a hang, and at the end the server is healthy with
every slot free and no conversation left open."""

from __future__ import annotations

import copy
import json
import random
import urllib.error
import urllib.parse
import urllib.request

import pytest

from tests.conftest import tiny_model_dir
from tests.test_server import Server, wait_for

SEED, REQUESTS, SLOTS = 20261205, 400, 4
BASES = [
    ("POST", "/v1/chat/completions", {"messages": [{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": "Hello there."}],
                                      "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 20, "seed": 3,
                                      "stop": ["\n\n"]}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                      "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True},
                                      "snapkv": {"budget": 32, "window": 4, "kernel": 5, "pooling": "max"}}),
    ("POST", "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0,
                                 "snapkv": False, "ignore_eos": True}),
    ("POST", "/v1/completions", {"prompt": [1, 2, 3, 4, 5], "max_tokens": 3, "stream": True, "return_kept": True}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
                                      "session_id": "fz-0"}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hey"}], "max_tokens": 2,
                                      "new_session": True}),
]
JUNK = [None, True, False, 0, -1, 1, 2, 255, 2**31 - 1, 2**31, 2**63, 2**64, -2**63, 10**30, 1.5, -0.0, 1e308,
        float("inf"), float("nan"), "", "x", "\ud800", "a\udfffb", "\x00snapkv-answer\x00", "é" * 3000,
        "<script>alert(1)</script>", "../../etc/passwd", [], [1], [[]], ["a"] * 9, {}, {"a": 1},
        {"role": "user", "content": "hi"}, {"type": "text", "text": "x"}, {"budget": 2**40}, "fz-1", "fz-2"]


def junk(rng: random.Random):
    return copy.deepcopy(rng.choice(JUNK))


def paths(value, prefix=()):
    """Every (path) inside a JSON value, the value itself first."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, prefix + (i,))


def mutate(rng: random.Random, body):
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 2)):
        path = rng.choice(list(paths(body))[1:] or [()])
        parent = body
        for part in path[:-1]:
            parent = parent[part]
        action = rng.random()
        if not path:
            body = junk(rng)
        elif action < 0.6:
            parent[path[-1]] = junk(rng)
        elif action < 0.75 and isinstance(parent, dict):
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[rng.choice(["extra", "n", "logprobs", "echo", "model", "session_id", "return_kept",
                               "max_completion_tokens", "budget", "window", "sink_tokens", "policy"])] = \
                junk(rng)
        else:
            parent.append(junk(rng))
        if not isinstance(body, (dict, list)):
            break
    return body


def encode(rng: random.Random, body) -> bytes:
    """The body as bytes, now and then broken on purpose."""
    text = json.dumps(body)  # lone surrogates stay \\ud800 escapes, as a JSON client would send them
    roll = rng.random()
    if roll < 0.05:
        return text[: rng.randrange(len(text) + 1)].encode()
    if roll < 0.08:
        return ("[" * 5000 + "]" * 5000 if rng.random() < 0.5 else '{"a":' * 3000 + "1" + "}" * 3000).encode()
    if roll < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    return text.encode()


def send(srv, method: str, path: str, data: bytes | None):
    request = urllib.request.Request(srv.base + path, data=data, method=method,
                                     headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read().decode()


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    tiny = tiny_model_dir(tmp_path_factory.mktemp("fuzz") / "tiny", vocab_size=49152, max_position_embeddings=1024)
    s = Server("--max-batch-size", str(SLOTS), "--max-sessions", "3", "--max-sessions-per-key", "3",
               "--budget", "64", "--window", "8", "--max-kv-len", "200", model=tiny)
    yield s
    s.stop()


def test_random_mutations_get_a_2xx_or_a_4xx_and_leak_nothing(srv):
    rng = random.Random(SEED)
    sessions, statuses = {"fz-0", "fz-1", "fz-2"}, {}
    for i in range(REQUESTS):
        method, path, base = rng.choice(BASES)
        if rng.random() < 0.05:
            method, path, body = rng.choice([("GET", "/v1/sessions/fz-0"), ("DELETE", "/v1/sessions/fz-1"),
                                             ("GET", "/v1/sessions/%00"), ("PUT", "/v1/completions"),
                                             ("GET", "/v1/chat/completions")]) + (None,)
            data = None
        else:
            body = mutate(rng, base) if rng.random() < 0.75 else base
            data = encode(rng, body)
        if isinstance(body, dict) and isinstance(body.get("session_id"), str):
            sessions.add(body["session_id"])
        status, headers, text = send(srv, method, path, data)
        statuses[status] = statuses.get(status, 0) + 1
        where = f"request {i}: {method} {path} {data[:300] if data else data!r} -> {status} {text[:300]}"
        assert status < 500, where
        if "x-session-id" in headers:
            sessions.add(headers["x-session-id"])
        if status >= 400:
            error = json.loads(text)["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], where
            assert error["type"] in ("invalid_request_error", "not_found_error", "conflict_error",
                                     "rate_limit_error"), where
        elif "text/event-stream" in headers.get("content-type", ""):
            assert text.rstrip().endswith("data: [DONE]"), where
        else:
            json.loads(text)
    assert statuses.get(200, 0) > REQUESTS // 4 and statuses.get(400, 0) > REQUESTS // 4, statuses
    for session_id in sessions:
        send(srv, "DELETE", "/v1/sessions/" + urllib.parse.quote(session_id, safe=""), None)
    wait_for(lambda: (srv.metric("snapkv_requests_running"), srv.metric("snapkv_requests_waiting"),
                      srv.metric("snapkv_cache_slots_free"), srv.metric("snapkv_sessions_open")) == (0, 0, SLOTS, 0),
             seconds=30)
    assert send(srv, "GET", "/health", None)[:1] == (200,)
