"""The `triton` backend's EXL2 and GPTQ kernels (exllamav2/ops/triton/{exl2,gptq}_linear.py) under Triton's
interpreter (TRITON_INTERPRET=1, CPU tensors), held to the `torch` backend's dequantise-then-matmul.

In fp16 (the interpreter's bf16 dot multiplies bit patterns and its bf16 casts truncate; one bf16 case checks the
interpreter's fp32 fallback). The dequantised tiles equal the reference dequantiser bit for bit; the products
agree within fp16 rounding of the output (the kernels accumulate in fp32, in their own order). Shapes reach 1024
with the kernels' real tiles; bigger sweeps are marked slow."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from exllamav2 import ops  # noqa: E402
from exllamav2.ops import NoBackendError  # noqa: E402
from exllamav2.quant import gptq_quantize, make_quant_weight  # noqa: E402
from test_quant_weight import exl2_tensors  # noqa: E402
from exllamav2.quant.gptq import pack_nibble_rows, unpack_nibble_rows  # noqa: E402

H = torch.float16


@pytest.fixture
def triton_interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with ops.use_backend("triton"):
        yield


def exl2_weight(groups, out, seed=0, bias=True, dtype=H):
    """Random EXL2 codes over `groups` [(bits, rows), ...] with a random act-order permutation."""
    t, n_in = exl2_tensors(groups, out, seed, bias)
    return make_quant_weight(f"exl2.{seed}", t, n_in, out, dtype, "cpu", fast_path=False)


def gptq_weight(n_in, out, bits=4, group_size=128, act_order=False, sym=False, fmt="gptq", seed=1, dtype=H):
    """RTN GPTQ tensors; act_order: the columns quantized in a random order, as act-order files store them (row i
    of qweight keeps its input feature, g_idx[i] says its group)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=g)
    perm = torch.randperm(n_in, generator=g) if act_order else torch.arange(n_in)
    t = gptq_quantize(w[:, perm], bits=bits, group_size=group_size, sym=sym, checkpoint_format=fmt)
    if act_order:
        codes = torch.empty(n_in, out, dtype=torch.int64)
        codes[perm] = unpack_nibble_rows(t["qweight"], bits)
        t["qweight"] = pack_nibble_rows(codes, bits)
        g_idx = torch.empty(n_in, dtype=torch.int32)
        g_idx[perm] = t["g_idx"]
        t["g_idx"] = g_idx
    if seed % 2:
        t["bias"] = torch.randn(out, generator=g).half()
    return make_quant_weight(f"gptq.{seed}", t, n_in, out, dtype, "cpu", checkpoint_offset_qzeros=fmt == "gptq_v2",
                             fast_path=False)


def _reference(q, x):
    bias = None if q.bias is None else q.bias.to(x.dtype)
    return F.linear(x, q.dense(x.dtype), bias)


def _assert_close(got, ref):
    assert got.shape == ref.shape and got.dtype == ref.dtype
    span = ref.float().abs().max().item()
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= 2e-3 * span + 1e-3, (err, span)


def check_kernel(q, rows=(1, 17), dense_rows=(40,)):
    k = ops.prepare_linear(None, None, q, "cpu", H, name=q.key)
    assert k.backend == "triton" and type(k).__name__ in ("Exl2Kernel", "GptqKernel")
    # the kernel's tile decoding is the reference dequantiser, bit for bit
    assert torch.equal(k.dequantize(), q.dense(H))
    g = torch.Generator().manual_seed(7)
    for m in (*rows, *dense_rows):
        x = torch.randn(m, q.in_features, generator=g).to(H)
        y = k(x)
        _assert_close(y, _reference(q, x))
        if m <= k.dense_rows and m > 1:
            # batch invariance: each row alone gives the bits it gives beside the others
            for i in (0, m - 1):
                assert torch.equal(k(x[i:i + 1]), y[i:i + 1])
    return k


EXL2_CASES = {
    # every width in one matrix, widths descending, an output width that is not a multiple of 32
    "mixed_2_to_8": ([(8, 32), (6, 32), (5, 32), (4, 64), (3, 32), (2, 32)], 40),
    # 6-bit groups of 16 rows (3 words each) and a short last group
    "6bit_g16": ([(6, 16)] * 5 + [(4, 32), (3, 32)], 96),
    "3bit_uniform": ([(3, 32)] * 4, 128),
    # the kernel's 4-bit path (one load per word) with a last group that ends inside a word
    "4bit_short_last": ([(4, 64), (4, 64), (4, 20)], 64),
}


@pytest.mark.parametrize("case", EXL2_CASES)
def test_exl2_kernel_equals_reference(case, triton_interpreted):
    groups, out = EXL2_CASES[case]
    check_kernel(exl2_weight(groups, out, seed=len(groups)))


def test_exl2_kernel_at_1024_with_real_tiles(triton_interpreted):
    groups = [(8, 64), (6, 128), (5, 128), (4, 384), (3, 256), (2, 64)]   # about 4 bpw, in = 1024
    k = check_kernel(exl2_weight(groups, 192, seed=3), rows=(1,), dense_rows=())
    assert (k.block_m, k.block_n, k.block_k) == (16, 128, 64) and k.splits > 1


# (weight, whether the kernel reads one scale row per K tile: groups in order, each a whole number of tiles)
GPTQ_CASES = {
    "4bit_g32_asym_act_order_v1": (dict(n_in=256, out=64, group_size=32, act_order=True), False),
    "4bit_g128_sym_v2": (dict(n_in=384, out=48, group_size=128, sym=True, fmt="gptq_v2", seed=2), True),
    "4bit_one_group": (dict(n_in=128, out=80, group_size=None, seed=3), True),
    "8bit_g64_asym_act_order": (dict(n_in=256, out=64, bits=8, group_size=64, act_order=True, seed=5), False),
    "8bit_g32_sym_v2": (dict(n_in=128, out=96, bits=8, group_size=32, sym=True, fmt="gptq_v2", seed=4), False),
    "8bit_g128_asym": (dict(n_in=256, out=32, bits=8, group_size=128, seed=6), True),
}


@pytest.mark.parametrize("case", GPTQ_CASES)
def test_gptq_kernel_equals_reference(case, triton_interpreted):
    kw, seq_groups = GPTQ_CASES[case]
    k = check_kernel(gptq_weight(**kw))
    assert k.seq_groups == seq_groups


def test_gptq_kernel_at_1024_with_real_tiles(triton_interpreted):
    k = check_kernel(gptq_weight(1024, 128, group_size=128, act_order=True, seed=7), rows=(1,), dense_rows=())
    assert (k.block_m, k.block_n, k.block_k) == (16, 128, 64) and k.splits > 1


def test_bf16_activations_use_the_interpreters_fp32_dot(triton_interpreted):
    """bf16 runs through an fp32 dot under the interpreter; its bf16 casts truncate, so only closeness is checked."""
    for q in (exl2_weight([(4, 64), (3, 64)], 64, seed=9, dtype=torch.bfloat16),
              gptq_weight(128, 64, group_size=32, seed=9, dtype=torch.bfloat16)):
        k = ops.prepare_linear(None, None, q, "cpu", torch.bfloat16)
        x = torch.randn(3, q.in_features).to(torch.bfloat16)
        ref = _reference(q, x).float()
        assert (k(x).float() - ref).norm() / ref.norm() < 1e-2


def test_split_k_comes_from_the_shape_not_the_rows(triton_interpreted):
    q = gptq_weight(1024, 64, group_size=64, seed=11)
    k = ops.prepare_linear(None, None, q, "cpu", H)
    splits = k.splits
    x = torch.randn(17, 1024).to(H)
    k(x[:1])
    k(x)
    assert k.splits == splits > 1


@pytest.mark.slow
@pytest.mark.parametrize("n_in,out", [(1024, 1024), (2048, 512), (512, 2048)])
def test_bigger_shapes(n_in, out, triton_interpreted):
    rest = n_in - 64 - 128 - 128 - 64
    check_kernel(exl2_weight([(8, 64), (6, 128), (5, 128), (4, rest), (2, 64)], out, seed=n_in), rows=(1, 16, 33),
                 dense_rows=(64,))
    check_kernel(gptq_weight(n_in, out, group_size=128, act_order=True, seed=n_in + 1), rows=(1, 16, 33),
                 dense_rows=(64,))
    check_kernel(gptq_weight(n_in, out, bits=8, group_size=32, seed=n_in + 3), rows=(1, 20), dense_rows=(64,))


def test_many_rows_share_one_scratch_buffer(triton_interpreted):
    """The dense path dequantises into one buffer per device and dtype, sized for the largest matrix, not one per
    linear."""
    from exllamav2.ops.triton import linear as triton_linear
    triton_linear._scratch.clear()
    big, small = gptq_weight(256, 96, group_size=64, seed=17), exl2_weight([(4, 64), (3, 64)], 64, seed=19)
    for q in (big, small, big):
        k = ops.prepare_linear(None, None, q, "cpu", H)
        x = torch.randn(k.dense_rows + 1, q.in_features).to(H)
        _assert_close(k(x), _reference(q, x))
    assert triton_linear.scratch_bytes() == 256 * 96 * 2


def test_dense_rows_from_the_environment(monkeypatch):
    from exllamav2.ops.triton import linear as triton_linear
    monkeypatch.setenv("EXLLAMAV2_TRITON_DENSE_ROWS", "144")
    assert triton_linear._dense_rows() == 144
    monkeypatch.setenv("EXLLAMAV2_TRITON_DENSE_ROWS", "many")
    with pytest.raises(ValueError, match="EXLLAMAV2_TRITON_DENSE_ROWS='many': expected a whole number"):
        triton_linear._dense_rows()


def test_bad_input_names_the_layer(triton_interpreted):
    q = gptq_weight(128, 64, group_size=32, seed=13)
    k = ops.prepare_linear(None, None, q, "cpu", H)
    with pytest.raises(ValueError, match=r"gptq\.13: input of shape \[2, 64\], expected \(rows, 128\)"):
        k(torch.zeros(2, 64, dtype=H))
    with pytest.raises(ValueError, match=r"gptq\.13: input in torch.bfloat16, this kernel was prepared for torch.float16"):
        k(torch.zeros(2, 128, dtype=torch.bfloat16))


def test_what_the_backend_declines(monkeypatch):
    q = gptq_weight(128, 64, group_size=32, seed=15)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with ops.use_backend("triton"):
        with pytest.raises(NoBackendError, match="TRITON_INTERPRET=1 is not set"):
            ops.prepare_linear(None, None, q, "cpu", H, name="blk.q")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        with pytest.raises(NoBackendError, match="blk.q.*float16 or bfloat16"):
            ops.prepare_linear(None, None, q, "cpu", torch.float32, name="blk.q")
        # dense weights run as F.linear (cuBLAS on a GPU)
        w = torch.randn(8, 16).to(H)
        k = ops.prepare_linear(w, None, None, "cpu", H)
        assert k.backend == "triton" and torch.equal(k(torch.ones(2, 16, dtype=H)), F.linear(torch.ones(2, 16, dtype=H), w))
    # unpinned, the next backend takes what triton declines (cpu: the C++ GEMV over the repacked groups; torch
    # where those kernels cannot be built)
    assert ops.prepare_linear(None, None, q, "cpu", torch.float32).backend in ("cpu", "torch")


def test_batch_invariant_mode_keeps_many_rows_on_the_fused_kernel(triton_interpreted):
    """ops.set_batch_invariant (serve --deterministic): above DENSE_ROWS a call stays on the fused kernel, so each
    row of a many-row call has the bits it has alone; without it the dense path's rows may round otherwise."""
    q = gptq_weight(128, 48, group_size=32, seed=5)
    k = ops.prepare_linear(None, None, q, "cpu", H)
    k.dense_rows = 4
    x = torch.randn(6, 128, generator=torch.Generator().manual_seed(2)).to(H)
    ops.set_batch_invariant(True)
    try:
        y = k(x)
        for i in range(6):
            assert torch.equal(k(x[i:i + 1]), y[i:i + 1])
    finally:
        ops.set_batch_invariant(None)
    _assert_close(k(x), _reference(q, x))  # the dense path again, still right
