"""GGUF Q8_0, Q4_0 and Q4_1 blocks read straight into the int8/int4 weights of models.quantized, no float detour.

A block covers 32 consecutive weights of a row and starts with float16 d (Q4_1: then float16 m):
    Q8_0  d, 32 x int8 q                    w = d * q
    Q4_0  d, 16 bytes of nibbles            w = d * (q - 8)
    Q4_1  d, m, 16 bytes of nibbles         w = d * q + m
with weight j in the low nibble of byte j and weight j + 16 in the high nibble. The rows are the output channels,
so the loader's RoPE row un-permutation applies to these weights as to float ones (`permute_rows`).
"""

from __future__ import annotations

import numpy as np
import torch

from models.quantized import Int4Weight, Int8Weight

BLOCK = 32
DIRECT_TYPES = ("Q8_0", "Q4_0", "Q4_1")


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
