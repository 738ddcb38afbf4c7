"""Fast CPU matmul for quantized weights through torch's packed int4 kernel (`_weight_int4pack_mm_for_cpu`).

The kernel computes y = x @ W'.T with W'[n, k] = (d[n, k] - 8) * scale[k // G, n] + zero[k // G, n], 4-bit digits d,
G in {32, 64, 128, 256}, N a multiple of 16, bf16 activations and bf16 scale/zero.

Every EXL2 width and 4-bit GPTQ maps onto it exactly in the integer part (only the scales are rounded to bf16):
- width b <= 4 with zero point z = 2^(b-1) (EXL2): digit c + 8 - z, kernel zero 0;
- GPTQ (any zero z per group and column): digit c, kernel zero (8 - z) * s;
- width b in {5, 6, 8} (EXL2): two digits, since c - 2^(b-1) = 16 * (h - 8) + (l - 8) + 8 with
  h = (c >> 4) + 8 - 2^(b-5) and l = c & 15: a "high" row with scale 16s and zero 0, and a "low" row with scale s
  and zero 8s (16s and 8s are exact in bf16 once s is).
High rows are appended after the K rows, and the input is gathered to match: x' = x[:, idx], where idx holds the
act-order permutation, the duplicated columns of the high rows and any padding (padding rows have scale 0).
Each source group is padded to a multiple of G so that kernel groups never straddle two source groups.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KERNEL_GROUP_SIZES = (256, 128, 64, 32)
_N_ALIGN = 16


def int4pack_available() -> bool:
    return hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu") and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def choose_kernel_group(group_rows: list[int]) -> int | None:
    """The largest kernel group size dividing every source group's row count; failing that, every group but the
    last (which is then padded)."""
    for g in KERNEL_GROUP_SIZES:
        if all(r % g == 0 for r in group_rows):
            return g
    for g in KERNEL_GROUP_SIZES:
        if all(r % g == 0 for r in group_rows[:-1]):
            return g
    return None


@dataclass
class Int4PackedMatrix:
    packed: torch.Tensor        # uint8, the kernel's opaque layout
    scale_zero: torch.Tensor    # (K'/G, N_pad, 2) bf16
    group_size: int
    gather: torch.Tensor | None  # (K',) int64 input columns, or None when x can be used as is
    out_features: int
    in_features: int

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (M, in) bf16 -> (M, out) bf16."""
        if self.gather is not None:
            x = x.index_select(1, self.gather)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self.packed, self.group_size, self.scale_zero)
        return y[:, :self.out_features] if y.shape[1] != self.out_features else y

    def nbytes(self) -> int:
        n = self.packed.numel() * self.packed.element_size() + self.scale_zero.numel() * self.scale_zero.element_size()
        return n + (0 if self.gather is None else self.gather.numel() * self.gather.element_size())


def build_int4pack(codes: torch.Tensor, group_rows: list[int], group_bits: list[int], scales: torch.Tensor,
                   zeros: torch.Tensor, perm: torch.Tensor | None, out_features: int) -> Int4PackedMatrix | None:
    """Repack a quantized matrix for the int4 kernel, or return None when its groups cannot be aligned.

    codes: (K, N) unsigned codes in quantized row order; group_rows/group_bits: per source group, in row order;
    scales: (groups, N) fp32 effective scales; zeros: (groups, N) integer zero points;
    perm: (K,) input feature of each quantized row (None: identity).
    """
    if not int4pack_available():
        return None
    G = choose_kernel_group(group_rows)
    if G is None:
        return None
    K, N = codes.shape
    perm = torch.arange(K) if perm is None else perm.to(torch.int64)

    high_blocks: list[tuple] = []

    def add(block_digits, block_scale, block_zero, block_gather, into):
        rows = block_digits.shape[0]
        pad = -rows % G
        if pad:
            block_digits = torch.cat([block_digits, torch.full((pad, N), 8, dtype=torch.int64)])
            block_gather = torch.cat([block_gather, torch.zeros(pad, dtype=torch.int64)])
        kg = (rows + pad) // G
        into.append((block_digits, block_scale.expand(kg, N), block_zero.expand(kg, N), block_gather))

    start = 0
    lows: list[tuple] = []
    for g, (rows, bits) in enumerate(zip(group_rows, group_bits)):
        c = codes[start:start + rows].to(torch.int64)
        s = scales[g:g + 1].to(torch.float32)
        z = zeros[g:g + 1].to(torch.int64)
        cols = perm[start:start + rows]
        if bits <= 4:
            uniform_zero = bool((z == z[0, 0]).all()) and int(z[0, 0]) <= 8 and (1 << bits) - 1 + 8 - int(z[0, 0]) <= 15
            if uniform_zero:  # shift the codes so the kernel's own -8 is the zero point: no rounded zero term
                add(c + 8 - int(z[0, 0]), s, torch.zeros_like(s), cols, lows)
            else:
                add(c, s, (8 - z).to(torch.float32) * s, cols, lows)
        else:
            if not bool((z == (1 << (bits - 1))).all()):
                return None
            add((c >> 4) + 8 - (1 << (bits - 5)), 16 * s, torch.zeros_like(s), cols, high_blocks)
            add(c & 15, s, 8 * s, cols, lows)
        start += rows

    blocks = lows + high_blocks
    digits = torch.cat([b[0] for b in blocks])
    scale = torch.cat([b[1] for b in blocks])
    zero = torch.cat([b[2] for b in blocks])
    gather = torch.cat([b[3] for b in blocks])
    identity = gather.numel() == K and torch.equal(gather, torch.arange(K))
    return pack_digits(digits.t(), scale.t(), zero.t(), G, None if identity else gather, out_features, K)


def pack_digits(digits: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int,
                gather: torch.Tensor | None, out_features: int, in_features: int) -> Int4PackedMatrix:
    """The kernel's layout from digits (N, K') in 0..15 and per-group scale/zero (N, K'/G) floats, where
    w = (d - 8) * scale + zero. Rows are padded to a multiple of 16 (zero scale) for the kernel."""
    n = digits.shape[0]
    pad = -n % _N_ALIGN
    if pad:
        digits = torch.cat([digits, torch.full((pad, digits.shape[1]), 8, dtype=digits.dtype)])
        scale = torch.cat([scale, torch.zeros(pad, scale.shape[1], dtype=scale.dtype)])
        zero = torch.cat([zero, torch.zeros(pad, zero.shape[1], dtype=zero.dtype)])
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits.contiguous().to(torch.int32), 1)
    scale_zero = torch.stack([scale.t(), zero.t()], -1).to(torch.bfloat16).contiguous()
    return Int4PackedMatrix(packed, scale_zero, group_size, gather, out_features, in_features)
