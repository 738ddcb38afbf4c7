"""Calling a compiled decode step without re-checking dynamo's guards at every token.

Before each call of a compiled function, dynamo checks its guards: the dtype, shape and strides of every tensor the
step reads (every weight of the model) and the Python state the trace depended on. For SmolLM2 that is about 1.5 ms
of a ~7 ms CPU step. `torch.compiler.set_stance(skip_guard_eval_unsafe=True)` skips them, keeping only the checks
that tell the step's own graphs apart (a position of 1 against the general one, say); it is unsafe only for an input
of a kind the step has never run with, which would run a graph made for another kind instead of compiling a new one.

`TrustedSteps` makes that safe for the runners (runtime/decode.py, runtime/paged_decode.py): a call skips the guards
only when a call of the same kind already ran with them, the kind being what the runner knows changes the graph (the
step itself, batch bucket, cache class, shape, dtype and device, whether the position is 0, 1 or more) together with
the process state a trace reads (the ops' backend choice, batch invariance and CPU activation mode, grad and
inference mode, the default dtype). Anything else a trace depends on (a module's attributes, a weight's dtype or
shape) is fixed once the model is loaded; `model.unload()` drops the runner. `EXLLAMAV2_DECODE_GUARDS=1` (or
`check_guards=True` on the runner) checks every call, for debugging.

Skipping the guards still left dynamo's frame evaluation at every call (the cache lookup, the differentiating
guards, the no-aliasing check over the cache's tensors): ~0.3 ms of a ~4.2 ms SmolLM2 Q4_0 step. So after the
checked call of a kind, `direct_frame` takes the code dynamo ran for it (the compiled graph's caller), verifies
with that entry's own guards that it is the one for these arguments, and later calls of the kind run that code
as a plain function: the same graph, without dynamo. A step that compiled as several graphs (a graph break) keeps
dynamo, which must compile and guard the frames after each break.
"""

from __future__ import annotations

import os
import types

import torch

from ..ops import dispatch
from .compile import call_tracing


def process_state() -> tuple:
    """What, outside the step's arguments, a decode step's trace reads and a user may change between calls."""
    return (dispatch._generation, dispatch._batch_invariant, dispatch._cpu_act_stages, torch.is_grad_enabled(),
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
        self._direct: dict = {}  # kind -> the code dynamo ran for it, as a plain function (direct_frame)
        self.skipped = 0  # calls that ran with the guards skipped (tests read it)
        self.direct = 0   # of those, calls that ran the compiled code without dynamo

    def call(self, step, kind: tuple, *args):
        key = (id(step), kind, process_state())
        if not self.check_guards:
            fast = self._direct.get(key)
            if fast is not None:
                self.skipped += 1
                self.direct += 1
                return fast(*args)
            if key in self._seen:
                self.skipped += 1
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return step(*args)
        out = call_tracing(step, *args)
        self._seen.add(key)
        if not self.check_guards:
            fast = direct_frame(getattr(step, "compiled", step), args)
            if fast is not None:
                self._direct[key] = fast
        return out

    def forget(self) -> None:
        self._seen.clear()
        self._direct.clear()


def direct_frame(step, args: tuple):
    """The code dynamo ran at the last call of compiled `step` (a `bind_model` function of `*args`), as a plain
    function of the same arguments; None where that cannot be had and verified.

    Dynamo keeps a list of (guards, code) entries per code object and moves the entry that ran to its front. The
    front entry is taken only when its guards accept `args` in the current state (the caller calls this right after
    the call, in the same modes), and when its code calls exactly one compiled graph and no resume function (after
    a graph break the frames that follow need dynamo to run compiled)."""
    orig = getattr(step, "_torchdynamo_orig_callable", None)
    if not isinstance(orig, types.FunctionType) or orig.__code__.co_varnames != ("args",) or orig.__code__.co_argcount:
        return None
    try:
        from torch._dynamo.eval_frame import _debug_get_cache_entry_list
        entries = _debug_get_cache_entry_list(orig.__code__)
        if not entries:
            return None
        entry = entries[0]
        names = entry.code.co_names
        if (sum(n.startswith("__compiled_fn") for n in names) != 1
                or any(n.startswith("__resume_at") for n in names)):
            return None
        free = zip(orig.__code__.co_freevars, orig.__closure__ or ())
        local = {"args": args, **{name: cell.cell_contents for name, cell in free}}
        if not entry.guard_manager.check(local):
            return None
    except Exception:  # another torch's internals: dynamo's own path serves
        return None
    return types.FunctionType(entry.code, orig.__globals__, orig.__name__, orig.__defaults__, orig.__closure__)
