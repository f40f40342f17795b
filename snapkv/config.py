"""SnapKVConfig: the knobs of KV-cache compression, validated, plus which selection policy uses them."""

from __future__ import annotations

from dataclasses import dataclass

POLICIES = ("snapkv", "streaming", "full")
POOLINGS = ("max", "avg")
GROUP_AGGREGATIONS = ("mean", "max")
CHOICES = {"policy": POLICIES, "pooling": POOLINGS, "group_agg": GROUP_AGGREGATIONS}
# one line per knob, for every front end (snapkv-run's flags, the server's request field)
HELP = {
    "budget": "SnapKV: entries kept per layer and kv head, the observation window included.",
    "window": "SnapKV observation window: the last prompt tokens, whose attention votes for what to keep.",
    "kernel": "SnapKV vote pooling kernel (odd): the neighbours of a voted position are kept with it.",
    "pooling": "SnapKV vote pooling.",
    "group_agg": "SnapKV: how the query heads of one kv group combine their votes (max: a position any head "
                 "wants is kept).",
    "policy": "Selection policy: snapkv, streaming (StreamingLLM: sink tokens + the most recent) or full.",
}


@dataclass(frozen=True)
class SnapKVConfig:
    """`budget` entries are kept per layer and kv head, the observation `window` included (official SnapKV).

    policy: "snapkv" (vote by the window's attention), "streaming" (StreamingLLM: 4 sink tokens + the most recent
    ones) or "full" (no compression; for comparisons). Prompts of at most `budget` tokens are never compressed.
    """

    # defaults measured on SmolLM2-135M (benchmarks/results/quality.md): a short window and a wide kernel keep
    # every digit of a needle; window 32 with kernel 7 drops them at 8x compression
    budget: int = 1024
    window: int = 16
    kernel: int = 15
    pooling: str = "max"
    group_agg: str = "max"
    policy: str = "snapkv"
    sink_tokens: int = 4

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not isinstance(self.budget, int) or not isinstance(self.window, int) or not isinstance(self.kernel, int):
            raise ValueError("budget, window and kernel must be integers")
        if self.window < 1:
            raise ValueError(f"window must be at least 1 (got {self.window})")
        if self.budget <= self.window:
            raise ValueError(f"budget ({self.budget}) must be larger than window ({self.window}): the budget counts "
                             "the observation window")
        if self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number >= 1 (got {self.kernel}) so pooling keeps the length")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.group_agg not in GROUP_AGGREGATIONS:
            raise ValueError(f"unknown group_agg {self.group_agg!r}; choose one of {', '.join(GROUP_AGGREGATIONS)}")
        if self.policy == "streaming" and not 0 <= self.sink_tokens < self.budget:
            raise ValueError(f"sink_tokens ({self.sink_tokens}) must be in [0, budget)")
