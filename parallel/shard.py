"""What one tensor-parallel rank holds, and the collectives that make its shard compute the whole network
(Megatron-style, as gpt-fast's tp.py: the core network is built at this rank's shape and the collectives are
added from outside).

With N ranks a rank holds H/N query heads and Hkv/N kv heads (q/k/v column-parallel: output rows split by head)
and I/N of the MLP width (gate/up column-parallel); o_proj and down_proj are row-parallel (input columns split the
same way), so their outputs are partial sums that a forward hook all-reduces. A kv head's query group lives on one
rank, so attention, the KV cache and SnapKV's per-kv-head selection need no communication. The lm_head is
vocab-parallel (V/N rows, the logits gathered) when N divides the vocabulary, else replicated, as are the
embedding and the norms. Collectives are in place when eager or captured in a CUDA graph, functional when traced
by torch.compile (which cannot trace the in-place ones).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn

from models.config import ModelConfig
from models.llama import LlamaForCausalLM

COLUMN_PARALLEL = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight")
ROW_PARALLEL = re.compile(r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight")
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name, or torch < 2.13's


class TensorParallel:
    """This rank's place in a tensor-parallel group, and the group's collectives."""

    def __init__(self, rank: int = 0, size: int = 1, group=None, vocab_parallel: bool = True):
        self.rank, self.size, self.group = rank, size, group
        self.vocab_parallel = vocab_parallel and size > 1

    def split_dim(self, name: str, vocab_size: int) -> int | None:
        """The dimension of the weight `name` that is split over the ranks (0: rows, 1: columns), or None."""
        if self.size == 1:
            return None
        if COLUMN_PARALLEL.fullmatch(name) or (name == "lm_head.weight" and self.vocab_parallel_for(vocab_size)):
            return 0
        return 1 if ROW_PARALLEL.fullmatch(name) else None

    def vocab_parallel_for(self, vocab_size: int) -> bool:
        return self.vocab_parallel and vocab_size % self.size == 0

    def part(self, length: int) -> tuple[int, int]:
        """This rank's [start, stop) of a dimension of `length` split evenly."""
        step = length // self.size
        return self.rank * step, (self.rank + 1) * step

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the ranks (a row-parallel layer's partial outputs)."""
        if torch.compiler.is_compiling():
            return funcol.all_reduce(x, "sum", self.group)
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V/N] logits of each rank -> the full [..., V] on every rank."""
        flat = logits.reshape(-1, logits.shape[-1]).contiguous()
        if torch.compiler.is_compiling():
            parts = funcol.all_gather_tensor(flat, 0, self.group)
        else:
            parts = flat.new_empty(self.size * flat.shape[0], flat.shape[1])
            ALL_GATHER(parts, flat, group=self.group)
        full = parts.view(self.size, *flat.shape).permute(1, 0, 2).reshape(flat.shape[0], -1)
        return full.view(*logits.shape[:-1], -1)

    # --- the model at this rank's shape ------------------------------------------------------------------------

    def config(self, cfg: ModelConfig) -> ModelConfig:
        return shard_config(cfg, self.size)

    def build(self, cfg: ModelConfig) -> LlamaForCausalLM:
        """The network at this rank's shape (cfg: the whole model's), its lm_head vocab-parallel where it can be."""
        model = LlamaForCausalLM(shard_config(cfg, self.size))
        if self.vocab_parallel_for(cfg.vocab_size):
            model.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size // self.size, bias=False)
        return model

    def attach(self, model: LlamaForCausalLM) -> LlamaForCausalLM:
        """The collectives, as forward hooks on the loaded model's modules (after loading: a quantized layer is
        a module of its own): each o_proj and down_proj output is all-reduced, a vocab-parallel lm_head's gathered."""
        if self.size == 1:
            return model
        for layer in model.model.layers:
            for module in (layer.self_attn.o_proj, layer.mlp.down_proj):
                module.register_forward_hook(lambda _module, _args, out: self.all_reduce(out))
        if self.vocab_parallel_for(model.config.vocab_size):
            model.lm_head.register_forward_hook(lambda _module, _args, out: self.gather_vocab(out))
        return model


def shard_config(cfg: ModelConfig, size: int) -> ModelConfig:
    """The per-rank shape of the network over `size` ranks: H/size query heads, Hkv/size kv heads, I/size of the
    MLP. Raises ValueError, naming the sizes that would work, when `size` does not divide them."""
    if size == 1:
        return cfg
    fits = [n for n in range(1, cfg.num_kv_heads + 1) if cfg.num_kv_heads % n == 0 and cfg.intermediate_size % n == 0]
    if cfg.num_kv_heads % size or cfg.intermediate_size % size:
        raise ValueError(f"tensor parallel size {size} does not divide the model's {cfg.num_kv_heads} kv heads "
                         f"and {cfg.intermediate_size} MLP width (each rank holds whole kv heads); use one of "
                         f"{', '.join(map(str, fits))}")
    return dataclasses.replace(cfg, num_heads=cfg.num_heads // size, num_kv_heads=cfg.num_kv_heads // size,
                               intermediate_size=cfg.intermediate_size // size)
