"""ModelConfig from HF config.json (formats.hf) and GGUF metadata (formats.gguf), and their errors."""

import json

import pytest

from formats.convert import hf_config
from formats.gguf import gguf_config
from formats.hf import hf_model_config
from formats.loader import load_config


def base(**kw):
    cfg = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100}
    cfg.update(kw)
    return cfg


def test_llama_defaults_and_fields():
    cfg = hf_model_config(base(rope_theta=5e5, eos_token_id=[7, 8], bos_token_id=1, tie_word_embeddings=True))
    assert (cfg.head_dim, cfg.num_kv_heads, cfg.rope_theta, cfg.eos_token_ids) == (16, 2, 5e5, [7, 8])
    assert cfg.tie_word_embeddings and cfg.sliding_window is None and cfg.rope_scaling is None
    # 2 layers x 2 kv heads x (K + V) x head_dim 16 x 4 bytes (float32); bf16 halves it
    assert cfg.kv_bytes_per_token(4) == 2 * 2 * 2 * 16 * 4 and cfg.kv_bytes_per_token(2) == 2 * 2 * 2 * 16 * 2
    windowed = hf_model_config(base(architectures=["MistralForCausalLM"], sliding_window=64))
    assert windowed.kv_bytes_per_token(2) == 2 * 2 * (2 * 16 * 2 + 4)  # + each entry's int32 position


def test_transformers5_rope_parameters_and_llama3():
    rope = {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
            "original_max_position_embeddings": 8192}
    cfg = hf_model_config(base(rope_parameters=rope))
    assert cfg.rope_theta == 1e4
    assert cfg.rope_scaling == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def test_mistral_sliding_window():
    cfg = hf_model_config(base(architectures=["MistralForCausalLM"], sliding_window=4096))
    assert cfg.sliding_window == 4096 and cfg.architecture == "MistralForCausalLM"
    assert hf_model_config(base(sliding_window=4096)).sliding_window is None  # Llama ignores the key


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM, MistralForCausalLM"):
        hf_model_config(base(architectures=["GPT2LMHeadModel"]))


def test_unsupported_rope_scaling():
    with pytest.raises(ValueError, match="'yarn' is not supported"):
        hf_model_config(base(rope_scaling={"rope_type": "yarn", "factor": 4}))


def test_gguf_metadata():
    fields = {"general.architecture": "llama", "llama.block_count": 30, "llama.embedding_length": 576,
              "llama.attention.head_count": 9, "llama.attention.head_count_kv": 3, "llama.feed_forward_length": 1536,
              "llama.rope.freq_base": 1e5, "llama.context_length": 8192, "llama.vocab_size": 49152,
              "llama.attention.layer_norm_rms_epsilon": 1e-5, "tokenizer.ggml.bos_token_id": 1,
              "tokenizer.ggml.eos_token_id": 2, "_tensor_names": ["token_embd.weight"]}
    cfg = gguf_config(fields)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.eos_token_ids == [2] and cfg.rope_theta == 1e5
    with pytest.raises(ValueError, match="GGUF architecture 'qwen2' is not supported"):
        gguf_config({**fields, "general.architecture": "qwen2"})


def test_round_trip_through_hf_dict():
    cfg = hf_model_config(base(architectures=["MistralForCausalLM"], sliding_window=32,
                                     rope_scaling={"type": "linear", "factor": 2.0}))
    assert hf_model_config(hf_config(cfg)) == cfg


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read the model config"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(base(architectures=["BertModel"])))
    with pytest.raises(ValueError, match="not supported"):
        load_config(tmp_path)
