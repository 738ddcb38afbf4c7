"""The quantized KV formats (the reference): what a quantized cache (exllamav2/cache_q.py) stores, how new K/V rows
are quantised into it, and how codes are dequantised again. The Triton attention kernels
(ops/triton/attn_kernels.py) read the same codes and scales and are tested against this file.

- `GroupQuant(4)` / `GroupQuant(8)`: each group of 32 consecutive head-dim values is rotated by the unnormalised
  32-point Walsh-Hadamard matrix H (spreads an outlier over its group), then stored as signed integer codes with
  one scale per group. Codes are kept with a +2**(bits-1) offset as uint8, two 4-bit codes per byte (low nibble
  first). Dequantised: x = (codes * scale) @ H / 32 (H @ H = 32 I).
- `FP8Quant`: FP8 e5m2 per value (torch's round-to-nearest conversion), no scales, no rotation.

`QuantPages` is one layer of a quantized cache seen as pages (the paged attention ops take it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP = 32


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x (..., n * 32) float -> each group of 32 times H (`hadamard_matrix`), computed as 5 add/sub butterflies:
    every row is rotated on its own, so a token's codes never depend on how many tokens are written with it (a
    matmul may change its blocking with the row count); the Triton write (ops/triton/attn_kv_quant.py) repeats
    these steps exactly."""
    shape = x.shape
    g = x.reshape(-1, GROUP)
    h = 1
    while h < GROUP:
        g = g.view(g.shape[0], GROUP // (2 * h), 2, h)
        a, b = g[:, :, 0], g[:, :, 1]
        g = torch.stack((a + b, a - b), 2)  # (out= into strided halves would be faster, but dynamo refuses it)
        h *= 2
    return g.reshape(shape)


_HADAMARD: dict[str, torch.Tensor] = {}


def hadamard_matrix(device) -> torch.Tensor:
    """The Sylvester Walsh-Hadamard matrix of order 32 (float32): symmetric, H @ H = 32 I."""
    key = str(device)
    if key not in _HADAMARD:
        h = torch.ones(1, 1)
        for _ in range(5):
            h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
        _HADAMARD[key] = h.to(device)
    return _HADAMARD[key]


class GroupQuant:
    """Symmetric integer codes of `bits` (4 or 8) per group of 32 Hadamard-rotated values, one scale per group."""

    has_scales = True
    rotated = True

    def __init__(self, bits: int):
        if bits not in (4, 8):
            raise ValueError(f"GroupQuant: bits must be 4 or 8, got {bits}")
        self.bits = bits
        self.name = f"q{bits}"
        self.qneg = 1 << (bits - 1)  # codes run -qneg .. qneg - 1, stored with +qneg offset
        self.qpos = self.qneg - 1

    def code_width(self, head_dim: int) -> int:
        return head_dim * self.bits // 8

    def scale_width(self, head_dim: int) -> int:
        return head_dim // GROUP

    def quantize(self, x: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """x (..., d) -> codes uint8 (..., d * bits / 8), scales (..., d / 32)."""
        d = x.shape[-1]
        g = hadamard_rotate(x.float()).reshape(*x.shape[:-1], d // GROUP, GROUP)
        # the scale makes both the group's max and min representable (the code range is asymmetric)
        hi = g.amax(-1).clamp(min=0) / self.qpos
        lo = g.amin(-1).clamp(max=0) / -self.qneg
        fmax = torch.finfo(scale_dtype).max
        scales = torch.maximum(hi, lo).clamp(max=fmax).to(scale_dtype)
        # codes are computed against the stored (rounded) scale so the scale's rounding adds no error
        s = scales.float()
        s = torch.where(s > 0, s, torch.ones_like(s)).unsqueeze(-1)
        q = (g / s).round_().clamp_(-self.qneg, self.qpos).add_(self.qneg).to(torch.int16).reshape(x.shape)
        if self.bits == 4:
            # bit ops on uint8 are unvectorised on CPU (~20x slower than on int16): pack in int16, then narrow
            q = q[..., 0::2] | (q[..., 1::2] << 4)
        return q.to(torch.uint8), scales

    def dequantize(self, codes: torch.Tensor, scales: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        if self.bits == 4:
            wide = codes.to(torch.int16)
            codes = torch.stack((wide & 15, wide >> 4), -1).flatten(-2)
        d = codes.shape[-1]
        g = codes.float().sub_(self.qneg).reshape(*codes.shape[:-1], d // GROUP, GROUP)
        g = g * scales.float().unsqueeze(-1)
        # H @ H = 32 I: the inverse rotation is H / 32. A matmul (5-10x faster than the butterflies on the CPU): the
        # callers dequantise a sequence's keys alone, so a row's result does not depend on the batch
        return (g @ hadamard_matrix(codes.device)).mul_(1.0 / GROUP).reshape(codes.shape).to(out_dtype)


class FP8Quant:
    """FP8 e5m2 per value (torch's round-to-nearest conversion, where the original truncated the fp16 low byte)."""

    has_scales = False
    rotated = False
    bits = 8
    name = "fp8"
    FP8_MAX = 57344.0

    def code_width(self, head_dim: int) -> int:
        return head_dim

    def scale_width(self, head_dim: int) -> int:
        return 0

    def quantize(self, x: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, None]:
        # torch's e5m2 conversion does not saturate: clamp so out-of-range values become +-max, not inf
        y = x.clamp(-self.FP8_MAX, self.FP8_MAX).to(torch.float8_e5m2)
        return y.view(torch.uint8), None

    def dequantize(self, codes: torch.Tensor, scales, out_dtype: torch.dtype) -> torch.Tensor:
        return codes.view(torch.float8_e5m2).to(out_dtype)


FORMATS = {"q4": GroupQuant(4), "q8": GroupQuant(8), "fp8": FP8Quant()}


def format_named(name: str) -> GroupQuant | FP8Quant:
    fmt = FORMATS.get(name)
    if fmt is None:
        raise ValueError(f"unknown KV cache format {name!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def write_part(fmt, codes: torch.Tensor, scales: torch.Tensor | None, x: torch.Tensor, slots: torch.Tensor,
               scale_dtype: torch.dtype) -> None:
    """Quantise x (T, kv_heads, head_dim) into codes/scales (slots, kv_heads, ...) at slots (T,)."""
    q, s = fmt.quantize(x, scale_dtype)
    codes.index_copy_(0, slots, q)
    if s is not None:
        scales.index_copy_(0, slots, s)


@dataclass
class QuantPages:
    """One layer of a quantized cache as pages: codes (slots, kv_heads, code width) uint8 and scales (slots,
    kv_heads, head_dim / 32) (None for FP8) for keys and values; slot p * page_size + i is position i of page p."""
    k_codes: torch.Tensor
    k_scales: torch.Tensor | None
    v_codes: torch.Tensor
    v_scales: torch.Tensor | None
    k_format: GroupQuant | FP8Quant
    v_format: GroupQuant | FP8Quant
    dtype: torch.dtype  # the scales' dtype (the cache's activation dtype)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantise k, v (T, kv_heads, head_dim) into their slots (T,). Each token's groups are quantised alone,
        so a token's codes do not depend on the tokens written with it."""
        for part in self.parts(k, v):
            write_part(*part, slots, self.dtype)

    def parts(self, k: torch.Tensor, v: torch.Tensor) -> tuple:
        """(format, codes, scales, new rows) for the keys and for the values."""
        return ((self.k_format, self.k_codes, self.k_scales, k), (self.v_format, self.v_codes, self.v_scales, v))

    def read(self, slots, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V (n, kv_heads, head_dim) of the slots (a slice or an index tensor), dequantised."""
        out = []
        for fmt, codes, scales in ((self.k_format, self.k_codes, self.k_scales),
                                   (self.v_format, self.v_codes, self.v_scales)):
            out.append(fmt.dequantize(codes[slots], None if scales is None else scales[slots], out_dtype))
        return out[0], out[1]
