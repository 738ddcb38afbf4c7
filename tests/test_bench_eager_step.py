"""bench/bench_eager_step.py runs as its docstring shows (a few steps, times not checked): both sides of each row,
the general forward and the short path, and their ratio."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_eager_step_runs(smollm2_gguf):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_eager_step.py"), "-m", smollm2_gguf, "--steps", "3",
           "--reps", "1", "--dynamic", "2", "--tokens", "4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = re.findall(r"^\| (eager step, ms|dynamic generator, 2 job\(s\), tok/s) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+)x \|$",
                      r.stdout, re.M)
    assert [row[0] for row in rows] == ["eager step, ms", "dynamic generator, 2 job(s), tok/s"], r.stdout
    assert all(float(v) > 0 for row in rows for v in row[1:])
