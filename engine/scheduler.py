"""Scheduler: the waiting queue and the cache slots — continuous batching.

Each step admits waiting requests into free slots (the lowest first, so live slots stay packed at the front and
the decode step's batch bucket small): either short prompts, oldest first, as many as fit a per-step token budget,
or one long prompt alone; a long one passed over gets the next step, so none starves. A finished request frees its
slot at once. A slot can be reserved (a conversation keeps one between its turns): requests placed in it are
admitted there, never into a free one. Whether a request can ever fit is decided when it is added, by the engine's
`admission_check`, so a refusal comes before anything runs.
"""

from __future__ import annotations

import heapq
from collections import deque
from typing import Callable

from engine.sequence import Sequence, Status


class Scheduler:
    def __init__(self, num_slots: int, prefill_token_budget: int,
                 admission_check: Callable[[Sequence], None] = lambda seq: None):
        """admission_check(seq) raises ValueError, with the numbers and what to change, for a request that can
        never run; prefill_token_budget: prompt tokens prefilled per step before decoding resumes."""
        self.num_slots, self.prefill_token_budget = num_slots, prefill_token_budget
        self.admission_check = admission_check
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self.free_slots = list(range(num_slots))  # a heap
        self.long_owed = False  # short prompts overtook a waiting long one: the next step is the long one's
        self.reserved = 0  # slots conversations hold between their turns

    def add(self, seq: Sequence) -> None:
        self.admission_check(seq)
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into free slots (a conversation's turn: into its own slot) for this step's
        prefill."""
        if not self.waiting or (not self.free_slots and all(seq.placement.slot is None for seq in self.waiting)):
            return []
        budget, free = self.prefill_token_budget, len(self.free_slots)
        shorts, tokens = [], 0
        for seq in self.waiting:
            n, pinned = len(seq.prompt_token_ids), seq.placement.slot is not None
            if n <= budget and tokens + n <= budget and (pinned or free > 0):
                shorts.append(seq)
                tokens += n
                free -= not pinned
        longs = [seq for seq in self.waiting if len(seq.prompt_token_ids) > budget
                 and (seq.placement.slot is not None or self.free_slots)]
        if shorts and not (self.long_owed and longs):
            chosen, self.long_owed = shorts, bool(longs)
        else:
            chosen, self.long_owed = longs[:1], False
        for seq in chosen:
            self.waiting.remove(seq)
            seq.slot = seq.placement.slot if seq.placement.slot is not None else heapq.heappop(self.free_slots)
            seq.status = Status.RUNNING
            self.running[seq.slot] = seq
        return chosen

    def release(self, seq: Sequence) -> None:
        """A finished or aborted request gives its slot back (a reserved slot stays reserved)."""
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            if seq.placement.slot is None:
                heapq.heappush(self.free_slots, seq.slot)
        seq.slot = None

    def reserve_slot(self) -> int | None:
        """Take a free slot out of the pool until unreserve_slot (None if none is free)."""
        if not self.free_slots:
            return None
        self.reserved += 1
        return heapq.heappop(self.free_slots)

    def unreserve_slot(self, slot: int) -> None:
        self.reserved -= 1
        heapq.heappush(self.free_slots, slot)

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running.values(), *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def remove_waiting(self, seq: Sequence) -> None:
        self.waiting.remove(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)
