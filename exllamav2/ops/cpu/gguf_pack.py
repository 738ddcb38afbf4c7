"""GGUF Q4_0/Q4_1/Q8_0 blocks rearranged for the C++ GEMV (csrc/gemv.cpp, csrc/gguf_gemv_kernels.h), at the
file's own size; Q4_K super-blocks as 32-column 4-bit blocks with their integer scales and mins (4.625 bits per
weight against the file's 4.5, the same weights).

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
  super-blocks' fp16 d and dmin in `super_scales` (groups, blocks / 8, 2, 16).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ...quant.gguf_blocks import check_block_matrix
from .kernels import GGUF_KINDS, GROUP_ROWS



@dataclass
class GgufPacked:
    qweight: torch.Tensor          # uint8 (groups * blocks * record bytes): codes and scales, see above
    kind: int                      # GGUF_KINDS value
    ggml_type: str
    out_features: int
    in_features: int
    super_scales: torch.Tensor | None = None   # Q4_K: (groups, blocks / 8, 2, 16) float16 d, dmin

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
    d = _group_major(blocks[..., 0:2].copy().view(np.float16)[..., 0], groups, nb)
    if ggml_type == "Q8_0":
        codes = blocks[..., 2:] ^ np.uint8(0x80)  # q + 128 as unsigned
        rec = _records(_interleave(codes, groups, nb, 8), d)
    elif ggml_type == "Q4_1":
        m = _group_major(blocks[..., 2:4].copy().view(np.float16)[..., 0], groups, nb)
        rec = _records(_interleave(blocks[..., 4:], groups, nb, 4), d, m)
    else:
        rec = _records(_interleave(blocks[..., 2:], groups, nb, 4), d)
    return GgufPacked(rec, GGUF_KINDS[ggml_type], ggml_type, n, shape[1])


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
    rec = _records(_interleave(packed, groups, nb, 4), _group_major(sc.reshape(rows, nb), groups, nb),
                   _group_major(mn.reshape(rows, nb), groups, nb))
    supers = np.ascontiguousarray(dd.reshape(groups, GROUP_ROWS, nsb, 2).transpose(0, 2, 3, 1))
    return GgufPacked(rec, GGUF_KINDS["Q4_K"], "Q4_K", n, k, torch.from_numpy(supers))


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
