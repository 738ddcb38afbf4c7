"""The module contract (seed 000): the seed's usage examples, load_weight return types, footprints from file
headers, and Intervention delegation."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config
from exllamav2.module import ExLlamaV2Module, Intervention
from exllamav2.stloader import SafetensorsFile
from parity import make_tiny, save_hf_model

COMMON = dict(vocab_size=101, hidden_size=32, intermediate_size=72, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=8, max_position_embeddings=64)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    hf = make_tiny(LlamaForCausalLM, LlamaConfig(**COMMON), seed=3, init_scale=0.1)
    return save_hf_model(hf, tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    hf = make_tiny(Qwen2ForCausalLM, Qwen2Config(**COMMON), seed=4, init_scale=0.1)
    return save_hf_model(hf, tmp_path_factory.mktemp("qwen2"))


def load(path, dtype="float32"):
    cfg = ExLlamaV2Config(path)
    cfg.dtype = dtype
    model = ExLlamaV2(cfg)
    model.load()
    return model


@pytest.fixture(scope="module")
def model(llama_dir):
    return load(llama_dir)


def ids(n=12, seed=0):
    return torch.randint(0, COMMON["vocab_size"], (1, n), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ seed usage examples


class MyCustomLayer(ExLlamaV2Module):
    def __init__(self, model, key):
        super().__init__(model, key)

    def load(self):
        self.tensors = self.load_weight()

    def unload(self):
        self.tensors = None

    def forward(self, hidden_states, cache=None, attn_params=None, past_len=None, intermediates=None, loras=None):
        return hidden_states

    def numel(self):
        return 0

    def scratch_space_fixed(self):
        return 0

    def scratch_space(self):
        return 0


def test_seed_subclass_example(model):
    layer = MyCustomLayer(model, "model.layers.0.mlp.up_proj.")
    assert layer.key == "model.layers.0.mlp.up_proj"  # trailing dot accepted, none stored
    layer.load()
    assert isinstance(layer.tensors, torch.nn.Parameter)
    assert layer.tensors.shape == (COMMON["intermediate_size"], COMMON["hidden_size"])
    x = torch.randn(1, 3, COMMON["hidden_size"])
    assert layer.forward(x) is x
    assert layer.device() == "cpu" and layer.is_quant() is False
    assert layer.weight_footprint() == COMMON["intermediate_size"] * COMMON["hidden_size"] * 4


def test_seed_probing_example(model):
    captured_activations = {}

    def capture_post(hidden_states, *args, **kwargs):
        captured_activations["layer_5"] = hidden_states.clone().cpu()
        return hidden_states

    original_module = model.modules[5]
    try:
        model.modules[5] = Intervention(inner=original_module, post_forward=capture_post)
        cache = ExLlamaV2Cache(model, max_seq_len=32)
        out = model.forward(ids(), cache=cache)
        assert captured_activations["layer_5"].shape == (1, 12, COMMON["hidden_size"])
        ref = load_ref_logits(model, original_module)
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    finally:
        model.modules[5] = original_module


def load_ref_logits(model, original_module):
    assert model.modules[5] is not original_module
    saved = model.modules[5]
    model.modules[5] = original_module
    try:
        return model.forward(ids(), cache=ExLlamaV2Cache(model, max_seq_len=32))
    finally:
        model.modules[5] = saved


def test_seed_steering_example(model):
    base = model.forward(ids())
    identity = Intervention(model.modules[3], pre_forward=lambda h, *a, **k: h)
    steering_vector = torch.randn(1, 1, COMMON["hidden_size"], dtype=model.dtype) * 0.5

    def steer_pre(hidden_states, *args, **kwargs):
        return hidden_states + steering_vector

    original = model.modules[3]
    try:
        model.modules[3] = identity
        torch.testing.assert_close(model.forward(ids()), base, rtol=0, atol=0)
        model.modules[3] = Intervention(inner=original, pre_forward=steer_pre)
        steered = model.forward(ids())
        assert (steered - base).abs().max().item() > 1e-3
    finally:
        model.modules[3] = original
    torch.testing.assert_close(model.forward(ids()), base, rtol=0, atol=0)


def test_intervention_delegation(model):
    inner = model.modules[1]
    wrapped = Intervention(inner)
    assert wrapped.layer_idx == inner.layer_idx == 0
    assert wrapped.key == inner.key and wrapped.name == "Attention"
    assert wrapped.numel() == inner.numel()
    assert wrapped.weight_footprint() == inner.weight_footprint()
    assert wrapped.device() == "cpu" and wrapped.is_quant() is False
    assert wrapped.scratch_space_tp() == inner.scratch_space_tp()
    assert wrapped.scratch_space_fixed() == inner.scratch_space_fixed()
    wrapped.set_device_idx(-1)  # passes through instead of raising
    assert inner.device_idx == -1
    wrapped.sliding_window = 5
    assert inner.sliding_window == 5
    wrapped.sliding_window = 0
    nested = Intervention(wrapped)
    assert nested.layer_idx == 0 and nested.inner.inner is inner


def test_intervention_intermediates_post_hook(model):
    inner = model.modules[2]
    seen = []
    wrapped = Intervention(inner, post_forward=lambda h, *a, **k: seen.append(h.shape) or h * 0)
    x = torch.randn(1, 4, COMMON["hidden_size"])
    out = wrapped.forward(x, intermediates=True)
    assert set(out) == {"post_norm", "pre_down", "hidden_states"}
    assert seen == [x.shape] and out["hidden_states"].abs().max() == 0


# ------------------------------------------------------------------ load_weight return types


def test_load_weight_types(qwen_dir):
    model = load(qwen_dir)
    attn = model.modules[1]
    w = attn.q_proj.load_weight()
    assert isinstance(w, tuple) and all(isinstance(t, torch.nn.Parameter) for t in w)
    assert w[0].shape == (32, 32) and w[1].shape == (32,)
    assert isinstance(attn.o_proj.load_weight(), torch.nn.Parameter)
    assert attn.o_proj.load_weight(override_key="model.layers.0.no_such_proj") is None


def test_load_weight_quant_dicts(tmp_path, llama_dir):
    import shutil

    from exllamav2.quant.gptq import gptq_quantize
    from exllamav2.quant.exl2 import exl2_pack
    d = tmp_path / "m"
    shutil.copytree(llama_dir, d)
    w = torch.randn(COMMON["intermediate_size"], COMMON["hidden_size"])
    extra = {f"extra.gptq.{k}": v for k, v in gptq_quantize(w, bits=4, group_size=32).items()}
    codes = torch.randint(0, 16, (COMMON["hidden_size"], COMMON["intermediate_size"]), dtype=torch.int32)
    exl = exl2_pack(codes, groups=[(4, 32)], scale_codes=torch.randint(0, 16, (1, COMMON["intermediate_size"])),
                    scale_max=torch.tensor([0.5], dtype=torch.float16))
    extra.update({f"extra.exl2.{k}": v for k, v in exl.items()})
    save_file({k: v.contiguous() for k, v in extra.items()}, str(d / "extra.safetensors"))
    model = load(str(d))
    probe = MyCustomLayer(model, "extra.gptq")
    t = probe.load_weight()
    assert isinstance(t, dict) and {"qweight", "qzeros", "scales"} <= set(t)
    t = probe.load_weight(override_key="extra.exl2")
    assert isinstance(t, dict) and {"q_weight", "q_invperm", "q_scale", "q_scale_max", "q_groups", "q_perm"} <= set(t)
    assert torch.equal(t["q_perm"].long(), torch.argsort(t["q_invperm"].long()))
    assert probe.weight_footprint() == sum(v.numel() * v.element_size() for k, v in extra.items() if k.startswith("extra.gptq."))


# ------------------------------------------------------------------ footprints from headers


def _header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def test_weight_footprint_from_headers_without_reading_data(llama_dir, monkeypatch):
    import glob
    sizes = {}
    for p in glob.glob(f"{llama_dir}/*.safetensors"):
        for name, meta in _header(p).items():
            if name != "__metadata__":
                sizes[name] = meta["data_offsets"][1] - meta["data_offsets"][0]
    cfg = ExLlamaV2Config(llama_dir)
    model = ExLlamaV2(cfg)

    def no_reads(*a, **k):
        raise AssertionError("weight_footprint must not read tensor data")

    monkeypatch.setattr(SafetensorsFile, "get_tensor", no_reads)
    total = 0
    for m in model.modules:
        leaves = m.submodules or [m]
        expect = sum(sizes.get(f"{s.key}.{sfx}", 0) for s in leaves for sfx in ("weight", "bias"))
        assert m.weight_footprint() == expect, m.key
        total += expect
    # the tied-or-not head is counted once per module; every tensor in the files is accounted for
    assert total >= sum(sizes.values())
