"""Long-context prefill benchmark: prompt length vs prefill time and peak memory, full cache vs SnapKV, and the
longest prompt that fits each way (from the memory model, checked against the measured peaks).

    .venv/bin/python -m benchmarks.long_context                      # CPU: SmolLM2 float32, 1K -> 16K measured
    .venv/bin/python -m benchmarks.long_context --lengths 1024,...,65536
    python -m benchmarks.long_context --device cuda --shape llama3-8b --lengths 16384,65536,262144,524288

Each (length, policy) runs in a fresh process, so the measured peak (resident-set high-water mark on CPU, the
allocator's peak on CUDA) belongs to that run alone. Writes benchmarks/results/long_context_<device>.md and .png,
and exits non-zero if a row's measured peak exceeds the memory model's prediction: this is where the 16K SmolLM2
prompt is checked (the margin is tightest at the longest prompts; tests/test_long_context.py checks 8K).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"


def predict_generation_peak(cfg, prompt_len: int, capacity: int, batch: int, dtype_bytes: int,
                            chunk: int, window: int = 0, device_type: str = "cpu",
                            repeat_kv: bool = False, entry_bytes: int | None = None):
    """The whole picture for one engine: a static cache of `capacity` entries for `batch` slots (entry_bytes per
    entry and kv head: KVCache.entry_bytes, by default K and V at dtype_bytes), plus the longest prompt's prefill."""
    from engine.memory_model import MARGIN, MemoryEstimate, predict_prefill_peak

    prefill = predict_prefill_peak(cfg, prompt_len, dtype_bytes, chunk, window, device_type, repeat_kv)
    cache = batch * capacity * cfg.kv_bytes_per_token(dtype_bytes, entry_bytes)
    return MemoryEstimate(prefill.total + int(MARGIN * cache), {"KV cache": cache, **prefill.parts})


def run_one(length: int, policy: str, budget: int, chunk: int, device: str, shape: str) -> dict:
    """In this process: prefill `length` tokens (+1 decode step) and report time and memory."""
    from engine import LLM, SamplingParams
    from snapkv import SnapKVConfig

    snapkv = SnapKVConfig(budget=budget, window=16) if policy == "snapkv" else None
    if shape != "smollm2":
        return run_one_random(length, snapkv, chunk, torch.device(device), shape)
    llm = LLM(MODEL, device=device, snapkv=snapkv, allow_longer_context=True, prefill_chunk_size=chunk)
    words = (ROOT / "examples" / "long_prompt.txt").read_text()
    base = llm.tokenizer.encode(words)
    ids = (base * (length // len(base) + 1))[:length]
    # the weights are memory-mapped: page them in first, so that the peak measured is the call's own growth
    llm.generate(prompt_token_ids=[ids[:64]], sampling_params=SamplingParams(max_tokens=1))
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=2, ignore_eos=True))[0]
    s = out.stats
    return dict(length=length, policy=policy, prefill_s=s["prefill_s"], measured=s["measured_peak_bytes"],
                predicted=s["predicted_peak_bytes"], kv_bytes=s["kv_bytes"])


def run_one_random(length: int, snapkv, chunk: int, device: torch.device, shape: str,
                   dtype: torch.dtype | None = None) -> dict:
    """A random-weight shape (e.g. the 8B Llama-3 shape on a GPU): the engine's own prefill path — cache views,
    chunked layer-major forward, SnapKV selection into the static cache — on random token ids."""
    import time

    from benchmarks.decode import build_model
    from engine.cache_views import PrefillView
    from engine.kv_cache import KVCache
    from engine.memory_model import PeakMeter
    from models.attention import prefill_repeats_kv
    from snapkv.policies import make_policy

    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    model = build_model(shape, device, dtype)
    cfg = model.config
    policy = make_policy(snapkv, cfg.num_layers, cfg.sliding_window)
    capacity = policy.kept_length(length) + 64
    e = torch.empty((), dtype=dtype).element_size()
    predicted = predict_generation_peak(cfg, length, capacity, 1, e, chunk, policy.queries_needed, device.type,
                                        prefill_repeats_kv(device, dtype, cfg.sliding_window))
    ids = torch.randint(0, cfg.vocab_size, (1, length), device=device)
    with torch.inference_mode(), PeakMeter(device) as meter:
        cache = KVCache(cfg.num_layers, 1, cfg.num_kv_heads, capacity, cfg.head_dim, dtype, device)
        start = time.perf_counter()
        model(ids, ctx=PrefillView(cache, 0, policy), last_only=True, chunk_size=chunk)
        if device.type == "cuda":
            torch.cuda.synchronize()
        prefill_s = time.perf_counter() - start
    return dict(length=length, policy="snapkv" if snapkv else "full", prefill_s=prefill_s, measured=meter.peak,
                predicted=predicted.total, kv_bytes=policy.kept_length(length) * cfg.kv_bytes_per_token(e))


def longest_fits(free_bytes: int, budget: int | None, chunk: int, device: str, shape: str) -> int:
    from benchmarks.decode import SHAPES
    from engine.memory_model import longest_prompt_that_fits
    from models.config import ModelConfig
    from formats.loader import load_config

    cfg = load_config(MODEL) if shape == "smollm2" else ModelConfig(**SHAPES[shape])
    e = 4 if device == "cpu" else 2
    def cache_bytes(t):  # one slot of kept entries + 64 new tokens
        return ((min(t, budget) if budget else t) + 64) * cfg.kv_bytes_per_token(e)

    return longest_prompt_that_fits(cfg, free_bytes, e, chunk, window=16 if budget else 0, device_type=device,
                                    cache_bytes_for=cache_bytes)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for policy in dict.fromkeys(r["policy"] for r in rows):
        pts = [r for r in rows if r["policy"] == policy]
        a.plot([r["length"] for r in pts], [r["prefill_s"] for r in pts], marker="o", label=policy)
        b.plot([r["length"] for r in pts], [r["measured"] / 2**20 for r in pts], marker="o", label=f"{policy} measured")
        b.plot([r["length"] for r in pts], [r["predicted"] / 2**20 for r in pts], ls="--", label=f"{policy} predicted")
    for ax, label in ((a, "prefill seconds"), (b, "peak memory beyond weights (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
    parser.add_argument("--budget", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="smollm2")
    parser.add_argument("--one", nargs=2, metavar=("LENGTH", "POLICY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(int(args.one[0]), args.one[1], args.budget, args.chunk, args.device, args.shape)))
        return 0

    rows, failed = [], []
    for length in [int(x) for x in args.lengths.split(",")]:
        for policy in ("full", "snapkv"):
            cmd = [sys.executable, "-m", "benchmarks.long_context", "--one", str(length), policy, "--budget",
                   str(args.budget), "--chunk", str(args.chunk), "--device", args.device, "--shape", args.shape]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                print(f"{length} {policy}: failed: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
                failed.append(f"{length} {policy} (failed)")
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{length:>7} {policy:>6}: prefill {row['prefill_s']:.1f} s, peak {row['measured'] / 2**20:.0f} MiB "
                  f"(predicted {row['predicted'] / 2**20:.0f} MiB, {within(row)})", flush=True)

    from engine.kv_cache import available_memory_bytes

    free = available_memory_bytes(torch.device(args.device))
    fits_full = longest_fits(free, None, args.chunk, args.device, args.shape)
    fits_snap = longest_fits(free, args.budget, args.chunk, args.device, args.shape)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    name = f"long_context_{args.device}"
    label = "SmolLM2-135M-Instruct, float32" if args.shape == "smollm2" else f"{args.shape} (random weights)"
    plot(rows, out / f"{name}.png", f"{label}, {args.device}: chunked layer-major prefill")
    lines = [
        f"# Long-context prefill: {label}, {args.device}", "",
        f"Command: `.venv/bin/python -m benchmarks.long_context --lengths {args.lengths} --budget {args.budget} "
        f"--chunk {args.chunk} --device {args.device} --shape {args.shape}`. Layer-major chunked prefill, chunk {args.chunk}; SnapKV budget {args.budget}, "
        "window 16; one fresh process per row; peak = resident-set high-water mark growth during the call.", "",
        "| prompt tokens | policy | prefill s | prefill tok/s | KV cache kept | measured peak | predicted peak | "
        "within the prediction |",
        "|---:|---|---:|---:|---:|---:|---:|---|",
        *[f"| {r['length']} | {r['policy']} | {r['prefill_s']:.1f} | {r['length'] / r['prefill_s']:.0f} | "
          f"{r['kv_bytes'] / 2**20:.0f} MiB | {r['measured'] / 2**20:.0f} MiB | {r['predicted'] / 2**20:.0f} MiB | "
          f"{within(r)} |" for r in rows],
        "",
        f"Longest prompt that fits in the {free / 2**30:.1f} GiB free here (memory model, weights excluded, "
        f"64 new tokens): full cache about {fits_full:,} tokens, SnapKV budget {args.budget} about "
        f"{fits_snap:,} tokens.",
        "",
    ]
    (out / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))
    over = failed + [f"{r['length']} {r['policy']}" for r in rows if within(r) != "yes"]
    if over:
        print(f"measured peak above the prediction (or not measured): {', '.join(over)}", file=sys.stderr)
    return 1 if over else 0


def within(row: dict) -> str:
    """Whether a row's measured peak stayed under the memory model's prediction."""
    if row["measured"] is None:
        return "not measured"
    return "yes" if row["measured"] < row["predicted"] else "NO"


if __name__ == "__main__":
    sys.exit(main())
