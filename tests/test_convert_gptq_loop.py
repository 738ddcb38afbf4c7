"""The EXL2 GPTQ loop (exllamav2/conversion/adaptive_gptq.py) computes what plain column-by-column GPTQ computes:
its two-level lazy updates on a transposed matrix and its scale search over all multipliers at once only reorder
floating-point sums, so codes agree except where a rounding sits on a tie."""

from __future__ import annotations

import torch

from exllamav2.conversion import adaptive_gptq as ag
from exllamav2.conversion.qparams import CANDIDATES, QuantOption


def _scan_scales(w: torch.Tensor, bits: int):
    """The scale search as a plain scan over the multipliers, w (out, rows)."""
    maxq, half = (1 << bits) - 1, 1 << (bits - 1)
    base = w.abs().amax(1) / (maxq / 2)
    smax = base.max().clamp(min=1e-10)
    qscale = torch.clamp(torch.floor(torch.sqrt(base / smax) * 16 + 0.5), 1, 16)
    best, best_err = None, None
    for p in ag.SCALE_SEARCH:
        sm = (smax * p).to(torch.float16)
        s = ag.fp16_scales(qscale, sm)
        q = torch.clamp(torch.floor(w / s.unsqueeze(1) + 0.5) + half, 0, maxq)
        err = ((q - half) * s.unsqueeze(1) - w).abs().pow(ag.ERR_POWER).sum()
        if best_err is None or err < best_err:
            best, best_err = (s, sm), err
    return best[0], qscale, best[1]


def _plain_gptq(W: torch.Tensor, prep: ag.PreparedHessian, option: QuantOption):
    """Column-by-column GPTQ with immediate updates of every later column: (codes (in, out), dequant (out, in))."""
    out, n_in = W.shape
    Wp = W.float()[:, prep.perm].clone()
    Wp[:, prep.dead[prep.perm]] = 0
    Q = torch.empty(n_in, out)
    DQ = torch.empty(out, n_in)
    col = 0
    starts = {}
    for b, r in option.groups(n_in):
        starts[col] = (b, r)
        col += r
    for i in range(n_in):
        if i in starts:
            b, r = starts[i]
            s, _, _ = _scan_scales(Wp[:, i:i + r], b)
            half, maxq = 1 << (b - 1), (1 << b) - 1
        q = torch.clamp(torch.floor(Wp[:, i] / s + 0.5) + half, 0, maxq)
        dq = ((q - half) * s).half().float()
        Q[i], DQ[:, i] = q, dq
        err = (Wp[:, i] - dq) / prep.hinv[i, i]
        Wp[:, i:] -= err.unsqueeze(1) * prep.hinv[i, i:].unsqueeze(0)
    return Q, DQ[:, torch.argsort(prep.perm)]


def test_scale_search_equals_the_scan():
    g = torch.Generator().manual_seed(0)
    for bits in (2, 3, 4, 5, 6, 8):
        for rows in (32, 64, 128):
            w = torch.randn(48, rows, generator=g) * torch.rand(48, 1, generator=g)
            want = _scan_scales(w, bits)
            got = ag.group_scales(w.t().contiguous(), bits)
            for a, b in zip(got, want):
                assert torch.equal(a, b), (bits, rows)


def test_quantize_options_equals_plain_gptq():
    g = torch.Generator().manual_seed(1)
    n_in, out = 320, 40   # several 128-column blocks and a short last one
    X = torch.randn(2000, n_in, generator=g) * torch.rand(n_in, generator=g) ** 2
    W = torch.randn(out, n_in, generator=g)
    prep = ag.prepare_hessian(X.T @ X, 0.01)
    options = [CANDIDATES[0], CANDIDATES[4], CANDIDATES[7], CANDIDATES[-1]]
    results = ag.quantize_options(W, prep, options)
    for opt, res in zip(options, results):
        Q, DQ = _plain_gptq(W, prep, opt)
        same = (res.codes == Q.long()).float().mean()
        assert same > 0.999, f"{opt}: only {float(same):.4f} of the codes agree"
        torch.testing.assert_close(res.dequant, DQ, rtol=0, atol=float((W.abs().max()) * 0.02))
    errors = [r.error for r in results]   # options in increasing bpw: the output error falls
    assert errors == sorted(errors, reverse=True) and errors[-1] < 0.01, errors


def test_group_start_off_the_sub_block_is_refused(monkeypatch):
    monkeypatch.setattr(ag, "SUB_BLOCK", 64)
    W = torch.randn(8, 96)
    prep = ag.prepare_hessian(torch.eye(96))
    try:
        ag.quantize_options(W, prep, [QuantOption((4,), (1.0,), 32)])
    except ValueError as e:
        assert "multiple of 64" in str(e)
    else:
        raise AssertionError("a group starting inside a sub-block must be refused")
