"""The seed's Intervention: every delegated method and attribute, hooks' arguments, the seed's examples."""

from __future__ import annotations

import torch

from exllamav2 import ExLlamaV2Cache
from exllamav2.module import Intervention

from test_interventions_models import tiny_llama  # noqa: F401  (fixture)


def test_delegated_methods_match_inner(tiny_llama):
    model = tiny_llama
    for idx in (0, 1, 2, len(model.modules) - 1):
        inner = model.modules[idx]
        w = Intervention(inner)
        assert w.numel() == inner.numel()
        assert w.weight_footprint() == inner.weight_footprint() > 0
        assert w.device() == inner.device() == "cpu"
        assert w.is_quant() == inner.is_quant()
        assert w.scratch_space() == inner.scratch_space()
        assert w.scratch_space_fixed() == inner.scratch_space_fixed()
        assert w.scratch_space_tp() == inner.scratch_space_tp()
        assert w.key == inner.key and w.name == inner.name and w.dtype == inner.dtype
        assert w.has_tensor(inner.key + ".weight") == inner.has_tensor(inner.key + ".weight")
        assert w.fused_footprint() == inner.fused_footprint()


def test_attribute_reads_and_writes_reach_inner(tiny_llama):
    attn = tiny_llama.modules[1]
    w = Intervention(attn)
    assert w.layer_idx == attn.layer_idx == 0
    assert w.o_proj is attn.o_proj and w.kv_layer
    old_key = attn.key
    try:
        w.layer_idx = 7
        w.key = "renamed"
        w.custom_flag = 3
        assert attn.layer_idx == 7 and attn.key == "renamed" and attn.custom_flag == 3
        assert "custom_flag" not in w.__dict__
    finally:
        attn.layer_idx, attn.key = 0, old_key
        del attn.custom_flag


def test_set_device_idx_passes_through(tiny_llama):
    attn = tiny_llama.modules[1]
    w = Intervention(attn)
    try:
        w.set_device_idx(3)
        assert attn.device_idx == 3 and all(m.device_idx == 3 for m in attn.submodules)
        assert w.device() == "cuda:3"
    finally:
        w.set_device_idx(None)
    assert attn.device_idx == -1 and w.device() == "cpu"


def test_unload_load_reload_pass_through(tiny_llama):
    model = tiny_llama
    ids = torch.tensor([[1, 2, 3, 4]])
    ref = model.forward(ids)
    mlp = model.modules[2]
    w = Intervention(mlp)
    w.unload()
    assert mlp.down_proj.weight is None
    w.load()
    assert mlp.down_proj.weight is not None
    w.reload()
    model.modules[2] = w
    try:
        assert torch.equal(model.forward(ids), ref)
    finally:
        model.modules[2] = mlp
    emb = model.modules[0]
    assert torch.equal(Intervention(emb).load_weight().data, emb.load_weight().data)
    assert Intervention(emb).load_multi(emb.key, ["weight"], measure=True) == emb.weight_footprint()


def test_hooks_receive_forward_arguments(tiny_llama):
    model = tiny_llama
    seen = []

    def pre(h, *args, **kwargs):
        seen.append(("pre", h.shape, kwargs["past_len"], kwargs["attn_params"].past_len,
                     kwargs["attn_params"].seq_len, kwargs["cache"], kwargs.get("loras")))
        return h

    def post(h, *args, **kwargs):
        seen.append(("post", h.shape))
        return h

    attn = model.modules[3]
    model.modules[3] = Intervention(attn, pre, post)
    try:
        cache = ExLlamaV2Cache(model, max_seq_len=16)
        model.forward(torch.tensor([[5, 6, 7]]), cache)
        model.forward(torch.tensor([[8]]), cache)
    finally:
        model.modules[3] = attn
    assert seen[0] == ("pre", (1, 3, 32), 0, 0, 3, cache, None)
    assert seen[1] == ("post", (1, 3, 32))
    assert seen[2][2:5] == (3, 3, 1)


def test_post_hook_gets_hidden_states_of_intermediates(tiny_llama):
    attn = tiny_llama.modules[1]
    x = torch.randn(1, 4, 32)
    got = {}

    def post(h, *a, **k):
        got["h"] = h
        return h * 2

    out = Intervention(attn, post_forward=post).forward(x, intermediates=True)
    ref = attn.forward(x, intermediates=True)
    assert set(out) == set(ref) and torch.equal(got["h"], ref["hidden_states"])
    assert torch.equal(out["hidden_states"], ref["hidden_states"] * 2)
    assert torch.equal(out["attn_output"], ref["attn_output"])


def test_seed_examples_capture_and_steer(tiny_llama):
    model = tiny_llama
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    base = model.forward(ids)
    captured = {}

    def capture_post(hidden_states, *args, **kwargs):
        captured["layer_2"] = hidden_states.clone().cpu()
        return hidden_states

    original = model.modules[2]
    model.modules[2] = Intervention(inner=original, post_forward=capture_post)
    try:
        assert torch.equal(model.forward(ids), base)
    finally:
        model.modules[2] = original
    assert captured["layer_2"].shape == (1, 5, 32)

    steering_vector = torch.randn(1, 1, 32) * 0.5
    model.modules[3] = Intervention(inner=model.modules[3], pre_forward=lambda h, *a, **k: h + steering_vector)
    try:
        steered = model.forward(ids)
    finally:
        model.modules[3] = model.modules[3].inner
    assert not torch.allclose(steered, base)
    assert torch.equal(model.forward(ids), base)
