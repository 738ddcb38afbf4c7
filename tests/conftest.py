"""Shared test set-up: CPU threads, the slow-test switch, and the real-model fixtures (installed from PyPI by
the test set-up, never downloaded at run time)."""

from __future__ import annotations

import os

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
