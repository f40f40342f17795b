"""snapkv-serve as a real process on a real port, driven by the real openai client: outputs equal LLM.generate,
streams equal whole answers, concurrency, sessions, the page, every error status (test_server_lifecycle: keys, a
full queue, disconnects, SIGTERM, a failing request, command-line mistakes)."""

from __future__ import annotations

import json
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
from tests.conftest import ROOT

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


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


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
