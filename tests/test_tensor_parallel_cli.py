"""Tensor parallelism through the commands, on CPU with gloo: snapkv-run at --tensor-parallel 2 and under torchrun
answers as at tp=1 and fails clearly when a worker is killed; snapkv-serve at tp=2 answers as tp=1 and reports a
dead worker. The models are test_tensor_parallel's tiny Llama and Mistral."""

from __future__ import annotations

import os
import select
import signal
import subprocess
from pathlib import Path

import pytest

from engine import LLM, SamplingParams
from tests.conftest import ROOT
from tests.test_tensor_parallel import PY, SNAPKV, deadline, tp_models


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return tp_models(tmp_path_factory.mktemp("tp_cli"))


def cli_args(model_dir: Path, prompt_file: Path) -> list[str]:
    return ["--model", str(model_dir), "--prompt", str(prompt_file), "--budget", "48", "--window", "8",
            "--kernel", "5", "-n", "12", "--no-chat"]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tp_prompt") / "prompt.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    return path


def snapkv_run(*args: str, timeout=240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([PY, "-m", "cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_snapkv_run_tensor_parallel_and_torchrun_answer_as_tp1(models, prompt_file):
    args = cli_args(models["llama"], prompt_file)
    single = snapkv_run(*args)
    assert single.returncode == 0, single.stderr
    sharded = snapkv_run(*args, "--tensor-parallel", "2")
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single.stdout and single.stdout.strip()
    torchrun = subprocess.run([str(Path(PY).parent / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m",
                               "cli", *args, "--tensor-parallel", "2"], cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=240)
    assert torchrun.returncode == 0, torchrun.stderr
    assert torchrun.stdout == single.stdout  # rank 0 prints the answer; rank 1 served and exited quietly
    bad = snapkv_run(*args, "--tensor-parallel", "3")
    assert bad.returncode == 2 and bad.stderr.startswith("error: tensor parallel size 3 does not divide")


def children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def test_snapkv_run_fails_clearly_when_a_worker_is_killed(models, prompt_file):
    """The worker is killed once the answer has started streaming: the command ends with one line and exit 1."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([PY, "-m", "cli", *cli_args(models["llama"], prompt_file), "-n", "1500",
                             "--tensor-parallel", "2"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no answer started within 120 s"
        workers = [c for c in children(proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == ("error: tensor-parallel decode step failed: rank 1 died (killed by "
                                            "SIGKILL); the engine has stopped, start it again")
    assert "Traceback" not in err and out  # the answer had started


def test_snapkv_serve_tensor_parallel_answers_as_tp1_and_reports_a_dead_worker(models):
    from tests.test_server import Server, http

    prompt = "Once upon a time, in a land far away, there lived a"
    expected = LLM(models["llama"], snapkv=SNAPKV, max_batch_size=2).generate(
        prompt, SamplingParams(max_tokens=16, ignore_eos=True))[0].text
    server = Server("--tensor-parallel", "2", "--max-batch-size", "2", "--budget", "48", "--window", "8",
                    "--kernel", "5", model=models["llama"])
    try:
        client = server.client()
        answer = client.completions.create(model="llama", prompt=prompt, max_tokens=16, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert answer.choices[0].text == expected
        workers = [c for c in children(server.proc.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert len(workers) == 1
        os.kill(workers[0], signal.SIGKILL)
        with deadline(60):
            failed = http("POST", server.base + "/v1/completions", {"model": "llama", "prompt": prompt,
                                                                      "max_tokens": 4})
            health = http("GET", server.base + "/health")
        assert failed[0] == 500 and "rank 1 died (killed by SIGKILL)" in failed[1], failed
        assert health[0] == 503 and "rank 1 died (killed by SIGKILL)" in health[1], health
    finally:
        server.stop()
