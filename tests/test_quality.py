"""The quality eval's foundations: the tuning and report splits share no text, the real-text documents are what
they claim, each metric is right on hand-made inputs, and the teacher-forced pass computes what the engine's
decode computes (its argmax reproduces the engine's greedy tokens, full cache and compressed, with a sliding
window too)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks.eval import filler, tasks
from benchmarks.eval.documents import load_documents
from benchmarks.eval.fidelity import forced_logits, kept_for, kl_and_top1, wilson
from benchmarks.eval.prefill_once import PrefilledPrompt
from benchmarks.eval.quality import config_for, summarize
from benchmarks.eval.splits import report_cases, tuning_cases
from engine import LLM
from compare import first_difference, matched_tokens
from engine.tokenizer import Tokenizer
from snapkv import SnapKVConfig
from tests.conftest import tiny_model_dir


@pytest.fixture(scope="module")
def count(smol_dir):
    tok = Tokenizer.from_path(smol_dir)
    return lambda text: len(tok.encode(text, add_special_tokens=False))


def sentences(text: str) -> set[str]:
    return {s.strip() for s in re.split(r"(?<=[.?!:])\s+|\n+", text) if len(s.split()) >= 4}


def test_splits_share_no_text(count):
    tuning = tuning_cases(count, {1024: 2})
    report = report_cases(count, {1024: 2})
    assert len(tuning) == 16 and len(report) == 16 + len(load_documents())
    tuning_text = set().union(*(sentences(c.prompt) for c in tuning))
    report_text = set().union(*(sentences(c.prompt) for c in report))
    assert tuning_text and report_text and not tuning_text & report_text
    # nor a word of their filler vocabularies, nor a key word
    village, city = filler.STYLES["village"], filler.STYLES["city"]
    words = lambda style: {w for group in style[:5] for phrase in group for w in phrase.split()  # noqa: E731
                           if len(w) > 3}
    assert not words(village) & words(city)
    assert not set(tasks.WORDING["tuning"]["key_words"]) & set(tasks.WORDING["report"]["key_words"])
    assert {c.seed for c in report if c.task != "document"} >= {1000, 1001}


def test_the_report_split_is_large_enough(count):
    per_length = {n: 1 for n in (1024, 2048, 4096)}
    assert len(report_cases(count, per_length, documents=False)) == 24
    from benchmarks.eval.splits import LENGTHS, REPORT_PER_LENGTH
    assert set(REPORT_PER_LENGTH) == set(LENGTHS)
    assert 8 * sum(REPORT_PER_LENGTH.values()) + len(load_documents()) >= 200


def test_documents_are_long_original_and_answer_once():
    docs = load_documents()
    assert len(docs) >= 12
    assert len({d["genre"] for d in docs}) >= 12
    for d in docs:
        assert len(d["text"].split()) >= 1500, d["name"]
        assert d["answer"].lower() in d["needle"].lower()
    depths = sorted(d["depth"] for d in docs)
    assert depths[0] <= 0.15 and depths[-1] >= 0.9


def test_matched_tokens_and_first_difference():
    eos = {0}
    assert matched_tokens([5, 6, 7, 0], [5, 6, 7, 0], eos, n=8) == 8  # both ended together: all positions match
    assert matched_tokens([5, 6, 7, 0], [5, 9, 7, 0], eos, n=8) == 7
    assert matched_tokens([5, 6, 0], [5, 6, 7, 8, 0], eos, n=6) == 3  # 2 shared, 3 differ, then both ended
    assert matched_tokens([1, 2, 3], [1, 2, 3, 4], n=3) == 3  # only the first n count
    assert first_difference([5, 6, 0], [5, 6, 0, 9], eos) is None  # after eos nothing counts
    assert first_difference([5, 6, 7], [5, 8, 7], eos) == 1


def test_kl_top1_and_wilson_on_hand_made_inputs():
    ref = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    other = torch.log(torch.tensor([[0.5, 0.5], [0.1, 0.9]]))
    kl, top1 = kl_and_top1(ref, other)
    expected = (0.9 * torch.log(torch.tensor(9.0)) + 0.1 * torch.log(torch.tensor(1 / 9))) / 2
    assert kl == pytest.approx(float(expected), abs=1e-6) and top1 == 0.5
    assert kl_and_top1(ref, ref) == (pytest.approx(0.0, abs=1e-7), 1.0)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(200, 200)[1] == 1.0 and wilson(200, 200)[0] == pytest.approx(0.9812, abs=1e-4)


def test_ratios_and_summary():
    base = SnapKVConfig(window=16)
    assert config_for(base, "adakv", 4, 1000).budget == 250 and config_for(base, "snapkv", 8, 100).budget == 17
    rows = [dict(policy="full", ratio=1, score=1.0, matched=32, kl=0.0, top1=1.0, prompt_tokens=100, kept_mean=100),
            dict(policy="snapkv", ratio=4, score=0.0, matched=16, kl=0.2, top1=0.5, prompt_tokens=100, kept_mean=25),
            dict(policy="snapkv", ratio=4, score=1.0, matched=32, kl=0.0, top1=1.0, prompt_tokens=100, kept_mean=25)]
    full, snap = summarize(rows)
    assert full["policy"] == "full" and snap["em"] == 0.5 and snap["matched"] == 24 and snap["compression"] == 4


@pytest.mark.parametrize("kind,overrides,policy", [("llama", {}, "adakv"), ("llama", {}, None),
                                                   ("mistral", {"sliding_window": 50}, "snapkv"),
                                                   ("llama", {}, "pyramidkv")])
def test_teacher_forced_pass_reproduces_engine_greedy(tmp_path, kind, overrides, policy):
    llm = LLM(tiny_model_dir(tmp_path, kind, num_hidden_layers=3, **overrides), max_batch_size=2)
    prompt = torch.randint(3, 256, (120,), generator=torch.Generator().manual_seed(3)).tolist()
    prefilled = PrefilledPrompt(llm, prompt)
    cfg = None if policy is None else SnapKVConfig(budget=30, window=8, kernel=5, policy=policy)
    out = prefilled.decode(cfg, 17, ignore_eos=True)
    kept = kept_for(llm, prefilled, cfg)
    if kept is not None:
        assert all(torch.equal(a, b) for a, b in zip(kept, out.kept))  # the policy's own choice, as in the engine
    logits = forced_logits(llm.model, prefilled, kept, out.token_ids[:16])
    assert logits.argmax(-1).tolist() == out.token_ids[1:17]
