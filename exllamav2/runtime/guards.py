"""Calling a compiled decode step without re-checking dynamo's guards at every token.

Before each call of a compiled function, dynamo checks its guards: the dtype, shape and strides of every tensor the
step reads (every weight of the model) and the Python state the trace depended on. For SmolLM2 that is about 1.5 ms
of a ~7 ms CPU step. `torch.compiler.set_stance(skip_guard_eval_unsafe=True)` skips them, keeping only the checks
that tell the step's own graphs apart (a position of 1 against the general one, say); it is unsafe only for an input
of a kind the step has never run with, which would run a graph made for another kind instead of compiling a new one.

`TrustedSteps` makes that safe for the runners (runtime/decode.py, runtime/paged_decode.py): a call skips the guards
only when a call of the same kind already ran with them, the kind being what the runner knows changes the graph (the
step itself, batch bucket, cache class, shape, dtype and device, whether the position is 0, 1 or more) together with
the process state a trace reads (the ops' backend choice and batch invariance, grad and inference mode, the default
dtype). Anything else a trace depends on (a module's attributes, a weight's dtype or shape) is fixed once the model
is loaded; `model.unload()` drops the runner. `EXLLAMAV2_DECODE_GUARDS=1` (or `check_guards=True` on the runner)
checks every call, for debugging.
"""

from __future__ import annotations

import os

import torch

from ..ops import dispatch
from .compile import call_tracing


def process_state() -> tuple:
    """What, outside the step's arguments, a decode step's trace reads and a user may change between calls."""
    return (dispatch._generation, dispatch._batch_invariant, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), torch.get_default_dtype())


def cache_kind(cache) -> tuple:
    """The plain or quantized cache's class, shape, dtype and device: its tensors' shapes are baked into a graph."""
    k = cache.key_states[0]
    return (type(cache), cache.batch_size, cache.max_seq_len, len(cache.key_states), tuple(k.shape), k.dtype,
            k.device)


def guards_forced() -> bool:
    return os.environ.get("EXLLAMAV2_DECODE_GUARDS", "").strip().lower() in ("1", "true", "yes", "on")


class TrustedSteps:
    """Remembers which kinds of call have run with dynamo's guards checked; later calls of those kinds skip them."""

    def __init__(self, check_guards: bool = False):
        self.check_guards = check_guards or guards_forced()
        self._seen: set = set()
        self.skipped = 0  # calls that ran with the guards skipped (tests read it)

    def call(self, step, kind: tuple, *args):
        key = (id(step), kind, process_state())
        if not self.check_guards and key in self._seen:
            self.skipped += 1
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return step(*args)
        out = call_tracing(step, *args)
        self._seen.add(key)
        return out

    def forget(self) -> None:
        self._seen.clear()
