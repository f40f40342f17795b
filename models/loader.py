"""Weight loading: HF safetensors directories (single or sharded) and GGUF files, into a LlamaForCausalLM.

Tensors are read one at a time from memory-mapped files and cast straight to the target dtype/device into a
model built on the meta device, so peak RAM stays near one copy of the weights. GGUF tensors are dequantized with
the `gguf` package and Q/K rows are un-permuted from llama.cpp's RoPE layout back to HF's. Every failure names the
file and the tensor. Nothing here unpickles: safetensors and GGUF only.
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from safetensors import safe_open

from models.config import ModelConfig
from models.gguf_blocks import DIRECT_TYPES, permute_rows, read_blocks
from models.llama import LlamaForCausalLM, RotaryEmbedding
from models.parallel import SINGLE, TensorParallel, shard_config, take_part
from models.quantized import (CastEmbedding, CastLinear, Int4Weight, Int8Embedding, Int8Weight, quantize_int4,
                              quantize_int8, quantized_linear)

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


WEIGHTS_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
GGUF_BITS = {"Q2_K": 2.6, "Q3_K": 3.4, "Q4_K": 4.5, "Q4_0": 4.5, "Q4_1": 5, "Q5_0": 5.5, "Q5_1": 6, "Q5_K": 5.5,
             "Q6_K": 6.6, "Q8_0": 8.5}


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               config: ModelConfig | None = None, weights_dtype: str | None = None,
               tp: TensorParallel = SINGLE) -> LlamaForCausalLM:
    """Build the network for `path` (HF directory or .gguf) and fill it with its weights.
    weights_dtype: how the projections, the embedding and lm_head are stored (models.quantized); None: in
    `dtype`, every GGUF tensor dequantized. "auto": a GGUF keeps its own quantization (Q8_0/Q4_0/Q4_1 map
    directly; other quantized types are quantized again at load, to int4 up to ~4.5 bits a weight, else int8),
    anything else is stored in `dtype`. "int8": every projection, the embedding and lm_head per output channel
    (a GGUF's Q8_0 as is). "int4": the layers' projections group-wise (a GGUF's Q4_0/Q4_1 as is); the embedding
    and lm_head int8 on CPU (in `dtype` on CUDA), since the logits are what int4 would hurt most. A float dtype
    other than `dtype` stores those weights in it and casts activations to it around each matmul.
    tp: this rank's place in a tensor-parallel group (models.parallel): the model gets this rank's shape and each
    split weight only this rank's rows or columns, read alone from a safetensors file (`get_slice`); a GGUF
    tensor is read whole and cut (each rank reads the file)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such model file or directory")
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"unsupported weights dtype {weights_dtype!r}; use one of {', '.join(WEIGHTS_DTYPES)}")
    if weights_dtype == "auto" and not is_gguf(path):
        weights_dtype = None
    if weights_dtype in ("float32", "bfloat16", "float16") and getattr(torch, weights_dtype) == dtype:
        weights_dtype = None
    cfg = config or load_config(path)
    with torch.device("meta"):
        model = LlamaForCausalLM(shard_config(cfg, tp.size), tp)
    expected = {}  # name -> the whole tensor's shape (this rank holds a part of the split ones)
    for name, p in model.named_parameters(remove_duplicate=False):
        dim = tp.split_dim(name, cfg.vocab_size)
        expected[name] = tuple(n * tp.size if d == dim else n for d, n in enumerate(p.shape))
    if cfg.tie_word_embeddings:
        expected.pop(HEAD)

    def part(name: str) -> tuple[int, int, int] | None:
        dim = tp.split_dim(name, cfg.vocab_size) if name in expected else None
        return None if dim is None else (dim, *tp.part(expected[name][dim]))

    direct = _direct_kinds(weights_dtype)
    on_cpu = torch.device(device).type == "cpu"
    tensors = gguf_tensors(path, cfg, direct, part) if is_gguf(path) else safetensors_tensors(path, part)
    loaded: dict[str, torch.Tensor] = {}
    stored: dict[str, object] = {}  # name -> Int8Weight / Int4Weight / float tensor in the weights dtype
    for source, name, shape, tensor in tensors:
        if name not in expected:
            continue  # e.g. rotary inv_freq buffers or a tied lm_head that some exporters still write
        if tuple(shape) != expected[name]:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(shape)}, "
                             f"the config needs {expected[name]}")
        target = _target(name, weights_dtype, tensor, on_cpu)
        if target is None:
            loaded[name] = _as_float(tensor).to(device=device, dtype=dtype)
        else:
            stored[name] = _convert(tensor, target)
    missing = sorted(set(expected) - set(loaded) - set(stored))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(loaded, strict=False, assign=True)
    rows = tp.part(cfg.vocab_size) if model.vocab_parallel else (0, cfg.vocab_size)  # a tied lm_head's
    if cfg.tie_word_embeddings and EMBEDDING in stored:
        stored[HEAD] = take_part(stored[EMBEDDING], 0, *rows) if model.vocab_parallel else stored[EMBEDDING]
    for name, weight in stored.items():
        _install(model, name, weight, dtype, device)
    if cfg.tie_word_embeddings and EMBEDDING not in stored:
        embedding = model.model.embed_tokens.weight
        model.lm_head.weight = (torch.nn.Parameter(embedding[rows[0]:rows[1]], requires_grad=False)
                                if model.vocab_parallel else embedding)
    model.rotary = RotaryEmbedding(cfg).to(device)  # buffers were built on meta
    if torch.device(device).type == "cpu":
        # float32 safetensors stay memory-mapped; touch every page now so the first request neither pays the
        # page-in nor counts the weights in its measured peak memory
        for p in model.parameters():
            p.data.sum()
    return model.eval().requires_grad_(False)


def quantize_model(model: LlamaForCausalLM, weights_dtype: str) -> LlamaForCausalLM:
    """Store a loaded float model's weights as `weights_dtype` (load_model's rules; for weights that exist in
    memory already, e.g. a benchmark's random ones), module by module, in place."""
    if weights_dtype not in WEIGHTS_DTYPES or weights_dtype == "auto":
        raise ValueError(f"cannot quantize to {weights_dtype!r}; use one of {', '.join(WEIGHTS_DTYPES[1:])}")
    dtype, device = model.model.norm.weight.dtype, model.model.norm.weight.device
    tied = model.config.tie_word_embeddings
    stored = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        target = _target(name, weights_dtype, param, device.type == "cpu")
        if target is not None and not (tied and name == HEAD):
            stored[name] = _convert(param.data, target)
    if tied and EMBEDDING in stored:
        stored[HEAD] = stored[EMBEDDING]
    for name, weight in stored.items():
        _install(model, name, weight, dtype, device)
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight the model holds (quantized ones with their scales), each shared tensor once."""
    seen, total = set(), 0
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if t.data_ptr() not in seen and not name.startswith("rotary."):
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


def _direct_kinds(weights_dtype: str | None) -> tuple[str, ...]:
    """The GGUF block types the loader takes as int8/int4 weights instead of dequantizing them."""
    return {"auto": DIRECT_TYPES, "int8": ("Q8_0",), "int4": DIRECT_TYPES}.get(weights_dtype, ())


def _target(name: str, weights_dtype: str | None, tensor, on_cpu: bool = True) -> str | None:
    """How to store this tensor: "int8", "int4", a float dtype name, or None (the model's dtype). Under int4 (and
    a GGUF's non-Q8_0 embedding/lm_head) the embedding and lm_head are int8 on CPU, where the int8 kernel is as
    fast as int4's, and stay in the model's dtype on CUDA, where torch has no fast int8 kernel."""
    if weights_dtype is None or not (LINEAR.fullmatch(name) or name in (EMBEDDING, HEAD)):
        return None
    big = name in (EMBEDDING, HEAD)
    if big and not on_cpu and weights_dtype in ("int4", "auto") and not isinstance(tensor, Int8Weight):
        return None  # int8 would be the slow dequantizing path on CUDA (a GGUF's Q8_0 runs as int4 planes)
    if weights_dtype == "auto":  # a GGUF: keep what the file has
        if isinstance(tensor, Int4Weight):
            return "int8" if big else "int4"
        if isinstance(tensor, Int8Weight):
            return "int8"
        kind = getattr(tensor, "gguf_kind", "F32")
        if kind not in GGUF_BITS:
            return None  # F32/F16/BF16: stored in the model's dtype
        return "int4" if GGUF_BITS[kind] <= 4.5 and not big else "int8"
    if weights_dtype == "int4":
        return "int8" if big else "int4"
    return weights_dtype


def _as_float(tensor) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, (Int8Weight, Int4Weight)) else tensor


def _convert(tensor, target: str):
    if target == "int4":
        return tensor if isinstance(tensor, Int4Weight) else quantize_int4(_as_float(tensor))
    if target == "int8":
        return tensor if isinstance(tensor, Int8Weight) else quantize_int8(_as_float(tensor))
    return _as_float(tensor).to(getattr(torch, target))


def _install(model: torch.nn.Module, name: str, weight, dtype: torch.dtype, device) -> None:
    """Replace the module that owns `name` (a Linear or the Embedding) by its stored form."""
    owner, _, _ = name.rpartition(".")
    parent_name, _, child = owner.rpartition(".")
    parent = model.get_submodule(parent_name)
    if name == EMBEDDING:
        module = (Int8Embedding(weight, dtype, device) if isinstance(weight, Int8Weight)
                  else CastEmbedding(weight.to(device), dtype))
    elif isinstance(weight, (Int8Weight, Int4Weight)):
        module = quantized_linear(weight, device)
    else:
        module = CastLinear(weight.to(device))
    setattr(parent, child, module)


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


def safetensors_tensors(directory: Path, part=lambda name: None) -> Iterator[tuple[str, str, tuple, torch.Tensor]]:
    """Yield (file, name, shape, tensor) for every tensor in the directory, memory-mapped, one at a time.
    part(name) -> (dim, start, stop) or None: read only those rows (dim 0) or columns (dim 1) of the tensor."""
    for f in safetensors_files(directory):
        try:
            with safe_open(f, framework="pt") as handle:
                for name in handle.keys():
                    cut, whole = part(name), handle.get_slice(name)
                    shape = tuple(whole.get_shape())
                    if cut is None:
                        yield str(f), name, shape, handle.get_tensor(name)
                    else:
                        dim, start, stop = cut
                        yield str(f), name, shape, whole[start:stop] if dim == 0 else whole[:, start:stop]
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
