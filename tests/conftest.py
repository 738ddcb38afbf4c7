"""Shared test set-up: CPU threads, the slow-test switch, and the real-model fixtures (installed from PyPI by
the test set-up, never downloaded at run time)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow check: run with `pytest -m slow` or RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def interpreter_dot_per_row():
    """The Triton interpreter's tl.dot is numpy's matmul, and numpy's float16 matmul gives a row a result that
    depends on its place in the block (numpy 2.4: a row's last bit differs between rows 3 and 0 of the same
    product); a GPU's MMA computes every row alike. So that the kernels' batch-invariance tests check the kernels
    and not numpy, the interpreter's dot runs one row at a time (each row through the same 1-row matmul)."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        yield
        return
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None or not hasattr(builder, "create_dot") or not hasattr(interpreter, "TensorHandle"):
        yield  # another interpreter layout: its dot runs as it is
        return
    whole = builder.create_dot

    def per_row(self, a, b, d, *args):
        rows = a.data.shape[-2]
        if rows == 1:
            return whole(self, a, b, d, *args)
        out = [whole(self, interpreter.TensorHandle(a.data[..., i:i + 1, :], a.dtype), b,
                     interpreter.TensorHandle(d.data[..., i:i + 1, :], d.dtype), *args) for i in range(rows)]
        return interpreter.TensorHandle(np.concatenate([o.data for o in out], axis=-2), out[0].dtype)

    builder.create_dot = per_row
    yield
    builder.create_dot = whole


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    from exllamav2.default_models import smollm2_gguf_path
    return smollm2_gguf_path()


@pytest.fixture(scope="session")
def gemma3_gguf() -> str:
    from exllamav2.default_models import gemma3_gguf_path
    return gemma3_gguf_path()


@pytest.fixture(scope="module")
def smollm2_default(smollm2_gguf):
    """SmolLM2 in its default weights (the GGUF's blocks packed, bf16 activations) and its tokenizer."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Config, ExLlamaV2Tokenizer
    cfg = ExLlamaV2Config(smollm2_gguf)
    cfg.max_seq_len = 512
    model = ExLlamaV2(cfg)
    model.load()
    return model, ExLlamaV2Tokenizer(cfg)
