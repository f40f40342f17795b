"""Memory model: the peak memory a prefill adds beyond the weights and the static cache, predicted before it starts,
so an impossible request is refused with the figure and what would fit instead of crashing mid-prefill.

The prefill is layer-major and chunked, so its peak is a sum of terms that each grow with at most one factor of the
prompt length T (the residual stream, RoPE tables, one layer's K/V, the causal mask SDPA builds on CPU or a
sliding window's on CUDA, K/V repeated for a kernel without GQA, and the larger of a chunk's working set and
SnapKV's scoring of the window), plus the last logits, with a 30% margin and 64 MiB for allocator slack (the
measured resident peak ran up to 1.5x the sum at 16K tokens on CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_cache import format_bytes
from models.config import ModelConfig

MARGIN = 1.3
SLACK = 64 * 2**20
FP32 = 4


@dataclass
class MemoryEstimate:
    total: int
    parts: dict[str, int]

    def describe(self) -> str:
        return ", ".join(f"{name} {format_bytes(n)}" for name, n in self.parts.items() if n)


def predict_prefill_peak(cfg: ModelConfig, prompt_len: int, dtype_bytes: int, chunk: int, window: int = 0,
                         device_type: str = "cpu", repeat_kv: bool = False) -> MemoryEstimate:
    """Peak bytes one prompt's prefill adds beyond the weights and the (already allocated) static cache
    (window: SnapKV's observation window, 0 without SnapKV; repeat_kv: whether attention repeats K/V to the query
    heads, models.attention.prefill_repeats_kv)."""
    t, e = prompt_len, dtype_bytes
    c = min(chunk, t)
    hkv, d, h = cfg.num_kv_heads, cfg.head_dim, cfg.num_heads
    keys = t if cfg.sliding_window is None else min(t, cfg.sliding_window + c)  # one query chunk's keys
    if device_type == "cpu":
        mask = c * t * (2 * FP32 + 1) if t > chunk else 0
    else:
        mask = c * keys * (1 + FP32) if cfg.sliding_window is not None and t > cfg.sliding_window else 0
    chunk_work = c * (4 * cfg.hidden_size + 3 * h * d + 4 * hkv * d + 3 * cfg.intermediate_size) * e
    group = h // hkv
    scoring = (3 * group * window * t + 4 * h * t) * FP32 + 3 * hkv * t * 8 if window else 0
    parts = {
        "residual stream": t * cfg.hidden_size * e,
        "RoPE tables": t * d * (2 * e + 3 * FP32),
        "one layer's K/V": 2 * t * hkv * d * e,
        "attention mask": mask,
        "repeated K/V": 2 * keys * h * d * e if repeat_kv and h != hkv else 0,
        "chunk or scoring work": max(chunk_work, scoring),
        "logits": cfg.vocab_size * (e + FP32),
    }
    return MemoryEstimate(int(MARGIN * sum(parts.values())) + SLACK, parts)


def longest_prompt_that_fits(cfg: ModelConfig, free_bytes: int, dtype_bytes: int, chunk: int, window: int = 0,
                             device_type: str = "cpu", cache_bytes_for=lambda t: 0, limit: int = 1 << 24,
                             repeat_kv: bool = False) -> int:
    """The longest prompt whose predicted prefill peak, plus cache_bytes_for(T) of cache still to be allocated
    for it (0 for an engine whose cache exists), fits in free_bytes."""
    def fits(t):
        peak = predict_prefill_peak(cfg, t, dtype_bytes, chunk, window, device_type, repeat_kv).total
        return peak + int(MARGIN * cache_bytes_for(t)) <= free_bytes

    if not fits(1):
        return 0
    lo, hi = 1, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


class PeakMeter:
    """Measures how much memory a block of work adds at its peak: on CUDA from the allocator's peak statistics,
    on CPU (Linux) from the process's resident-set high-water mark, reset at the start through clear_refs."""

    def __init__(self, device):
        self.device = device
        self.peak: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets VmHWM to the current RSS
                self.base = _proc_status_kib("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            self.peak = (_proc_status_kib("VmHWM") - self.base) * 1024


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(f"{key} not in /proc/self/status")
