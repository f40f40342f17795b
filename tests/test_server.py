"""snapkv-serve as a real process on a real port, driven by the real openai client: outputs equal LLM.generate,
streams equal whole answers, concurrency, every error status, disconnects, and SIGTERM. One in-process server on
a tiny model checks that a request failing inside the engine fails alone."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from engine import LLM, SamplingParams
from snapkv import SnapKVConfig
from tests.conftest import ROOT, tiny_model_dir

SERVE = Path(sys.executable).parent / "snapkv-serve"
QUESTIONS = ["What is the capital of France?", "List the first ten prime numbers.", "Write a haiku about the sea.",
             "Name three colours.", "What is 12 times 12?", "Who wrote Hamlet?", "Describe a cat in one sentence.",
             "What is the boiling point of water?", "Give me a synonym for happy.", "How many legs has a spider?",
             "Translate 'good morning' into French.", "What is the largest planet?", "Say hello politely.",
             "What colour is the sky?", "Name a famous painter.", "Why do leaves fall in autumn?"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args: str, model: Path | None = None):
        self.port = free_port()
        keys = [args[i + 1] for i, a in enumerate(args) if a == "--api-key"]
        self.auth = {"authorization": f"Bearer {keys[0]}"} if keys else {}  # for /metrics
        self.base = f"http://127.0.0.1:{self.port}"
        command = [str(SERVE), "--port", str(self.port), *args] + (["--model", str(model)] if model else [])
        self.log = open(Path(f"/tmp/snapkv-serve-{self.port}.log"), "w+")
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"snapkv-serve exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if http("GET", self.base + "/health")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"snapkv-serve did not come up:\n{self.output()}")
            time.sleep(0.3)

    def client(self, key: str = "none") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0, timeout=300)

    def metric(self, name: str, **labels) -> float:
        want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
        for line in http("GET", self.base + "/metrics", headers=self.auth)[1].splitlines():
            if line.startswith(want + " "):
                return float(line.split()[-1])
        return 0.0

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None):
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"content-type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture(scope="module")
def server(smol_dir):
    s = Server("--max-batch-size", "4", "--max-sessions", "2", "--max-sessions-per-key", "2", "--session-ttl", "6")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def llm(smol_dir):
    return LLM(smol_dir, max_batch_size=8)


def chat(client, question: str, **kwargs):
    kwargs = {"temperature": 0, "max_tokens": 24} | kwargs
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=[{"role": "user",
                                                                                    "content": question}], **kwargs)


def test_models_and_health(server):
    assert http("GET", server.base + "/health") == (200, '{"status":"ok"}')
    models = server.client().models.list().data
    assert [m.id for m in models] == ["SmolLM2-135M-Instruct"]


def test_chat_greedy_equals_generate_and_the_stream_concatenates_to_it(server, llm):
    want = llm.generate(QUESTIONS[0], SamplingParams(max_tokens=24), chat=True)[0]
    whole = chat(server.client(), QUESTIONS[0])
    assert whole.choices[0].message.content == want.text and whole.choices[0].finish_reason == want.finish_reason
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (len(want.prompt_token_ids),
                                                                          len(want.token_ids))
    assert whole.model_extra["snapkv"]["kept_tokens"] == len(want.prompt_token_ids)  # shorter than the budget
    chunks = list(chat(server.client(), QUESTIONS[0], stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == want.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_completions_streamed_and_not(server, llm):
    prompt = "The three primary colours are"
    want = llm.generate(prompt, SamplingParams(max_tokens=16, stop=["\n\n"]))[0]
    client = server.client()
    whole = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=16, temperature=0,
                                      stop=["\n\n"])
    assert whole.choices[0].text == want.text and whole.choices[0].finish_reason == want.finish_reason
    stream = client.completions.create(model="SmolLM2-135M-Instruct", prompt=prompt, max_tokens=16, temperature=0,
                                       stop=["\n\n"], stream=True)
    assert "".join(c.choices[0].text for c in stream) == want.text
    ids = client.completions.create(model="SmolLM2-135M-Instruct", prompt=want.prompt_token_ids, max_tokens=16,
                                    temperature=0, stop=["\n\n"])  # pre-tokenized prompts too
    assert ids.choices[0].text == want.text


def test_seeded_sampling_is_reproducible(server):
    runs = [chat(server.client(), QUESTIONS[2], temperature=0.9, top_p=0.95, seed=7).choices[0].message.content
            for _ in range(2)]
    other = chat(server.client(), QUESTIONS[2], temperature=0.9, top_p=0.95, seed=8).choices[0].message.content
    assert runs[0] == runs[1] != other


def test_snapkv_per_request(server, llm):
    document = (ROOT / "examples" / "long_prompt.txt").read_text()[:3000]
    question = document + "\n\nWhat was the keeper's cat called?"
    cfg = SnapKVConfig(budget=256, window=8, kernel=7)
    ids = llm.encode_prompt(question, chat=True)
    outputs = {}
    rid = llm.add_request(prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=16), snapkv=cfg)
    while llm.has_unfinished():
        outputs.update({o.request_id: o for o in llm.step()})
    want = outputs[rid]
    got = chat(server.client(), question, max_tokens=16,
               extra_body={"snapkv": {"budget": 256, "window": 8, "kernel": 7}})
    assert got.choices[0].message.content == want.text
    assert got.model_extra["snapkv"] == {"prompt_tokens": len(ids), "kept_tokens": 256, "kv_bytes":
                                         want.stats["kv_bytes"], "full_kv_bytes": want.stats["full_kv_bytes"]}
    full = chat(server.client(), question, max_tokens=16, extra_body={"snapkv": False})
    assert full.model_extra["snapkv"]["kept_tokens"] == len(ids) > 256


def test_return_kept_sends_what_each_layer_and_kv_head_kept(server, llm):
    question = (ROOT / "examples" / "long_prompt.txt").read_text()[:1500] + "\n\nWho wrote the report?"
    ids = llm.encode_prompt(question, chat=True)
    rid = llm.add_request(prompt_token_ids=ids, sampling_params=SamplingParams(max_tokens=8), return_kept=True,
                          snapkv=SnapKVConfig(budget=128, window=16))
    outputs = {}
    while llm.has_unfinished():
        outputs.update({o.request_id: o for o in llm.step()})
    want = outputs[rid]
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": 8, "temperature": 0,
            "snapkv": {"budget": 128, "window": 16}, "return_kept": True}
    status, text = http("POST", server.base + "/v1/chat/completions", body)
    assert status == 200, text
    info = json.loads(text)["snapkv"]
    kept = info["kept"]
    assert (kept["token_ids"], kept["completion_token_ids"]) == (ids, want.token_ids)
    assert kept["prompt_tokens"] == len(ids) > 128 and (kept["layers"], kept["kv_heads"]) == (30, 3)
    assert "".join(kept["tokens"]) == llm.tokenizer.decode(ids, skip_special_tokens=False)
    assert (kept["kv_bytes"], kept["full_kv_bytes"]) == (info["kv_bytes"], info["full_kv_bytes"]) == \
        (want.stats["kv_bytes"], want.stats["full_kv_bytes"])
    for layer, heads in zip(want.kept, kept["runs"]):  # the runs expand to exactly the engine's kept positions
        for row, runs in zip(layer, heads):
            assert [p for start, end in runs for p in range(start, end)] == sorted(row[row >= 0].tolist())
            assert sum(end - start for start, end in runs) == 128
    # streamed, the final chunk carries the same object; without the flag there is none
    status, text = http("POST", server.base + "/v1/chat/completions", body | {"stream": True})
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [e["snapkv"]["kept"] for e in events if "snapkv" in e] == [kept]
    assert "kept" not in chat(server.client(), "Hi.", max_tokens=2).model_extra["snapkv"]
    turn = chat(server.client(), "Hi.", max_tokens=2, extra_body={"session_id": "no-kept"})  # records its own
    assert "session" in turn.model_extra["snapkv"] and "kept" not in turn.model_extra["snapkv"]
    assert http("DELETE", server.base + "/v1/sessions/no-kept")[0] == 200
    assert_error(http("POST", server.base + "/v1/chat/completions", body | {"session_id": "kept"}), 400,
                 "return_kept", "session_id")


def test_the_page_and_its_files(server):
    import web

    status, page = http("GET", server.base + "/")
    assert status == 200 and "<title>SnapKV: chat with a document</title>" in page
    for name in ("page.js", "kept_view.js", "page.css", "kept_view.css"):
        assert f'"/web/{name}"' in page and http("GET", f"{server.base}/web/{name}") == (200, web.read(name))
        assert "://" not in web.read(name)  # nothing fetched from another host
    assert "://" not in page
    assert http("GET", server.base + "/web/__init__.py")[0] == 404  # only the page's files are served


def test_sixteen_concurrent_streams_each_get_what_they_get_alone(server, llm):
    params = SamplingParams(max_tokens=12)
    want = [o.text for o in llm.generate(QUESTIONS, params, chat=True)]
    got: dict[int, str] = {}

    def client_thread(i):
        stream = chat(server.client(), QUESTIONS[i], max_tokens=12, stream=True)
        got[i] = "".join(c.choices[0].delta.content or "" for c in stream)

    threads = [threading.Thread(target=client_thread, args=(i,)) for i in range(len(QUESTIONS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert [got.get(i) for i in range(len(QUESTIONS))] == want


DOCUMENT = ("The lighthouse on Gull Point was built in 1871 by the engineer Mara Lind. Its lamp burned whale oil "
            "until 1902, when it was replaced by a kerosene burner. The keeper's cottage has four rooms.")


def test_a_session_carries_its_cache_and_answers_as_the_library_session(server, llm):
    """Three turns by session_id: each answer equals the library's ChatSession (greedy), a later turn feeds only
    its new tokens, and GET /v1/sessions/{id} shows the history."""
    client, params = server.client(), SamplingParams(max_tokens=24)
    questions = (DOCUMENT + "\n\nWho built the lighthouse?", "In which year?", "What did the lamp burn?")
    with llm.chat_session(system="Answer briefly.") as local:  # first, so the server's turns follow each other
        wants = [local.send(question, params) for question in questions]
    messages = [{"role": "system", "content": "Answer briefly."}]
    try:
        for question, want, turn in zip(questions, wants, local.turns):
            messages.append({"role": "user", "content": question})
            got = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                                 max_tokens=24, extra_body={"session_id": "lighthouse"})
            assert got.choices[0].message.content == want.text
            assert got.usage.prompt_tokens == turn["new_tokens"]
            assert got.model_extra["snapkv"]["session"]["conversation_tokens"] == turn["conversation_tokens"]
            messages.append({"role": "assistant", "content": got.choices[0].message.content})
        assert local.turns[-1]["new_tokens"] < 40 < local.conversation_tokens  # only the new turn was fed
        status, body = http("GET", server.base + "/v1/sessions/lighthouse")
        assert status == 200 and json.loads(body)["messages"] == messages
    finally:
        http("DELETE", server.base + "/v1/sessions/lighthouse")


def test_session_errors_limits_and_expiry(server):
    url = server.base + "/v1/chat/completions"

    def turn(session_id, *contents, **extra):
        roles = ["user", "assistant"] * len(contents)
        messages = [{"role": r, "content": c} for r, c in zip(roles, contents)]
        return http("POST", url, {"messages": messages, "max_tokens": 4, "temperature": 0, "session_id": session_id,
                                  **extra})

    status, body = turn("a", "Hello.")
    assert status == 200
    answer = json.loads(body)["choices"][0]["message"]["content"]
    assert_error(turn("a", "Hello.", "something else", "Next?"), 400, "messages", "do not extend session 'a'")
    assert_error(turn("a", "Hello.", answer, "Next?", snapkv={"budget": 64, "window": 8}), 400, "snapkv",
                 "keeps the snapkv settings")
    assert turn("a", "Hello.", answer, "Next?")[0] == 200
    assert turn("b", "Hi.")[0] == 200
    assert_error(turn("c", "Hey."), 429, None, "2 sessions are open")  # --max-sessions 2
    wait_for(lambda: server.metric("snapkv_sessions_open") == 2 and server.metric("snapkv_sessions_kv_bytes") > 0)
    assert http("DELETE", server.base + "/v1/sessions/b")[0] == 200
    assert_error(http("DELETE", server.base + "/v1/sessions/b"), 404, "session_id", "no open session")
    assert turn("c", "Hey.")[0] == 200
    assert chat(server.client(), "Say hello.", max_tokens=4).choices[0].message.content  # one-shot still served
    wait_for(lambda: http("GET", server.base + "/v1/sessions/a")[0] == 404, seconds=30)  # --session-ttl 6
    wait_for(lambda: http("GET", server.base + "/v1/sessions/c")[0] == 404, seconds=30)
    assert turn("d", "Back again.")[0] == 200  # expired sessions gave their slots back
    http("DELETE", server.base + "/v1/sessions/d")


def assert_error(response, status: int, param: str | None, *words: str):
    code, text = response
    error = json.loads(text)["error"]
    assert code == status and set(error) == {"message", "type", "param", "code"}, text
    assert error["param"] == param, text
    for word in words:
        assert word in error["message"], text


def test_bad_requests_get_their_status_and_the_server_keeps_answering(server):
    url = server.base + "/v1/chat/completions"
    user = [{"role": "user", "content": "hi"}]
    assert_error(http("POST", url, b'{"messages": [}'), 400, None, "not valid JSON")
    assert_error(http("POST", url, {"max_tokens": 5}), 400, "messages", "Field required")
    assert_error(http("POST", url, {"messages": user, "temperature": "hot"}), 400, "temperature")
    assert_error(http("POST", url, {"messages": user, "top_p": 1.5}), 400, "top_p")
    assert_error(http("POST", url, {"messages": user, "max_tokens": 0}), 400, "max_tokens")
    assert_error(http("POST", url, {"messages": user, "n": 2}), 400, "n")
    assert_error(http("POST", url, {"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages.0.role")
    assert_error(http("POST", url, {"messages": user, "snapkv": {"budget": 8, "window": 16}}), 400, "snapkv",
                 "budget (8) must be larger than window (16)")
    assert_error(http("POST", url, {"messages": user, "snapkv": {"budjet": 8}}), 400, "snapkv.budjet", "budjet")
    assert_error(http("POST", url, {"messages": user, "model": "gpt-9"}), 404, "model", "gpt-9")
    completions = server.base + "/v1/completions"
    assert_error(http("POST", completions, {"prompt": [5] * 8200, "max_tokens": 1}), 400, "prompt",
                 "8200 tokens", "8192 positions")
    # a full-cache prompt longer than a slot (budget 1024 + 1024 entries): refused up front, naming the numbers
    assert_error(http("POST", completions, {"prompt": [5] * 3000, "max_tokens": 1, "snapkv": False}), 400,
                 "prompt", "3001 cache entries", "a slot holds 2048")
    assert_error(http("POST", completions, {"prompt": [70000], "max_tokens": 1}), 400, "prompt", "vocabulary")
    with pytest.raises(openai.BadRequestError):
        chat(server.client(), "hi", max_tokens=-1)
    assert server.metric("snapkv_requests_total", status="400") >= 13
    assert chat(server.client(), "Say hello.", max_tokens=4).choices[0].message.content  # still serving


@pytest.fixture(scope="module")
def one_slot(smol_dir):
    s = Server("--max-batch-size", "1", "--max-waiting", "1", "--api-key", "sekret", "--shutdown-timeout", "3")
    yield s
    s.stop()


def long_stream(client):
    return chat(client, "Count from one to one thousand.", max_tokens=2000, stream=True,
                extra_body={"ignore_eos": True})


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_api_key(one_slot):
    with pytest.raises(openai.AuthenticationError):
        chat(one_slot.client("wrong"), "hi", max_tokens=2)
    assert_error(http("POST", one_slot.base + "/v1/completions", {"prompt": "hi"}), 401, None, "API key")
    assert http("GET", one_slot.base + "/health")[0] == 200  # health, metrics and the page stay open
    assert http("GET", one_slot.base + "/")[0] == 200
    assert chat(one_slot.client("sekret"), "hi", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_full_queue_gets_429_and_a_disconnect_frees_the_slot(one_slot):
    client = one_slot.client("sekret")
    stream = long_stream(client)
    next(iter(stream))  # the one slot is taken
    wait_for(lambda: one_slot.metric("snapkv_requests_running") == 1)
    kept, full = (one_slot.metric(f"snapkv_kv_cache_{k}_bytes") for k in ("kept", "full_equivalent"))
    assert 0 < kept <= full and kept % (30 * 2 * 3 * 64 * 4) == 0  # whole entries of SmolLM2's float32 cache
    assert one_slot.metric("snapkv_time_to_first_token_seconds_count") >= 1
    waiting: dict = {}
    worker = threading.Thread(target=lambda: waiting.update(out=chat(client, "Say hi.", max_tokens=3)))
    worker.start()
    wait_for(lambda: one_slot.metric("snapkv_requests_waiting") == 1)
    with pytest.raises(openai.RateLimitError):
        chat(client, "And me?", max_tokens=3)
    stream.close()  # the client goes away mid-stream: its request is aborted and the waiting one gets the slot
    worker.join(timeout=120)
    assert waiting["out"].choices[0].finish_reason in ("length", "stop")
    assert one_slot.metric("snapkv_requests_total", status="499") == 1
    assert one_slot.metric("snapkv_requests_total", status="429") == 1
    wait_for(lambda: one_slot.metric("snapkv_requests_running") == 0)
    assert one_slot.metric("snapkv_decode_step_seconds_count") >= 3
    assert one_slot.metric("snapkv_generation_tokens_total") >= 3


def test_sigterm_cancels_what_runs_and_exits(one_slot):
    events = []
    url = one_slot.base + "/v1/completions"
    body = {"prompt": "Count:", "max_tokens": 2000, "ignore_eos": True, "stream": True}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", "authorization": "Bearer sekret"})
    with urllib.request.urlopen(request, timeout=120) as response:
        events.append(response.readline())
        one_slot.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        events += [line for line in response if line.strip()]
    assert time.monotonic() - started < 30
    assert json.loads(events[-2].removeprefix(b"data: "))["error"]["message"] == "the server is shutting down"
    assert events[-1] == b"data: [DONE]\n"
    one_slot.proc.wait(timeout=30)
    assert one_slot.proc.returncode in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in one_slot.output()


def test_a_request_failing_inside_the_engine_fails_alone(tmp_path):
    """In-process on a tiny model, so the fault can be injected: the failing request gets a 500 with the reason,
    a concurrent one its normal answer, and the server answers the next request."""
    import uvicorn

    from server import create_app

    llm = LLM(tiny_model_dir(tmp_path / "tiny"), max_batch_size=2)
    bad, good = [7] * 20, [9] * 20
    want = llm.generate(prompt_token_ids=[good], sampling_params=SamplingParams(max_tokens=8, ignore_eos=True))[0]
    real_prefill = llm.runner.prefill

    def prefill(seq):
        if seq.prompt_token_ids == bad:
            raise RuntimeError("injected fault")
        return real_prefill(seq)

    llm.runner.prefill = prefill
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(llm, "tiny"), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started)
    url = f"http://127.0.0.1:{port}/v1/completions"
    try:
        results = {}
        requests = {"bad": {"prompt": bad, "max_tokens": 8, "ignore_eos": True},
                    "good": {"prompt": good, "max_tokens": 8, "temperature": 0, "ignore_eos": True},
                    "bad_stream": {"prompt": bad, "max_tokens": 8, "stream": True}}
        threads = [threading.Thread(target=lambda k=k, b=b: results.update({k: http("POST", url, b)}))
                   for k, b in requests.items()]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert_error(results["bad"], 500, None, "prefill failed: RuntimeError: injected fault")
        assert results["good"][0] == 200 and json.loads(results["good"][1])["choices"][0]["text"] == want.text
        events = [line for line in results["bad_stream"][1].splitlines() if line]
        assert json.loads(events[-2][6:])["error"]["message"] == "prefill failed: RuntimeError: injected fault"
        again = http("POST", url, requests["good"])
        assert json.loads(again[1])["choices"][0]["text"] == want.text
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.mark.parametrize("args, message", [
    (["--port", "70000"], "error: --port must be in 1..65535 (got 70000)"),
    (["--max-waiting", "0"], "error: --max-waiting must be at least 1 (got 0)"),
    (["--model", "/nonexistent"], "error: model not found: /nonexistent"),
    (["--budget", "8", "--window", "16"], "error: budget (8) must be larger than window (16)"),
    (["--port", "{taken}"], "error: cannot listen on 127.0.0.1:{taken}: Address already in use"),
])
def test_command_line_mistakes_are_one_line_and_exit_2(smol_dir, args, message):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        args = [a.replace("{taken}", port) for a in args]
        run = subprocess.run([str(SERVE), *args], capture_output=True, text=True, timeout=120)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and run.stdout == "" and len(lines) == 1, run.stderr
    assert lines[0].startswith(message.replace("{taken}", port)), run.stderr
