"""snapkv-run: generate from a prompt file with a SnapKV-compressed KV cache, streaming the answer to stdout.

    snapkv-run --model weights/SmolLM2-135M-Instruct --prompt examples/long_prompt.txt --stats

Progress and statistics go to stderr so stdout carries only the answer (or one JSON object with --json).
Any mistake a user can make ends in one line on stderr and exit code 2, never a traceback (a tensor-parallel
rank that dies: one line and exit code 1).
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer

from engine.llm import DEVICES, DTYPES, KV_DTYPES
from engine.tensor_parallel import RankFailure
from models.loader import WEIGHTS_DTYPES
from snapkv.config import CHOICES, HELP, SnapKVConfig

DEFAULT_MODEL = Path(__file__).resolve().parent / "weights" / "SmolLM2-135M-Instruct"

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Generate with a SnapKV-compressed KV cache (Llama/Mistral; HF directory or .gguf).")


def choices(name: str, values) -> type[Enum]:
    """A typer choice type from a tuple of strings (the library's own list, so the two never disagree)."""
    return Enum(name, {v: v for v in values}, type=str)


Pooling = choices("Pooling", CHOICES["pooling"])
GroupAgg = choices("GroupAgg", CHOICES["group_agg"])
Policy = choices("Policy", CHOICES["policy"])
Device = choices("Device", DEVICES)
DType = choices("DType", DTYPES)
WeightsDType = choices("WeightsDType", WEIGHTS_DTYPES)
KVDType = choices("KVDType", KV_DTYPES)
SNAPKV = SnapKVConfig()  # the defaults of every SnapKV flag


class UserError(Exception):
    pass


class ProgressDisplay:
    """A transient rich progress line on stderr while loading and prefilling; gone once text starts streaming."""

    def __init__(self, enabled: bool):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), console=self.console, transient=True)
        self.task = None

    def __enter__(self):
        if self.enabled:
            self.bar.start()
        return self

    def __exit__(self, *exc):
        self.done()

    def stage(self, text: str, total: int | None = None) -> None:
        if self.task is None:
            self.task = self.bar.add_task(text, total=total)
        self.bar.update(self.task, description=text, total=total, completed=0)

    def progress(self, stage: str, done: int, total: int) -> None:
        if self.task is not None and self.enabled:
            label = "prefill (layers)" if stage == "prefill" else "decode (tokens)"
            self.bar.update(self.task, description=label, total=total, completed=done)

    def note(self, text: str) -> None:
        self.console.print(f"note: {text}", highlight=False)

    def done(self) -> None:
        if self.enabled:
            self.bar.stop()
            self.enabled = False


def print_stats(stats: dict) -> None:
    from engine.kv_cache import format_bytes

    out = sys.stderr
    prompt, kept, generated = stats["prompt_tokens"], stats["kept_tokens"], stats.get("generated_tokens", 0)
    print(f"prompt tokens   {prompt}", file=out)
    print(f"kept tokens     {kept} per layer and kv head ({prompt / kept:.2f}x compression)", file=out)
    print(f"KV cache        {format_bytes(stats['kv_bytes'])} {stats['kv_dtype']} (full cache: "
          f"{format_bytes(stats['full_kv_bytes'])}, {stats['full_kv_bytes'] / stats['kv_bytes']:.2f}x larger)", file=out)
    print(f"weights         {format_bytes(stats['weight_bytes'])}", file=out)
    print(f"prefill         {prompt / stats['prefill_s']:.1f} tok/s ({stats['prefill_s']:.2f} s)", file=out)
    measured = stats.get("measured_peak_bytes")
    print(f"peak memory     predicted {format_bytes(stats['predicted_peak_bytes'])}, measured "
          f"{format_bytes(measured) if measured is not None else 'n/a'} (beyond the weights)", file=out)
    if generated > 1:
        decode_s = stats["decode_s"]
        print(f"decode          {(generated - 1) / decode_s:.1f} tok/s ({generated} tokens, {decode_s:.2f} s)",
              file=out)


def read_prompt(prompt: str) -> str:
    try:
        raw = sys.stdin.buffer.read() if prompt == "-" else Path(prompt).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read prompt file {prompt}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"prompt file {prompt} is not UTF-8 text (bad byte at offset {e.start})") from None
    if not text.strip():
        raise UserError(f"prompt file {prompt} is empty")
    return text


def check_output_path(path: Path, flag: str) -> Path:
    """Fail before any work if `flag`'s file cannot be written: the page goes to PATH (.html added if missing)."""
    target = path if path.suffix.lower() in (".html", ".htm") else path.with_suffix(".html")
    if path.is_dir() or target.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name such as view.html")
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{flag} {path}: cannot write there ({parent} is not a writable directory)")
    return target


# The flags snapkv-run and snapkv-serve share: the model, the SnapKV settings and how the engine runs.
MODEL = typer.Option(None, "--model", "-m", help="HF-style model directory or .gguf file.",
                     show_default="weights/SmolLM2-135M-Instruct")
BUDGET = typer.Option(SNAPKV.budget, help=HELP["budget"])
NO_SNAPKV = typer.Option(False, "--no-snapkv", help="Keep the full KV cache.")
WINDOW = typer.Option(SNAPKV.window, help=HELP["window"])
KERNEL = typer.Option(SNAPKV.kernel, help=HELP["kernel"])
POOLING = typer.Option(SNAPKV.pooling, help=HELP["pooling"])
GROUP_AGG = typer.Option(SNAPKV.group_agg, "--group-agg", help=HELP["group_agg"])
POLICY = typer.Option(SNAPKV.policy, help=HELP["policy"])
SINK_TOKENS = typer.Option(None, "--sink-tokens", help=HELP["sink_tokens"], show_default=False)
DEVICE = typer.Option("cpu", help="Where to run.")
DTYPE = typer.Option("auto", help="Weights and KV-cache dtype (auto: bfloat16 on a GPU, float16 where it has no "
                     "bfloat16, float32 on CPU).")
WEIGHTS_DTYPE = typer.Option("auto", "--weights-dtype", help="How the weights are stored: int4/int8 are "
                             "weight-only quantized (smaller, faster decode; see README); auto: a .gguf keeps its "
                             "own quantization, anything else is stored in --dtype.")
KV_DTYPE = typer.Option("auto", "--kv-dtype", help="KV cache storage: int8 (a scale per token and kv head) or auto "
                        "(--dtype).")
CUDA_GRAPH = typer.Option(True, "--cuda-graph/--no-cuda-graph", help="On CUDA, replay the decode step as captured "
                          "CUDA graphs (--no-cuda-graph: eager).")
COMPILE = typer.Option(False, "--compile", help="Run the decode step through torch.compile (a slow start; with CUDA "
                       "graphs on, the compiled step is what gets captured).")
PREFILL_CHUNK = typer.Option(None, "--prefill-chunk", help="Prefill the prompt layer by layer in chunks of this "
                             "many tokens (bounds prefill memory).", show_default="4096 on cuda, 512 on cpu")
MAX_KV_LEN = typer.Option(None, "--max-kv-len", help="Cache entries per slot.",
                          show_default="the SnapKV budget + 1024, or the model's length")
TENSOR_PARALLEL = typer.Option(1, "--tensor-parallel", help="Shard the model over this many processes (GPUs), "
                               "each holding its share of the kv heads; it must divide the model's kv heads. Under "
                               "torchrun, the number of processes torchrun starts (see README).")
ALLOW_LONGER_CONTEXT = typer.Option(False, "--allow-longer-context", help="Accept prompts longer than the model's "
                                    "max_position_embeddings.")


def resolve_model(model: Path | None) -> Path:
    path = model or DEFAULT_MODEL
    if not path.exists():
        hint = " (run `make weights` to fetch the default model)" if model is None else ""
        raise UserError(f"model not found: {path}{hint}")
    return path


def snapkv_from_flags(no_snapkv: bool, budget: int, window: int, kernel: int, pooling: Enum, group_agg: Enum,
                      policy: Enum, sink_tokens: int | None = None) -> SnapKVConfig | None:
    if no_snapkv:
        return None
    return SnapKVConfig(budget=budget, window=window, kernel=kernel, pooling=pooling.value,
                        group_agg=group_agg.value, policy=policy.value, sink_tokens=sink_tokens)


def slot_entries(snapkv: SnapKVConfig | None, model_path: Path, max_new_tokens: int) -> int | None:
    """Cache entries one request needs at most: the most any (layer, kv head) keeps, plus the new tokens (None
    for the full cache: the engine sizes that from the model's length and free memory)."""
    if snapkv is None or snapkv.policy == "full":
        return None
    from models.loader import load_config
    from snapkv.policies import make_policy

    return make_policy(snapkv, load_config(model_path).num_layers).kept_length(1 << 40) + max_new_tokens


@app.command(help="Generate an answer for the prompt in the --prompt file (or stdin).")
def run(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt file (UTF-8 text); '-' reads stdin."),
    model: Optional[Path] = MODEL,
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k best tokens (0 = off)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (reproducible output)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
    budget: int = BUDGET,
    no_snapkv: bool = NO_SNAPKV,
    window: int = WINDOW,
    kernel: int = KERNEL,
    pooling: Pooling = POOLING,
    group_agg: GroupAgg = GROUP_AGG,
    policy: Policy = POLICY,
    sink_tokens: Optional[int] = SINK_TOKENS,
    device: Device = DEVICE,
    dtype: DType = DTYPE,
    weights_dtype: WeightsDType = WEIGHTS_DTYPE,
    kv_dtype: KVDType = KV_DTYPE,
    cuda_graph: bool = CUDA_GRAPH,
    compile_step: bool = COMPILE,
    prefill_chunk: Optional[int] = PREFILL_CHUNK,
    allow_longer_context: bool = ALLOW_LONGER_CONTEXT,
    tensor_parallel: int = TENSOR_PARALLEL,
    stats: bool = typer.Option(False, "--stats", help="Print token counts, KV bytes, speeds and memory to stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text + stats) instead."),
    show_kept: Optional[Path] = typer.Option(None, "--show-kept", help="Write an HTML page (and a .png heatmap "
                                             "beside it) showing which prompt tokens SnapKV kept."),
    compare: bool = typer.Option(False, "--compare", help="Answer with the full cache too (the same batch) and "
                                 "print both answers, the tokens they share and the KV memory of each."),
):
    from engine import LLM, SamplingParams

    model_path = resolve_model(model)
    if show_kept is not None:
        check_output_path(show_kept, "--show-kept")
    text = read_prompt(prompt)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=list(stop or []))
    snapkv = snapkv_from_flags(no_snapkv, budget, window, kernel, pooling, group_agg, policy, sink_tokens)
    if compare and (snapkv is None or snapkv.policy == "full"):
        raise UserError("--compare compares a compressed cache with the full one; drop --no-snapkv/--policy full")
    # one request: a slot sized for it (the full cache takes the model's length, bounded by memory)
    max_kv_len = None if compare else slot_entries(snapkv, model_path, max_new_tokens)
    with ProgressDisplay(enabled=not as_json) as display:
        display.stage(f"loading {model_path.name}")
        llm = LLM(model_path, device=device.value, dtype=dtype.value, snapkv=None if compare else snapkv,
                  max_batch_size=2 if compare else 1, max_kv_len=max_kv_len, cuda_graph=cuda_graph,
                  compile=compile_step, prefill_chunk_size=prefill_chunk, allow_longer_context=allow_longer_context,
                  weights_dtype=weights_dtype.value, kv_dtype=kv_dtype.value, tensor_parallel_size=tensor_parallel)
        if chat and llm.tokenizer.chat_template is None:
            chat = False
            display.note("the model has no chat template; sending the prompt as plain text")
        if compare:
            full, out = run_both(llm, text, params, chat, snapkv, show_kept is not None, display.progress)
        elif show_kept is not None or as_json:
            out = llm.generate(text, params, chat=chat, return_kept=show_kept is not None,
                               progress=display.progress)[0]
            if out.error:
                raise UserError(out.error)
        else:
            results: list = []
            for delta in llm.stream(text, params, chat=chat, progress=display.progress, result=results):
                display.done()
                sys.stdout.write(delta)
                sys.stdout.flush()
            out = results[0]
    if compare:
        print_comparison(full, out, snapkv, llm.eos_ids, as_json)
    elif as_json:
        print(json.dumps({"text": out.text, "finish_reason": out.finish_reason, "token_ids": out.token_ids,
                          "stats": out.stats}))
    else:
        if show_kept is not None:
            sys.stdout.write(out.text)
        sys.stdout.write("\n")
    if show_kept is not None:
        from kept_view import kept_data, write_kept_report

        try:
            data = kept_data(llm.tokenizer, out.prompt_token_ids, out.kept, out.token_ids, out.stats)
            html, png = write_kept_report(show_kept, data)
        except OSError as e:
            raise UserError(f"--show-kept {show_kept}: cannot write the page ({e.strerror})") from None
        print(f"kept-token view: {html} and {png}", file=sys.stderr)
    if stats and not as_json:
        sys.stdout.flush()  # the answer first, then the figures
        print_stats(out.stats)


def run_both(llm, text: str, params, chat: bool, snapkv: SnapKVConfig, return_kept: bool, progress):
    """The same prompt with the full cache and with `snapkv`, two requests of one batch."""
    full = llm.add_request(text, params, chat=chat, snapkv=None)
    compressed = llm.add_request(text, params, chat=chat, snapkv=snapkv, return_kept=return_kept, progress=progress)
    done = {}
    while llm.has_unfinished():
        done.update({o.request_id: o for o in llm.step() if o.finished})
    for out in done.values():
        if out.error:
            raise UserError(out.error)
    return done[full], done[compressed]


def print_comparison(full, compressed, snapkv: SnapKVConfig, eos_ids, as_json: bool) -> None:
    from engine.compare import first_difference, matched_tokens
    from engine.kv_cache import format_bytes

    n = max(len(full.token_ids), len(compressed.token_ids))
    matched = matched_tokens(full.token_ids, compressed.token_ids, eos_ids, n)
    differ = first_difference(full.token_ids, compressed.token_ids, eos_ids)
    if as_json:
        print(json.dumps({name: {"text": o.text, "token_ids": o.token_ids, "stats": o.stats}
                          for name, o in (("full", full), ("compressed", compressed))} |
                         {"matched_tokens": matched, "compared_tokens": n, "first_difference": differ}))
        return
    f, c = full.stats, compressed.stats
    print(f"full cache: KV {format_bytes(f['kv_bytes'])}, all {f['prompt_tokens']} prompt tokens kept")
    print(full.text.strip(), end="\n\n")
    print(f"{snapkv.policy} (budget {snapkv.budget}): KV {format_bytes(c['kv_bytes'])}, "
          f"{f['kv_bytes'] / c['kv_bytes']:.2f}x smaller, {c['kept_tokens']} entries per layer and kv head")
    print(compressed.text.strip(), end="\n\n")
    verdict = "the same answer" if differ is None else f"they first differ at token {differ + 1}"
    print(f"matched tokens: {matched} of {n} at the same index ({verdict})")


def main(argv: list[str] | None = None) -> int:
    return run_app(app, argv)


def run_app(command: typer.Typer, argv: list[str] | None) -> int:
    """Run a typer app the way every snapkv command ends: a user's mistake is one line on stderr and exit code
    2, Ctrl-C is one line and 130, never a traceback."""
    try:
        code = command(args=argv, standalone_mode=False)
    except typer.Exit as e:
        return e.exit_code
    except typer.Abort:
        print("error: aborted", file=sys.stderr)
        return 130
    except typer.TyperException as e:  # usage errors: unknown option, bad value type, missing --prompt
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        print(f"error: {' '.join(message.split())}", file=sys.stderr)
        return 2
    except (UserError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:  # a tensor-parallel rank died: not the user's mistake, still one line
        print(f"error: {e}", file=sys.stderr)
        # and out at once: with a peer gone, tearing down the process group's threads at interpreter exit
        # aborted the process now and then (1 run in 8: "terminate called without an active exception")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    except KeyboardInterrupt:
        code = 130
    if code == 130:  # typer turns Ctrl-C into a return value of 130 when not in standalone mode
        print("error: interrupted", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
