"""GPTQ weights (4-bit as the original loads them, survey §4.8; and 8-bit), and a GPTQ writer.

On disk: qweight (in*bits/32, out) int32 (32/bits input rows per word, low bits first), qzeros (groups, out*bits/32)
int32 (32/bits columns per word, low bits first), scales (groups, out), g_idx (in,) int32, optional bias. The width
is read from the shapes: qweight holds in/8 rows at 4 bits, in/4 at 8.
Checkpoint format "gptq" (v1) dequantises as (q - (z + 1)) * scale; "gptq_v2" as (q - z) * scale.
Matrices returned here are nn.Linear layout (out, in).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .bitstream import pack_nibble_columns, u32_to_words, unpack_nibble_columns, words_to_u32
from .exl2 import QuantFormatError, _name, strip_prefix

GPTQ_REQUIRED = ("qweight", "qzeros", "scales")


def unpack_nibble_rows(qweight: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(in*bits/32, out) int32 -> (in, out) int64 codes: field i of word r is row (32/bits)r+i."""
    u = words_to_u32(qweight)
    per = 32 // bits
    shifts = torch.arange(0, 32, bits, device=u.device).view(1, per, 1)
    return ((u.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, u.shape[1])


def _unpack_columns(words: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C*bits/32) int32, 32/bits columns per word, low bits first -> (R, C) int64."""
    if bits == 4:
        return unpack_nibble_columns(words)
    u = words_to_u32(words)
    shifts = torch.arange(0, 32, bits, device=u.device)
    return ((u.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).reshape(u.shape[0], -1)


def _pack_columns(codes: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        return pack_nibble_columns(codes)
    codes = codes.to(torch.int64)
    shifts = torch.arange(0, 32, bits, device=codes.device)
    return u32_to_words((codes.reshape(codes.shape[0], -1, 32 // bits) << shifts).sum(-1))


def pack_nibble_rows(codes: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """(in, out) codes in [0, 2^bits), in a multiple of 32/bits -> (in*bits/32, out) int32."""
    codes = codes.to(torch.int64)
    per = 32 // bits
    if codes.shape[0] % per:
        raise ValueError(f"pack_nibble_rows: {codes.shape[0]} rows is not a multiple of {per}")
    if ((codes < 0) | (codes >= (1 << bits))).any():
        raise ValueError(f"pack_nibble_rows: a code is outside [0, {1 << bits})")
    shifts = torch.arange(0, 32, bits, device=codes.device).view(1, per, 1)
    return u32_to_words((codes.reshape(-1, per, codes.shape[1]) << shifts).sum(1))


def inferred_group_size(in_features: int, groups: int) -> int:
    """The original's rule: the smallest power of two gs with gs * groups >= in."""
    gs = 1
    while gs * groups < in_features:
        gs *= 2
    return gs


@dataclass(frozen=True)
class GptqTensors:
    """A validated 4- or 8-bit GPTQ tensor set."""

    qweight: torch.Tensor
    qzeros: torch.Tensor
    scales: torch.Tensor
    row_group: torch.Tensor   # (in,) int64, group of every input row (from g_idx, or sequential)
    act_order: bool           # g_idx present, not all zero, and not sequential
    group_size: int           # the inferred power-of-two group size (what sequential rows use)
    offset_qzeros: bool       # gptq_v2: zero is z, not z + 1
    out_features: int
    bias: torch.Tensor | None
    bits: int = 4

    @property
    def in_features(self) -> int:
        return int(self.row_group.shape[0])

    @property
    def num_groups(self) -> int:
        return int(self.scales.shape[0])


def read_gptq(tensors: dict[str, torch.Tensor], key: str = "", in_features: int | None = None,
              out_features: int | None = None, offset_qzeros: bool = False) -> GptqTensors:
    t = strip_prefix(tensors, key)
    missing = [n for n in GPTQ_REQUIRED if n not in t]
    if missing:
        raise QuantFormatError(f"{key}: GPTQ tensor(s) missing: {', '.join(_name(key, m) for m in missing)}")
    qweight, qzeros, scales = t["qweight"], t["qzeros"], t["scales"]
    for n, v in (("qweight", qweight), ("qzeros", qzeros)):
        if v.dim() != 2 or v.dtype != torch.int32:
            raise QuantFormatError(f"{_name(key, n)}: expected a 2-D int32 tensor, got {v.dtype} {tuple(v.shape)}")
    bits = 4
    if in_features is not None and qweight.shape[0] * 4 == in_features:
        bits = 8
    n_in, out = qweight.shape[0] * 32 // bits, qweight.shape[1]
    if in_features is not None and in_features != n_in:
        raise QuantFormatError(f"{_name(key, 'qweight')}: {qweight.shape[0]} rows hold {n_in} 4-bit or {n_in // 2} 8-bit "
                               f"input rows, the layer has {in_features} (4- and 8-bit GPTQ are supported)")
    if out_features is not None and out_features != out:
        raise QuantFormatError(f"{_name(key, 'qweight')}: width {out}, the layer has {out_features} output features")
    if scales.dim() != 2 or scales.shape[1] != out or not scales.is_floating_point():
        raise QuantFormatError(f"{_name(key, 'scales')}: expected a float (groups, {out}) tensor, got {scales.dtype} {tuple(scales.shape)}")
    groups = scales.shape[0]
    per = 32 // bits
    if out % per or tuple(qzeros.shape) != (groups, out // per):
        raise QuantFormatError(f"{_name(key, 'qzeros')}: shape {tuple(qzeros.shape)} disagrees with scales, expected "
                               f"{(groups, out // per)} for {bits}-bit zeros")
    gs = inferred_group_size(n_in, groups)
    sequential = torch.arange(n_in) // gs
    g_idx = t.get("g_idx")
    act_order = False
    row_group = sequential
    if g_idx is not None:
        if g_idx.dim() != 1 or g_idx.numel() != n_in:
            raise QuantFormatError(f"{_name(key, 'g_idx')}: shape {tuple(g_idx.shape)}, expected ({n_in},)")
        gi = g_idx.to(torch.int64).cpu()
        if (gi < 0).any() or (gi >= groups).any():
            raise QuantFormatError(f"{_name(key, 'g_idx')}: values must lie in [0, {groups}), got range [{int(gi.min())}, {int(gi.max())}]")
        if (gi != 0).any():  # all-zero g_idx means "no act-order" to the original
            row_group = gi
            act_order = not torch.equal(gi, sequential)
    if int(row_group.max()) >= groups:
        raise QuantFormatError(f"{_name(key, 'scales')}: {groups} groups cannot cover {n_in} rows")
    bias = t.get("bias")
    if bias is not None:
        if bias.dim() != 1 or bias.numel() != out:
            raise QuantFormatError(f"{_name(key, 'bias')}: shape {tuple(bias.shape)}, expected ({out},)")
        if not bias.any():
            bias = None  # the original drops an all-zero bias
    return GptqTensors(qweight, qzeros, scales, row_group, act_order, gs, offset_qzeros, out, bias, bits)


def gptq_zero_points(g: GptqTensors) -> torch.Tensor:
    """(groups, out) int64 zero points, with the v1 '+1' applied unless the checkpoint is gptq_v2."""
    z = _unpack_columns(g.qzeros, g.bits)
    return z if g.offset_qzeros else z + 1


def gptq_dequantize(tensors: dict[str, torch.Tensor] | GptqTensors, key: str = "", dtype: torch.dtype = torch.float16,
                    in_features: int | None = None, out_features: int | None = None,
                    offset_qzeros: bool = False) -> torch.Tensor:
    """Reference dequantiser: (out, in) with W[n, i] = (q[i, n] - zero[g(i), n]) * scale[g(i), n].

    float16 (default) rounds the product once, as the original's __hmul2 does (the product is exact in fp32);
    float32 keeps it unrounded. Scales are taken as fp16 either way, as the original casts them.
    """
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"GPTQ dequantisation precision must be float16 or float32, got {dtype}")
    g = tensors if isinstance(tensors, GptqTensors) else read_gptq(tensors, key, in_features, out_features, offset_qzeros)
    q = unpack_nibble_rows(g.qweight, g.bits)
    rg = g.row_group.to(q.device)
    zero = gptq_zero_points(g)[rg]
    scale = g.scales.to(torch.float16).to(torch.float32)[rg]
    w = ((q - zero).to(torch.float32) * scale).to(dtype)
    return w.t().contiguous()


# ---------------------------------------------------------------------------------------------- writer

def _group_params(w: torch.Tensor, sym: bool, maxq: int, v1: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (fp16-representable, fp32) and integer zero per output row of w (out, cols), AutoGPTQ's min/max rule."""
    xmin = w.amin(1).clamp(max=0)
    xmax = w.amax(1).clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    flat = (xmin == 0) & (xmax == 0)
    xmin = torch.where(flat, -1.0, xmin)
    xmax = torch.where(flat, 1.0, xmax)
    scale = ((xmax - xmin) / maxq).to(torch.float16).to(torch.float32)
    if sym:
        zero = torch.full_like(scale, (maxq + 1) // 2)
    else:
        zero = torch.round(-xmin / scale).clamp(0, maxq)
    if v1:
        # v1 stores z - 1 in a nibble, so z = 0 cannot be written; 1 is the nearest storable zero point.
        zero = zero.clamp(min=1)
    return scale, zero


def _quantize_cols(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale.unsqueeze(1)) + zero.unsqueeze(1), 0, maxq)


def gptq_quantize(W: torch.Tensor, bits: int = 4, group_size: int | None = 128, act_order: bool = False,
                  sym: bool = True, hessian: torch.Tensor | None = None, checkpoint_format: str = "gptq",
                  damp: float = 0.01) -> dict[str, torch.Tensor]:
    """Quantize W (out, in) to on-disk GPTQ tensors {qweight, qzeros, scales, g_idx}.

    Without a Hessian: round-to-nearest per group. With one (in, in): GPTQ with error feedback through the
    Cholesky factor of the damped inverse Hessian; act_order processes columns by descending Hessian diagonal and
    g_idx records each column's group. group_size None (or -1) means one group. checkpoint_format "gptq" writes
    v1 zeros (z - 1), "gptq_v2" writes z.
    """
    if bits not in (4, 8):
        raise ValueError(f"gptq_quantize: only 4-bit and 8-bit GPTQ are supported, got {bits}")
    if checkpoint_format not in ("gptq", "gptq_v2"):
        raise ValueError(f"gptq_quantize: checkpoint_format must be 'gptq' or 'gptq_v2', got {checkpoint_format!r}")
    v1 = checkpoint_format == "gptq"
    maxq = (1 << bits) - 1
    W = W.detach().to(torch.float32).clone()
    out, n_in = W.shape
    if n_in % 8 or out % 8:
        raise ValueError(f"gptq_quantize: in ({n_in}) and out ({out}) must be multiples of 8")
    gs = n_in if group_size in (None, -1) else int(group_size)
    groups = -(-n_in // gs)
    scales = torch.zeros(groups, out)
    zeros = torch.zeros(groups, out)
    Q = torch.zeros_like(W)

    if hessian is None:
        perm = torch.arange(n_in)
        for g in range(groups):
            cols = slice(g * gs, min((g + 1) * gs, n_in))
            scales[g], zeros[g] = _group_params(W[:, cols], sym, maxq, v1)
            Q[:, cols] = _quantize_cols(W[:, cols], scales[g], zeros[g], maxq)
    else:
        H = hessian.detach().to(torch.float32).clone()
        if tuple(H.shape) != (n_in, n_in):
            raise ValueError(f"gptq_quantize: hessian shape {tuple(H.shape)}, expected {(n_in, n_in)}")
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        perm = torch.argsort(torch.diag(H), descending=True, stable=True) if act_order else torch.arange(n_in)
        W = W[:, perm]
        H = H[perm][:, perm]
        H += damp * torch.mean(torch.diag(H)) * torch.eye(n_in)
        Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        for i in range(n_in):
            if i % gs == 0:
                g = i // gs
                scales[g], zeros[g] = _group_params(W[:, i:i + gs], sym, maxq, v1)
            g = i // gs
            w = W[:, i]
            q = torch.clamp(torch.round(w / scales[g]) + zeros[g], 0, maxq)
            Q[:, i] = q
            err = (w - (q - zeros[g]) * scales[g]) / Hinv[i, i]
            W[:, i:] -= err.unsqueeze(1) * Hinv[i, i:].unsqueeze(0)
        invperm = torch.argsort(perm)
        Q = Q[:, invperm]

    # Column perm[i] (processed i-th) belongs to group i // gs.
    g_idx = torch.empty(n_in, dtype=torch.int32)
    g_idx[perm] = (torch.arange(n_in) // gs).to(torch.int32)
    stored_zeros = (zeros - 1) if v1 else zeros
    return {
        "qweight": pack_nibble_rows(Q.t().to(torch.int64), bits),
        "qzeros": _pack_columns(stored_zeros.to(torch.int64), bits),
        "scales": scales.to(torch.float16),
        "g_idx": g_idx,
    }


def gptq_bits_per_weight(g: GptqTensors) -> float:
    total = g.qweight.numel() * 32 + g.qzeros.numel() * 32 + g.scales.numel() * 16 + g.in_features * 32
    return total / (g.in_features * g.out_features)
