"""Keeping the decode loop's Python calls off a CPython stack-chunk boundary.

CPython 3.11-3.13 keep a thread's Python frames in chunks of 16 KiB and free a chunk (munmap) as soon as the frame
that opened it returns (python/cpython#142183; 3.14 keeps one spare chunk). A loop that calls across a chunk boundary
maps and unmaps a chunk, and faults its pages in again, on every call. Where the boundary falls depends only on how
deep the caller's stack is, so the same decode step ran at full speed from one script and slowly from another:
SmolLM2-135M on 2 threads, the compiled dynamic generator at 95-100 tok/s instead of 145-165 (151 page faults a
token), the eager seed loop 15.8 ms a token instead of 8.7 at one stack depth in about 135
(bench/README_PERF.md, session 10; tests/test_stack_chunk.py).

`fresh_stack_chunk` runs a function inside a frame too large for a 16 KiB chunk, so CPython opens a 128 KiB chunk
for it, and everything the function calls fits in the rest of that chunk: one chunk mapped per call, at a fixed
place, instead of one per inner call. Calls already inside such a frame (the generator's step calling
model.forward) run directly.
"""

from __future__ import annotations

import functools
import sys
import threading
import types

# Evaluation-stack slots of the anchoring frame (8 bytes each): ~57 KiB. CPython opens a chunk of at least the frame
# plus 1000 slots, rounded up to 16 KiB times a power of two: 128 KiB here, leaving ~70 KiB for the calls below it
# (a decode step needs a few KiB). Only the pages those frames touch are faulted in.
ANCHOR_SLOTS = 7200

NEEDED = sys.implementation.name == "cpython" and sys.version_info < (3, 14)

_local = threading.local()


def _run_anchored(fn, args, kwargs):
    _local.inside = True
    try:
        return fn(*args, **kwargs)
    finally:
        _local.inside = False


_run_anchored = types.FunctionType(_run_anchored.__code__.replace(co_stacksize=ANCHOR_SLOTS),
                                   _run_anchored.__globals__, "_run_anchored")


def fresh_stack_chunk(fn):
    """Decorator: `fn` and everything it calls run in a stack chunk of their own (see the module docstring)."""
    if not NEEDED:
        return fn

    @functools.wraps(fn)
    def anchored(*args, **kwargs):
        if getattr(_local, "inside", False):
            return fn(*args, **kwargs)
        return _run_anchored(fn, args, kwargs)

    return anchored
