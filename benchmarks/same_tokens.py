"""Greedy tokens through every front end (the library with each cache and weight format, chat sessions, snapkv-run,
snapkv-serve, tensor parallel at 1 and 2 ranks), written as JSON: run it in two trees and compare the files to
show that a restructuring changed no behaviour.

    .venv/bin/python benchmarks/same_tokens.py /tmp/after.json
    cd OLDER_CHECKOUT && .venv/bin/python THIS_TREE/benchmarks/same_tokens.py /tmp/before.json  # its own .venv
    python -c "import json; a, b = (json.load(open(f)) for f in ('/tmp/before.json', '/tmp/after.json')); \
        print([k for k in a if a[k] != b.get(k)] or 'the same')"

It imports the tree it is run in (the working directory). The tensor-parallel model is a tiny random Llama with
SmolLM2's vocabulary, made once by the test suite's helper (transformers, a test dependency) in the directory given
as a second argument (default: same_tokens_tiny in the temporary directory), so both runs share it.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))
from engine import LLM, SamplingParams  # noqa: E402
from snapkv import SnapKVConfig  # noqa: E402

SMOL = ROOT / "weights" / "SmolLM2-135M-Instruct"
GGUF = ROOT / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PY = sys.executable


def tiny_model(directory: Path) -> Path:
    if not (directory / "config.json").exists():
        from tests.conftest import tiny_model_dir

        tiny_model_dir(directory, vocab_size=49152, hidden_size=128, intermediate_size=256, num_attention_heads=8,
                       num_key_value_heads=4, num_hidden_layers=2, max_position_embeddings=2048)
    return directory


def main():
    out: dict = {}
    tiny = tiny_model(Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.gettempdir()) / "same_tokens_tiny")
    params = SamplingParams(max_tokens=24)
    long_text = (ROOT / "examples" / "long_prompt.txt").read_text()
    prompts = ["What is the capital of France?", "Write a haiku about the sea.",
               long_text[:3000] + "\n\nSummarize the text above in one sentence."]


    def ids(outputs):
        return [o.token_ids for o in outputs]


    # the library: full cache, SnapKV, other policies, int8 KV, int8/int4 weights, a GGUF file
    for name, kw in {"full": {}, "snapkv": dict(snapkv=SnapKVConfig(budget=128, window=16)),
                     "pyramid": dict(snapkv=SnapKVConfig(budget=128, policy="pyramidkv")),
                     "int8kv": dict(snapkv=SnapKVConfig(budget=128), kv_dtype="int8"),
                     "w8": dict(snapkv=SnapKVConfig(budget=128), weights_dtype="int8"),
                     "w4": dict(weights_dtype="int4")}.items():
        llm = LLM(SMOL, max_batch_size=3, **kw)
        out[f"library/{name}"] = ids(llm.generate(prompts, params, chat=True))
        out[f"library/{name}/stream"] = "".join(llm.stream(prompts[2], params, chat=True))
    out["library/gguf"] = ids(LLM(GGUF, max_batch_size=3, snapkv=SnapKVConfig(budget=128)).generate(
        prompts, params, chat=True))

    # a chat session (three turns, the later ones re-selecting), and a full-history one
    llm = LLM(SMOL, max_batch_size=2, snapkv=SnapKVConfig(budget=96, window=8))
    for full in (False, True):
        with llm.chat_session(system="Be brief.", reserve=32, full_history=full) as chat:
            out[f"session/full_history={full}"] = [
                chat.send(t, params).token_ids for t in (prompts[2], "Why?", "Say it again in French.")]

    # the CLI
    prompt_file = Path(tempfile.mkdtemp()) / "prompt.txt"
    prompt_file.write_text(prompts[2])
    for extra in ([], ["--no-snapkv"], ["--budget", "96", "--policy", "tova"]):
        proc = subprocess.run([PY, "cli.py", "--model", str(SMOL), "--prompt", str(prompt_file), "--json",
                               "--max-new-tokens", "24", *extra], capture_output=True, text=True, cwd=ROOT)
        out[f"cli/{' '.join(extra)}"] = json.loads(proc.stdout)["token_ids"] if proc.returncode == 0 else proc.stderr

    # the server: one-shot, streamed and a two-turn session
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([PY, "-m", "server", "--model", str(SMOL), "--port", str(port), "--budget", "96",
                               "--max-batch-size", "3"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)

        def post(body):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                         headers={"content-type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.read().decode()

        for i, p in enumerate(prompts):
            body = {"messages": [{"role": "user", "content": p}], "max_tokens": 24, "temperature": 0}
            out[f"server/{i}"] = json.loads(post(body))["choices"][0]["message"]["content"]
            out[f"server/{i}/stream"] = "".join(
                json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                for line in post({**body, "stream": True}).splitlines()
                if line.startswith("data: {") and json.loads(line[6:])["choices"])
        messages = [{"role": "user", "content": prompts[2]}]
        answers = []
        for follow in ("Why?", None):
            text = json.loads(post({"messages": messages, "max_tokens": 24, "temperature": 0,
                                    "session_id": "equiv"}))["choices"][0]["message"]["content"]
            answers.append(text)
            if follow:
                messages += [{"role": "assistant", "content": text}, {"role": "user", "content": follow}]
        out["server/session"] = answers
    finally:
        server.terminate()
        server.wait(60)

    # tensor parallel: tiny Llama at tp=1 and tp=2, generate and a session
    tp_prompts = [[(7 * i + 3) % 4000 + 3 for i in range(n)] for n in (30, 90, 150)]
    for size in (1, 2):
        with LLM(tiny, snapkv=SnapKVConfig(budget=48, window=8, kernel=5), max_batch_size=3, max_kv_len=200,
                 tensor_parallel_size=size) as llm:
            p = SamplingParams(max_tokens=12, ignore_eos=True)
            out[f"tp{size}/generate"] = ids(llm.generate(prompt_token_ids=tp_prompts, sampling_params=p))
            with llm.chat_session(system="Be brief.", reserve=16) as chat:
                out[f"tp{size}/session"] = [chat.send(t, p).token_ids for t in (prompts[0], prompts[1], "A third.")]

    Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
    print("wrote", sys.argv[1], len(out), "entries")


if __name__ == "__main__":
    main()
    os._exit(0)
