"""The defaults sweep, on the tuning split only: which policy and SnapKV knobs stay closest to the full cache.
Ranked by the teacher-forced KL(full || compressed) (lower is better; top-1 agreement breaks ties), which moves
smoothly where exact match on a 135M model flips. No free-running decode: every config is one 64-token forward
over its kept entries, so a sweep of dozens of configs costs little more than the prefills.

    .venv/bin/python -m benchmarks.eval.tune            # stage 1 + stage 2, about 20 minutes on 2 cores

Stage 1: SnapKV's window {8,16,32} x kernel {7,15,31} x pooling {max,avg} x group aggregation {max,mean} at 4x.
Stage 2: with the two best knob sets, the policies snapkv / adakv / pyramidkv with 0 or 4 sink tokens, and tova,
keynorm and streaming, at 4x and 8x. Writes benchmarks/results/tune.jsonl and tune.md. The winner is confirmed
on the report split (benchmarks.eval.quality) before it becomes a default.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections import defaultdict
from pathlib import Path

from benchmarks.eval.quality import DEFAULT_MODEL, RESULTS, knobs, load_llm, run
from benchmarks.eval.splits import tuning_cases
from snapkv.config import SnapKVConfig

WINDOWS, KERNELS, POOLINGS, GROUP_AGGS = (8, 16, 32), (7, 15, 31), ("max", "avg"), ("max", "mean")


def stage1_specs() -> list[tuple[SnapKVConfig, float]]:
    return [(SnapKVConfig(window=w, kernel=k, pooling=p, group_agg=g), 4.0)
            for w, k, p, g in itertools.product(WINDOWS, KERNELS, POOLINGS, GROUP_AGGS)]


def stage2_specs(best: list[SnapKVConfig]) -> list[tuple[SnapKVConfig, float]]:
    specs = []
    for base in best:
        for policy, sinks in itertools.product(("snapkv", "adakv", "pyramidkv"), (0, 4)):
            specs += [(SnapKVConfig(window=base.window, kernel=base.kernel, pooling=base.pooling,
                                    group_agg=base.group_agg, policy=policy, sink_tokens=sinks), r)
                      for r in (4.0, 8.0)]
    specs += [(SnapKVConfig(policy=p), r) for p in ("tova", "keynorm", "streaming") for r in (4.0, 8.0)]
    return specs


def ranking(rows: list[dict], ratio: float | None = None) -> list[tuple[str, float, float, int]]:
    """(config, mean KL, mean top-1, cases) per config over the compressed rows, lowest KL first."""
    by = defaultdict(list)
    for r in rows:
        if r["policy"] != "full" and (ratio is None or r["ratio"] == ratio):
            by[r["key"].split("|", 2)[2].rsplit("|", 1)[0]].append(r)
    out = [(name, sum(r["kl"] for r in rs) / len(rs), sum(r["top1"] for r in rs) / len(rs), len(rs))
           for name, rs in by.items()]
    return sorted(out, key=lambda t: (t[1], -t[2]))


def config_of(name: str) -> SnapKVConfig:
    """Inverse of quality.knobs: 'snapkv|w16k15maxmaxs0' -> the config."""
    import re

    policy, rest = name.split("|")
    w, k, pooling, agg, sinks = re.fullmatch(r"w(\d+)k(\d+)(max|avg)(max|mean)s(\d+)", rest).groups()
    return SnapKVConfig(window=int(w), kernel=int(k), pooling=pooling, group_agg=agg, policy=policy,
                        sink_tokens=int(sinks))


def markdown(stage1: list[tuple], stage2: dict[float, list[tuple]], cases: int) -> str:
    lines = [f"# Defaults sweep, tuning split ({cases} cases)\n",
             "Ranked by mean teacher-forced KL(full || compressed) over 64 tokens (lower is better), top-1 "
             "agreement beside it. Command: `.venv/bin/python -m benchmarks.eval.tune`. These are in-sample "
             "numbers: the report split (quality_report.md) is what the README quotes.\n",
             "## Stage 1: SnapKV knobs at 4x\n", "| config | KL | top-1 | rows |", "|---|---|---|---|"]
    lines += [f"| {n} | {kl:.4f} | {t1:.3f} | {c} |" for n, kl, t1, c in stage1]
    for ratio, ranked in stage2.items():
        lines += [f"\n## Stage 2: policies at {ratio:g}x\n", "| config | KL | top-1 | rows |", "|---|---|---|---|"]
        lines += [f"| {n} | {kl:.4f} | {t1:.3f} | {c} |" for n, kl, t1, c in ranked]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--out", default=str(RESULTS / "tune.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    llm = load_llm(args.model, args.threads)
    count = lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    cases = tuning_cases(count)
    out = Path(args.out)
    start = time.perf_counter()
    log = lambda done, total, key: print(f"  {done}/{total} {key} ({time.perf_counter() - start:.0f} s)",  # noqa
                                         flush=True)
    print(f"stage 1: {len(stage1_specs())} configs x {len(cases)} tuning cases", flush=True)
    rows = run(llm, cases, "tuning", stage1_specs(), out, free_run=False, progress=log)
    first = ranking(rows, 4.0)
    best = [config_of(name) for name, *_ in first[:2]]
    print("stage 1 best: " + ", ".join(knobs(c) for c in best), flush=True)
    rows = run(llm, cases, "tuning", stage1_specs() + stage2_specs(best), out, free_run=False, progress=log)
    stage2_keys = {knobs(c) for c, _ in stage2_specs(best)}
    second = {r: [t for t in ranking(rows, r) if t[0] in stage2_keys] for r in (4.0, 8.0)}
    md = out.with_suffix(".md")
    md.write_text(markdown(first, second, len(cases)))
    print(md.read_text())
    print(f"{time.perf_counter() - start:.0f} s; rows: {out}")


if __name__ == "__main__":
    main()
