"""snapkv-convert: turn a GGUF file into a standard HF model directory (config.json, float32 model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template) that both this engine and HF transformers load.

    snapkv-convert IN.gguf OUT_DIR          (or: python -m formats.convert IN.gguf OUT_DIR)

The safetensors hold exactly the dequantized GGUF values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from formats.gguf import gguf_config, gguf_tensors, read_gguf_metadata
from formats.tokenizers import gguf_tokenizer, save_hf_files
from models.config import ModelConfig


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"{gguf_path}: no such GGUF file")
    fields = read_gguf_metadata(gguf_path)
    cfg = gguf_config(fields, source=str(gguf_path))
    tokenizer = gguf_tokenizer(fields)
    tensors = {name: t for _, name, _, t in gguf_tensors(gguf_path, cfg)}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config(cfg), indent=2) + "\n")
    save_hf_files(tokenizer, out_dir)
    # Written last and via a temporary name: its presence marks a complete conversion (make uses it as target).
    tmp = out_dir / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": gguf_path.name})
    tmp.replace(out_dir / "model.safetensors")
    return out_dir


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """An HF config.json that transformers loads as the same network."""
    out = {
        "architectures": [cfg.architecture],
        "model_type": "mistral" if cfg.architecture == "MistralForCausalLM" else "llama",
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "intermediate_size": cfg.intermediate_size,
        "vocab_size": cfg.vocab_size,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_ids[0] if len(cfg.eos_token_ids) == 1 else cfg.eos_token_ids or None,
        "torch_dtype": "float32",
    }
    if cfg.architecture == "MistralForCausalLM":
        out["sliding_window"] = cfg.sliding_window
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: snapkv-convert IN.gguf OUT_DIR", file=sys.stderr)
        return 2
    try:
        out = convert_gguf(argv[0], argv[1])
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
