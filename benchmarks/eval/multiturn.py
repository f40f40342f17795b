"""The multi-turn eval of chat sessions: does carrying a conversation's compressed KV cache between turns
(sessions) keep the answer quality of prefilling the whole conversation again, and how much faster is it?

    .venv/bin/python -m benchmarks.eval.multiturn               # quality cases + speed section -> results/multiturn.md
    .venv/bin/python -m benchmarks.eval.multiturn --quick       # a smoke run of a few minutes
    .venv/bin/python -m benchmarks.eval.multiturn --cases 10 --speed-conversations 1 --out /tmp/mt.md

Quality: a document holding one fact in turn 1 (the report split's real-text documents and, interleaved with them,
report-split synthetic cases), 2 to 4 short distractor turns (chosen by a seed), then the document's question with
the bare-answer instruction. Each of three modes runs its own conversation (its own earlier answers go into its
history), greedy, the modes in step turn by turn: (a) the full cache, the whole templated conversation generated from
each turn; (b) the same with the default SnapKVConfig(), what a client that resends the conversation gets; (c)
`llm.chat_session()` with the default SnapKVConfig() and reserve, only each turn's new tokens prefilled. The final
answer is scored in its first 32 tokens by the quality eval's exact match (Wilson 95% intervals) and matched tokens
against (a).

Speed: a few conversations that start at about 7K tokens and pass 8K, with an engine built with
allow_longer_context (past SmolLM2-135M's 8,192 trained positions, so nothing is scored there), timing every turn of
(b) and (c). Rows go to OUT with .jsonl as they are measured (a rerun skips them), and the report is rewritten
after each conversation, so a run cut short keeps what it measured. This module summarizes, reports and plots;
the conversations and how each mode runs them are in benchmarks/eval/conversations.py.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.eval.conversations import (ANSWER_TOKENS, DEFAULT_CASES, DISTRACTOR_TOKENS, FEWEST_DISTRACTORS,
                                           MODES, MOST_DISTRACTORS, PASTED_TURN_TOKENS, QUALITY_GOAL,
                                           QUICK_SPEED_LENGTHS, QUICK_SPEED_PAST, SPEED_GOAL, SPEED_LENGTHS,
                                           SPEED_MAX_MODEL_LEN, SPEED_MODES, SPEED_PAST, append_rows,
                                           build_conversation, load_engines, load_speed_engine, quality_cases,
                                           run_quality_conversation, run_speed_conversation, speed_conversation)
from benchmarks.eval.fidelity import wilson
from benchmarks.eval.runner import DEFAULT_MODEL, RESULTS, read_rows
from engine.tokenizer import Tokenizer
from snapkv.config import SnapKVConfig

def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def summarize_quality(rows: list[dict]) -> dict[str, dict]:
    """Per mode: cases, exact match with its Wilson interval, matched tokens, seconds per turn, compression."""
    summary = {}
    for mode in MODES:
        rs = [r for r in rows if r["section"] == "quality" and r["mode"] == mode]
        if not rs:
            continue
        low, high = wilson(sum(r["score"] for r in rs), len(rs))
        turns = [t for r in rs for t in r["turns"]]
        summary[mode] = dict(n=len(rs), em=_mean(r["score"] for r in rs), em_low=low, em_high=high,
                             matched=_mean(r["matched"] for r in rs), turn_s=_mean(t["seconds"] for t in turns),
                             turn_cpu_s=_mean(t["cpu_seconds"] for t in turns),
                             turn_median_s=statistics.median(t["seconds"] for t in turns),
                             compression=_mean(r["turns"][-1]["conversation_tokens"] / r["turns"][-1]["held_entries"]
                                               for r in rs),
                             tokens=_mean(r["turns"][-1]["conversation_tokens"] for r in rs),
                             compressed_turns=_mean(t["compressed"] for t in turns),
                             same_as_resent=_mean(t["same_as_resent"] for t in turns if "same_as_resent" in t))
    return summary


def speed_table_rows(rows: list[dict]) -> list[dict]:
    """One line per (speed conversation, turn): (b)'s conversation tokens, both modes' seconds and their ratio."""
    by = {(r["conversation"], r["mode"]): r for r in rows if r["section"] == "speed"}
    lines = []
    for conversation in dict.fromkeys(r["conversation"] for r in rows if r["section"] == "speed"):
        b, c = by.get((conversation, "reprefill")), by.get((conversation, "session"))
        if b is None or c is None:
            continue
        d = by.get((conversation, "session_full"))
        d_turns = d["turns"] if d else [None] * len(c["turns"])
        for i, (tb, tc, td) in enumerate(zip(b["turns"], c["turns"], d_turns)):
            lines.append(dict(conversation=conversation, turn=i + 1, tokens=tb["new_tokens"],
                              session_new=tc["new_tokens"], held=tc["held_entries"], b_s=tb["seconds"],
                              c_s=tc["seconds"], ratio=tb["seconds"] / tc["seconds"], b_cpu=tb["cpu_seconds"],
                              c_cpu=tc["cpu_seconds"], d_s=td and td["seconds"]))
    return lines


def quality_goal(summary: dict[str, dict]) -> str:
    if "reprefill" not in summary or "session" not in summary:
        return f"- Goal: (c) within {QUALITY_GOAL:g} points of (b): not measured (no quality case ran)."
    b, c = 100 * summary["reprefill"]["em"], 100 * summary["session"]["em"]
    verdict = "met" if c >= b - QUALITY_GOAL else "missed"
    line = (f"- Goal: (c) within {QUALITY_GOAL:g} points of (b): **{verdict}**: (c) {c:.1f}% vs (b) {b:.1f}% exact "
            f"match ({c - b:+.1f} points, {summary['session']['n']} cases).")
    if "session_full" in summary:
        d = 100 * summary["session_full"]["em"]
        verdict = "met" if d >= b - QUALITY_GOAL else "missed"
        line += (f"\n- The same goal for (d), the session keeping its full history: **{verdict}**: (d) {d:.1f}% vs (b) "
                 f"{b:.1f}% ({d - b:+.1f} points, {summary['session_full']['n']} cases).")
    return line


def sample_size_line(summary: dict[str, dict]) -> str:
    if "session" not in summary:
        return ""
    n = summary["session"]["n"]
    widths = [100 * (m["em_high"] - m["em_low"]) for m in summary.values()]
    return (f"With {n} cases one case moves a rate by {100 / n:.0f} points and the 95% intervals span "
            f"{min(widths):.0f} to {max(widths):.0f} points, so the goal compares the measured rates, not significant "
            "differences.")


def selection_line(rows: list[dict]) -> str:
    """How often (c) chose the document's entries in turn 1 only, before the question was asked."""
    sessions = [r for r in rows if r["section"] == "quality" and r["mode"] == "session"]
    only_first = sum(r["turns"][0]["compressed"] and not any(t["compressed"] for t in r["turns"][1:])
                     for r in sessions)
    if not sessions:
        return ""
    return (f"In {only_first} of {len(sessions)} conversations (c) compressed in turn 1 only: the document's entries "
            "were chosen by turn 1's observation window (the request to read it), and every later token, the "
            "question and its answer included, attends to those entries alone, while (b) chooses them again with "
            "the question's window and computes the question's own tokens over the whole conversation.")


def retokenization_line(summary: dict[str, dict]) -> str:
    session = summary.get("session")
    if session is None or session["same_as_resent"] != session["same_as_resent"]:
        return ""
    share = session["same_as_resent"]
    effect = "encoding the text again changes nothing here" if share == 1 else \
        "elsewhere a decoded answer encodes to other tokens, so (c) differs from (a) a little even where nothing " \
        "is compressed"
    return (f"(c) keeps its answers' tokens as sampled; (a) and (b) read the conversation as text templated and "
            f"encoded again. The two token sequences were identical in {100 * share:.0f}% of (c)'s turns: {effect}.")


def speed_goal(lines: list[dict], past: int = SPEED_PAST) -> str:
    goal = f"- Goal: (c) at least {SPEED_GOAL:g}x faster per turn than (b) once the conversation passes {past} tokens"
    long = [x for x in lines if x["tokens"] > past]
    if not long:
        return f"{goal} on CPU: not measured (no turn past {past} tokens ran)."
    ratio = _mean(x["b_s"] for x in long) / _mean(x["c_s"] for x in long)
    cpu = _mean(x["b_cpu"] for x in long) / _mean(x["c_cpu"] for x in long)
    verdict = "met" if ratio >= SPEED_GOAL else "missed"
    line = (f"{goal} on CPU: **{verdict}**: {ratio:.1f}x ((b) {_mean(x['b_s'] for x in long):.2f} s vs (c) "
            f"{_mean(x['c_s'] for x in long):.2f} s per turn, wall clock, over {len(long)} turns past {past} tokens; "
            f"per turn from {min(x['ratio'] for x in long):.1f}x to {max(x['ratio'] for x in long):.1f}x; in CPU "
            f"time {cpu:.1f}x).")
    if all(x.get("d_s") for x in long):
        d_ratio = _mean(x["b_s"] for x in long) / _mean(x["d_s"] for x in long)
        line += (f"\n- The same goal for (d), the session keeping its full history: **"
                 f"{'met' if d_ratio >= SPEED_GOAL else 'missed'}**: {d_ratio:.1f}x ((d) "
                 f"{_mean(x['d_s'] for x in long):.2f} s per turn, timed in a later run than (b) and (c)).")
    return line


def speed_by_kind(lines: list[dict], past: int = SPEED_PAST) -> str:
    """The speed-up past `past` tokens for each kind of turn: short questions and pasted sections differ most."""
    long = [x for x in lines if x["tokens"] > past]
    parts = []
    for kind, pasted in (("short questions", False), ("pasted sections", True)):
        xs = [x for x in long if (x["session_new"] > PASTED_TURN_TOKENS) == pasted]
        if xs:
            parts.append(f"{kind} {_mean(x['b_s'] for x in xs) / _mean(x['c_s'] for x in xs):.1f}x ({len(xs)} turns, "
                         f"(c) {_mean(x['c_s'] for x in xs):.2f} s)")
    return f"By kind of turn past {past} tokens: {'; '.join(parts)}." if parts else ""


def _answer_cell(row: dict) -> str:
    text = " ".join(row["output"].split()).replace("|", "/")
    mark = {1.0: "✓", 0.0: "✗"}.get(row["score"], f"{row['score']:.2f}")
    return f"{mark} {text[:40]}{'…' if len(text) > 40 else ''}"


def case_table(rows: list[dict]) -> str:
    """One line per quality case: the expected answer and each mode's answer (cut short) with its score."""
    by = {(r["conversation"], r["mode"]): r for r in rows if r["section"] == "quality"}
    out = ["| case | distractors | answer | (a) | (b) | (c) | (d) | matched (b) | matched (c) | matched (d) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for conversation in dict.fromkeys(r["conversation"] for r in rows if r["section"] == "quality"):
        if not all((conversation, m) in by for m in MODES):
            continue
        a, b, c, d = (by[(conversation, m)] for m in MODES)
        out.append(f"| {conversation} | {a['distractors']} | {' / '.join(a['answers'])} | {_answer_cell(a)} | "
                   f"{_answer_cell(b)} | {_answer_cell(c)} | {_answer_cell(d)} | {b['matched']} | {c['matched']} | "
                   f"{d['matched']} |")
    return "\n".join(out)


def speed_intro(lines: list[dict]) -> str:
    if not lines:
        return "No speed conversation ran."
    firsts = [x["tokens"] for x in lines if x["turn"] == 1]
    return (f"{len(firsts)} conversations: {min(firsts)} to {max(firsts)} tokens of the documents in turn 1, then "
            f"short questions and pasted sections in turn, up to {max(x['tokens'] for x in lines)} tokens; the engine "
            f"is built with allow_longer_context (max_model_len {SPEED_MAX_MODEL_LEN}).")


def quality_table(summary: dict[str, dict]) -> str:
    out = ["| mode | cases | exact match % [95% CI] | matched tokens /32 vs (a) | s per turn (mean) | median | "
           "CPU s per turn | conversation tokens (end) | compression (tokens / held) | turns compressed |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for mode, s in summary.items():
        matched = "-" if mode == "full" else f"{s['matched']:.1f}"
        out.append(f"| {MODES[mode]} | {s['n']} | {100 * s['em']:.1f} [{100 * s['em_low']:.1f}, "
                   f"{100 * s['em_high']:.1f}] | {matched} | {s['turn_s']:.2f} | {s['turn_median_s']:.2f} | "
                   f"{s['turn_cpu_s']:.2f} | {s['tokens']:.0f} | {s['compression']:.2f}x | "
                   f"{100 * s['compressed_turns']:.0f}% |")
    return "\n".join(out)


def speed_table(lines: list[dict]) -> str:
    out = ["| conversation | turn | conversation tokens (b) prefills | (c) new tokens | (c) held entries | "
           "(b) s | (c) s | (b) / (c) | (b) CPU s | (c) CPU s | (d) s |", "|---" * 11 + "|"]
    for x in lines:
        d = f"{x['d_s']:.2f}" if x.get("d_s") else "-"
        out.append(f"| {x['conversation']} | {x['turn']} | {x['tokens']} | {x['session_new']} | {x['held']} | "
                   f"{x['b_s']:.2f} | {x['c_s']:.2f} | {x['ratio']:.1f}x | {x['b_cpu']:.2f} | {x['c_cpu']:.2f} | "
                   f"{d} |")
    return "\n".join(out)


def report(rows: list[dict], model: str, command: str, past: int = SPEED_PAST, note: str = "") -> str:
    """The markdown results: the quality table, the speed table and both goal lines with their figures."""
    summary, lines = summarize_quality(rows), speed_table_rows(rows)
    quality_rows = [r for r in rows if r["section"] == "quality" and r["mode"] == "full"]
    tasks = ", ".join(f"{t} {sum(r['task'] == t for r in quality_rows)}"
                      for t in dict.fromkeys(r["task"] for r in quality_rows))
    cfg = SnapKVConfig()
    timed = sum(t["seconds"] for r in rows for t in r["turns"]) / 60
    return f"""# Multi-turn conversations: a carried session vs prefilling the conversation again

Model: {model}, greedy, CPU float32. SnapKV: the default SnapKVConfig() (budget {cfg.budget}, window {cfg.window},
kernel {cfg.kernel}, {cfg.pooling} pooling, group {cfg.group_agg}); the session keeps the default reserve.
The turns timed below add up to {timed:.0f} minutes of wall clock.
{note}
## Quality

Each case: a document holding one fact plus a short request in turn 1, {FEWEST_DISTRACTORS} to {MOST_DISTRACTORS}
distractor questions, then the document's question with the bare-answer instruction (answers up to
{DISTRACTOR_TOKENS} tokens, the final one scored in its first {ANSWER_TOKENS}). Cases: {tasks or 'none yet'}
(report split; nothing tuned on them). Each mode runs its own conversation. "s per turn" is the wall clock of
whole turns (prefill + answer), mean and median over every turn of every case (the machine is shared: a busy
neighbour shows in the mean, less in the median and the CPU time); compression is the conversation's tokens over the
entries held for it after the last turn.

{quality_table(summary)}

{quality_goal(summary)}

{sample_size_line(summary)} Matched tokens (of the final answer's first 32, against (a)'s answer) show how far each
mode's answers drift from the full cache's.

{selection_line(rows)}

{retokenization_line(summary)}

{case_table(rows)}

## Speed past 8K tokens

{speed_intro(lines)} Each turn is timed whole (prefill + answer, up to {DISTRACTOR_TOKENS} tokens), (b) and (c)
in step turn by turn, wall clock and the process's CPU time (the machine is shared: CPU time is the steadier of the
two). Past {SPEED_PAST} positions SmolLM2-135M runs beyond its trained length, so answers there are not scored.

{speed_table(lines)}

{speed_goal(lines, past)}

{speed_by_kind(lines, past)}

Command: `{command}`
"""


def plot(rows: list[dict], path: Path, past: int = SPEED_PAST) -> Path | None:
    """Left: seconds per turn of (b) and (c) against the conversation's length (speed conversations). Right: exact
    match per mode with its Wilson interval (quality cases). None if there is nothing to draw."""
    lines, summary = speed_table_rows(rows), summarize_quality(rows)
    if not lines and not summary:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed_ax, quality_ax) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw=dict(width_ratios=(3, 2)))
    for i, conversation in enumerate(dict.fromkeys(x["conversation"] for x in lines)):
        xs = [x for x in lines if x["conversation"] == conversation]
        label = i == 0
        speed_ax.plot([x["tokens"] for x in xs], [x["b_s"] for x in xs], "o-", color="tab:red",
                      label="(b) prefill again" if label else None)
        speed_ax.plot([x["tokens"] for x in xs], [x["c_s"] for x in xs], "s-", color="tab:blue",
                      label="(c) carried session" if label else None)
    speed_ax.axvline(past, color="grey", linestyle=":", label=f"{past} tokens")
    speed_ax.set_yscale("log")
    speed_ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    speed_ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    speed_ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    speed_ax.set_xlabel("conversation tokens at the turn")
    speed_ax.set_ylabel("seconds per turn (wall clock)")
    speed_ax.set_title("Speed: one turn, prefill + answer", fontsize=10)
    speed_ax.legend(fontsize=8)
    modes = list(summary)
    ems = [100 * summary[m]["em"] for m in modes]
    errors = [[e - 100 * summary[m]["em_low"] for e, m in zip(ems, modes)],
              [100 * summary[m]["em_high"] - e for e, m in zip(ems, modes)]]
    quality_ax.bar([MODES[m][:3] for m in modes], ems, yerr=errors, capsize=6,
                   color=["grey", "tab:red", "tab:blue", "tab:green"][:len(modes)])
    quality_ax.set_ylim(0, 100)
    quality_ax.set_ylabel("exact match % (95% Wilson interval)")
    quality_ax.set_title(f"Quality: {summary[modes[0]]['n'] if modes else 0} conversations", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --- command line -----------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.eval.multiturn", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--cases", type=int, default=DEFAULT_CASES, help="quality conversations (documents first)")
    ap.add_argument("--speed-conversations", type=int, default=2, help="long conversations timed past 8K tokens")
    ap.add_argument("--seed", type=int, default=0, help="chooses the distractor turns")
    ap.add_argument("--quick", action="store_true",
                    help="a smoke run: 1 case, one short speed conversation (about 3 minutes)")
    ap.add_argument("--out", default=None, help="the markdown report [default: benchmarks/results/multiturn.md]; "
                    "rows go to OUT with .jsonl (appended; a rerun skips what is there)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cases < 0 or args.speed_conversations < 0:
        raise SystemExit("error: --cases and --speed-conversations must be 0 or more")
    if args.quick:
        args.cases, args.speed_conversations = 1, 1
    out = Path(args.out or RESULTS / ("multiturn_quick.md" if args.quick else "multiturn.md"))
    jsonl = out.with_suffix(".jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    model = Path(args.model)
    command = " ".join(["python -m benchmarks.eval.multiturn", *(sys.argv[1:] if argv is None else argv)])
    start = time.perf_counter()
    if not model.exists():
        raise SystemExit(f"error: model not found: {model} (run `make weights` to fetch the default model)")
    torch.set_num_threads(args.threads)
    tokenizer = Tokenizer.from_path(model)
    count = lambda text: len(tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
    conversations = [build_conversation(case, args.seed) for case in quality_cases(count, args.cases)]
    speed_lengths = QUICK_SPEED_LENGTHS if args.quick else SPEED_LENGTHS
    speeds = [speed_conversation(count, i, **speed_lengths) for i in range(args.speed_conversations)]
    rows = {r["key"]: r for r in read_rows(jsonl)}
    wanted = {c.key for c in conversations} | {c.key for c in speeds}
    past = QUICK_SPEED_PAST if args.quick else SPEED_PAST

    def write_report(note: str = "") -> None:
        mine = [r for r in rows.values() if r["conversation"] in wanted]
        out.write_text(report(mine, model.name, command, past, note))

    def progress(what: str, i: int, total: int, key: str, t: float) -> None:
        print(f"{what} {i + 1}/{total} {key}: {time.perf_counter() - t:.0f} s ({time.perf_counter() - start:.0f} s "
              "in all)", flush=True)

    # the speed section first: its few long conversations decide a goal; the quality cases add up one by one
    todo = [c for c in speeds if not all(f"speed|{c.key}|{m}" in rows for m in SPEED_MODES)]
    ran = len(todo)
    if todo:
        speed_llm = load_speed_engine(model)
        for i, conversation in enumerate(todo):
            t = time.perf_counter()
            missing = [m for m in SPEED_MODES if f"speed|{conversation.key}|{m}" not in rows]
            append_rows(jsonl, run_speed_conversation(speed_llm, conversation, missing), rows)
            progress("speed", i, len(todo), conversation.key, t)
            write_report()
        del speed_llm
    todo = [c for c in conversations if not all(f"quality|{c.key}|{m}" in rows for m in MODES)]
    ran += len(todo)
    if todo:
        full_llm, snapkv_llm = load_engines(model)
        for i, conversation in enumerate(todo):
            t = time.perf_counter()
            missing = [m for m in MODES if f"quality|{conversation.key}|{m}" not in rows]  # a rerun adds a new mode
            done_full = rows.get(f"quality|{conversation.key}|full")
            append_rows(jsonl, run_quality_conversation(full_llm, snapkv_llm, conversation, modes=missing,
                                                    reference=done_full and done_full["token_ids"]), rows)
            progress("quality", i, len(todo), conversation.key, t)
            write_report()
    elapsed = time.perf_counter() - start
    write_report(f"This run measured {ran} conversations in {elapsed / 60:.1f} minutes ({args.threads} threads).\n"
                 if ran else "")
    png = plot([r for r in rows.values() if r["conversation"] in wanted], out.with_suffix(".png"), past)
    print(out.read_text())
    print(f"rows: {jsonl}; report: {out}; plot: {png}; {elapsed:.0f} s")


if __name__ == "__main__":
    main()
