"""GGUF Q4_0/Q4_1/Q8_0 blocks rearranged for the C++ GEMV (csrc/gemv.cpp, csrc/gguf_gemv_kernels.h), at the
file's own size; Q4_K super-blocks as 32-column 4-bit blocks with their integer scales and mins (4.625 bits per
weight against the file's 4.5, the same weights).

Output rows go in groups of 16 (the last padded with zero-scale rows); per group and 32-column block the kernel
reads 16 rows x 4 bytes at a time, so one 64-byte load feeds one VNNI dot product for 16 rows:
- 4-bit: chunk c (0..3) holds bytes 4c..4c+3 of each row's 16 nibble bytes (a pure byte permutation: a byte keeps
  column j in its low nibble and j+16 in its high one, as GGUF stores them);
- 8-bit: chunk c (0..7) holds codes 4c..4c+3 of each row, stored as q + 128 (unsigned for vpdpbusd);
- scales d (fp16, exact copies) as (groups, blocks, 16), and for Q4_1 the offsets m likewise;
- Q4_K: sub-block j's codes (low nibbles of qs[32*(j//2):][:32] for even j, high for odd) in the 4-bit layout
  above; its 6-bit scale and min (llama.cpp's get_scale_min_k4) as uint8 (groups, blocks, 16) `scales` and
  `offsets`; the super-block's fp16 d and dmin as `super_scales` (groups, blocks / 8, 2, 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...quant.gguf_blocks import check_block_matrix
from .kernels import GGUF_KINDS, GROUP_ROWS



@dataclass
class GgufPacked:
    qweight: torch.Tensor          # uint8, the interleaved codes
    scales: torch.Tensor           # (groups, blocks, 16) float16
    offsets: torch.Tensor | None   # same, Q4_1 only (Q4_K: uint8 mins)
    kind: int                      # GGUF_KINDS value
    ggml_type: str
    out_features: int
    in_features: int
    super_scales: torch.Tensor | None = None   # Q4_K: (groups, blocks / 8, 2, 16) float16 d, dmin

    def nbytes(self) -> int:
        ts = (self.qweight, self.scales, self.offsets, self.super_scales)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _interleave(a: np.ndarray, groups: int, nb: int, chunks: int) -> np.ndarray:
    """(rows_padded, nb, chunks * 4) -> (groups, nb, chunks, 16, 4) contiguous."""
    return np.ascontiguousarray(a.reshape(groups, GROUP_ROWS, nb, chunks, 4).transpose(0, 2, 3, 1, 4))


def _group_major(a: np.ndarray, groups: int, nb: int) -> np.ndarray:
    """(rows_padded, nb) -> (groups, nb, 16)."""
    return np.ascontiguousarray(a.reshape(groups, GROUP_ROWS, nb).transpose(0, 2, 1))


def pack_gguf_blocks(ggml_type: str, raw: np.ndarray, shape: tuple[int, ...], name: str = "tensor") -> GgufPacked:
    """`raw`: uint8 (rows, bytes per row) as GGUFFile.raw returns it, rows in HF order; `shape`: (N, K)."""
    if ggml_type == "Q4_K":
        return _pack_q4_k(raw, shape, name)
    n, nb, bb = check_block_matrix(ggml_type, raw, shape, name, GGUF_KINDS, "no CPU GEMV kernel")
    groups = -(-n // GROUP_ROWS)
    pad = groups * GROUP_ROWS - n
    blocks = np.ascontiguousarray(raw).reshape(n, nb, bb)
    if pad:  # padding rows: zero scale, zero offset, codes that dequantise to 0
        blocks = np.concatenate([blocks, np.zeros((pad, nb, bb), np.uint8)])
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    offsets = None
    if ggml_type == "Q8_0":
        codes = blocks[..., 2:] ^ np.uint8(0x80)  # q + 128 as unsigned
        q = _interleave(codes, groups, nb, 8)
    else:
        first = 4 if ggml_type == "Q4_1" else 2
        q = _interleave(blocks[..., first:], groups, nb, 4)
        if ggml_type == "Q4_1":
            m = blocks[..., 2:4].copy().view(np.float16)[..., 0]
            offsets = torch.from_numpy(_group_major(m, groups, nb))
    return GgufPacked(torch.from_numpy(q.reshape(-1)), torch.from_numpy(_group_major(d, groups, nb)), offsets,
                      GGUF_KINDS[ggml_type], ggml_type, n, shape[1])


Q4_K_BYTES = 144   # per 256-column super-block: fp16 d, fp16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles


def _q4_k_scales_mins(sc12: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) packed bytes -> (..., 8) scales and (..., 8) mins, 6 bits each (llama.cpp's get_scale_min_k4)."""
    lo, hi = sc12[..., 0:4].astype(np.uint8), sc12[..., 4:8].astype(np.uint8)
    top = sc12[..., 8:12].astype(np.uint8)
    sc = np.concatenate([lo & 63, (top & 0xF) | ((lo >> 6) << 4)], axis=-1)
    mn = np.concatenate([hi & 63, (top >> 4) | ((hi >> 6) << 4)], axis=-1)
    return sc, mn


def _pack_q4_k(raw: np.ndarray, shape: tuple[int, ...], name: str) -> GgufPacked:
    if len(shape) != 2 or shape[1] % 256:
        raise ValueError(f"{name}: shape {list(shape)} is not a matrix with a multiple of 256 columns (Q4_K)")
    n, k = shape
    nsb = k // 256
    if raw.shape != (n, nsb * Q4_K_BYTES):
        raise ValueError(f"{name}: Q4_K data has shape {list(raw.shape)}, expected [{n}, {nsb * Q4_K_BYTES}]")
    groups = -(-n // GROUP_ROWS)
    pad = groups * GROUP_ROWS - n
    blocks = np.ascontiguousarray(raw).reshape(n, nsb, Q4_K_BYTES)
    if pad:  # padding rows: zero scales and mins
        blocks = np.concatenate([blocks, np.zeros((pad, nsb, Q4_K_BYTES), np.uint8)])
    rows = n + pad
    dd = blocks[..., 0:4].copy().view(np.float16)                        # (rows, nsb, 2): d, dmin
    sc, mn = _q4_k_scales_mins(blocks[..., 4:16])                         # (rows, nsb, 8)
    qs = blocks[..., 16:].reshape(rows, nsb, 4, 32)
    codes = np.stack([qs & 0xF, qs >> 4], axis=3).reshape(rows, nsb * 8, 32)   # sub-block j = 2i + (0 low, 1 high)
    packed = codes[..., :16] | (codes[..., 16:] << 4)                      # the Q4 block byte order
    nb = nsb * 8
    q = _interleave(packed, groups, nb, 4)
    supers = np.ascontiguousarray(dd.reshape(groups, GROUP_ROWS, nsb, 2).transpose(0, 2, 3, 1))
    return GgufPacked(torch.from_numpy(q.reshape(-1)), torch.from_numpy(_group_major(sc.reshape(rows, nb), groups, nb)),
                      torch.from_numpy(_group_major(mn.reshape(rows, nb), groups, nb)), GGUF_KINDS["Q4_K"], "Q4_K", n,
                      k, torch.from_numpy(supers))


def pack_gguf_weight(quant) -> GgufPacked | None:
    """The packed matrix of a GgufWeight (exllamav2/quant/gguf.py), its parts stacked by rows; None when its parts
    mix types or use one without a kernel."""
    types = set(quant.types)
    if len(types) != 1 or next(iter(types)) not in GGUF_KINDS:
        return None
    raws = [src.raw(name) for src, name, _ in quant.parts]
    t = raws[0][0]
    data = np.concatenate([r[1] for r in raws]) if len(raws) > 1 else raws[0][1]
    shape = (sum(r[2][0] for r in raws), quant.in_features)
    return pack_gguf_blocks(t, data, shape, name=quant.key)
