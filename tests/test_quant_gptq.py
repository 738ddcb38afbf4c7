"""4-bit GPTQ: nibble layout vectors, naive-loop dequantisation, v1/v2 zeros, group sizes, act-order, the writer."""

import pytest
import torch

from exllamav2.quant.exl2 import QuantFormatError
from exllamav2.quant.gptq import (
    gptq_dequantize, gptq_quantize, inferred_group_size, pack_nibble_rows, read_gptq, unpack_nibble_rows,
)

U32 = 0xFFFFFFFF


def naive_dequant(t, v2=False):
    """Independent reading of the on-disk tensors, element by element."""
    qw, qz, sc = t["qweight"], t["qzeros"], t["scales"]
    n_in, out = qw.shape[0] * 8, qw.shape[1]
    groups = sc.shape[0]
    g_idx = t.get("g_idx")
    gs = 1
    while gs * groups < n_in:
        gs *= 2
    W = torch.empty(out, n_in, dtype=torch.float16)
    for i in range(n_in):
        g = int(g_idx[i]) if g_idx is not None and bool((g_idx != 0).any()) else i // gs
        for n in range(out):
            q = ((int(qw[i // 8, n]) & U32) >> (4 * (i % 8))) & 15
            z = ((int(qz[g, n // 8]) & U32) >> (4 * (n % 8))) & 15
            zero = z if v2 else z + 1
            W[n, i] = torch.tensor(float(q - zero) * float(sc[g, n])).half()
    return W


def test_nibble_layout_vector():
    qweight = torch.tensor([[0x76543210, 0x0]], dtype=torch.int32)
    codes = unpack_nibble_rows(qweight)
    assert codes[:, 0].tolist() == list(range(8)) and codes[:, 1].tolist() == [0] * 8
    high = torch.tensor([[0xFEDCBA98 - (1 << 32)]], dtype=torch.int32)  # the sign bit set
    assert unpack_nibble_rows(high)[:, 0].tolist() == list(range(8, 16))
    r = torch.randint(0, 16, (64, 24))
    assert torch.equal(unpack_nibble_rows(pack_nibble_rows(r)), r)


def test_hand_built_v1_and_v2_zero_conventions():
    # 8 input rows, 8 output columns, one group; codes q[i, n] = i, stored zero nibble 7, scale 0.5
    qweight = pack_nibble_rows(torch.arange(8).unsqueeze(1).expand(8, 8))
    qzeros = torch.tensor([[0x77777777]], dtype=torch.int32)
    t = {"qweight": qweight, "qzeros": qzeros, "scales": torch.full((1, 8), 0.5).half()}
    v1 = gptq_dequantize(t, "l")                      # (q - 8) * 0.5
    v2 = gptq_dequantize(t, "l", offset_qzeros=True)  # (q - 7) * 0.5
    assert v1[0].tolist() == [(i - 8) * 0.5 for i in range(8)]
    assert v2[0].tolist() == [(i - 7) * 0.5 for i in range(8)]


@pytest.mark.parametrize("group_size", [32, 128, None])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_rtn_round_trip_against_naive(group_size, sym, fmt):
    torch.manual_seed(1)
    W = torch.randn(16, 256) * 0.05
    t = gptq_quantize(W, group_size=group_size, sym=sym, checkpoint_format=fmt)
    groups = 1 if group_size is None else 256 // group_size
    assert t["qweight"].shape == (32, 16) and t["qzeros"].shape == (groups, 2) and t["scales"].shape == (groups, 16)
    v2 = fmt == "gptq_v2"
    got = gptq_dequantize(t, "l", offset_qzeros=v2)
    assert torch.equal(got, naive_dequant(t, v2=v2))
    # round-to-nearest error is at most half a step (plus the v1 zero clamp, which costs at most one step)
    step = t["scales"].float()[torch.arange(256) // (group_size or 256)].t()
    limit = (0.5 if (sym or v2) else 1.0) * step + 1e-6
    assert ((got.float() - W).abs() <= limit + 1e-3 * W.abs()).all()
    if sym:
        zeros_nibble = (int(t["qzeros"][0, 0]) & U32) & 15
        assert zeros_nibble == (7 if fmt == "gptq" else 8)


def test_v1_and_v2_files_of_the_same_weights_agree():
    torch.manual_seed(2)
    W = torch.randn(8, 64)
    a = gptq_dequantize(gptq_quantize(W, group_size=32, sym=True), "a")
    b = gptq_dequantize(gptq_quantize(W, group_size=32, sym=True, checkpoint_format="gptq_v2"), "b", offset_qzeros=True)
    assert torch.equal(a, b)


def test_act_order_with_hessian():
    torch.manual_seed(3)
    n_in, out = 128, 16
    # correlated inputs with uneven feature scales: where GPTQ's error feedback and act-order pay off
    X = torch.randn(512, 32) @ torch.randn(32, n_in) + 0.1 * torch.randn(512, n_in)
    X = X * torch.linspace(0.1, 3, n_in)[torch.randperm(n_in)]
    H = X.t() @ X
    W = torch.randn(out, n_in)
    t = gptq_quantize(W, group_size=32, act_order=True, hessian=H)
    g_idx = t["g_idx"]
    assert not torch.equal(g_idx, (torch.arange(n_in) // 32).to(torch.int32))  # act-order
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 32))
    e = read_gptq(t, "l")
    assert e.act_order
    got = gptq_dequantize(e)
    assert torch.equal(got, naive_dequant(t))
    # GPTQ's error feedback lowers the output error against plain rounding
    rtn = gptq_dequantize(gptq_quantize(W, group_size=32), "r")
    err_gptq = (X @ (got.float() - W).t()).norm()
    err_rtn = (X @ (rtn.float() - W).t()).norm()
    assert err_gptq < 0.5 * err_rtn
    no_order = gptq_dequantize(gptq_quantize(W, group_size=32, hessian=H), "n")
    assert err_gptq < (X @ (no_order.float() - W).t()).norm()


def test_sequential_and_zero_g_idx_are_not_act_order():
    W = torch.randn(8, 64)
    t = gptq_quantize(W, group_size=32)
    assert not read_gptq(t, "l").act_order
    t1 = gptq_quantize(W, group_size=None)
    t1["g_idx"] = torch.zeros(64, dtype=torch.int32)
    assert not read_gptq(t1, "l").act_order
    assert inferred_group_size(576, 5) == 128 and inferred_group_size(576, 1) == 1024


def test_all_zero_bias_is_dropped():
    t = gptq_quantize(torch.randn(8, 64), group_size=32)
    t["bias"] = torch.zeros(8).half()
    assert read_gptq(t, "l").bias is None
    t["bias"] = torch.ones(8).half()
    assert read_gptq(t, "l").bias is not None


def _bad(mutate, match, **kw):
    t = gptq_quantize(torch.randn(16, 64), group_size=32)
    mutate(t)
    with pytest.raises(QuantFormatError, match=match):
        read_gptq(t, "model.layers.1.self_attn.o_proj", **kw)


def test_error_g_idx_out_of_range():
    def m(t):
        t["g_idx"][5] = 2
    _bad(m, r"o_proj\.g_idx: values must lie in \[0, 2\)")


def test_error_g_idx_shape():
    _bad(lambda t: t.__setitem__("g_idx", t["g_idx"][:10]), r"o_proj\.g_idx: shape")


def test_error_qzeros_and_scales_shapes():
    _bad(lambda t: t.__setitem__("qzeros", t["qzeros"][:, :1]), r"o_proj\.qzeros: shape")
    _bad(lambda t: t.__setitem__("scales", t["scales"][:, :8]), r"o_proj\.scales")


def test_error_features_disagree_and_missing():
    _bad(lambda t: None, r"o_proj\.qweight: .* the layer has 128", in_features=128)
    _bad(lambda t: None, r"o_proj\.qweight: width 16, the layer has 32", out_features=32)
    _bad(lambda t: t.pop("scales"), r"o_proj\.scales")


def test_writer_rejects_other_widths():
    with pytest.raises(ValueError, match="only 4-bit and 8-bit"):
        gptq_quantize(torch.randn(8, 64), bits=3)
