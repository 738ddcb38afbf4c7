"""Named points on a sequential (Llama) and a parallel (GPT-NeoX) architecture: what each captures, how edits
at them compose, stacking and unwinding, and no wrappers or memory left after register/remove cycles."""

from __future__ import annotations

import gc
import tracemalloc

import pytest
import torch

from exllamav2.interventions import (AddVector, Scale, UnknownPointError, add_capture, add_edit, intervene,
                                     model_state, point_names, resolve, wrapped_slots)
from exllamav2.interventions.points import layer_blocks, raw
from exllamav2.module import Intervention

from test_interventions_models import generate, prompts, tiny  # noqa: F401  (fixture)


def capture_all(model, ids):
    names = point_names(model)
    with add_capture(model, names) as cap:
        logits = model.forward(ids)
    b, s = ids.shape
    return logits, {n: cap[n].values.view(b, s, -1) for n in names}


def test_point_relations(tiny):
    model = tiny
    ids = prompts(model, 2, 9)
    base = model.forward(ids)
    logits, a = capture_all(model, ids)
    assert torch.equal(logits, base), "capturing must not change the output"
    n = len(layer_blocks(model))
    assert n == model.config.num_hidden_layers
    assert torch.equal(a["embed"], a["blocks.0.resid_pre"])
    for i in range(n):
        p = f"blocks.{i}."
        if i + 1 < n:
            assert torch.equal(a[p + "resid_post"], a[f"blocks.{i + 1}.resid_pre"])
        torch.testing.assert_close(a[p + "resid_mid"], a[p + "resid_pre"] + a[p + "attn_out"], atol=1e-5, rtol=0)
        torch.testing.assert_close(a[p + "resid_post"], a[p + "resid_mid"] + a[p + "mlp_out"], atol=1e-5, rtol=0)
    head = raw(model.modules[model.head_layer_idx])
    torch.testing.assert_close(head.forward(a["final_norm"]).float(), logits, atol=1e-5, rtol=0)


def test_intermediates_match_module_dicts(tiny):
    model = tiny
    ids = prompts(model, 2, 9, seed=1)
    _, a = capture_all(model, ids)
    for i, blk in enumerate(layer_blocks(model)):
        p = f"blocks.{i}."
        if blk[0] == "seq":
            da = raw(model.modules[blk[1]]).forward(a[p + "resid_pre"], intermediates=True)
            dm = raw(model.modules[blk[2]]).forward(a[p + "resid_mid"], intermediates=True)
            pairs = [("attn.post_norm", da["post_norm"]), ("attn.attn_output", da["attn_output"]),
                     ("mlp.post_norm", dm["post_norm"]), ("mlp.pre_down", dm["pre_down"])]
        else:
            d = raw(model.modules[blk[1]]).forward(a[p + "resid_pre"], intermediates=True)
            pairs = [("attn.post_norm", d["post_norm"]), ("attn.attn_output", d["attn_output"]),
                     ("mlp.pre_down", d["pre_down"]), ("attn_out", d["hidden_states_attn"]),
                     ("mlp_out", d["hidden_states_mlp"]), ("resid_post", d["hidden_states"])]
        for name, ref in pairs:
            torch.testing.assert_close(a[p + name], ref, atol=1e-5, rtol=0, msg=f"{p + name}")


def test_widths_and_bad_names(tiny):
    cfg = tiny.config
    assert resolve(tiny, "blocks.0.mlp.pre_down").width == cfg.intermediate_size
    assert resolve(tiny, "blocks.1.attn.attn_output").width == cfg.num_attention_heads * cfg.head_dim
    assert resolve(tiny, "blocks.2.hook_resid_post").name == "blocks.2.resid_post"
    with pytest.raises(UnknownPointError, match="layer 9 does not exist"):
        resolve(tiny, "blocks.9.resid_pre")
    with pytest.raises(UnknownPointError, match="unknown point"):
        resolve(tiny, "blocks.0.resid_middle")
    with pytest.raises(ValueError, match="vector has 5 elements"):
        add_edit(tiny, "blocks.0.resid_pre", AddVector(torch.ones(5)))
    assert not wrapped_slots(tiny)


def test_resid_mid_edit_shifts_layer_output(tiny):
    """Adding v at resid_mid adds v to everything after it: the same as adding it at the MLP input's residual
    (sequential) — checked through resid_post = resid_mid + mlp_out, where on parallel blocks mlp_out is unchanged."""
    model = tiny
    ids = prompts(model, 1, 7, seed=2)
    v = torch.randn(model.config.hidden_size) * 0.3
    _, base = capture_all(model, ids)
    with add_edit(model, "blocks.1.resid_mid", AddVector(v)):
        _, steered = capture_all(model, ids)
    torch.testing.assert_close(steered["blocks.1.resid_mid"], base["blocks.1.resid_mid"] + v, atol=1e-5, rtol=0)
    torch.testing.assert_close(steered["blocks.1.resid_post"], steered["blocks.1.resid_mid"] + steered["blocks.1.mlp_out"],
                               atol=1e-5, rtol=0)
    if layer_blocks(model)[1][0] == "par":
        torch.testing.assert_close(steered["blocks.1.mlp_out"], base["blocks.1.mlp_out"], atol=1e-6, rtol=0)
    assert torch.equal(steered["blocks.1.resid_pre"], base["blocks.1.resid_pre"])


@pytest.mark.parametrize("name", ["blocks.1.resid_pre", "blocks.1.attn_out", "blocks.1.mlp_out", "blocks.1.attn.post_norm",
                                  "blocks.1.attn.attn_output", "blocks.1.mlp.post_norm", "blocks.1.mlp.pre_down",
                                  "embed", "final_norm"])
def test_every_point_edits_and_restores(tiny, name):
    model = tiny
    ids = prompts(model, 1, 6, seed=3)
    base = model.forward(ids)
    with add_edit(model, name, Scale(1.5)):
        edited = model.forward(ids)
    assert (edited - base).abs().max() > 1e-4
    assert torch.equal(model.forward(ids), base)
    assert not wrapped_slots(model)


def test_stacking_unwinds_in_any_order(tiny):
    model = tiny
    ids = prompts(model, 1, 6, seed=4)
    d = model.config.hidden_size
    v1, v2 = torch.randn(d) * 0.2, torch.randn(d) * 0.2
    base = model.forward(ids)
    with add_edit(model, "blocks.1.resid_pre", AddVector(v1 + v2)):
        summed = model.forward(ids)
    with add_edit(model, "blocks.1.resid_pre", AddVector(v2)):
        only2 = model.forward(ids)
    h1 = add_edit(model, "blocks.1.resid_pre", AddVector(v1))
    h2 = add_edit(model, "blocks.1.resid_pre", AddVector(v2))
    h3 = add_edit(model, "blocks.1.attn.attn_output", Scale(1.0))  # another site inside the same module
    torch.testing.assert_close(model.forward(ids), summed, atol=1e-5, rtol=0)
    h1.remove()  # the first of the two stacked wrappers
    torch.testing.assert_close(model.forward(ids), only2, atol=1e-5, rtol=0)
    h1.remove()  # idempotent
    h3.remove()
    # a user's own Intervention placed on top of ours survives our removal
    slot_idx = [i for i, m in enumerate(model.modules) if isinstance(m, Intervention)][-1]
    model.modules[slot_idx] = Intervention(model.modules[slot_idx], pre_forward=lambda h, *a, **k: h)
    h2.remove()
    assert torch.equal(model.forward(ids), base)
    assert type(model.modules[slot_idx]) is Intervention
    model.modules[slot_idx] = model.modules[slot_idx].inner
    assert not wrapped_slots(model)
    assert model_state(model).users == 0


def test_intervene_context_and_errors(tiny):
    model = tiny
    ids = prompts(model, 1, 5, seed=5)
    base = model.forward(ids)
    with intervene(model, ("blocks.0.resid_post", Scale(0.5)), ("blocks.2.mlp.pre_down", Scale(2.0))) as g:
        assert len(g) == 2 and len(wrapped_slots(model)) >= 2
        assert not torch.allclose(model.forward(ids), base)
    assert not wrapped_slots(model)
    with pytest.raises(UnknownPointError):
        intervene(model, ("blocks.0.resid_post", Scale(0.5)), ("nowhere", Scale(2.0)))
    assert not wrapped_slots(model), "a failed intervene() must remove what it registered"


def test_register_remove_cycles_leave_nothing(tiny):
    model = tiny
    ids = prompts(model, 1, 4, seed=6)
    base = model.forward(ids)
    v = torch.randn(model.config.hidden_size)
    names = ["blocks.0.resid_pre", "blocks.1.resid_mid", "blocks.2.attn.attn_output"]

    def cycle(k):
        h = add_edit(model, names[k % 3], AddVector(v, 0.1))
        c = add_capture(model, names[(k + 1) % 3], max_positions=4)
        c.remove()
        h.remove()

    for k in range(50):
        cycle(k)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for k in range(1000):
        cycle(k)
    gc.collect()
    grown = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert grown < 64 * 1024, f"1000 register/remove cycles left {grown} bytes behind"
    assert not wrapped_slots(model)
    assert model_state(model).users == 0
    assert torch.equal(model.forward(ids), base)
