"""SmolLM2-135M Q4_1 (GGUF architecture llama) against HF transformers' own GGUF loader."""

import json
import os

import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from gguf import GGMLQuantizationType

from exllamav2.gguf import GGUFFile, convert_gguf_to_hf
from test_gguf_support import (assert_config_matches_hf, assert_tensors_match_hf, hf_model_from_gguf,
                               smollm2_path, stored_nbytes)


@pytest.fixture(scope="module")
def path():
    return smollm2_path()


@pytest.fixture(scope="module")
def gguf_file(path):
    return GGUFFile(path)


@pytest.fixture(scope="module")
def hf_model(path):
    return hf_model_from_gguf(path)


def test_tensors_equal_hf(gguf_file, hf_model):
    assert gguf_file.hf_config()["tie_word_embeddings"] is True
    assert_tensors_match_hf(gguf_file, hf_model)


def test_config_matches_hf(gguf_file, hf_model):
    cfg = gguf_file.hf_config()
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["rope_theta"] == 100000.0 and cfg["rope_scaling"] is None
    assert_config_matches_hf(cfg, hf_model)


def test_nbytes_and_dtype(path, gguf_file):
    total = 0
    for key in gguf_file.keys():
        assert gguf_file.nbytes(key) == stored_nbytes(gguf_file, key), key
        assert gguf_file.dtype(key) == torch.float32
        total += gguf_file.nbytes(key)
    # Tensor data fills the file after the header, up to alignment padding.
    assert 0 < os.path.getsize(path) - total < 8 * 1024 * 1024


def test_raw_rows_follow_hf_order(gguf_file):
    for key in ("model.layers.3.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                "model.layers.3.mlp.down_proj.weight"):
        type_name, data, shape = gguf_file.raw(key)
        assert type_name == gguf_file.ggml_type(key) and shape == gguf_file.shape(key)
        assert data.dtype == np.uint8 and data.nbytes == gguf_file.nbytes(key)
        values = dequantize(data, GGMLQuantizationType[type_name]).reshape(shape)
        assert torch.equal(torch.from_numpy(values), gguf_file.get_tensor(key))


def test_get_tensor_dtype_and_missing_key(gguf_file):
    t = gguf_file.get_tensor("model.norm.weight", dtype=torch.bfloat16)
    assert t.dtype == torch.bfloat16 and t.shape == (576,)
    with pytest.raises(KeyError, match="lm_head.weight"):
        gguf_file.get_tensor("lm_head.weight")


def test_convert_loads_in_transformers_with_equal_logits(gguf_file, hf_model, tmp_path):
    import transformers
    out = convert_gguf_to_hf(gguf_file, tmp_path / "hf", dtype=torch.float32, progress=False)
    with open(os.path.join(out, "generation_config.json")) as f:
        gen = json.load(f)
    assert gen["bos_token_id"] == 1 and gen["eos_token_id"] == 2
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 504, 3458, 282, 4649, 314, 253, 1345, 30]])
    with torch.inference_mode():
        expected = hf_model(ids).logits
        got = converted(ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
