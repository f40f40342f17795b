"""The budget-allocating and alternative policies (AdaKV, PyramidKV, TOVA, key-norm, sinks), each against a plain
reference written with loops; the sliding-window restriction; and decoding from rows of different lengths
against a masked full-attention reference."""

import math

import pytest
import torch

from engine import SamplingParams
from snapkv import SnapKVConfig, make_policy, snapkv_scores
from snapkv.allocation import ADAKV_CAP, ADAKV_FLOOR, adakv_mask, mask_positions, pyramid_budgets
from tests.test_snapkv_engine import Capture, reference_greedy, tiny


def adakv_reference(scores, per_head, floor=ADAKV_FLOOR, cap=ADAKV_CAP):
    """AdaKV written out: each head's own top `floor` first, then the best remaining scores of the whole layer in
    order (ties: lower head, then earlier position), skipping a head once it holds `cap`."""
    b, h, n = scores.shape
    chosen = [[set() for _ in range(h)] for _ in range(b)]
    most = min(n, max(per_head, int(cap * per_head)))
    for bi in range(b):
        s = scores[bi].tolist()
        for hi in range(h):
            order = sorted(range(n), key=lambda p: (-s[hi][p], p))
            chosen[bi][hi].update(order[: int(floor * per_head)])
        left = h * per_head - sum(len(c) for c in chosen[bi])
        for _, hi, p in sorted((-s[hi][p], hi, p) for hi in range(h) for p in range(n)):
            if left == 0:
                break
            if p not in chosen[bi][hi] and len(chosen[bi][hi]) < most:
                chosen[bi][hi].add(p)
                left -= 1
    return chosen


@pytest.mark.parametrize("seed", range(4))
def test_adakv_allocation_equals_reference(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(2, 4, 60, generator=g) ** 4  # skewed, so heads differ in concentration
    scores[:, 1] *= 8  # one head far more concentrated: it takes more than its share, up to the cap
    mask = adakv_mask(scores, per_head=10)
    reference = adakv_reference(scores, per_head=10)
    for b in range(2):
        for h in range(4):
            assert set(torch.nonzero(mask[b, h]).flatten().tolist()) == reference[b][h]
    counts = mask.sum(-1)
    assert (counts.sum(-1) == 40).all() and (counts >= 2).all() and (counts <= 20).all()
    assert (counts[:, 1] > 10).all()  # the budget moved to where the scores are


def test_mask_positions_pads_shorter_rows():
    mask = torch.tensor([[[True, False, True, True], [False, True, False, False]]])
    assert mask_positions(mask).tolist() == [[[0, 2, 3], [1, -1, -1]]]


def test_pyramid_budgets_shrink_with_depth_for_the_same_total():
    budgets = pyramid_budgets(100, 6)
    assert sum(budgets) == 600 and budgets == sorted(budgets, reverse=True)
    assert budgets[-1] == 5 and budgets[0] >= 195  # 100 / beta at the top, about 2 x 100 - that at the bottom
    assert pyramid_budgets(100, 1) == [100]


def layer_qk(seed, heads=4, kv_heads=2, length=80, dim=8):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, heads, length, dim, generator=g), torch.randn(1, kv_heads, length, dim, generator=g)


def test_pyramidkv_is_snapkv_with_the_layer_budget():
    cfg = SnapKVConfig(budget=24, window=4, kernel=3, policy="pyramidkv")
    policy = make_policy(cfg, num_layers=5)
    budgets = [4 + b for b in pyramid_budgets(20, 5)]
    assert policy.kept_length(80) == max(budgets) and policy.kept_length(10) == 10
    for layer, budget in enumerate(budgets):
        q, k = layer_qk(layer)
        reference = make_policy(SnapKVConfig(budget=budget, window=4, kernel=3)).select(q, k)
        assert torch.equal(policy.select(q, k, layer), reference)


def test_adakv_policy_keeps_the_window_in_every_row():
    cfg = SnapKVConfig(budget=20, window=4, kernel=3, policy="adakv")
    policy = make_policy(cfg, num_layers=2)
    q, k = layer_qk(7, heads=8, kv_heads=4)
    keep = policy.select(q, k, 0)[0]
    mask = adakv_mask(snapkv_scores(q, k, cfg), per_head=16)[0]
    for h, row in enumerate(keep.tolist()):
        picks = [p for p in row if p >= 0]
        assert picks == sorted(torch.nonzero(mask[h]).flatten().tolist() + list(range(76, 80)))
        assert row[len(picks):] == [-1] * (len(row) - len(picks))  # padding only at the end
    assert int((keep >= 0).sum()) == 4 * 20
    assert policy.kept_length(500) == 4 + int(ADAKV_CAP * 16)


def test_tova_ranks_by_the_last_query_averaged_over_heads():
    q, k = layer_qk(3)
    keep = make_policy(SnapKVConfig(budget=10, policy="tova")).select(q, k)[0]
    d = k.shape[-1]
    weights = [0.0] * 80
    for h in range(4):  # plain loops: query head h reads kv head h // 2
        logits = [float(q[0, h, -1] @ k[0, h // 2, j]) / math.sqrt(d) for j in range(80)]
        top = max(logits)
        total = sum(math.exp(x - top) for x in logits)
        for j in range(80):
            weights[j] += math.exp(logits[j] - top) / total / 4
    best = sorted(sorted(range(79), key=lambda j: -weights[j])[:9] + [79])
    assert keep[0].tolist() == best and keep[1].tolist() == best  # one choice for every kv head


def test_keynorm_keeps_the_smallest_keys_and_sinks_stay():
    q, k = layer_qk(4)
    keep = make_policy(SnapKVConfig(budget=12, policy="keynorm")).select(q, k)[0]
    sunk = make_policy(SnapKVConfig(budget=12, policy="keynorm", sink_tokens=3)).select(q, k)[0]
    for h in range(2):
        norms = [float(k[0, h, j].norm()) for j in range(80)]
        assert keep[h].tolist() == sorted(sorted(range(80), key=lambda j: norms[j])[:12])
        rest = sorted(range(3, 80), key=lambda j: norms[j])[:9]
        assert sunk[h].tolist() == sorted([0, 1, 2] + rest)
    snap = make_policy(SnapKVConfig(budget=12, window=4, kernel=1, sink_tokens=2)).select(*layer_qk(5))
    assert (snap[..., :2] == torch.tensor([0, 1])).all()


@pytest.mark.parametrize("policy", ["snapkv", "adakv", "pyramidkv", "tova", "keynorm", "streaming"])
def test_sliding_window_keeps_nothing_decode_cannot_see(tmp_path, policy):
    """Mistral (window 40), 150-token prompt, budget 32: every kept entry lies inside what the first decode step
    sees (positions > 150 - 40), and the tokens equal a masked full-attention reference."""
    cfg = SnapKVConfig(budget=32, window=8, kernel=5, policy=policy)
    llm = tiny(tmp_path, "mistral", snapkv=cfg, sliding_window=40)
    prompt = torch.randint(3, 256, (150,), generator=torch.Generator().manual_seed(1)).tolist()
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(max_tokens=12, ignore_eos=True),
                       return_kept=True)[0]
    for kept in out.kept:
        real = kept[kept >= 0]
        assert real.min() > 150 - 40 and (kept >= 0).sum(-1).max() <= 39
    assert out.token_ids == reference_greedy(llm.model, prompt, out.kept, 12, 40)


@pytest.mark.parametrize("policy", ["adakv", "pyramidkv"])
def test_rows_of_different_lengths_decode_like_masked_full_attention(tmp_path, policy):
    """Per-head (AdaKV) and per-layer (PyramidKV) budgets: rows hold different numbers of entries, every decode
    step appends to each at its own length, and the tokens equal the masked full-attention reference; a batch
    with a uniform-budget request decodes each exactly as alone."""
    cfg = SnapKVConfig(budget=40, window=8, kernel=5, policy=policy)
    llm = tiny(tmp_path, "llama", snapkv=cfg, num_key_value_heads=2)
    prompts = [torch.randint(3, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (150, 120)]
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    out = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params, return_kept=True)[0]
    lengths = {int(n) for kept in out.kept for n in (kept >= 0).sum(-1)}
    assert len(lengths) > 1  # the rows really differ
    capture = Capture(150)
    with torch.no_grad():
        llm.model(torch.tensor(prompts[:1]), ctx=capture)
    policy_obj = llm.make_policy(cfg)
    for layer, kept in enumerate(out.kept):
        assert torch.equal(kept, policy_obj.select(capture.q[layer], capture.k[layer], layer)[0])
    assert out.token_ids == reference_greedy(llm.model, prompts[0], out.kept, 16)
    rid = llm.add_request(prompt_token_ids=prompts[1], sampling_params=params, snapkv=SnapKVConfig(budget=40, window=8))
    batch = llm.generate(prompt_token_ids=prompts[:1], sampling_params=params)[0]
    others = {}
    while llm.has_unfinished():
        others.update({o.request_id: o for o in llm.step() if o.finished})
    assert batch.token_ids == out.token_ids
    alone = tiny(tmp_path / "b", "llama", snapkv=SnapKVConfig(budget=40, window=8), num_key_value_heads=2)
    assert others[rid].token_ids == alone.generate(prompt_token_ids=prompts[1:], sampling_params=params)[0].token_ids
