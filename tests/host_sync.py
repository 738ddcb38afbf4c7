"""A host-sync check that also sees `Tensor.tolist()`: test_decode_static.Trace records dispatched ops, but
`tolist()` reads the data without dispatching anything (so `torch.bincount(x).tolist()` leaves no sync op).

Calls made inside the reference body of the `exllamav2::paged_decode_attention` custom op (ops/torch_ref/
attention.py, which walks each sequence's pages on the host) are left out, as the dispatch trace leaves out every
op inside a custom op: the GPU backend replaces that body with a kernel."""

from __future__ import annotations

import sys

import torch

from exllamav2.ops.torch_ref import attention as _reference_attention

from test_decode_static import Trace, syncs


class SyncTrace(Trace):
    """Trace that records each `Tensor.tolist()` call as an op named `Tensor.tolist`."""

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
    return syncs(ops) + [name for name, _ in ops if name == "Tensor.tolist"]
