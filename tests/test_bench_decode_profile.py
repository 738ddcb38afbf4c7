"""bench/bench_decode_profile.py runs as its docstring shows (eager, a few steps, times not checked): it prints its
header line and the profiler's table, in which each of SmolLM2's 30 layers runs its attention and MLP blocks as one
op each (csrc/decode_block.cpp, whose GEMVs the profiler does not see), the head's GEMV and the token embedding's C++
row lookup once per step."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_decode_profile_runs(smollm2_gguf):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_decode_profile.py"), "-m", smollm2_gguf, "--steps", "3",
           "--rows", "40"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "eager, 3 decode steps, 2 threads" in r.stdout, r.stdout
    calls = {m[1]: int(m[2]) for m in re.finditer(r"^\s*(exllamav2_cpu::\w+)\s.*?\s(\d+)\s*$", r.stdout, re.M)}
    from exllamav2.ops.cpu import kernels
    if kernels.ready():
        assert calls.get("exllamav2_cpu::attn_decode_block") == calls.get("exllamav2_cpu::mlp_decode_block") == 3 * 30
        assert calls.get("exllamav2_cpu::gguf_gemv") == 3 and calls.get("exllamav2_cpu::gguf_rows") == 3, calls
    else:   # no compiler here: torch's own ops run, and the table names those
        assert not calls, calls
