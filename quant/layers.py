"""The quantized and cast modules swapped in for nn.Linear / nn.Embedding: int4 (torch's int4pack kernels on CPU
and CUDA), int8 per output channel (`_weight_int8pack_mm` on CPU, dequantized in the matmul on CUDA), group-wise
int8 run exactly as two int4 planes, and float weights stored in another dtype than the activations. The kernels
take bfloat16 activations and scales (their float32 forms are 10-30x slower on CPU), so each layer casts its input
to bfloat16 and its output back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quant.weights import Int4Weight, Int8Weight, int8_as_int4_planes

KERNEL_DTYPE = torch.bfloat16  # the activations and scales torch's int8/int4 kernels take


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
