"""engine.sampler / SamplingParams: the hash, sampled distributions against softmax and filter_logits, per-request
reproducibility independent of the batch, exact greedy rows, compiled == eager, and validation."""

import math

import pytest
import torch

from engine import SamplingParams
from engine.sampler import (filtered_sample_tokens, greedy_tokens, gumbel_noise, hash32,
                            sample_tokens)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask to -inf all but the top_k tokens, then all outside the smallest set whose probability reaches top_p
    (HF order: temperature, then top-k, then top-p). logits [..., V] float32."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best one always stays)
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def lowbias32(x: int) -> int:
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def rows(batch, temperature=1.0, top_k=0, top_p=1.0, seed=0, index=0):
    """Per-row parameter tensors, each argument a scalar (broadcast) or a list of length batch."""
    def col(v, dtype):
        return torch.tensor(v if isinstance(v, list) else [v] * batch, dtype=dtype)
    return (col(temperature, torch.float32), col(top_k, torch.int64), col(top_p, torch.float32),
            col(seed, torch.int64), col(index, torch.int64))


def frequencies(tokens, vocab_size):
    return torch.bincount(tokens, minlength=vocab_size).float() / len(tokens)


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


def test_hash32_matches_a_python_reference():
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([torch.tensor([0, 1, 2, 0xFFFF, 0x10000, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1]),
                        torch.tensor([1 << i for i in range(32)]),
                        torch.randint(0, 2**32, (950,), generator=gen)])
    assert hash32(values).tolist() == [lowbias32(v) for v in values.tolist()]
    # the input is taken mod 2^32, so a full 64-bit seed can be passed to it
    big = torch.tensor([2**62 + 12345, 2**63 - 1])
    assert hash32(big).tolist() == [lowbias32(12345), lowbias32(2**32 - 1)]


def test_noise_is_standard_gumbel():
    g = gumbel_noise(torch.arange(200), torch.zeros(200, dtype=torch.int64), 1000)
    assert g.shape == (200, 1000) and g.dtype == torch.float32 and torch.isfinite(g).all()
    assert abs(g.mean().item() - 0.5772) < 0.01  # Euler-Mascheroni constant
    assert abs(g.var().item() - math.pi**2 / 6) < 0.03


LOGITS5 = torch.tensor([2.0, 1.2, 0.9, 0.1, -0.8])
N = 20000


@pytest.mark.parametrize("vary", ["seed", "index"])
def test_temperature_sampling_matches_softmax(vary):
    t = 0.7
    steps = torch.arange(N)
    seed, index = (steps, torch.zeros(N, dtype=torch.int64)) if vary == "seed" else (torch.full((N,), 42), steps)
    tokens = sample_tokens(LOGITS5.expand(N, 5), torch.full((N,), t), seed, index)
    assert (frequencies(tokens, 5) - (LOGITS5 / t).softmax(-1)).abs().max() < 0.015
    temperature, top_k, top_p, _, _ = rows(N, t)
    filtered = filtered_sample_tokens(LOGITS5.expand(N, 5), temperature, top_k, top_p, seed, index)
    assert torch.equal(filtered, tokens)


def test_top_k_sampling_keeps_the_best_k_with_renormalized_probabilities():
    t = 0.7
    temperature, top_k, top_p, _, index = rows(N, t, top_k=2)
    tokens = filtered_sample_tokens(LOGITS5.expand(N, 5), temperature, top_k, top_p, torch.arange(N), index)
    expected = torch.zeros(5)
    expected[:2] = (LOGITS5[:2] / t).softmax(-1)
    freq = frequencies(tokens, 5)
    assert freq[2:].sum() == 0
    assert (freq - expected).abs().max() < 0.015


@pytest.mark.parametrize("top_k,top_p", [(0, 0.75), (0, 0.9), (3, 0.9)])
def test_top_p_sampling_keeps_the_nucleus_of_filter_logits(top_k, top_p):
    t = 0.7
    reference = filter_logits(LOGITS5 / t, top_k, top_p)
    nucleus = torch.isfinite(reference)
    assert 1 < nucleus.sum() < 5  # the test would prove nothing if the nucleus were one token or everything
    temperature, top_ks, top_ps, _, index = rows(N, t, top_k, top_p)
    tokens = filtered_sample_tokens(LOGITS5.expand(N, 5), temperature, top_ks, top_ps, torch.arange(N), index)
    freq = frequencies(tokens, 5)
    assert freq[~nucleus].sum() == 0
    assert (freq - reference.softmax(-1)).abs().max() < 0.015


def test_a_request_draws_the_same_tokens_in_any_batch_row():
    torch.manual_seed(0)
    vocab = 1000
    checked, not_argmax = 0, 0
    for case in range(20):
        row = torch.randn(vocab) * 2
        seed, index = [0, 7, 2**32 + 7, 2**63 - 1][case % 4], case * 13
        t, k, p = [(1.0, 0, 1.0), (1.3, 50, 1.0), (0.9, 0, 0.9), (1.5, 200, 0.95)][case % 4]
        alone = rows(1, t, k, p, seed, index)
        batch = torch.randn(8, vocab) * 3
        batch[5] = row
        others = rows(8, torch.rand(8).tolist(), torch.randint(0, 20, (8,)).tolist(),
                      (torch.rand(8) * 0.5 + 0.5).tolist(), torch.randint(0, 2**62, (8,)).tolist(),
                      torch.randint(0, 100, (8,)).tolist())
        for column, value in zip(others, alone):
            column[5] = value[0]
        token = filtered_sample_tokens(row[None], *alone)[0]
        assert filtered_sample_tokens(batch, *others)[5] == token
        if k == 0 and p == 1.0:
            assert sample_tokens(row[None], alone[0], alone[3], alone[4])[0] == token
            assert sample_tokens(batch, others[0], others[3], others[4])[5] == token
        checked += 1
        not_argmax += int(token != row.argmax())
    assert checked == 20 and not_argmax >= 10  # the rows really sample


def test_different_seeds_and_indices_give_different_sequences():
    torch.manual_seed(1)
    logits = torch.randn(1000).expand(50, 1000)
    steps = torch.arange(50)

    def sequence(seed):
        return sample_tokens(logits, torch.ones(50), torch.full((50,), seed), steps)

    a = sequence(1)
    assert torch.equal(a, sequence(1))
    assert len(set(a.tolist())) > 30  # the index changes the draw within one request
    for other in (2, 1 + 2**32, 2**63 - 1):  # both halves of the seed count
        assert (sequence(other) == a).sum() < 5


def test_greedy_rows_are_exact_argmax_beside_sampling_rows():
    torch.manual_seed(2)
    logits = torch.randn(8, 500) * 0.1  # flat, so sampling rows almost never hit the argmax by chance
    temperature, top_k, top_p, seed, index = rows(8, [0.0, 1.0, 2.0, 0.0, 1.0, 0.0, 5.0, 1.0],
                                                  [0, 5, 0, 3, 100, 0, 0, 1], [1.0, 1.0, 0.5, 0.9, 0.8, 0.5, 1.0, 1.0],
                                                  list(range(8)), [3] * 8)
    argmax = greedy_tokens(logits)
    assert torch.equal(argmax, logits.argmax(-1))
    filtered = filtered_sample_tokens(logits, temperature, top_k, top_p, seed, index)
    plain = sample_tokens(logits, temperature, seed, index)
    greedy = temperature == 0
    assert torch.equal(filtered[greedy], argmax[greedy]) and torch.equal(plain[greedy], argmax[greedy])
    assert filtered[7] == argmax[7]  # top_k 1 is greedy too
    assert (filtered[~greedy] != argmax[~greedy]).sum() >= 3  # of the 4 rows that really sample
    # half precision logits are cast, not rejected
    assert torch.equal(filtered_sample_tokens(logits.half(), temperature, top_k, top_p, seed, index)[greedy],
                       logits.half().float().argmax(-1)[greedy])


def test_compiled_matches_eager():
    torch.manual_seed(3)
    logits = torch.randn(8, 64) * 2
    temperature, top_k, top_p, seed, index = rows(
        8, [0.0, 0.5, 1.0, 1.0, 2.0, 0.8, 1.0, 1.2], [0, 0, 5, 0, 10, 3, 0, 64], [1.0, 1.0, 1.0, 0.8, 0.9, 0.7, 0.95, 1.0],
        [0, 1, 2, 3, 2**40, 5, 2**63 - 1, 7], list(range(8)))
    filtered = torch.compile(filtered_sample_tokens, fullgraph=True, dynamic=False)
    plain = torch.compile(sample_tokens, fullgraph=True, dynamic=False)
    # scalar C++ kernels: what is tested is the full graph and its tokens; vectorizing the int64 hash adds ~50 s of gcc
    with torch._inductor.config.patch({"cpp.simdlen": 1}):
        for step in range(3):
            assert torch.equal(filtered(logits, temperature, top_k, top_p, seed, index + step),
                               filtered_sample_tokens(logits, temperature, top_k, top_p, seed, index + step))
            assert torch.equal(plain(logits, temperature, seed, index + step),
                               sample_tokens(logits, temperature, seed, index + step))


def test_sampled_text_is_reproducible(tiny_chat_dir):
    """Through the engine, text in and text out (a tiny random model with SmolLM2's vocabulary: the draws, not the
    answers, are what is tested)."""
    from engine import LLM

    llm = LLM(tiny_chat_dir, max_batch_size=2)  # the batch below is two requests; sampling costs per slot
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
