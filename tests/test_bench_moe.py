"""bench/gpu/bench_moe.py --cpu runs end to end under Triton's interpreter (it checks the device-routed kernels
against the grouped path and a token alone against the batch before timing, and exits 1 when one fails); the
figures themselves are not checked."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_moe_cpu_mode_runs():
    pytest.importorskip("triton")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu", "bench_moe.py"), "--cpu"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "all checks passed" in r.stdout
    # two shapes, dense and EXL2 experts each
    assert sum(line.split()[:1] == ["5"] for line in r.stdout.splitlines()) == 4, r.stdout
    assert "exl2_4.0" in r.stdout
