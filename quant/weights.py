"""Weight-only quantized weights as data: int8 (a scale per output channel, or per group of 32 as GGUF's Q8_0)
and int4 (group-wise scale and zero point, torch's "tinygemm" layout), the quantizers that make them from float
weights, and slicing them by rows or columns (tensor parallelism: scales follow their column groups).
    int8  q int8 [N, K], scale [N, K / group]        w = scale * q
    int4  q 0..15 [N, K], scale, zero [N, K / group]  w = scale * (q - 8) + zero
"""


from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP = 32


@dataclass
class Int8Weight:
    q: torch.Tensor      # int8 [N, K]
    scale: torch.Tensor  # float32 [N, K // group]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        n, k = self.q.shape
        return (self.q.view(n, -1, self.group).double() * self.scale.double()[..., None]).view(n, k).to(dtype)


@dataclass
class Int4Weight:
    q: torch.Tensor      # uint8 [N, K], values 0..15
    scale: torch.Tensor  # float32 [N, K // group]
    zero: torch.Tensor   # float32 [N, K // group]

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[N, K], each value rounded once from the exact scale * (q - 8) + zero (as an FMA would)."""
        n, k = self.q.shape
        q = self.q.view(n, -1, self.group).double() - 8
        return (q * self.scale.double()[..., None] + self.zero.double()[..., None]).view(n, k).to(dtype)


def quantize_int8(w: torch.Tensor) -> Int8Weight:
    """Symmetric, one scale per output channel (row): the largest |w| of a row maps to 127."""
    w = w.float()
    scale = (w.abs().amax(1, keepdim=True) / 127).clamp(min=1e-12)
    return Int8Weight((w / scale).round().clamp(-127, 127).to(torch.int8), scale)


def quantize_int4(w: torch.Tensor, group: int = INT4_GROUP) -> Int4Weight:
    """Asymmetric, group-wise along K: each group's min..max spans the 16 levels (as gpt-fast does)."""
    n, k = w.shape
    if k % group:
        raise ValueError(f"int4 needs the input size ({k}) to be a multiple of the group size {group}")
    g = w.float().reshape(n, k // group, group)
    low, high = g.amin(-1), g.amax(-1)
    scale = ((high - low) / 15).clamp(min=1e-12)
    q = ((g - low[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Weight(q.view(n, k), scale, low + 8 * scale)


def int8_as_int4_planes(weight: Int8Weight) -> tuple[Int4Weight, Int4Weight]:
    """q = 16 * hi + lo with hi in -8..7 and lo in 0..15: scale * q = 16 scale * hi + (scale * (lo - 8) + 8 scale)
    — two int4 weights (hi stored as hi + 8, zero 0; lo with zero 8 scale) whose sum is the int8 weight exactly."""
    q = weight.q.to(torch.int16)
    hi, lo = torch.div(q, 16, rounding_mode="floor"), q % 16
    return (Int4Weight((hi + 8).to(torch.uint8), 16 * weight.scale, torch.zeros_like(weight.scale)),
            Int4Weight(lo.to(torch.uint8), weight.scale, 8 * weight.scale))


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
