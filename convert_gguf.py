"""snapkv-convert: turn a GGUF file into a standard HF model directory (config.json, float32 model.safetensors,
tokenizer.json, tokenizer_config.json with the chat template) that both this engine and HF transformers load.

    snapkv-convert IN.gguf OUT_DIR          (or: python -m convert_gguf IN.gguf OUT_DIR)

The safetensors hold exactly the dequantized GGUF values. A command-line tool beside cli.py: it needs the network's
loader (models/) and the tokenizer (engine/), so it sits above both rather than making models/ import engine/.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import save_file

from engine.tokenizer import Tokenizer
from models.config import ModelConfig
from models.loader import gguf_tensors, read_gguf_metadata


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise ValueError(f"{gguf_path}: no such GGUF file")
    fields = read_gguf_metadata(gguf_path)
    cfg = ModelConfig.from_gguf_fields(fields, source=str(gguf_path))
    tokenizer = Tokenizer.from_gguf_fields(fields)
    tensors = {name: t for _, name, _, t in gguf_tensors(gguf_path, cfg)}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")
    tokenizer.save_hf_files(out_dir)
    # Written last and via a temporary name: its presence marks a complete conversion (make uses it as target).
    tmp = out_dir / "model.safetensors.partial"
    save_file(tensors, str(tmp), metadata={"format": "pt", "source": gguf_path.name})
    tmp.replace(out_dir / "model.safetensors")
    return out_dir


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
