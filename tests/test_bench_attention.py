"""bench/gpu/bench_attention.py --cpu runs end to end under Triton's interpreter (it checks each kernel against the
reference before timing it, so a wrong kernel fails the run); the figures themselves are not checked."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_attention_cpu_mode_runs():
    pytest.importorskip("triton")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu", "bench_attention.py"), "--cpu", "--batches", "2",
           "--contexts", "300", "--prefill", "20"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(line.split()[:2] == ["2", "300"] for line in lines), r.stdout
    assert "prefill 20 tokens" in r.stdout and "EXLLAMAV2_TRITON_PREFILL=" in r.stdout
