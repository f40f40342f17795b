"""SamplingParams: how one request picks its tokens and when it stops, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import InvalidRequest

INT_LIMIT = 2**31  # max_tokens and top_k live in int32/int64 tensors; anything near this is a mistake anyway


@dataclass
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no filtering. A request's draws depend only on its
    `seed` (random when None) and the token's index, never on the batch or the slot it runs in."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens < INT_LIMIT:
            raise InvalidRequest(f"max_tokens must be a positive integer below 2**31 (got {self.max_tokens!r})",
                                 "max_tokens")
        if not isinstance(self.temperature, (int, float)) or not 0 <= self.temperature < math.inf:
            raise InvalidRequest(f"temperature must be a finite number >= 0 (got {self.temperature!r}); use 0 for "
                                 "greedy decoding", "temperature")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k < INT_LIMIT:
            raise InvalidRequest(f"top_k must be an integer in [0, 2**31) (got {self.top_k!r}); 0 disables it",
                                 "top_k")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise InvalidRequest(f"top_p must be in (0, 1] (got {self.top_p!r}); 1 disables it", "top_p")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be an integer in [0, 2**63) (got {self.seed!r})", "seed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop strings must be non-empty strings", "stop")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1
