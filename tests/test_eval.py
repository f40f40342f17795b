"""benchmarks.eval: task generators are deterministic and sized in tokens, scorers accept right and reject wrong
answers, the prefill-once shortcut is token-identical to LLM.generate, and a tiny end-to-end eval runs, resumes
and is solved by the full cache."""

from __future__ import annotations

import json

import pytest

from benchmarks.eval import tasks
from benchmarks.eval.prefill_once import PrefilledPrompt, token_agreement
from benchmarks.eval.report import niah_heatmaps, summary_table
from benchmarks.eval.runner import evaluate, policy_specs, row_key
from engine import LLM, SamplingParams
from engine.tokenizer import Tokenizer
from snapkv import SnapKVConfig


@pytest.fixture(scope="module")
def count(smol_dir):
    tok = Tokenizer.from_path(smol_dir)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


@pytest.fixture(scope="module")
def llm(smol_dir):
    return LLM(smol_dir)


@pytest.mark.parametrize("task", tasks.SUITE)
def test_generators_are_deterministic_and_sized(task, count):
    a = tasks.make_case(task, 3, 700, 0.5, count)
    b = tasks.make_case(task, 3, 700, 0.5, count)
    c = tasks.make_case(task, 4, 700, 0.5, count)
    assert a == b
    assert a.prompt != c.prompt
    assert a.answers and all(ans for ans in a.answers)
    # lengths count the chat-formatted prompt; the filler lands within a sentence or two of the target
    assert abs(count(a.prompt) + tasks.CHAT_OVERHEAD - 700) < 60


@pytest.mark.parametrize("task", tasks.SUITE)
def test_each_task_scores_right_and_wrong_answers(task, count):
    case = tasks.make_case(task, 1, 600, 0.25, count)
    right = "The answer is " + ", ".join(case.answers) + "."
    assert case.score(right) == 1.0
    assert case.score("I do not know.") == 0.0
    if len(case.answers) > 1:
        assert case.score(case.answers[0]) == pytest.approx(1 / len(case.answers))


def test_scorers_are_exact():
    assert tasks.score("numbers", ("12345",), "It is 12345.") == 1.0
    assert tasks.score("numbers", ("12345",), "It is 1234.") == 0.0  # a dropped digit is wrong
    assert tasks.score("numbers", ("12345",), "It is 123456.") == 0.0  # so is an extra one
    assert tasks.score("words", ("violin",), "* Violin\n* bowl") == 1.0
    assert tasks.score("words", ("violin",), "violins") == 0.0
    assert tasks.score("phrases", ("in the tin of buttons",), "It is kept in the tin of buttons!") == 1.0
    assert tasks.score("phrases", ("in the tin of buttons",), "It is kept in the tin.") == 0.0
    with pytest.raises(ValueError, match="unknown scorer"):
        tasks.score("fuzzy", ("a",), "a")


def test_bad_task_and_short_length_say_what_to_do(count):
    with pytest.raises(ValueError, match="choose from"):
        tasks.make_case("trivia", 0, 1000, None, count)
    with pytest.raises(ValueError, match="too short"):
        tasks.make_case("passkey", 0, 100, None, count)


def test_token_agreement():
    assert token_agreement([1, 2, 3, 4], [1, 2, 3, 4]) == 1.0
    assert token_agreement([1, 2, 3, 4], [1, 9, 3]) == 0.5
    assert token_agreement(list(range(100)), list(range(100)), n=64) == 1.0


@pytest.fixture(scope="module")
def prefilled(llm, count):
    """One PrefilledPrompt per prompt length, shared by the cases below: prefill once and decode many is what it is
    for (the tuning sweep decodes every policy from one)."""
    made = {}

    def get(length):
        if length not in made:
            case = tasks.make_case("passkey", 0, length, 0.4, count)
            made[length] = PrefilledPrompt(llm, llm.encode_prompt(case.prompt, chat=True))
        return made[length]
    return get


@pytest.mark.parametrize("length,cfg", [
    (800, None), (800, SnapKVConfig(budget=192, window=16, kernel=7)),
    (800, SnapKVConfig(budget=160, window=8, kernel=15, pooling="avg", group_agg="max")),
    (800, SnapKVConfig(budget=192, policy="streaming")), (450, SnapKVConfig(budget=192, window=32, kernel=5))],
    ids=["full", "snapkv", "snapkv-avg-max", "streaming", "snapkv-unchunked"])
def test_prefill_once_equals_generate(llm, smol_dir, count, prefilled, length, cfg):
    """800 tokens: longer than the engine's CPU prefill chunk (512), so both sides take the chunked path."""
    case = tasks.make_case("passkey", 0, length, 0.4, count)
    ids = llm.encode_prompt(case.prompt, chat=True)
    # one slot: the reference generates one prompt (and a full cache of 8 slots would be 2.9 GB to allocate)
    expected = LLM(smol_dir, snapkv=cfg, max_batch_size=1).generate(prompt_token_ids=[ids],
                                                                    sampling_params=SamplingParams(max_tokens=12))[0]
    prefilled = prefilled(length)
    assert prefilled.prompt_ids == ids
    assert prefilled.decode(cfg, 12).token_ids == expected.token_ids
    # several policies batched together give the same greedy tokens here
    batched = prefilled.decode_many([SnapKVConfig(budget=128, window=8), cfg], 12)
    assert batched[1].token_ids == expected.token_ids


def test_windows_wider_than_the_capture_are_refused(llm, count):
    ids = llm.encode_prompt(tasks.make_case("passkey", 0, 300, 0.5, count).prompt, chat=True)
    with pytest.raises(ValueError, match="max_window=96"):
        PrefilledPrompt(llm, ids, max_window=64).decode(SnapKVConfig(budget=200, window=96), 4)


def test_small_end_to_end_eval(llm, count, tmp_path):
    cases = [("suite", tasks.make_case("passkey", 0, 500, None, count)),
             ("suite", tasks.make_case("qa", 0, 500, None, count)),
             ("niah_grid", tasks.make_case("niah", 0, 500, 0.5, count))]
    specs = policy_specs(["full", "snapkv", "streaming"], [256], SnapKVConfig(window=16, kernel=7))
    out = tmp_path / "eval.jsonl"
    rows = evaluate(llm, cases, specs, out, max_tokens=24)
    assert len(rows) == len(cases) * len(specs)
    full = [r for r in rows if r["policy"] == "full"]
    assert all(r["score"] == 1.0 for r in full), [r["output"] for r in full]
    # recall is computed for the full cache too: all of the prompt's attention mass falls on what it keeps
    assert all(len(r["recall"]) == 30 and all(abs(x - 1) < 1e-4 for x in r["recall"]) for r in full)
    snap = [r for r in rows if r["policy"] == "snapkv"]
    assert all(r["compression"] > 1.5 and 0 < min(r["recall"]) <= 1 for r in snap)
    # resumable: a second run finds every row by key and appends nothing
    lines = out.read_text().splitlines()
    assert {json.loads(x)["key"] for x in lines} == {row_key(c, s) for _, c in cases for s in specs}
    evaluate(llm, cases, specs, out, max_tokens=24)
    assert out.read_text().splitlines() == lines
    table = summary_table(rows)
    assert "| full |" in table and "snapkv@256" in table and "streaming@256" in table
    pngs = niah_heatmaps(rows, tmp_path)
    assert len(pngs) == len(specs) and all(p.stat().st_size > 0 for p in pngs)


def test_quantized_eval_rows(smol_dir, count):
    """benchmarks.eval.quantized: the reference configuration scored against itself is exact (KL 0, every top-1
    and all 32 greedy tokens the same); int8 KV and int4 weights move the distributions but stay close."""
    from benchmarks.eval.fidelity import FORCED_TOKENS, forced_logits
    from benchmarks.eval.quantized import score_config

    case = tasks.make_case("passkey", 2, 400, 0.5, count)
    ref_llm = LLM(smol_dir, max_batch_size=2, max_kv_len=600)
    ids = ref_llm.encode_prompt(case.prompt, chat=True)
    prefilled = PrefilledPrompt(ref_llm, ids)
    tokens = prefilled.decode(None, FORCED_TOKENS + 1, ignore_eos=True).token_ids
    reference = dict(tokens=tokens, logits=forced_logits(ref_llm.model, prefilled, None, tokens[:FORCED_TOKENS]))
    full, snap = score_config(ref_llm, case, ids, reference)
    assert (full["cache"], full["kl"], full["top1"], full["matched"]) == ("full", 0.0, 1.0, 32)
    assert snap["cache"] == "snapkv 4x" and snap["kl"] > 0
    kv8 = score_config(LLM(smol_dir, max_batch_size=2, max_kv_len=600, kv_dtype="int8"), case, ids, reference)[0]
    int4 = score_config(LLM(smol_dir, max_batch_size=2, max_kv_len=600, weights_dtype="int4"), case, ids,
                        reference)[0]
    for row in (kv8, int4):
        assert 0 < row["kl"] < 0.1 and row["top1"] >= 0.8, row
