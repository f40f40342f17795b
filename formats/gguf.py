"""GGUF files (llama.cpp's format): the metadata as a ModelConfig, the tensors in HF layout, and Q8_0/Q4_0/Q4_1
blocks read straight into int8/int4 weights with no float detour.

Tensors are dequantized with the `gguf` package, and Q/K rows are un-permuted from llama.cpp's RoPE layout back to
HF's. A block covers 32 consecutive weights of a row and starts with float16 d (Q4_1: then float16 m):
    Q8_0  d, 32 x int8 q                    w = d * q          (int8, group 32)
    Q4_0  d, 16 bytes of nibbles            w = d * (q - 8)    (int4, zero 0)
    Q4_1  d, m, 16 bytes of nibbles         w = d * q + m      (int4, zero m + 8d)
with weight j in the low nibble of byte j and weight j + 16 in the high nibble.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from models.config import ModelConfig
from quant.store import DIRECT_TYPES, EMBEDDING, HEAD, LINEAR
from quant.weights import Int4Weight, Int8Weight, take_part

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


def gguf_tensors(path: Path, cfg: ModelConfig, direct: tuple[str, ...] = (),
                 part=lambda name: None) -> Iterator[tuple[str, str, tuple, object]]:
    """Yield (file, HF name, shape, tensor) for each GGUF tensor in HF layout: float32, dequantized (tagged with
    its GGUF type as `gguf_kind`), or, for the block types in `direct`, the int8/int4 weight the blocks are.
    part(name) -> (dim, start, stop) or None: yield only those rows or columns (the tensor is read whole)."""
    for source, name, tensor in _gguf_whole_tensors(path, cfg, direct):
        shape = tuple(tensor.q.shape if isinstance(tensor, (Int8Weight, Int4Weight)) else tensor.shape)
        cut = part(name)
        if cut is not None:
            kind = getattr(tensor, "gguf_kind", None)
            tensor = take_part(tensor, *cut)
            if kind is not None:
                tensor.gguf_kind = kind
        yield source, name, shape, tensor


def _gguf_whole_tensors(path: Path, cfg: ModelConfig, direct: tuple[str, ...]) -> Iterator[tuple[str, str, object]]:
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
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dims fastest-first
        heads = (cfg.num_heads if name.endswith("self_attn.q_proj.weight") else
                 cfg.num_kv_heads if name.endswith("self_attn.k_proj.weight") else None)
        if kind in direct and len(shape) == 2 and (LINEAR.fullmatch(name) or name in (EMBEDDING, HEAD)):
            weight = read_blocks(kind, t.data, shape[0])
            if heads:
                weight = permute_rows(weight, lambda w: _unpermute_rope_rows(w, heads))
            yield str(path), name, weight
            continue
        try:
            array = dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ValueError(f"{path}: cannot dequantize tensor {t.name} ({kind}): {e}") from None
        array = np.array(array, dtype=np.float32).reshape(shape)  # a writable copy: torch refuses read-only memory
        if heads:
            array = _unpermute_rope_rows(array, heads)
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        tensor.gguf_kind = kind
        yield str(path), name, tensor


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GGUF_GLOBAL_NAMES:
        return _GGUF_GLOBAL_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.weight", gguf_name)
    if m and m.group(2) in _GGUF_LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_GGUF_LAYER_NAMES[m.group(2)]}.weight"
    return None


def gguf_config(fields: dict[str, Any], source: str = "GGUF") -> ModelConfig:
    """The model's shape from GGUF metadata (key -> python value, as read_gguf_metadata reads it)."""
    arch = fields.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{source}: GGUF architecture {arch!r} is not supported; supported: llama "
                         "(LlamaForCausalLM, MistralForCausalLM)")

    def get(key, default=None):
        return fields.get(f"llama.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    if heads is None or hidden is None or get("block_count") is None:
        raise ValueError(f"{source}: GGUF metadata lacks llama.attention.head_count/embedding_length/block_count")
    vocab = get("vocab_size") or len(fields.get("tokenizer.ggml.tokens", []))
    scaling = None
    if fields.get("llama.rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": float(get("rope.scaling.factor"))}
    eos = fields.get("tokenizer.ggml.eos_token_id")
    window = get("attention.sliding_window")
    return ModelConfig(
        hidden_size=hidden,
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv") or heads,
        head_dim=get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
        intermediate_size=get("feed_forward_length"),
        vocab_size=vocab,
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        sliding_window=window,
        max_position_embeddings=get("context_length", 4096),
        tie_word_embeddings="output.weight" not in fields.get("_tensor_names", ()),
        bos_token_id=fields.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[] if eos is None else [eos],
        architecture="MistralForCausalLM" if window else "LlamaForCausalLM",
    )


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    return np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, -1, block_bytes)


def _f16(blocks: np.ndarray, at: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32))


def _nibbles(blocks: np.ndarray, at: int) -> torch.Tensor:
    packed = blocks[..., at:at + 16]
    q = np.concatenate([packed & 0x0F, packed >> 4], axis=-1)  # weights 0..15 low nibbles, 16..31 high
    return torch.from_numpy(np.ascontiguousarray(q).reshape(q.shape[0], -1))


def read_blocks(kind: str, raw: np.ndarray, rows: int) -> Int8Weight | Int4Weight:
    """The raw bytes of one GGUF tensor of `kind` with `rows` output channels as an int8/int4 weight."""
    if kind == "Q8_0":
        b = _blocks(raw, rows, 34)
        q = torch.from_numpy(np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, -1))
        return Int8Weight(q, _f16(b, 0))
    if kind == "Q4_0":
        b = _blocks(raw, rows, 18)
        d = _f16(b, 0)
        return Int4Weight(_nibbles(b, 2), d, torch.zeros_like(d))
    if kind == "Q4_1":
        b = _blocks(raw, rows, 20)
        d, m = _f16(b, 0), _f16(b, 2)
        return Int4Weight(_nibbles(b, 4), d, m + 8 * d)  # d * q + m = d * (q - 8) + (m + 8 d)
    raise ValueError(f"GGUF {kind} blocks do not map to int8/int4 directly (only {', '.join(DIRECT_TYPES)} do)")


def permute_rows(weight: Int8Weight | Int4Weight, permute) -> Int8Weight | Int4Weight:
    """Apply a row permutation (a function of a numpy [rows, ...] array) to every per-row tensor of a weight."""
    fields = {name: torch.from_numpy(np.ascontiguousarray(permute(t.numpy()))) for name, t in vars(weight).items()}
    return type(weight)(**fields)
