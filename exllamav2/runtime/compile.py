"""torch.compile settings for the decode step: inductor's cache kept on disk so a compile is paid once per
machine, weight freezing, and a ticker that shows elapsed seconds while a long compile runs."""

from __future__ import annotations

import itertools
import os
import sys
import threading
import time
import types

import torch

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "exllamav2", "inductor")
KERNEL_CACHE_PREFIX = "exllamav2-kernels-"  # the per-kernel-build folder inside the inductor cache


def set_inductor_cache_dir(path: str | None = None) -> str:
    """Point inductor's on-disk cache at ~/.cache/exllamav2/inductor (or the user's TORCHINDUCTOR_CACHE_DIR), in a
    folder per build of the CPU kernels.

    Per build: a compiled graph calls the custom ops by their schema at compile time, and inductor's cache key does
    not cover custom ops' schemas, so a graph cached before a kernel update (an argument added) would be reused and
    fail at its first call. torch sets TORCHINDUCTOR_CACHE_DIR to its own default the first time it compiles; that
    value is not taken for the user's choice."""
    from ..ops.cpu import build
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        torch_default = os.path.abspath(default_cache_dir())
    except Exception:  # another torch's layout: any value set is taken as the user's
        torch_default = None
    if env and os.path.basename(os.path.normpath(env)).startswith(KERNEL_CACHE_PREFIX):
        env = os.path.dirname(os.path.normpath(env))  # set by an earlier call: its base
    user = env if env and os.path.abspath(env) != torch_default else None
    base = user or path or DEFAULT_CACHE_DIR
    key = build.loaded_key()
    path = os.path.join(base, KERNEL_CACHE_PREFIX + key) if key else base
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


# Inductor's C++ GEMM template streams the frozen, prepacked weights about twice as fast as oneDNN at M=1, but
# autotuning picks between the two by timing them hot in cache, and on a busy machine those timings are noise (a
# stalled OpenMP barrier reads as 8 ms for every choice); the pick is then cached on disk. Offering the template
# alone makes the choice deterministic.
#
# emulate_precision_casts: inductor otherwise keeps a fused chain of bf16 ops in fp32 and rounds once at the end;
# rounding where eager rounds makes the compiled step give eager's bits (SmolLM2, its GGUF weights: logits equal),
# and, with split_reductions off (a reduction is never split over threads differently for 1 row than for 8), a
# row's result the same in the graph for any batch size (the dynamic generator's per-size graphs rely on it).
#
# cpp_wrapper: the step's ~270 kernel and custom-op calls (SmolLM2) are made from generated C++ instead of a Python
# wrapper: the Q4_0 step 8% faster (4.43 -> 4.06 ms, both compiled in one process and timed alternately,
# bench/bench_compile_options.py; AMD EPYC, 2 threads), for ~60 s more on the first compile of a model on a machine
# (the wrapper is cached with the rest).
#
# size_asserts off: the wrapper otherwise checks every extern call's output sizes and strides against the trace
# (the custom ops' fake implementations, exllamav2/ops/cpu/kernels.py, already give them): ~0.35 us a call, the Q4_0
# step 3.65 -> 3.51 ms (median of 10 alternations, bench/bench_compile_options.py, same logits; AMD EPYC, 2 threads).
INDUCTOR_OPTIONS = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
    "emulate_precision_casts": True,
    "split_reductions": False,
    "cpp_wrapper": True,
    "size_asserts": False,
}


_serial = itertools.count()


def bind_model(fn, model, name: str):
    """`fn(model, *args)` as a function of `*args` alone, with a code object of its own (dynamo keeps one cache of
    graphs per code object: a copy per batch size keeps each size's graph static) and the model a free variable.

    Why: with the model passed as an argument, every call of the compiled step ran dynamo's prologue, which gathers
    the graph's ~400 input tensors (every weight, through the model's attributes) before the graph runs: ~0.2 ms of
    a ~4.5 ms SmolLM2 Q4_0 step. Reached through a closure and traced with dynamo's `install_free_tensors`
    (`call_tracing`), the weights become attributes of the graph instead: the same logits, the step 4-9% faster
    (bench/README_PERF.md, session 11). The weights are held by reference, so the graph sees in-place changes; a
    weight replaced by another tensor is not seen, which the runner already assumes (runtime/guards.py: fixed once
    the model is loaded; `model.unload()` drops the runner).

    The name gets a per-process serial: dynamo keeps what it learnt between compiles (which shapes changed, to make
    them dynamic) per file, line and code name, so two models' steps of one name would make each other's graphs
    dynamic (a second model in the same process then decoded with a slower, symbolic graph)."""
    def bound(*args):
        return fn(model, *args)
    name = f"{name}_{next(_serial)}"
    return types.FunctionType(bound.__code__.replace(co_name=name), bound.__globals__, name, None,
                              bound.__closure__)


def call_tracing(step, *args):
    """Call a compiled step where dynamo may trace it (its first call of a kind): the model's tensors, free
    variables of `bind_model`'s closure, are installed in the graph rather than gathered as inputs. Set around
    these calls only: changing dynamo's config costs ~4 us, and other torch.compile users keep their setting."""
    cfg = torch._dynamo.config
    old = cfg.install_free_tensors
    cfg.install_free_tensors = True
    try:
        return step(*args)
    finally:
        cfg.install_free_tensors = old


def configure_inductor(freeze: bool = False) -> None:
    """Process-wide settings the compiled step needs: the on-disk cache, weight freezing, and a recompile
    limit above dynamo's default of 8 (each model and batch shape adds graphs to the same step code).

    Freezing folds weights that are nn.Parameters into the graph as constants (inductor can then prepack them for
    its C++ GEMM template), but a frozen graph is never written to inductor's on-disk cache: every process pays
    the whole compile again (SmolLM2: ~95 s each time, against ~30 s from the cache without it, at the same decode
    speed for its packed 4-bit weights). Off by default."""
    import torch._inductor.config as inductor_config
    set_inductor_cache_dir()
    # read outside the per-compile option patch
    inductor_config.freezing = freeze
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


class Ticker:
    """Elapsed seconds on stderr while a long call runs."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled = what, enabled and sys.stderr is not None
        self._stop = threading.Event()

    def _run(self):
        # a terminal gets one line rewritten every second; a log file a line every 30 s
        tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
        t0 = time.time()
        while not self._stop.wait(1.0 if tty else 30.0):
            sys.stderr.write(f"\r{self.what}: {time.time() - t0:.0f} s" if tty else
                             f"{self.what}: {time.time() - t0:.0f} s\n")
            sys.stderr.flush()

    def __enter__(self):
        self.t0 = time.time()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self._stop.set()
            self._thread.join()
            tty = hasattr(sys.stderr, "isatty") and sys.stderr.isatty()
            sys.stderr.write(f"{chr(13) if tty else ''}{self.what}: done in {time.time() - self.t0:.0f} s\n")
        return False
