"""The CPU kernel for decode attention over a quantized paged cache (exllamav2/ops/cpu/csrc/attention_quant.cpp),
which reads the codes as stored (the query and the output rotated instead of every key and value), against fp64
attention over the fp32-dequantised pages, beside the reference op (ops/torch_ref/attention_quant.py), which
rounds each dequantised row to the activation dtype first: every format pair, dtypes, GQA widths, head dims,
scattered pages, sliding windows, softcap; a sequence alone equals itself among others; bad arguments named."""

from __future__ import annotations

import pytest
import torch

from exllamav2.ops.cpu import attention as cpu_attention
from exllamav2.ops.cpu import kernels
from exllamav2.ops.torch_ref.kv_quant import QuantPages, format_named

if not kernels.ready() or not kernels.loaded_with_avx512():
    pytest.skip("the CPU kernels (AVX-512) are not available here", allow_module_level=True)

FORMAT_PAIRS = [("q4", "q4"), ("q8", "q4"), ("q8", "q8"), ("fp8", "fp8"), ("q4", "fp8")]
# max |error| / max |exact|: the kernel's fp32 math and one rounding of the output to the dtype
TOL = {torch.float32: 2e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


def _case(formats, dtype, B, hq, hk, d, ps, lens, seed):
    g = torch.Generator().manual_seed(seed)
    kf, vf = format_named(formats[0]), format_named(formats[1])
    need = sum(-(-n // ps) for n in lens)
    npages = need + 5
    old = torch.randn(2, npages * ps, hk, d, generator=g)
    old[0, :, :, 3] *= 10  # an outlier channel, as real keys have
    kc, ks = kf.quantize(old[0].to(dtype), dtype)
    vc, vs = vf.quantize(old[1].to(dtype), dtype)
    pages = QuantPages(kc, ks, vc, vs, kf, vf, dtype)
    perm = torch.randperm(npages, generator=g)
    width = max(-(-n // ps) for n in lens) + 2
    table = torch.zeros(B, width, dtype=torch.long)
    at = 0
    for i, n in enumerate(lens):
        k = -(-n // ps)
        table[i, :k] = perm[at:at + k]
        at += k
    q = torch.randn(B, hq, d, generator=g).to(dtype)
    return q, pages, table, torch.tensor(lens)


def _exact(q, pages, table, lens, ps, window, scale, softcap):
    hq, d = q.shape[1:]
    hk = pages.k_codes.shape[1]
    outs = []
    for i, n in enumerate(lens.tolist()):
        pos = torch.arange(n)
        slots = table[i][pos // ps] * ps + pos % ps
        k, v = (t.double() for t in pages.read(slots, torch.float32))
        qq = q[i].double().view(hk, hq // hk, d)
        s = torch.einsum("hgd,thd->hgt", qq, k) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if window and n > window:
            s[..., :n - window] = -float("inf")
        outs.append(torch.einsum("hgt,thd->hgd", torch.softmax(s, -1), v).reshape(hq, d))
    return torch.stack(outs)


@pytest.mark.parametrize("formats", FORMAT_PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("hq,hk,d", [(9, 3, 64), (4, 4, 32), (16, 2, 128)])
def test_kernel_equals_fp64_attention(formats, dtype, hq, hk, d):
    ps, lens = 16, (37, 5, 130)
    q, pages, table, kv = _case(formats, dtype, 3, hq, hk, d, ps, lens, seed=hq + d)
    for window, softcap in ((0, 0.0), (20, 0.0), (0, 30.0)):
        got = cpu_attention.quant_paged_decode(q, pages, table, kv, ps, window, 0.125, softcap)
        want = _exact(q, pages, table, kv, ps, window, 0.125, softcap)
        assert got.dtype == dtype and got.shape == q.shape
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err <= TOL[dtype], f"{formats} {dtype} window {window} softcap {softcap}: {err:.2e}"
        ref = torch.ops.exllamav2.quant_paged_decode_attention(
            q, pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales, formats[0], formats[1], table, kv, ps,
            window, 0.125, softcap)
        # the reference rounds the dequantised rows to the dtype: the kernel is no further from fp64 than it, give
        # or take the output's own rounding
        ref_err = ((ref.double() - want).abs().max() / want.abs().max()).item()
        assert err <= ref_err + TOL[dtype] / 2


@pytest.mark.parametrize("formats", [("q4", "q4"), ("q8", "fp8")])
def test_long_contexts_split_at_fixed_positions(formats):
    """Contexts over several splits of keys (256 a task, csrc/attention_quant.cpp), a sliding window that starts
    inside a split: equal to fp64 attention, and the same bits with one thread or two."""
    ps = 32
    q, pages, table, kv = _case(formats, torch.bfloat16, 4, 9, 3, 64, ps, (600, 257, 256, 1000), seed=11)
    for window in (0, 300):
        got = cpu_attention.quant_paged_decode(q, pages, table, kv, ps, window, 0.125, 0.0)
        want = _exact(q, pages, table, kv, ps, window, 0.125, 0.0)
        err = ((got.double() - want).abs().max() / want.abs().max()).item()
        assert err <= TOL[torch.bfloat16], f"window {window}: {err:.2e}"
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = cpu_attention.quant_paged_decode(q, pages, table, kv, ps, window, 0.125, 0.0)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(one, got)


def test_a_sequence_alone_equals_itself_among_others():
    ps = 8
    q, pages, table, kv = _case(("q4", "q8"), torch.bfloat16, 4, 6, 2, 64, ps, (50, 3, 17, 64), seed=5)
    both = cpu_attention.quant_paged_decode(q, pages, table, kv, ps, 0, 0.1, 0.0)
    for i in range(4):
        one = cpu_attention.quant_paged_decode(q[i:i + 1], pages, table[i:i + 1], kv[i:i + 1], ps, 0, 0.1, 0.0)
        assert torch.equal(one[0], both[i])


def test_no_visible_key_gives_nan_and_bad_arguments_are_named():
    ps = 16
    q, pages, table, kv = _case(("q8", "q8"), torch.float32, 2, 4, 2, 32, ps, (0, 9), seed=1)
    out = cpu_attention.quant_paged_decode(q, pages, table, kv, ps, 0, 0.2, 0.0)
    assert out[0].isnan().all() and not out[1].isnan().any()
    op = torch.ops.exllamav2_cpu.quant_paged_decode_attention
    with pytest.raises(RuntimeError, match="kv_lens\\[1\\]"):
        op(q, pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales, 1, 1, table, torch.tensor([0, 10 ** 6]),
           ps, 0, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="block_index\\[1, 0\\]"):
        op(q, pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales, 1, 1, torch.full_like(table, 999), kv,
           ps, 0, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="k_codes must be uint8"):
        op(q, pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales, 0, 1, table, kv, ps, 0, 0.2, 0.0)
    with pytest.raises(RuntimeError, match="k_scales must be float"):
        op(q, pages.k_codes, None, pages.v_codes, pages.v_scales, 1, 1, table, kv, ps, 0, 0.2, 0.0)


def test_the_paged_op_takes_the_kernel_for_decode_steps(monkeypatch):
    """ops.quant_paged_attention on the CPU: a decode-only step goes to the kernel, and gives what it gives."""
    from exllamav2 import ops
    from exllamav2.attn_params import PagedParams
    ps = 16
    q, pages, table, kv = _case(("q4", "q4"), torch.bfloat16, 2, 4, 2, 64, ps, (20, 33), seed=2)
    calls = []
    real = cpu_attention.quant_paged_decode
    monkeypatch.setattr(cpu_attention, "quant_paged_decode", lambda *a: calls.append(1) or real(*a))
    past = (kv - 1).tolist()
    params = PagedParams([table[i].tolist() for i in range(2)], past, [1, 1], ps)
    g = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 2, 64, generator=g).bfloat16()
    v = torch.randn(1, 2, 2, 64, generator=g).bfloat16()
    out = ops.quant_paged_attention(q.unsqueeze(0), k, v, pages, params, 0, 0.125)
    assert calls == [1] and out.shape == (1, 2, 4 * 64)
    # the new tokens were written first, and the kernel read them
    want = real(q, pages, torch.tensor(params.block_index.tolist()), kv, ps, 0, 0.125, 0.0)
    assert torch.equal(out.view(2, 4, 64), want)


@pytest.mark.parametrize("fmt", ["q4", "q8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_the_write_kernel_gives_the_reference_codes(fmt, dtype):
    """csrc/kv_quant_write.cpp against QuantPages.write, bit for bit: codes and scales, scattered slots, rows of
    zeros, large values (fp16 scales near their max), a spike in a group."""
    g = torch.Generator().manual_seed(11)
    f = format_named(fmt)
    slots_n, hk, d, T = 64, 3, 64, 20
    x = torch.randn(2, T, hk, d, generator=g) * 3
    x[0, 0] = 0.0
    x[1, 1, 0, 5] = 40.0
    if dtype != torch.float16:
        x[0, 2] *= 1e4
    x = x.to(dtype)
    kc, ks = f.quantize(torch.zeros(slots_n, hk, d, dtype=dtype), dtype)
    vc, vs = f.quantize(torch.zeros(slots_n, hk, d, dtype=dtype), dtype)
    mine = QuantPages(kc.clone(), None if ks is None else ks.clone(), vc.clone(), None if vs is None else vs.clone(),
                      f, f, dtype)
    ref = QuantPages(kc.clone(), None if ks is None else ks.clone(), vc.clone(), None if vs is None else vs.clone(),
                     f, f, dtype)
    slots = torch.randperm(slots_n, generator=g)[:T]
    assert cpu_attention.quant_write(mine, x[0], x[1], slots)
    ref.write(x[0], x[1], slots)
    for a, b in ((mine.k_codes, ref.k_codes), (mine.v_codes, ref.v_codes), (mine.k_scales, ref.k_scales),
                 (mine.v_scales, ref.v_scales)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert mine.k_codes[slots].any()
    with pytest.raises(RuntimeError, match="slots\\[0\\]"):
        torch.ops.exllamav2_cpu.quant_kv_write(x[0][:1], x[1][:1], mine.k_codes, mine.k_scales, mine.v_codes,
                                               mine.v_scales, 1 if fmt == "q8" else (0 if fmt == "q4" else 2),
                                               1 if fmt == "q8" else (0 if fmt == "q4" else 2),
                                               torch.tensor([slots_n]))
