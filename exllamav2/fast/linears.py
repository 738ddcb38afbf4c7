"""Decode-time linear layers over one (possibly fused) weight: dense bf16, weight-only int8 and int4 g32.

Every kind takes and returns bf16 2-D activations (the int kernels fall onto a far slower path with fp32
activations) and can return its weight dequantized to bf16 (`dense_weight`) for tests and references.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .gguf_blocks import BLOCK, BlockDigits

INT4_GROUP = 32
_INT4_N_ALIGN = 16
BF16 = torch.bfloat16


def int4_supported() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")


def int8_supported() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


class DenseLinear(nn.Module):
    """y = x W^T + b in bf16. `prepack()` switches eager calls to a oneDNN-reordered copy of W (faster GEMV);
    compiled graphs use the plain parameter and let inductor's freezing do the same."""

    kind = "bf16"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.weight = nn.Parameter(weight.to(BF16).contiguous(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.to(BF16).contiguous(), requires_grad=False)
        self.out_features, self.in_features = self.weight.shape
        self._packed = None

    def prepack(self) -> None:
        try:
            self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.data, 1)
        except (AttributeError, RuntimeError):
            self._packed = None

    def unpack(self) -> None:
        self._packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packed is not None and not torch.compiler.is_compiling():
            return torch.ops.mkldnn._linear_pointwise(x, self._packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def dense_weight(self) -> torch.Tensor:
        return self.weight.data

    def nbytes(self) -> int:
        return self.weight.numel() * 2


class Int8Linear(nn.Module):
    """Weight-only int8, one bf16 scale per output row: y = (x @ q^T) * s + b."""

    kind = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("q", q.to(torch.int8).contiguous())
        self.register_buffer("scale", scale.to(BF16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.to(BF16).contiguous(), requires_grad=False)
        self.out_features, self.in_features = q.shape

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int8Linear":
        """Round-to-nearest, symmetric, per output row."""
        wf = w.float()
        s = (wf.abs().amax(1) / 127.0).clamp(min=1e-10)
        q = torch.round(wf / s[:, None]).clamp(-127, 127)
        # the kernel multiplies by the bf16 scale: quantize against that rounded value
        s = s.to(BF16)
        q = torch.round(wf / s.float()[:, None]).clamp(-127, 127)
        return cls(q.to(torch.int8), s, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x, self.q, self.scale)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return (self.q.float() * self.scale.float()[:, None]).to(BF16)

    def nbytes(self) -> int:
        return self.q.numel() + self.scale.numel() * 2


class Int4Linear(nn.Module):
    """Weight-only int4, groups of 32 input columns: w = (d - 8) * scale + zero (the packed kernel's
    convention), bf16 scale/zero. Output rows are padded to a multiple of 16 for the kernel."""

    kind = "int4"

    def __init__(self, digits: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bias: torch.Tensor | None = None):
        """digits (N, K) in 0..15; scale, zero (N, K/32) float."""
        super().__init__()
        n, k = digits.shape
        if k % INT4_GROUP:
            raise ValueError(f"int4 weights need a multiple of {INT4_GROUP} input columns, got {k}")
        pad = (-n) % _INT4_N_ALIGN
        if pad:
            digits = torch.cat((digits, torch.full((pad, k), 8, dtype=digits.dtype)))
            scale = torch.cat((scale, torch.zeros(pad, scale.shape[1], dtype=scale.dtype)))
            zero = torch.cat((zero, torch.zeros(pad, zero.shape[1], dtype=zero.dtype)))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(digits.to(torch.int32).contiguous(), 1)
        sz = torch.stack((scale, zero), -1).transpose(0, 1).contiguous().to(BF16)   # (K/32, N, 2)
        self.register_buffer("packed", packed)
        self.register_buffer("scale_zero", sz)
        self.bias = None if bias is None else nn.Parameter(bias.to(BF16).contiguous(), requires_grad=False)
        self.out_features, self.in_features = n, k
        self._padded = pad > 0

    @classmethod
    def from_blocks(cls, b: BlockDigits, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Exact for GGUF Q4_0/Q4_1 blocks: w = q * d + off = (q - 8) * d + (off + 8 d)."""
        if b.kind != "int4":
            raise ValueError("Int4Linear.from_blocks needs 4-bit blocks")
        off = b.offset if b.offset is not None else torch.zeros_like(b.scale)
        return cls(b.digits, b.scale, off + 8.0 * b.scale, bias)

    @classmethod
    def quantize(cls, w: torch.Tensor, bias: torch.Tensor | None = None) -> "Int4Linear":
        """Round-to-nearest asymmetric int4 over groups of 32."""
        n, k = w.shape
        wg = w.float().view(n, k // INT4_GROUP, INT4_GROUP)
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-8)
        q = torch.round((wg - lo[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
        return cls(q, scale, lo + 8.0 * scale, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scale_zero)
        if self._padded:
            y = y[:, :self.out_features]
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        """Dequantized through the kernel itself: W^T = kernel(I)."""
        eye = torch.eye(self.in_features, dtype=BF16)
        return self.forward_nobias(eye).t().contiguous()

    def forward_nobias(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, INT4_GROUP, self.scale_zero)
        return y[:, :self.out_features]

    def nbytes(self) -> int:
        return self.packed.numel() + self.scale_zero.numel() * 2


def from_gguf_blocks(b: BlockDigits, want: str, bias=None) -> nn.Module:
    """A GGUF-block weight in the requested kind: 4-bit blocks map exactly onto int4 g32; Q8_0 (per-32 scales)
    goes to per-row int8 (requantized) since the int8 kernel has one scale per row."""
    from .gguf_blocks import dequantize_digits
    if b.kind == "int4" and want in ("int4", "native"):
        return Int4Linear.from_blocks(b, bias)
    w = dequantize_digits(b)
    if want == "int4" and b.kind == "int8":
        return Int8Linear.quantize(w, bias)   # keep 8-bit sources at 8 bits
    return make_linear(w, want if want != "native" else "int8", bias)


def make_linear(w: torch.Tensor, kind: str, bias=None) -> nn.Module:
    if kind == "bf16":
        return DenseLinear(w, bias)
    if kind == "int8":
        return Int8Linear.quantize(w, bias)
    if kind == "int4":
        if w.shape[1] % INT4_GROUP:
            return Int8Linear.quantize(w, bias)
        return Int4Linear.quantize(w, bias)
    raise ValueError(f"weight kind '{kind}': expected bf16, int8 or int4")


assert BLOCK == INT4_GROUP
