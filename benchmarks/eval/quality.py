"""The quality eval on a split: every case is prefilled once, answered with the full cache and under each policy at
each compression ratio, and scored by exact match and the fidelity metrics (benchmarks.eval.fidelity).

    .venv/bin/python -m benchmarks.eval.quality                      # the report split: 200 synthetic + documents
    .venv/bin/python -m benchmarks.eval.quality --split tuning --policies snapkv --ratios 4

A ratio r keeps ceil(T / r) entries per layer and kv head on average (AdaKV and PyramidKV spread the same total
differently). Greedy answers come from the engine's own loop (up to 32 tokens, stopping at the end-of-sequence
token, all policies of one ratio batched); the teacher-forced metrics from one 64-token forward per policy over its
kept entries. One JSONL row per (case, policy, ratio); rows already in the file are skipped, so a run resumes.
Writes benchmarks/results/quality_<split>.md (the table) and .png.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.eval.fidelity import (FORCED_TOKENS, MATCHED_TOKENS, forced_logits, kept_for, kl_and_top1,
                                      wilson)
from benchmarks.eval.prefill_once import PrefilledPrompt
from benchmarks.eval.runner import DEFAULT_MODEL, RESULTS, read_rows
from benchmarks.eval.splits import report_cases, tuning_cases
from benchmarks.eval.tasks import Case
from compare import matched_tokens
from snapkv.config import POLICIES, SnapKVConfig

REPORT_POLICIES = ("snapkv", "adakv", "pyramidkv", "tova", "keynorm", "streaming")


def load_llm(model: str | Path, threads: int, slots: int = 8):
    """The engine on CPU in float32 with a bounded thread count and a few slots (the policies of one ratio decode
    together); each slot holds the model's whole length, for the full cache."""
    from engine import LLM

    path = Path(model)
    if not path.exists():
        raise SystemExit(f"error: model not found: {path} (run `make weights` to fetch the default model)")
    torch.set_num_threads(threads)
    return LLM(path, device="cpu", dtype="float32", max_batch_size=slots)


def config_for(base: SnapKVConfig, policy: str, ratio: float, prompt_len: int) -> SnapKVConfig:
    budget = max(math.ceil(prompt_len / ratio), base.window + 1 + (base.sink_tokens or 0))
    return replace(base, policy=policy, budget=budget)


def knobs(cfg: SnapKVConfig | None) -> str:
    if cfg is None:
        return "full"
    return f"{cfg.policy}|w{cfg.window}k{cfg.kernel}{cfg.pooling}{cfg.group_agg}s{cfg.sinks}"


def answer_text(llm, tokens: list[int]) -> str:
    cut = []
    for t in tokens[:MATCHED_TOKENS]:
        if t in llm.eos_ids:
            break
        cut.append(t)
    return llm.tokenizer.decode(cut, skip_special_tokens=True)


def evaluate_case(llm, case: Case, split: str, specs: list[tuple[SnapKVConfig, float]], free_run: bool = True,
                  done: set[str] = frozenset()) -> list[dict]:
    """Rows for one case: the full cache's, then one per (base config, ratio) spec not in `done`."""
    start = time.perf_counter()
    prefilled = PrefilledPrompt(llm, llm.encode_prompt(case.prompt, chat=True))
    prefill_s = time.perf_counter() - start
    t = len(prefilled)
    base = dict(split=split, case=case.key, task=case.task, seed=case.seed, length=case.length, depth=case.depth,
                prompt_tokens=t, answers=list(case.answers))
    full = prefilled.decode(None, FORCED_TOKENS + 1, ignore_eos=True)
    reference = forced_logits(llm.model, prefilled, None, full.token_ids[:FORCED_TOKENS])
    full_text = answer_text(llm, full.token_ids)
    rows = [base | dict(key=f"{split}|{case.key}|full", policy="full", ratio=1, budget=t, kept_mean=t,
                        output=full_text, score=case.score(full_text), matched=MATCHED_TOKENS, kl=0.0, top1=1.0,
                        prefill_s=round(prefill_s, 2))]
    todo = [(cfg, ratio, config_for(cfg, cfg.policy, ratio, t)) for cfg, ratio in specs]
    todo = [(c, r, run) for c, r, run in todo if f"{split}|{case.key}|{knobs(c)}|{r}" not in done]
    answers = {}
    if free_run:
        by_ratio = defaultdict(list)
        for _, ratio, run in todo:
            by_ratio[ratio].append(run)
        for runs in by_ratio.values():  # one batch per ratio: similar cache lengths decode together
            for i in range(0, len(runs), llm.max_batch_size):
                chunk = runs[i:i + llm.max_batch_size]
                answers.update(zip(map(id, chunk), prefilled.decode_many(chunk, MATCHED_TOKENS)))
    for cfg, ratio, run in todo:
        # the engine's own kept entries when it decoded this config (kept_for makes the same choice, tested)
        kept = answers[id(run)].kept if free_run else kept_for(llm, prefilled, run)
        kl, top1 = kl_and_top1(reference, forced_logits(llm.model, prefilled, kept,
                                                        full.token_ids[:FORCED_TOKENS]))
        kept_mean = sum(int((k >= 0).sum()) for k in kept) / (len(kept) * kept[0].shape[0])
        kept_max = max(int((k >= 0).sum(-1).max()) for k in kept)  # the largest row: what a slot must reserve
        row = base | dict(key=f"{split}|{case.key}|{knobs(cfg)}|{ratio}", policy=cfg.policy, ratio=ratio,
                          budget=run.budget, window=cfg.window, kernel=cfg.kernel, pooling=cfg.pooling,
                          group_agg=cfg.group_agg, sinks=cfg.sinks, kept_mean=round(kept_mean, 1), kept_max=kept_max,
                          kl=round(kl, 5), top1=round(top1, 4))
        if free_run:
            tokens = answers[id(run)].token_ids
            text = answer_text(llm, tokens)
            row |= dict(output=text, score=case.score(text),
                        matched=matched_tokens(full.token_ids, tokens, llm.eos_ids, MATCHED_TOKENS))
        rows.append(row)
    return rows


def run(llm, cases: list[Case], split: str, specs, out: Path, free_run: bool = True, progress=None) -> list[dict]:
    """Evaluate every case, appending rows to `out` as they come; returns all rows for these cases."""
    rows = {r["key"]: r for r in read_rows(out)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for i, case in enumerate(cases):
            wanted = [f"{split}|{case.key}|{knobs(c)}|{r}" for c, r in specs] + [f"{split}|{case.key}|full"]
            if not all(k in rows for k in wanted):
                for row in evaluate_case(llm, case, split, specs, free_run, set(rows)):
                    if row["key"] not in rows:
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        rows[row["key"]] = row
            if progress:
                progress(i + 1, len(cases), case.key)
    keys = {case.key for case in cases}
    return [r for r in rows.values() if r["case"] in keys]


# --- the table --------------------------------------------------------------------------------------------------

def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize(rows: list[dict]) -> list[dict]:
    """One line per (policy, ratio), the full cache first: exact match with its Wilson interval, matched tokens,
    KL, top-1 agreement and the measured compression (prompt tokens / mean kept entries)."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["policy"], r["ratio"])].append(r)
    order = ["full", *REPORT_POLICIES]
    lines = []
    for (policy, ratio), rs in sorted(groups.items(), key=lambda kv: (kv[0][1] != 1, kv[0][1],
                                                                         order.index(kv[0][0]) if kv[0][0] in order
                                                                         else 99, kv[0][0])):
        scored = [r["score"] for r in rs if "score" in r]
        low, high = wilson(sum(scored), len(scored))
        lines.append(dict(policy=policy, ratio=ratio, n=len(rs), em=_mean(scored) if scored else None, em_low=low,
                          em_high=high, matched=_mean(r["matched"] for r in rs if "matched" in r),
                          kl=_mean(r["kl"] for r in rs), top1=_mean(r["top1"] for r in rs),
                          compression=_mean(r["prompt_tokens"] / r["kept_mean"] for r in rs),
                          room=_mean(r.get("kept_max", r["kept_mean"]) / r["kept_mean"] for r in rs)))
    return lines


def table(rows: list[dict]) -> str:
    head = "| policy | ratio | cases | exact match % [95% CI] | matched tokens /32 | KL (nats) | top-1 agree | " \
           "measured compression | largest row / mean row |"
    out = [head, "|---|---|---|---|---|---|---|---|---|"]
    for s in summarize(rows):
        em = "-" if s["em"] is None else f"{100 * s['em']:.1f} [{100 * s['em_low']:.1f}, {100 * s['em_high']:.1f}]"
        matched = "-" if s["matched"] != s["matched"] else f"{s['matched']:.1f}"
        ratio = "-" if s["policy"] == "full" else f"{s['ratio']:g}x"
        out.append(f"| {s['policy']} | {ratio} | {s['n']} | {em} | {matched} | {s['kl']:.4f} | {s['top1']:.3f} | "
                   f"{s['compression']:.2f}x | {s['room']:.2f} |")
    return "\n".join(out)


def breakdown(rows: list[dict]) -> str:
    """The same table for the real-text documents alone, and exact match by prompt length."""
    docs = [r for r in rows if r["task"] == "document"]
    parts = [f"## Real-text documents only ({len({r['case'] for r in docs})} cases)\n\n{table(docs)}\n"] if docs else []
    synthetic = [r for r in rows if r["task"] != "document"]
    lengths = sorted({r["length"] for r in synthetic})
    if lengths:
        head = "| policy | ratio | " + " | ".join(f"{n} tokens" for n in lengths) + " |"
        lines = ["## Synthetic cases: exact match % by prompt length\n", head, "|---|---|" + "---|" * len(lengths)]
        for s in summarize(synthetic):
            cells = []
            for n in lengths:
                scores = [r["score"] for r in synthetic if r["length"] == n and r["policy"] == s["policy"] and
                          r["ratio"] == s["ratio"]]
                cells.append(f"{100 * _mean(scores):.1f} (n={len(scores)})")
            ratio = "-" if s["policy"] == "full" else f"{s['ratio']:g}x"
            lines.append(f"| {s['policy']} | {ratio} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [s for s in summarize(rows) if s["policy"] != "full"]
    full = [s for s in summarize(rows) if s["policy"] == "full"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for policy in dict.fromkeys(s["policy"] for s in lines):
        pts = sorted((s["ratio"], s) for s in lines if s["policy"] == policy)
        xs = [r for r, _ in pts]
        axes[0].plot(xs, [100 * s["em"] for _, s in pts], marker="o", label=policy)
        axes[1].plot(xs, [s["matched"] for _, s in pts], marker="o", label=policy)
        axes[2].plot(xs, [s["kl"] for _, s in pts], marker="o", label=policy)
    if full:
        axes[0].axhline(100 * full[0]["em"], color="black", linestyle="--", label="full cache")
    for ax, title in zip(axes, ("exact match %", "greedy tokens matched (of 32)", "KL(full || compressed), nats")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("compression ratio")
        ax.set_title(title, fontsize=10)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval.quality", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--split", default="report", choices=["report", "tuning"])
    ap.add_argument("--policies", default=",".join(REPORT_POLICIES))
    ap.add_argument("--ratios", default="2,4,8")
    ap.add_argument("--limit", type=int, default=None, help="only the first N cases (a smoke run)")
    ap.add_argument("--out", default=None, help="JSONL rows [default: benchmarks/results/quality_<split>.jsonl]")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shard", default=None, help="K/N: only every N-th case from the K-th (0-based), rows to "
                    "OUT.K-of-N.jsonl; append the shards' rows to OUT and rerun without --shard for the table")
    ap.add_argument("--longest-first", action="store_true", help="run the documents and the longest cases first")
    ap.add_argument("--table-only", action="store_true", help="run nothing: the table of the rows OUT already has")
    args = ap.parse_args(argv)
    policies = [p for p in args.policies.split(",") if p]
    unknown = [p for p in policies if p not in POLICIES or p == "full"]
    if unknown:
        raise SystemExit(f"error: unknown policy {unknown[0]!r}; choose from {', '.join(REPORT_POLICIES)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    defaults = SnapKVConfig()
    specs = [(replace(defaults, policy=p), r) for p in policies for r in ratios]
    out = Path(args.out or RESULTS / f"quality_{args.split}.jsonl")
    llm = load_llm(args.model, args.threads)
    count = lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    cases = (report_cases if args.split == "report" else tuning_cases)(count)[: args.limit]
    if args.longest_first:  # the documents, then the synthetic cases longest first
        cases = sorted(cases, key=lambda c: (c.task != "document", -c.length))
    if args.shard:
        k, n = (int(x) for x in args.shard.split("/"))
        cases, out = cases[k::n], out.with_suffix(f".{k}-of-{n}.jsonl")
    start = time.perf_counter()
    if args.table_only:
        keys = {c.key for c in cases}
        rows = list({r["key"]: r for r in read_rows(out) if r["case"] in keys}.values())
        cases = [c for c in cases if any(r["case"] == c.key for r in rows)]
    else:
        rows = None
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.fields[case]}")) as bar:
        task = bar.add_task(f"{args.split} split", total=len(cases), case="")
        if rows is None:
            rows = run(llm, cases, args.split, specs, out,
                       progress=lambda done, total, key: bar.update(task, completed=done, case=key))
    md = out.with_suffix(".md")
    png = plot(rows, out.with_suffix(".png"))
    knob_text = (f"window {defaults.window}, kernel {defaults.kernel}, {defaults.pooling} pooling, group "
                 f"{defaults.group_agg}, sinks {defaults.sinks}")
    md.write_text(f"# Quality, {args.split} split\n\nModel: {Path(args.model).name}, greedy. {len(cases)} cases "
                  f"({sum(c.task == 'document' for c in cases)} real-text documents). SnapKV-family knobs: "
                  f"{knob_text}.\n\n{table(rows)}\n\n{breakdown(rows)}\nCommand: `.venv/bin/python -m "
                  f"benchmarks.eval.quality --split {args.split}`; plot: {png.name}.\n")
    print(table(rows))
    print(f"\n{len(cases)} cases in {time.perf_counter() - start:.0f} s; rows: {out}; table: {md}")


if __name__ == "__main__":
    main()
