"""models.llama: full-sequence logits of tiny random Llama/Mistral models equal HF transformers' (<= 1e-4)."""

import pytest
import torch

from formats.loader import load_model
from tests.conftest import save_tiny, tiny_hf_model

CASES = {
    "llama-gqa": ("llama", {}),
    "llama-mha": ("llama", {"num_key_value_heads": 4}),
    "llama-mqa-tied": ("llama", {"num_key_value_heads": 1, "tie_word_embeddings": True}),
    "llama-untied-theta": ("llama", {"tie_word_embeddings": False, "rope_theta": 500000.0}),
    "llama3-rope": ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    "linear-rope": ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 4.0}}),
    "mistral-sliding": ("mistral", {"sliding_window": 16}),
    "head-dim-32": ("llama", {"head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    hf = tiny_hf_model(kind, **overrides)
    ours = load_model(save_tiny(hf, tmp_path))
    torch.manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (2, 80))  # 80 > sliding window 16, > llama3 original 32
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4


def test_sliding_window_changes_the_result(tmp_path):
    """Guard against a parity test that would pass with the window ignored: the window must matter here."""
    hf = tiny_hf_model("mistral", sliding_window=16)
    ours = load_model(save_tiny(hf, tmp_path))
    ids = torch.randint(0, 128, (1, 80))
    with torch.no_grad():
        windowed = ours(ids)
        ours.model.layers[0].self_attn.sliding_window = None
        ours.model.layers[1].self_attn.sliding_window = None
        unwindowed = ours(ids)
    assert (windowed[:, 16:] - unwindowed[:, 16:]).abs().max() > 1e-3
    assert (windowed[:, :16] - unwindowed[:, :16]).abs().max() <= 1e-5


def test_last_only_and_positions(tmp_path):
    hf = tiny_hf_model("llama")
    ours = load_model(save_tiny(hf, tmp_path))
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        full = ours(ids)
        last = ours(ids, last_only=True)
        gapped = torch.cat([torch.arange(15), torch.arange(100, 115)])[None]  # a jump, as after compression
        shifted = ours(ids, positions=gapped)
        hf_shifted = hf(ids, position_ids=gapped).logits
    assert (last[:, 0] - full[:, -1]).abs().max() <= 1e-5  # matmul blocking may differ by rounding
    assert (shifted - hf_shifted).abs().max() <= 1e-4
    assert (shifted[:, 15:] - full[:, 15:]).abs().max() > 1e-3  # relative positions really enter via RoPE


def test_kv_heads_are_not_repeated(tmp_path):
    """The attention hands the cache view k/v with kv_heads, never repeated to the query-head count."""
    hf = tiny_hf_model("llama", num_key_value_heads=1)
    ours = load_model(save_tiny(hf, tmp_path))
    seen = []

    class Spy:
        tail_queries = 3

        def past(self, layer):
            return None

        def store(self, layer, q, k, v):
            seen.append((q.shape[1], k.shape[1], v.shape[1], q.shape[2], k.shape[2]))

    with torch.no_grad():
        ours(torch.randint(0, 128, (1, 12)), ctx=Spy())
    assert seen == [(4, 1, 1, 3, 12)] * 2  # and the last 3 queries with all 12 keys
