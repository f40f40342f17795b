"""The two halves of the eval. Tuning: the synthetic suite in its "tuning" wording (village filler, the original
phrasings), seeds from 0. Report: the suite in its "report" wording (city filler, other needle, key and question
phrasings), seeds from 1000, plus the real-text documents. Defaults are chosen on the tuning split only; the
README and benchmarks/results report only the report split.

Lengths are 1K, 2K, 4K and 8K tokens (8K = 8064, so the full cache still has room for 128 new tokens in
SmolLM2's 8,192 positions); long cases cost most on CPU, so the report has fewer of them.
"""

from __future__ import annotations

from benchmarks.eval.documents import document_cases
from benchmarks.eval.tasks import SUITE, Case, make_case

LENGTHS = (1024, 2048, 4096, 8064)
REPORT_SEED = 1000
# cases per task at each length: 8 tasks x 24 = 192 synthetic report cases, plus the 15 documents: 207
REPORT_PER_LENGTH = {1024: 9, 2048: 8, 4096: 5, 8064: 2}
TUNING_PER_LENGTH = {1024: 2, 2048: 2, 4096: 1}


def synthetic(count, split: str, per_length: dict[int, int], first_seed: int, tasks=SUITE) -> list[Case]:
    return [make_case(task, first_seed + seed, length, None, count, split)
            for length, n in per_length.items() for task in tasks for seed in range(n)]


def tuning_cases(count, per_length: dict[int, int] = TUNING_PER_LENGTH, tasks=SUITE) -> list[Case]:
    return synthetic(count, "tuning", per_length, 0, tasks)


def report_cases(count, per_length: dict[int, int] = REPORT_PER_LENGTH, tasks=SUITE,
                 documents: bool = True) -> list[Case]:
    return synthetic(count, "report", per_length, REPORT_SEED, tasks) + (document_cases(count) if documents else [])
