"""The CPU backend's fused gated MLP activation act(gate) * up (exllamav2/ops/cpu/csrc/small_ops.cpp,
ops/cpu/small_ops.py) against the reference (torch_ref/activation.py) and against fp64 math, in every dtype: silu
within a unit in the last place of bf16/fp16 (which round the activation before the product) and 4 of fp32 (exp
within 2 ulp), the tanh GELU closer to fp64 than the reference where torch's 1 + tanh cancels; special values; rows
computed alone; the fallbacks."""

from __future__ import annotations

import math

import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import kernels, small_ops
from exllamav2.ops.torch_ref import activation as ref

if not kernels.ready():
    pytest.skip("the CPU kernels cannot be built here (see the line above)", allow_module_level=True)
if not kernels.active_avx512():
    pytest.skip("the fused activation is AVX-512 only; this CPU runs the reference", allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = {torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}
UNITS = {torch.float32: 4, torch.bfloat16: 1, torch.float16: 1}


def _halves(rows, cols, dtype, seed, scale=4.0, lead=()):
    g = torch.Generator().manual_seed(seed)
    y = (torch.randn(*lead, rows, 2 * cols, generator=g) * scale).to(dtype)
    return y.split([cols, cols], dim=-1)  # strided views, as the MLP's fused gate|up output gives


def _fp64(gate, up, act):
    """act in fp64 rounded to the dtype (where the reference rounds), times up in fp64."""
    x = gate.double()
    if act == "silu":
        a = x / (1 + torch.exp(-x))
    else:
        a = 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return a.to(gate.dtype).double() * up.double()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cols", [1536, 1000, 7])
def test_silu_is_the_reference_within_one_unit(dtype, cols):
    gate, up = _halves(97, cols, dtype, seed=cols)
    out = small_ops.gated_activation(gate, up, "silu")
    want = ref.gated_activation(gate, up, "silu")
    assert out.dtype == dtype and out.shape == want.shape and out.is_contiguous()
    # units in the last place of the larger of the two: where the fp32 value sat at a rounding boundary
    unit = torch.maximum(out.float().abs(), want.float().abs()) * EPS[dtype] * UNITS[dtype]
    assert ((out.float() - want.float()).abs() <= unit).all()
    assert (out == want).float().mean() > 0.9


@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_tanh_is_at_least_as_close_to_fp64_as_the_reference(dtype):
    gate, up = _halves(128, 512, dtype, seed=3)
    out = small_ops.gated_activation(gate, up, "gelu_pytorch_tanh")
    want = ref.gated_activation(gate, up, "gelu_pytorch_tanh")
    exact = _fp64(gate, up, "gelu_tanh")
    big = exact.abs() > 1e-3 * exact.abs().max()
    # where the value is not tiny beside the largest: within a few units of fp64 (torch's reaches ~20 in fp32)
    rel_big = ((out.double() - exact).abs() / exact.abs())[big]
    assert (rel_big <= 2 * UNITS[dtype] * EPS[dtype]).all()
    # everywhere, the absolute error against fp64 is no larger than a unit of the largest value, and the worst
    # relative errors are no worse than the reference's (which cancels in 1 + tanh for negative inputs)
    scale = exact.abs().max()
    assert ((out.double() - exact).abs() <= scale * EPS[dtype]).all()
    nz = exact.abs() > 1e-30
    rel = lambda t: ((t.double() - exact).abs() / exact.abs())[nz]
    assert rel(out).quantile(0.99) <= rel(want).quantile(0.99) + 1e-12


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_special_values(dtype, act):
    vals = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 60.0, -60.0, 1.0])
    gate = vals.to(dtype).view(1, -1)
    up = torch.ones_like(gate)
    out = small_ops.gated_activation(gate, up, act)
    want = ref.gated_activation(gate, up, act)
    assert torch.equal(out.isnan(), want.isnan())
    ok = ~want.isnan()
    assert torch.equal(out[ok].float(), want[ok].float())


def test_rows_are_computed_alone_and_any_leading_shape():
    gate, up = _halves(40, 300, torch.bfloat16, seed=9, lead=(3,))
    whole = small_ops.gated_activation(gate, up, "silu")
    assert whole.shape == (3, 40, 300)
    for b in range(3):
        for r in (0, 17, 39):
            one = small_ops.gated_activation(gate[b, r:r + 1], up[b, r:r + 1], "silu")
            assert torch.equal(one[0], whole[b, r])
    # a transposed (non-row-major) batch of rows gives the same values
    gt, ut = gate.transpose(0, 1), up.transpose(0, 1)
    assert torch.equal(small_ops.gated_activation(gt, ut, "silu"), whole.transpose(0, 1))


def test_the_backend_runs_the_kernel_and_other_cases_the_reference(monkeypatch):
    gate, up = _halves(8, 64, torch.float32, seed=1)
    calls = []
    real = torch.ops.exllamav2_cpu.gated_activation

    class Spy:
        def __call__(self, *a):
            calls.append(a[-1])
            return real(*a)

    monkeypatch.setattr(torch.ops.exllamav2_cpu, "gated_activation", Spy())
    ops.gated_activation(gate, up, "silu")
    assert calls == [0]
    # an activation the kernel does not have, and a call autograd must differentiate: the reference
    relu = ops.gated_activation(gate, up, "relu")
    assert torch.equal(relu, torch.relu(gate) * up)
    g = gate.clone().requires_grad_(True)
    with torch.enable_grad():
        y = ops.gated_activation(g, up, "silu")
        y.sum().backward()
    assert calls == [0] and g.grad is not None


def test_bad_arguments_are_named():
    gate, up = _halves(4, 32, torch.float32, seed=2)
    with pytest.raises(RuntimeError, match="one shape and dtype"):
        torch.ops.exllamav2_cpu.gated_activation(gate, up[:, :16], 0)
    with pytest.raises(RuntimeError, match="act must be 0"):
        torch.ops.exllamav2_cpu.gated_activation(gate, up, 5)
