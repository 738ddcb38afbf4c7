"""bench/bench_dense_gemm.py runs as its docstring shows (small shapes, times not checked): a row per dtype and
shape with both rates and their ratio; a bad shape is refused naming the option."""

import os
import re
import subprocess
import sys

import pytest

from exllamav2.ops.cpu import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench", "bench_dense_gemm.py")


@pytest.mark.skipif(not kernels.ready(progress=False), reason="the C++ CPU kernels cannot be built here")
def test_bench_dense_gemm_runs():
    r = subprocess.run([sys.executable, BENCH, "--shapes", "16x64x48,9x2100x32", "--reps", "2",
                        "--dtypes", "bfloat16,float32"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^(bfloat16|float32)\s+(\d+x\d+x\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)x$", r.stdout, re.M)
    assert [(d, s) for d, s, *_ in rows] == [("bfloat16", "16x64x48"), ("bfloat16", "9x2100x32"),
                                             ("float32", "16x64x48"), ("float32", "9x2100x32")], r.stdout
    assert all(float(v) > 0 for row in rows for v in row[2:]), r.stdout


def test_bench_dense_gemm_refuses_a_bad_shape():
    r = subprocess.run([sys.executable, BENCH, "--shapes", "512x576"], capture_output=True, text=True, timeout=120,
                       cwd=ROOT)
    assert r.returncode != 0 and "--shapes" in r.stderr and "512x576" in r.stderr
