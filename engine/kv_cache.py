"""KVCache: the static, preallocated key/value store that prefill fills and decode appends to.

K and V are each one buffer `[layers, slots, kv_heads, capacity, head_dim]`, and `lengths[layers, slots, kv_heads]`
says how many entries each row holds: a row's entries are a prefix of it, and a decode step appends at the row's
length. Rows may hold different numbers (AdaKV, PyramidKV); the mask is per row anyway. Shapes never change after
allocation, which is what lets the decode step be captured as a CUDA graph; `prefix(b)` views the first b slots.
Kept entries hold their post-RoPE keys at their original positions; `positions` records those positions when a
sliding window needs them. The size is checked against free memory before anything is allocated.
"""

from __future__ import annotations

import os

import torch


class KVCacheTooLarge(ValueError):
    """The requested cache does not fit; the message says by how much and what to lower."""


def available_memory_bytes(device: torch.device) -> int:
    """Bytes this process could still allocate on `device` (on CUDA: free plus what the allocator holds unused)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n} B"


class KVCache:
    storage_dtype: torch.dtype  # what the buffers hold (a subclass may store entries in fewer bits)

    def __init__(self, num_layers: int, slots: int, num_kv_heads: int, capacity: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 track_positions: bool = False):
        device = torch.device(device)
        shape = (num_layers, slots, num_kv_heads, capacity, head_dim)
        needed = num_layers * slots * num_kv_heads * capacity * (self.entry_bytes(head_dim, dtype) +
                                                                 4 * track_positions)
        free = available_memory_bytes(device)
        if needed > free:
            fits = int(free * slots * capacity // needed)
            raise KVCacheTooLarge(
                f"the KV cache needs {format_bytes(needed)} ({slots} slot(s) x {capacity} entries x "
                f"{num_layers} layers) but only {format_bytes(free)} is free on {device}; about {fits} entries "
                "in total would fit: lower max_kv_len, max_batch_size or the SnapKV budget")
        self.shape, self.dtype, self.device, self.capacity = shape, dtype, device, capacity  # dtype: what `read` gives
        self.storage_dtype = self.storage_dtype_for(dtype)
        self.k = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        self.v = torch.zeros(shape, dtype=self.storage_dtype, device=device)
        self.lengths = torch.zeros(num_layers, slots, num_kv_heads, dtype=torch.long, device=device)
        self.positions = torch.zeros(shape[:-1], dtype=torch.int32, device=device) if track_positions else None
        self.slot_index = torch.arange(slots, device=device)
        self.head_index = torch.arange(num_kv_heads, device=device)
        self.entry_index = torch.arange(capacity, device=device)

    @staticmethod
    def entry_bytes(head_dim: int, dtype: torch.dtype) -> int:
        """Bytes of one entry's K and V in one (layer, kv head) row."""
        return 2 * head_dim * dtype.itemsize

    @staticmethod
    def storage_dtype_for(dtype: torch.dtype) -> torch.dtype:
        return dtype

    def prefix(self, batch: int) -> KVCache:
        """The first `batch` slots as a cache of their own: views of the same buffers, no copy."""
        view = object.__new__(type(self))
        view.__dict__.update({name: t[:, :batch] if isinstance(t, torch.Tensor) and t.dim() > 2 else t
                              for name, t in self.__dict__.items()})
        view.shape = (self.shape[0], batch, *self.shape[2:])
        view.slot_index = self.slot_index[:batch]
        return view

    @property
    def nbytes(self) -> int:
        """Bytes of the stored entries (and their positions, scales), every slot's."""
        return sum(t.nbytes for name, t in vars(self).items()
                   if isinstance(t, torch.Tensor) and t.dim() > 3 and name != "lengths")

    def _put(self, index: tuple, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write entries k/v [..., head_dim] at `index` (over the first four dims)."""
        self.k[index], self.v[index] = k, v

    def read(self, layer: int, span: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [slots, kv_heads, span, head_dim] of the first `span` entries of every row, in `dtype`."""
        return self.read_rows((layer, slice(None), slice(None), slice(0, span)))

    def read_rows(self, index: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `index` (over the first four dims), in `dtype`."""
        return self.k[index], self.v[index]

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
        """Decode: one entry per sequence and kv head at that row's length. k/v [batch, kv_heads, 1, head_dim]."""
        slots, heads, at = self.slot_index[:, None], self.head_index[None, :], self.lengths[layer]
        self._put((layer, slots, heads, at), k[:, :, 0], v[:, :, 0])
        if self.positions is not None:
            self.positions[layer, slots, heads, at] = positions.to(torch.int32)[:, None]

    def visible(self, layer: int, span: int) -> torch.Tensor:
        """Bool [batch, kv_heads, span]: the first `span` entries of each row this step attends to in `layer`, the
        one it appends at the row's length included."""
        return self.entry_index[:span] <= self.lengths[layer][..., None]

    def in_window(self, layer: int, positions: torch.Tensor, sliding_window: int, span: int) -> torch.Tensor:
        """Bool [batch, kv_heads, span]: the entries whose original position a sliding window still shows to
        queries at `positions` (kept entries differ per layer and kv head, so this is per layer)."""
        return self.positions[layer, :, :, :span] > (positions - sliding_window)[:, None, None]

    def advance(self, active: torch.Tensor) -> None:
        """After a decode step: live sequences grow by one; finished ones stay put (their slot is reused as is)."""
        self.lengths.add_(active[None, :, None]).clamp_(max=self.capacity - 1)
