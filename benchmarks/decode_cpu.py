"""CPU decode benchmark: tokens/s of this engine for each weights dtype against HF transformers in float32 and in
bfloat16 (and llama.cpp on the same GGUF when llama-cpp-python is installed), SmolLM2-135M-Instruct, greedy, batch
1 and 8, all in one run, interleaved; with the bytes each decode step must read and the GB/s achieved. Writes
benchmarks/results/decode_cpu.md.

    .venv/bin/python -m benchmarks.decode_cpu [--prompt-tokens 512] [--new-tokens 64] [--repeats 3] [--batches 1,8]

llama.cpp is optional (`pip install llama-cpp-python`, built from source, a few minutes); without it the results say
so. It runs batch 1 only (its Python binding decodes one sequence).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks.decode import weight_bytes as step_weight_bytes

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
GGUF = ROOT / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"
RESULTS = ROOT / "benchmarks" / "results" / "decode_cpu.md"
# (row name, model path, LLM keyword arguments)
ENGINES = [
    ("this engine float32", MODEL, {}),
    ("this engine bfloat16 weights", MODEL, {"weights_dtype": "bfloat16"}),
    ("this engine int8", MODEL, {"weights_dtype": "int8"}),
    ("this engine int4", MODEL, {"weights_dtype": "int4"}),
    ("this engine GGUF as shipped (Q4_1 -> int4, Q8_0 -> int8)", GGUF, {"weights_dtype": "auto"}),
    ("this engine int4 + int8 KV", MODEL, {"weights_dtype": "int4", "kv_dtype": "int8"}),
]


def ours(llm, ids: list[int], batch: int, n: int) -> tuple[float, float]:
    """(prefill tok/s, decode tok/s summed over the batch). Batch 1: the request's own decode time (its decode
    steps only). A batch: the engine admits its prompts one prefill at a time between decode steps, so decode time
    is the whole call less its prefills (as HF's is its generate less its one batched prefill)."""
    from engine import SamplingParams

    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=[ids] * batch, sampling_params=SamplingParams(max_tokens=n, ignore_eos=True))
    wall = time.perf_counter() - start
    prefill = sum(o.stats["prefill_s"] for o in outs)
    decode = outs[0].stats["decode_s"] if batch == 1 else wall - prefill
    return batch * len(ids) / prefill, batch * (n - 1) / decode


def hf(model, ids: list[int], batch: int, n: int) -> tuple[float, float]:
    x = torch.tensor([ids] * batch)
    kwargs = dict(attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(x, max_new_tokens=n, min_new_tokens=n, **kwargs)
        total = time.perf_counter() - start
    assert out.shape[1] == len(ids) + n
    return batch * len(ids) / prefill, batch * (n - 1) / (total - prefill)


def llama_cpp(model, ids: list[int], batch: int, n: int) -> tuple[float, float]:
    import numpy as np

    def greedy() -> int:  # the last position's logits, read from the context (the binding keeps none itself)
        return int(np.argmax(np.ctypeslib.as_array(model._ctx.get_logits_ith(-1), shape=(model.n_vocab(),))))

    model.reset()
    start = time.perf_counter()
    model.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n - 1):
        model.eval([greedy()])
    return len(ids) / prefill, (n - 1) / (time.perf_counter() - start)


def gguf_bytes() -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(GGUF).tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", default="1,8")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]

    from transformers import AutoModelForCausalLM

    from engine import LLM

    n = args.new_tokens
    runners, bytes_per_step = {}, {}
    text = (ROOT / "examples" / "long_prompt.txt").read_text()
    ids = None
    for name, path, kwargs in ENGINES:
        llm = LLM(path, max_batch_size=max(batches), max_kv_len=args.prompt_tokens + n + 8, **kwargs)
        ids = ids or llm.tokenizer.encode(text)[: args.prompt_tokens]
        runners[name] = (ours, llm)
        bytes_per_step[name] = (step_weight_bytes(llm.model), llm.kv_bytes_per_entry)
    for name, dtype in (("HF transformers float32", torch.float32), ("HF transformers bfloat16", torch.bfloat16)):
        model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=dtype).eval()
        runners[name] = (hf, model)
        kv = model.config.num_hidden_layers * model.config.num_key_value_heads * 2 * \
            (model.config.hidden_size // model.config.num_attention_heads) * dtype.itemsize
        bytes_per_step[name] = (sum(p.nbytes for p in model.parameters()), kv)  # tied: the table once
    try:
        from llama_cpp import Llama

        runners["llama.cpp (llama-cpp-python, same GGUF)"] = (llama_cpp, Llama(
            model_path=str(GGUF), n_ctx=args.prompt_tokens + n + 16, n_threads=torch.get_num_threads(),
            n_batch=512, verbose=False))
        cfg = runners["this engine float32"][1].config
        bytes_per_step["llama.cpp (llama-cpp-python, same GGUF)"] = (gguf_bytes(), cfg.kv_bytes_per_token(2))
        llama_note = ""
    except ImportError:
        llama_note = "llama.cpp: not measured (llama-cpp-python is not installed here: `pip install llama-cpp-python`)."

    rows: dict[tuple[str, int], list[tuple[float, float]]] = {}
    for r in range(args.repeats):  # interleaved, so machine noise hits every engine alike
        for name, (fn, model) in runners.items():
            for batch in batches:
                if batch > 1 and fn is llama_cpp:
                    continue
                rows.setdefault((name, batch), []).append(fn(model, ids, batch, n))
        print(f"repeat {r + 1}/{args.repeats} done", flush=True)
    med = {key: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
           for key, vals in rows.items()}

    context = len(ids) + n / 2  # the mean number of cache entries a decode step reads
    lines = [
        "# CPU decode: weights dtypes vs HF transformers and llama.cpp, SmolLM2-135M-Instruct, greedy",
        "",
        f"Prompt {len(ids)} tokens, {n} new tokens, median of {args.repeats} interleaved runs; torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}. "
        "This engine runs the full cache here (no SnapKV) so that every row decodes the same context. "
        "Bytes per step = the weights a step reads (the embedding table only through a tied lm_head) + the KV "
        "cache at the mean context, per sequence.",
        f"Command: `.venv/bin/python -m benchmarks.decode_cpu --prompt-tokens {args.prompt_tokens} --new-tokens {n} "
        f"--repeats {args.repeats} --batches {args.batches}`",
        "",
        "| engine | batch | prefill tok/s | decode tok/s | ms/step | bytes/step | achieved GB/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (name, batch), (prefill, decode) in med.items():
        weights, kv = bytes_per_step[name]
        step_bytes = weights + batch * context * kv
        ms = 1000 * batch / decode
        lines.append(f"| {name} | {batch} | {prefill:.0f} | {decode:.1f} | {ms:.1f} | {step_bytes / 1e6:.0f} MB | "
                     f"{step_bytes / (ms / 1000) / 1e9:.1f} |")
    if llama_note:
        lines += ["", llama_note]

    def decode_of(name, batch=1):
        return med[(name, batch)][1] if (name, batch) in med else None

    base = decode_of("HF transformers float32")
    goals = {"this engine int4": 2.5, "this engine int8": 1.8}
    lines += ["", "## Ratios (decode tokens/s, measured in this run)", ""]
    for batch in batches:
        for name in [e[0] for e in ENGINES]:
            ratio = decode_of(name, batch) / decode_of("HF transformers float32", batch)
            ratio_bf = decode_of(name, batch) / decode_of("HF transformers bfloat16", batch)
            goal = f" (goal >= {goals[name]}x: {'met' if ratio >= goals[name] else 'missed'})" \
                if batch == 1 and name in goals else ""
            lines.append(f"- batch {batch}, {name}: {ratio:.2f}x HF float32{goal}, {ratio_bf:.2f}x HF bfloat16")
    llama = decode_of("llama.cpp (llama-cpp-python, same GGUF)")
    if llama is not None and base:
        for name in ("this engine int4", "this engine GGUF as shipped (Q4_1 -> int4, Q8_0 -> int8)"):
            ratio = llama / decode_of(name)
            lines.append(f"- batch 1: llama.cpp / {name} = {ratio:.2f}x (goal: within 1.5x, "
                         f"{'met' if ratio <= 1.5 else 'missed'})")
    lines.append("")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
