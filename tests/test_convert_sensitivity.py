"""Loss sensitivity for the bit allocation: our per-output squared loss gradients equal HF transformers' on the same
tiny model, and the weighted error equals its definition computed from the activations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from exllamav2.conversion.adaptive_gptq import output_errors, prepare_hessian, quantize_options
from exllamav2.conversion.qparams import CANDIDATES
from exllamav2.conversion.sensitivity import output_gradient_moments
from exllamav2.linear import ExLlamaV2Linear
from test_convert_common import load_ours, make_tiny_llama


def _hf_moments(model_dir: str, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    hf = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}

    def hook(name):
        def on_output(module, args, y):
            y.register_hook(lambda g: sums.__setitem__(name, sums.get(name, 0) + g.double().pow(2).reshape(-1, g.shape[-1]).sum(0)) or None)
        return on_output

    for name, m in hf.named_modules():
        if isinstance(m, torch.nn.Linear) and name != "lm_head":
            m.register_forward_hook(hook(name))
    for r in range(ids.shape[0]):
        hf.zero_grad()
        logits = hf(ids[r:r + 1, :-1]).logits
        F.cross_entropy(logits[0].float(), ids[r, 1:]).backward()
    n = ids.shape[1] - 1
    return {k: (v * n * n / (n * ids.shape[0])).float() for k, v in sums.items()}


@pytest.mark.parametrize("pinned", [None, "cpu"])
def test_gradient_moments_match_hf(tmp_path, pinned):
    # pinned "cpu": its kernels (the C++ rms_norm) have no autograd; the pass runs the torch reference ops anyway
    from exllamav2.ops.dispatch import use_backend
    src = make_tiny_llama(tmp_path / "m")
    with use_backend(pinned):
        _check_moments(src)


def _check_moments(src):
    model = load_ours(src)
    linears = [m for mod in model.modules for m in getattr(mod, "submodules", []) if isinstance(m, ExLlamaV2Linear)
               and m.key != "lm_head"]
    assert len(linears) == 14  # 2 layers x (q, k, v, o, gate, up, down)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 40))
    ours = output_gradient_moments(model, linears, ids, progress=False)
    ref = _hf_moments(src, ids)
    assert set(ours) == set(ref)
    for k in ours:
        assert ours[k].shape == ref[k].shape and bool((ours[k] > 0).any())
        torch.testing.assert_close(ours[k], ref[k], rtol=2e-3, atol=1e-12, msg=k)
    # the model is left as it was: plain inference still works and nothing is left wrapped
    assert all("forward" not in vars(lin) for lin in linears) and "forward" not in vars(model.modules[0])
    with torch.inference_mode():
        assert torch.isfinite(model.forward(ids[:1])).all()


def test_weighted_error_is_the_expected_loss_increase():
    torch.manual_seed(1)
    out, n_in, T = 48, 96, 512
    W = torch.randn(out, n_in)
    X = torch.randn(T, n_in) * torch.linspace(0.3, 2.0, n_in)
    w = torch.rand(out) * 3
    prep = prepare_hessian(X.T @ X)
    res = quantize_options(W, prep, [CANDIDATES[0], CANDIDATES[-1]])
    errs = output_errors(W, prep, [r.dequant for r in res], row_weights=w, tokens=T)
    for r, e in zip(res, errs):
        direct = float(torch.sqrt(((X @ (W - r.dequant).T) ** 2 * w).sum() / T))
        assert abs(e - direct) < 1e-3 * direct
    assert errs[0] > errs[1] > 0
