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


_loaded: dict[tuple[str, bool], object] = {}
_mended = False


def _mend_interpreter() -> None:
    """The interpreter holds scalars as 1-element arrays and converts them to Python ints with int(array), which
    numpy >= 2.4 refuses for arrays that are not 0-d: any `range(a, b)` over a kernel argument or a loaded value
    then fails. Convert through .item() instead (the same value)."""
    global _mended
    if _mended:
        return
    from triton.runtime import interpreter
    original = interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patch
    _mended = True


def kernels(name: str, interpret: bool | None = None):
    """The kernel module `exllamav2.ops.triton.<name>`, loaded on first use (see the module docstring), once per
    mode: `interpret` (default: the current TRITON_INTERPRET) picks interpreted or compiled kernels, so a process
    that runs interpreter tests can still compile the same kernels ahead of time, and the other way round."""
    mode = interpreting() if interpret is None else bool(interpret)
    mod = _loaded.get((name, mode))
    if mod is None:
        if mode:
            _mend_interpreter()
        spec = importlib.util.find_spec(f"{__name__}.{name}")
        if spec is None:
            raise ModuleNotFoundError(f"no Triton kernel module {__name__}.{name}")
        mod = importlib.util.module_from_spec(spec)
        before = os.environ.get("TRITON_INTERPRET")
        os.environ["TRITON_INTERPRET"] = "1" if mode else "0"  # read by @triton.jit as the module runs
        try:
            spec.loader.exec_module(mod)
        finally:
            if before is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = before
        _loaded[(name, mode)] = mod
    return mod


def kernel_modules() -> list[str]:
    """Names of the modules in this package that declare kernels for the ahead-of-time compile check (AOT_SPECS:
    a list of {"kernel": name, "signature": {arg: type}, "constexprs": {arg: value}}, optionally "num_warps")."""
    import pkgutil
    names = []
    for info in pkgutil.iter_modules(__path__):
        spec = importlib.util.find_spec(f"{__name__}.{info.name}")
        with open(spec.origin, encoding="utf-8") as f:
            if "\nAOT_SPECS" in f.read():
                names.append(info.name)
    return sorted(names)
