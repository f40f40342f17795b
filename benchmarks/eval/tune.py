"""The defaults sweep: which SnapKV window / kernel / pooling / group aggregation keeps the full cache's answers at
4x and 8x compression on SmolLM2. Writes one JSONL row per (case, config) and prints the ranking.

    .venv/bin/python -m benchmarks.eval.tune --seeds 3             # staged sweep (12 min on 2 shared cores)
    .venv/bin/python -m benchmarks.eval.tune --seeds 3 --full-grid # all 64 combinations (about 30 min)

Staged (the default): stage 1 crosses window {8,16,32,64} x kernel {1,5,7,15} at pooling=max, group_agg=mean;
stage 2 crosses pooling {avg,max} x group_agg {mean,max} for the 3 best (window, kernel) pairs. Every config is
decoded for every case from one shared prefill (benchmarks.eval.prefill_once), all configs batched together.
Ranking: mean exact-match score over cases and budgets, ties broken by mean attention-mass recall.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

from benchmarks.eval.prefill_once import PrefilledPrompt, attention_recall
from benchmarks.eval.runner import DEFAULT_MODEL, RESULTS, answer_complete, load_llm, suite_cases
from benchmarks.eval.tasks import SUITE
from snapkv.config import SnapKVConfig

WINDOWS, KERNELS, POOLINGS, GROUP_AGGS = (8, 16, 32, 64), (1, 5, 7, 15), ("avg", "max"), ("mean", "max")


def grid(windows, kernels, poolings, aggs, budgets) -> list[SnapKVConfig]:
    return [SnapKVConfig(budget=b, window=w, kernel=k, pooling=p, group_agg=g)
            for b, w, k, p, g in itertools.product(budgets, windows, kernels, poolings, aggs) if w < b]


def config_name(cfg: SnapKVConfig) -> str:
    return f"w{cfg.window}/k{cfg.kernel}/{cfg.pooling}/{cfg.group_agg}"


def run_configs(llm, prompts, cfgs, rows: list[dict], progress, task_id, max_tokens: int) -> None:
    """Decode every prompt under every config (plus the full cache as the reference) and collect rows."""
    for case, prefilled in prompts:
        ref, *outs = prefilled.decode_many([None] + cfgs, max_tokens, record_queries=True,
                                           done=lambda toks, c=case: answer_complete(llm, c, toks))
        full_score = case.score(llm.tokenizer.decode(ref.token_ids, skip_special_tokens=True))
        for cfg, out in zip(cfgs, outs):
            recall = attention_recall(prefilled, ref.queries, out.kept)
            rows.append(dict(case=case.key, task=case.task, prompt_tokens=len(prefilled), budget=cfg.budget,
                             config=config_name(cfg), window=cfg.window, kernel=cfg.kernel, pooling=cfg.pooling,
                             group_agg=cfg.group_agg, full_score=full_score,
                             score=case.score(llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)),
                             recall=sum(recall) / len(recall)))
        progress.advance(task_id)


def rank(rows: list[dict]) -> list[tuple[str, float, float, dict]]:
    """(config, mean score, mean recall, per-budget mean score), best first."""
    by: dict[str, list[dict]] = {}
    for r in rows:
        by.setdefault(r["config"], []).append(r)
    table = []
    for name, rs in by.items():
        budgets = sorted({r["budget"] for r in rs})
        per_budget = {b: sum(r["score"] for r in rs if r["budget"] == b) / sum(r["budget"] == b for r in rs)
                      for b in budgets}
        table.append((name, sum(r["score"] for r in rs) / len(rs), sum(r["recall"] for r in rs) / len(rs),
                      per_budget))
    return sorted(table, key=lambda t: (-round(t[1], 6), -t[2]))


def markdown(ranked, full: float, limit: int = 20) -> str:
    budgets = sorted(ranked[0][3]) if ranked else []
    lines = ["| config (window/kernel/pooling/group_agg) | " + " | ".join(f"budget {b}" for b in budgets)
             + " | mean | attention recall |", "|---" * (len(budgets) + 3) + "|",
             "| full cache | " + " | ".join(f"{full:.3f}" for _ in budgets) + f" | {full:.3f} | 1.000 |"]
    for name, score, recall, per in ranked[:limit]:
        lines.append(f"| {name} | " + " | ".join(f"{per[b]:.3f}" for b in budgets) + f" | {score:.3f} | {recall:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval.tune", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--tasks", default=",".join(SUITE))
    ap.add_argument("--lengths", default="2048", help="prompt lengths in tokens, comma-separated")
    ap.add_argument("--seeds", type=int, default=2, help="cases per task and length")
    ap.add_argument("--budgets", default="256,512", help="2048-token prompts: 512 = 4x, 256 = 8x")
    ap.add_argument("--full-grid", action="store_true", help="all 64 combinations instead of the staged sweep")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "tune.jsonl"))
    args = ap.parse_args(argv)
    budgets = [int(b) for b in args.budgets.split(",")]
    llm = load_llm(args.model, args.threads)
    cases = suite_cases(llm, args.tasks.split(","), [int(n) for n in args.lengths.split(",")], range(args.seeds))
    start = time.perf_counter()
    rows: list[dict] = []
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        pre = bar.add_task("prefill", total=len(cases))
        prompts = []
        for case in cases:
            prompts.append((case, PrefilledPrompt(llm, llm.encode_prompt(case.prompt, chat=True))))
            bar.advance(pre)
        if args.full_grid:
            stage1 = grid(WINDOWS, KERNELS, POOLINGS, GROUP_AGGS, budgets)
        else:
            stage1 = grid(WINDOWS, KERNELS, ("max",), ("mean",), budgets)
        t1 = bar.add_task("stage 1 configs", total=len(prompts))
        run_configs(llm, prompts, stage1, rows, bar, t1, args.max_tokens)
        if not args.full_grid:
            best = []
            for name, *_ in rank(rows):
                w, k = name.split("/")[:2]
                if (w, k) not in best:
                    best.append((w, k))
            stage2 = [c for w, k in best[:3] for c in grid((int(w[1:]),), (int(k[1:]),), POOLINGS, GROUP_AGGS,
                                                            budgets) if (c.pooling, c.group_agg) != ("max", "mean")]
            t2 = bar.add_task("stage 2 configs", total=len(prompts))
            run_configs(llm, prompts, stage2, rows, bar, t2, args.max_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    full = sum(r["full_score"] for r in rows if r["config"] == rows[0]["config"] and r["budget"] == budgets[0])
    full /= len(cases)
    print(markdown(rank(rows), full))
    print(f"\n{len(cases)} cases x {len({r['config'] for r in rows})} configs x {len(budgets)} budgets in "
          f"{time.perf_counter() - start:.0f} s; rows in {out}")


if __name__ == "__main__":
    main()
