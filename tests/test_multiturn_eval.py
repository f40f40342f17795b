"""The multi-turn eval (benchmarks.eval.multiturn), end to end on a tiny random Llama with SmolLM2's tokenizer.

- A conversation holds the fact in turn 1 only, 2 to 4 distractors chosen by the seed, and the question last.
- With a budget that covers the whole conversation, modes (b) and (c) produce exactly mode (a)'s tokens (the
  session is exact when nothing is compressed); with a small budget both compress and the session feeds only each
  turn's new tokens.
- The speed section runs past the model's trained length, and the report carries both goal lines with their figures
  and the verdict its numbers call for.
"""

from __future__ import annotations

import re

import pytest

from benchmarks.eval.documents import INSTRUCTION
from benchmarks.eval.conversations import (DISTRACTORS, MODES, build_conversation, quality_cases,
                                           run_quality_conversation, run_speed_conversation, speed_conversation,
                                           split_case)
from benchmarks.eval.multiturn import plot, quality_goal, report, speed_goal, speed_table_rows, summarize_quality
from benchmarks.eval.tasks import Case
from engine import LLM
from snapkv.config import SnapKVConfig
from tests.conftest import tiny_model_dir

FACT = "The lighthouse keeper's dog was called Zorbleflap."
FILLER = " ".join(f"On day {i} the boats came back to the harbour before the evening tide." for i in range(30))
QUESTION = f"Question: What was the lighthouse keeper's dog called? {INSTRUCTION}"
CASE = Case("document", 7, 0, 0.3, f"{FILLER[:600]} {FACT} {FILLER[600:]}\n\n{QUESTION}", ("Zorbleflap",), "phrases")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_multiturn"), vocab_size=49152, max_position_embeddings=2048)


@pytest.fixture(scope="module")
def full_llm(model_dir):
    return LLM(model_dir, snapkv=None, max_batch_size=1, max_kv_len=2048)


def count_with(llm):
    return lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))


def test_the_fact_comes_in_turn_one_and_the_question_last():
    conversation = build_conversation(CASE, seed=0)
    assert FACT in conversation.turns[0] and conversation.turns[-1] == QUESTION
    assert not any("Zorbleflap" in turn for turn in conversation.turns[1:])
    assert 2 <= len(conversation.turns) - 2 <= 4 and set(conversation.turns[1:-1]) <= set(DISTRACTORS)
    assert build_conversation(CASE, seed=0) == conversation
    assert len({build_conversation(CASE, seed).turns for seed in range(6)}) > 1  # the seed varies the distractors
    with pytest.raises(ValueError, match="blank line"):
        split_case(Case("document", 1, 0, None, "no question here", ("x",), "phrases"))


def test_quality_cases_mix_documents_and_synthetic_ones_and_all_split(full_llm):
    cases = quality_cases(count_with(full_llm), 4)
    assert [c.task for c in cases] == ["document", "document", "passkey", "document"]
    for case in cases:
        document, question = split_case(case)
        assert case.answers[0] in document and case.answers[0] not in question
        assert question.endswith(("only.", "digits only."))


@pytest.fixture(scope="module")
def roomy_llm(model_dir):
    """A SnapKV engine whose budget covers every test conversation: nothing is compressed."""
    return LLM(model_dir, snapkv=SnapKVConfig(budget=1500, window=8), max_batch_size=3, max_kv_len=2048)


def test_session_equals_the_full_cache_when_nothing_is_compressed(full_llm, roomy_llm):
    """Two-token distractor answers, which the random model's tokens survive decoding and encoding again, so all
    three modes read the same tokens; the final answer (32 tokens) must then be the same in all of them."""
    conversation = build_conversation(CASE, seed=1)
    rows = {r["mode"]: r for r in run_quality_conversation(full_llm, roomy_llm, conversation, distractor_tokens=2)}
    assert set(rows) == set(MODES)
    full = rows["full"]
    assert len(full["turns"]) == len(conversation.turns) == full["distractors"] + 2 and len(full["token_ids"]) > 2
    for mode in ("reprefill", "session", "session_full"):
        assert rows[mode]["token_ids"] == full["token_ids"], mode
        assert rows[mode]["matched"] == 32 and rows[mode]["output"] == full["output"]
        assert not any(t["compressed"] for t in rows[mode]["turns"])
    # the session fed the same conversation the full cache re-read, a turn's new tokens at a time
    session = rows["session"]["turns"]
    assert all(t["same_as_resent"] for t in session)
    assert [t["conversation_tokens"] for t in session] == [t["conversation_tokens"] for t in full["turns"]]
    assert all(s["new_tokens"] < f["new_tokens"] / 5 for s, f in zip(session[1:], full["turns"][1:]))


def test_answers_that_encode_differently_are_flagged(full_llm, roomy_llm):
    """24-token answers of a random model (runs like ",))" merge when encoded again): the session keeps its sampled
    tokens, the resent modes read other ones, and the turn stats say so."""
    rows = {r["mode"]: r for r in run_quality_conversation(full_llm, roomy_llm, build_conversation(CASE, seed=1))}
    flags = [t["same_as_resent"] for t in rows["session"]["turns"]]
    assert flags[0] and not all(flags)
    assert "identical in" in report(list(rows.values()), "tiny", "cmd")


def test_a_small_budget_compresses_both_snapkv_modes(model_dir, full_llm):
    small = LLM(model_dir, snapkv=SnapKVConfig(budget=64, window=8, kernel=3), max_batch_size=3)
    rows = run_quality_conversation(full_llm, small, build_conversation(CASE, seed=2))
    summary = summarize_quality(rows)
    assert summary["full"]["compression"] == 1.0 and summary["full"]["matched"] == 32
    for mode in ("reprefill", "session"):
        assert summary[mode]["compression"] > 2
        assert 0 <= summary[mode]["matched"] <= 32
    session = next(r for r in rows if r["mode"] == "session")["turns"]
    assert session[0]["compressed"] and session[0]["held_entries"] <= 64 + 24
    # the short later turns fit the default reserve: the question never chooses what the session holds
    assert not any(t["compressed"] for t in session[1:])
    assert "In 1 of 1 conversations (c) compressed in turn 1 only" in report(rows, "tiny", "cmd")


def test_speed_section_past_the_trained_length_and_the_report(model_dir, full_llm, tmp_path):
    longer = LLM(model_dir, snapkv=SnapKVConfig(budget=128, window=8, kernel=3), max_batch_size=3,
                 allow_longer_context=True, max_model_len=4096)
    conversation = speed_conversation(count_with(longer), 0, first_tokens=1500, last_tokens=2600, paste_tokens=400)
    with pytest.raises(ValueError, match="too little text"):
        speed_conversation(count_with(longer), 0, first_tokens=1500, last_tokens=10 ** 6)
    rows = run_speed_conversation(longer, conversation)
    lines = speed_table_rows(rows)
    assert len(lines) == len(conversation.turns) >= 4 and lines[-1]["tokens"] > 2048
    assert all(x["session_new"] < x["tokens"] / 2 and x["ratio"] > 0 for x in lines[1:])
    rows += run_quality_conversation(full_llm, longer, build_conversation(CASE, seed=3))
    text = report(rows, "tiny", "python -m benchmarks.eval.multiturn --test", past=2048)
    number = r"-?\d+(\.\d+)?"
    assert re.search(rf"\(c\) within 2 points of \(b\): \*\*(met|missed)\*\*: \(c\) {number}% vs \(b\) {number}%",
                     text)
    assert re.search(rf"faster per turn than \(b\) once the conversation passes 2048 tokens on CPU: \*\*(met|missed)"
                     rf"\*\*: {number}x", text)
    assert text.count("| speed/0 |") == len(lines) and all(MODES[m] in text for m in MODES)
    assert "By kind of turn past 2048 tokens: short questions" in text and "pasted sections" in text
    assert plot(rows, tmp_path / "multiturn.png", past=2048).stat().st_size > 10_000


def test_goal_verdicts_follow_the_figures():
    summary = lambda b, c: {"reprefill": dict(em=b, n=20), "session": dict(em=c, n=20)}  # noqa: E731
    assert "**met**" in quality_goal(summary(0.50, 0.485)) and "-1.5 points" in quality_goal(summary(0.50, 0.485))
    assert "**missed**" in quality_goal(summary(0.50, 0.45))
    assert "not measured" in quality_goal({})
    line = lambda tokens, b, c: dict(tokens=tokens, b_s=b, c_s=c, ratio=b / c, b_cpu=b, c_cpu=c)  # noqa: E731
    assert "**met**: 6.0x" in speed_goal([line(9000, 6.0, 1.0), line(7000, 1.0, 1.0)])
    assert "**missed**: 4.0x" in speed_goal([line(9000, 4.0, 1.0), line(10000, 4.0, 1.0)])
    assert "not measured" in speed_goal([line(7000, 6.0, 1.0)])
