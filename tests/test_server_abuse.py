"""snapkv-serve against what a careless or hostile client can send: a real server process on the loopback, a
tiny random model with SmolLM2's vocabulary and chat template (fast, so the limits are what is measured).

One test per defect found when the server was probed (issue 27), each reproducing it first: a session slot
leaked by text the tokenizer cannot take, a session deleted during its turn, a non-streamed client that leaves,
huge bodies and tokenization on the event loop, unbounded stop lists and numbers, max_sessions = max_batch_size,
a forged session marker; then the weaknesses: session owners, API-key coverage, the Host header, slow clients.
The last test checks that after all of it a normal request is answered exactly and no slot or session leaked.
"""

from __future__ import annotations

import json
import select
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from engine import LLM, SamplingParams
from tests.conftest import tiny_model_dir
from tests.test_server import Server, wait_for

KEYS = ("key-one", "key-two")
SLOTS, SESSIONS, PER_KEY = 4, 3, 2
TINY = dict(vocab_size=49152, max_position_embeddings=8192)
MAX_BODY = 3_000_000


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("abuse") / "tiny", **TINY)


@pytest.fixture(scope="module")
def srv(tiny):
    s = Server("--max-batch-size", str(SLOTS), "--max-sessions", str(SESSIONS), "--max-sessions-per-key",
               str(PER_KEY), "--max-kv-len", "8000", "--api-key", KEYS[0], "--api-key", KEYS[1],
               "--max-request-bytes", str(MAX_BODY), "--read-timeout", "2", "--limit-concurrency", "40",
               model=tiny)
    yield s
    s.stop()


def call(srv, method: str, path: str, body=None, key: str | None = KEYS[0], headers: dict | None = None,
         timeout: float = 60):
    """(status, headers, parsed JSON or text) of one request."""
    data = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
    h = {"content-type": "application/json"} | ({"authorization": f"Bearer {key}"} if key else {}) | (headers or {})
    request = urllib.request.Request(srv.base + path, data=data, method=method, headers=h)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, head, text = r.status, dict(r.headers), r.read().decode()
    except urllib.error.HTTPError as e:
        status, head, text = e.code, dict(e.headers), e.read().decode()
    try:
        return status, head, json.loads(text)
    except ValueError:
        return status, head, text


def assert_error(response, status: int, param=None, *words: str, code: str | None = None):
    got, _, body = response
    assert got == status and isinstance(body, dict), response
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, body
    assert error["type"] == {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                             409: "conflict_error", 429: "rate_limit_error"}.get(status, "invalid_request_error")
    assert error["param"] == param, body
    assert code is None or error["code"] == code, body
    for word in words:
        assert word in error["message"], body


def turn(srv, session_id, *contents, key=KEYS[0], **extra):
    roles = ["user", "assistant"] * len(contents)
    messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
    body = {"messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True} | extra
    if session_id is not None:
        body["session_id"] = session_id
    return call(srv, "POST", "/v1/chat/completions", body, key=key)


def raw(srv, request: bytes, timeout: float = 10) -> bytes:
    """Send bytes as they are (duplicate headers, a forged Host) and read the whole answer."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def slots_free(srv) -> float:
    return srv.metric("snapkv_cache_slots_free")


def test_text_the_tokenizer_cannot_take_is_a_400_and_leaks_no_slot(srv):
    """Defect 1: a lone surrogate (a JSON escape) crashed the tokenizer after a session had reserved its slot,
    which then never came back; 8 such requests disabled the server."""
    body = b'{"messages":[{"role":"user","content":"a\\ud800"}],"max_tokens":4,"session_id":"leak%d"}'
    for i in range(2 * SLOTS):
        assert_error(call(srv, "POST", "/v1/chat/completions", body.replace(b"%d", str(i).encode())), 400,
                     "messages.0.content", "lone surrogate")
    assert_error(call(srv, "POST", "/v1/chat/completions", body.replace(b',"session_id":"leak%d"', b"")), 400,
                 "messages.0.content", "lone surrogate")
    assert_error(call(srv, "POST", "/v1/completions", b'{"prompt":"x\\udfff y","max_tokens":2}'), 400, "prompt",
                 "lone surrogate")
    assert_error(call(srv, "POST", "/v1/completions", b'{"prompt":"x","stop":["\\ud800"]}'), 400, "stop.0")
    wait_for(lambda: slots_free(srv) == SLOTS and srv.metric("snapkv_cache_slots_sessions") == 0)
    assert turn(srv, "after-leak", "Hello.")[0] == 200  # a session still opens
    assert call(srv, "DELETE", "/v1/sessions/after-leak")[0] == 200


def test_whatever_fails_after_a_session_takes_a_slot_gives_it_back(tiny, monkeypatch):
    """The rule behind defect 1, in process: between reserving a slot and queueing the turn, any exception (not
    only a ValueError) releases the slot and registers nothing."""
    from server.schema import APIError
    from server.sessions import Sessions

    llm = LLM(tiny, max_batch_size=2)
    sessions = Sessions(llm, max_sessions=1, per_key=1, ttl=60)
    params = SamplingParams(max_tokens=2)

    def broken(*args, **kwargs):
        raise TypeError("TextInputSequence must be str")

    monkeypatch.setattr(llm.tokenizer, "encode", broken)
    for _ in range(3):
        with pytest.raises(TypeError):
            sessions.turn((None, "s"), "me", [{"role": "user", "content": "hi"}], False, None, params, "r")
        assert (llm.scheduler.reserved, len(llm.scheduler.free_slots), sessions.open) == (0, 2, {})
    monkeypatch.undo()
    monkeypatch.setattr("sessions.session.ChatSession.begin_with", broken)  # after the slot was reserved
    with pytest.raises(TypeError):
        sessions.turn((None, "s"), "me", [{"role": "user", "content": "hi"}], False, None, params, "r")
    assert (llm.scheduler.reserved, len(llm.scheduler.free_slots), sessions.open) == (0, 2, {})
    monkeypatch.undo()
    with pytest.raises(APIError, match="do not extend"):  # a registered session refuses a wrong history...
        sessions.turn((None, "s"), "me", [{"role": "user", "content": "hi"}], False, None, params, "r1")
        llm.step()
        sessions.turn((None, "s"), "me", [{"role": "user", "content": "other"}] * 3, False, None, params, "r2")
    assert llm.scheduler.reserved == 1 and len(sessions.open) == 1  # ...and keeps its slot


def stream_lines(srv, body: dict, key=KEYS[0]):
    request = urllib.request.Request(srv.base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                     method="POST", headers={"content-type": "application/json",
                                                             "authorization": f"Bearer {key}"})
    response = urllib.request.urlopen(request, timeout=30)
    return response, (line.decode().strip() for line in response if line.strip())


def test_deleting_a_session_during_its_turn_ends_that_turn(srv):
    """Defect 2: DELETE during a turn left its client hanging with no bytes, no error and no [DONE]."""
    long_turn = {"messages": [{"role": "user", "content": "Count."}], "max_tokens": 7000, "ignore_eos": True,
                 "session_id": "doomed", "stream": True}
    response, lines = stream_lines(srv, long_turn)
    with response:
        assert json.loads(next(lines)[6:])["choices"][0]["delta"]["role"] == "assistant"
        started = time.monotonic()
        assert call(srv, "DELETE", "/v1/sessions/doomed")[0] == 200
        rest = list(lines)
    assert time.monotonic() - started < 5
    assert rest[-1] == "data: [DONE]"
    error = json.loads(rest[-2][6:])["error"]
    assert error["code"] == "session_closed" and "was closed" in error["message"]
    # not streamed: the turn's client gets a 409 body at once
    done = {}
    worker = threading.Thread(target=lambda: done.update(r=turn(srv, "doomed2", "Count.", max_tokens=7000)))
    worker.start()
    wait_for(lambda: srv.metric("snapkv_requests_running") == 1)
    started = time.monotonic()
    assert call(srv, "DELETE", "/v1/sessions/doomed2")[0] == 200
    worker.join(timeout=10)
    assert time.monotonic() - started < 5
    assert_error(done["r"], 409, None, "was closed", code="session_closed")
    wait_for(lambda: slots_free(srv) == SLOTS)


def test_a_whole_request_stops_when_its_client_leaves(srv):
    """Defect 3: a non-streamed request ran all its tokens after its client had gone (checked only after 1 s
    without output); now a watcher aborts it at once."""
    before = srv.metric("snapkv_requests_total", status="499")
    body = json.dumps({"prompt": "Count:", "max_tokens": 7000, "ignore_eos": True}).encode()
    s = socket.create_connection(("127.0.0.1", srv.port))
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
              b"authorization: Bearer key-one\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    wait_for(lambda: srv.metric("snapkv_requests_running") == 1)
    generated = srv.metric("snapkv_generation_tokens_total")
    s.close()
    left = time.monotonic()
    wait_for(lambda: srv.metric("snapkv_requests_running") == 0, seconds=3)
    assert time.monotonic() - left < 2
    assert srv.metric("snapkv_requests_total", status="499") == before + 1
    assert srv.metric("snapkv_generation_tokens_total") - generated < 3000  # far from its 7,000 tokens


def test_bodies_are_bounded_and_tokenized_off_the_event_loop(srv):
    """Defect 4: a 10 MB message took 11 s to refuse while /health and every stream stalled."""
    # over the limit: refused from Content-Length alone, before a byte of the body is sent
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nauthorization: Bearer key-one\r\n"
                  b"content-type: application/json\r\ncontent-length: %d\r\n\r\n" % (MAX_BODY + 1))
        answer = b""
        while b"}}" not in answer:
            answer += s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and b"--max-request-bytes" in answer
    # no Content-Length (chunked): cut off as the bytes pass the limit
    chunk = b"x" * 500_000
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nauthorization: Bearer key-one\r\n"
                  b"transfer-encoding: chunked\r\n\r\n")
        for sent in range(1, 20):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            if select.select([s], [], [], 0.3)[0]:
                break
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 413") and sent * len(chunk) > MAX_BODY >= (sent - 1) * len(chunk)
    # just under the limit: tokenized in a thread while /health and a running stream go on
    response, lines = stream_lines(srv, {"messages": [{"role": "user", "content": "Go."}], "max_tokens": 7000,
                                         "ignore_eos": True, "stream": True})
    with response:
        next(lines)
        big = {"messages": [{"role": "user", "content": "lorem ipsum dolor sit amet " * 105_000}], "max_tokens": 2}
        result, gaps, health = {}, [], []
        worker = threading.Thread(target=lambda: result.update(r=call(srv, "POST", "/v1/chat/completions", big)))
        worker.start()
        last = time.monotonic()
        while worker.is_alive():
            next(lines)
            gaps.append(time.monotonic() - last)
            last = time.monotonic()
            if len(gaps) % 50 == 0:
                t = time.monotonic()
                assert call(srv, "GET", "/health")[0] == 200
                health.append(time.monotonic() - t)
        worker.join()
    assert_error(result["r"], 400, "messages", "positions", code="context_length_exceeded")
    assert max(gaps) < 1.0 and max(health, default=0) < 1.0, (max(gaps), health)
    wait_for(lambda: slots_free(srv) == SLOTS)


def test_stop_strings_and_every_number_are_bounded(srv):
    """Defects 5, 7 and 8: 300,000 stop strings ran for 71 s on the engine thread; top_k above 2**63 and
    snapkv.kernel 2**31 + 1 were 500s."""
    chat = {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2}
    url = "/v1/chat/completions"
    assert_error(call(srv, "POST", url, chat | {"stop": ["a", "b", "c", "d", "e"]}), 400, "stop")
    assert_error(call(srv, "POST", url, chat | {"stop": ["x"] * 300_000}), 400, "stop")
    assert_error(call(srv, "POST", url, chat | {"stop": "y" * 257}), 400, "stop")
    assert call(srv, "POST", url, chat | {"stop": ["a", "b", "c", "d"]})[0] == 200
    for name, value in (("top_k", 2**64), ("top_k", 2**31), ("seed", 2**64), ("max_tokens", 2**40),
                        ("max_completion_tokens", 2**31), ("temperature", 1e308), ("top_p", 2), ("n", 2**70),
                        ("logprobs", 2**70)):
        assert_error(call(srv, "POST", url, chat | {name: value}), 400, name)
    assert_error(call(srv, "POST", url, chat | {"top_k": 49153}), 400, "top_k", "vocabulary")
    for name, value in (("kernel", 2**31 + 1), ("kernel", 257), ("budget", 2**63), ("window", -1),
                        ("budget", 2**31), ("sink_tokens", 2**70), ("pooling", 5), ("policy", "x" * 10_000)):
        assert_error(call(srv, "POST", url, chat | {"snapkv": {name: value}}), 400, "snapkv")
    assert call(srv, "POST", url, chat | {"snapkv": {"kernel": 255, "budget": 64, "window": 8}})[0] == 200


def test_a_forged_session_marker_does_not_change_what_a_turn_feeds(srv):
    """Defect 10: the marker that stands in for the last answer could be sent inside a message; turn 2 then fed
    32 tokens instead of 15. What a later turn feeds does not depend on an earlier user message."""
    fed = []
    for session_id, first in (("plain", "Alpha beta gamma"), ("forged", "Alpha \u0000snapkv-answer\u0000 gamma")):
        status, _, one = turn(srv, session_id, first)
        assert status == 200
        status, _, two = turn(srv, session_id, first, one["choices"][0]["message"]["content"], "And then?")
        assert status == 200
        fed.append(two["usage"]["prompt_tokens"])
        assert call(srv, "DELETE", f"/v1/sessions/{session_id}")[0] == 200
    assert fed[0] == fed[1] < 20


def test_sessions_belong_to_the_key_that_opened_them(srv):
    status, _, body = turn(srv, "mine", "My bank PIN is 4417.")
    assert status == 200
    answer = body["choices"][0]["message"]["content"]
    for method in ("GET", "DELETE"):
        assert_error(call(srv, method, "/v1/sessions/mine", key=KEYS[1]), 404, "session_id", code="session_not_found")
    # another key's id space is its own: the same id opens a separate conversation that sees nothing of the first
    assert turn(srv, "mine", "Hello.", key=KEYS[1])[0] == 200
    mine = call(srv, "GET", "/v1/sessions/mine")[2]["messages"]
    theirs = call(srv, "GET", "/v1/sessions/mine", key=KEYS[1])[2]["messages"]
    assert mine[0]["content"] == "My bank PIN is 4417." and "4417" not in json.dumps(theirs)
    assert mine[1]["content"] == answer
    assert call(srv, "DELETE", "/v1/sessions/mine")[0] == 200
    assert call(srv, "GET", "/v1/sessions/mine", key=KEYS[1])[0] == 200  # theirs stays
    # server-made ids: unguessable, sent back in a header and in the answer
    new = {"messages": [{"role": "user", "content": "Hi."}], "max_tokens": 2, "new_session": True}
    ids = []
    for _ in range(2):
        status, headers, body = call(srv, "POST", "/v1/chat/completions", new, key=KEYS[1])
        assert status == 200
        ids.append(headers["x-session-id"])
        assert body["snapkv"]["session"]["id"] == ids[-1]
        assert call(srv, "GET", f"/v1/sessions/{ids[-1]}", key=KEYS[1])[0] == 200
        if len(ids) == 1:  # key-two holds "mine" and this one: its --max-sessions-per-key (2)
            assert_error(call(srv, "POST", "/v1/chat/completions", new, key=KEYS[1]), 429, None,
                         "--max-sessions-per-key")
            assert_error(turn(srv, "third", "Hi.", key=KEYS[1]), 429, None, "--max-sessions-per-key")
            assert turn(srv, "other", "Hi.")[0] == 200  # key-one may: 3 open, the most this server keeps
            assert_error(turn(srv, "another", "Hi."), 429, None, "3 sessions are open", "(--max-sessions)")
            for session_id, key in ((ids[0], KEYS[1]), ("other", KEYS[0])):
                assert call(srv, "DELETE", f"/v1/sessions/{session_id}", key=key)[0] == 200
    assert ids[0] != ids[1] and all(i.startswith("sess-") and len(i) >= 36 for i in ids)
    for session_id in ("mine", ids[1]):
        assert call(srv, "DELETE", f"/v1/sessions/{session_id}", key=KEYS[1])[0] == 200
    wait_for(lambda: slots_free(srv) == SLOTS)


def test_every_path_but_health_and_the_page_needs_a_key(srv):
    for path in ("/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/sessions/x"):
        assert_error(call(srv, "GET", path, key=None), 401, None, "API key")
        assert_error(call(srv, "GET", path, key="key-three"), 401, None, "API key")
    for path in ("/metrics", "/openapi.json", "/v1/models"):
        assert call(srv, "GET", path, key=KEYS[1])[0] == 200
    for path in ("/health", "/", "/web/page.js"):
        assert call(srv, "GET", path, key=None)[0] == 200
    twice = raw(srv, b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\nauthorization: Bearer key-one\r\n"
                     b"authorization: Bearer key-two\r\nconnection: close\r\n\r\n")
    assert twice.startswith(b"HTTP/1.1 400") and b"one Authorization header" in twice


def test_only_the_bound_host_names_are_answered(srv):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 sends Host: evil.example."""
    for host, status in ((b"evil.example", b"403"), (b"evil.example:%d" % srv.port, b"403"),
                         (b"localhost:%d" % srv.port, b"200"), (b"127.0.0.1", b"200"), (b"[::1]:1", b"200")):
        answer = raw(srv, b"GET /health HTTP/1.1\r\nHost: %s\r\nconnection: close\r\n\r\n" % host)
        assert answer.startswith(b"HTTP/1.1 " + status), (host, answer[:200])
    assert b"invalid_host" in raw(srv, b"GET /health HTTP/1.1\r\nHost: evil.example\r\nconnection: close\r\n\r\n")


def test_a_method_not_allowed_is_a_client_error(srv):
    assert_error(call(srv, "PUT", "/v1/models", b"{}"), 405, None)


def test_slow_and_idle_clients_are_disconnected(srv):
    """19,985 connections with incomplete headers were held for 60 s: now --read-timeout (2 s here) ends them,
    and past 2 x --limit-concurrency (80 here) new connections are closed at once."""
    slow = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(30)]
    for s in slow:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: local")  # and nothing more
    flood = [socket.create_connection(("127.0.0.1", srv.port)) for _ in range(80)]
    time.sleep(0.5)
    closed_at_once = 0
    for s in select.select(flood, [], [], 0)[0]:  # well before the 2 s header deadline
        try:
            closed_at_once += s.recv(1) == b""
        except ConnectionResetError:
            closed_at_once += 1
    assert closed_at_once >= 25  # 110 opened, at most 80 kept
    started = time.monotonic()
    for s in slow:
        s.settimeout(10)
        assert s.recv(1) == b""  # the server hung up
    assert time.monotonic() - started < 4
    for s in slow + flood:
        s.close()
    wait_for(lambda: call(srv, "GET", "/health")[0] == 200)


def test_what_held_already_stays_held(srv):
    """Found sound in the probe, kept tested: only the page's own files are served (no traversal), and one
    session driven by two clients at once gets one answer and one 409."""
    for path in ("/web/..%2fREADME.md", "/web/%2e%2e%2fserver%2fapp.py", "/web/../README.md", "/web/__init__.py",
                 "/web/.%2e/pyproject.toml", "/web/page.js%00.txt", "/web//etc/passwd", "/web/%2Fetc%2Fpasswd"):
        status = raw(srv, b"GET %s HTTP/1.1\r\nHost: localhost\r\nconnection: close\r\n\r\n" % path.encode())
        assert status.split(b" ")[1] == b"404", (path, status[:100])
    results = []
    threads = [threading.Thread(target=lambda: results.append(turn(srv, "shared", "Count.", max_tokens=2000)[0]))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [200, 409]
    assert call(srv, "DELETE", "/v1/sessions/shared")[0] == 200


def test_after_all_of_it_the_answer_is_exact_and_nothing_leaked(srv, tiny):
    """A normal request gets exactly the library's greedy tokens, and every slot is free again."""
    want = LLM(tiny, max_batch_size=1).generate(["The sea"], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    status, _, body = call(srv, "POST", "/v1/completions", {"prompt": "The sea", "max_tokens": 12, "temperature": 0,
                                                            "ignore_eos": True})
    assert status == 200 and body["choices"][0]["text"] == want.text
    wait_for(lambda: srv.metric("snapkv_requests_running") == 0)
    assert (slots_free(srv), srv.metric("snapkv_cache_slots_sessions"), srv.metric("snapkv_sessions_open"),
            srv.metric("snapkv_requests_waiting")) == (SLOTS, 0, 0, 0)
    assert srv.metric("snapkv_requests_total", status="500") == 0
