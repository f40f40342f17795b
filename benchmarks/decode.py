"""Decode benchmark: milliseconds per decode step vs context length, full cache vs SnapKV budgets, this engine vs
HF transformers (full, growing DynamicCache) on the same model; batch 1/4/8 throughput; achieved GB/s per step
against the bytes a step must read (weights + kept KV) and against measured copy bandwidth.

    .venv/bin/python -m benchmarks.decode                                   # CPU: SmolLM2 float32, 1K -> 8K
    python -m benchmarks.decode --device cuda --shape llama3-8b --dtype bfloat16 \\
        --contexts 1024,4096,16384,65536,131072                             # GPU: random 8B weights, CUDA graphs

The cache is filled with random K/V of the requested length instead of running a prefill: a decode step's cost
does not depend on the values, and this keeps the CPU run to minutes. Writes benchmarks/results/decode_steps_<device>.md
and .png, and prints the goal ratios at the end.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from engine.decode_step import GraphedStep, graph_capture_supported, new_graph_pool
from engine.model_runner import ModelRunner, batch_bucket
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, RotaryEmbedding
from formats.convert import hf_config
from formats.loader import load_model
from quant.store import WEIGHTS_DTYPES, quantize_model
from models.llama import weight_bytes as stored_bytes
from parallel.shard import TensorParallel
from quant.kv_int8 import Int8KVCache

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # random-weight presets for shapes whose real weights are not reachable from here
    "smollm2-random": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64,
                           intermediate_size=1536, vocab_size=49152, rope_theta=100000.0,
                           max_position_embeddings=1 << 20, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=256,
                 vocab_size=512, rope_theta=10000.0, max_position_embeddings=1 << 20, tie_word_embeddings=False),
    # the shape of the tensor-parallel tests (8 query heads, 4 kv heads, SmolLM2's vocabulary)
    "tiny-tp": dict(hidden_size=128, num_layers=2, num_heads=8, num_kv_heads=4, head_dim=16, intermediate_size=256,
                    vocab_size=49152, max_position_embeddings=1 << 20),
    # TinyLlama-1.1B's shape: 22 layers, 32 heads / 4 kv heads, vocab 32000
    "llama-1b": dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4, head_dim=64,
                     intermediate_size=5632, vocab_size=32000, max_position_embeddings=1 << 20),
    "llama3-8b": dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                      max_position_embeddings=131072 * 4, tie_word_embeddings=False),
}


def build_model(shape: str, device: torch.device, dtype: torch.dtype,
                tp: TensorParallel | None = None) -> LlamaForCausalLM:
    """The real SmolLM2, or random weights of a preset shape (tp: this rank's shard of it, collectives attached)."""
    if shape == "smollm2":
        return load_model(ROOT / "weights" / "SmolLM2-135M-Instruct", dtype, device)
    cfg = ModelConfig(**SHAPES[shape])
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype: an 8B model never exists in float32 first
    try:
        with torch.device(device):
            model = tp.build(cfg) if tp is not None else LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.rotary = RotaryEmbedding(cfg).to(device)
    if tp is not None:
        tp.attach(model)
    return model.eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def weight_bytes(model: torch.nn.Module) -> int:
    """Weight bytes one decode step reads (quantized ones with their scales): all but the embedding table, which
    is only looked up (a tied table is read in full by the lm_head)."""
    head = {t.data_ptr() for t in model.lm_head.state_dict().values()}
    unread = sum(t.nbytes for t in model.model.embed_tokens.state_dict().values() if t.data_ptr() not in head)
    return stored_bytes(model) - unread


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    x = torch.ones(2**28 // 4 * (4 if device.type == "cuda" else 1), dtype=torch.float32, device=device)
    y = torch.zeros_like(x)  # both written first: untouched pages would read as the shared zero page
    y.copy_(x)
    times = []
    for _ in range(5):
        sync(device)
        start = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * x.nbytes / min(times)


def engine_step_ms(model, batch: int, entries: int, steps: int, mode: str, kv_int8: bool = False,
                   times: list | None = None) -> float:
    """Median ms of one engine decode step (greedy sampling and the host read of the tokens included) with
    `entries` cache entries per sequence (random K/V), through the engine's own ModelRunner. mode: "eager",
    "graph", "compile", or "compile+graph" (`--compile` on CUDA: the compiled step captured as a graph; only the
    greedy step of this bucket is compiled here, the one measured, since each compile of a large model takes a
    while). times: if a list, each timed step's seconds are appended to it."""
    runner = ModelRunner(model, batch, entries + steps + 8, 4096, cuda_graph=mode == "graph",
                         compile=mode == "compile", cache_class=Int8KVCache if kv_int8 else None)
    if mode == "compile+graph":
        key = (batch_bucket(batch, batch), "greedy")
        runner.static = True
        compiled = torch.compile(runner.runners[key], fullgraph=True, dynamic=False)
        runner.runners[key] = (GraphedStep(compiled, runner.capacity, new_graph_pool(), runner.device)
                               if graph_capture_supported(runner.device) else compiled)
    for buffer in (runner.cache.k, runner.cache.v):
        buffer.random_(-127, 128) if kv_int8 else buffer.normal_()
    if kv_int8:
        runner.cache.k_scale.fill_(0.01)
        runner.cache.v_scale.fill_(0.01)
    live = [SimpleNamespace(slot=s, cache_entries=entries, sampling_mode="greedy") for s in range(batch)]

    def reset():
        runner.cache.lengths.fill_(entries)
        runner.inputs.positions.fill_(entries)
        runner.inputs.active.fill_(1)
        for seq in live:
            seq.cache_entries = entries

    reset()
    for _ in range(3):
        runner.decode(live)
    reset()
    times = [] if times is None else times
    for _ in range(steps):
        sync(runner.device)
        start = time.perf_counter()
        runner.decode(live)  # ends in the one device-to-host read of the sampled tokens
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[-steps:])


def hf_step_ms(model, context: int, steps: int, static: bool = False, compiled: bool = False) -> float:
    """Median ms of one HF decode forward (batch 1) on a cache holding `context` random entries: a growing
    DynamicCache (HF's default), or a StaticCache (HF's fast path), and with `compiled` its
    torch.compile(mode="reduce-overhead") recipe (CUDA graphs on CUDA)."""
    from transformers import DynamicCache, StaticCache

    cfg, device = model.config, model.device
    dtype = next(model.parameters()).dtype
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = StaticCache(config=cfg, max_cache_len=context + steps + 8) if static else DynamicCache(config=cfg)
    for layer in range(cfg.num_hidden_layers):
        k = torch.randn(1, cfg.num_key_value_heads, context, head_dim, dtype=dtype, device=device)
        cache.update(k, torch.randn_like(k), layer, {"cache_position": torch.arange(context, device=device)})
    forward = torch.compile(model.forward, mode="reduce-overhead") if compiled else model.forward
    token = torch.tensor([[100]], device=device)
    times = []
    with torch.inference_mode():
        for i in range(steps + 3):
            sync(device)
            start = time.perf_counter()
            position = torch.tensor([context + i], device=device)
            out = forward(input_ids=token, past_key_values=cache, use_cache=True, cache_position=position,
                          position_ids=position[None])
            token = out.logits[:, -1].argmax(-1, keepdim=True).clone()
            sync(device)
            if i >= 3:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def hf_model_for(shape: str, ours: LlamaForCausalLM, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM as HFLlama

    if shape == "smollm2":
        return AutoModelForCausalLM.from_pretrained(ROOT / "weights" / "SmolLM2-135M-Instruct",
                                                    dtype=dtype).to(device).eval()
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(**{k: v for k, v in hf_config(ours.config).items() if k not in ("architectures",)})
    with torch.device("meta"):
        hf = HFLlama(cfg).to(dtype).eval()
    hf.load_state_dict(ours.state_dict(), strict=False, assign=True)  # the same tensors: no second copy
    with torch.device(device):
        hf.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)
    return hf


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["config"] for r in rows):
        pts = [(r["context"], r["ms"]) for r in rows if r["config"] == name]
        ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("ms per decode step (batch 1)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--shape", default="smollm2", choices=["smollm2", *SHAPES])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--weights-dtype", default=None, choices=WEIGHTS_DTYPES[1:],
                        help="store the engine's weights quantized (HF keeps --dtype)")
    parser.add_argument("--contexts", default="1024,2048,4096,8192")
    parser.add_argument("--budgets", default="512,1024,2048")
    parser.add_argument("--batches", default="1,4,8")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mode", default=None, choices=["eager", "compile", "graph"],
                        help="how the engine runs its step (default: graph on CUDA, eager on CPU)")
    parser.add_argument("--no-hf", action="store_true", help="skip the HF transformers comparison")
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float32" if args.device == "cpu" else "bfloat16"))
    mode = args.mode or ("graph" if device.type == "cuda" else "eager")
    contexts = [int(c) for c in args.contexts.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    model = build_model(args.shape, device, dtype)
    cfg = model.config
    entry_bytes = cfg.kv_bytes_per_token(torch.empty((), dtype=dtype).element_size())
    weights = weight_bytes(model)
    bandwidth = copy_bandwidth(device)
    hf = None if args.no_hf else hf_model_for(args.shape, model, device, dtype)
    if args.weights_dtype:
        quantize_model(model, args.weights_dtype)
        weights = weight_bytes(model)

    rows = []
    for context in contexts:
        configs = [("engine full", context)] + [(f"engine SnapKV {b}", b) for b in budgets if b < context]
        for name, entries in configs:
            ms = engine_step_ms(model, 1, entries, args.steps, mode)
            rows.append(dict(config=name, context=context, ms=ms, bytes=weights + entries * entry_bytes))
        if hf is not None:
            rows.append(dict(config="HF transformers full", context=context, ms=hf_step_ms(hf, context, args.steps),
                             bytes=weights + context * entry_bytes))
        print(f"context {context}: " + ", ".join(f"{r['config']} {r['ms']:.1f} ms" for r in rows
                                                 if r["context"] == context), flush=True)
    throughput = []
    batch_entries = min(budgets)
    for batch in batches:
        ms = engine_step_ms(model, batch, batch_entries, args.steps, mode)
        throughput.append(dict(batch=batch, ms=ms, tok_s=batch * 1000 / ms,
                               bytes=weights + batch * batch_entries * entry_bytes))

    name = f"decode_steps_{device.type}" + ("" if args.mode is None else f"_{mode}") + \
        (f"_{args.weights_dtype}" if args.weights_dtype else "")
    out_dir = ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    title = f"{args.shape}, {str(dtype).removeprefix('torch.')}, {device.type}, step mode {mode}" + \
        (f", {args.weights_dtype} weights" if args.weights_dtype else "")
    plot(rows, out_dir / f"{name}.png", title)
    lines = [f"# Decode step latency: {title}", "",
             f"Command: `python -m benchmarks.decode --device {args.device} --shape {args.shape} "
             f"{'--weights-dtype ' + args.weights_dtype + ' ' if args.weights_dtype else ''}"
             f"--contexts {args.contexts} --budgets {args.budgets} --batches {args.batches} --steps {args.steps}`",
             f"Median of {args.steps} steps; cache filled with random K/V. Weights read per step: "
             f"{weights / 2**20:.0f} MiB; KV per token: {entry_bytes} B. Measured copy bandwidth: "
             f"{bandwidth / 1e9:.1f} GB/s. Threads: {torch.get_num_threads()}.", "",
             "| context | config | ms/step | tok/s | bytes read/step | achieved GB/s | % of copy bandwidth |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gbs = r["bytes"] / (r["ms"] / 1000) / 1e9
        lines.append(f"| {r['context']} | {r['config']} | {r['ms']:.2f} | {1000 / r['ms']:.1f} | "
                     f"{r['bytes'] / 2**20:.0f} MiB | {gbs:.1f} | {100 * gbs * 1e9 / bandwidth:.0f}% |")
    lines += ["", f"Batch throughput (engine, SnapKV-sized cache of {batch_entries} entries per sequence):", "",
              "| batch | ms/step | tok/s | achieved GB/s |", "|---:|---:|---:|---:|"]
    for t in throughput:
        lines.append(f"| {t['batch']} | {t['ms']:.2f} | {t['tok_s']:.1f} | {t['bytes'] / (t['ms'] / 1000) / 1e9:.1f} |")

    def ms_of(config, context):
        return next((r["ms"] for r in rows if r["config"] == config and r["context"] == context), None)

    last = contexts[-1]
    ratios = []
    for b in budgets:  # constant latency: the same budget at the shortest context that compresses vs the longest
        compressed = [c for c in contexts if b < c]
        if len(compressed) > 1:
            ratios.append(f"SnapKV {b}: step at {last} / step at {compressed[0]} = "
                          f"{ms_of(f'engine SnapKV {b}', last) / ms_of(f'engine SnapKV {b}', compressed[0]):.3f} "
                          "(goal <= 1.05)")
    if hf is not None:
        for context in contexts:
            best = min(ms_of(f"engine SnapKV {b}", context) or ms_of("engine full", context) for b in budgets)
            ratios.append(f"context {context}: engine full / HF = {ms_of('HF transformers full', context) / ms_of('engine full', context):.2f}x tok/s; "
                          f"engine SnapKV (best budget) / HF = {ms_of('HF transformers full', context) / best:.2f}x tok/s")
    tput = {t["batch"]: t["tok_s"] for t in throughput}
    if 1 in tput and max(tput) > 1:
        ratios.append(f"batch {max(tput)} / batch 1 tokens/s = {tput[max(tput)] / tput[1]:.2f}x")
    lines += ["", "## Ratios (measured in this run)", "", *[f"- {r}" for r in ratios], ""]
    (out_dir / f"{name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
