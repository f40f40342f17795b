"""One command that measures every GPU claim the project makes, in one run that fits a short GPU slot.

    make gpu-check            # python3 -m benchmarks.gpu_check              (one H100/H200: a few minutes)
    make gpu-check-long       # python3 -m benchmarks.gpu_check --long       (512K-token prefill: minutes)
    python -m benchmarks.gpu_check --dry-run                                  (CPU, tiny shapes: what CI runs)

In order: (1) the CUDA tests (tests/test_cuda.py: graph replay equals eager at batch 1, 4 and 8 in bf16 and fp16,
with and without flash-attn where it imports; no prefill falls back to SDPA's math kernel); (2) the decode benchmark
at the Llama-3-8B shape with random bf16 weights: ms per step at 1K, 16K and 128K of context, the full cache
against SnapKV at 1024 and 2048 kept entries, the SnapKV 128K/1K ratio, the achieved bandwidth as a percent of the
floor ((weights + kept KV) / the measured copy bandwidth), batch 8 over batch 1 tokens/s, and HF transformers at
the same shape (StaticCache, eager and torch.compile) in the same run, and A/B rows for the decode attention
(the default, split-KV from 16K entries, against SDPA alone) and for `--compile`; (3) a 128K-token prefill
(budget 2048, SDPA's math kernel disabled so that a fallback fails loudly): time and measured peak against the memory model's prediction;
(5) weight-only int8 and int4 against bf16 weights at batch 1 and 8, and the int8 KV cache against bf16 at 16K.
`--long` runs (3) at 512K instead.

It needs the machine's preinstalled torch (and transformers for the HF rows) and nothing from the internet; run it
from the repository root with the repo on PYTHONPATH (the Makefile does). It writes
benchmarks/results/gpu_check.md (or gpu_check_long.md) and gpu_decode.png, and exits non-zero if any number it
promises is missing. The dry run writes to a temporary folder unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FULL = dict(shape="llama3-8b", dtype=torch.bfloat16, contexts=[1024, 16384, 131072], budgets=[1024, 2048],
            steps=30, prefill_len=131072, long_len=524288, prefill_budget=2048, chunk=4096)
DRY = dict(shape="tiny", dtype=torch.float32, contexts=[128, 512, 2048], budgets=[32, 64], steps=5,
           prefill_len=2048, long_len=4096, prefill_budget=64, chunk=256)


class Report:
    """Markdown sections and the numbers the run promised; `missing` lists the ones that did not come."""

    def __init__(self, path: Path, head: list[str]):
        self.path, self.head = path, head
        self.lines: list[str] = []
        self.missing: list[str] = []

    def section(self, title: str, *lines: str) -> None:
        self.lines += ["", f"## {title}", "", *lines]
        print(f"\n== {title}", *lines, sep="\n", flush=True)
        self.write()  # after every section: a run cut short still leaves what it measured

    def write(self, tail: list[str] = ()) -> None:
        self.path.write_text("\n".join(self.head + self.lines + list(tail)) + "\n")

    def need(self, name: str, value):
        if value is None:
            self.missing.append(name)
        return value


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_cuda_tests(report: Report, dry: bool) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if dry:
        env["SNAPKV_TEST_DEVICE"] = "cpu"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                          cwd=ROOT, env=env, capture_output=True, text=True)
    summary = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary)}
    report.section("1. CUDA tests (tests/test_cuda.py)", f"`pytest -q tests/test_cuda.py`: {summary}")
    if proc.returncode != 0:
        report.lines += ["", "```", *proc.stdout.strip().splitlines()[-40:], "```"]
        print(proc.stdout[-4000:], proc.stderr[-2000:], flush=True)
        report.missing.append("CUDA tests (failed)")
    elif not counts.get("passed"):
        report.missing.append("CUDA tests (none ran)")


def run_decode(report: Report, p: dict, device: torch.device) -> dict:
    """Section 2; returns the engine's full-cache ms per step by context, for section 4."""
    from benchmarks.decode import (build_model, copy_bandwidth, engine_step_ms, hf_model_for, hf_step_ms,
                                   plot, weight_bytes)

    mode = "graph" if device.type == "cuda" else "eager"
    model = build_model(p["shape"], device, p["dtype"])
    cfg = model.config
    entry_bytes = cfg.kv_bytes_per_token(p["dtype"].itemsize)
    weights, bandwidth = weight_bytes(model), copy_bandwidth(device)
    rows, steps = [], p["steps"]

    def measure(name, fn, *args):
        try:
            return fn(*args)
        except Exception as e:  # recorded and reported as missing; the rest of the run goes on
            print(f"{name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
            return None
        finally:
            free_memory(device)

    for context in p["contexts"]:
        for name, entries in [("full", context)] + [(f"SnapKV {b}", b) for b in p["budgets"]]:
            ms = measure(f"engine {name} at {context}", engine_step_ms, model, 1, entries, steps, mode)
            rows.append(dict(config=f"engine {name}", context=context, ms=ms, bytes=weights + entries * entry_bytes))
        print(f"context {context}: " + ", ".join(f"{r['config']} {r['ms']}" for r in rows if r["context"] == context),
              flush=True)
    # A/B in the same run: the default decode attention ("auto": split-KV from SPLIT_FROM entries) against SDPA's
    # kernel alone
    from fastattn import paths as fast

    default, fast.CUDA_DECODE = fast.CUDA_DECODE, "sdpa"
    for context in p["contexts"]:
        for name, entries in [("full", context), (f"SnapKV {p['budgets'][0]}", p["budgets"][0])]:
            rows.append(dict(config=f"engine {name}, SDPA decode", context=context,
                             bytes=weights + entries * entry_bytes,
                             ms=measure(f"engine {name} SDPA at {context}", engine_step_ms, model, 1, entries, steps,
                                        mode)))
    fast.CUDA_DECODE = default
    compiled_mode = "compile+graph" if device.type == "cuda" else "compile"
    entries = p["budgets"][0]
    rows.append(dict(config=f"engine SnapKV {entries}, --compile", context=p["contexts"][0],
                     bytes=weights + entries * entry_bytes,
                     ms=measure("engine compiled", engine_step_ms, model, 1, entries, steps, compiled_mode)))
    batch = {b: measure(f"batch {b}", engine_step_ms, model, b, p["budgets"][0], steps, mode) for b in (1, 8)}
    hf_rows = []
    try:
        hf = hf_model_for(p["shape"], model, device, p["dtype"])
    except Exception as e:
        print(f"HF transformers model: {type(e).__name__}: {e}", flush=True)
        hf = None
    for context in p["contexts"]:
        hf_rows.append(dict(config="HF StaticCache eager", context=context,
                            ms=measure(f"HF at {context}", hf_step_ms, hf, context, steps, True) if hf else None))
    del hf, model
    free_memory(device)

    def ms(config, context):
        return next((r["ms"] for r in rows + hf_rows if r["config"] == config and r["context"] == context), None)

    first, last = p["contexts"][0], p["contexts"][-1]
    middle = p["contexts"][1]
    lines = [f"{p['shape']} shape, random {str(p['dtype']).removeprefix('torch.')} weights, engine step mode "
             f"`{mode}`, median of {steps} steps (greedy sampling and the host read of the tokens included). Weights "
             f"read per step: {weights / 2**30:.2f} GiB; KV per token: {entry_bytes} B; measured copy bandwidth "
             f"(read + write): {bandwidth / 1e9:.0f} GB/s. The floor of a step is (weights + kept KV) / that "
             "bandwidth.", "",
             "| context | config | ms/step | floor ms | % of floor | achieved GB/s |", "|---:|---|---:|---:|---:|---:|"]
    for r in rows + hf_rows:
        floor = 1000 * r["bytes"] / bandwidth if "bytes" in r else None
        if r["ms"] is None:
            lines.append(f"| {r['context']} | {r['config']} | missing | | | |")
        elif floor is None:
            lines.append(f"| {r['context']} | {r['config']} | {r['ms']:.2f} | | | |")
        else:
            lines.append(f"| {r['context']} | {r['config']} | {r['ms']:.2f} | {floor:.2f} | "
                         f"{100 * floor / r['ms']:.0f}% | {r['bytes'] / r['ms'] / 1e6:.0f} |")
    goals = []
    for b in p["budgets"]:
        a, z = ms(f"engine SnapKV {b}", first), ms(f"engine SnapKV {b}", last)
        ratio = report.need(f"SnapKV {b} {last}/{first}", z / a if a and z else None)
        goals.append(f"SnapKV {b}: step at {last} / step at {first} = "
                     + (f"{ratio:.3f} (goal <= 1.05: {'met' if ratio <= 1.05 else 'missed'})" if ratio else "missing"))
    for b in p["budgets"]:
        full, snap = ms("engine full", middle), ms(f"engine SnapKV {b}", middle)
        speedup = report.need(f"full/SnapKV {b} at {middle}", full / snap if full and snap else None)
        goals.append(f"at {middle}: full cache / SnapKV {b} step time = "
                     + (f"{speedup:.2f}x (the paper's 3.6x: {'met' if speedup >= 3.6 else 'missed'})" if speedup
                        else "missing"))
    share = report.need("bandwidth share at batch 1",
                        (1000 * (weights + p["budgets"][0] * entry_bytes) / bandwidth) / batch[1] if batch[1] else None)
    goals.append(f"batch 1, SnapKV {p['budgets'][0]} entries: {100 * share:.0f}% of the bandwidth floor (goal >= 85%)"
                 if share else "bandwidth share: missing")
    compiled_ms = report.need("compiled step", ms(f"engine SnapKV {entries}, --compile", first))
    if compiled_ms:
        floor = 1000 * (weights + entries * entry_bytes) / bandwidth
        goals.append(f"batch 1, SnapKV {entries} entries, --compile (captured): {100 * floor / compiled_ms:.0f}% of "
                     f"the bandwidth floor, {ms(f'engine SnapKV {entries}', first) / compiled_ms:.2f}x the uncompiled "
                     "step")
    for context in p["contexts"]:
        default_ms, sdpa = ms("engine full", context), ms("engine full, SDPA decode", context)
        if report.need(f"SDPA decode at {context}", sdpa) and default_ms:
            goals.append(f"at {context}, full cache: SDPA decode / default decode ({fast.CUDA_DECODE}) step "
                         f"time = {sdpa / default_ms:.2f}x")
    tput = report.need("batch 8 / batch 1", batch[1] / batch[8] * 8 if batch[1] and batch[8] else None)
    goals.append(f"batch 8 / batch 1 tokens/s = {tput:.2f}x (SnapKV {p['budgets'][0]} entries)" if tput
                 else "batch 8 / batch 1: missing")
    for context in p["contexts"]:
        hf_ms, ours = ms("HF StaticCache eager", context), ms("engine full", context)
        best = min((m for m in (ms(f"engine SnapKV {b}", context) for b in p["budgets"]) if m), default=None)
        if report.need(f"HF at {context}", hf_ms) and ours and best:
            goals.append(f"at {context}: engine full / HF eager = {hf_ms / ours:.2f}x tokens/s; engine SnapKV "
                         f"(best budget) / HF eager = {hf_ms / best:.2f}x")
    for r in rows:
        report.need(f"{r['config']} at {r['context']}", r["ms"])
    report.section("2. Decode step vs context (batch 1)", *lines, "", "Goals, measured in this run:", "",
                   *[f"- {g}" for g in goals])
    plot([r for r in rows + hf_rows if r["ms"] is not None], report.out / "gpu_decode.png",
         f"{p['shape']}, {str(p['dtype']).removeprefix('torch.')}, {device.type}, step mode {mode}")
    return {c: ms("engine full", c) for c in p["contexts"]}


def run_quantized(report: Report, p: dict, device: torch.device) -> None:
    """Section 5: weight-only int8/int4 against the dtype's weights (random weights, quantized in memory), batch 1
    and 8 at the first budget's cache size, and the int8 KV cache against the dtype's at the longest full context
    that section 2 measured below 128K."""
    from benchmarks.decode import build_model, engine_step_ms, weight_bytes
    from engine.kv_cache import format_bytes
    from quant.store import quantize_model

    mode = "graph" if device.type == "cuda" else "eager"
    entries, steps = p["budgets"][0], p["steps"]
    rows = []
    for weights_dtype in (None, "int8", "int4"):
        try:
            model = build_model(p["shape"], device, p["dtype"])
            if weights_dtype:
                quantize_model(model, weights_dtype)
            for batch in (1, 8):
                ms = engine_step_ms(model, batch, entries, steps, mode)
                rows.append((weights_dtype or str(p["dtype"])[6:], batch, ms, weight_bytes(model)))
            if weights_dtype == "int8" and device.type == "cuda":  # what --compile makes of the dequantizing matmul
                rows.append(("int8, --compile", 1, engine_step_ms(model, 1, entries, steps, "compile+graph"),
                             weight_bytes(model)))
        except Exception as e:
            print(f"quantized {weights_dtype}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc()
        finally:
            model = None
            free_memory(device)
    lines = [f"Random {p['shape']} weights, {entries} cache entries per sequence, step mode {mode}.", "",
             "| weights | batch | ms/step | tok/s | weight bytes/step | vs dtype weights |", "|---|---:|---:|---:|---:|---:|"]
    base = {b: ms for w, b, ms, _ in rows if w == str(p["dtype"])[6:]}
    for w, b, ms, nbytes in rows:
        ratio = f"{base[b] / ms:.2f}x" if b in base and ms else "n/a"
        lines.append(f"| {w} | {b} | {ms:.2f} | {1000 * b / ms:.1f} | {format_bytes(nbytes)} | {ratio} |")
        report.need(f"{w} weights batch {b}", ms)
    model = build_model(p["shape"], device, p["dtype"])
    context = max(c for c in p["contexts"] if c < 131072) if max(p["contexts"]) >= 131072 else p["contexts"][-1]
    kv = {}
    for int8 in (False, True):
        try:
            kv[int8] = engine_step_ms(model, 1, context, steps, mode, kv_int8=int8)
        except Exception as e:
            print(f"int8 KV {int8}: {type(e).__name__}: {e}", flush=True)
        finally:
            free_memory(device)
    model = None
    free_memory(device)
    if len(kv) == 2:
        lines += ["", f"Full cache of {context} entries, batch 1: KV {str(p['dtype'])[6:]} {kv[False]:.2f} ms/step, "
                  f"KV int8 {kv[True]:.2f} ms/step ({kv[False] / kv[True]:.2f}x)."]
    report.need("int8 KV step", kv.get(True))
    report.section("5. Weight-only quantization and the int8 KV cache", *lines)


def run_hf_compiled(report: Report, p: dict, device: torch.device, engine_full: dict) -> None:
    """Section 4, last because compiling an 8B model takes minutes: HF under torch.compile(mode="reduce-overhead")
    at the shortest context, against the engine's full cache from section 2."""
    from benchmarks.decode import build_model, hf_model_for, hf_step_ms

    context = p["contexts"][0]
    start = time.perf_counter()
    try:
        hf = hf_model_for(p["shape"], build_model(p["shape"], device, p["dtype"]), device, p["dtype"])
        compiled = hf_step_ms(hf, context, p["steps"], static=True, compiled=True)
    except Exception as e:
        traceback.print_exc()
        report.section("4. HF transformers under torch.compile", f"failed: {type(e).__name__}: {e}")
        report.missing.append("HF compiled")
        return
    finally:
        free_memory(device)
    ours = engine_full.get(context)
    report.section("4. HF transformers under torch.compile",
                   f"StaticCache, torch.compile(mode=\"reduce-overhead\"), context {context}, batch 1: "
                   f"{compiled:.2f} ms per step (compile and warm-up took {time.perf_counter() - start:.0f} s)" +
                   (f"; engine full cache / HF compiled = {compiled / ours:.2f}x tokens/s" if ours else ""))

def run_prefill(report: Report, p: dict, device: torch.device, length: int) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks.long_context import run_one_random
    from snapkv import SnapKVConfig

    snapkv = SnapKVConfig(budget=p["prefill_budget"], window=32)
    fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
    try:
        with sdpa_kernel(fused) if device.type == "cuda" else _nothing():
            row = run_one_random(length, snapkv, p["chunk"], device, p["shape"], p["dtype"])
    except Exception as e:
        traceback.print_exc()
        report.section(f"3. Prefill of {length} tokens", f"failed: {type(e).__name__}: {e}")
        report.missing.append(f"prefill {length}")
        return
    finally:
        free_memory(device)
    measured, predicted = row["measured"], row["predicted"]
    report.need(f"prefill {length} measured peak", measured)
    lines = [f"{p['shape']} shape, {str(p['dtype']).removeprefix('torch.')}, SnapKV budget {p['prefill_budget']} "
             f"(window 32), chunk {p['chunk']}" + (", SDPA's math kernel disabled" if device.type == "cuda" else ""),
             "", "| tokens | prefill s | tokens/s | measured peak | predicted peak | measured / predicted |",
             "|---:|---:|---:|---:|---:|---:|",
             f"| {length} | {row['prefill_s']:.2f} | {length / row['prefill_s']:.0f} | "
             f"{(measured or 0) / 2**30:.2f} GiB | {predicted / 2**30:.2f} GiB | "
             f"{(measured or 0) / predicted:.2f} |", "",
             f"- within the prediction: {'yes' if measured is not None and measured <= predicted else 'NO'}"]
    report.section(f"3. Prefill of {length} tokens", *lines)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def environment(device: torch.device) -> list[str]:
    from fastattn.paths import flash_attn_with_kvcache

    lines = [f"- torch {torch.__version__}, Python {platform.python_version()}",
             f"- flash-attn: {'imports' if flash_attn_with_kvcache is not None else 'not installed (SDPA paths)'}"]
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        lines.insert(0, f"- {props.name}, compute capability {props.major}.{props.minor}, "
                        f"{props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} SMs")
    else:
        lines.insert(0, f"- CPU dry run, {torch.get_num_threads()} threads (tiny shapes: not a GPU measurement)")
    try:
        import transformers

        lines.append(f"- transformers {transformers.__version__}")
    except ImportError:
        lines.append("- transformers: not installed (no HF rows)")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: checks the script end to end")
    parser.add_argument("--long", action="store_true", help="only the 512K-token prefill (make gpu-check-long)")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; a "
                                                                  "temporary one for --dry-run)")
    parser.add_argument("--no-hf-compile", action="store_true", help="skip HF transformers under torch.compile")
    parser.add_argument("--sections", default="1,2,3,4,5", help="which sections to run (comma-separated numbers)")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu-check needs a CUDA GPU; use --dry-run to check the script on CPU", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    p = DRY if args.dry_run else FULL
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check_")) if args.dry_run else ROOT / "benchmarks" / "results")
    out.mkdir(parents=True, exist_ok=True)
    name = "gpu_check_long" if args.long else "gpu_check"
    command = f"python -m benchmarks.gpu_check{' --long' if args.long else ''}{' --dry-run' if args.dry_run else ''}"
    report = Report(out / f"{name}.md", [f"# GPU check{' (long)' if args.long else ''}"
                                         f"{' (DRY RUN on CPU)' if args.dry_run else ''}", "",
                                         f"`{command}`, {time.strftime('%Y-%m-%d')}.", "", *environment(device)])
    report.out = out
    start = time.perf_counter()
    if args.long:
        run_prefill(report, p, device, p["long_len"])
    else:
        sections = set(args.sections.split(","))
        if "1" in sections:
            run_cuda_tests(report, args.dry_run)
        engine_full = run_decode(report, p, device) if "2" in sections else {}
        if "3" in sections:
            run_prefill(report, p, device, p["prefill_len"])
        if "5" in sections:
            run_quantized(report, p, device)
        if "4" in sections and not (args.dry_run or args.no_hf_compile):
            run_hf_compiled(report, p, device, engine_full)
    elapsed = time.perf_counter() - start
    report.write(["", "## Missing", "", *([f"- {m}" for m in report.missing] or
                                          ["- nothing: every number was measured"]), "", f"{elapsed:.0f} s in all."])
    print(f"\nwrote {report.path} in {elapsed:.0f} s", flush=True)
    if report.missing:
        print("missing: " + "; ".join(report.missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
