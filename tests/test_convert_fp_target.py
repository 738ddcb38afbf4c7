"""Quantizing toward the unquantized model's outputs (reference_target): the closed form is the penalised
least-squares solution, it is the identity when the inputs are unchanged, and the converter feeds it the right
statistics (the paired run's H equals the plain run's, and C equals H while nothing is quantized yet)."""

from __future__ import annotations

import pytest
import torch

from exllamav2.conversion import ConvertSettings, convert_exl2
from exllamav2.conversion.adaptive_gptq import reference_target
from exllamav2.conversion.layers import linear_stages, run_module, run_module_paired, run_module_with, substitute_weight
from test_convert_common import LENGTH, ROWS, held_out_ids, hf_logits, load_ours, make_tiny_llama, rel_error


def _data(seed=0, tokens=400, n_in=24, n_out=10):
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(tokens, n_in, generator=g) * torch.linspace(0.2, 3, n_in)   # unquantized model's inputs
    X = R + 0.1 * torch.randn(tokens, n_in, generator=g)                        # the partly quantized model's
    W = torch.randn(n_out, n_in, generator=g)
    return R, X, W


def test_identity_when_inputs_are_unchanged():
    R, _, W = _data()
    H = R.T @ R
    for damp in (0.0, 0.01, 1.0):
        torch.testing.assert_close(reference_target(W, H, H, damp), W, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("damp", [0.0, 0.05, 2.0])
def test_penalised_least_squares(damp):
    R, X, W = _data(1)
    H, C = X.T @ X, R.T @ X
    got = reference_target(W, H, C, damp)
    lam = damp * float(torch.diag(H).mean())
    # argmin ||X Q^T - R W^T||^2 + lam ||Q - W||^2, as one stacked least-squares problem in float64
    A = torch.cat([X, lam ** 0.5 * torch.eye(X.shape[1])]).double()
    B = torch.cat([R @ W.T, lam ** 0.5 * W.T]).double()
    want = torch.linalg.lstsq(A, B).solution.T.float()
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    # it matches the reference outputs better than W itself does on the shifted inputs
    assert (X @ got.T - R @ W.T).norm() < (X @ W.T - R @ W.T).norm()


def test_paired_statistics(tmp_path):
    src = make_tiny_llama(tmp_path / "fp32")
    from exllamav2 import ExLlamaV2, ExLlamaV2Config
    cfg = ExLlamaV2Config(src)
    cfg.dtype = torch.float32
    model = ExLlamaV2(cfg)
    attn = model.modules[1]
    attn.load()
    states = torch.randn(4, 16, cfg.hidden_size)
    stages = linear_stages(attn)
    original = {lin: lin.weight for _, ls in stages for lin in ls}
    for capture, _ in stages:
        H, C = run_module_paired(attn, states, states, original, 2, capture)
        _, H0 = run_module(attn, states, 2, capture, keep_output=False)
        torch.testing.assert_close(H, H0)
        torch.testing.assert_close(C, H, rtol=1e-5, atol=1e-4)
    # after substituting a perturbed q_proj, the paired run still reads the reference path with the originals
    substitute_weight(attn.q_proj, attn.q_proj.weight.data * 1.5)
    _, C = run_module_paired(attn, states, states, original, 2, "attn_output")
    _, H_pert = run_module(attn, states, 2, "attn_output", keep_output=False)
    assert attn.q_proj.weight.data.equal(original[attn.q_proj].data * 1.5), "the substituted weight is restored"
    assert not torch.allclose(C, H_pert, rtol=1e-3, atol=1e-3)
    ref_out = run_module_with(attn, states, original, 2)
    substitute_weight(attn.q_proj, original[attn.q_proj].data)
    torch.testing.assert_close(ref_out, run_module(attn, states, 2)[0])


def test_cli_flag():
    import argparse
    from exllamav2.commands import convert as convert_cmd
    parser = argparse.ArgumentParser()
    convert_cmd.add_parser(parser.add_subparsers(dest="command"))
    assert parser.parse_args(["convert", "-i", "a", "-o", "b"]).fp_target is True
    assert parser.parse_args(["convert", "-i", "a", "-o", "b", "--no-fp-target"]).fp_target is False


def test_conversion_with_and_without(tmp_path):
    """Both settings convert a real model and stay close to HF; they give different codes (the target is used)."""
    from safetensors.torch import load_file
    src = make_tiny_llama(tmp_path / "fp32", tied=True)
    ids = held_out_ids(src)
    ref = hf_logits(src, ids)
    codes = {}
    for fp_target in (False, True):
        out = str(tmp_path / f"o{fp_target}")
        s = ConvertSettings(src, out, bits=4.0, head_bits=6, rows=ROWS, length=LENGTH, fp_target=fp_target)
        assert s.job_settings()["fp_target"] is fp_target  # part of what a resumed job must match
        convert_exl2(s, progress=False)
        codes[fp_target] = load_file(f"{out}/output.safetensors")
        assert rel_error(load_ours(out), ids, ref) < 0.7  # test_convert.py's bound at 4.0 for this model
    # the first layer's q/k/v see the same inputs either way; later layers differ
    assert codes[True]["model.layers.0.self_attn.q_proj.q_weight"].equal(codes[False]["model.layers.0.self_attn.q_proj.q_weight"])
    assert not codes[True]["model.layers.1.mlp.down_proj.q_weight"].equal(codes[False]["model.layers.1.mlp.down_proj.q_weight"])
