"""Host-sync checks for the decode steps (the shape a CUDA-graph capture needs, exllamav2/runtime/).

`SyncTrace` records every op a thread dispatches at the top level (ops inside a custom op's body are not seen)
and every `Tensor.tolist()` call, which reads the data without dispatching anything (so `torch.bincount(x).tolist()`
leaves no op of its own). A host sync shows as `aten._local_scalar_dense` (`.item()`, `int(t)`), `Tensor.tolist`,
a data-dependent shape (`nonzero`, boolean indexing) or a tensor made from Python values (`lift_fresh`).

`tolist()` calls made inside the reference body of the `exllamav2::paged_decode_attention` custom op
(ops/torch_ref/attention.py, which walks each sequence's pages on the host) are left out, as the dispatch trace
leaves out every op inside a custom op: the GPU backend replaces that body with a kernel."""

from __future__ import annotations

import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from exllamav2.ops.torch_ref import attention as _reference_attention

SYNCS = ("aten._local_scalar_dense", "aten.nonzero", "aten.lift_fresh", "aten.equal", "aten.is_nonzero",
         "aten.masked_select", "aten.unique", "Tensor.tolist")


class SyncTrace(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        shapes = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        self.ops.append((str(func), shapes))
        return func(*args, **(kwargs or {}))

    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        trace = self

        def tolist(t, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename != _reference_attention.__file__:
                trace.ops.append(("Tensor.tolist", (tuple(t.shape),)))
            return trace._tolist(t, *args, **kwargs)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)


def host_syncs(ops) -> list:
    return [name for name, _ in ops if name.startswith(SYNCS)]
