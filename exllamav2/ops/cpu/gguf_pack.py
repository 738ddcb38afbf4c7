"""GGUF Q4_0/Q4_1/Q8_0 blocks rearranged for the C++ GEMV (csrc/gemv.cpp), at the file's own size.

Output rows go in groups of 16 (the last padded with zero-scale rows); per group and 32-column block the kernel
reads 16 rows x 4 bytes at a time, so one 64-byte load feeds one VNNI dot product for 16 rows:
- 4-bit: chunk c (0..3) holds bytes 4c..4c+3 of each row's 16 nibble bytes (a pure byte permutation: a byte keeps
  column j in its low nibble and j+16 in its high one, as GGUF stores them);
- 8-bit: chunk c (0..7) holds codes 4c..4c+3 of each row, stored as q + 128 (unsigned for vpdpbusd);
- scales d (fp16, exact copies) as (groups, blocks, 16), and for Q4_1 the offsets m likewise.
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
    offsets: torch.Tensor | None   # same, Q4_1 only
    kind: int                      # GGUF_KINDS value
    ggml_type: str
    out_features: int
    in_features: int

    def nbytes(self) -> int:
        ts = (self.qweight, self.scales, self.offsets)
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _interleave(a: np.ndarray, groups: int, nb: int, chunks: int) -> np.ndarray:
    """(rows_padded, nb, chunks * 4) -> (groups, nb, chunks, 16, 4) contiguous."""
    return np.ascontiguousarray(a.reshape(groups, GROUP_ROWS, nb, chunks, 4).transpose(0, 2, 3, 1, 4))


def _group_major(a: np.ndarray, groups: int, nb: int) -> np.ndarray:
    """(rows_padded, nb) -> (groups, nb, 16)."""
    return np.ascontiguousarray(a.reshape(groups, GROUP_ROWS, nb).transpose(0, 2, 1))


def pack_gguf_blocks(ggml_type: str, raw: np.ndarray, shape: tuple[int, ...], name: str = "tensor") -> GgufPacked:
    """`raw`: uint8 (rows, bytes per row) as GGUFFile.raw returns it, rows in HF order; `shape`: (N, K)."""
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
