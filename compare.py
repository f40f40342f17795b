"""How far a compressed cache's answer is from the full cache's: greedy tokens matched index by index.

Both answers are cut after their first end-of-sequence token; from there on an answer is "ended", so two answers
that stop together match to the end, and an answer that stops early (or runs on) mismatches every position the
other still has. Used by `snapkv-run --compare` and by the quality eval's fidelity metrics.
"""

from __future__ import annotations

from typing import Collection

ENDED = -1


def _cut(tokens: list[int], eos_ids: Collection[int], n: int) -> list[int]:
    out = []
    for t in tokens[:n]:
        out.append(t)
        if t in eos_ids:
            break
    return out + [ENDED] * (n - len(out))


def matched_tokens(reference: list[int], other: list[int], eos_ids: Collection[int] = (), n: int = 32) -> int:
    """How many of the first n generated positions hold the same token (0..n)."""
    return sum(a == b for a, b in zip(_cut(reference, eos_ids, n), _cut(other, eos_ids, n)))


def first_difference(reference: list[int], other: list[int], eos_ids: Collection[int] = ()) -> int | None:
    """The index of the first position where the answers differ (None: identical)."""
    n = max(len(reference), len(other))
    a, b = _cut(reference, eos_ids, n), _cut(other, eos_ids, n)
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
