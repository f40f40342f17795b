"""The real default model: SmolLM2-135M-Instruct from its Q4_1 GGUF. Our logits vs transformers loading the same
GGUF and vs transformers loading our converted directory (<= 1e-3), and the converter's output is exact."""

import json

import pytest
import torch
from safetensors import safe_open

from formats.loader import load_config, load_model
from tests.conftest import ROOT

PROMPT_TEXT = (ROOT / "examples" / "long_prompt.txt").read_text()


def prompts(tokenizer_encode):
    ids = tokenizer_encode(PROMPT_TEXT)
    return [ids[:520], ids[1000:1600], ids[-700:]]  # three different >= 500-token windows of real text


@pytest.fixture(scope="module")
def ours(smol_gguf):
    return load_model(smol_gguf)


@pytest.fixture(scope="module")
def token_windows(smol_dir):
    from engine.tokenizer import Tokenizer

    return prompts(Tokenizer.from_path(smol_dir).encode)


def max_diff(a, b, windows):
    worst = 0.0
    with torch.no_grad():
        for ids in windows:
            x = torch.tensor([ids])
            worst = max(worst, (a(x) - b(x).logits).abs().max().item())
    return worst


@pytest.fixture(scope="module")
def hf_from_gguf(smol_gguf):
    """transformers' own GGUF loader: an independent dequantization and un-permutation of the same file."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name,
                                                dtype=torch.float32).eval()


def test_logits_vs_transformers_gguf(ours, hf_from_gguf, token_windows):
    assert all(len(w) >= 500 for w in token_windows)
    assert max_diff(ours, hf_from_gguf, token_windows) <= 1e-3


def test_logits_vs_transformers_on_converted_directory(ours, smol_dir, token_windows):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32).eval()
    assert max_diff(ours, ref, token_windows) <= 1e-3
    from_dir = load_model(smol_dir)
    assert max_diff(from_dir, ref, token_windows[:1]) <= 1e-3


def test_converted_directory_is_exact(smol_dir, smol_gguf, hf_from_gguf):
    """The converter's safetensors hold exactly the tensors that transformers' GGUF loader makes of the file."""
    cfg = load_config(smol_gguf)
    assert load_config(smol_dir) == cfg
    meta = json.loads((smol_dir / "config.json").read_text())
    assert meta["architectures"] == ["LlamaForCausalLM"] and meta["tie_word_embeddings"] is True
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (30, 9, 3, 64, 49152)
    reference = hf_from_gguf.state_dict()
    with safe_open(smol_dir / "model.safetensors", framework="pt") as f:
        stored = set(f.keys())
        for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.q_proj.weight",
                     "model.layers.7.self_attn.k_proj.weight", "model.layers.29.mlp.down_proj.weight",
                     "model.norm.weight"):
            got = f.get_tensor(name)
            assert got.dtype == torch.float32 and torch.equal(got, reference[name]), name
    assert len(stored) == 2 + 30 * 9
    tok_cfg = json.loads((smol_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_cfg["chat_template"]
