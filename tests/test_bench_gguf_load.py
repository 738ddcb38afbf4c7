"""bench/bench_gguf_load.py runs as its docstring shows on the shipped SmolLM2 GGUF (times not checked): it prints
the start-up line and, with --quality, an accuracy line whose figures are in range."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_gguf_load_runs(smollm2_gguf):
    cmd = [sys.executable, os.path.join(ROOT, "bench", "bench_gguf_load.py"), "-m", smollm2_gguf, "--quality"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"config [\d.]+ s \| tokenizer [\d.]+ s \| load [\d.]+ s \| first forward [\d.]+ s \| peak RSS \d+ MB",
                     r.stdout), r.stdout
    m = re.search(r"logits ([\d.]+)% relative, top-1 ([\d.]+)%, perplexity .* \(([-+\d.]+)%\)", r.stdout)
    assert m and float(m[1]) < 5 and float(m[2]) > 85 and abs(float(m[3])) < 1, r.stdout
