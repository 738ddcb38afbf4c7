"""CPU thread count for inference: one thread per core this process may run on (decode GEMVs are bandwidth
bound and gained 1.3-2x from the second core on a 2-core machine; more threads than cores only add contention)."""

from __future__ import annotations

import os

import torch


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def configure_threads(n: int | None = None) -> int:
    """Set torch's intra-op threads to `n` (default: the usable cores); returns the count set."""
    n = n or usable_cores()
    torch.set_num_threads(n)
    return n
