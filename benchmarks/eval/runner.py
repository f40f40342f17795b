"""The eval runner: build the cases (RULER-style suite + NIAH depth x length grid, report split by default),
prefill each prompt once,
answer it under every requested policy/budget, and append one JSONL row per (case, policy, budget) with the
exact-match score and the fidelity metrics against the full cache. Rows already in the file are skipped, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.eval.prefill_once import PrefilledPrompt, attention_recall, token_agreement
from benchmarks.eval.splits import REPORT_SEED
from benchmarks.eval.tasks import Case, make_case
from snapkv.config import POLICIES, SnapKVConfig

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = ROOT / "weights" / "SmolLM2-135M-Instruct"
RESULTS = ROOT / "benchmarks" / "results"
AGREEMENT_TOKENS = 64  # token agreement is measured over this many generated tokens
RECALL_STEPS = 8  # attention-mass recall uses the queries of this many generated tokens


def load_llm(model: str | Path, threads: int):
    """The engine's LLM on CPU, float32, with a bounded thread count (the machine is shared: oversubscribed
    OpenMP threads make everything several times slower) and 16 slots, so that many policies decode at once."""
    from engine import LLM

    path = Path(model)
    if not path.exists():
        raise SystemExit(f"error: model not found: {path} (run `make weights` to fetch the default model)")
    torch.set_num_threads(threads)
    return LLM(path, device="cpu", dtype="float32", max_batch_size=16)


def token_counter(llm):
    return lambda text: len(llm.tokenizer.encode(text, add_special_tokens=False))


def suite_cases(llm, tasks: list[str], lengths: list[int], seeds, split: str = "report") -> list[Case]:
    """Suite cases of a split (benchmarks.eval.splits): the report split's seeds start at 1000."""
    count, first = token_counter(llm), REPORT_SEED if split == "report" else 0
    return [make_case(task, first + seed, length, None, count, split) for length in lengths for task in tasks
            for seed in seeds]


def niah_grid_cases(llm, lengths: list[int], depths: list[float], seed: int = REPORT_SEED,
                    split: str = "report") -> list[Case]:
    count = token_counter(llm)
    return [make_case("niah", seed, length, depth, count, split) for length in lengths for depth in depths]


def answer_complete(llm, case: Case, tokens: list[int]) -> bool:
    """True once the output already holds every expected answer and ends on a non-alphanumeric character (so a
    number cannot still grow). Scores only grow with more text, so stopping here never changes a score."""
    text = llm.tokenizer.decode(tokens, skip_special_tokens=True).rstrip()
    return bool(text) and not text[-1].isalnum() and case.score(text) == 1.0


@dataclass(frozen=True)
class PolicySpec:
    """One column of the comparison: a policy at a budget (None for the full cache)."""
    policy: str
    budget: int | None
    cfg: SnapKVConfig | None

    @property
    def name(self) -> str:
        return "full" if self.budget is None else f"{self.policy}@{self.budget}"


def policy_specs(policies: list[str], budgets: list[int], base: SnapKVConfig) -> list[PolicySpec]:
    specs = []
    for policy in policies:
        if policy == "full":
            specs.append(PolicySpec("full", None, None))
            continue
        if policy not in POLICIES:
            raise SystemExit(f"error: unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
        for b in budgets:
            if b <= base.window:
                raise SystemExit(f"error: budget {b} must exceed the SnapKV window ({base.window})")
            specs.append(PolicySpec(policy, b, SnapKVConfig(budget=b, window=base.window, kernel=base.kernel,
                                                            pooling=base.pooling, group_agg=base.group_agg,
                                                            policy=policy)))
    return specs


def row_key(case: Case, spec: PolicySpec) -> str:
    cfg = spec.cfg
    knobs = "" if cfg is None or cfg.policy in ("streaming", "full") else \
        f"|w{cfg.window}k{cfg.kernel}{cfg.pooling}{cfg.group_agg}"
    return f"{case.key}|{spec.name}{knobs}"


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                raise SystemExit(f"error: {path}:{n} is not valid JSON; delete that line (an interrupted write?) "
                                 "and run again") from None
    return rows


def evaluate(llm, cases: list[tuple[str, Case]], specs: list[PolicySpec], out: Path, progress=None,
             max_tokens: int = AGREEMENT_TOKENS) -> list[dict]:
    """Run every (group, case) under every spec, appending new rows to `out`; returns the rows of this run
    (old and new). `progress(done, total, label)` is called after each case."""
    done_rows = {r["key"]: r for r in read_rows(out)}
    out.parent.mkdir(parents=True, exist_ok=True)
    result = []
    with out.open("a") as f:
        for i, (group, case) in enumerate(cases):
            keys = [row_key(case, s) for s in specs]
            if all(k in done_rows for k in keys):
                result += [done_rows[k] for k in keys]
                if progress:
                    progress(i + 1, len(cases), case.key)
                continue
            start = time.perf_counter()
            prefilled = PrefilledPrompt(llm, llm.encode_prompt(case.prompt, chat=True))
            prefill_s = time.perf_counter() - start
            # the full cache is always decoded: it is the reference for agreement and recall
            todo = [s for s, k in zip(specs, keys) if k not in done_rows and s.cfg is not None]
            ref = prefilled.decode(None, max_tokens, record_queries=True)
            # compressed policies decode together, one batch slot each (see PrefilledPrompt.decode_many)
            outs = prefilled.decode_many([s.cfg for s in todo], max_tokens) if todo else []
            decoded = dict(zip([s.name for s in todo], outs))
            for spec, key in zip(specs, keys):
                if key in done_rows:
                    result.append(done_rows[key])
                    continue
                out_ = ref if spec.cfg is None else decoded[spec.name]
                text = llm.tokenizer.decode(out_.token_ids, skip_special_tokens=True)
                recall = attention_recall(prefilled, ref.queries, out_.kept, RECALL_STEPS)
                kept = len(prefilled) if spec.cfg is None else sum(int((k >= 0).sum()) for k in out_.kept) / (
                    len(out_.kept) * out_.kept[0].shape[0])
                cfg = spec.cfg
                row = dict(key=key, group=group, task=case.task, seed=case.seed, length=case.length,
                           depth=case.depth, prompt_tokens=len(prefilled), policy=spec.policy, budget=spec.budget,
                           window=cfg and cfg.window, kernel=cfg and cfg.kernel, pooling=cfg and cfg.pooling,
                           group_agg=cfg and cfg.group_agg, kept_tokens=kept,
                           compression=round(len(prefilled) / kept, 2), answers=list(case.answers), output=text,
                           score=case.score(text),
                           agreement=token_agreement(ref.token_ids, out_.token_ids, AGREEMENT_TOKENS),
                           recall=[round(r, 4) for r in recall], prefill_s=round(prefill_s, 2))
                f.write(json.dumps(row) + "\n")
                f.flush()
                done_rows[key] = row
                result.append(row)
            if progress:
                progress(i + 1, len(cases), case.key)
    return result
