"""Serving throughput: continuous batching (this engine) against the grouped batching of main at 0652f90 (the
engine before continuous batching: prompts in fixed groups of max_batch_size, each group prefilled one prompt at a
time and then decoded until its longest member ends), measured in one run on the same machine.

    .venv/bin/python -m benchmarks.throughput [--requests 64] [--rate 0.4] [--seed 0]

Workload (fixed seed): SmolLM2-135M-Instruct, float32, CPU, SnapKV with its defaults, 8 slots; prompt lengths
log-uniform in [128, 4096] tokens (slices of examples/long_prompt.txt), max_tokens uniform in [16, 256], eos
ignored so every request generates exactly its max_tokens. Two arrival patterns: offline (all at t=0) and
Poisson (rate --rate requests/s). Three more measurements: a short request arriving behind four long ones
(its time to first token against one long prefill) and bs-1 decode tokens/s of both engines.

Each engine runs in its own process (`--worker`); main's code comes from `git archive 0652f90` into a temporary
directory. Per request the workers record the arrival, the prefill start and the time of every token; the report
derives output tokens/s, time to first token and inter-token latency (p50/p99) and slot occupancy (the share of
slot-seconds a request was being served) from those. Writes benchmarks/results/throughput_cpu.md and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results"
BASELINE_COMMIT = "0652f90"
SLOTS, BUDGET, MAX_NEW = 8, 1024, 256


def make_workload(count: int, rate: float | None, seed: int, token_ids: list[int]) -> list[dict]:
    rng = random.Random(seed)
    stream = token_ids * (1 + 4096 // len(token_ids))
    clock, requests = 0.0, []
    for i in range(count):
        n = int(round(math.exp(rng.uniform(math.log(128), math.log(4096)))))
        start = rng.randrange(0, len(stream) - n)
        if rate is not None and i:
            clock += rng.expovariate(rate)
        requests.append(dict(ids=stream[start:start + n], max_tokens=rng.randint(16, MAX_NEW), arrival=clock))
    return requests


# --- workers: each runs one engine over a workload and prints per-request timestamps as JSON --------------------

def continuous_worker(requests: list[dict]) -> list[dict]:
    import torch

    from engine import LLM, SamplingParams
    from snapkv import SnapKVConfig

    torch.set_num_threads(2)
    llm = LLM(MODEL, snapkv=SnapKVConfig(budget=BUDGET), max_batch_size=SLOTS, max_kv_len=BUDGET + MAX_NEW)
    llm.generate(prompt_token_ids=[requests[0]["ids"][:64]], sampling_params=SamplingParams(max_tokens=4))  # warm
    records = [dict(arrival=r["arrival"], start=None, tokens=[], prefill_s=None) for r in requests]
    ids = {}
    pending = sorted(range(len(requests)), key=lambda i: requests[i]["arrival"])
    t0 = time.perf_counter()
    while pending or llm.has_unfinished():
        now = time.perf_counter() - t0
        while pending and requests[pending[0]]["arrival"] <= now:
            i = pending.pop(0)
            r = requests[i]
            ids[llm.add_request(prompt_token_ids=r["ids"], sampling_params=SamplingParams(
                max_tokens=r["max_tokens"], ignore_eos=True))] = i
        if not llm.has_unfinished():
            time.sleep(max(0.0, requests[pending[0]]["arrival"] - now))
            continue
        step_start = time.perf_counter() - t0
        outs = llm.step()
        done = time.perf_counter() - t0
        for out in outs:
            rec = records[ids[out.request_id]]
            if rec["start"] is None:
                rec["start"] = step_start
            rec["tokens"] += [done] * len(out.new_token_ids)
            if out.finished:
                rec["prefill_s"] = out.stats["prefill_s"]
    return records


GROUPED_WORKER = r"""
import json, sys, time
import torch
from engine import LLM, SamplingParams
from engine.llm import _Sequence
from snapkv import SnapKVConfig

torch.set_num_threads(2)
model, slots, budget, requests = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), json.load(sys.stdin)
llm = LLM(model, snapkv=SnapKVConfig(budget=budget), max_batch_size=slots)
llm.generate(prompt_token_ids=[requests[0]["ids"][:64]], sampling_params=SamplingParams(max_tokens=4))
records = [dict(arrival=r["arrival"], start=None, tokens=[], prefill_s=None) for r in requests]
pending = sorted(range(len(requests)), key=lambda i: requests[i]["arrival"])
t0 = time.perf_counter()
while pending:  # a grouped server: take what has arrived (at most one group), run it to the end, repeat
    now = time.perf_counter() - t0
    if requests[pending[0]]["arrival"] > now:
        time.sleep(requests[pending[0]]["arrival"] - now)
        now = time.perf_counter() - t0
    group = [i for i in pending if requests[i]["arrival"] <= now][:slots]
    pending = [i for i in pending if i not in group]
    seqs = [_Sequence(list(requests[i]["ids"]), SamplingParams(max_tokens=requests[i]["max_tokens"], ignore_eos=True),
                      llm.device) for i in group]
    seen = [0] * len(seqs)
    start = time.perf_counter() - t0
    for i in group:
        records[i]["start"] = start
    for _ in llm._run(seqs, False, None):
        t = time.perf_counter() - t0
        for k, (i, seq) in enumerate(zip(group, seqs)):
            new = len(seq.out.token_ids) - seen[k]
            records[i]["tokens"] += [t] * new
            seen[k] += new
    for i, seq in zip(group, seqs):
        records[i]["prefill_s"] = seq.out.stats["prefill_s"]
print(json.dumps(records))
"""

BS1_WORKER = r"""
import json, sys, torch
from engine import LLM, SamplingParams
torch.set_num_threads(2)
model, ids, new, repeats = sys.argv[1], json.load(sys.stdin), int(sys.argv[2]), int(sys.argv[3])
llm = LLM(model, max_batch_size=1)
params = SamplingParams(max_tokens=new, ignore_eos=True)
llm.generate(prompt_token_ids=[ids[:64]], sampling_params=SamplingParams(max_tokens=4))
rates = []
for _ in range(repeats):
    s = llm.generate(prompt_token_ids=[ids], sampling_params=params)[0].stats
    rates.append((new - 1) / s["decode_s"])
print(json.dumps(rates))
"""


def run_worker(kind: str, requests: list[dict] | list[int], baseline_dir: Path, *args: str) -> list:
    """kind: "continuous" (this tree), "grouped" (main's tree) or "bs1-new" / "bs1-main"."""
    if kind == "continuous":
        cmd, cwd = [sys.executable, "-m", "benchmarks.throughput", "--worker"], ROOT
    elif kind == "grouped":
        cmd, cwd = [sys.executable, "-c", GROUPED_WORKER, str(MODEL), str(SLOTS), str(BUDGET)], baseline_dir
    else:
        cmd, cwd = [sys.executable, "-c", BS1_WORKER, str(MODEL), *args], ROOT if kind == "bs1-new" else baseline_dir
    env = {"PYTHONPATH": str(cwd), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, cwd=cwd, input=json.dumps(requests), capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"error: the {kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- report -----------------------------------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))] if values else float("nan")


def summarize(records: list[dict]) -> dict:
    end = max(r["tokens"][-1] for r in records)
    first = min(r["arrival"] for r in records)
    generated = sum(len(r["tokens"]) for r in records)
    ttft = [r["tokens"][0] - r["arrival"] for r in records]
    itl = [b - a for r in records for a, b in zip(r["tokens"], r["tokens"][1:])]
    busy = sum(r["tokens"][-1] - r["start"] for r in records) / (SLOTS * (end - first))
    prefill = sum(r["prefill_s"] for r in records)
    return dict(tok_s=generated / (end - first), makespan=end - first, prefill=prefill / (end - first),
                decode_tok_s=generated / (end - first - prefill), ttft_p50=percentile(ttft, 50),
                ttft_p99=percentile(ttft, 99), itl_p50=percentile(itl, 50), itl_p99=percentile(itl, 99), busy=busy,
                ttft=ttft)


def short_behind_long(token_ids: list[int]) -> list[dict]:
    """Four 3,000-token requests at t=0, then a 128-token one at t=1 s (during the first long prefill)."""
    longs = [dict(ids=(token_ids * 2)[i * 100:i * 100 + 3000], max_tokens=64, arrival=0.0) for i in range(4)]
    return longs + [dict(ids=token_ids[5000 % len(token_ids):][:128], max_tokens=16, arrival=1.0)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    names = list(results)
    a.bar(range(len(names)), [results[n]["tok_s"] for n in names], color=["#888", "#d62", "#888", "#d62"])
    a.set_xticks(range(len(names)), [n.replace(" ", "\n", 1) for n in names], fontsize=8)
    a.set_ylabel("output tokens/s")
    a.set_title("Throughput, 64 requests, 8 slots")
    for n in names:
        ttft = sorted(results[n]["ttft"])
        b.plot(ttft, [(i + 1) / len(ttft) for i in range(len(ttft))], label=n)
    b.set_xscale("log")
    b.set_xlabel("time to first token (s)")
    b.set_ylabel("share of requests")
    b.set_title("Time to first token")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--rate", type=float, default=0.4, help="Poisson arrivals per second")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(continuous_worker(json.load(sys.stdin))))
        return

    from engine.tokenizer import Tokenizer

    token_ids = Tokenizer.from_path(MODEL).encode((ROOT / "examples" / "long_prompt.txt").read_text())
    results, notes = {}, []
    with tempfile.TemporaryDirectory() as baseline:
        subprocess.run(f"git -C {ROOT} archive {BASELINE_COMMIT} | tar -x -C {baseline}", shell=True, check=True)
        baseline = Path(baseline)
        for pattern, rate in (("offline", None), ("Poisson", args.rate)):
            workload = make_workload(args.requests, rate, args.seed, token_ids)
            for engine, kind in (("grouped (main)", "grouped"), ("continuous", "continuous")):
                started = time.perf_counter()
                results[f"{engine} {pattern}"] = summarize(run_worker(kind, workload, baseline))
                print(f"{engine} {pattern}: {results[f'{engine} {pattern}']['tok_s']:.1f} tok/s "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
        scenario = short_behind_long(token_ids)
        short = {}
        for engine, kind in (("grouped (main)", "grouped"), ("continuous", "continuous")):
            records = run_worker(kind, scenario, baseline)
            long_prefill = statistics.median(r["prefill_s"] for r in records[:4])
            short[engine] = (records[4]["tokens"][0] - records[4]["arrival"], long_prefill)
        bs1_ids = token_ids[:512]
        bs1 = {engine: statistics.median(run_worker(kind, bs1_ids, baseline, "128", "5"))
               for engine, kind in (("main", "bs1-main"), ("continuous", "bs1-new"))}

    offline = results["continuous offline"]["tok_s"] / results["grouped (main) offline"]["tok_s"]
    poisson = results["continuous Poisson"]["tok_s"] / results["grouped (main) Poisson"]["tok_s"]
    lines = [
        "# Serving throughput: continuous batching vs main's grouped batching (CPU)", "",
        f"Command: `.venv/bin/python -m benchmarks.throughput --requests {args.requests} --rate {args.rate} "
        f"--seed {args.seed}`. Baseline: main at {BASELINE_COMMIT}, run in the same session.",
        f"SmolLM2-135M-Instruct, float32, 2 threads, {SLOTS} slots, SnapKV budget {BUDGET} (defaults otherwise); "
        f"{args.requests} requests, prompts log-uniform 128-4096 tokens, max_tokens uniform 16-{MAX_NEW}, eos "
        "ignored. Slot occupancy: slot-seconds spent serving a request (from its prefill to its last token) over "
        "slots x makespan.", "",
        "| engine | arrivals | output tok/s | makespan s | prefill share | tok/s outside prefill | TTFT p50 s | "
        "TTFT p99 s | ITL p50 ms | ITL p99 ms | slot occupancy |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        engine, pattern = name.rsplit(" ", 1)
        lines.append(f"| {engine} | {pattern} | {r['tok_s']:.1f} | {r['makespan']:.0f} | {100 * r['prefill']:.0f}% | "
                     f"{r['decode_tok_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | "
                     f"{1000 * r['itl_p50']:.0f} | {1000 * r['itl_p99']:.0f} | {100 * r['busy']:.0f}% |")
    lines += ["", "## Goals (ratios measured in this run)", "",
              f"- offline output tokens/s, continuous / grouped: **{offline:.2f}x** (goal >= 1.5x); "
              f"Poisson: {poisson:.2f}x",
              *[f"- short request behind four 3,000-token ones, {engine}: first token after **{t:.2f} s**; "
                f"one long prefill takes {p:.2f} s ({t / p:.2f} long prefills)" for engine, (t, p) in short.items()],
              f"- bs-1 decode (512-token prompt, 128 tokens, full cache, median of 5): main "
              f"{bs1['main']:.2f} tok/s, continuous {bs1['continuous']:.2f} tok/s "
              f"(**{bs1['continuous'] / bs1['main']:.2f}x**, goal >= 1.0x)", *notes, ""]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "throughput_cpu.md").write_text("\n".join(lines))
    plot(results, RESULTS / "throughput_cpu.png")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
