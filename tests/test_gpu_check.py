"""`make gpu-check` cannot rot between GPU sessions: its --dry-run runs the same script end to end on CPU with tiny
shapes (the CUDA tests on CPU, the decode benchmark against HF transformers, the prefill against the memory model)
and must produce every number it promises."""

import re
import subprocess
import sys

from tests.conftest import ROOT


def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    assert re.search(r"`pytest -q tests/test_cuda.py`: \d+ passed", report)
    for row in ("engine full", "engine SnapKV 32", "engine SnapKV 64", "HF StaticCache eager"):
        assert len(re.findall(rf"\| {row} \| \d+\.\d\d \|", report)) == 3, row  # one per context
    assert re.search(r"SnapKV 64: step at 2048 / step at 128 = \d+\.\d{3}", report)
    assert re.search(r"batch 8 / batch 1 tokens/s = \d+\.\d\dx", report)
    assert re.search(r"\| 2048 \| \d+\.\d\d \| \d+ \| [\d.]+ GiB \| [\d.]+ GiB \| [\d.]+ \|", report)
    for weights in ("float32", "int8", "int4"):  # section 5: one row per batch 1 and 8
        assert len(re.findall(rf"\| {weights} \| [18] \| \d+\.\d\d \| [\d.]+ \| [\d.]+ [KMG]?i?B \| \d+\.\d\dx \|",
                              report)) == 2, weights
    assert re.search(r"KV int8 \d+\.\d\d ms/step", report)
    assert "- within the prediction: yes" in report and "nothing: every number was measured" in report
    assert (tmp_path / "gpu_decode.png").stat().st_size > 10_000
