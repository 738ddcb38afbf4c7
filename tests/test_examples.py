"""The scripts in examples/ run as written (small token counts)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", name), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)


def test_generate_example(smollm2_gguf):
    r = run_example("generate.py", "--tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time,") and "[stopped:" in r.stdout


def test_chat_example(smollm2_gguf):
    r = run_example("chat.py", "--tokens", "6")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("Assistant:") == 2
