"""torch.compile of the decode step: max-autotune-no-cudagraphs with inductor freezing (constant-folds and
prepacks the weights), dynamic sequence length, inductor's cache kept on disk so the compile is paid once."""

from __future__ import annotations

import os
import sys
import threading
import time

import torch

DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "exllamav2", "inductor")


def set_inductor_cache_dir(path: str | None = None) -> str:
    """Point inductor's on-disk cache at ~/.cache/exllamav2/inductor unless the user chose another."""
    path = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or path or DEFAULT_CACHE_DIR
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    return path


# Inductor's C++ GEMM template streams the frozen, prepacked weights about twice as fast as oneDNN at M=1, but
# autotuning picks between the two by timing them hot in cache, and on a busy machine those timings are noise (a
# stalled OpenMP barrier reads as 8 ms for every choice); the pick is then cached on disk. Offering the template
# alone makes the choice deterministic.
INDUCTOR_OPTIONS = {
    "max_autotune": True,
    "max_autotune_gemm_backends": "CPP",
}


def compile_step(decoder, progress: bool = True, options: dict | None = None):
    """The compiled decode step, compiled now for one row and, when the decoder holds more, for a batch
    (two warm-up calls per shape: the second one settles the dynamic length). Where the C++ template cannot
    take some matmul (no micro-kernel for that weight kind or shape), the step is compiled again with ATen
    kernels offered beside it."""
    import torch._inductor.config as inductor_config
    set_inductor_cache_dir()
    # freezing (constant weights, folded and prepacked) is read outside the per-compile option patch
    inductor_config.freezing = True
    # every decoder's step shares FastDecoder.step's code object and adds 2-4 graphs (its own frozen weights, one
    # row and a batch); dynamo's default limit of 8 would silently run later decoders eagerly
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    opts = {**INDUCTOR_OPTIONS, **(options or {})}
    with _Ticker("Compiling the decode step (cached on disk after the first time)", progress), torch.inference_mode():
        try:
            return _compile_and_warm(decoder, opts)
        except Exception as e:   # inductor wraps NoValidChoicesError in its own error types
            if "NoValidChoicesError" not in repr(e) or "ATEN" in opts["max_autotune_gemm_backends"]:
                raise
        return _compile_and_warm(decoder, {**opts, "max_autotune_gemm_backends": "CPP,ATEN"})


def _compile_and_warm(decoder, opts: dict):
    fn = torch.compile(decoder.step, options=opts, dynamic=True, fullgraph=True)
    for b in (1,) if decoder.batch_size == 1 else (1, decoder.batch_size):
        ids = torch.zeros(b, 1, dtype=torch.long)
        for p in (1, 2):
            fn(ids, torch.tensor([p]), p + 1)
    return fn


class _Ticker:
    """Elapsed seconds on stderr while a long call runs."""

    def __init__(self, what: str, enabled: bool):
        self.what, self.enabled = what, enabled and sys.stderr is not None
        self._stop = threading.Event()

    def _run(self):
        t0 = time.time()
        while not self._stop.wait(1.0):
            sys.stderr.write(f"\r{self.what}: {time.time() - t0:.0f} s")
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
            sys.stderr.write(f"\r{self.what}: done in {time.time() - self.t0:.0f} s\n")
        return False
