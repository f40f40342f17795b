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
after each conversation, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.eval.documents import document_cases, load_documents
from benchmarks.eval.fidelity import MATCHED_TOKENS, wilson
from benchmarks.eval.quality import answer_text
from benchmarks.eval.runner import DEFAULT_MODEL, RESULTS, read_rows
from benchmarks.eval.splits import REPORT_SEED
from benchmarks.eval.tasks import Case, make_case
from compare import matched_tokens
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from snapkv.config import SnapKVConfig

DISTRACTOR_TOKENS = 24  # the first turn's and the distractors' answers: short, they only have to be there
ANSWER_TOKENS = MATCHED_TOKENS  # the final answer is scored in its first 32 tokens, as the quality eval scores
FEWEST_DISTRACTORS, MOST_DISTRACTORS = 2, 4
SYNTHETIC_TASKS = ("passkey", "niah", "multikey_niah", "multiquery_niah")  # single-fact tasks the 135M model solves
SYNTHETIC_LENGTH = 3072  # tokens, about the documents' length: the default budget (1024) compresses them about 3x
DEFAULT_CASES = 20  # about 40 minutes with the speed section on 2 shared cores
SPEED_PAST = 8192  # the speed goal counts the turns whose conversation is longer than this
SPEED_GOAL = 5.0  # (c) at least this many times faster per turn than (b) past SPEED_PAST tokens
QUALITY_GOAL = 2.0  # (c) within this many exact-match points of (b)
SPEED_MAX_MODEL_LEN = 16384
SPEED_LENGTHS = dict(first_tokens=7000, last_tokens=10000, paste_tokens=1500)  # a speed conversation, in tokens
PASTED_TURN_TOKENS = 200  # a speed turn of (c) feeding more new tokens than this pasted a section
QUICK_SPEED_LENGTHS, QUICK_SPEED_PAST = dict(first_tokens=1500, last_tokens=2600, paste_tokens=400), 2048

OPENERS = ("Read this document; I will ask about it.",
           "Please read the text above carefully. I have a few questions for later.",
           "Here is a document for you. Just say OK once you have read it.",
           "Keep this text in mind; we will come back to it.")
DISTRACTORS = ("What is the capital of Italy?", "How many days are there in a leap year?",
               "Name a fruit that is yellow.", "What is seven times eight?", "Which planet is closest to the sun?",
               "Give me one word that rhymes with cat.", "What colour do you get by mixing blue and yellow?",
               "How many legs does a spider have?", "At what temperature in Celsius does water boil?",
               "How do you say thank you in French?", "What do bees make?", "Name an animal that lives in the sea.",
               "In one sentence, what kind of text did I give you?", "Was that text formal or informal?",
               "Suggest a title for a short poem about autumn.", "What is the opposite of cold?")
PASTE_REQUEST = "Here is more of the text:\n\n{chunk}\n\nWhat is this part about? Answer in one line."
MODES = {"full": "(a) full cache, the whole conversation generated each turn",
         "reprefill": "(b) SnapKV, the whole conversation prefilled again each turn",
         "session": "(c) chat session, its compressed cache carried between turns",
         "session_full": "(d) chat session keeping its full history in host memory (each turn selects from all)"}


@dataclass(frozen=True)
class Conversation:
    """The user's side of one conversation: `turns[0]` holds the document, `turns[-1]` the question (if scored)."""
    key: str
    turns: tuple[str, ...]
    case: Case | None = None  # what the last turn is scored against; None for the speed conversations


# --- the conversations --------------------------------------------------------------------------------------------

def split_case(case: Case) -> tuple[str, str]:
    """A quality-eval case's prompt as (document, question): every case ends in a blank line and its question."""
    document, sep, question = case.prompt.rpartition("\n\n")
    if not sep or not document.strip() or not question.strip():
        raise ValueError(f"case {case.key}: its prompt does not end in a blank line and a question")
    return document, question


def build_conversation(case: Case, seed: int) -> Conversation:
    """The document and a request first, 2 to 4 distractor questions (deterministic in `seed`), the question last."""
    document, question = split_case(case)
    rng = random.Random(f"multiturn/{case.key}/{seed}")
    distractors = rng.sample(DISTRACTORS, rng.randint(FEWEST_DISTRACTORS, MOST_DISTRACTORS))
    return Conversation(case.key, (f"{document}\n\n{rng.choice(OPENERS)}", *distractors, question), case)


def quality_cases(count, n: int) -> list[Case]:
    """The first n cases: the report split's documents and synthetic single-fact cases at about their length,
    interleaved so that a short run has both kinds."""
    documents = iter(document_cases(count))
    synthetic = (make_case(task, REPORT_SEED + seed, SYNTHETIC_LENGTH, None, count, "report")
                 for seed in itertools.count() for task in SYNTHETIC_TASKS)  # built only when taken
    mixed = []
    while len(mixed) < n:
        mixed += [*itertools.islice(documents, 2), next(synthetic)]
    return mixed[:n]


def _paragraph_chunks(count, paragraphs: list[str], size: int) -> list[str]:
    chunks, current, tokens = [], [], 0
    for p in paragraphs:
        current.append(p)
        tokens += count(p) + 1
        if tokens >= size:
            chunks.append("\n\n".join(current))
            current, tokens = [], 0
    return chunks


def speed_conversation(count, index: int, first_tokens: int = SPEED_LENGTHS["first_tokens"],
                       last_tokens: int = SPEED_LENGTHS["last_tokens"],
                       paste_tokens: int = SPEED_LENGTHS["paste_tokens"]) -> Conversation:
    """A long conversation for timing: about `first_tokens` of the documents (taken from the `index`-th on) with a
    request, then short questions and pasted sections of about `paste_tokens` in turn, until it holds about
    `last_tokens` (answers counted at their most, DISTRACTOR_TOKENS)."""
    if not 0 < first_tokens < last_tokens:
        raise ValueError(f"a speed conversation needs 0 < first_tokens < last_tokens (got {first_tokens}, "
                         f"{last_tokens})")
    docs = load_documents()
    paragraphs = [p for i in range(len(docs)) for p in docs[(index * 5 + i) % len(docs)]["text"].split("\n\n")]
    chunks = _paragraph_chunks(count, paragraphs, first_tokens)
    first = chunks[0] if chunks else ""
    rest = iter(_paragraph_chunks(count, paragraphs[first.count("\n\n") + 1:], paste_tokens))
    rng = random.Random(f"multiturn/speed/{index}")
    turns, total = [f"{first}\n\n{rng.choice(OPENERS)}"], count(first) + 60
    questions = itertools.cycle(rng.sample(DISTRACTORS, len(DISTRACTORS)))
    while total < last_tokens:
        chunk = next(rest, None) if len(turns) % 2 == 0 else ""
        if not first or chunk is None:
            raise ValueError(f"the documents hold too little text for a {last_tokens}-token speed conversation")
        user = PASTE_REQUEST.format(chunk=chunk) if chunk else next(questions)
        turns.append(user)
        total += count(user) + DISTRACTOR_TOKENS + 10  # 10: the template's tokens around a user turn and answer
    return Conversation(f"speed/{index}", tuple(turns))


# --- running a conversation under each mode ---------------------------------------------------------------------

def turn_params(conversation: Conversation, turn: int, distractor_tokens: int = DISTRACTOR_TOKENS) -> SamplingParams:
    """Greedy; the scored last turn gets ANSWER_TOKENS, every other turn `distractor_tokens`."""
    scored = conversation.case is not None and turn == len(conversation.turns) - 1
    return SamplingParams(max_tokens=ANSWER_TOKENS if scored else distractor_tokens, temperature=0.0)


def templated_ids(llm, messages: list[dict]) -> list[int]:
    """The conversation as a client that resends it gets it prefilled (as LLM.encode_prompt does one message)."""
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(messages), add_special_tokens=False)


class Timer:
    """Wall-clock and CPU seconds (the process's, all threads) of a with-block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def seconds(self) -> dict:
        return dict(seconds=round(self.wall, 3), cpu_seconds=round(self.cpu, 3))


class ResentConversation:
    """Modes (a) and (b): every turn generates from the whole templated conversation, as a client that resends it."""

    def __init__(self, llm):
        self.llm, self.messages = llm, []

    def send(self, user: str, params: SamplingParams) -> tuple[list[int], dict]:
        """One turn: its answer's tokens and its stats, timed from templating the conversation to the answer."""
        with Timer() as timer:
            self.messages.append({"role": "user", "content": user})
            ids = templated_ids(self.llm, self.messages)
            out = self.llm.generate(prompt_token_ids=[ids], sampling_params=params)[0]
        if out.finish_reason == "error":
            raise RuntimeError(out.error)
        self.messages.append({"role": "assistant", "content": out.text})
        fed = len(out.token_ids) - 1  # the answer's last token is never fed (as a session counts it)
        kept = out.stats["kept_tokens"]
        return out.token_ids, dict(conversation_tokens=len(ids) + fed, new_tokens=len(ids), held_entries=kept + fed,
                                   compressed=kept < len(ids)) | timer.seconds()

    def close(self) -> None:
        pass


class CarriedConversation:
    """Modes (c) and (d): one chat session with the engine's SnapKV settings and the default reserve; (d) keeps
    the conversation's full history in host memory (`full_history`)."""

    def __init__(self, llm, full_history: bool = False):
        self.llm, self.chat = llm, llm.chat_session(full_history=full_history)

    def send(self, user: str, params: SamplingParams) -> tuple[list[int], dict]:
        """One turn: its answer's tokens and its stats, timed around `send` alone (the check below is not timed)."""
        start = self.chat.conversation_tokens
        with Timer() as timer:
            out = self.chat.send(user, params)
        if out.finish_reason == "error":
            raise RuntimeError(out.error)
        stats = self.chat.turns[-1]
        # False where the session's tokens (its answers as sampled) differ from its history templated and encoded
        # again (a decoded answer can encode to other tokens): modes (a) and (b) read the latter
        resent = templated_ids(self.llm, self.chat.history[:-1])
        same = self.chat.token_ids[:start + stats["new_tokens"]] == resent
        return out.token_ids, {k: stats[k] for k in ("conversation_tokens", "new_tokens", "held_entries",
                                                     "compressed")} | dict(same_as_resent=same) | timer.seconds()

    def close(self) -> None:
        self.chat.close()


def run_modes(conversation: Conversation, modes: dict,
              distractor_tokens: int = DISTRACTOR_TOKENS) -> dict[str, tuple[list[int], list[dict]]]:
    """Each mode's own conversation (mode name -> a Resent/CarriedConversation), run turn by turn in step, so a
    change in the machine's load hits every mode alike. Per mode: the last answer's tokens and per-turn stats,
    with the turn's wall-clock and CPU seconds."""
    answers, turns = {}, {mode: [] for mode in modes}
    try:
        for i, user in enumerate(conversation.turns):
            for mode, runner in modes.items():
                try:
                    answers[mode], stats = runner.send(user, turn_params(conversation, i, distractor_tokens))
                except RuntimeError as e:
                    raise RuntimeError(f"{conversation.key}, mode {mode}, turn {i + 1}: {e}") from None
                turns[mode].append(stats)
    finally:
        for runner in modes.values():
            runner.close()
    return {mode: (answers[mode], turns[mode]) for mode in modes}


def run_quality_conversation(full_llm, snapkv_llm, conversation: Conversation,
                             distractor_tokens: int = DISTRACTOR_TOKENS, modes=tuple(MODES),
                             reference: list[int] | None = None) -> list[dict]:
    """One row per mode (those in `modes`): the final answer, its exact-match score, matched tokens against (a)
    (`reference`: (a)'s final answer, when (a) is not among the modes run), per-turn stats."""
    runners = {"full": lambda: ResentConversation(full_llm), "reprefill": lambda: ResentConversation(snapkv_llm),
               "session": lambda: CarriedConversation(snapkv_llm),
               "session_full": lambda: CarriedConversation(snapkv_llm, full_history=True)}
    runs = run_modes(conversation, {mode: runners[mode]() for mode in modes}, distractor_tokens)
    reference = runs["full"][0] if "full" in runs else reference
    rows = []
    for mode, (tokens, turns) in runs.items():
        text = answer_text(snapkv_llm, tokens)
        rows.append(dict(key=f"quality|{conversation.key}|{mode}", section="quality", conversation=conversation.key,
                         task=conversation.case.task, mode=mode, distractors=len(conversation.turns) - 2,
                         answers=list(conversation.case.answers), output=text, score=conversation.case.score(text),
                         matched=matched_tokens(reference, tokens, snapkv_llm.eos_ids, MATCHED_TOKENS),
                         token_ids=tokens, turns=turns))
    return rows


SPEED_MODES = ("reprefill", "session", "session_full")


def run_speed_conversation(llm, conversation: Conversation, modes=SPEED_MODES) -> list[dict]:
    """Modes (b), (c) and (d) (those in `modes`) on one long conversation, timed per turn (nothing scored)."""
    runners = {"reprefill": lambda: ResentConversation(llm), "session": lambda: CarriedConversation(llm),
               "session_full": lambda: CarriedConversation(llm, full_history=True)}
    runs = run_modes(conversation, {mode: runners[mode]() for mode in modes})
    return [dict(key=f"speed|{conversation.key}|{mode}", section="speed", conversation=conversation.key, mode=mode,
                 turns=turns) for mode, (_, turns) in runs.items()]


# --- the report -------------------------------------------------------------------------------------------------

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

def load_engines(model: Path) -> tuple:
    """(a)'s engine (the full cache) and (b)/(c)/(d)'s (the default SnapKVConfig(); sessions reserve a slot each)."""
    from engine import LLM

    return (LLM(model, device="cpu", dtype="float32", snapkv=None, max_batch_size=1),
            LLM(model, device="cpu", dtype="float32", snapkv=SnapKVConfig(), max_batch_size=3))


def load_speed_engine(model: Path):
    """(b)/(c)/(d)'s engine for conversations past the model's trained positions."""
    from engine import LLM

    return LLM(model, device="cpu", dtype="float32", snapkv=SnapKVConfig(), max_batch_size=3,
               allow_longer_context=True, max_model_len=SPEED_MAX_MODEL_LEN)


def _append(path: Path, new_rows: list[dict], rows: dict[str, dict]) -> None:
    with path.open("a") as f:
        for row in new_rows:
            f.write(json.dumps(row) + "\n")
            rows[row["key"]] = row


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
            _append(jsonl, run_speed_conversation(speed_llm, conversation, missing), rows)
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
            _append(jsonl, run_quality_conversation(full_llm, snapkv_llm, conversation, modes=missing,
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
