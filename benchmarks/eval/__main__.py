"""Command line of the quality eval: parse the options, run the cases with a progress bar, write the summary
table and the plots.

    .venv/bin/python -m benchmarks.eval --policies full,snapkv,streaming --budgets 128,256,512
    .venv/bin/python -m benchmarks.eval --quick        # what `make eval` runs: a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks.eval.report import niah_heatmaps, recall_plot, summary_table
from benchmarks.eval.runner import (AGREEMENT_TOKENS, DEFAULT_MODEL, RESULTS, evaluate, load_llm,
                                    niah_grid_cases, policy_specs, suite_cases)
from benchmarks.eval.tasks import SUITE
from snapkv.config import SnapKVConfig

DEFAULTS = SnapKVConfig()
# --quick: every task once at 1K tokens, a 3 x 2 NIAH grid, two budgets (4x and 8x at 1K)
QUICK = dict(lengths="1024", seeds=1, niah_lengths="1024,2048", niah_depths="0,0.5,1", budgets="128,256",
             out=str(RESULTS / "eval_quick.jsonl"), plots_prefix="quick_niah")


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"error: {what} must be comma-separated integers (got {text!r})") from None


def main(argv: list[str] | None = None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="HF-style model directory or .gguf file")
    ap.add_argument("--policies", default="full,snapkv,streaming")
    ap.add_argument("--budgets", default="128,256,512", help="kept entries per layer and kv head")
    ap.add_argument("--tasks", default=",".join(SUITE), help=f"suite tasks (from {', '.join(SUITE)})")
    ap.add_argument("--lengths", default="2048", help="suite prompt lengths in tokens")
    ap.add_argument("--seeds", type=int, default=3, help="cases per suite task and length")
    ap.add_argument("--niah-lengths", default="1024,2048,4096", help="NIAH grid lengths ('' = no grid)")
    ap.add_argument("--niah-depths", default="0,0.25,0.5,0.75,1", help="NIAH grid needle depths (0-1)")
    ap.add_argument("--window", type=int, default=DEFAULTS.window)
    ap.add_argument("--kernel", type=int, default=DEFAULTS.kernel)
    ap.add_argument("--pooling", default=DEFAULTS.pooling, choices=["avg", "max"])
    ap.add_argument("--group-agg", default=DEFAULTS.group_agg, choices=["mean", "max"])
    ap.add_argument("--out", default=str(RESULTS / "eval.jsonl"), help="JSONL rows (appended; reruns resume)")
    ap.add_argument("--summary", default=None, help="markdown summary path [default: OUT with .md]")
    ap.add_argument("--plots", default=str(RESULTS), help="folder for the PNG heatmaps")
    ap.add_argument("--plots-prefix", default="niah")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    ap.add_argument("--quick", action="store_true", help="small preset for `make eval`: " + ", ".join(
        f"{k}={v}" for k, v in QUICK.items() if k != "out"))
    args = ap.parse_args(argv)
    if args.quick:
        for k, v in QUICK.items():
            setattr(args, k, v)
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in tasks if t not in SUITE]
    if unknown:
        raise SystemExit(f"error: unknown task(s) {', '.join(unknown)}; choose from {', '.join(SUITE)}")
    depths = [float(d) for d in args.niah_depths.split(",") if d.strip()]
    if any(not 0 <= d <= 1 for d in depths):
        raise SystemExit("error: --niah-depths are fractions between 0 and 1")
    try:
        base = SnapKVConfig(budget=max(_ints(args.budgets, "--budgets") + [args.window + 1]), window=args.window,
                            kernel=args.kernel, pooling=args.pooling, group_agg=args.group_agg)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    specs = policy_specs([p for p in args.policies.split(",") if p], _ints(args.budgets, "--budgets"), base)
    out = Path(args.out)

    start = time.perf_counter()
    llm = load_llm(args.model, args.threads)
    room = llm.max_model_len - AGREEMENT_TOKENS  # prompts need room for the generated tokens
    too_long = [n for n in _ints(args.lengths, "--lengths") + _ints(args.niah_lengths, "--niah-lengths") if n > room]
    if too_long:
        raise SystemExit(f"error: length {too_long[0]} leaves no room to generate: {Path(args.model).name} handles "
                         f"{llm.max_model_len} positions; use lengths up to {room} (e.g. 8128 for an '8K' column)")
    try:
        cases = [("suite", c) for c in suite_cases(llm, tasks, _ints(args.lengths, "--lengths"), range(args.seeds))]
        cases += [("niah_grid", c) for c in niah_grid_cases(llm, _ints(args.niah_lengths, "--niah-lengths"),
                                                            depths)]
    except ValueError as e:  # a length too short for a task: the message names the minimum
        raise SystemExit(f"error: {e}") from None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[case]}")) as bar:
        task = bar.add_task(f"eval ({len(specs)} policies)", total=len(cases), case="")
        rows = evaluate(llm, cases, specs, out,
                        progress=lambda done, total, key: bar.update(task, completed=done, case=key))
    table = summary_table(rows)
    summary = Path(args.summary) if args.summary else out.with_suffix(".md")
    knobs = f"window={base.window}, kernel={base.kernel}, pooling={base.pooling}, group_agg={base.group_agg}"
    summary.write_text(f"# Eval summary\n\nModel: {Path(args.model).name}; SnapKV {knobs}; {len(cases)} cases; "
                       f"scores are exact match x 100.\n\n{table}\n")
    plots = niah_heatmaps(rows, Path(args.plots), args.plots_prefix)
    recall = recall_plot(rows, Path(args.plots) / (args.plots_prefix.replace("niah", "recall_by_layer") + ".png"))
    print(table)
    print(f"\n{len(cases)} cases in {time.perf_counter() - start:.0f} s; rows: {out}; summary: {summary}; "
          f"plots: {len(plots) + (recall is not None)} PNGs in {args.plots}")


if __name__ == "__main__":
    main()
