"""Load on a live snapkv-serve: concurrency levels, then long prompts under a fixed KV memory limit.

    .venv/bin/python -m benchmarks.serve_load [--levels 1,4,8,16,64] [--long-requests 16] [--seed 0]

Part 1 (load): one server (SmolLM2-135M-Instruct, float32, CPU, 8 slots, SnapKV defaults). For each level of
concurrent clients, every client streams --requests-per-client chat completions back to back through the openai
client: prompts are 100-600-token slices of examples/long_prompt.txt (fixed seed) with a question, max_tokens
--max-tokens with eos ignored. Reported: requests/s, output tokens/s, time to first token and inter-token latency
(the gaps between text chunks) at p50/p99, and errors (a non-200, a broken stream or a short answer).

Part 2 (the headline): 4K-token prompts under one KV memory limit, the size of --full-slots full-cache slots
(4,096 + --long-max-tokens entries each). The full cache, SnapKV budget 1024 (4x) and budget 512 (8x) each get a
server whose slots are as many as that memory holds at their capacity (budget + max_tokens), and --long-requests
requests at once. Reported: the most requests running at once (polled from /metrics), output tokens/s over the
run, and decode tokens/s (steps that did not wait for a prefill).

Writes benchmarks/results/serve_load_cpu.md and .png. On a GPU: add `--device cuda --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from benchmarks.throughput import MODEL, RESULTS, ROOT, percentile

LONG_PROMPT = 4096
BUDGETS = {"full cache": None, "SnapKV 4x (budget 1024)": 1024, "SnapKV 8x (budget 512)": 512}


class LiveServer:
    """snapkv-serve in a subprocess on a free port, for the duration of a with-block."""

    def __init__(self, *args: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = Path(f"/tmp/serve_load_{self.port}.log")
        command = [str(Path(sys.executable).parent / "snapkv-serve"), "--model", str(MODEL), "--port",
                   str(self.port), *args]
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT)

    def __enter__(self) -> "LiveServer":
        deadline = time.monotonic() + 300
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"snapkv-serve exited:\n{self.log.read_text()}")
            try:
                urllib.request.urlopen(self.base + "/health", timeout=2).read()
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"snapkv-serve did not start:\n{self.log.read_text()}")
                time.sleep(0.5)

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)

    def metric(self, name: str) -> float:
        text = urllib.request.urlopen(self.base + "/metrics", timeout=60).read().decode()
        found = re.search(rf"^{name} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0


async def one_request(client, prompt_ids: list[int], max_tokens: int) -> dict:
    """Stream one completion; record its start, the time of each text chunk, and whether it was whole."""
    start = time.perf_counter()
    times, tokens = [], 0
    try:
        stream = await client.completions.create(model=client.served, prompt=prompt_ids, max_tokens=max_tokens,
                                                 temperature=0, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                times.append(time.perf_counter())
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
    except Exception as e:  # an error is a result here: counted, never hidden
        return {"start": start, "times": times, "tokens": 0, "error": f"{type(e).__name__}: {e}"}
    return {"start": start, "times": times, "tokens": tokens,
            "error": None if tokens == max_tokens else f"short answer: {tokens} of {max_tokens} tokens"}


def client_for(server: LiveServer):
    import openai

    client = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="none", max_retries=0, timeout=3600)
    client.served = MODEL.name
    return client


async def run_level(server: LiveServer, clients: int, per_client: int, prompts: list[list[int]],
                    max_tokens: int) -> tuple[list[dict], float]:
    queue = iter(prompts)
    async with client_for(server) as client:
        async def one_client():
            return [await one_request(client, next(queue), max_tokens) for _ in range(per_client)]

        start = time.perf_counter()
        results = await asyncio.gather(*(one_client() for _ in range(clients)))
    return [r for rs in results for r in rs], time.perf_counter() - start


def summarize(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["error"] is None]
    ttft = [r["times"][0] - r["start"] for r in ok if r["times"]]
    itl = [(b - a) * 1000 for r in ok for a, b in zip(r["times"], r["times"][1:])]
    return {"requests": len(records), "errors": len(records) - len(ok), "wall_s": wall,
            "req_per_s": len(ok) / wall, "tok_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50": percentile(ttft, 50), "ttft_p99": percentile(ttft, 99),
            "itl_p50": percentile(itl, 50), "itl_p99": percentile(itl, 99),
            "first_error": next((r["error"] for r in records if r["error"]), None)}


def token_stream(tokenizer_path: Path) -> list[int]:
    from engine.tokenizer import Tokenizer

    ids = Tokenizer.from_path(tokenizer_path).encode((ROOT / "examples" / "long_prompt.txt").read_text())
    return ids * (1 + 2 * LONG_PROMPT // len(ids))


def slices(stream: list[int], count: int, low: int, high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        n = rng.randint(low, high)
        start = rng.randrange(0, len(stream) - n)
        out.append(stream[start:start + n])
    return out


def load_levels(args, stream: list[int], engine_flags: list[str]) -> list[dict]:
    rows = []
    with LiveServer("--max-batch-size", "8", "--max-waiting", "1024", *engine_flags) as server:
        for clients in args.levels:
            prompts = slices(stream, clients * args.requests_per_client, 100, 600, args.seed + clients)
            records, wall = asyncio.run(run_level(server, clients, args.requests_per_client, prompts,
                                                  args.max_tokens))
            row = {"clients": clients} | summarize(records, wall)
            print(f"{clients:>3} clients: {row['req_per_s']:.2f} req/s, {row['tok_per_s']:.1f} tok/s, "
                  f"TTFT p50 {row['ttft_p50']:.2f} s, errors {row['errors']}", flush=True)
            rows.append(row)
    return rows


def fixed_memory(args, stream: list[int], engine_flags: list[str]) -> tuple[list[dict], int]:
    from formats.loader import load_config

    per_entry = load_config(MODEL).kv_bytes_per_token(4 if args.dtype == "float32" else 2)
    memory = args.full_slots * (LONG_PROMPT + args.long_max_tokens) * per_entry
    rows = []
    for label, budget in BUDGETS.items():
        capacity = (budget or LONG_PROMPT) + args.long_max_tokens
        slots = memory // (capacity * per_entry)
        snapkv = ["--no-snapkv"] if budget is None else ["--budget", str(budget)]
        prompts = slices(stream, args.long_requests, LONG_PROMPT - 64, LONG_PROMPT - 64, args.seed)
        with LiveServer("--max-batch-size", str(slots), "--max-kv-len", str(capacity), *snapkv,
                        *engine_flags) as server:
            peak, done = 0.0, threading.Event()

            def poll():
                nonlocal peak
                while not done.wait(0.5):
                    peak = max(peak, server.metric("snapkv_requests_running"))

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            records, wall = asyncio.run(run_level(server, args.long_requests, 1, prompts, args.long_max_tokens))
            done.set()
            poller.join()
            steps = server.metric("snapkv_decode_step_seconds_count")
            step_s = server.metric("snapkv_decode_step_seconds_sum")
        row = {"config": label, "slots": slots, "capacity": capacity, "kv_bytes": slots * capacity * per_entry,
               "peak_running": int(peak), "decode_steps": int(steps), "decode_step_ms": 1000 * step_s / max(steps, 1),
               } | summarize(records, wall)
        row["decode_tok_per_s"] = sum(r["tokens"] for r in records if not r["error"]) / step_s if step_s else 0.0
        print(f"{label}: {slots} slots, peak {row['peak_running']} running, {row['tok_per_s']:.1f} tok/s, "
              f"decode {row['decode_tok_per_s']:.1f} tok/s, errors {row['errors']}", flush=True)
        rows.append(row)
    return rows, memory


def write_report(args, levels: list[dict], long_rows: list[dict], memory: int, path: Path) -> None:
    from engine.kv_cache import format_bytes

    lines = ["# snapkv-serve under load (CPU)", "",
             "Command: `" + " ".join([".venv/bin/python -m benchmarks.serve_load", *sys.argv[1:]]) + "`", "",
             f"SmolLM2-135M-Instruct, {args.dtype}, {args.device}, 2 threads; the clients (openai's AsyncOpenAI, "
             "streaming /v1/completions with pre-tokenized prompts, eos ignored) share the machine.", "",
             f"## Concurrency levels (8 slots, SnapKV defaults; prompts 100-600 tokens, max_tokens {args.max_tokens}, "
             f"{args.requests_per_client} requests per client)", "",
             "| clients | requests | errors | requests/s | output tok/s | TTFT p50 s | TTFT p99 s | ITL p50 ms "
             "| ITL p99 ms |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in levels:
        lines.append(f"| {r['clients']} | {r['requests']} | {r['errors']} | {r['req_per_s']:.2f} | "
                     f"{r['tok_per_s']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p99']:.2f} | {r['itl_p50']:.0f} | "
                     f"{r['itl_p99']:.0f} |")
    errors = [r["first_error"] for r in levels + long_rows if r["first_error"]]
    lines += ["", f"Errors over all levels: **{sum(r['errors'] for r in levels)}**"
              + (f" (first: {errors[0]})" if errors else ""), "",
              f"## Long prompts under a fixed KV memory limit of {format_bytes(memory)}", "",
              f"{args.long_requests} requests at once, each a {LONG_PROMPT - 64}-token prompt and "
              f"{args.long_max_tokens} new tokens. Slots = the limit / (capacity x bytes per entry). Decode tok/s: "
              "output tokens over the time spent in decode steps (prefills excluded).", "",
              "| cache | slots x capacity | KV bytes | peak running | errors | output tok/s | decode tok/s | "
              "decode step ms | wall s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in long_rows:
        lines.append(f"| {r['config']} | {r['slots']} x {r['capacity']} | {format_bytes(r['kv_bytes'])} | "
                     f"{r['peak_running']} | {r['errors']} | {r['tok_per_s']:.1f} | {r['decode_tok_per_s']:.1f} | "
                     f"{r['decode_step_ms']:.0f} | {r['wall_s']:.0f} |")
    full = long_rows[0]
    lines += ["", "Against the full cache, in this run: " + "; ".join(
        f"{r['config']}: {r['peak_running'] / max(full['peak_running'], 1):.1f}x the requests at once, "
        f"{r['tok_per_s'] / full['tok_per_s']:.2f}x output tok/s, {r['decode_tok_per_s'] / full['decode_tok_per_s']:.2f}x "
        "decode tok/s" for r in long_rows[1:]) + "."]
    path.write_text("\n".join(lines) + "\n")


def plot(levels: list[dict], long_rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    xs = [r["clients"] for r in levels]
    a.plot(xs, [r["tok_per_s"] for r in levels], "o-", label="output tok/s")
    a.set_xscale("log", base=2)
    a.set_xlabel("concurrent clients")
    a.set_ylabel("output tokens/s")
    twin = a.twinx()
    twin.plot(xs, [r["ttft_p50"] for r in levels], "s--", color="tab:red", label="TTFT p50")
    twin.set_ylabel("TTFT p50 (s)", color="tab:red")
    a.set_title("load (8 slots)")
    labels = [r["config"].replace(" (", "\n(") for r in long_rows]
    b.bar([i - 0.2 for i in range(len(long_rows))], [r["peak_running"] for r in long_rows], 0.4,
          label="requests at once")
    b.bar([i + 0.2 for i in range(len(long_rows))], [r["decode_tok_per_s"] for r in long_rows], 0.4,
          label="decode tok/s")
    b.set_xticks(range(len(long_rows)), labels)
    b.set_title("4K-token prompts, one KV memory limit")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16, 64])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--long-requests", type=int, default=16)
    parser.add_argument("--long-max-tokens", type=int, default=64)
    parser.add_argument("--full-slots", type=int, default=2, help="the memory limit, in full-cache slots")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="serve_load_cpu")
    args = parser.parse_args()
    engine_flags = ["--device", args.device, "--dtype", args.dtype]
    stream = token_stream(MODEL)
    levels = load_levels(args, stream, engine_flags)
    long_rows, memory = fixed_memory(args, stream, engine_flags)
    write_report(args, levels, long_rows, memory, RESULTS / f"{args.out}.md")
    plot(levels, long_rows, RESULTS / f"{args.out}.png")
    print(f"wrote {RESULTS / args.out}.md and .png")


if __name__ == "__main__":
    main()
