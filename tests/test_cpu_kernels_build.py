"""Building the CPU kernels at first use (exllamav2/ops/cpu/build.py): the on-disk cache, the one-line fallback to
torch's kernels when no compiler is found or the build fails, the switch-off, and the AVX2 path forced through the
environment. Each case runs in a fresh interpreter, since a loaded library cannot be unloaded."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from exllamav2.ops.cpu import build, kernels

REPO = Path(__file__).resolve().parents[1]

PREPARE = """
import torch, torch.nn.functional as F
from exllamav2 import ops
w = torch.randn(40, 64).bfloat16(); x = torch.randn(2, 64).bfloat16()
k1 = ops.prepare_linear(w, None, None, "cpu", torch.bfloat16)
k2 = ops.prepare_linear(w, None, None, "cpu", torch.bfloat16)
assert torch.equal(k1(x), F.linear(x, w))
print("KERNEL", type(k1).__name__, type(k2).__name__)
"""


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, cwd=REPO,
                          timeout=600)


def fallback_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if "CPU kernels unavailable" in ln]


@pytest.mark.parametrize("cxx, why", [("/nonexistent/bin/c++", "no C++ compiler: CXX=/nonexistent/bin/c++"),
                                      ("false", "false failed")])
def test_no_compiler_or_failed_build_keeps_torch_kernels_with_one_line(cxx, why, tmp_path):
    if cxx == "false" and shutil.which("false") is None:
        pytest.skip("no `false` command here")
    r = run_python(PREPARE, CXX=cxx, EXLLAMAV2_CPU_KERNEL_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "KERNEL DenseKernel DenseKernel" in r.stdout
    lines = fallback_lines(r.stderr)
    assert len(lines) == 1, r.stderr
    assert why in lines[0] and "using stock torch kernels" in lines[0]
    assert not any((tmp_path / "cache").rglob("*.so"))


def test_switched_off_builds_nothing_and_says_nothing(tmp_path):
    r = run_python(PREPARE, EXLLAMAV2_CPU_KERNELS="0", EXLLAMAV2_CPU_KERNEL_CACHE=str(tmp_path / "cache"))
    assert r.returncode == 0, r.stderr
    assert "KERNEL DenseKernel DenseKernel" in r.stdout and not fallback_lines(r.stderr)
    assert not (tmp_path / "cache").exists()


@pytest.mark.skipif(not kernels.ready(), reason="the CPU kernels cannot be built here")
def test_built_library_is_cached_and_reused():
    started = time.monotonic()
    lib = build.build(progress=False)
    assert time.monotonic() - started < 5  # no compile: the cached library (hash of sources, flags, torch)
    assert lib.is_file() and lib.parent.parent == build.cache_root()
    r = run_python(PREPARE)
    assert r.returncode == 0 and "KERNEL DenseGemvKernel DenseGemvKernel" in r.stdout, r.stderr
    assert "building CPU kernels" not in r.stderr


@pytest.mark.skipif(not kernels.ready() or kernels.isa() != "avx512", reason="needs the AVX-512 path to compare")
def test_avx2_path_forced_through_the_environment(tmp_path):
    code = """
import numpy as np, torch, sys
sys.path.insert(0, "tests")
from test_cpu_kernels import random_blocks
from exllamav2.ops.cpu import kernels
from exllamav2.ops.cpu.gguf_pack import pack_gguf_blocks
assert kernels.ready()
print("ISA", kernels.isa())
p = pack_gguf_blocks("Q4_1", random_blocks("Q4_1", 80, 192, seed=9), (80, 192))
x = torch.randn(3, 192, generator=torch.Generator().manual_seed(9)).bfloat16()
torch.save(kernels.gguf_gemv(x, p), sys.argv[1] if len(sys.argv) > 1 else "%s")
""" % (tmp_path / "out.pt")
    r = run_python(code, EXLLAMAV2_CPU_ISA="avx2")
    assert r.returncode == 0, r.stderr
    assert "ISA avx2" in r.stdout
    from test_cpu_kernels import random_blocks

    from exllamav2.ops.cpu.gguf_pack import pack_gguf_blocks
    p = pack_gguf_blocks("Q4_1", random_blocks("Q4_1", 80, 192, seed=9), (80, 192))
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(9)).bfloat16()
    assert torch.equal(torch.load(tmp_path / "out.pt"), kernels.gguf_gemv(x, p))
    bad = run_python("from exllamav2.ops.cpu import kernels; kernels.ready()", EXLLAMAV2_CPU_ISA="sse9")
    assert bad.returncode != 0 and "EXLLAMAV2_CPU_ISA: instruction set 'sse9' is unknown" in bad.stderr


@pytest.mark.slow
def test_cold_build_shows_progress_and_loads(tmp_path):
    """A cold build into an empty cache (45-110 s on 2 busy cores): one progress line, then the kernels work."""
    r = run_python("from exllamav2.ops.cpu import kernels, build; import time; t = time.monotonic(); "
                   "assert kernels.ready(); print('SECONDS', round(time.monotonic() - t))",
                   EXLLAMAV2_CPU_KERNEL_CACHE=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "building CPU kernels (once, ~" in r.stderr and "built CPU kernels in" in r.stderr
    assert len(list(tmp_path.rglob("exllamav2_cpu.so"))) == 1
