"""GPTQ for EXL2 (survey §4.4-4.6, §5.3): act-order, mixed widths by group, 4-bit scale codes under a per-group
maximum, and error feedback through the Cholesky factor of the inverse Hessian.

Several options for one weight are quantized in one pass: they share the permutation and the inverse Hessian, so
their rows are stacked and only the per-column width and the scale groups differ.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .qparams import QuantOption

BLOCK = 128  # lazy-update block; a multiple of every group size, so no scale group straddles two blocks
SUB_BLOCK = 32  # inner lazy-update block; every group size is a multiple of it, so groups start on sub-block starts
SCALE_SEARCH = torch.linspace(0.70, 1.20, 17).tolist()  # multipliers of the group's scale maximum (original: 97)
ERR_POWER = 3.5


@contextlib.contextmanager
def single_cpu_thread(device: torch.device):
    """The column loop is thousands of small ops; with 2+ threads on a busy machine each op waits on thread
    wake-ups (measured 30x slower on the 2-core CI box), so it runs on one thread."""
    if device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _round(x: torch.Tensor) -> torch.Tensor:
    # Round half up. torch.round is ~500x slower than this on the CPU build in use (measured, torch 2.13).
    return torch.floor(x + 0.5)


@dataclass
class PreparedHessian:
    perm: torch.Tensor       # (in,) quantized row k is input feature perm[k]
    hinv: torch.Tensor       # (in, in) upper Cholesky factor of the damped inverse, in permuted order
    damp: float              # the multiple of the identity added to H before inversion
    h_perm: torch.Tensor     # (in, in) the undamped Hessian, permuted (for output-error measurement)
    dead: torch.Tensor       # (in,) bool, features never active in the calibration data


# Damping as a fraction of mean(diag H), chosen by the conversion's target bpw. Low damping fits the calibration text
# closely; that pays at low targets, where GPTQ's error compensation is most of the gain, and costs at high targets,
# where the remaining error is small and the fit to the calibration text generalizes worse. Measured on SmolLM2-135M
# (perplexity on texts unlike the calibration text): whole-model 6-bit g64 GPTQ moved +1.98% / +1.37% at 0.01,
# +1.60 / +0.96 at 0.05, +0.80 / +0.72 at 0.1, +1.68 / +1.26 at 0.2, +2.75 / +1.07 at 0.5
# (bench/quant_diagnosis.py --only gptq6_damp0.01 ...). Converted with bench/quant_quality.py: 0.1 everywhere took
# EXL2 6.0 from +3.58% to +2.28% and 4.0 from +24.4% to +36.3%; 0.1 only for options of 5 bits and up gave 6.0 +3.33%
# and 4.0 +23.3%, so the whole conversion's regime, not each option's width, decides.
DAMP_LOW_TARGET = 0.01
DAMP_HIGH_TARGET = 0.1
HIGH_TARGET_BPW = 5.0
DAMP = DAMP_LOW_TARGET   # prepare_hessian's default


def damp_for_target(bits: float) -> float:
    return DAMP_HIGH_TARGET if bits >= HIGH_TARGET_BPW else DAMP_LOW_TARGET


def prepare_hessian(H: torch.Tensor, damp: float = DAMP) -> PreparedHessian:
    # LAPACK's cholesky_inverse on 2 threads of a busy 2-core machine took 3.3 s at 576 and 18.8 s at 1536 wide,
    # against 0.03 s and 0.2 s on one thread: the quantize stage spent a quarter of its time here.
    with single_cpu_thread(H.device):
        return _prepare_hessian(H, damp)


def _prepare_hessian(H: torch.Tensor, damp: float) -> PreparedHessian:
    H = H.to(torch.float32).clone()
    n = H.shape[0]
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    Hp = H[perm][:, perm]
    eye = torch.eye(n, device=H.device)
    mean = torch.mean(torch.diag(Hp))
    for attempt in range(6):
        try:
            L = torch.linalg.cholesky(Hp + damp * mean * eye)
            hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
        except torch.linalg.LinAlgError:
            damp *= 10  # the original raises the dampening on failure too
    else:
        raise RuntimeError("prepare_hessian: the Hessian stays singular after dampening")
    return PreparedHessian(perm=perm, hinv=hinv, damp=float(damp * mean), h_perm=Hp, dead=dead)


def reference_target(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, damp: float) -> torch.Tensor:
    """The weight GPTQ should aim at when the layer's inputs X come from the partly quantized model but its outputs
    should match the unquantized model's, W X_ref (asymmetric calibration, as in GPTAQ): the least-squares
    W' = argmin ||X Q^T - X_ref W^T||^2 + lam ||Q - W||^2 = W (C + lam I)(H + lam I)^-1, with H = X^T X,
    C = X_ref^T X and lam = damp * mean(diag H). Since the same damped H is GPTQ's objective, quantizing W' with it
    minimises exactly that penalised error. lam pulls W' back to W where the calibration data say little."""
    if torch.equal(C, H):  # inputs unchanged so far (the first layer): W itself, exactly
        return W
    return ReferenceSolver(H, C, damp).target(W)


class ReferenceSolver:
    """reference_target for every linear that reads the same input: the damped H is factored once."""

    def __init__(self, H: torch.Tensor, C: torch.Tensor, damp: float):
        self.identity = torch.equal(C, H)
        if self.identity:
            return
        with single_cpu_thread(H.device):
            H = H.to(torch.float32)
            n = H.shape[0]
            lam = damp * float(torch.mean(torch.diag(H)).clamp(min=1e-12))
            eye = torch.eye(n, device=H.device)
            self.L = torch.linalg.cholesky(H + lam * eye)
            self.Ct = (C.to(torch.float32) + lam * eye).T

    def target(self, W: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return W
        with single_cpu_thread(W.device):
            rhs = self.Ct @ W.to(torch.float32).T   # (in, out)
            return torch.cholesky_solve(rhs, self.L).T.contiguous()


def fp16_scales(qscale: torch.Tensor, scale_max: torch.Tensor) -> torch.Tensor:
    """The scales the runtime will use (exl2_scales at fp16): fp16((qscale^2) * fp16(fp16(scale_max) / 256)).
    qscale (..., cols) in [1, 16]; scale_max broadcastable fp32."""
    smax = (scale_max.to(torch.float16) * (1 / 256)).to(torch.float32)
    return ((qscale.to(torch.float32) ** 2) * smax).to(torch.float16).to(torch.float32)


SCALE_SEARCH_CHUNK = 1 << 24  # elements of the (multipliers, out, rows) trial tensor at once


def group_scales(wt: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scales for one group of current (error-updated) weights, given transposed: wt (rows, out).
    Returns (scale (out,), qscale codes (out,) in [1, 16], scale_max fp16 scalar).
    Every multiplier of SCALE_SEARCH is tried in one tensor op (in chunks); the first with the least error wins."""
    maxq = (1 << bits) - 1
    half = 1 << (bits - 1)
    wt = wt.contiguous()
    base = wt.abs().amax(0) / (maxq / 2)
    smax = base.max().clamp(min=1e-10)
    qscale = torch.clamp(_round(torch.sqrt(base / smax) * 16), 1, 16)
    mult = torch.tensor(SCALE_SEARCH, dtype=torch.float32, device=wt.device)
    sm = (smax * mult).to(torch.float16)                      # (k,)
    s = fp16_scales(qscale.unsqueeze(0), sm.unsqueeze(1))     # (k, out)
    step = max(1, SCALE_SEARCH_CHUNK // max(1, wt.numel()))
    errs = []
    for a in range(0, len(SCALE_SEARCH), step):
        sc = s[a:a + step].unsqueeze(1)                       # (k, 1, out)
        # |(clamp(round(w / s) + half, 0, maxq) - half) * s - w| ^ ERR_POWER, in place
        e = torch.div(wt, sc).add_(0.5).floor_().add_(half).clamp_(0, maxq).sub_(half).mul_(sc).sub_(wt)
        errs.append(e.abs_().pow_(ERR_POWER).sum((1, 2)))
    k = int(torch.argmin(torch.cat(errs)))  # the first of equal minima, as a strict < scan picks
    return s[k], qscale, sm[k]


@dataclass
class Exl2Quantized:
    """One option's result. codes (in, out) in quantized row order; dequant (out, in) fp32 in original order,
    exactly what the runtime reconstructs (fp16 products)."""

    option: QuantOption
    groups: list[tuple[int, int]]
    codes: torch.Tensor
    scale_codes: torch.Tensor  # (groups, out) stored code = qscale - 1
    scale_max: torch.Tensor    # (groups,) fp16
    perm: torch.Tensor
    dequant: torch.Tensor
    error: float               # relative output error on the calibration inputs (see quantize_options)


def quantize_options(W: torch.Tensor, prep: PreparedHessian, options: list[QuantOption]) -> list[Exl2Quantized]:
    """GPTQ-quantize W (out, in) under every option at once.

    Each result's error is ||X (W - Wq)^T|| / ||X W^T|| on the calibration inputs, from GPTQ's own bookkeeping:
    with U the upper Cholesky factor of (H + damp I)^-1, the quantization error is D = E U for the scaled
    per-column errors E, so tr(D H D^T) = ||E||^2 - damp ||D||^2 exactly, without an (in x in) product per option."""
    with single_cpu_thread(W.device):
        return _quantize_options(W, prep, options)


def _quantize_options(W: torch.Tensor, prep: PreparedHessian, options: list[QuantOption]) -> list[Exl2Quantized]:
    out, n_in = W.shape
    n = len(options)
    dev = W.device
    Wp = W.to(torch.float32)[:, prep.perm].clone()
    Wp[:, prep.dead[prep.perm]] = 0
    # Transposed, (in, options * out): every column the loop visits is one contiguous row.
    WallT = Wp.t().repeat(1, n).contiguous()
    layouts = [o.groups(n_in) for o in options]

    # Per column: which options start a group there.
    starts: dict[int, list[tuple[int, int, int, int]]] = {}
    for oi, groups in enumerate(layouts):
        col = 0
        for gi, (b, r) in enumerate(groups):
            starts.setdefault(col, []).append((oi, gi, b, r))
            col += r
    if any(c % SUB_BLOCK for c in starts):
        raise ValueError(f"quantize_options: a scale group starts at a column that is not a multiple of {SUB_BLOCK}")
    scale = torch.ones(n * out, device=dev)
    zero = torch.zeros(n * out, device=dev)
    maxq = torch.zeros(n * out, device=dev)
    QT = torch.empty((n_in, n * out), dtype=torch.uint8, device=dev)
    DQT = torch.empty((n_in, n * out), device=dev)
    scale_codes = [torch.empty((len(g), out), dtype=torch.int64) for g in layouts]
    scale_max = [torch.empty(len(g), dtype=torch.float16) for g in layouts]
    hinv = prep.hinv
    e_sq = torch.zeros(n * out, dtype=torch.float64, device=dev)

    # Lazy updates on two levels: within a SUB_BLOCK, rank-1 updates of the sub-block's own columns; after it, one
    # product for the rest of the BLOCK; after a BLOCK, one product for the rest of the matrix. Group starts are
    # sub-block starts, so each group's scales see weights updated by every column before it, as plain GPTQ does.
    for b0 in range(0, n_in, BLOCK):
        b1 = min(b0 + BLOCK, n_in)
        W1 = WallT[b0:b1].clone()          # (block, options * out)
        E1 = torch.empty_like(W1)
        H1 = hinv[b0:b1, b0:b1]
        for s0 in range(0, b1 - b0, SUB_BLOCK):
            s1 = min(s0 + SUB_BLOCK, b1 - b0)
            for i in range(s0, s1):
                c = b0 + i
                for oi, gi, b, r in starts.get(c, ()):
                    rows = slice(oi * out, (oi + 1) * out)
                    s, qs, sm = group_scales(W1[i:i + r, rows], b)
                    scale[rows], zero[rows], maxq[rows] = s, float(1 << (b - 1)), float((1 << b) - 1)
                    scale_codes[oi][gi] = (qs - 1).to(torch.int64).cpu()
                    scale_max[oi][gi] = sm.cpu()
                w = W1[i]
                q = torch.minimum(torch.clamp_min(_round(w / scale) + zero, 0), maxq)
                dq = ((q - zero) * scale).to(torch.float16).to(torch.float32)
                QT[c] = q.to(torch.uint8)
                DQT[c] = dq
                err = (w - dq) / H1[i, i]
                if i + 1 < s1:
                    W1[i + 1:s1].addr_(H1[i, i + 1:s1], err, alpha=-1)
                E1[i] = err
            if s1 < b1 - b0:
                W1[s1:].addmm_(H1[s0:s1, s1:].t(), E1[s0:s1], alpha=-1)
        e_sq += E1.to(torch.float64).pow(2).sum(0)
        if b1 < n_in:
            WallT[b1:].addmm_(hinv[b0:b1, b1:].t(), E1, alpha=-1)

    invperm = torch.argsort(prep.perm)
    ref = ((Wp @ prep.h_perm) * Wp).sum().to(torch.float64).clamp(min=1e-30)
    results = []
    for oi, opt in enumerate(options):
        rows = slice(oi * out, (oi + 1) * out)
        dq = DQT[:, rows].t()
        d_sq = (Wp - dq).to(torch.float64).pow(2).sum()
        err = float(torch.sqrt((e_sq[rows].sum() - prep.damp * d_sq).clamp(min=0) / ref))
        results.append(Exl2Quantized(opt, layouts[oi], QT[:, rows].to(torch.int64).cpu(), scale_codes[oi],
                                     scale_max[oi], prep.perm.cpu(), dq[:, invperm].contiguous(), err))
    return results


def output_errors(W: torch.Tensor, prep: PreparedHessian, dequants: list[torch.Tensor],
                  row_weights: torch.Tensor | None = None, tokens: int | None = None) -> list[float]:
    """Relative Frobenius error of the layer output on the calibration inputs, ||X (W - Wq)^T|| / ||X W^T||,
    computed from H = X^T X: sqrt(tr(D H D^T) / tr(W H W^T)).
    With row_weights (out,) (the loss's mean squared gradient per output) and the token count behind H, the error is
    instead sqrt(sum_i w_i (D H D^T)_ii / tokens): the square root of twice the expected loss increase per token."""
    Hp = prep.h_perm
    p = prep.perm
    Wp = W.to(torch.float32)[:, p]
    ref = ((Wp @ Hp) * Wp).sum().clamp(min=1e-30)
    errs = []
    for dq in dequants:
        D = Wp - dq[:, p]
        per_row = ((D @ Hp) * D).sum(1).clamp(min=0)
        if row_weights is None:
            errs.append(float(torch.sqrt(per_row.sum() / ref)))
        else:
            errs.append(float(torch.sqrt((per_row * row_weights.to(per_row)).sum() / tokens)))
    return errs
