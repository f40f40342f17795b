"""snapkv.select: selections equal a plain, separately written reference of the official algorithm (loops, Python
floats in double precision, no tensor cleverness), index for index; plus the policies and config validation."""

import math

import pytest
import torch

from snapkv import SnapKVConfig, make_policy


def reference_select(q, k, budget, window, kernel, pooling, group_agg):
    """FasterDecoding/SnapKV's snapkv_utils.update_kv, written out by hand (per kv head, sorted, ties -> earlier)."""
    batch, heads, length, dim = q.shape
    kv_heads = k.shape[1]
    group = heads // kv_heads
    if length <= budget:
        return None
    prefix = length - window
    q, k = q.double().tolist(), k.double().tolist()
    result = []
    for b in range(batch):
        per_kv_head = []
        for kvh in range(kv_heads):
            pooled_per_head = []
            for g in range(group):
                h = kvh * group + g
                votes = [0.0] * prefix
                for i in range(window):
                    qpos = prefix + i
                    logits = [sum(a * c for a, c in zip(q[b][h][qpos], k[b][kvh][j])) / math.sqrt(dim)
                              for j in range(qpos + 1)]  # causal: window query i sees keys up to its position
                    top = max(logits)
                    weights = [math.exp(x - top) for x in logits]
                    total = sum(weights)
                    for j in range(prefix):
                        votes[j] += weights[j] / total
                pooled = []
                for j in range(prefix):
                    neighbours = [votes[x] for x in range(j - kernel // 2, j + kernel // 2 + 1) if 0 <= x < prefix]
                    # avg_pool1d pads with zeros and divides by the kernel size (count_include_pad), as official
                    pooled.append(max(neighbours) if pooling == "max" else sum(neighbours) / kernel)
                pooled_per_head.append(pooled)
            scores = [(max(col) if group_agg == "max" else sum(col) / group) for col in zip(*pooled_per_head)]
            best = sorted(range(prefix), key=lambda j: (-scores[j], j))[: budget - window]
            per_kv_head.append(sorted(best) + list(range(prefix, length)))
        result.append(per_kv_head)
    return torch.tensor(result)


SHAPES = [  # batch, heads, kv_heads, length, head_dim  (GQA groups 1, 3, 4)
    (1, 4, 4, 40, 8),
    (2, 6, 2, 56, 16),
    (1, 8, 2, 48, 8),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("pooling", ["avg", "max"])
@pytest.mark.parametrize("kernel", [1, 5, 7])
def test_selection_equals_reference(shape, pooling, kernel):
    batch, heads, kv_heads, length, dim = shape
    gen = torch.Generator().manual_seed(hash((shape, pooling, kernel)) % 2**31)
    q = torch.randn(batch, heads, length, dim, generator=gen) * 1.5
    k = torch.randn(batch, kv_heads, length, dim, generator=gen)
    for budget, window, agg in [(length - 1, 4, "mean"), (length - 6, 8, "max"), (12, 8, "mean"),
                                (length // 2, 16, "max")]:
        cfg = SnapKVConfig(budget=budget, window=window, kernel=kernel, pooling=pooling, group_agg=agg)
        got = make_policy(cfg).select(q, k)
        expected = reference_select(q, k, budget, window, kernel, pooling, agg)
        assert got.shape == (batch, kv_heads, budget)
        assert torch.equal(got, expected), (budget, window, agg)


def test_short_prompts_are_not_compressed():
    q, k = torch.randn(1, 4, 20, 8), torch.randn(1, 2, 20, 8)
    assert make_policy(SnapKVConfig(budget=20, window=4)).select(q, k) is None
    assert make_policy(SnapKVConfig(budget=64, window=4)).select(q, k) is None
    assert make_policy(SnapKVConfig(budget=19, window=4)).select(q, k).shape == (1, 2, 19)


def test_the_planted_key_is_kept():
    """A key the window queries all point at (and its neighbours, through pooling) survives; others are dropped."""
    torch.manual_seed(0)
    length, dim = 200, 16
    k = torch.randn(1, 1, length, dim) * 0.1
    q = torch.randn(1, 2, length, dim) * 0.1
    k[0, 0, 77] = 4 * torch.ones(dim)
    q[0, :, -8:] = torch.ones(dim)
    kept = make_policy(SnapKVConfig(budget=8 + 3, window=8, kernel=3, pooling="max")).select(q, k)[0, 0].tolist()
    assert kept == [76, 77, 78] + list(range(192, 200))


def test_streaming_and_full_policies():
    q, k = torch.randn(2, 4, 50, 8), torch.randn(2, 2, 50, 8)
    streaming = make_policy(SnapKVConfig(budget=12, window=4, policy="streaming"))
    idx = streaming.select(q, k)
    assert idx.shape == (2, 2, 12) and idx[1, 1].tolist() == [0, 1, 2, 3] + list(range(42, 50))
    assert streaming.kept_length(50) == 12 and streaming.kept_length(7) == 7
    full = make_policy(None)
    assert full.select(q, k) is None and full.kept_length(50) == 50
    assert make_policy(SnapKVConfig(policy="full")).select(q, k) is None


@pytest.mark.parametrize("kwargs,message", [
    ({"budget": 32, "window": 32}, "must be larger than window"),
    ({"window": 0}, "window must be at least 1"),
    ({"kernel": 4}, "odd number"),
    ({"kernel": 0}, "odd number"),
    ({"pooling": "mean"}, "unknown pooling"),
    ({"group_agg": "sum"}, "unknown group_agg"),
    ({"policy": "h2o"}, "unknown policy"),
    ({"budget": 10.5}, "integers"),
])
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SnapKVConfig(**kwargs)
