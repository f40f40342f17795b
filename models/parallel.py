"""Tensor parallelism for the network (Megatron-style): which slice of each weight a rank holds, and the two
collectives the sharded forward needs.

With N ranks, a rank holds H/N query heads and Hkv/N kv heads (q/k/v are column-parallel: their output rows are
split by head) and I/N of the MLP's intermediate width (gate/up column-parallel); o_proj and down_proj are
row-parallel (their input columns are split the same way), so each rank's output is a partial sum that one
all-reduce completes. A kv head's group of query heads lives on one rank, so attention, the KV cache and SnapKV's
per-kv-head selection need no communication at all. The lm_head is vocab-parallel (each rank computes V/N of the
logits, gathered after; measured faster than a replicated lm_head, benchmarks/results/tensor_parallel.md) when N
divides the vocabulary, else replicated; the embedding, the norms and RoPE are replicated. The model is built from
`shard_config`, the per-rank shape, so every module has its local size; `SINGLE` is the one-rank group whose
collectives are no-ops.

Collectives run through torch.distributed (NCCL on GPUs, gloo on CPU): in-place ops eagerly and inside a captured
CUDA graph, functional collectives when traced by torch.compile (which cannot trace the in-place ones).
"""

from __future__ import annotations

import dataclasses
import re

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from models.config import ModelConfig
from models.quantized import Int4Weight, Int8Weight

COLUMN_PARALLEL = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkv]_proj|mlp\.(gate|up)_proj)\.weight")
ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # the new name, or torch < 2.13's
ROW_PARALLEL = re.compile(r"model\.layers\.\d+\.(self_attn\.o_proj|mlp\.down_proj)\.weight")


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
        if self.size == 1:
            return x
        if torch.compiler.is_compiling():
            return funcol.all_reduce(x, "sum", self.group)
        dist.all_reduce(x, group=self.group)
        return x

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """[..., V/N] logits of each rank -> the full [..., V] on every rank."""
        if self.size == 1:
            return logits
        flat = logits.reshape(-1, logits.shape[-1]).contiguous()
        if torch.compiler.is_compiling():
            parts = funcol.all_gather_tensor(flat, 0, self.group)
        else:
            parts = flat.new_empty(self.size * flat.shape[0], flat.shape[1])
            ALL_GATHER(parts, flat, group=self.group)
        full = parts.view(self.size, *flat.shape).permute(1, 0, 2).reshape(flat.shape[0], -1)
        return full.view(*logits.shape[:-1], -1)

    def from_first_rank(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x on every rank (the tokens it sampled: every rank then feeds the same next token)."""
        if self.size == 1:
            return x
        if torch.compiler.is_compiling():
            return funcol.broadcast(x, 0, self.group)
        dist.broadcast(x, 0, group=self.group)
        return x


SINGLE = TensorParallel()


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


def take_part(weight, dim: int, start: int, stop: int):
    """Rows (dim 0) or columns (dim 1) [start, stop) of a float tensor or an int8/int4 weight, as a copy of its
    own (a quantized weight's scales follow its columns group by group)."""
    if isinstance(weight, torch.Tensor):
        return weight.narrow(dim, start, stop - start).clone()
    fields = {}
    for name, t in vars(weight).items():
        if dim == 0:
            fields[name] = t[start:stop].clone()
        elif name == "q" or t.shape[1] == 1:  # the values; a per-row scale covers every column
            fields[name] = t[:, start:stop].clone() if name == "q" else t
        else:
            group = weight.group
            if start % group:
                raise ValueError(f"a tensor-parallel part starts at column {start}, inside a quantization group "
                                 f"of {group}; use a tensor parallel size that splits the groups evenly")
            fields[name] = t[:, start // group:stop // group].clone()
    return type(weight)(**fields)
