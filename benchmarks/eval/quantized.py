"""Quantized weights and the int8 KV cache through the quality eval: for each weights dtype (float32, bfloat16,
int8, int4, and the GGUF as it ships: Q4_1 layers as int4, the Q8_0 embedding/lm_head as int8) and for the int8
KV cache, with the full cache and with SnapKV at 4x, how close the next-token distributions and the answers stay
to float32 with the full cache.

    .venv/bin/python -m benchmarks.eval.quantized [--cases 24]

Cases: the report split's 1K and 2K cases (the quality eval's report half; nothing here was tuned), every n-th
so that all tasks appear. Per case, float32 with the full cache gives the reference: its first 64 greedy tokens
and, teacher-forced over them, its next-token logits. Each configuration then prefills the prompt with its own
weights and (for SnapKV) selects with its own scores, and is scored by
- teacher-forced KL(reference || config) and top-1 agreement over those 64 positions (benchmarks.eval.fidelity;
  with int8 KV every attended entry is quantized as the cache stores it);
- matched tokens: of its first 32 greedy tokens (the engine's own decode), how many equal the reference's;
- exact match of its answer (the task's scorer), with Wilson 95% intervals.
The default weights are the GGUF's values dequantized to float32, so "float32" is the GGUF exactly, and the
GGUF row shows only what the int4/int8 kernels change (bfloat16 activations and scales). One JSONL row per (case,
config); a rerun resumes. Writes benchmarks/results/quantized_quality.md.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks.eval.fidelity import FORCED_TOKENS, MATCHED_TOKENS, forced_logits, kl_and_top1, wilson
from benchmarks.eval.prefill_once import PrefilledPrompt
from benchmarks.eval.quality import answer_text
from benchmarks.eval.runner import DEFAULT_MODEL, RESULTS, read_rows
from benchmarks.eval.splits import report_cases
from compare import matched_tokens
from snapkv.config import SnapKVConfig

GGUF = DEFAULT_MODEL.parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
# (name, model, weights_dtype, kv_dtype)
CONFIGS = [("float32", DEFAULT_MODEL, "float32", "auto"), ("bfloat16 weights", DEFAULT_MODEL, "bfloat16", "auto"),
           ("int8", DEFAULT_MODEL, "int8", "auto"), ("int4", DEFAULT_MODEL, "int4", "auto"),
           ("GGUF as shipped", GGUF, "auto", "auto"), ("float32 + int8 KV", DEFAULT_MODEL, "float32", "int8"),
           ("int4 + int8 KV", DEFAULT_MODEL, "int4", "int8")]
RATIO = 4
MAX_KV_LEN = 2400  # the 2K cases' prompts plus the reference's 65 tokens


def pick_cases(cases, n: int):
    short = [c for c in cases if c.length <= 2048 and c.task != "document"]
    step = max(1, len(short) // n)
    return short[::step][:n]


def score_config(llm, case, ids: list[int], reference: dict) -> list[dict]:
    """The config's rows for one case: full cache and SnapKV at RATIO."""
    prefilled = PrefilledPrompt(llm, ids)
    snapkv = SnapKVConfig(budget=max(math.ceil(len(ids) / RATIO), SnapKVConfig().window + 1))
    rows = []
    for cache, decoded in zip(("full", f"snapkv {RATIO}x"), prefilled.decode_many([None, snapkv], MATCHED_TOKENS)):
        kept = None if cache == "full" else decoded.kept
        logits = forced_logits(llm.model, prefilled, kept, reference["tokens"][:FORCED_TOKENS],
                               kv_int8=llm.kv_dtype == "int8")
        kl, top1 = kl_and_top1(reference["logits"], logits)
        text = answer_text(llm, decoded.token_ids)
        rows.append(dict(cache=cache, kl=round(kl, 5), top1=round(top1, 4), score=case.score(text), output=text,
                         matched=matched_tokens(reference["tokens"], decoded.token_ids, llm.eos_ids, MATCHED_TOKENS)))
    return rows


def summarize(rows: list[dict]) -> list[str]:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["config"], r["cache"])].append(r)
    lines = ["| weights / KV | cache | cases | KL vs float32 full (nats) | top-1 agreement | matched tokens /32 | "
             "exact match [95% Wilson] |", "|---|---|---:|---:|---:|---:|---|"]
    order = [c[0] for c in CONFIGS]
    for (config, cache), rs in sorted(groups.items(), key=lambda kv: (order.index(kv[0][0]), kv[0][1])):
        n, hits = len(rs), sum(r["score"] for r in rs)
        lo, hi = wilson(hits, n)
        lines.append(f"| {config} | {cache} | {n} | {sum(r['kl'] for r in rs) / n:.4f} | "
                     f"{100 * sum(r['top1'] for r in rs) / n:.1f}% | {sum(r['matched'] for r in rs) / n:.1f} | "
                     f"{100 * hits / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] |")
    return lines


def main(argv: list[str] | None = None) -> None:
    from engine import LLM

    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval.quantized", description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--out", default=str(RESULTS / "quantized_quality.jsonl"))
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    llms = {name: LLM(path, max_batch_size=2, max_kv_len=MAX_KV_LEN, weights_dtype=w, kv_dtype=kv)
            for name, path, w, kv in CONFIGS}
    reference_llm = llms["float32"]
    count = lambda text: len(reference_llm.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    cases = pick_cases(report_cases(count, documents=False), args.cases)
    done = {r["key"]: r for r in read_rows(out)}
    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for i, case in enumerate(cases):
            todo = [name for name in llms if f"{case.key}|{name}|full" not in done]
            if todo:
                ids = reference_llm.encode_prompt(case.prompt, chat=True)
                prefilled = PrefilledPrompt(reference_llm, ids)
                tokens = prefilled.decode(None, FORCED_TOKENS + 1, ignore_eos=True).token_ids
                reference = dict(tokens=tokens, logits=forced_logits(reference_llm.model, prefilled, None,
                                                                     tokens[:FORCED_TOKENS]))
                for name in todo:
                    for row in score_config(llms[name], case, ids, reference):
                        row = dict(key=f"{case.key}|{name}|{row['cache']}", case=case.key, task=case.task,
                                   length=case.length, prompt_tokens=len(ids), config=name, **row)
                        f.write(json.dumps(row) + "\n")
                        f.flush()
                        done[row["key"]] = row
            print(f"{i + 1}/{len(cases)} {case.key} ({time.perf_counter() - start:.0f} s)", flush=True)
    keys = {c.key for c in cases}
    rows = [r for r in done.values() if r["case"] in keys]
    lines = ["# Quantized weights and int8 KV: quality against float32 with the full cache", "",
             f"SmolLM2-135M-Instruct, CPU, greedy; {len(cases)} report-split cases of 1K-2K tokens (tasks: "
             f"{', '.join(sorted({c.task for c in cases}))}); SnapKV at {RATIO}x = budget ceil(T/{RATIO}), default "
             "knobs. Reference: float32 weights, float32 KV, full cache (its 64 greedy tokens, teacher-forced).",
             f"Command: `.venv/bin/python -m benchmarks.eval.quantized --cases {args.cases}`", "", *summarize(rows), "",
             "The float32 weights are the shipped GGUF's values dequantized exactly, so the GGUF row differs from "
             "float32 only by the kernels' bfloat16 activations and scales; int8 and int4 re-quantize those values "
             "(int4 with the GGUF's own groups of 32 finds them again, so it is close to the GGUF row).", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
