"""bench/bench_llamacpp.py end to end on SmolLM2 at a tiny size (`pytest -m slow`). llama.cpp itself takes 10+
minutes to build (bench/setup_llamacpp.sh), so here a script stands in for llama-bench, printing its JSON output
format; the test checks our rows are measured and the llama.cpp figures are read and compared."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_llamacpp_table(tmp_path):
    fake = tmp_path / "llama-bench"
    fake.write_text("#!/bin/sh\n"
                    "echo '[{\"n_prompt\": 16, \"n_gen\": 0, \"avg_ts\": 400.0}, "
                    "{\"n_prompt\": 0, \"n_gen\": 4, \"avg_ts\": 50.0}]'\n")
    fake.chmod(0o755)
    (tmp_path / "llama-quantize").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "llama-quantize").chmod(0o755)
    r = subprocess.run([sys.executable, "bench/bench_llamacpp.py", "--llama-bench", str(fake), "--quants", "Q4_1",
                        "--reps", "1", "--tokens", "4", "--prefill", "16", "--batch", "2", "--no-generators"],
                       capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "2"},
                       timeout=900)
    assert r.returncode == 0, r.stderr
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| Q4_1")]
    assert len(rows) == 2, r.stdout
    ours, lc = (ln.split("|")[1:-1] for ln in rows)
    assert "ours eager" in ours[1] and float(ours[2]) > 0 and ours[3].strip().endswith("x")
    assert float(ours[4]) > 0 and float(ours[6]) > 0 and float(ours[8]) > 50   # batch, prefill, MB per step
    assert lc[1].strip() == "llama.cpp" and float(lc[2]) == 50.0 and float(lc[6]) == 400.0
    bad = subprocess.run([sys.executable, "bench/bench_llamacpp.py", "--llama-bench", str(tmp_path / "missing")],
                         capture_output=True, text=True, cwd=REPO, timeout=300)
    assert bad.returncode == 2 and "is not an executable" in bad.stderr


def test_bench_cpu_rope_table():
    """bench/bench_cpu_rope.py: one row per size and dtype with both timings and their ratio."""
    from exllamav2.ops.cpu import kernels
    if not kernels.ready():
        pytest.skip("the CPU kernels cannot be built here: the bench has nothing to time")
    r = subprocess.run([sys.executable, "bench/bench_cpu_rope.py", "--rows", "1,32", "--calls", "3"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = [ln.split("|")[1:-1] for ln in r.stdout.splitlines() if ln.startswith("| 1 ") or ln.startswith("| 32 ")]
    assert len(rows) == 4, r.stdout
    for row in rows:
        assert float(row[2]) > 0 and float(row[3]) > 0 and row[4].strip().endswith("x")


@pytest.mark.slow
def test_bench_compile_options_compares_two_steps(tmp_path):
    """bench/bench_compile_options.py on the tiny GGUF model: both steps timed, and the same logits."""
    sys.path.insert(0, str(REPO / "tests"))
    from test_gguf_support import write_tiny_gguf
    path = write_tiny_gguf(str(tmp_path / "tiny.gguf"), qtype="Q4_0", hidden=128, ffn=256, vocab=96)
    r = subprocess.run([sys.executable, "bench/bench_compile_options.py", "-m", path, "--options",
                        '{"cpp_wrapper": false}', "--reps", "1", "--tokens", "4"],
                       capture_output=True, text=True, cwd=REPO, timeout=900)
    assert r.returncode == 0, r.stderr
    assert "default: min" in r.stdout and "with {'cpp_wrapper': False}: min" in r.stdout
    assert "same logits: True" in r.stdout


def test_bench_prefill_line():
    """bench/bench_prefill.py: one line with a time for each activation mode."""
    r = subprocess.run([sys.executable, "bench/bench_prefill.py", "--tokens", "32", "--reps", "2", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert ".gguf int16 " in line and " int8 " in line and line.endswith(" ms"), line


def test_bench_quant_cache_decode_table():
    """bench/bench_quant_cache_decode.py --no-compile: a table row per cache with eager ms per step."""
    r = subprocess.run([sys.executable, "bench/bench_quant_cache_decode.py", "--context", "40", "--tokens", "3",
                        "--caches", "fp16,Q4", "--threads", "1", "--no-compile"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| fp16 ") or ln.startswith("| Q4 ")]
    assert len(rows) == 2 and all(float(ln.split("|")[2]) > 0 for ln in rows), r.stdout
    bad = subprocess.run([sys.executable, "bench/bench_quant_cache_decode.py", "--caches", "Q5"],
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "unknown Q5" in bad.stderr


def test_bench_gated_and_quantized_attention_op_tables():
    """bench/bench_cpu_gated.py and bench_quant_cache_decode.py --op: a row of times per case."""
    r = subprocess.run([sys.executable, "bench/bench_cpu_gated.py", "--rows", "1,16", "--calls", "3", "--threads", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 16 |")]
    assert len(rows) == 2 and all(ln.rstrip().endswith("x |") for ln in rows), r.stdout
    r = subprocess.run([sys.executable, "bench/bench_quant_cache_decode.py", "--op", "--context", "100"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln.split("|")[1].strip() for ln in r.stdout.splitlines() if ln.startswith("| ")] == ["q4", "q8", "fp8"]
