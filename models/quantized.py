"""Weight-only quantized layers: int8 and int4 linears, an int8 embedding, and the quantizers that make them.

Decode reads every weight once per step, so storing weights in fewer bits is what makes a step faster; the
activations, norms, attention and the KV cache stay in the model's dtype. Formats (w = the float weight):
    int8  q int8 [N, K], scale [N, K / group]       w = scale * q            (group K: per output channel)
    int4  q 0..15 [N, K], scale, zero [N, K / group] w = scale * (q - 8) + zero   (torch's "tinygemm" layout)
A GGUF Q4_0 block (d, 32 nibbles: w = d * (q - 8)) is int4 with zero 0, and Q4_1 (d, m: w = d * q + m) is int4
with zero m + 8d, both group 32; Q8_0 (d, 32 int8: w = d * q) is int8 with group 32. These map without loss.
Kernels: per output channel int8 runs torch's `_weight_int8pack_mm`; int4 runs `_weight_int4pack_mm_for_cpu` on
CPU and `_weight_int4pack_mm` on CUDA. Both take bfloat16 activations and bfloat16 scales (on CPU their float32
forms are 10-30x slower), so a quantized linear casts its input to bfloat16 and its output back; the scales
round to bfloat16 there (relative 2^-9, about 1/60 of an int4 step). Int8 with a group smaller than K (GGUF
Q8_0) has no kernel; it runs as two int4 planes, q = 16 * hi + lo, which hold it exactly. On CUDA, int8
dequantizes in the matmul (torch's CUDA int8pack kernel is slower still): slower than bfloat16 unless the step is
compiled (--compile), which fuses the two; int4 is the fast choice there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KERNEL_DTYPE = torch.bfloat16  # the activations and scales torch's int8/int4 kernels take
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


def _pack_int4(q: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # two values a byte, then the CUDA kernel's tiled layout (made on the device)
        pairs = (q[:, ::2] << 4 | q[:, 1::2]).to(device)
        inner_k_tiles = 8 if q.shape[1] % 128 == 0 else 4 if q.shape[1] % 64 == 0 else 2  # K % (16 tiles)
        return torch.ops.aten._convert_weight_to_int4pack(pairs, inner_k_tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1)


class Int4Linear(nn.Module):
    def __init__(self, weight: Int4Weight, device: torch.device | str = "cpu"):
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = weight.q.shape
        self.group = weight.group
        self.register_buffer("packed", _pack_int4(weight.q, device))
        scales_and_zeros = torch.stack([weight.scale.t(), weight.zero.t()], -1)  # [K // group, N, 2]
        self.register_buffer("scales_and_zeros", scales_and_zeros.to(device, KERNEL_DTYPE).contiguous())

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes + self.scales_and_zeros.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
        out = mm(flat, self.packed, self.group, self.scales_and_zeros)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class Int8Linear(nn.Module):
    """Per output channel int8 (`_weight_int8pack_mm`)."""

    def __init__(self, weight: Int8Weight, device: torch.device | str = "cpu"):
        super().__init__()
        if weight.group != weight.q.shape[1]:
            raise ValueError("Int8Linear takes one scale per output channel; group-wise int8 is Int8GroupLinear")
        device = torch.device(device)
        self.out_features, self.in_features = weight.q.shape
        self.register_buffer("q", weight.q.to(device))
        self.register_buffer("scale", weight.scale[:, 0].to(device, KERNEL_DTYPE))
        # torch's CUDA int8pack kernel is slower than dequantizing in the matmul (H200: 0.29 vs 0.19 ms for a
        # 14336 x 4096 weight at batch 1, bf16 0.03 ms); the latter is what torch.compile fuses (--compile)
        self.kernel = device.type == "cpu"

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        if self.kernel:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.q, self.scale)
        else:
            out = F.linear(flat, self.q.to(KERNEL_DTYPE)) * self.scale
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


def int8_as_int4_planes(weight: Int8Weight) -> tuple[Int4Weight, Int4Weight]:
    """q = 16 * hi + lo with hi in -8..7 and lo in 0..15: scale * q = 16 scale * hi + (scale * (lo - 8) + 8 scale)
    — two int4 weights (hi stored as hi + 8, zero 0; lo with zero 8 scale) whose sum is the int8 weight exactly."""
    q = weight.q.to(torch.int16)
    hi, lo = torch.div(q, 16, rounding_mode="floor"), q % 16
    return (Int4Weight((hi + 8).to(torch.uint8), 16 * weight.scale, torch.zeros_like(weight.scale)),
            Int4Weight(lo.to(torch.uint8), weight.scale, 8 * weight.scale))


class Int8GroupLinear(nn.Module):
    """Group-wise int8 (GGUF Q8_0), run exactly as the sum of two int4 linears (`int8_as_int4_planes`)."""

    def __init__(self, weight: Int8Weight, device: torch.device | str = "cpu"):
        super().__init__()
        hi, lo = int8_as_int4_planes(weight)
        self.out_features, self.in_features = weight.q.shape
        self.hi, self.lo = Int4Linear(hi, device), Int4Linear(lo, device)

    @property
    def nbytes(self) -> int:
        return self.hi.nbytes + self.lo.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(KERNEL_DTYPE)
        out = self.hi(flat).float() + self.lo(flat).float()
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)


class CastLinear(nn.Module):
    """A linear whose weight is stored in another float dtype than the activations (--weights-dtype bfloat16
    on a float32 engine): the input is cast to the weight's dtype and the output back."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)


class Int8Embedding(nn.Module):
    """Token embedding rows stored as int8 (per row, or group-wise for GGUF Q8_0), dequantized on lookup to the
    model's dtype: only the looked-up rows are ever expanded."""

    def __init__(self, weight: Int8Weight, dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.dtype, self.group = dtype, weight.group
        self.register_buffer("q", weight.q.to(device))
        self.register_buffer("scale", weight.scale.to(device))  # float32: no kernel constrains it here

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale.nbytes

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        q, scale = self.q[ids], self.scale[ids]
        rows = q.view(*q.shape[:-1], -1, self.group).float() * scale[..., None]
        return rows.view(*q.shape).to(self.dtype)


class CastEmbedding(nn.Module):
    """Embedding rows stored in another float dtype than the model's, cast on lookup."""

    def __init__(self, weight: torch.Tensor, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype
        self.register_buffer("weight", weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight[ids].to(self.dtype)


def quantized_linear(weight: Int8Weight | Int4Weight, device) -> nn.Module:
    if isinstance(weight, Int4Weight):
        return Int4Linear(weight, device)
    return Int8Linear(weight, device) if weight.group == weight.q.shape[1] else Int8GroupLinear(weight, device)
