"""Quality evals: offline long-context tasks (passkey, NIAH, RULER-style), scored by exact match, run under the
full cache, SnapKV and StreamingLLM from one shared prefill per prompt; fidelity metrics; the defaults sweep.

    .venv/bin/python -m benchmarks.eval --policies full,snapkv,streaming --budgets 128,256,512
    .venv/bin/python -m benchmarks.eval.tune
"""
