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
from pathlib import Path
from typing import Optional

import typer

from options import EngineFlags, UserError, engine_options, run_app
from snapkv.config import SnapKVConfig

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Generate with a SnapKV-compressed KV cache (Llama/Mistral; HF directory or .gguf).")


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


def slot_entries(snapkv: SnapKVConfig | None, model_path: Path, max_new_tokens: int) -> int | None:
    """Cache entries one request needs at most: the most any (layer, kv head) keeps, plus the new tokens (None
    for the full cache: the engine sizes that from the model's length and free memory)."""
    if snapkv is None or snapkv.policy == "full":
        return None
    from formats.loader import load_config
    from snapkv.policies import make_policy

    return make_policy(snapkv, load_config(model_path).num_layers).kept_length(1 << 40) + max_new_tokens


@app.command(help="Generate an answer for the prompt in the --prompt file (or stdin).")
@engine_options
def run(
    prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt file (UTF-8 text); '-' reads stdin."),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k best tokens (0 = off)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (reproducible output)."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="Stop string (repeatable)."),
    chat: bool = typer.Option(True, "--chat/--no-chat", help="Wrap the prompt in the model's chat template."),
    stats: bool = typer.Option(False, "--stats", help="Print token counts, KV bytes, speeds and memory to stderr."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object (text + stats) instead."),
    show_kept: Optional[Path] = typer.Option(None, "--show-kept", help="Write an HTML page (and a .png heatmap "
                                             "beside it) showing which prompt tokens SnapKV kept."),
    compare: bool = typer.Option(False, "--compare", help="Answer with the full cache too (the same batch) and "
                                 "print both answers, the tokens they share and the KV memory of each."),
    engine: EngineFlags = None,
):
    from engine import SamplingParams

    model_path = engine.model_path
    if show_kept is not None:
        check_output_path(show_kept, "--show-kept")
    text = read_prompt(prompt)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            seed=seed, stop=list(stop or []))
    snapkv = engine.snapkv
    if compare and (snapkv is None or snapkv.policy == "full"):
        raise UserError("--compare compares a compressed cache with the full one; drop --no-snapkv/--policy full")
    # one request: a slot sized for it (the full cache takes the model's length, bounded by memory)
    max_kv_len = engine.max_kv_len or (None if compare else slot_entries(snapkv, model_path, max_new_tokens))
    with ProgressDisplay(enabled=not as_json) as display:
        display.stage(f"loading {model_path.name}")
        llm = engine.build(snapkv=None if compare else snapkv, max_batch_size=2 if compare else 1,
                           max_kv_len=max_kv_len)
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
    from compare import first_difference, matched_tokens
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


if __name__ == "__main__":
    sys.exit(main())
