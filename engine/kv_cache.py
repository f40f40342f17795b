"""KVCache: the static, preallocated key/value store that prefill fills and decode appends to.

One buffer each for K and V, `[layers, slots, kv_heads, capacity, head_dim]`, plus `lengths[layers, slots,
kv_heads]`, the entries each (layer, slot, kv head) holds: its entries are a prefix of its own buffer row, and a
decode step appends one entry to every row at that row's length. SnapKV keeps the same number everywhere; AdaKV and
PyramidKV keep different numbers per kv head or per layer, which costs nothing in step time (the mask is per row
anyway) and, in memory, only the slot's room for its largest row. Shapes never change after allocation, which is
what lets the decode step be captured as a CUDA graph; `prefix(b)` is a view of the first b slots (the same memory),
which is what a decode step for a batch bucket of b runs on. Entries of a sequence need not be contiguous
positions: after SnapKV they are the kept prompt positions, post-RoPE; `positions` records each entry's original
position when the model has a sliding window and needs it. The size is checked against free memory before anything
is allocated.

With `int8=True` the buffers hold int8 and each entry's K and V carry a float32 scale per (token, kv head): an
entry is quantized when it is written (prefill's kept entries, decode's appends; symmetric, its largest |x| maps
to 127) and `read` dequantizes to the model's dtype inside attention. SnapKV has scored and selected on the
prefill's full-precision K/V before anything is written.
"""

from __future__ import annotations

import torch


class KVCacheTooLarge(ValueError):
    """The requested cache does not fit; the message says by how much and what to lower."""


def available_memory_bytes(device: torch.device) -> int:
    """Bytes this process could still allocate on `device`. On CUDA that is the driver's free memory plus the
    blocks PyTorch's allocator holds cached but unused (a finished prefill leaves its peak there; it is reused
    without asking the driver, so counting it as used would refuse prompts that fit)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        import os
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


def kv_entry_bytes(head_dim: int, dtype: torch.dtype, int8: bool = False) -> int:
    """Bytes of one entry's K and V in one (layer, kv head) row: 2 x head_dim values, plus two float32 scales
    when int8."""
    return 2 * (head_dim + 4) if int8 else 2 * head_dim * dtype.itemsize


def quantize_entries(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> int8 values and a float32 scale per entry (symmetric: its largest |x| maps to 127)."""
    scale = x.abs().amax(-1).float().clamp(min=1e-12) / 127
    return (x.float() / scale[..., None]).round().clamp(-127, 127).to(torch.int8), scale


def dequantize_entries(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.to(torch.float32) * scale[..., None]).to(dtype)


class KVCache:
    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 track_positions: bool = False, int8: bool = False):
        device = torch.device(device)
        shape = (num_layers, slots, num_kv_heads, capacity, head_dim)
        per_entry = kv_entry_bytes(head_dim, dtype, int8)  # one (layer, kv head) entry's K and V
        needed = num_layers * slots * num_kv_heads * capacity * per_entry
        if track_positions:
            needed += num_layers * slots * num_kv_heads * capacity * 4
        free = available_memory_bytes(device)
        if needed > free:
            per_entry = needed / max(slots * capacity, 1)
            fits = int(free // per_entry) if per_entry else 0
            raise KVCacheTooLarge(
                f"the KV cache needs {format_bytes(needed)} ({slots} slot(s) x {capacity} entries x "
                f"{num_layers} layers) but only {format_bytes(free)} is free on {device}; about {fits} entries "
                "in total would fit: lower max_kv_len, max_batch_size or the SnapKV budget")
        self.shape, self.dtype, self.device = shape, dtype, device  # dtype: what `read` returns
        self.capacity, self.int8 = capacity, int8
        self.storage_dtype = torch.int8 if int8 else dtype
        self.k = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        scales = shape[:-1] if int8 else (0,)
        self.k_scale = torch.zeros(scales, dtype=torch.float32, device=device)
        self.v_scale = torch.zeros(scales, dtype=torch.float32, device=device)
        self.lengths = torch.zeros(num_layers, slots, num_kv_heads, dtype=torch.long, device=device)
        self.positions = (torch.zeros(shape[:-1], dtype=torch.int32, device=device) if track_positions else None)
        self.slot_index = torch.arange(slots, device=device)
        self.head_index = torch.arange(num_kv_heads, device=device)
        self.entry_index = torch.arange(capacity, device=device)

    def prefix(self, batch: int) -> "KVCache":
        """The first `batch` slots as a cache of their own: views of the same buffers, no copy."""
        view = object.__new__(KVCache)
        view.__dict__.update(self.__dict__)
        view.shape = (self.shape[0], batch, *self.shape[2:])
        view.k, view.v, view.lengths = self.k[:, :batch], self.v[:, :batch], self.lengths[:, :batch]
        if self.int8:
            view.k_scale, view.v_scale = self.k_scale[:, :batch], self.v_scale[:, :batch]
        view.positions = self.positions[:, :batch] if self.positions is not None else None
        view.slot_index = self.slot_index[:batch]
        return view

    @property
    def nbytes(self) -> int:
        extra = self.positions.nbytes if self.positions is not None else 0
        return self.k.nbytes + self.v.nbytes + self.k_scale.nbytes + self.v_scale.nbytes + extra

    def _put(self, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write entries k/v [..., head_dim] at `index` (quantized first on an int8 cache)."""
        if self.int8:
            (k, self.k_scale[index]), (v, self.v_scale[index]) = quantize_entries(k), quantize_entries(v)
        self.k[index], self.v[index] = k, v

    def read(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [slots, kv_heads, span, head_dim] of the first `span` entries of every row, in `dtype`."""
        return self.read_rows((layer, slice(None), slice(None), slice(0, span)))

    def read_rows(self, index: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `index` (over the first four dims), in `dtype`: views, or dequantized copies if int8."""
        if not self.int8:
            return self.k[index], self.v[index]
        return (dequantize_entries(self.k[index], self.k_scale[index], self.dtype),
                dequantize_entries(self.v[index], self.v_scale[index], self.dtype))

    def write_prefill(self, layer: int, slot: int, k: torch.Tensor, v: torch.Tensor,
                      positions: torch.Tensor) -> None:
        """Store one sequence's kept entries for one layer: k/v [kv_heads, n, head_dim], positions [kv_heads, n]
        (a row padded with -1 past its own entries, when kv heads keep different numbers)."""
        n = k.shape[1]
        if n > self.capacity:
            raise KVCacheTooLarge(f"{n} entries do not fit a cache of capacity {self.capacity}")
        self._put((layer, slot, slice(None), slice(0, n)), k, v)
        self.lengths[layer, slot] = (positions >= 0).sum(-1)
        if self.positions is not None:
            self.positions[layer, slot, :, :n] = positions.to(torch.int32)

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor) -> None:
        """Decode: write one entry per sequence and kv head at that row's length. k/v [batch, kv_heads, 1, head_dim]."""
        slots, heads, at = self.slot_index[:, None], self.head_index[None, :], self.lengths[layer]
        self._put((layer, slots, heads, at), k[:, :, 0], v[:, :, 0])
        if self.positions is not None:
            self.positions[layer, slots, heads, at] = positions.to(torch.int32)[:, None]

    def visible(self, layer: int, span: int) -> torch.Tensor:
        """Bool [batch, kv_heads, span]: which of the first `span` entries of each row this decode step may attend
        to in `layer`, the one it appends at the row's length included."""
        return self.entry_index[:span] <= self.lengths[layer][..., None]

    def in_window(self, layer: int, positions: torch.Tensor, sliding_window: int, span: int) -> torch.Tensor:
        """Bool [batch, kv_heads, span]: the entries whose original position a sliding window still shows to
        queries at `positions` (kept entries differ per layer and kv head, so this is per layer)."""
        return self.positions[layer, :, :, :span] > (positions - sliding_window)[:, None, None]

    def advance(self, active: torch.Tensor) -> None:
        """After a decode step: live sequences grow by one; finished ones stay put (their slot is reused as is)."""
        self.lengths.add_(active[None, :, None]).clamp_(max=self.capacity - 1)
