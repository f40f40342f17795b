"""chat.py (snapkv-chat), run as a real subprocess with stdin piped: answers equal the library's chat session,
status lines report the session's numbers, /reset forgets, and user errors are one line with exit code 2."""

import os
import re
import subprocess

import pytest
import torch

from tests.conftest import ROOT, SMOL_DIR

EXE = ROOT / ".venv" / "bin" / "snapkv-chat"
pytestmark = pytest.mark.skipif(not (SMOL_DIR / "model.safetensors").is_file(),
                                reason=f"{SMOL_DIR} is missing: run `make weights` (make test does it)")

DOCUMENT = ("The Larch Street bridge was built in 1911 by the engineer Maria Okafor. It is 240 metres long and "
            "crosses the Vell river in three arches of grey granite. In 1987 it was closed for two years while the "
            "middle arch was rebuilt after a flood. Today it carries a tram line and a cycle path, and every June "
            "the town holds a market on it. ") * 2
QUESTIONS = ["Who built the bridge?", "How long is it?"]
FLAGS = ["--budget", "64", "--window", "8", "--kernel", "7", "--reserve", "0", "--max-new-tokens", "12"]
STATUS = re.compile(r"^kept ([\d,]+) / ([\d,]+) tokens \([\d.]+x\) · (compressed|nothing dropped) this turn · "
                    r"prefill [\d.]+ s · KV (.+?) · [\d.]+ tok/s$")


def run_chat(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([str(EXE), *args], input=stdin, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("chat") / "bridge.txt"
    path.write_text(DOCUMENT)
    return path


def test_piped_conversation_equals_library_session(document, tmp_path):
    # two turns over the document, /history (stderr only), /reset, then the first question again; the chat runs
    # in its subprocess while this process computes the same conversation with the library, one thread each (on
    # 2 busy cores, two processes of 2 threads each run several times slower)
    messages = tmp_path / "messages.txt"
    messages.write_text(f"{QUESTIONS[0]}\n\n{QUESTIONS[1]}\n/history\n/reset\n{QUESTIONS[0]}\n")
    with messages.open() as stdin:
        proc = subprocess.Popen([str(EXE), "--document", str(document), *FLAGS], stdin=stdin,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    from engine import LLM, SamplingParams
    from engine.kv_cache import format_bytes
    from snapkv import SnapKVConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        llm = LLM(SMOL_DIR, max_batch_size=1, snapkv=SnapKVConfig(budget=64, window=8, kernel=7))
        params = SamplingParams(max_tokens=12)
        with llm.chat_session(reserve=0) as chat:
            answers = [chat.send(f"{DOCUMENT.rstrip()}\n\n{QUESTIONS[0]}", params).text,
                       chat.send(QUESTIONS[1], params).text]
            turns = list(chat.turns)
    finally:
        torch.set_num_threads(threads)
    answers.append(answers[0])  # after /reset: a fresh session's first answer (the document opens it again)
    turns.append(turns[0])
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr

    assert stdout == "".join(a + "\n" for a in answers)  # stdout is the answers and nothing else
    assert turns[0]["compressed"] and turns[1]["compressed"]  # the document is past the budget; reserve 0

    status = [m for m in map(STATUS.match, stderr.splitlines()) if m]
    assert len(status) == 3, stderr
    for m, turn in zip(status, turns):
        held, total = (int(g.replace(",", "")) for g in m.group(1, 2))
        assert (held, total) == (turn["held_entries"], turn["conversation_tokens"])
        assert m.group(3) == ("compressed" if turn["compressed"] else "nothing dropped")
        assert m.group(4) == format_bytes(turn["kv_bytes"])
    assert f"user: [the document, {len(DOCUMENT.rstrip()):,} characters]" in stderr  # /history
    assert f"user: {QUESTIONS[1]}" in stderr and "Traceback" not in stderr


@pytest.mark.parametrize("args, pattern", [
    (["--document", "no/such/file.txt"], r"cannot read --document no/such/file\.txt"),
    (["--budget", "0"], r"budget must be at least 1"),
])
def test_user_error_is_one_line(args, pattern):
    proc = run_chat(*args, stdin="hello\n")
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and re.search(pattern, lines[0]), proc.stderr
