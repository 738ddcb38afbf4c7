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


def compile_step(decoder, progress: bool = True, mode: str = "max-autotune-no-cudagraphs"):
    """The compiled decode step, compiled now (two warm-up calls: the second one settles the dynamic length)."""
    import torch._inductor.config as inductor_config
    set_inductor_cache_dir()
    inductor_config.freezing = True
    fn = torch.compile(decoder.step, mode=mode, dynamic=True, fullgraph=True)
    ids = torch.zeros(decoder.batch_size, 1, dtype=torch.long)
    with _Ticker("Compiling the decode step (cached on disk after the first time)", progress), torch.inference_mode():
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
