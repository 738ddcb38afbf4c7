"""Whether the running decode step is one a CUDA graph captures, or a warm-up run for that capture.

Modules with a host-syncing path and a sync-free one (exllamav2/moe_mlp.py) ask `in_graph_step(x)`: true inside
`graph_step()` (runtime/cuda_graphs.py wraps the warm-up runs and the capture in it, so both take the same path and
everything the capture needs, Triton's compiled kernels and the experts' address tables, exists before it starts),
while a stream is being captured, and while torch.compile traces.
"""

from __future__ import annotations

import contextlib
import threading

import torch

_state = threading.local()


@contextlib.contextmanager
def graph_step():
    """Marks the steps run inside it (on this thread) as a captured graph's."""
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def in_graph_step(x: torch.Tensor) -> bool:
    return (getattr(_state, "depth", 0) > 0 or torch.compiler.is_compiling()
            or (x.is_cuda and torch.cuda.is_current_stream_capturing()))
