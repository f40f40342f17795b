"""engine.sampler / SamplingParams: filtering on known distributions, seeds, and validation."""

import math

import pytest
import torch

from engine import SamplingParams
from engine.sampler import filter_logits, make_generator, sample_tokens


def test_top_p_on_a_known_distribution():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log()
    kept = lambda p: torch.isfinite(filter_logits(logits, top_p=p)).tolist()  # noqa: E731
    assert kept(0.5) == [False, True, False, False]  # 0.5 alone reaches 0.5
    assert kept(0.6) == [False, True, True, False]
    assert kept(0.8) == [False, True, True, False]  # 0.5 + 0.3 = 0.8 reaches it
    assert kept(0.81) == [False, True, True, True]
    assert kept(1.0) == [True] * 4
    renorm = filter_logits(logits, top_p=0.6).softmax(-1)
    assert torch.allclose(renorm, torch.tensor([0, 0.5 / 0.8, 0.3 / 0.8, 0]))


def test_top_k():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.5]])
    out = filter_logits(logits, top_k=2)
    assert torch.isfinite(out).tolist() == [[False, True, True, False], [False, False, True, True]]


def test_top_k_1_equals_greedy_and_seeds():
    torch.manual_seed(0)
    logits = torch.randn(3, 1000) * 3
    greedy = logits.argmax(-1).tolist()
    p1 = SamplingParams(temperature=1.0, top_k=1, seed=7)
    assert sample_tokens(logits, [p1] * 3, [make_generator(7, torch.device("cpu"))] * 3) == greedy
    p = SamplingParams(temperature=1.0)
    draw = lambda seed: sample_tokens(logits, [p] * 3, [make_generator(seed, torch.device("cpu"))] * 3)  # noqa
    assert draw(1) == draw(1)
    assert draw(1) != draw(2)
    # a finished slot gives -1 and consumes nothing
    assert sample_tokens(logits, [None, SamplingParams(), None], [None] * 3) == [-1, greedy[1], -1]


def test_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = make_generator(0, torch.device("cpu"))
    cold = [sample_tokens(logits, [SamplingParams(temperature=0.05)], [gen])[0] for _ in range(200)]
    hot = [sample_tokens(logits, [SamplingParams(temperature=5.0)], [gen])[0] for _ in range(400)]
    assert cold.count(0) == 200
    assert min(hot.count(i) for i in range(3)) > 60  # near uniform


def test_sampled_text_is_reproducible(smol_dir):
    from engine import LLM

    llm = LLM(smol_dir)
    run = lambda seed: llm.generate("Tell me a story about a fox.", SamplingParams(  # noqa: E731
        max_tokens=24, temperature=1.0, top_p=0.95, seed=seed), chat=True)[0].text
    assert run(11) == run(11)
    assert run(11) != run(12)
    # a batch does not change a request's draws
    batch = llm.generate(["Tell me a story about a fox.", "Say hi."],
                         [SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=11),
                          SamplingParams(max_tokens=24, temperature=1.0, seed=3)], chat=True)
    assert batch[0].text == run(11)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_tokens": 0}, "max_tokens"), ({"temperature": -1}, "temperature"), ({"temperature": math.nan}, "temperature"),
    ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"seed": -1}, "seed"),
    ({"stop": [""]}, "stop")])
def test_invalid_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)
