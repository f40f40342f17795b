"""Shared test fixtures: tiny random HF models saved to disk, a GGUF writer for them, and the real SmolLM2 paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import fastattn  # noqa: F401
import formats  # noqa: F401  the wings, for a source tree that is not installed (the GPU machine's test run)
import parallel  # noqa: F401
import quant  # noqa: F401
import sessions  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
SMOL_DIR = ROOT / "weights" / "SmolLM2-135M-Instruct"
SMOL_GGUF = ROOT / "weights" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_dir() -> Path:
    if not (SMOL_DIR / "model.safetensors").is_file():
        pytest.fail(f"{SMOL_DIR} is missing: run `make weights` (make test does it)")
    return SMOL_DIR


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    if not SMOL_GGUF.is_file():
        pytest.fail(f"{SMOL_GGUF} is missing: run `make weights` (make test does it)")
    return SMOL_GGUF


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides):
    """A small random LlamaForCausalLM / MistralForCausalLM from transformers (eval mode, float32)."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    args = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=128, max_position_embeddings=512, rms_norm_eps=1e-6,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    args.update(overrides)
    torch.manual_seed(seed)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**args))
    else:
        model = LlamaForCausalLM(LlamaConfig(**args))
    # larger-than-default weights so that attention is far from uniform and mistakes show in the logits
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    return model.eval()


def save_tiny(model, directory: Path, **save_kwargs) -> Path:
    model.save_pretrained(directory, **save_kwargs)
    return directory


def tiny_model_dir(directory: Path, kind: str = "llama", **overrides) -> Path:
    """A tiny random model (vocab 256) saved with SmolLM2's tokenizer files, so that engine.LLM can load it; the
    tests feed token ids, and any tokenizer covering ids < 256 will do."""
    import shutil

    save_tiny(tiny_hf_model(kind, **{"vocab_size": 256, **overrides}), directory)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(SMOL_DIR / f, Path(directory) / f)
    return Path(directory)


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """A tiny random Llama with SmolLM2's whole vocabulary (49,152), so that text prompts and the chat template's
    tokens are real ones: for engine behaviour that does not depend on the real weights, at a fraction of their
    cost."""
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_chat"), vocab_size=49152, max_position_embeddings=2048)


def _permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's convert_hf_to_gguf permutation (the loader must undo it)
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _k_quant_bytes(rows: int, cols: int, qtype, rng) -> np.ndarray:
    """Random K-quant blocks with sane fp16 scales (gguf-py cannot quantize K-quants, only dequantize them)."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    if qtype == gguf.GGMLQuantizationType.Q6_K:
        raw[..., -2:] = scale  # d is the last field
    else:  # Q4_K/Q5_K/Q2_K/Q3_K: d, dmin first
        raw[..., 0:2] = scale
        raw[..., 2:4] = scale
    return raw.reshape(rows, -1)


def write_gguf(path: Path, hf_model, qtype_for=lambda name: "F32", sliding_window=None) -> Path:
    """Write a tiny HF Llama as a llama.cpp-style GGUF (permuted Q/K rows, GGUF names, chosen quant types)."""
    import gguf
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    cfg = hf_model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if hasattr(cfg, "rope_parameters")
                         and cfg.rope_parameters else float(cfg.rope_theta))
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    if sliding_window:
        w.add_sliding_window(sliding_window)
    tokens = ["<unk>", "<s>", "</s>"] + [chr(0x100 + i) for i in range(cfg.vocab_size - 3)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (cfg.vocab_size - 3))
    w.add_token_merges([])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)
    sd = hf_model.state_dict()
    for name, tensor in sd.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name in GGUF_NAMES:
            gname = GGUF_NAMES[name]
        else:
            _, _, idx, *rest = name.split(".")
            gname = f"blk.{idx}.{GGUF_LAYER['.'.join(rest[:-1])]}.weight"
        array = tensor.float().numpy().copy()
        if name.endswith("q_proj.weight"):
            array = _permute_rope_rows(array, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            array = _permute_rope_rows(array, cfg.num_key_value_heads)
        qtype = Q[qtype_for(name)] if array.ndim == 2 else Q.F32
        if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q2_K, Q.Q3_K):
            w.add_tensor(gname, _k_quant_bytes(*array.shape, qtype, rng), raw_dtype=qtype)
        elif qtype == Q.F32:
            w.add_tensor(gname, array)
        elif qtype == Q.F16:
            w.add_tensor(gname, array.astype(np.float16))
        else:
            w.add_tensor(gname, quantize(array, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
