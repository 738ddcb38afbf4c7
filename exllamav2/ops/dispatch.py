"""Backends and the choice between them.

Every op (linear, norm, rope, attention, paged attention, gated activation, sampling) has implementations in one or
more backends, tried in the order of `BACKENDS`. An implementation first says whether it takes a call: it returns
None to accept or a short reason to decline (a dtype, a device, a layout), and the next backend is tried. Plain
PyTorch (`torch`) takes everything and is the reference every other backend is tested against.

`EXLLAMAV2_BACKEND=torch|cpu|triton` in the environment, or `set_backend(name)` / `with use_backend(name):` from
Python, pins one backend: only it is tried, and an op it declines raises NoBackendError naming the op and the
reason. The choice per op and call signature is cached, so an eager call costs one dict lookup.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("triton", "cpu", "torch")
ENV_VAR = "EXLLAMAV2_BACKEND"


class NoBackendError(RuntimeError):
    """No backend accepted an op: the message names the op and what each backend said."""


def _parse(name: str | None, source: str) -> str | None:
    if name is None or name == "" or name == "auto":
        return None
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}: backend '{name}' is unknown; expected one of {', '.join(BACKENDS)} (or 'auto')")
    return name


_pinned: str | None = _parse(os.environ.get(ENV_VAR), ENV_VAR)
_generation = 0  # bumped whenever the choice changes; prepared kernels compare it to know they are stale


BATCH_INVARIANT_ENV = "EXLLAMAV2_BATCH_INVARIANT"


def _parse_batch_invariant(value, source: str) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
        return None
    if isinstance(value, bool):
        return value
    key = str(value).strip().lower()
    if key in ("1", "true", "on", "yes"):
        return True
    if key in ("0", "false", "off", "no"):
        return False
    raise ValueError(f"{source}: expected 1/on, 0/off or auto, got {value!r}")


# ops.set_batch_invariant: True, no kernel switches algorithm with the number of rows, at any cost; False, the
# fastest kernel for each row count; None (auto, the default): invariant wherever that is cheap, which is every CPU
# kernel with the C++ kernels built (packed GGUF/EXL2/GPTQ, and dense weights through their GEMV)
_batch_invariant: bool | None = _parse_batch_invariant(os.environ.get(BATCH_INVARIANT_ENV), BATCH_INVARIANT_ENV)


def set_batch_invariant(enabled: bool | None = True) -> None:
    global _batch_invariant
    _batch_invariant = _parse_batch_invariant(enabled, "set_batch_invariant")


CPU_ACTIVATIONS = {"int16": 2, "int8": 1}  # name -> the GGUF GEMV's activation stages (ops/cpu/csrc/gemv.cpp)
CPU_ACTIVATIONS_ENV = "EXLLAMAV2_CPU_ACTIVATIONS"


def _parse_cpu_activations(name: str | None, source: str) -> int:
    key = (name or "").strip().lower()
    if key in ("", "auto"):
        return CPU_ACTIVATIONS["int16"]
    if key not in CPU_ACTIVATIONS:
        raise ValueError(f"{source}: CPU activations '{name}' are unknown; expected int16 (the default) or int8")
    return CPU_ACTIVATIONS[key]


_cpu_act_stages = _parse_cpu_activations(os.environ.get(CPU_ACTIVATIONS_ENV), CPU_ACTIVATIONS_ENV)


def set_cpu_activations(name: str) -> None:
    # read by the kernels at each call, so prepared kernels stay valid (a generation bump would re-prepare them and
    # make every compiled step recompile); compiled steps key their graphs on it (runtime/guards.py: process_state)
    global _cpu_act_stages
    _cpu_act_stages = _parse_cpu_activations(name, "set_cpu_activations")


def cpu_activation_stages() -> int:
    return _cpu_act_stages


def batch_invariant() -> bool:
    """Invariance asked for explicitly: every kernel, whatever it costs."""
    return _batch_invariant is True


def dense_gemv_every_call() -> bool:
    """The CPU's dense GEMV for every row count (invariant; the default), or oneDNN above its rows (opted out)."""
    return _batch_invariant is not False


def pinned_backend() -> str | None:
    return _pinned


def generation() -> int:
    return _generation


def set_backend(name: str | None) -> None:
    """Pin one backend (`torch`, `cpu`, `triton`), or None / "auto" for the normal order."""
    global _pinned, _generation
    _pinned = _parse(name, "set_backend")
    _generation += 1
    for op in _OPS.values():
        op.cache.clear()


@contextlib.contextmanager
def use_backend(name: str | None):
    """`with use_backend("torch"): ...` pins a backend for the block and restores the previous choice."""
    before = _pinned
    set_backend(name)
    try:
        yield
    finally:
        set_backend(before)


def active_backends() -> tuple[str, ...]:
    return (_pinned,) if _pinned is not None else BACKENDS


@dataclass
class Impl:
    backend: str
    fn: Callable
    declines: Callable | None  # (*args, **kwargs) -> None to accept, or a reason string


class Op:
    """One op: its implementations per backend, and a cache of the choice per call signature (`key_fn`)."""

    def __init__(self, name: str, key_fn: Callable):
        self.name = name
        self.key_fn = key_fn
        self.impls: dict[str, Impl] = {}
        self.cache: dict = {}

    def register(self, backend: str, fn: Callable, declines: Callable | None = None) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"op {self.name}: unknown backend '{backend}'")
        self.impls[backend] = Impl(backend, fn, declines)
        self.cache.clear()

    def choose(self, *args, **kwargs) -> Impl:
        reasons = []
        for b in active_backends():
            impl = self.impls.get(b)
            if impl is None:
                reasons.append(f"{b}: no implementation of this op")
                continue
            why = impl.declines(*args, **kwargs) if impl.declines is not None else None
            if why is None:
                return impl
            reasons.append(f"{b}: {why}")
        pin = f" (backend pinned to '{_pinned}')" if _pinned else ""
        raise NoBackendError(f"no backend accepts op '{self.name}'{pin}: " + "; ".join(reasons))

    def implementation(self, *args, **kwargs) -> Impl:
        """What a call with these arguments runs (the choice cached per `key_fn` outside compiled code)."""
        if torch.compiler.is_compiling():
            return self.choose(*args, **kwargs)
        key = self.key_fn(*args, **kwargs)
        impl = self.cache.get(key)
        if impl is None:
            impl = self.cache[key] = self.choose(*args, **kwargs)
        return impl

    def __call__(self, *args, **kwargs):
        return self.implementation(*args, **kwargs).fn(*args, **kwargs)


_OPS: dict[str, Op] = {}


def define_op(name: str, key_fn: Callable) -> Op:
    op = _OPS[name] = Op(name, key_fn)
    return op


def get_op(name: str) -> Op:
    return _OPS[name]


def describe() -> dict[str, list[str]]:
    """Per op, the backends that implement it, in the order they are tried."""
    return {name: [b for b in active_backends() if b in op.impls] for name, op in _OPS.items()}


def device_type(t: torch.Tensor) -> str:
    return t.device.type


def on_cpu(t: torch.Tensor) -> str | None:
    return None if t.device.type == "cpu" else f"tensor on {t.device}, this backend runs on the CPU"
