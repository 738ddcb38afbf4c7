"""examples/steering.py and examples/probing.py run end to end on SmolLM2 (subprocess, few tokens)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name, *args):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), "--threads", "1", *args],
                       capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_steering_example(smollm2_gguf, tmp_path):
    path = str(tmp_path / "v.safetensors")
    out = run_example("steering.py", "--tokens", "6", "--layer", "15", "--save", path)
    assert "steering vector: layer 15" in out and os.path.exists(path)
    assert out.count("unsteered:") == 1 and "scale +4:" in out and "scale -4:" in out
    from exllamav2.interventions import SteeringVectors
    assert SteeringVectors.load(path).layers == [15]


def test_probing_example(smollm2_gguf):
    out = run_example("probing.py", "--tokens", "5", "--layers", "0,15")
    assert "blocks.15.resid_post: (5, 576)" in out
    assert out.count("held-out accuracy") == 2
