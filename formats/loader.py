"""Weight loading: an HF safetensors directory (single or sharded) or a GGUF file, into the network.

Tensors are read one at a time from memory-mapped files and cast straight to the target dtype and device into a
model built on the meta device, so peak RAM stays near one copy of the weights. `weights_dtype` stores the
projections, embedding and lm_head in another form (quant.store). `shard` (parallel.shard.TensorParallel) builds
this rank's part of the network and reads only its rows or columns of each split tensor (safetensors `get_slice`;
a GGUF tensor is read whole and cut). Every failure names the file and the tensor; nothing is unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from engine.tokenizer import Tokenizer
from formats.gguf import gguf_config, gguf_tensors, is_gguf, read_gguf_metadata
from formats.hf import hf_tokenizer, read_model_config
from formats.tokenizers import read_gguf_tokenizer
from models.config import ModelConfig
from models.llama import LlamaForCausalLM, RotaryEmbedding
from quant.store import EMBEDDING, HEAD, as_float, check_weights_dtype, convert, direct_kinds, install, target
from quant.weights import take_part


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    if is_gguf(path):
        return gguf_config(read_gguf_metadata(path), source=str(path))
    if not (path / "config.json").is_file():
        raise ValueError(f"{path}: not a model directory (no config.json); pass an HF-style directory or a .gguf file")
    return read_model_config(path / "config.json")


def load_tokenizer(path: Path) -> Tokenizer:
    if path.is_file():
        if not is_gguf(path):
            raise ValueError(f"{path} is a file but not a .gguf; pass a .gguf file or a model directory")
        return read_gguf_tokenizer(path)
    if not path.is_dir():
        raise ValueError(f"{path} does not exist; pass a model directory or a .gguf file")
    return hf_tokenizer(path)


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               config: ModelConfig | None = None, weights_dtype: str | None = None, shard=None) -> LlamaForCausalLM:
    """Build the network for `path` (HF directory or .gguf) and fill it with its weights. weights_dtype: how the
    projections, the embedding and lm_head are stored (quant.store; None: in `dtype`, every GGUF tensor
    dequantized). shard: this rank's place in a tensor-parallel group (parallel.shard.TensorParallel)."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such model file or directory")
    check_weights_dtype(weights_dtype)
    if weights_dtype == "auto" and not is_gguf(path):
        weights_dtype = None
    if weights_dtype in ("float32", "bfloat16", "float16") and getattr(torch, weights_dtype) == dtype:
        weights_dtype = None
    cfg = config or load_config(path)
    with torch.device("meta"):
        model = shard.build(cfg) if shard else LlamaForCausalLM(cfg)
    size = shard.size if shard else 1
    split = (lambda name: shard.split_dim(name, cfg.vocab_size)) if shard else (lambda name: None)
    expected = {}  # name -> the whole tensor's shape (this rank holds a part of the split ones)
    for name, p in model.named_parameters(remove_duplicate=False):
        expected[name] = tuple(n * size if d == split(name) else n for d, n in enumerate(p.shape))
    if cfg.tie_word_embeddings:
        expected.pop(HEAD)

    def part(name: str) -> tuple[int, int, int] | None:
        dim = split(name) if name in expected else None
        return None if dim is None else (dim, *shard.part(expected[name][dim]))

    on_cpu = torch.device(device).type == "cpu"
    tensors = gguf_tensors(path, cfg, direct_kinds(weights_dtype), part) if is_gguf(path) else \
        safetensors_tensors(path, part)
    loaded: dict[str, torch.Tensor] = {}
    stored: dict[str, object] = {}  # name -> Int8Weight / Int4Weight / float tensor in the weights dtype
    for source, name, shape, tensor in tensors:
        if name not in expected:
            continue  # e.g. rotary inv_freq buffers or a tied lm_head that some exporters still write
        if tuple(shape) != expected[name]:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(shape)}, the config needs {expected[name]}")
        form = target(name, weights_dtype, tensor, on_cpu)
        if form is None:
            loaded[name] = as_float(tensor).to(device=device, dtype=dtype)
        else:
            stored[name] = convert(tensor, form)
    missing = sorted(set(expected) - set(loaded) - set(stored))
    if missing:
        raise ValueError(f"{path}: missing tensor(s) {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(loaded, strict=False, assign=True)
    vocab_parallel = shard is not None and shard.vocab_parallel_for(cfg.vocab_size)
    rows = shard.part(cfg.vocab_size) if vocab_parallel else (0, cfg.vocab_size)  # a tied lm_head's
    if cfg.tie_word_embeddings and EMBEDDING in stored:
        stored[HEAD] = take_part(stored[EMBEDDING], 0, *rows) if vocab_parallel else stored[EMBEDDING]
    for name, weight in stored.items():
        install(model, name, weight, dtype, device)
    if cfg.tie_word_embeddings and EMBEDDING not in stored:
        embedding = model.model.embed_tokens.weight
        model.lm_head.weight = (torch.nn.Parameter(embedding[rows[0]:rows[1]], requires_grad=False)
                                if vocab_parallel else embedding)
    model.rotary = RotaryEmbedding(cfg).to(device)  # buffers were built on meta
    if on_cpu:  # float32 safetensors stay memory-mapped; touch every page now, so the first request neither pays
        for p in model.parameters():  # the page-in nor counts the weights in its measured peak memory
            p.data.sum()
    if shard is not None:
        shard.attach(model)
    return model.eval().requires_grad_(False)


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
