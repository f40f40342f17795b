"""Weight loading: HF safetensors directories (single or sharded) and GGUF files, into a LlamaForCausalLM.

Tensors are read one at a time from memory-mapped files and cast straight to the target dtype/device into a
model built on the meta device, so peak RAM stays near one copy of the weights. GGUF tensors are dequantized with
the `gguf` package and Q/K rows are un-permuted from llama.cpp's RoPE layout back to HF's. Every failure names the
file and the tensor. Nothing here unpickles: safetensors and GGUF only.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open

from models.config import ModelConfig
from models.llama import LlamaForCausalLM, RotaryEmbedding

GGUF_DEQUANTIZABLE = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
                      "Q5_K", "Q6_K")
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                      "output.weight": "lm_head.weight"}


def is_gguf(path: str | Path) -> bool:
    return str(path).lower().endswith(".gguf")


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if is_gguf(path):
        return ModelConfig.from_gguf_fields(read_gguf_metadata(path), source=str(path))
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a model directory (no config.json); pass an HF-style directory or a .gguf file")
    return ModelConfig.from_json(path / "config.json")


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               config: ModelConfig | None = None) -> LlamaForCausalLM:
    """Build the network for `path` (HF directory or .gguf) and fill it with its weights."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such model file or directory")
    cfg = config or load_config(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    expected = {name: p.shape for name, p in model.named_parameters(remove_duplicate=False)}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    tensors = gguf_tensors(path, cfg) if is_gguf(path) else safetensors_tensors(path)
    loaded: dict[str, torch.Tensor] = {}
    for source, name, tensor in tensors:
        if name not in expected:
            continue  # e.g. rotary inv_freq buffers or a tied lm_head that some exporters still write
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the config needs {tuple(expected[name])}")
        loaded[name] = tensor.to(device=device, dtype=dtype)
    missing = sorted(set(expected) - set(loaded))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(loaded, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.rotary = RotaryEmbedding(cfg).to(device)  # buffers were built on meta
    if torch.device(device).type == "cpu":
        # float32 safetensors stay memory-mapped; touch every page now so the first request neither pays the
        # page-in nor counts the weights in its measured peak memory
        for p in model.parameters():
            p.data.sum()
    return model.eval().requires_grad_(False)


# --- safetensors ---------------------------------------------------------------------------------------------

def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for f in files:
            if not f.is_file():
                raise ValueError(f"{index}: lists shard {f.name}, which is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{directory}: no *.safetensors weights found (pickled .bin checkpoints are not loaded; "
                         "convert them to safetensors)")
    return files


def safetensors_tensors(directory: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (file, name, tensor) for every tensor in the directory, memory-mapped, one at a time."""
    for f in safetensors_files(directory):
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    yield str(f), name, handle.get_tensor(name)
        except Exception as e:  # SafetensorError derives from Exception only
            raise ValueError(f"{f}: cannot read safetensors file, truncated or corrupt? ({e})") from None


# --- GGUF ----------------------------------------------------------------------------------------------------

def _open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader raises ValueError/IndexError/KeyError on truncated or foreign files
        raise ValueError(f"{path}: not a readable GGUF file, truncated or corrupt? ({type(e).__name__}: {e})") \
            from None


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """GGUF key/value metadata as Python values, plus `_tensor_names` (the tensors the file holds)."""
    reader = _open_gguf(Path(path))
    fields = {}
    for key, field in reader.fields.items():
        try:
            fields[key] = field.contents()
        except Exception:  # a field type this gguf version cannot decode: not one we need
            continue
    fields["_tensor_names"] = [t.name for t in reader.tensors]
    return fields


def _unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    # llama.cpp's converter interleaves each head's two RoPE halves; this is the inverse of its `permute`.
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(path: Path, cfg: ModelConfig) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield (file, HF name, float32 tensor) for each GGUF tensor, dequantized, in HF layout."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    reader = _open_gguf(path)
    for t in reader.tensors:
        name = _hf_name(t.name)
        if t.name == "rope_freqs.weight":
            raise ValueError(f"{path}: tensor rope_freqs.weight (GGUF llama3 rope scaling) is not supported; "
                             "convert the model from its HF checkpoint instead")
        if name is None:
            continue
        kind = GGMLQuantizationType(t.tensor_type).name
        if kind not in GGUF_DEQUANTIZABLE:
            raise ValueError(f"{path}: tensor {t.name} uses quantization {kind}, which is not supported "
                             f"(supported: {', '.join(GGUF_DEQUANTIZABLE)})")
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({kind}): {e}") from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first
        array = np.array(array, dtype=np.float32).reshape(shape)  # a writable copy: torch refuses read-only memory
        if name.endswith("self_attn.q_proj.weight"):
            array = _unpermute_rope_rows(array, cfg.num_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = _unpermute_rope_rows(array, cfg.num_kv_heads)
        yield str(path), name, torch.from_numpy(np.ascontiguousarray(array))


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"
    return None
