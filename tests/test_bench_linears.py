"""bench/gpu/bench_linears.py --cpu runs end to end under Triton's interpreter: every format's kernel is checked
against the reference dequantiser and F.linear before it is timed (a wrong kernel fails the run), the JSON and the
table are written, and resident bytes stay within 1.05x the file's. The interpreter's times are not checked."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_linears_cpu_mode_runs(tmp_path):
    pytest.importorskip("triton")
    cmd = [sys.executable, os.path.join(ROOT, "bench", "gpu", "bench_linears.py"), "--cpu", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    report = json.loads((tmp_path / "bench_linears.json").read_text())
    assert report["interpreter"] and report["all_checks_pass"]
    formats = {"fp16", "exl2_2.5", "exl2_4.0", "exl2_6.0", "gptq_4bit_g128", "gguf_Q4_K"}
    assert {t["format"] for t in report["timings"]} == formats
    assert {t["M"] for t in report["timings"]} == {1, 40}
    checked = {k.split()[0] for k in report["checks"]}
    assert checked == formats - {"fp16"}
    for fmt in formats - {"fp16"}:
        assert report["resident"][fmt]["ratio"] <= 1.05, (fmt, report["resident"][fmt])
    bpw = {f: report["resident"][f]["bits_per_weight"] for f in ("exl2_2.5", "exl2_4.0", "exl2_6.0")}
    assert bpw["exl2_2.5"] < bpw["exl2_4.0"] < bpw["exl2_6.0"]
    md = (tmp_path / "bench_linears.md").read_text()
    assert "| exl2_4.0 | tiny (128x256) | 1 | fused* |" in md and "all pass" in md
