"""How much there is to read: non-blank, non-comment lines (docstrings included) per package, the core's total,
and the files of the path of one request in reading order (`make lines`; the README's "Reading the code")."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("engine", "models", "snapkv")
WINGS = ("fastattn", "formats", "parallel", "quant", "sessions", "server")
FRONT_ENDS = ("cli.py", "chat.py", "options.py", "compare.py", "kept_view.py")
# one request, top-down: the facade, its state, scheduling, the runner, the network, selection, storage, decode
READING_ORDER = ("engine/llm.py", "engine/sequence.py", "engine/scheduler.py", "engine/model_runner.py",
                 "models/llama.py", "models/attention.py", "engine/cache_views.py", "snapkv/config.py",
                 "snapkv/policies.py", "snapkv/select.py", "engine/kv_cache.py", "engine/decode_step.py",
                 "engine/sampler.py", "engine/sampling_params.py")
# beside the path: what refuses a request that cannot fit (positions, slot capacity, prefill memory), before it runs
CHECKS = ("engine/admission.py", "engine/memory_model.py")
CORE_GOAL, PATH_GOAL = 2000, 1300


def lines(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines()
               if line.strip() and not line.strip().startswith("#"))


def package(name: str) -> int:
    path = ROOT / name
    return lines(path) if path.is_file() else sum(lines(p) for p in sorted(path.rglob("*.py")))


def main() -> int:
    core = sum(package(p) for p in CORE)
    print("core (request -> schedule -> prefill -> select -> store -> decode)")
    for name in CORE:
        print(f"  {name + '/':<22}{package(name):>6}")
    print(f"  {'total':<22}{core:>6}   (goal <= {CORE_GOAL})")
    print("wings (act on the core through its seams)")
    for name in WINGS:
        print(f"  {name + '/':<22}{package(name):>6}")
    print("front ends")
    for name in FRONT_ENDS:
        print(f"  {name:<22}{package(name):>6}")
    print("the path of one request, in reading order")
    path = 0
    for name in READING_ORDER:
        n = lines(ROOT / name)
        path += n
        print(f"  {name:<26}{n:>6}")
    print(f"  {'total':<26}{path:>6}   (goal <= {PATH_GOAL})")
    print("beside it: the checks that refuse what cannot fit, before anything runs")
    for name in CHECKS:
        print(f"  {name:<26}{lines(ROOT / name):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
