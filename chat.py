"""snapkv-chat: an interactive terminal chat whose conversation keeps its SnapKV-compressed KV cache between turns.

    snapkv-chat --document examples/long_prompt.txt --budget 1024

Each turn feeds only what is new to `llm.chat_session()`; the answer streams to stdout, then one dim status line
(kept entries / conversation tokens, whether the turn compressed, prefill time, KV memory, tokens/s) to stderr.
When stdin is not a terminal, every non-blank line is one user message and stdout carries only the answers.
Errors follow snapkv-run's convention: one line on stderr, exit code 2.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Optional

import typer

import cli
from options import EngineFlags, UserError, engine_options, run_app

COMMANDS = {"/reset": "forget the conversation (the system message and --document stay)",
            "/history": "print the conversation so far", "/help": "show these commands",
            "/quit": "end the chat (also /exit, Ctrl-D, or Ctrl-C at the prompt)"}

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False,
                  help="Chat with a model whose KV cache, SnapKV-compressed, stays in place between turns.")


class StopOnInterrupt:
    """While an answer streams, Ctrl-C asks it to stop after the current step (the engine is never cut mid-step,
    and the partial answer stays in the conversation); a second Ctrl-C quits."""

    def __enter__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGINT, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


def read_document(path: Path) -> str:
    """The --document file's text (trailing whitespace dropped: a blank line and the first question follow)."""
    if str(path) == "-":
        raise UserError("--document -: stdin carries the messages; give the document as a file")
    try:
        return cli.read_prompt(str(path)).rstrip()
    except UserError as e:  # read_prompt speaks of a prompt file; here it is the document
        raise UserError(str(e).replace("prompt file", "--document", 1)) from None


def status_line(turn: dict, seconds: float) -> str:
    from engine.kv_cache import format_bytes

    held, total = turn["held_entries"], turn["conversation_tokens"]
    prefill_s = turn["prefill_s"] or 0.0
    answer_s = seconds - prefill_s  # the answer's tokens: the first one sampled at prefill, the rest decoded
    rate = f"{turn['generated_tokens'] / answer_s:.1f} tok/s" if answer_s > 0 else "- tok/s"
    compressed = "compressed this turn" if turn["compressed"] else "nothing dropped this turn"
    history = f" (+ {format_bytes(turn['history_bytes'])} of history in host memory)" if turn["history_bytes"] else ""
    return (f"kept {held:,} / {total:,} tokens ({total / held:.1f}x) · {compressed} · prefill {prefill_s:.2f} s · "
            f"KV {format_bytes(turn['kv_bytes'])}{history} · {rate}")


@app.command(help="Chat in the terminal; with stdin not a terminal, each non-blank line is one user message (answers "
             "on stdout, status lines on stderr). Commands: " + "; ".join(f"{c}: {h}" for c, h in COMMANDS.items()))
@engine_options
def chat_command(
    document: Optional[Path] = typer.Option(None, "--document", "-d", help="A UTF-8 text file that opens the "
                                            "conversation: the first user message becomes the document, a blank "
                                            "line, then your first question (again after /reset)."),
    system: Optional[str] = typer.Option(None, "--system", help="System message.", show_default="the template's"),
    max_new_tokens: int = typer.Option(512, "--max-new-tokens", "-n", help="Most tokens per answer."),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k best tokens (0 = off)."),
    seed: Optional[int] = typer.Option(None, help="Seed for sampling (every turn uses it: reproducible)."),
    reserve: Optional[int] = typer.Option(None, "--reserve", help="Entries past the budget the conversation may "
                                          "hold before it is compressed again.", show_default="half the room the "
                                          "slot has beyond the budget"),
    full_history: bool = typer.Option(False, "--full-history", help="Also keep every entry of the conversation "
                                      "in host memory, so each turn's question selects from all of it (the quality "
                                      "of prefilling the conversation again; memory grows like a full cache)."),
    engine: EngineFlags = None,
):
    from rich.console import Console

    from engine import SamplingParams

    model_path = engine.model_path
    document_text = read_document(document) if document is not None else None
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    snapkv = engine.snapkv
    interactive = sys.stdin.isatty()
    info = Console(stderr=True, highlight=False, soft_wrap=True)  # status lines, notes, /history, /help
    with cli.ProgressDisplay(enabled=True) as display:
        display.stage(f"loading {model_path.name}")
        llm = engine.build(max_batch_size=1)
    with llm.chat_session(system=system, snapkv=snapkv, reserve=reserve, full_history=full_history) as chat:
        if interactive:
            kept = f"SnapKV budget {chat.budget} + reserve {chat.reserve}" if chat.compressing else "full cache"
            opening = f" · {document} opens the conversation" if document_text else ""
            info.print(f"snapkv-chat · {model_path.name} · {kept}{opening} · /help for commands", markup=False)
        for message in user_messages(interactive):
            if message in ("/quit", "/exit"):
                break
            if message.startswith("/"):
                run_command(message, chat, document_text, info)
                continue
            if document_text and not any(m["role"] == "user" for m in chat.history):
                message = f"{document_text}\n\n{message}"
            answer(chat, message, params, info, interactive)


def user_messages(interactive: bool):
    """The user's messages: typed at a prompt (Ctrl-D or Ctrl-C there ends the chat), or one per non-blank line."""
    if not interactive:
        yield from (line.strip() for line in sys.stdin if line.strip())
        return
    from rich.console import Console

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    console = Console()
    while True:
        try:
            line = console.input("[bold green]you›[/] ").strip()
        except (EOFError, KeyboardInterrupt):
            console.print()
            return
        if line:
            yield line


def run_command(command: str, chat, document_text: str | None, info) -> None:
    if command == "/reset":
        chat.reset()
        info.print("[dim](conversation forgotten)[/]")
    elif command == "/history":
        for m in chat.history:
            content = m["content"]
            if document_text and m["role"] == "user" and content.startswith(document_text):
                question = content[len(document_text):].lstrip()
                content = f"[the document, {len(document_text):,} characters]\n\n{question}"
            info.print(f"[bold]{m['role']}:[/] ", end="")
            info.out(content, highlight=False)
    elif command == "/help":
        for name, what in COMMANDS.items():
            info.print(f"{name:10} {what}")
    else:
        info.print(f"unknown command {command}; /help lists them", markup=False)


def answer(chat, message: str, params, info, interactive: bool) -> None:
    """Stream one answer to stdout, then its status line; a turn the engine refuses or fails is one error line
    (and, when scripted, the end: exit code 2)."""
    turns_before, result, start = len(chat.turns), [], time.perf_counter()
    display = cli.ProgressDisplay(enabled=interactive)  # a long document's prefill shows its layers
    try:
        pieces = chat.stream(message, params, result=result, progress=display.progress)
    except ValueError as e:
        if not interactive:
            raise UserError(str(e)) from None
        info.print(f"error: {e}", markup=False)
        return
    with StopOnInterrupt() as interrupt, display:
        display.stage("prefill")
        try:
            for piece in pieces:
                display.done()
                sys.stdout.write(piece)
                sys.stdout.flush()
                if interrupt.requested:
                    break
        finally:
            pieces.close()  # an early close aborts the turn; what was generated stays in the conversation
    sys.stdout.write("\n")
    sys.stdout.flush()
    if result and result[0].error:
        if not interactive:
            raise UserError(result[0].error)
        info.print(f"error: {result[0].error}", markup=False)
    if len(chat.turns) > turns_before:
        stopped = " · stopped" if interrupt.requested else ""
        info.print(status_line(chat.turns[-1], time.perf_counter() - start) + stopped, style="dim", markup=False)


def main(argv: list[str] | None = None) -> int:
    return run_app(app, argv)


if __name__ == "__main__":
    sys.exit(main())
