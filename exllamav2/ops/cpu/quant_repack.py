"""EXL2 and GPTQ weights repacked at load as GGUF Q4_0 / Q4_1 / Q8_0 blocks, for the C++ GEMV
(csrc/gemv.cpp, run by gemv_linear.SegmentedGemvKernel).

Both formats are w = s * (q - z) per input group and output column (s an fp16 scale, q an unsigned code, z an
integer zero point), over the input rows in their quantized order (EXL2's q_perm, GPTQ's rows sorted by g_idx).
Each group becomes 32-column blocks with d = s; the group's rows are padded to a multiple of 32 (zero x there):
- width <= 4 and q - z + 8 in 0..15 for all its codes (every EXL2 width <= 4, z = 2^(b-1); symmetric GPTQ):
  Q4_0, digit q - z + 8, w = d * (digit - 8): exact, 4.5 bits per weight;
- other 4-bit groups (asymmetric GPTQ): Q4_1, digit q, m = -s * z rounded to fp16, w = d * q + m: the one inexact
  case, |error| <= half an fp16 ulp of s * z (tests/test_cpu_quant_repack.py checks that bound), 5 bits per weight;
- width 5..8 (EXL2, GPTQ 8-bit) when q - z fits int8: Q8_0, w = d * (q - z): exact, 8.5 bits per weight.
The blocks' weights are exact in fp32 (an fp16 d times a small integer, plus m): s * (q - z) itself, or for Q4_1
s * q + m (the `torch` backend's dense matrix is s * (q - z) rounded to fp16, as the original's dequantiser does).
One GgufPacked holds one block kind, so a weight becomes one segment per kind: the input columns it reads
(`gather`), the padding among them (`pad`), and the packed blocks; y = sum of the segments' GEMVs (+ bias once).
If a weight has Q4_0 and Q4_1 groups, its Q4_0 groups go to Q4_1 with m = -8 s (exact), so 4-bit groups share one
segment. Weights that fit none of this (codes beyond int8, a group other than the last not a multiple of 32 rows)
get None: the `cpu` backend then runs its previous path.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .gguf_pack import GgufPacked, pack_gguf_blocks
from .kernels import BLOCK

_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def _frozen(t: torch.Tensor | None) -> torch.nn.Parameter | None:
    # a parameter, as GgufPacked's tensors are: dynamo keeps it out of the compiled step's aliasing guard
    return None if t is None else torch.nn.Parameter(t, requires_grad=False)


@dataclass
class GemvSegment:
    """One block kind's share of a weight: packed column j reads input feature gather[j] (None: x as it is), and
    the packed columns in `pad` read zero."""
    packed: GgufPacked
    gather: torch.Tensor | None
    pad: torch.Tensor | None

    def __post_init__(self):
        self.gather, self.pad = _frozen(self.gather), _frozen(self.pad)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """x (rows, in_features) -> (rows, packed.in_features), the columns this segment's blocks read."""
        if self.gather is None:
            return x
        if x.dtype == torch.float32:
            xs = x.index_select(1, self.gather)
        else:  # index_select along dim 1 has a vector path for float32 only: for bf16 a gather is 2-3x faster
            xs = torch.gather(x, 1, self.gather.expand(x.shape[0], -1))
        return xs.index_fill_(1, self.pad, 0) if self.pad is not None else xs

    def nbytes(self) -> int:
        return self.packed.nbytes() + sum(t.numel() * t.element_size() for t in (self.gather, self.pad)
                                          if t is not None)


@dataclass
class SegmentedPacked:
    segments: list[GemvSegment]
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.segments)

    @property
    def kinds(self) -> list[str]:
        return [s.packed.ggml_type for s in self.segments]

    def dequantize(self) -> torch.Tensor:
        """(out, in) float32 from the packed blocks (kernels.gguf_dequant), in input feature order."""
        from . import kernels
        if not kernels.ready():
            raise RuntimeError("SegmentedPacked.dequantize: the CPU kernels are not available")
        w = torch.zeros(self.out_features, self.in_features)
        for s in self.segments:
            ws = kernels.gguf_dequant(s.packed, torch.float32)
            cols = torch.arange(ws.shape[1]) if s.gather is None else s.gather.data
            keep = torch.ones(ws.shape[1], dtype=torch.bool)
            if s.pad is not None:
                keep[s.pad.data] = False
            w[:, cols[keep]] += ws[:, keep]
        return w


@dataclass
class BlockSegment:
    """A segment before packing: GGUF blocks (rows, blocks * bytes) in the file's byte layout (gguf_blocks.py)."""
    ggml_type: str
    raw: np.ndarray
    gather: np.ndarray      # (K_seg,) int64 input feature of each column (padding: 0)
    pad: np.ndarray         # (P,) int64 padded columns


@dataclass
class _Group:
    kind: str
    digits: np.ndarray            # (rows, N) int16: the block digit (Q4_0 / Q4_1: 0..15, Q8_0: -128..127)
    d: np.ndarray                 # (N,) float16
    m: np.ndarray | None          # (N,) float16, Q4_1
    cols: np.ndarray              # (rows,) int64 input features


def _q8_or_none(codes, zero, d, cols) -> _Group | None:
    v = codes - zero
    if v.min(initial=0) < -128 or v.max(initial=0) > 127:
        return None
    return _Group("Q8_0", v, d, None, cols)


def _plan_group(codes: np.ndarray, bits: int, scale: np.ndarray, zero: np.ndarray, cols: np.ndarray) -> _Group | None:
    """codes (rows, N) int16, scale (N,) float16, zero (N,) int16."""
    if bits <= 4:
        q0 = codes - zero + 8
        if q0.min(initial=8) >= 0 and q0.max(initial=8) <= 15:
            return _Group("Q4_0", q0, scale, None, cols)
        with np.errstate(over="ignore"):
            m = (-scale.astype(np.float64) * zero).astype(np.float16)   # the inexact case (asymmetric GPTQ)
        if np.isfinite(m).all():
            return _Group("Q4_1", codes, scale, m, cols)
    return _q8_or_none(codes, zero, scale, cols)


def _to_q4_1(g: _Group) -> _Group:
    """A Q4_0 group as Q4_1 (m = -8 d: exact unless it overflows fp16, then Q8_0)."""
    with np.errstate(over="ignore"):
        m = (g.d.astype(np.float32) * -8).astype(np.float16)
    if np.isfinite(m).all():
        return _Group("Q4_1", g.digits, g.d, m, g.cols)
    return _Group("Q8_0", g.digits - 8, g.d, None, g.cols)


def _raw_blocks(kind: str, groups: list[_Group]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Groups of one kind -> (raw (N, blocks * bytes) uint8, gather, pad), each group padded to whole blocks."""
    n = groups[0].digits.shape[1]
    digit_rows, d_blocks, m_blocks, gather, pad = [], [], [], [], []
    col = 0
    for g in groups:
        rows = g.digits.shape[0]
        extra = -rows % BLOCK
        fill = 0 if kind == "Q8_0" else 8
        digits = g.digits if not extra else np.concatenate([g.digits, np.full((extra, n), fill, np.int16)])
        digit_rows.append(digits)
        nb = (rows + extra) // BLOCK
        d_blocks.append(np.broadcast_to(g.d, (nb, n)))
        if g.m is not None:
            m_blocks.append(np.broadcast_to(g.m, (nb, n)))
        gather.append(g.cols)
        if extra:
            gather.append(np.zeros(extra, np.int64))
            pad.append(np.arange(col + rows, col + rows + extra))
        col += rows + extra
    digits = np.concatenate(digit_rows).T                                   # (N, K_seg)
    nb = digits.shape[1] // BLOCK
    blocks = digits.reshape(n, nb, BLOCK)
    d = np.ascontiguousarray(np.concatenate(d_blocks).T).view(np.uint8).reshape(n, nb, 2)
    if kind == "Q8_0":
        body = [d, blocks.astype(np.int8).view(np.uint8)]
    else:
        u = blocks.astype(np.uint8)
        nibbles = u[..., :16] | (u[..., 16:] << 4)       # byte j: column j low, j + 16 high (GGUF order)
        body = [d]
        if kind == "Q4_1":
            body.append(np.ascontiguousarray(np.concatenate(m_blocks).T).view(np.uint8).reshape(n, nb, 2))
        body.append(nibbles)
    raw = np.concatenate(body, axis=2).reshape(n, nb * _BLOCK_BYTES[kind])
    return raw, np.concatenate(gather).astype(np.int64), np.concatenate(pad or [np.zeros(0, np.int64)]).astype(np.int64)


def repack_blocks(codes: torch.Tensor, group_rows: list[int], group_bits: list[int], scales: torch.Tensor,
                  zeros: torch.Tensor, perm: torch.Tensor | None, out_features: int) -> list[BlockSegment] | None:
    """GGUF blocks per kind for w[:, perm[k]] = scales[g(k)] * (codes[k] - zeros[g(k)]), or None.

    codes: (K, >= out_features) unsigned codes in quantized row order; group_rows/group_bits per group in row order;
    scales (groups, >= out) float16-representable; zeros (groups, >= out) integers; perm (K,) input feature of each
    quantized row (None: identity).
    """
    if any(r % BLOCK for r in group_rows[:-1]):
        return None
    n = out_features
    c = codes[:, :n].cpu().numpy().astype(np.int16)
    s = scales[:, :n].cpu().to(torch.float16).numpy()
    z = zeros[:, :n].cpu().numpy().astype(np.int16)
    p = np.arange(c.shape[0]) if perm is None else perm.cpu().numpy().astype(np.int64)
    groups, start = [], 0
    for g, (rows, bits) in enumerate(zip(group_rows, group_bits)):
        planned = _plan_group(c[start:start + rows], bits, s[g], z[g], p[start:start + rows])
        if planned is None:
            return None
        groups.append(planned)
        start += rows
    kinds = {g.kind for g in groups}
    if {"Q4_0", "Q4_1"} <= kinds:
        groups = [_to_q4_1(g) if g.kind == "Q4_0" else g for g in groups]
    segments = []
    for kind in dict.fromkeys(g.kind for g in groups):   # first-seen order
        raw, gather, pad = _raw_blocks(kind, [g for g in groups if g.kind == kind])
        segments.append(BlockSegment(kind, raw, gather, pad))
    return segments


def pack_segments(segments: list[BlockSegment], out_features: int, in_features: int) -> SegmentedPacked:
    out = []
    for seg in segments:
        k = seg.gather.shape[0]
        packed = pack_gguf_blocks(seg.ggml_type, seg.raw, (out_features, k))
        identity = len(segments) == 1 and k == in_features and not seg.pad.size and \
            np.array_equal(seg.gather, np.arange(k))
        out.append(GemvSegment(packed, None if identity else torch.from_numpy(seg.gather),
                               torch.from_numpy(seg.pad) if seg.pad.size else None))
    return SegmentedPacked(out, out_features, in_features)


def exl2_blocks(weight) -> list[BlockSegment] | None:
    """The blocks of an Exl2Weight (exllamav2/quant/weight.py)."""
    from ...quant.exl2 import exl2_codes, exl2_scales
    t = weight.t
    lay = t.layout
    zeros = (1 << lay.bits.unsqueeze(1)).expand(-1, t.out_pad) // 2
    return repack_blocks(exl2_codes(t), lay.rows.tolist(), lay.bits.tolist(), exl2_scales(t, torch.float16),
                         zeros, t.q_perm, weight.out_features)


def gptq_blocks(weight) -> list[BlockSegment] | None:
    """The blocks of a GptqWeight: rows sorted by group (stable, as GptqWeight._build_packed does)."""
    from ...quant.gptq import gptq_zero_points, unpack_nibble_rows
    t = weight.t
    order = torch.argsort(t.row_group.to(torch.int64), stable=True)
    counts = torch.bincount(t.row_group.to(torch.int64), minlength=t.num_groups)
    used = counts > 0
    codes = unpack_nibble_rows(t.qweight, t.bits).index_select(0, order)
    rows = counts[used].tolist()
    return repack_blocks(codes, rows, [t.bits] * len(rows), t.scales[used], gptq_zero_points(t)[used], order,
                         weight.out_features)


def repack_quant_weight(weight) -> SegmentedPacked | None:
    """The GEMV segments of an Exl2Weight or GptqWeight (by its `format`), or None."""
    blocks = {"exl2": exl2_blocks, "gptq": gptq_blocks}.get(getattr(weight, "format", None))
    if blocks is None:
        return None
    segments = blocks(weight)
    return None if segments is None else pack_segments(segments, weight.out_features, weight.in_features)
