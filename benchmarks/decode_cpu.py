"""CPU decode benchmark: prefill and decode tokens/s of this engine vs HF transformers `generate` on SmolLM2,
same prompt, batch 1, float32, greedy, both measured in one run. Writes benchmarks/results/decode_cpu.md.

    .venv/bin/python -m benchmarks.decode_cpu [--prompt-tokens 1000] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results" / "decode_cpu.md"


def hf_timings(model, ids: list[int], new_tokens: int) -> tuple[float, float]:
    """(prefill_s, decode_s): prefill = generate 1 token; decode = the rest of a full generate."""
    x = torch.tensor([ids])
    kwargs = dict(attention_mask=torch.ones_like(x), do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(x, max_new_tokens=1, **kwargs)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
        total = time.perf_counter() - start
    assert out.shape[1] == len(ids) + new_tokens
    return prefill, total - prefill


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from engine import LLM, SamplingParams

    llm = LLM(MODEL)  # full cache: the comparison is about the engine, not compression
    hf = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    text = (ROOT / "examples" / "long_prompt.txt").read_text()
    ids = llm.tokenizer.encode(text)[: args.prompt_tokens]
    params = SamplingParams(max_tokens=args.new_tokens, ignore_eos=True)
    n = args.new_tokens
    rows = {"this engine": [], "HF transformers": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        s = llm.generate(prompt_token_ids=[ids], sampling_params=params)[0].stats
        rows["this engine"].append((len(ids) / s["prefill_s"], (n - 1) / s["decode_s"]))
        prefill, decode = hf_timings(hf, ids, n)
        rows["HF transformers"].append((len(ids) / prefill, (n - 1) / decode))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in rows.items()}
    ratio_prefill = med["this engine"][0] / med["HF transformers"][0]
    ratio_decode = med["this engine"][1] / med["HF transformers"][1]
    lines = [
        "# CPU decode benchmark: SmolLM2-135M-Instruct, float32, batch 1, greedy",
        "",
        f"Prompt {len(ids)} tokens, {n} new tokens, median of {args.repeats} interleaved runs; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}.",
        f"Command: `.venv/bin/python -m benchmarks.decode_cpu --prompt-tokens {args.prompt_tokens} "
        f"--new-tokens {n} --repeats {args.repeats}`",
        "",
        "| engine | prefill tok/s | decode tok/s |",
        "|---|---:|---:|",
        *[f"| {k} | {p:.1f} | {d:.2f} |" for k, (p, d) in med.items()],
        "",
        f"Ratio this engine / HF: prefill {ratio_prefill:.2f}x, decode {ratio_decode:.2f}x.",
        "",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
