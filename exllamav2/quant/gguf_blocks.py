"""GGUF quant blocks: the geometry of every type kept packed (BLOCK_GEOMETRY: Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, and the lattice types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S,
IQ1_S, IQ1_M), and Q4_0, Q4_1, Q8_0 decoded into integer digits and per-32-column scales,
in HF row order (for the CPU int4 kernel).

Block layouts (32 weights per block, little endian):
- Q4_0: fp16 d, 16 bytes of nibbles;                  w = d * (q - 8)
- Q4_1: fp16 d, fp16 m, 16 bytes of nibbles;          w = d * q + m
- Q5_0: fp16 d, uint32 qh, 16 bytes of nibbles;       w = d * (q - 16), bit j of qh the fifth bit of weight j
- Q5_1: fp16 d, fp16 m, uint32 qh, 16 bytes of nibbles; w = d * q + m
- Q8_0: fp16 d, 32 int8;                              w = d * q
Nibble j < 16 of a block is the low half of byte j, nibble j >= 16 the high half of byte j - 16.
Q5_0/Q5_1, IQ4_NL (a non-linear 16-value table) and the 256-weight super-blocks (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K,
IQ4_XS) have no int4 mapping; the Triton kernels decode them from the file's bytes (exllamav2/ops/triton/
gguf_kernels.py documents their layouts), the lattice types after the CPU kernels' re-encoding (quant/gguf.py:
device_blocks).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BLOCK = 32
SUPPORTED_TYPES = ("Q4_0", "Q4_1", "Q8_0")   # the types decode_blocks maps to integer digits
# (weights per block, bytes per block) of every type a linear keeps packed as the file's blocks
BLOCK_GEOMETRY = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24), "Q8_0": (32, 34),
                  "IQ4_NL": (32, 18), "Q2_K": (256, 84), "Q3_K": (256, 110), "Q4_K": (256, 144),
                  "Q5_K": (256, 176), "Q6_K": (256, 210), "IQ4_XS": (256, 136),
                  "IQ2_XXS": (256, 66), "IQ2_XS": (256, 74), "IQ2_S": (256, 82), "IQ3_XXS": (256, 98),
                  "IQ3_S": (256, 110), "IQ1_S": (256, 50), "IQ1_M": (256, 56)}
PACKED_TYPES = tuple(BLOCK_GEOMETRY)
# the lattice types: grids of 4 or 8 weights per index, decoded by the CPU kernels (csrc/gguf_file_blocks.h), for the
# CPU GEMV's table codes and, re-encoded as 4-bit table blocks, for the Triton kernels (quant/gguf.py: device_blocks)
LATTICE_TYPES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M")
# byte offsets of each block's fp16 fields: the scale d, and the offset m (Q4_1, Q5_1) or dmin (Q2_K, Q4_K, Q5_K)
F16_FIELDS = {"Q4_0": (0, None), "Q4_1": (0, 2), "Q5_0": (0, None), "Q5_1": (0, 2), "Q8_0": (0, None),
              "IQ4_NL": (0, None), "Q2_K": (80, 82), "Q3_K": (108, None), "Q4_K": (0, 2), "Q5_K": (0, 2),
              "Q6_K": (208, None), "IQ4_XS": (0, None), "IQ2_XXS": (0, None), "IQ2_XS": (0, None),
              "IQ2_S": (0, None), "IQ3_XXS": (0, None), "IQ3_S": (0, None), "IQ1_S": (0, None),
              "IQ1_M": (None, None)}   # IQ1_M: d in the top nibbles of its 4 scale words (set_block_d)


def set_block_d(qtype: str, blocks: np.ndarray, d: np.ndarray) -> None:
    """Write each block's fp16 scale d into `blocks` (uint8 (..., bytes per block)), where the type keeps it: at
    F16_FIELDS' offset, or for IQ1_M one nibble into the top of each of its four 16-bit scale words."""
    bits = np.asarray(d, dtype=np.float16).view(np.uint16)
    if qtype != "IQ1_M":
        at = F16_FIELDS[qtype][0]
        blocks[..., at:at + 2] = bits.view(np.uint8).reshape(*bits.shape, 2)
        return
    words = np.ascontiguousarray(blocks[..., 48:56]).view(np.uint16)
    for k in range(4):
        words[..., k] = (words[..., k] & 0x0FFF) | (((bits >> (4 * k)) & 0xF) << 12)
    blocks[..., 48:56] = words.view(np.uint8)


@dataclass
class BlockDigits:
    """w[n, k] = digits[n, k] * scale[n, k // 32] + offset[n, k // 32] (offset is None when 0)."""
    kind: str                      # "int4" (digits 0..15) or "int8" (digits -128..127)
    digits: torch.Tensor           # (N, K) int32 for int4, int8 for int8
    scale: torch.Tensor            # (N, K/32) float32
    offset: torch.Tensor | None    # (N, K/32) float32


def check_block_matrix(ggml_type: str, raw: np.ndarray, shape: tuple[int, ...], name: str, kinds,
                       what: str = "no direct integer mapping") -> tuple[int, int, int]:
    """(rows, blocks per row, bytes per block) of a matrix of one of `kinds` (types of BLOCK_GEOMETRY), or a
    ValueError naming the tensor."""
    if ggml_type not in kinds:
        raise ValueError(f"{name}: GGUF type {ggml_type} has {what} (expected one of {', '.join(kinds)})")
    block, bb = BLOCK_GEOMETRY[ggml_type]
    if len(shape) != 2 or shape[1] % block:
        raise ValueError(f"{name}: shape {list(shape)} is not a matrix with a multiple of {block} columns")
    n, k = shape
    nb = k // block
    if raw.shape != (n, nb * bb):
        raise ValueError(f"{name}: {ggml_type} data has shape {list(raw.shape)}, expected [{n}, {nb * bb}]")
    return n, nb, bb


def decode_blocks(ggml_type: str, raw: np.ndarray, shape: tuple[int, ...], name: str = "tensor") -> BlockDigits:
    """`raw` is uint8 (rows, bytes per row) as `GGUFFile.raw` returns it; `shape` the HF shape (N, K)."""
    n, nb, bb = check_block_matrix(ggml_type, raw, shape, name, SUPPORTED_TYPES)
    k = shape[1]
    blocks = np.ascontiguousarray(raw).reshape(n, nb, bb)
    d = torch.from_numpy(blocks[..., 0:2].copy().view(np.float16)[..., 0]).float()
    if ggml_type == "Q8_0":
        q = torch.from_numpy(blocks[..., 2:].copy().view(np.int8)).reshape(n, k)
        return BlockDigits("int8", q, d, None)
    first = 4 if ggml_type == "Q4_1" else 2
    qs = torch.from_numpy(blocks[..., first:].copy()).to(torch.int32)       # (n, nb, 16)
    q = torch.cat((qs & 0xF, qs >> 4), dim=-1).reshape(n, k)
    if ggml_type == "Q4_1":
        m = torch.from_numpy(blocks[..., 2:4].copy().view(np.float16)[..., 0]).float()
        return BlockDigits("int4", q, d, m)
    return BlockDigits("int4", q, d, -8.0 * d)


def dequantize_digits(b: BlockDigits) -> torch.Tensor:
    """float32 (N, K) weights."""
    n, k = b.digits.shape
    w = b.digits.float().view(n, k // BLOCK, BLOCK) * b.scale[..., None]
    if b.offset is not None:
        w = w + b.offset[..., None]
    return w.view(n, k)
