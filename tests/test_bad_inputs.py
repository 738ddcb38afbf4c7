"""Bad input gets a clear error naming what and where."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.architecture import UnsupportedArchitectureError
from exllamav2.config import ConfigError
from exllamav2.module import MissingTensorError, TensorShapeError
from exllamav2.stloader import TensorFileError
from parity import make_tiny, save_hf_model

COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    hf = make_tiny(LlamaForCausalLM, LlamaConfig(**COMMON), seed=0)
    return save_hf_model(hf, tmp_path_factory.mktemp("good"))


@pytest.fixture
def model_dir(good_dir, tmp_path):
    d = tmp_path / "model"
    shutil.copytree(good_dir, d)
    return d


def edit_config(d, **changes):
    p = d / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


def load(d):
    cfg = ExLlamaV2Config(str(d))
    cfg.dtype = "float32"
    m = ExLlamaV2(cfg)
    m.load()
    return m


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ExLlamaV2Config(str(tmp_path / "nope"))


def test_missing_config_json(model_dir):
    os.remove(model_dir / "config.json")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ExLlamaV2Config(str(model_dir))


def test_invalid_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: invalid JSON"):
        ExLlamaV2Config(str(model_dir))


def test_unknown_architecture_lists_supported(model_dir):
    edit_config(model_dir, architectures=["FancyNewForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError) as e:
        ExLlamaV2Config(str(model_dir))
    msg = str(e.value)
    assert "FancyNewForCausalLM" in msg and "LlamaForCausalLM" in msg and "config.json" in msg


def test_bad_config_fields(model_dir):
    edit_config(model_dir, hidden_size="wide")
    with pytest.raises(ConfigError, match="hidden_size"):
        ExLlamaV2Config(str(model_dir))
    edit_config(model_dir, hidden_size=32, num_hidden_layers=0)
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        ExLlamaV2Config(str(model_dir))
    edit_config(model_dir, num_hidden_layers=2, num_key_value_heads=3)
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ExLlamaV2Config(str(model_dir))
    edit_config(model_dir, num_key_value_heads=2, vocab_size=None)
    with pytest.raises(ConfigError, match="vocab_size"):
        ExLlamaV2Config(str(model_dir))


def test_bad_dtype_option(model_dir):
    cfg = ExLlamaV2Config(str(model_dir))
    cfg.dtype = "int3"
    with pytest.raises(ConfigError, match="int3"):
        ExLlamaV2(cfg)


def _rewrite_tensors(d, fn):
    path = d / "model.safetensors"
    t = load_file(str(path))
    fn(t)
    save_file(t, str(path))


def test_missing_tensor(model_dir):
    _rewrite_tensors(model_dir, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        load(model_dir)


def test_wrong_shape(model_dir):
    def shrink(t):
        t["model.layers.0.self_attn.k_proj.weight"] = t["model.layers.0.self_attn.k_proj.weight"][:8].contiguous()
    _rewrite_tensors(model_dir, shrink)
    with pytest.raises(TensorShapeError, match=r"model\.safetensors: model\.layers\.0\.self_attn\.k_proj\.weight: "
                                               r"shape \[8, 32\], expected \[16, 32\]"):
        load(model_dir)


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(TensorFileError, match="model.safetensors"):
        load(model_dir)


def test_corrupt_safetensors_header(model_dir):
    path = model_dir / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"\x00garbag"
    path.write_bytes(bytes(data))
    with pytest.raises(TensorFileError, match="model.safetensors"):
        load(model_dir)


def test_not_a_safetensors_file(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"abc")
    with pytest.raises(TensorFileError, match="not a safetensors file"):
        load(model_dir)


def test_prompt_longer_than_cache(good_dir):
    m = load(good_dir)
    cache = ExLlamaV2Cache(m, max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len=16"):
        m.forward(torch.zeros(1, 20, dtype=torch.long), cache)
    m.forward(torch.zeros(1, 10, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="after 10 cached"):
        m.forward(torch.zeros(1, 7, dtype=torch.long), cache)
    assert cache.current_seq_len == 10  # the failed call changed nothing


def test_batch_larger_than_cache(good_dir):
    m = load(good_dir)
    cache = ExLlamaV2Cache(m, batch_size=1, max_seq_len=16)
    with pytest.raises(ValueError, match="batch_size=1"):
        m.forward(torch.zeros(2, 4, dtype=torch.long), cache)


def test_dynamic_generator_without_a_tokenizer(good_dir):
    from exllamav2.generator.dynamic import ExLlamaV2DynamicGenerator
    m = load(good_dir)
    from exllamav2.generator.dynamic import ExLlamaV2DynamicJob
    gen = ExLlamaV2DynamicGenerator(m, ExLlamaV2Cache(m, max_seq_len=64), None, page_size=16)
    with pytest.raises(ValueError, match="without a tokenizer"):
        gen.enqueue(ExLlamaV2DynamicJob(torch.zeros(1, 4, dtype=torch.long), 4))
    assert gen.num_remaining_jobs() == 0


def test_forward_before_load(good_dir):
    m = ExLlamaV2(ExLlamaV2Config(good_dir))
    with pytest.raises(RuntimeError, match="not loaded"):
        m.forward(torch.zeros(1, 3, dtype=torch.long))


def test_input_mask_forms(good_dir):
    m = load(good_dir)
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 6, dtype=torch.bool)
    keep[1, :2] = False
    cache = ExLlamaV2Cache(m, batch_size=2, max_seq_len=16)
    a = m.forward(ids, cache, input_mask=keep)
    # a prompt-width mask during decoding: the missing tail counts as kept (the original's behaviour)
    step_short = m.forward(ids[:, -1:], cache, input_mask=keep)
    cache.current_seq_len = 6
    full = torch.cat((keep, torch.ones(2, 1, dtype=torch.bool)), 1)
    step_full = m.forward(ids[:, -1:], cache, input_mask=full)
    torch.testing.assert_close(step_short, step_full, rtol=0, atol=0)
    additive = torch.where(keep, 0.0, -65504.0)
    cache.current_seq_len = 0
    torch.testing.assert_close(m.forward(ids, cache, input_mask=additive), a, rtol=0, atol=0)
    cache.current_seq_len = 0
    with pytest.raises(ValueError, match="ambiguous"):
        m.forward(ids, cache, input_mask=keep.long())
    with pytest.raises(ValueError, match="positive"):
        m.forward(ids, cache, input_mask=keep.float())
    assert cache.current_seq_len == 0  # failed calls leave the cache where it was


def test_abort_restores_cache_position(good_dir):
    import threading

    cfg = ExLlamaV2Config(good_dir)
    cfg.dtype = "float32"
    cfg.max_input_len = 4
    m = ExLlamaV2(cfg)
    m.load()
    cache = ExLlamaV2Cache(m, max_seq_len=32)
    ev = threading.Event()
    calls = []
    original = m.modules[1]

    class AbortAfterFirstChunk:
        def __getattr__(self, k):
            return getattr(original, k)

        def forward(self, x, *a, **k):
            calls.append(1)
            if len(calls) == 2:
                ev.set()
            return original.forward(x, *a, **k)

    m.modules[1] = AbortAfterFirstChunk()
    try:
        assert m.forward(torch.zeros(1, 12, dtype=torch.long), cache, abort_event=ev) is None
    finally:
        m.modules[1] = original
    assert cache.current_seq_len == 0
