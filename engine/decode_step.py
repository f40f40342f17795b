"""The static decode step: one token for every slot of a batch bucket (forward, sampling and book-keeping, all on
the device) and the two ways to make it fast: a CUDA graph (captured once per bucket and sampling mode at the
engine's fixed capacity, all graphs sharing one memory pool) and `torch.compile(fullgraph=True)`.

Inputs live in persistent per-slot buffers (`StepInputs`). A step for bucket b runs on the first b slots (views):
it appends K/V at each slot's length, attends over the cache, samples the next token inside the step (greedy,
temperature, or temperature with top-k/top-p: a greedy batch pays for no sort), writes it back as the next input
and advances the live slots. No shape depends on the data and nothing reads back to the host but the `[b]` tokens.
"""

from __future__ import annotations

import contextlib

import torch

from engine.cache_views import DecodeView
from engine.kv_cache import KVCache
from engine.sampler import filtered_sample_tokens, greedy_tokens, sample_tokens

MODES = ("greedy", "sample", "filtered")  # from cheapest to most general


class StepInputs:
    """Per-slot input buffers of the decode step; `prefix(b)` views the first b slots."""

    FIELDS = {"tokens": torch.long, "positions": torch.long, "active": torch.long, "temperature": torch.float32,
              "top_k": torch.long, "top_p": torch.float32, "seed": torch.long, "index": torch.long}

    def __init__(self, slots: int, device: torch.device):
        for name, dtype in self.FIELDS.items():
            setattr(self, name, torch.zeros(slots, dtype=dtype, device=device))

    def rows(self, start: int, stop: int) -> "StepInputs":
        """Slots start..stop-1, as views of the same buffers."""
        view = object.__new__(StepInputs)
        for name in self.FIELDS:
            setattr(view, name, getattr(self, name)[start:stop])
        return view


def next_tokens(mode: str, logits: torch.Tensor, rows: StepInputs) -> torch.Tensor:
    """The next token of each row of logits [B, V] under the rows' sampling settings (rows: the same B slots)."""
    if mode == "greedy":
        return greedy_tokens(logits)
    if mode == "sample":
        return sample_tokens(logits, rows.temperature, rows.seed, rows.index)
    return filtered_sample_tokens(logits, rows.temperature, rows.top_k, rows.top_p, rows.seed, rows.index)


class DecodeStep:
    """The step for one batch bucket (the first `batch` slots); `run(mode, span)` for each sampling mode."""

    def __init__(self, model: torch.nn.Module, cache: KVCache, inputs: StepInputs, batch: int):
        self.model, self.batch = model, batch
        self.cache, self.inputs = cache.prefix(batch), inputs.rows(0, batch)
        self.view = DecodeView(self.cache, self.inputs.positions, model.config.sliding_window)

    def run(self, mode: str, span: int) -> torch.Tensor:
        inputs = self.inputs
        self.view.span = span
        logits = self.model.decode(inputs.tokens, inputs.positions, self.view).float()
        inputs.tokens.copy_(next_tokens(mode, logits, inputs))  # the next step's input, not through the host
        self.cache.advance(inputs.active)
        inputs.positions.add_(inputs.active)
        inputs.index.add_(inputs.active)
        return inputs.tokens


def graph_capture_supported(device: torch.device) -> bool:
    return device.type == "cuda"


def on_device(device: torch.device):
    """Make `device` the current CUDA device for a block (nothing to do for another device type)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def capture_graph(fn, pool, device: torch.device, warmup: int = 2):
    """Warm `fn` up on a side stream (as torch.cuda.graphs requires), then capture it into `pool`; returns the
    graph and the output tensor that every replay refreshes. Everything happens on `device`, the cache's (the
    current device may be another: streams and captures are per device)."""
    with on_device(device):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                fn()
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = fn()
    return graph, out


def new_graph_pool():
    return torch.cuda.graph_pool_handle()


class GraphedStep:
    """One captured (bucket, mode) step at the full capacity span. Capture runs on an empty cache (every slot
    inactive, so the warm-up writes only entries that a prefill overwrites and advances nothing)."""

    def __init__(self, fn, capacity: int, pool, device: torch.device):
        self.device = device
        self.graph, self.out = capture_graph(lambda: fn(capacity), pool, device)

    def __call__(self, span: int) -> torch.Tensor:
        with on_device(self.device):  # replays go to the current stream of the capture's device
            self.graph.replay()
        return self.out
