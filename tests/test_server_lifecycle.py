"""snapkv-serve's life cycle as a real process: API keys, a full queue and a disconnect on one slot, SIGTERM, a
request failing inside the engine (in-process, on a tiny model, so the fault can be injected), and the command
line's mistakes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import time
import urllib.request

import openai
import pytest

from engine import LLM, SamplingParams
from tests.conftest import tiny_model_dir
from tests.test_server import SERVE, Server, assert_error, chat, free_port, http, wait_for


@pytest.fixture(scope="module")
def one_slot(smol_dir):
    s = Server("--max-batch-size", "1", "--max-waiting", "1", "--api-key", "sekret", "--shutdown-timeout", "3")
    yield s
    s.stop()


def long_stream(client):
    return chat(client, "Count from one to one thousand.", max_tokens=2000, stream=True,
                extra_body={"ignore_eos": True})


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


def test_max_sessions_must_leave_a_slot_for_one_shot_requests():
    """Issue 27, defect 9: --max-sessions equal to --max-batch-size let two sessions refuse every one-shot request."""
    run = subprocess.run([str(SERVE), "--max-batch-size", "2", "--max-sessions", "2", "--model", "/nonexistent"],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "error: --max-sessions must be in 0..1, below --max-batch-size, so that one slot always serves one-shot "
        "requests (got 2)"]
