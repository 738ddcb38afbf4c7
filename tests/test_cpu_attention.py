"""The cpu backend's attention kernel for decode and prefill rows (exllamav2/ops/cpu/csrc/attention.cpp) against the
reference
(exllamav2/ops/torch_ref/attention.py: torch's SDPA, or the fp32 softcap path).

Tolerance: the kernel computes scores, softmax and the weighted sum in fp32 and rounds the output once to the
inputs' dtype, so against the same math in fp64 on the same inputs each output is within one unit in the last place
of its dtype (half a unit from the final rounding, the rest fp32 noise) plus 1e-5 of the largest value. For bf16
it rounds the probabilities to bf16 before they multiply v (as torch's flash kernel does), which moves an output
by at most 2^-8 (bf16's unit roundoff) times the probability-weighted mean of |v|: `close` adds that bound. torch's
SDPA is not that close in bf16/fp16: against it, outputs agree within 1e-2 relative in norm.

Determinism: the kernel cuts the keys into splits at fixed positions and merges them in order, so a row's output is
bit-identical whatever the thread count, the other sequences and rows of the call, and the keys past its last
visible one (the team's rule: the same request gives the same tokens alone or among others)."""

from __future__ import annotations

import pytest
import torch

from exllamav2 import ops
from exllamav2.ops.cpu import attention as cpu_attention
from exllamav2.ops.cpu import kernels
from exllamav2.ops.torch_ref.attention import attention as reference, window_mask

if not (kernels.ready() and kernels.isa() == "avx512"):
    pytest.skip("the attention kernel needs the CPU kernels built and AVX-512", allow_module_level=True)


def exact(q, k, v, mask, scale, softcap, causal):
    """The reference's math in fp64 (GQA by repetition, bottom-right causal alignment), and beside it the
    probability-weighted mean of |v| (the scale of the bf16 probabilities' rounding): a pair for `close`."""
    q, k, v = q.double(), k.double(), v.double()
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s, t = q.shape[2], k.shape[2]
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    keep = torch.ones(s, t, dtype=torch.bool).tril(t - s) if causal else torch.ones(s, t, dtype=torch.bool)
    if mask is not None:
        keep = keep & mask
    p = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    return p @ v, p @ v.abs()


def close(got, want, dtype):
    want, mean_abs = want
    bound = torch.finfo(dtype).eps * want.abs() + 1e-5 * want.abs().max()
    if dtype == torch.bfloat16:
        bound = bound + 2.0 ** -8 * mean_abs
    return ((got.double() - want).abs() <= bound).all()


def cache_views(b, hk, t, d, dtype, g):
    """k, v as attn.py passes them: (b, hk, t, d) views of a (b, max_len, hk, d) cache."""
    kc = torch.randn(b, t + 5, hk, d, generator=g).to(dtype)
    vc = torch.randn(b, t + 5, hk, d, generator=g).to(dtype)
    return kc[:, :t].transpose(1, 2), vc[:, :t].transpose(1, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,hq,hk,s,t,d", [(1, 9, 3, 1, 37, 64), (3, 4, 4, 1, 200, 128), (2, 8, 2, 5, 19, 32),
                                           (1, 2, 1, 16, 16, 16), (1, 9, 3, 1, 1000, 64), (1, 8, 1, 3, 3000, 256),
                                           (2, 8, 8, 16, 300, 48), (1, 24, 3, 16, 129, 128), (1, 16, 2, 2, 1000, 80),
                                           # prefills: more rows than the few-row path takes, blocks of rows
                                           (1, 9, 3, 100, 100, 64), (2, 4, 4, 40, 300, 32), (1, 24, 3, 150, 520, 128),
                                           (1, 2, 2, 17, 17, 16)])
def test_decode_attention_equals_reference(dtype, b, hq, hk, s, t, d):
    g = torch.Generator().manual_seed(b * 100 + t)
    q = torch.randn(b, s, hq, d, generator=g).to(dtype).transpose(1, 2)
    k, v = cache_views(b, hk, t, d, dtype, g)
    scale = d ** -0.5
    for mask, causal in ((None, False), (None, s > 1), (window_mask(t, s, max(2, t // 3), "cpu"), False)):
        if mask is not None and mask.shape[0] != b:
            mask = mask.expand(b, 1, s, t) if b > 1 and t % 2 else mask
        for softcap in (0.0, 30.0):
            ref = reference(q, k, v, mask, scale, softcap, causal).float()
            got = torch.ops.exllamav2_cpu.decode_attention(q, k, v, mask, scale, softcap, causal)
            assert got.dtype == dtype and got.shape == ref.shape
            want = exact(q, k, v, mask, scale, softcap, causal)
            assert close(got, want, dtype), (mask is None, causal, softcap, (got.double() - want[0]).abs().max())
            assert (got.float() - ref).norm() <= 1e-2 * ref.norm()


def test_rows_are_independent_and_the_op_dispatches_to_the_kernel():
    g = torch.Generator().manual_seed(5)
    b, hq, hk, t, d = 4, 9, 3, 50, 64
    q = torch.randn(b, hq, 1, d, generator=g).bfloat16()
    k, v = cache_views(b, hk, t, d, torch.bfloat16, g)
    together = torch.ops.exllamav2_cpu.decode_attention(q, k, v, None, 0.125, 0.0, False)
    for i in range(b):
        alone = torch.ops.exllamav2_cpu.decode_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], None, 0.125, 0.0, False)
        assert torch.equal(alone, together[i:i + 1])
    with ops.use_backend("cpu"):
        assert ops.attention.choose(q, k, v, None, 0.125).fn is cpu_attention.attention
        assert torch.equal(ops.attention(q, k, v, None, 0.125), together)
        # a prefill takes the kernel too
        qp = torch.randn(1, hq, 70, d, generator=g).bfloat16()
        kp, vp = cache_views(1, hk, 90, d, torch.bfloat16, g)
        assert torch.equal(ops.attention(qp, kp, vp, None, 0.125, 0.0, True),
                           torch.ops.exllamav2_cpu.decode_attention(qp, kp, vp, None, 0.125, 0.0, True))


def test_decode_attention_rejects_bad_inputs():
    q = torch.randn(1, 9, 1, 64)
    k = torch.randn(1, 3, 10, 64)
    with pytest.raises(RuntimeError, match="not a multiple of 2 kv heads"):
        torch.ops.exllamav2_cpu.decode_attention(q, k[:, :2], k[:, :2], None, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="head_dim 40 must be a multiple of 16"):
        torch.ops.exllamav2_cpu.decode_attention(q[..., :40], k[..., :40], k[..., :40], None, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="mask must be bool"):
        torch.ops.exllamav2_cpu.decode_attention(q, k, k, torch.ones(1, 1, 1, 9, dtype=torch.bool), 1.0, 0.0, False)


def padded_batch(seqs, s, dtype, g, hq=9, hk=3, d=64):
    """Sequences of different lengths, alone and as one right-padded batch with a mask (padding keys are noise)."""
    tmax = max(seqs)
    q = torch.randn(len(seqs), hq, s, d, generator=g).to(dtype)
    k, v = cache_views(len(seqs), hk, tmax, d, dtype, g)
    mask = torch.zeros(len(seqs), 1, s, tmax, dtype=torch.bool)
    for i, t in enumerate(seqs):
        mask[i, 0, :, :t] = torch.ones(s, t, dtype=torch.bool).tril(t - s)
    return q, k, v, mask


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("s", [1, 5])
def test_a_sequence_gives_the_same_bits_alone_batched_and_on_any_thread_count(dtype, s):
    seqs = [37, 300, 1000, 2100, 129]
    q, k, v, mask = padded_batch(seqs, s, dtype, torch.Generator().manual_seed(s))
    op = torch.ops.exllamav2_cpu.decode_attention
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            alone = [op(q[i:i + 1], k[i:i + 1, :, :t], v[i:i + 1, :, :t], None, 0.125, 0.0, s > 1)
                     for i, t in enumerate(seqs)]
            results.append((alone, op(q, k, v, mask, 0.125, 0.0, False)))
    finally:
        torch.set_num_threads(threads)
    for alone, batched in results:
        for i, a in enumerate(alone):
            assert torch.equal(a, batched[i:i + 1]), (i, seqs[i])
            assert torch.equal(a, results[0][0][i])
            assert close(a, exact(q[i:i + 1], k[i:i + 1, :, :seqs[i]], v[i:i + 1, :, :seqs[i]], None, 0.125, 0.0,
                                  s > 1), dtype)


@pytest.mark.parametrize("t", [16, 200, 1500])
def test_a_query_row_does_not_depend_on_the_rows_and_keys_after_it(t):
    """The paged path (ops/torch_ref/attention.attend_sequence) may compute a 16-row query block in two calls
    when the step budget cuts a prompt inside it: the first over fewer keys. Each row must come out the same."""
    g = torch.Generator().manual_seed(t)
    q = torch.randn(1, 12, 16, 128, generator=g).bfloat16()
    k, v = cache_views(1, 4, t, 128, torch.bfloat16, g)
    op = torch.ops.exllamav2_cpu.decode_attention
    whole = op(q, k, v, None, 0.09, 0.0, True)
    for cut in (1, 7, 15):
        first = op(q[:, :, :cut], k[:, :, :t - 16 + cut], v[:, :, :t - 16 + cut], None, 0.09, 0.0, True)
        rest = op(q[:, :, cut:], k, v, None, 0.09, 0.0, True)
        assert torch.equal(torch.cat([first, rest], 2), whole), cut


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("hq,hk,s,t", [(9, 3, 300, 300), (8, 8, 45, 400), (16, 2, 129, 700)])
def test_a_prefill_row_is_the_row_computed_alone(dtype, hq, hk, s, t):
    """Many query rows run in blocks of rows (a task each, costliest first); each row must be bit-identical to the
    few-row path on that row alone over its own keys, on any thread count, with a window mask too: the paged path
    relies on it when a prompt is prefilled in one call, in chunks, or beside other jobs."""
    g = torch.Generator().manual_seed(s + t)
    d = 64
    q = torch.randn(1, s, hq, d, generator=g).to(dtype).transpose(1, 2)
    k, v = cache_views(1, hk, t, d, dtype, g)
    op = torch.ops.exllamav2_cpu.decode_attention
    win = window_mask(t, s, 97, "cpu")
    threads = torch.get_num_threads()
    try:
        wholes = []
        for n in (1, 2):
            torch.set_num_threads(n)
            wholes.append((op(q, k, v, None, 0.125, 0.0, True), op(q, k, v, win, 0.125, 0.0, False)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(wholes[0][0], wholes[1][0]) and torch.equal(wholes[0][1], wholes[1][1])
    causal, windowed = wholes[0]
    for i in list(range(0, s, 7)) + [s - 1]:
        end = t - s + i + 1  # the keys row i sees
        alone = op(q[:, :, i:i + 1], k[:, :, :end], v[:, :, :end], None, 0.125, 0.0, False)
        assert torch.equal(alone, causal[:, :, i:i + 1]), i
        alone_w = op(q[:, :, i:i + 1], k[:, :, :end], v[:, :, :end], win[:, :, i:i + 1, :end], 0.125, 0.0, False)
        assert torch.equal(alone_w, windowed[:, :, i:i + 1]), i
    assert close(causal, exact(q, k, v, None, 0.125, 0.0, True), dtype)


def test_a_fully_masked_row_gives_nan():
    """NaN, as the reference's fp32 (softcap) path gives; torch 2.13's SDPA gives zeros there instead. No model
    masks a row fully (a query always sees its own key), so only the kernel's own rule is pinned here."""
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 4, 2, 64, generator=g)
    k, v = cache_views(1, 2, 300, 64, torch.float32, g)
    mask = torch.ones(1, 1, 2, 300, dtype=torch.bool)
    mask[0, 0, 1] = False
    for softcap in (0.0, 30.0):
        got = torch.ops.exllamav2_cpu.decode_attention(q, k, v, mask, 0.125, softcap, False)
        assert got[:, :, 1].isnan().all() and not got[:, :, 0].isnan().any()
    assert reference(q, k, v, mask, 0.125, 30.0)[:, :, 1].isnan().all()


def test_the_output_is_laid_out_b_s_h_d_and_its_fake_says_so():
    """The kernel writes (b, s, hq, d) and returns its (b, hq, s, d) view, so attn.py's transpose back to
    (b, s, hq * d) costs no copy; the fake implementation (ops/cpu/kernels.py) gives the compiled step the same
    strides (torch.library.opcheck compares them)."""
    g = torch.Generator().manual_seed(5)
    q = torch.randn(2, 9, 7, 64, generator=g).bfloat16()
    k, v = cache_views(2, 3, 30, 64, torch.bfloat16, g)
    out = torch.ops.exllamav2_cpu.decode_attention(q, k, v, None, 0.125, 0.0, True)
    assert out.shape == q.shape and out.transpose(1, 2).is_contiguous()
    torch.library.opcheck(torch.ops.exllamav2_cpu.decode_attention.default, (q, k, v, None, 0.125, 0.0, True),
                          test_utils=("test_faketensor",))
