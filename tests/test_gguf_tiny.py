"""GGUF reading on tiny files written with the gguf library: HF parity for llama (GQA, untied head) and
gemma3 (norm offset, q/k norms), sharded conversion, metadata variants, and damaged or unsupported files."""

import json
import os

import pytest
import torch

import exllamav2.gguf.convert as convert_module
from exllamav2.gguf import GGUFError, GGUFFile, convert_gguf_to_hf
from test_gguf_support import assert_config_matches_hf, assert_tensors_match_hf, hf_model_from_gguf, write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"), tied=False)


@pytest.fixture(scope="module")
def tiny_gemma3(tmp_path_factory):
    # 7 layers so the 6-layer sliding/full pattern shows; head_dim 256 as Gemma 3 has (HF's default scalar).
    return write_tiny_gguf(str(tmp_path_factory.mktemp("gguf") / "tiny-gemma3.gguf"), arch="gemma3",
                           heads=2, kv_heads=1, head_dim=256, layers=7)


def test_llama_tensors_and_config_match_hf(tiny_llama):
    gguf_file = GGUFFile(tiny_llama)
    hf_model = hf_model_from_gguf(tiny_llama)
    assert "lm_head.weight" in gguf_file.keys()
    assert gguf_file.hf_config()["tie_word_embeddings"] is False
    assert_tensors_match_hf(gguf_file, hf_model)
    assert_config_matches_hf(gguf_file.hf_config(), hf_model)


def test_gemma3_tensors_and_config_match_hf(tiny_gemma3):
    gguf_file = GGUFFile(tiny_gemma3)
    hf_model = hf_model_from_gguf(tiny_gemma3)
    assert_tensors_match_hf(gguf_file, hf_model)
    cfg = gguf_file.hf_config()
    assert_config_matches_hf(cfg, hf_model)
    assert cfg["layer_types"][5] == "full_attention" and cfg["layer_types"].count("full_attention") == 1
    assert cfg["sliding_window_pattern"] == 6 and cfg["rope_local_base_freq"] == 10000.0
    # llama.cpp stores Gemma norms as 1 + w (the file's values sit near 2); HF's are w (near 1).
    for key in ("model.norm.weight", "model.layers.0.self_attn.q_norm.weight",
                "model.layers.6.post_feedforward_layernorm.weight"):
        type_name, data, shape = gguf_file.raw(key)
        stored = torch.from_numpy(data.view("float32").reshape(shape).copy())
        assert type_name == "F32" and abs(stored.mean().item() - 2.0) < 0.1
        assert torch.equal(gguf_file.get_tensor(key), stored - 1.0)


def test_sharded_conversion_loads_with_equal_logits(tiny_llama, tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setattr(convert_module, "SHARD_BYTES", 40_000)
    out = convert_gguf_to_hf(tiny_llama, tmp_path, dtype=torch.float32, progress=False)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all(os.path.isfile(os.path.join(out, s)) for s in shards)
    assert set(index["weight_map"]) == set(GGUFFile(tiny_llama).keys())
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = hf_model_from_gguf(tiny_llama)
    ids = torch.tensor([[1, 5, 9, 33, 60, 2]])
    with torch.inference_mode():
        torch.testing.assert_close(converted(ids).logits, reference(ids).logits, rtol=0, atol=1e-4)


def test_bf16_conversion_writes_bf16(tiny_gemma3, tmp_path):
    from safetensors import safe_open
    out = convert_gguf_to_hf(tiny_gemma3, tmp_path, progress=False)
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
        assert f.get_tensor("model.norm.weight").dtype == torch.bfloat16


def test_mistral_named_llama_file_reads_as_llama_like_hf(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "m.gguf"), name="Mistral 7B Instruct v0.3")
    cfg = GGUFFile(path).hf_config()
    hf_cfg = pytest.importorskip("transformers").AutoConfig.from_pretrained(str(tmp_path), gguf_file="m.gguf")
    assert cfg["model_type"] == hf_cfg.model_type == "llama"
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_rope_scaling_read_from_metadata(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = GGUFFile(write_tiny_gguf(str(tmp_path / "r.gguf"), rope_linear=4.0)).hf_config()
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    rope = transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "rope_parameters"}).rope_parameters
    assert rope == cfg["rope_parameters"] == {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_scaling_recovered_from_rope_freqs(tmp_path, factor):
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    hf_cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                      rope_parameters={**scaling, "rope_theta": 10000.0})
    default_inv_freq = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    llama3_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    rope_freqs = (default_inv_freq / llama3_inv_freq.double()).numpy()
    assert rope_freqs.min() == pytest.approx(1.0) and rope_freqs.max() == pytest.approx(factor)
    path = write_tiny_gguf(str(tmp_path / "l3.gguf"), head_dim=16, rope_freqs=rope_freqs)
    gguf_file = GGUFFile(path)
    assert gguf_file.hf_config()["rope_scaling"] == scaling
    assert "rope_freqs.weight" not in gguf_file.keys()
    bad = write_tiny_gguf(str(tmp_path / "bad.gguf"), head_dim=16, rope_freqs=rope_freqs[::-1].copy())
    with pytest.raises(GGUFError, match=r"bad\.gguf.*rope_freqs"):
        GGUFFile(bad)


def test_unsupported_architecture_names_file_and_value(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "x.gguf"), arch="gpt2")
    with pytest.raises(GGUFError, match=r"x\.gguf.*'gpt2' is not supported"):
        GGUFFile(path)


def test_unknown_tensor_names_listed(tmp_path):
    path = write_tiny_gguf(str(tmp_path / "u.gguf"), extra_tensors=("blk.0.mystery.weight", "extra_head.weight"))
    with pytest.raises(GGUFError, match=r"u\.gguf.*blk\.0\.mystery\.weight, extra_head\.weight"):
        GGUFFile(path)


@pytest.mark.parametrize("keep_fraction", [0.5, 0.98, 0.0005])
def test_truncated_file_names_file(tiny_llama, tmp_path, keep_fraction):
    data = open(tiny_llama, "rb").read()
    path = tmp_path / "cut.gguf"
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    with pytest.raises(GGUFError, match=r"cut\.gguf.*truncated"):
        GGUFFile(path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(GGUFError, match=r"junk\.gguf"):
        GGUFFile(path)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFFile(tmp_path / "missing.gguf")
