"""bench/gpu/bench_decode.py's CPU mode: the tiny EXL2 model built in the format both engines read, decoded through
the triton backend under the interpreter, the dynamic generator's concurrent jobs, HF beside it; so the GPU script
cannot rot (several minutes on 2 cores under the interpreter: `pytest -m slow`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_bench_decode_cpu_mode(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "gpu", "bench_decode.py"), "--cpu", "--out",
                        str(tmp_path), "--model-dir", str(tmp_path / "model")], env=env, capture_output=True,
                       text=True, timeout=1500)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads((tmp_path / "bench_decode.json").read_text())
    ours = rep["ours"]
    assert ours["decode_tok_s"] > 0 and ours["prefill_tok_s"] > 0 and ours["weight_bytes"] > 0
    assert ours["greedy_alone_equals_together"] is True
    assert rep["hf"]["decode_tok_s"] > 0
    assert "| ours |" in (tmp_path / "bench_decode.md").read_text()
