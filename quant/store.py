"""How a checkpoint's weights are stored in the model (`--weights-dtype`), module by module: the projections, the
embedding and the lm_head as int8, int4 or another float dtype, everything else in the engine's dtype.

    auto      a GGUF keeps its own quantization: Q4_0/Q4_1 as int4 and Q8_0 as int8, read from their blocks; other
              quantized types quantized again (int4 up to ~4.5 bits a weight, else int8); float files in --dtype
    int8      every projection, the embedding and lm_head per output channel (a GGUF's Q8_0 as it is)
    int4      the layers' projections group-wise (a GGUF's Q4_0/Q4_1 as they are); the embedding and lm_head int8
              on CPU, where its kernel is as fast as int4's, and in --dtype on CUDA, where torch has no fast int8
    bfloat16 / float16 / float32   plain weights of that dtype, activations cast around each matmul
"""

from __future__ import annotations

import re

import torch

from quant.layers import CastEmbedding, CastLinear, Int8Embedding, quantized_linear
from quant.weights import Int4Weight, Int8Weight, quantize_int4, quantize_int8

WEIGHTS_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "int4")
LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj\.weight")
EMBEDDING, HEAD = "model.embed_tokens.weight", "lm_head.weight"
GGUF_BITS = {"Q2_K": 2.6, "Q3_K": 3.4, "Q4_K": 4.5, "Q4_0": 4.5, "Q4_1": 5, "Q5_0": 5.5, "Q5_1": 6, "Q5_K": 5.5,
             "Q6_K": 6.6, "Q8_0": 8.5}
DIRECT_TYPES = ("Q8_0", "Q4_0", "Q4_1")  # GGUF blocks that are int8/int4 weights as they are


def check_weights_dtype(weights_dtype: str | None) -> None:
    if weights_dtype is not None and weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"unsupported weights dtype {weights_dtype!r}; use one of {', '.join(WEIGHTS_DTYPES)}")


def direct_kinds(weights_dtype: str | None) -> tuple[str, ...]:
    """The GGUF block types a loader takes as int8/int4 weights instead of dequantizing them."""
    return {"auto": DIRECT_TYPES, "int8": ("Q8_0",), "int4": DIRECT_TYPES}.get(weights_dtype, ())


def target(name: str, weights_dtype: str | None, tensor, on_cpu: bool = True) -> str | None:
    """How to store this tensor: "int8", "int4", a float dtype name, or None (the model's dtype)."""
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


def as_float(tensor) -> torch.Tensor:
    return tensor.dequantize() if isinstance(tensor, (Int8Weight, Int4Weight)) else tensor


def convert(tensor, form: str):
    """The tensor in the stored form `target` chose."""
    if form == "int4":
        return tensor if isinstance(tensor, Int4Weight) else quantize_int4(as_float(tensor))
    if form == "int8":
        return tensor if isinstance(tensor, Int8Weight) else quantize_int8(as_float(tensor))
    return as_float(tensor).to(getattr(torch, form))


def install(model: torch.nn.Module, name: str, weight, dtype: torch.dtype, device) -> None:
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


def quantize_model(model: torch.nn.Module, weights_dtype: str) -> torch.nn.Module:
    """Store a float model already in memory (a benchmark's random weights, say) as `weights_dtype`, in place,
    by the rules a checkpoint is loaded with."""
    if weights_dtype not in WEIGHTS_DTYPES[1:]:
        raise ValueError(f"cannot quantize to {weights_dtype!r}; use one of {', '.join(WEIGHTS_DTYPES[1:])}")
    dtype, device = model.model.norm.weight.dtype, model.model.norm.weight.device
    tied = model.config.tie_word_embeddings
    stored = {}
    for name, param in list(model.named_parameters(remove_duplicate=False)):
        form = target(name, weights_dtype, param, device.type == "cpu")
        if form is not None and not (tied and name == HEAD):
            stored[name] = convert(param.data, form)
    if tied and EMBEDDING in stored:
        stored[HEAD] = stored[EMBEDDING]
    for name, weight in stored.items():
        install(model, name, weight, dtype, device)
    return model
