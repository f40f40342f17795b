"""What rows of different lengths cost: decode step time and KV bytes of AdaKV and PyramidKV (per-head and
per-layer budgets) against SnapKV's uniform budget, on the same static cache, in one run.

    .venv/bin/python -m benchmarks.row_lengths [--prompt-tokens 2048] [--ratio 4] [--new-tokens 48]

Bytes: "held" counts the entries the rows hold (what a paged or flat layout would store); "slot room" is what the
static cache must reserve per slot for them, the largest row times every (layer, kv head) row, since each row's
entries are a prefix of a buffer as long as the slot's capacity. Step time: the decode step at batch 1 and 8, all
rows decoding together. Writes benchmarks/results/row_lengths_cpu.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results" / "row_lengths_cpu.md"


def measure(llm, ids: list[int], batch: int, new_tokens: int) -> tuple[float, dict]:
    """Median decode-step ms while all `batch` requests are live (prefills excluded), and one request's stats."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    rids = [llm.add_request(prompt_token_ids=ids, sampling_params=params) for _ in range(batch)]
    steps, stats = [], None
    while llm.has_unfinished():
        full = len(llm.scheduler.running) == batch and not llm.scheduler.waiting
        outs = llm.step()
        if full and llm.last_decode_s is not None:
            steps.append(llm.last_decode_s)
        stats = next((o.stats for o in outs if o.request_id == rids[0] and o.finished), stats)
    return 1000 * statistics.median(steps), stats


def main(argv: list[str] | None = None) -> None:
    from engine import LLM
    from engine.kv_cache import format_bytes
    from snapkv import SnapKVConfig

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=2048)
    ap.add_argument("--ratio", type=float, default=4.0)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = (ROOT / "examples" / "long_prompt.txt").read_text()
    budget = int(args.prompt_tokens / args.ratio)
    lines = ["# Rows of different lengths: step time and bytes (CPU, SmolLM2-135M, float32)\n",
             f"Prompt {args.prompt_tokens} tokens, budget {budget} ({args.ratio:g}x), {args.new_tokens} new tokens "
             f"greedy; torch {torch.__version__}, {args.threads} threads, {platform.machine()}. Command: "
             f"`.venv/bin/python -m benchmarks.row_lengths --prompt-tokens {args.prompt_tokens} --ratio "
             f"{args.ratio:g}`\n",
             "| policy | step ms, batch 1 | step ms, batch 8 | entries held per row (mean) | largest row | "
             "KV held | slot room for it |", "|---|---:|---:|---:|---:|---:|---:|"]
    for policy in ("snapkv", "adakv", "pyramidkv"):
        cfg = SnapKVConfig(budget=budget, policy=policy)
        llm = LLM(MODEL, snapkv=cfg, max_batch_size=8)
        ids = (llm.tokenizer.encode(text) * 4)[: args.prompt_tokens]
        measure(llm, ids[:200], 1, 4)  # warm-up
        one, stats = measure(llm, ids, 1, args.new_tokens)
        eight, _ = measure(llm, ids, 8, args.new_tokens)
        rows = llm.config.num_layers * llm.config.num_kv_heads
        per_row = llm.kv_bytes_per_entry / rows
        held = stats["kept_tokens"] * rows * per_row
        room = stats["kept_max"] * rows * per_row
        lines.append(f"| {policy} | {one:.1f} | {eight:.1f} | {stats['kept_tokens']} | {stats['kept_max']} | "
                     f"{format_bytes(held)} | {format_bytes(room)} ({room / held:.2f}x) |")
        print(lines[-1], flush=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
