"""Gemma-3-270M Q4_K_M (GGUF architecture gemma3) against HF transformers' own GGUF loader.
Opening this file's 262k-token vocabulary takes ~15 s a time, so the module shares its fixtures."""

import os

import pytest
import torch

from exllamav2.gguf import GGUFFile, convert_gguf_to_hf
from test_gguf_support import (assert_config_matches_hf, assert_tensors_match_hf, gemma3_path,
                               hf_model_from_gguf, stored_nbytes)



@pytest.fixture(scope="module")
def gguf_file():
    return GGUFFile(gemma3_path())


@pytest.fixture(scope="module")
def hf_model():
    return hf_model_from_gguf(gemma3_path())


def test_tensors_equal_hf(gguf_file, hf_model):
    assert_tensors_match_hf(gguf_file, hf_model)


def test_config_matches_hf(gguf_file, hf_model):
    cfg = gguf_file.hf_config()
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert cfg["sliding_window"] == 512 and cfg["sliding_window_pattern"] == 6
    assert cfg["query_pre_attn_scalar"] == 256 and cfg["rope_local_base_freq"] == 10000.0
    assert_config_matches_hf(cfg, hf_model)


def test_nbytes_match_ggml_block_sizes(gguf_file):
    types = set()
    for key in gguf_file.keys():
        assert gguf_file.nbytes(key) == stored_nbytes(gguf_file, key), key
        types.add(gguf_file.ggml_type(key))
    assert {"Q4_K", "Q6_K", "Q8_0", "F32"} <= types


def test_convert_loads_in_transformers_with_equal_logits(gguf_file, hf_model, tmp_path):
    import transformers
    out = convert_gguf_to_hf(gguf_file, tmp_path / "hf", dtype=torch.float32, progress=False)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[2, 818, 5279, 529, 7001, 563, 496, 6207, 236761]])
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids).logits, hf_model(ids).logits, rtol=0, atol=1e-4)
