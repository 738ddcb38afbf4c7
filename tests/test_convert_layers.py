"""The converter's shared passes (exllamav2/conversion/layers.py) give exactly what separate passes give: one pass
for several captures, the reference module's pass kept for every stage, and the first stage's input read from the
input norm alone (bit for bit, since the quantized weights depend on every rounding)."""

from __future__ import annotations

import torch

from exllamav2.conversion.layers import (linear_stages, run_module, run_module_captures, run_module_paired,
                                         stage_input, substitute_weight)
from test_convert_common import make_tiny_llama


def _modules(tmp_path):
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    cfg = ExLlamaV2Config(make_tiny_llama(tmp_path / "fp32"))
    cfg.dtype = torch.float32
    model = ExLlamaV2(cfg)
    attn, mlp = model.modules[1], model.modules[2]
    attn.load()
    mlp.load()
    return cfg, attn, mlp


def test_one_pass_for_several_captures(tmp_path):
    cfg, attn, mlp = _modules(tmp_path)
    states = torch.randn(5, 16, cfg.hidden_size)
    for module in (attn, mlp):
        captures = [c for c, _ in linear_stages(module)]
        for split in (False, True):
            out, Hs = run_module(module, states, 2, captures, split=split)
            assert set(Hs) == set(captures)
            for c in captures:
                out1, H1 = run_module(module, states, 2, c, split=split)
                assert torch.equal(out, out1)
                for a, b in zip(Hs[c] if split else [Hs[c]], H1 if split else [H1]):
                    assert torch.equal(a, b), c


def test_first_stage_input_is_the_norm_output(tmp_path):
    cfg, attn, mlp = _modules(tmp_path)
    x = torch.randn(2, 16, cfg.hidden_size)
    from exllamav2.attn_params import Params
    for module in (attn, mlp):
        full = module.forward(x, cache=None, attn_params=Params(2, 16, 0), intermediates=True)
        assert torch.equal(stage_input(module, x, "post_norm"), full["post_norm"])
        second = linear_stages(module)[1][0]
        assert stage_input(module, x, second) is None


def test_reference_pass_kept_for_every_stage(tmp_path):
    cfg, attn, _ = _modules(tmp_path)
    states = torch.randn(4, 16, cfg.hidden_size)
    ref = states + 0.05 * torch.randn_like(states)
    stages = linear_stages(attn)
    original = {lin: lin.weight for _, ls in stages for lin in ls}
    ref_out, kept = run_module_captures(attn, ref, 2, [c for c, _ in stages])
    assert torch.equal(ref_out, run_module(attn, ref, 2)[0])
    # a quantized q_proj changes the second stage's X but not the kept reference inputs
    substitute_weight(attn.q_proj, attn.q_proj.weight.data * 1.1)
    for capture, _ in stages:
        H, C = run_module_paired(attn, states, ref, original, 2, capture)
        H2, C2 = run_module_paired(attn, states, None, None, 2, capture, ref_captured=kept[capture])
        assert torch.equal(H, H2) and torch.equal(C, C2), capture
