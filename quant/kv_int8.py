"""The int8 KV cache (`--kv-dtype int8`): K and V stored as int8 with a float32 scale per (entry, kv head),
quantized when an entry is written (prefill's kept entries, each decode append; symmetric, its largest |x| maps to
127) and dequantized to the model's dtype when attention reads it. SnapKV scores and selects on the prefill's
full-precision K/V before anything is written."""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache


def quantize_entries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> int8 values and a float32 scale per entry."""
    scale = x.abs().amax(-1).float().clamp(min=1e-12) / 127
    return (x.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantize_entries(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


class Int8KVCache(KVCache):
    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 track_positions: bool = False):
        super().__init__(num_layers, slots, num_kv_heads, capacity, head_dim, dtype, device, track_positions)
        self.k_scale = torch.zeros(self.shape[:-1], dtype=torch.float32, device=self.device)
        self.v_scale = torch.zeros(self.shape[:-1], dtype=torch.float32, device=self.device)

    @staticmethod
    def entry_bytes(head_dim: int, dtype: torch.dtype) -> int:
        return 2 * (head_dim + 4)  # a byte a value, and a float32 scale each for K and V

    @staticmethod
    def storage_dtype_for(dtype: torch.dtype) -> torch.dtype:
        return torch.int8

    def _put(self, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        (self.k[index], self.k_scale[index]), (self.v[index], self.v_scale[index]) = \
            quantize_entries(k), quantize_entries(v)

    def read_rows(self, index: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        return (dequantize_entries(self.k[index], self.k_scale[index], self.dtype),
                dequantize_entries(self.v[index], self.v_scale[index], self.dtype))
