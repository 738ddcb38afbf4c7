"""Builds the CPU kernels (exllamav2/ops/cpu/csrc/*.cpp) with the machine's C++ compiler at first use, once per
machine and kernel version, and loads them into torch (they register `torch.ops.exllamav2_cpu.*`).

- Installing the package compiles nothing; `load_library()` does, the first time a CPU kernel is wanted.
- Cache: `$EXLLAMAV2_CPU_KERNEL_CACHE`, else `~/.cache/exllamav2/cpu_kernels`; one folder per hash of the sources,
  the compiler and its version, the flags and the torch version, so a changed source or torch rebuilds.
- Compiler: `$CXX`, else `c++`/`g++`/`clang++` on PATH.
- When no compiler is found or the build fails, `load_library()` returns None after ONE line on stderr; the `cpu`
  backend then keeps torch's own kernels. `EXLLAMAV2_CPU_KERNELS=0` switches the kernels off without a build.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

KERNEL_VERSION = 1
LIBRARY_NAME = "exllamav2_cpu"
SOURCES = ("gemv.cpp", "bf16_gemv.cpp", "small_ops.cpp", "attention.cpp", "attention_quant.cpp", "kv_quant_write.cpp",
           "decode_block.cpp",
           "gguf_pack.cpp", "gguf_rows.cpp", "gguf_lut_blocks.cpp")
CSRC = Path(__file__).parent / "csrc"
COLD_BUILD_SECONDS = 75  # a cold build on 2 idle cores (74 s for the 19 GGUF kinds, session 18; more on busy ones)
# -fopenmp: at::parallel_for is OpenMP inline in the header; the library then binds to the libgomp torch loaded
_FLAGS = ("-O3", "-std=c++20", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared", "-w")

_state: dict = {}
_lock = threading.Lock()


class KernelBuildError(RuntimeError):
    """The compiler is missing or the build failed; the message says which and how."""


def cache_root() -> Path:
    env = os.environ.get("EXLLAMAV2_CPU_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "exllamav2" / "cpu_kernels"


def find_compiler() -> str:
    cxx = os.environ.get("CXX")
    if cxx:
        path = shutil.which(cxx)
        if path is None:
            raise KernelBuildError(f"no C++ compiler: CXX={cxx} is not an executable on PATH")
        return path
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return path
    raise KernelBuildError("no C++ compiler: set CXX or install g++ (none of c++, g++, clang++ is on PATH)")


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError) as e:
        raise KernelBuildError(f"the C++ compiler {cxx} does not run: {e}") from e


def _compile_and_link(cxx: str, out: Path, work: Path) -> tuple[int, str]:
    """Each source to an object file, all at once (one per core: the torch headers dominate), then one link.
    (return code, compiler output)."""
    from torch.utils.cpp_extension import include_paths, library_paths
    inc = [f"-I{p}" for p in include_paths()]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"
    objs = [work / f"{Path(src).stem}.o" for src in SOURCES]
    procs = [subprocess.Popen([cxx, *_FLAGS, "-c", abi, *inc, str(CSRC / src), "-o", str(obj)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for src, obj in zip(SOURCES, objs)]
    outputs = [p.communicate()[0] for p in procs]
    failed = [(p.returncode, o) for p, o in zip(procs, outputs) if p.returncode != 0]
    if failed:
        return failed[0][0], "\n".join(outputs)
    libs = [f"-L{p}" for p in library_paths()]
    link = subprocess.run([cxx, *_FLAGS, *map(str, objs), *libs, "-lc10", "-ltorch_cpu", "-o", str(out)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return link.returncode, "\n".join(outputs) + link.stdout


def _build_key(cxx: str) -> str:
    h = hashlib.sha256()
    for s in sorted(p.name for p in CSRC.iterdir() if p.suffix in (".cpp", ".h")):
        h.update(s.encode() + (CSRC / s).read_bytes())
    h.update(" ".join((cxx, _compiler_version(cxx), *_FLAGS, torch.__version__, str(KERNEL_VERSION))).encode())
    return h.hexdigest()[:16]


def _ticker(stop: threading.Event, started: float) -> None:
    """A running count of seconds on a terminal, so a build does not look like a hang."""
    while not stop.wait(1.0):
        sys.stderr.write(f"\rexllamav2: building CPU kernels (once, ~{COLD_BUILD_SECONDS} s)... "
                         f"{time.monotonic() - started:.0f} s")
        sys.stderr.flush()


def build(progress: bool = True) -> Path:
    """The path of the built library, building it if it is not cached. Raises KernelBuildError."""
    cxx = find_compiler()
    target_dir = cache_root() / _build_key(cxx)
    lib = target_dir / f"{LIBRARY_NAME}.so"
    if lib.exists():
        return lib
    target_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if progress:
        sys.stderr.write(f"exllamav2: building CPU kernels (once, ~{COLD_BUILD_SECONDS} s) into {target_dir} ...")
        sys.stderr.flush()
    stop = threading.Event()
    tick = threading.Thread(target=_ticker, args=(stop, started), daemon=True) if progress and sys.stderr.isatty() else None
    if tick:
        tick.start()
    # build under a temporary name and rename: a concurrent process never loads a half-written library
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target_dir)
    os.close(fd)
    try:
        with tempfile.TemporaryDirectory(dir=target_dir) as work:
            rc, log = _compile_and_link(cxx, Path(tmp), Path(work))
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise KernelBuildError(f"the C++ compiler {cxx} could not be started: {e}") from e
    finally:
        stop.set()
        if tick:
            tick.join()
    if rc != 0:
        Path(tmp).unlink(missing_ok=True)
        (target_dir / "build.log").write_text(log)
        first = next((ln for ln in log.splitlines() if "error" in ln), log.strip()[:300])
        if progress:
            sys.stderr.write(" failed\n")
        raise KernelBuildError(f"the CPU kernel build with {cxx} failed ({first}); full log: {target_dir / 'build.log'}")
    os.replace(tmp, lib)
    if progress:
        lead = "\r" if tick else " "
        sys.stderr.write(f"{lead}exllamav2: built CPU kernels in {time.monotonic() - started:.0f} s ({lib})\n")
        sys.stderr.flush()
    return lib


def disabled_reason() -> str | None:
    if os.environ.get("EXLLAMAV2_CPU_KERNELS", "1").strip().lower() in ("0", "off", "false", "no"):
        return "EXLLAMAV2_CPU_KERNELS is off"
    if not hasattr(os, "uname") or os.uname().machine not in ("x86_64", "AMD64"):
        return "the kernels are written for x86-64 CPUs"
    return None


def load_library(progress: bool = True) -> bool:
    """Build (if needed) and load the kernels once per process. True when `torch.ops.exllamav2_cpu` is ready; False
    after one line on stderr saying why torch's own kernels run instead."""
    with _lock:
        if "ok" in _state:
            return _state["ok"]
        reason = disabled_reason()
        if reason is None:
            try:
                lib = build(progress)
                torch.ops.load_library(str(lib))
                _state["key"] = lib.parent.name
            except (KernelBuildError, OSError, RuntimeError) as e:
                reason = str(e)
        if reason is not None:
            sys.stderr.write(f"exllamav2: CPU kernels unavailable ({reason}); using stock torch kernels\n")
        _state["ok"] = reason is None
        _state["reason"] = reason
        return _state["ok"]


def loaded_key() -> str | None:
    """The hash of the loaded kernels' build (sources, compiler, flags, torch), None when none is loaded: graphs
    compiled against one build call its ops' schemas and must not be reused with another (runtime/compile.py)."""
    return _state.get("key") if _state.get("ok") else None


def unavailable_reason() -> str | None:
    """Why the kernels are not loaded (None when they are, or before load_library ran)."""
    return _state.get("reason")
