"""make_quant_weight / QuantWeight: detection, the packed int4 CPU path against the reference, dense paths, info."""

import pytest
import torch
import torch.nn.functional as F

from exllamav2.quant import QuantFormatError, gptq_quantize, make_quant_weight
from exllamav2.quant.exl2 import exl2_pack


def exl2_tensors(groups, out, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    n_in = sum(r for _, r in groups)
    codes = torch.cat([torch.randint(0, 1 << b, (r, out), generator=g) for b, r in groups])
    t = exl2_pack(codes, groups, torch.randint(0, 16, (len(groups), out), generator=g),
                  (torch.rand(len(groups), generator=g) * 0.05 + 0.01).half(), torch.randperm(n_in, generator=g),
                  torch.randn(out, generator=g) if bias else None)
    return t, n_in


def check_fast_equals_reference(qw, n_in, rows=(1, 5)):
    assert qw.packed is not None
    for m in rows:
        x = torch.randn(m, n_in).bfloat16()
        assert qw.uses_packed(x)
        y = qw.forward(x)
        assert y.dtype == torch.bfloat16 and y.shape == (m, qw.out_features)
        ref = x.float() @ qw.dequantize(torch.float32).t()
        if qw.bias is not None:
            ref = ref + qw.bias.float()
        rel = (y.float() - ref).norm() / ref.norm()
        assert rel < 1e-2, rel  # scales rounded to bf16 plus bf16 output


@pytest.mark.parametrize("groups", [
    [(4, 32)] * 6,                                            # uniform 4-bit g32
    [(4, 128), (4, 64)],                                      # g128 with a shorter last group
    [(8, 32), (6, 32), (5, 32), (4, 64), (3, 32), (2, 32)],   # every width, two-digit rows for 8/6/5
])
def test_exl2_packed_path_equals_reference(groups):
    t, n_in = exl2_tensors(groups, 48, bias=True)
    qw = make_quant_weight("model.layers.0.mlp.down_proj", t, n_in, 48, torch.bfloat16, "cpu")
    check_fast_equals_reference(qw, n_in)


def test_exl2_16_row_group_falls_back_to_dense():
    t, n_in = exl2_tensors([(4, 32), (2, 16), (2, 16)], 32)
    qw = make_quant_weight("l", t, n_in, 32, torch.bfloat16, "cpu")
    assert qw.packed is None
    x = torch.randn(3, n_in).bfloat16()
    assert torch.equal(qw.forward(x), F.linear(x, qw.dequantize(torch.bfloat16)))


@pytest.mark.parametrize("kw", [dict(group_size=32, sym=False), dict(group_size=128), dict(group_size=None),
                                dict(group_size=64, act_order=True)])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_packed_path_equals_reference(kw, fmt):
    torch.manual_seed(0)
    n_in, out = 256, 40  # out not a multiple of 16: the kernel's N is padded
    W = torch.randn(out, n_in)
    if kw.get("act_order"):
        X = torch.randn(64, n_in) * torch.rand(n_in)
        kw = dict(kw, hessian=X.t() @ X)
    t = gptq_quantize(W, checkpoint_format=fmt, **kw)
    qw = make_quant_weight("q", t, n_in, out, torch.bfloat16, "cpu", checkpoint_offset_qzeros=fmt == "gptq_v2")
    assert qw.t.act_order == bool(kw.get("act_order"))
    check_fast_equals_reference(qw, n_in)


def test_dense_paths_and_shapes():
    t, n_in = exl2_tensors([(4, 32)] * 4, 32, bias=True)
    qw = make_quant_weight("l", {f"l.{k}": v for k, v in t.items()}, n_in, 32, torch.float32, "cpu")  # full names
    x = torch.randn(2, 3, n_in)
    y = qw.forward(x)  # fp32 activations: dense on the dequantised matrix
    assert y.shape == (2, 3, 32) and y.dtype == torch.float32
    assert torch.allclose(y, x @ qw.dequantize(torch.float32).t() + qw.bias, atol=1e-5)
    # bf16 prefill with dense_prefill: dense GEMM beyond the threshold, same result within bf16 tolerance
    qb = make_quant_weight("l", t, n_in, 32, torch.bfloat16, "cpu", dense_prefill=True, dense_threshold=4)
    xb = torch.randn(16, n_in).bfloat16()
    assert not qb.uses_packed(xb) and qb.uses_packed(xb[:4])
    assert torch.allclose(qb.forward(xb).float(), qb.packed.matmul(xb).float() + qb.bias.float(), rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="l: input has 5 features"):
        qw.forward(torch.randn(1, 5))


def test_precision_option():
    t, n_in = exl2_tensors([(4, 32)] * 2, 32)
    w16 = make_quant_weight("l", t, n_in, 32, torch.float32, "cpu").dequantize()
    w32 = make_quant_weight("l", t, n_in, 32, torch.float32, "cpu", precision=torch.float32).dequantize()
    assert torch.equal(w16, w16.half().float()) and not torch.equal(w32, w32.half().float())
    assert torch.allclose(w16, w32, rtol=1e-3, atol=1e-6)


def test_info_and_sizes():
    t, n_in = exl2_tensors([(6, 32)] + [(4, 32)] * 19, 64)
    qw = make_quant_weight("l", t, n_in, 64, torch.bfloat16, "cpu")
    assert qw.format == "exl2" and qw.numel() == 640 * 64
    assert qw.describe().startswith("EXL2 ") and "[6:5%, 4:95%] g32" in qw.describe()
    assert 4.0 < qw.bits_per_weight() < 5.0
    assert qw.footprint_bytes() >= t["q_weight"].numel() * 4
    before = qw.footprint_bytes()
    from exllamav2 import ops
    kernel = ops.prepare_linear(None, None, qw, "cpu", torch.bfloat16)
    if kernel.backend == "cpu" and getattr(qw, "_cpu_gemv_packed", None):  # the cpu backend's repack is counted
        assert qw.footprint_bytes() == before + qw._cpu_gemv_packed.nbytes() > before
    g = make_quant_weight("g", gptq_quantize(torch.randn(256, 256), group_size=128), 256, 256, torch.bfloat16, "cpu")
    assert g.format == "gptq" and g.describe() == "GPTQ 4-bit g128"
    assert 4.0 < g.bits_per_weight() < 4.5


def test_unknown_format_error():
    with pytest.raises(QuantFormatError, match=r"layer\.q_weight for EXL2 or layer\.qweight"):
        make_quant_weight("layer", {"weight": torch.zeros(2, 2)}, 2, 2, torch.float32, "cpu")


def test_shape_mismatch_names_tensor():
    t, n_in = exl2_tensors([(4, 32)] * 2, 32)
    with pytest.raises(QuantFormatError, match=r"k\.q_invperm: length 64 but the layer has 96"):
        make_quant_weight("k", t, 96, 32, torch.bfloat16, "cpu")
