"""The device a Triton kernel check runs on, as a pytest fixture (`kdev`): the CPU under TRITON_INTERPRET=1
(always) and a CUDA GPU when there is one (compiled kernels; skipped otherwise), so the same checks verify the
kernels on a GPU. Import it into a test module: `from triton_devices import kdev  # noqa: F401`."""

from __future__ import annotations

import sys

import pytest
import torch

from exllamav2 import ops

ATTN_KERNELS = "exllamav2.ops.triton.attn_kernels"


@pytest.fixture(params=["interpreter", "cuda"])
def kdev(request, monkeypatch):
    pytest.importorskip("triton")
    if request.param == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("no CUDA device")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    # the kernel module reads TRITON_INTERPRET when it is imported
    sys.modules.pop(ATTN_KERNELS, None)
    ops.set_backend(None)
    yield "cuda" if request.param == "cuda" else "cpu"
    sys.modules.pop(ATTN_KERNELS, None)
    ops.set_backend(None)
