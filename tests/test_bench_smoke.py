"""The CPU benchmark runs end to end (a tiny run: it guards the script, not the figures). `pytest -m slow`."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_cpu_runs():
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_cpu.py"), "--reps", "1", "--tokens", "4",
           "--prefill", "16", "--batch", "2", "--no-llamacpp"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for row in ("seed API eager", "HF transformers bf16", "dynamic generator eager", "vs loop"):
        assert row in r.stdout, r.stdout
