"""SnapKVConfig: the knobs of KV-cache compression, validated, plus which selection policy uses them."""

from __future__ import annotations

from dataclasses import dataclass

# the policies that rank prompt positions by the observation window's attention (SnapKV's scores)
WINDOW_POLICIES = ("snapkv", "adakv", "pyramidkv")
POLICIES = (*WINDOW_POLICIES, "tova", "keynorm", "streaming", "full")
POOLINGS = ("max", "avg")
GROUP_AGGREGATIONS = ("mean", "max")
CHOICES = {"policy": POLICIES, "pooling": POOLINGS, "group_agg": GROUP_AGGREGATIONS}
MAX_KERNEL = 255  # pooling costs kernel x prompt per head: wider smoothing only blurs the votes
MAX_SIZE = 2**31  # budgets and windows are cache positions (int32 tensors on the device)
# one line per knob, for every front end (snapkv-run's flags, the server's request field)
HELP = {
    "budget": "Entries kept per layer and kv head, the observation window included (adakv and pyramidkv keep "
              "this many on average, spread over heads or layers).",
    "window": "SnapKV observation window: the last prompt tokens, whose attention votes for what to keep.",
    "kernel": "SnapKV vote pooling kernel (odd): the neighbours of a voted position are kept with it.",
    "pooling": "SnapKV vote pooling.",
    "group_agg": "SnapKV: how the query heads of one kv group combine their votes (max: a position any head "
                 "wants is kept).",
    "policy": "Selection policy: snapkv; adakv (SnapKV votes, the layer's budget spread over its kv heads by "
              "where attention concentrates); pyramidkv (SnapKV votes, budgets shrinking with depth); tova (the "
              "last token's attention); keynorm (lowest key norms); streaming (sink tokens + the most recent); "
              "full (no compression).",
    "sink_tokens": "The first prompt tokens every compressing policy keeps (attention sinks); default 4 for "
                   "streaming, 0 otherwise.",
}


@dataclass(frozen=True)
class SnapKVConfig:
    """`budget` entries are kept per layer and kv head, the observation `window` included (official SnapKV).

    policy: one of POLICIES (see HELP["policy"]). Prompts of at most `budget` tokens are never compressed.
    sink_tokens: None takes the policy's default (4 for streaming, 0 otherwise); `sinks` is the resolved number.
    """

    # knobs chosen on the eval's tuning split by teacher-forced KL to the full cache (benchmarks/results/tune.md)
    # and confirmed on the report split (quality_report.md): a wide, averaged vote keeps whole neighbourhoods
    budget: int = 1024
    window: int = 32
    kernel: int = 31
    pooling: str = "avg"
    group_agg: str = "max"
    policy: str = "snapkv"
    sink_tokens: int | None = None

    @property
    def sinks(self) -> int:
        if self.sink_tokens is not None:
            return self.sink_tokens
        return 4 if self.policy == "streaming" else 0

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose one of {', '.join(POLICIES)}")
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (self.budget, self.window, self.kernel)):
            raise ValueError("budget, window and kernel must be integers")
        for name, value in (("budget", self.budget), ("window", self.window)):
            if value < 1:
                raise ValueError(f"{name} must be at least 1 (got {value})")
            if value >= MAX_SIZE:
                raise ValueError(f"{name} must be below 2**31 (got {value})")
        if self.policy in WINDOW_POLICIES and self.budget <= self.window:
            raise ValueError(f"budget ({self.budget}) must be larger than window ({self.window}): the budget counts "
                             "the observation window")
        if not 1 <= self.kernel <= MAX_KERNEL or self.kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd number in [1, {MAX_KERNEL}] (got {self.kernel}) so pooling "
                             "keeps the length")
        if self.pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(POOLINGS)}")
        if self.group_agg not in GROUP_AGGREGATIONS:
            raise ValueError(f"unknown group_agg {self.group_agg!r}; choose one of {', '.join(GROUP_AGGREGATIONS)}")
        if self.sink_tokens is not None and (not isinstance(self.sink_tokens, int) or
                                             isinstance(self.sink_tokens, bool)):
            raise ValueError("sink_tokens must be an integer")
        room = self.budget - (self.window if self.policy in WINDOW_POLICIES else 0)
        if self.policy != "full" and not 0 <= self.sinks < room:
            raise ValueError(f"sink_tokens ({self.sinks}) must be in [0, {room}): the budget, less the window, "
                             "must hold them and still choose")
