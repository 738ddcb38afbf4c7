"""The `triton` backend: GPU kernels written in Triton (linear.py: packed quantized matmuls; attention.py:
contiguous and paged attention).

It takes CUDA tensors when Triton is installed, and CPU tensors when TRITON_INTERPRET=1 is set (Triton's
interpreter runs the same kernels on the CPU, which is how the test suite checks them without a GPU). Kernel
modules are imported on first use, not with the package: `@triton.jit` decides at decoration time whether a
kernel is interpreted, so importing them early would fix that choice before a test or user sets the variable.
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import torch

_MISSING = None if importlib.util.find_spec("triton") is not None else "Triton is not installed (pip install triton)"


def interpreting() -> bool:
    """True when Triton's interpreter is on (TRITON_INTERPRET=1): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def declines_device(device: torch.device | str) -> str | None:
    """None when this backend can run kernels on `device`, else the reason it declines."""
    if _MISSING is not None:
        return _MISSING
    device = torch.device(device)
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if interpreting() else "CPU tensor, and TRITON_INTERPRET=1 is not set"
    return f"tensor on {device}, this backend runs on CUDA devices"


def declines(t: torch.Tensor, *args, **kwargs) -> str | None:
    """An op's `declines` hook: judged from its first tensor argument."""
    return declines_device(t.device)


def kernels(name: str):
    """The kernel module `exllamav2.ops.triton.<name>`, imported on first use (see the module docstring)."""
    return importlib.import_module(f"{__name__}.{name}")
