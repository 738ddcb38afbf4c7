"""GGUF blocks rearranged for the C++ GEMV (csrc/gemv.cpp; the layout in csrc/gguf_gemv_kernels.h): Q4_0, Q4_1,
Q5_0, Q5_1 and Q8_0 at the file's own size; the K-quants (Q4_K, Q5_K, Q6_K) as 32-column blocks with their integer
sub-block scales (and mins) unpacked (Q4_K 4.625 bits per weight against the file's 4.5, Q5_K 5.625 against 5.5,
Q6_K the file's 6.5625), the same weights.

Output rows go in groups of 16 (the last padded with zero-scale rows). Per group and 32-column block one record,
the records of a group in column order and the groups one after another, so the kernel reads one sequential stream
(codes and scales in separate arrays were two or three streams: 18-25% slower on Zen 4):
- codes, read 16 rows x 4 bytes at a time, so one 64-byte load feeds one VNNI dot product for 16 rows:
  4-bit: chunk c (0..3) holds bytes 4c..4c+3 of each row's 16 nibble bytes (a pure byte permutation: a byte keeps
  column j in its low nibble and j+16 in its high one, as GGUF stores them); 8-bit: chunk c (0..7) holds codes
  4c..4c+3 of each row, stored as q + 128 (unsigned for vpdpbusd);
- then the 16 rows' fp16 scales d (exact copies), and for Q4_1 their fp16 offsets m: records of 288 (Q4_0),
  320 (Q4_1) and 544 (Q8_0) bytes, the file's bytes exactly;
- Q4_K: sub-block j's codes (low nibbles of qs[32*(j//2):][:32] for even j, high for odd) in the 4-bit layout,
  then the 16 rows' 6-bit scales and mins (llama.cpp's get_scale_min_k4) as uint8 (288-byte records); the
  super-blocks' fp16 d and dmin in `super_scales` (groups, blocks / 8, 2, 16);
- 5- and 6-bit codes: the nibbles as above, then their high bits in one (Q5_0, Q5_1, Q5_K) or two (Q6_K) 64-byte
  planes (csrc/gguf_gemv_kernels.h); Q6_K's int8 scales per 16 columns and its super-blocks' d alone.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ...quant.gguf_blocks import check_block_matrix
from . import kernels
from .kernels import GGUF_KINDS, GROUP_ROWS, LATTICE_TYPES, lattice_grid



@dataclass
class GgufPacked:
    qweight: torch.Tensor          # uint8 (groups * blocks * record bytes): codes and scales, see above
    kind: int                      # GGUF_KINDS value
    ggml_type: str
    out_features: int
    in_features: int
    super_scales: torch.Tensor | None = None   # K-quants: (groups, blocks / 8, fields, 16) float16 d[, dmin]

    def __post_init__(self):
        # parameters, not plain tensors: dynamo then leaves them out of the guard that no two inputs of a compiled
        # step alias, the one guard it keeps checking at every step when runtime/guards.py skips the others (about
        # 0.4 ms a token for SmolLM2's 121 matrices)
        self.qweight = _frozen(self.qweight)
        if self.super_scales is not None:
            self.super_scales = _frozen(self.super_scales)

    def nbytes(self) -> int:
        ts = (self.qweight, self.super_scales)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _frozen(t: torch.Tensor) -> torch.nn.Parameter:
    return t if isinstance(t, torch.nn.Parameter) else torch.nn.Parameter(t, requires_grad=False)


def _interleave(a: np.ndarray, groups: int, nb: int, chunks: int) -> np.ndarray:
    """(rows_padded, nb, chunks * 4) -> (groups, nb, chunks, 16, 4) contiguous."""
    return np.ascontiguousarray(a.reshape(groups, GROUP_ROWS, nb, chunks, 4).transpose(0, 2, 3, 1, 4))


def _group_major(a: np.ndarray, groups: int, nb: int) -> np.ndarray:
    """(rows_padded, nb, ...) -> (groups, nb, 16, ...)."""
    a = a.reshape(groups, GROUP_ROWS, nb, *a.shape[2:])
    return np.ascontiguousarray(np.moveaxis(a, 1, 2))


def _records(codes: np.ndarray, *tails: np.ndarray) -> torch.Tensor:
    """Per (group, block): the codes (groups, nb, chunks, 16, 4) uint8, then each tail (groups, nb, 16[, w]) as
    bytes -> one flat uint8 tensor."""
    g, nb = codes.shape[:2]
    parts = [codes.reshape(g, nb, -1)] + [np.ascontiguousarray(t).view(np.uint8).reshape(g, nb, -1) for t in tails]
    return torch.from_numpy(np.ascontiguousarray(np.concatenate(parts, axis=2)).reshape(-1))


def pack_gguf_blocks(ggml_type: str, raw: np.ndarray, shape: tuple[int, ...], name: str = "tensor",
                     native: bool = True) -> GgufPacked:
    """`raw`: uint8 (rows, bytes per row) as GGUFFile.raw returns it, rows in HF order; `shape`: (N, K). With the
    C++ kernels loaded (and `native`), packed by `exllamav2_cpu::gguf_pack` (csrc/gguf_pack.cpp: ~2 GB/s against
    numpy's 0.1-0.6), else by the numpy code below, the reference it is tested against byte for byte."""
    if native and kernels.loaded_usable():
        n, _, _ = check_block_matrix(ggml_type, raw, shape, name, GGUF_KINDS, "no CPU GEMV kernel")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # a read-only memory map of the file, only read
            src = torch.from_numpy(raw)
        q, sup = torch.ops.exllamav2_cpu.gguf_pack(src, GGUF_KINDS[ggml_type], n, shape[1], lattice_grid(ggml_type))
        if sup.numel():
            sup = sup.view(-1, shape[1] // 256, sup.numel() // (-(-n // GROUP_ROWS) * (shape[1] // 256) * GROUP_ROWS),
                           GROUP_ROWS)
        return GgufPacked(q, GGUF_KINDS[ggml_type], ggml_type, n, shape[1], sup if sup.numel() else None)
    if ggml_type in LATTICE_TYPES:
        raise ValueError(f"{name}: GGUF {ggml_type} is packed by the C++ kernels only (csrc/gguf_pack.cpp; checked "
                         f"against gguf-py's dequantisation instead of a numpy packer)")
    blocks, n, k, groups = _padded_blocks(ggml_type, raw, shape, name)
    if ggml_type in ("Q4_K", "Q5_K"):
        return _pack_q45_k(ggml_type, blocks, n, k, groups)
    if ggml_type == "Q6_K":
        return _pack_q6_k(blocks, n, k, groups)
    if ggml_type in ("Q5_0", "Q5_1"):
        return _pack_q5(ggml_type, blocks, n, k, groups)
    if ggml_type in ("Q2_K", "Q3_K"):
        return _pack_q23_k(ggml_type, blocks, n, k, groups)
    if ggml_type == "IQ4_XS":
        return _pack_iq4_xs(blocks, n, k, groups)
    nb = k // 32
    d = _group_major(_f16(blocks[..., 0:2]), groups, nb)
    if ggml_type == "Q8_0":
        codes = blocks[..., 2:] ^ np.uint8(0x80)  # q + 128 as unsigned
        rec = _records(_interleave(codes, groups, nb, 8), d)
    elif ggml_type == "Q4_1":
        rec = _records(_interleave(blocks[..., 4:], groups, nb, 4), d, _group_major(_f16(blocks[..., 2:4]), groups, nb))
    else:  # Q4_0, IQ4_NL (whose nibbles index a table): d, then 16 bytes of nibbles
        rec = _records(_interleave(blocks[..., 2:], groups, nb, 4), d)
    return GgufPacked(rec, GGUF_KINDS[ggml_type], ggml_type, n, k)


def _q4_k_scales_mins(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) packed bytes -> (..., 8) scales and (..., 8) mins, 6 bits each (llama.cpp's get_scale_min_k4)."""
    lo, hi = sc12[..., 0:4].astype(np.uint8), sc12[..., 4:8].astype(np.uint8)
    top = sc12[..., 8:12].astype(np.uint8)
    sc = np.concatenate([lo & 63, (top & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (top >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def _fifth_bits(qh: np.ndarray) -> np.ndarray:
    """(..., 4) bytes of a little-endian uint32 -> (..., 32) its bits, bit j at j."""
    return np.unpackbits(np.ascontiguousarray(qh), axis=-1, bitorder="little")


def _bit_planes(values: np.ndarray, bits: int, groups: int, nb: int) -> list[np.ndarray]:
    """values (rows_padded, nb, 32) of 1 or 2 bits -> their planes (csrc/gguf_gemv_kernels.h), group-major: one bit
    in one plane (columns 0..15 in bits 0..3 of byte i, column 4c+i at bit c, 16..31 in bits 4..7), two bits in two
    (column 4c+i of each half at bits 2c, 2c+1)."""
    rows = values.shape[0]
    v = values.reshape(rows, nb, 2, 4, 4)                          # (half, chunk c, byte i)
    per_half = v[:, :, :, 0] | (v[:, :, :, 1] << bits) | (v[:, :, :, 2] << 2 * bits) | (v[:, :, :, 3] << 3 * bits)
    planes = [per_half[:, :, 0] | (per_half[:, :, 1] << 4)] if bits == 1 else [per_half[:, :, 0], per_half[:, :, 1]]
    return [_group_major(p, groups, nb) for p in planes]


def _nibble_records(codes: np.ndarray, high_bits: int, groups: int, nb: int, *tails: np.ndarray) -> torch.Tensor:
    """codes (rows_padded, nb, 32) uint8 with `high_bits` (0-2) bits above the nibble -> records: the nibbles in
    the 4-bit layout, then the high-bit planes, then the tails."""
    nib = codes & 0xF
    packed = nib[..., :16] | (nib[..., 16:] << 4)
    planes = _bit_planes(codes >> 4, high_bits, groups, nb) if high_bits else []
    return _records(_interleave(packed, groups, nb, 4), *planes, *tails)


def _crumb_records(codes: np.ndarray, third: bool, groups: int, nb: int, *tails: np.ndarray) -> torch.Tensor:
    """codes (rows_padded, nb, 32) of 2 bits (or 3: Q3_K's third in its own plane) -> records: the two 2-bit
    planes, the third bit's plane, then the tails."""
    planes = _bit_planes(codes & 3, 2, groups, nb) + (_bit_planes((codes >> 2) & 1, 1, groups, nb) if third else [])
    return _records(*planes, *tails)


def _padded_blocks(ggml_type: str, raw: np.ndarray, shape: tuple[int, ...], name: str):
    """(blocks (rows_padded, blocks per row, bytes), n, k, groups) for a matrix of `ggml_type` blocks, padded with
    zero rows (zero scales and offsets: they dequantise to 0) to whole groups of 16 rows; a ValueError names the
    tensor."""
    n, nblk, block_bytes = check_block_matrix(ggml_type, raw, shape, name, GGUF_KINDS, "no CPU GEMV kernel")
    groups = -(-n // GROUP_ROWS)
    blocks = np.ascontiguousarray(raw).reshape(n, nblk, block_bytes)
    pad = groups * GROUP_ROWS - n
    if pad:
        blocks = np.concatenate([blocks, np.zeros((pad, nblk, block_bytes), np.uint8)])
    return blocks, n, shape[1], groups


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) float16."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0]


def _pack_q5(ggml_type: str, blocks: np.ndarray, n: int, k: int, groups: int) -> GgufPacked:
    """Q5_0 (d, qh, qs) and Q5_1 (d, m, qh, qs): 32-column blocks with a fifth bit per code."""
    nb = k // 32
    first = 4 if ggml_type == "Q5_1" else 2
    qs = blocks[..., first + 4:]
    codes = np.concatenate([qs & 0xF, qs >> 4], axis=-1) | (_fifth_bits(blocks[..., first:first + 4]) << 4)
    tails = [_group_major(_f16(blocks[..., 0:2]), groups, nb)]
    if ggml_type == "Q5_1":
        tails.append(_group_major(_f16(blocks[..., 2:4]), groups, nb))
    return GgufPacked(_nibble_records(codes, 1, groups, nb, *tails), GGUF_KINDS[ggml_type], ggml_type, n, k)


def _super_scales(d: np.ndarray, groups: int) -> torch.Tensor:
    """(rows_padded, super-blocks, fields) float16 -> (groups, super-blocks, fields, 16)."""
    rows, nsb, fields = d.shape
    return torch.from_numpy(np.ascontiguousarray(d.reshape(groups, GROUP_ROWS, nsb, fields).transpose(0, 2, 3, 1)))


def _pack_q45_k(ggml_type: str, blocks: np.ndarray, n: int, k: int, groups: int) -> GgufPacked:
    """Q4_K (d, dmin, scales[12], qs[128]) and Q5_K (the same with qh[32] before qs): sub-block j's codes are the
    low nibbles of qs[32*(j//2):][:32] for even j, the high ones for odd j, and bit j of qh[l] the fifth bit of
    its column l."""
    rows, nsb = blocks.shape[:2]
    five = ggml_type == "Q5_K"
    sc, mn = _q4_k_scales_mins(blocks[..., 4:16])                          # (rows, nsb, 8)
    qs = blocks[..., 48 if five else 16:].reshape(rows, nsb, 4, 32)
    codes = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(rows, nsb, 8, 32)
    if five:   # qh (rows, nsb, 32): bit j of byte l -> sub-block j, column l
        bits = np.unpackbits(blocks[..., 16:48, None], axis=-1, bitorder="little")   # (rows, nsb, 32 l, 8 j)
        codes = codes | (bits.transpose(0, 1, 3, 2) << 4)
    nb = nsb * 8
    rec = _nibble_records(codes.reshape(rows, nb, 32), 1 if five else 0, groups, nb,
                          _group_major(sc.reshape(rows, nb), groups, nb), _group_major(mn.reshape(rows, nb), groups, nb))
    dd = blocks[..., 0:4].copy().view(np.float16)                          # (rows, nsb, 2): d, dmin
    return GgufPacked(rec, GGUF_KINDS[ggml_type], ggml_type, n, k, _super_scales(dd, groups))


def _pack_q6_k(blocks: np.ndarray, n: int, k: int, groups: int) -> GgufPacked:
    """Q6_K (ql[128], qh[64], int8 scales[16], d): per 128-column half n and l < 32, columns l, l+32, l+64, l+96
    take ql[64n+l] & 15, ql[64n+l+32] & 15, ql[64n+l] >> 4, ql[64n+l+32] >> 4 and bits 0-1, 2-3, 4-5, 6-7 of
    qh[32n+l] on top; w = (d * scale[column // 16]) * (q - 32)."""
    rows, nsb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(rows, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    ql = (ql & 0xF).reshape(rows, nsb, 2, 4, 32)
    qh = blocks[..., 128:192].reshape(rows, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    codes = (ql | ((qh & 3) << 4)).reshape(rows, nsb * 8, 32)
    nb = nsb * 8
    scales = blocks[..., 192:208].reshape(rows, nb, 2)                     # int8 bytes, halves of each block
    rec = _nibble_records(codes, 2, groups, nb, _group_major(scales[..., 0], groups, nb),
                          _group_major(scales[..., 1], groups, nb))
    d = blocks[..., 208:210].copy().view(np.float16)                       # (rows, nsb, 1)
    return GgufPacked(rec, GGUF_KINDS["Q6_K"], "Q6_K", n, k, _super_scales(d, groups))


def _pack_q23_k(ggml_type: str, blocks: np.ndarray, n: int, k: int, groups: int) -> GgufPacked:
    """Q2_K (scales[16]: 4-bit scale | 4-bit min << 4, qs[64], d, dmin) and Q3_K (hmask[32], qs[64], 12 bytes of
    16 6-bit scales, d): per 128-column half n and sub-block s = 4n + j, column 32s + l takes bits 2j, 2j+1 of
    qs[32n + l] (and for Q3_K bit s of hmask[l] as its third bit); a scale per 16 columns. Q3_K's codes are
    stored unsigned (low2 + 4 * hbit, offset 4: gguf-py's low2 - 4 unless the bit is set), its scales less 32 as
    int8."""
    rows, nsb = blocks.shape[:2]
    q3 = ggml_type == "Q3_K"
    qs = blocks[..., 32:96] if q3 else blocks[..., 16:80]
    shifts = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 1, 4, 1)
    codes = (qs.reshape(rows, nsb, 2, 1, 32) >> shifts) & 3                     # (rows, nsb, n, j, l)
    if q3:
        bits = np.unpackbits(blocks[..., 0:32, None], axis=-1, bitorder="little")  # (rows, nsb, l, s)
        codes = codes | (bits.transpose(0, 1, 3, 2).reshape(rows, nsb, 2, 4, 32) << 2)
        sc12 = blocks[..., 96:108]
        low = np.concatenate([sc12[..., 0:8] & 0xF, sc12[..., 0:8] >> 4], axis=-1)            # scales 0..15, low 4 bits
        high = (sc12[..., 8:12, None] >> np.array([0, 2, 4, 6], np.uint8)).transpose(0, 1, 3, 2) & 3
        scales = ((low | (high.reshape(rows, nsb, 16) << 4)).astype(np.int16) - 32).astype(np.int8)
        tails = [scales]
        supers = blocks[..., 108:110]
    else:  # the file's byte per 16 columns: scale | min << 4
        tails = [blocks[..., 0:16]]
        supers = blocks[..., 80:84]
    nb = nsb * 8
    halves = []   # per tail: the blocks' first halves, then their second halves
    for t in tails:
        t = t.reshape(rows, nb, 2)
        halves += [_group_major(np.ascontiguousarray(t[..., 0]), groups, nb),
                   _group_major(np.ascontiguousarray(t[..., 1]), groups, nb)]
    rec = _crumb_records(codes.reshape(rows, nb, 32), q3, groups, nb, *halves)
    d = supers.copy().view(np.float16)                                          # (rows, nsb, fields)
    return GgufPacked(rec, GGUF_KINDS[ggml_type], ggml_type, n, k, _super_scales(d, groups))


def _pack_iq4_xs(blocks: np.ndarray, n: int, k: int, groups: int) -> GgufPacked:
    """IQ4_XS (d, uint16 scales_h, scales_l[4], qs[128]): sub-block j's 16 bytes of nibbles in Q4_0's order and
    its 6-bit scale (nibble j % 2 of scales_l[j // 2], bits 2j, 2j+1 of scales_h above), stored less 32 as int8;
    the 16 bytes after it unused."""
    rows, nsb = blocks.shape[:2]
    nb = nsb * 8
    sl = (blocks[..., 4:8, None] >> np.array([0, 4], np.uint8)) & 0xF                  # (rows, nsb, 4, 2)
    sh = blocks[..., 2:4].copy().view(np.uint16)                                       # (rows, nsb, 1)
    sh = (sh >> (2 * np.arange(8, dtype=np.uint16))) & 3                               # (rows, nsb, 8)
    scales = ((sl.reshape(rows, nsb, 8) | (sh.astype(np.uint8) << 4)).astype(np.int16) - 32).astype(np.int8)
    rec = _records(_interleave(blocks[..., 8:].reshape(rows, nb, 16), groups, nb, 4),
                   _group_major(scales.reshape(rows, nb), groups, nb), np.zeros((groups, nb, 16), np.uint8))
    return GgufPacked(rec, GGUF_KINDS["IQ4_XS"], "IQ4_XS", n, k, _super_scales(blocks[..., 0:2].copy().view(np.float16), groups))


@dataclass
class GgufRowRuns:
    """A weight whose rows come in runs of different GGUF types (a Q4_K_M file's fused q/k in Q5_0 beside v in
    Q8_0): each run packed on its own, their outputs side by side."""
    runs: list[GgufPacked]
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        return sum(r.nbytes() for r in self.runs)


def pack_gguf_weight(quant) -> GgufPacked | GgufRowRuns | None:
    """The packed matrix of a GgufWeight (exllamav2/quant/gguf.py), its parts stacked by rows (a GgufRowRuns when
    they are of several types); None when a part's type has no kernel."""
    if any(t not in GGUF_KINDS for t in quant.types):
        return None
    runs = []
    for run in quant.runs_by_type():
        raws = [src.raw(name) for src, name, _ in run.parts]
        data = np.concatenate([r[1] for r in raws]) if len(raws) > 1 else raws[0][1]
        shape = (sum(r[2][0] for r in raws), quant.in_features)
        runs.append(pack_gguf_blocks(raws[0][0], data, shape, name=run.key))
    return runs[0] if len(runs) == 1 else GgufRowRuns(runs, quant.out_features, quant.in_features)
