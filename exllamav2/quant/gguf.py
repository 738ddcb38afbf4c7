"""GgufWeight: a linear weight kept in the GGUF file's own quant blocks (Q4_0, Q4_1, Q8_0), possibly the row
concatenation of several tensors (fused q/k/v or gate/up).

Nothing is copied at load: the blocks are read from the file's memory map when a backend prepares its kernel
(the CPU backend packs them for torch's int4 kernel: 4-bit blocks one digit per weight, Q8_0 as two digits, both
exact) and when the reference dequantises (through the GGUF reader, as a dense load would)."""

from __future__ import annotations

import torch

from .gguf_blocks import BLOCK, SUPPORTED_TYPES, decode_blocks
from .kernels.cpu_int4 import Int4PackedMatrix, build_int4pack, int4pack_available, pack_digits
from .weight import QuantWeight

PACKED_TYPES = SUPPORTED_TYPES


def gguf_block_type(src, name: str) -> str | None:
    """The GGUF quant type of `name` when it is one GgufWeight keeps packed, else None."""
    if not hasattr(src, "ggml_type"):
        return None
    t = src.ggml_type(name)
    return t if t in PACKED_TYPES else None


class GgufWeight(QuantWeight):
    format = "gguf"

    def __init__(self, key: str, parts: list[tuple], in_features: int, out_features: int, dtype: torch.dtype,
                 device, bias: torch.Tensor | None = None, **kw):
        """parts: (source, tensor name, rows) in output order; their rows add up to out_features."""
        if sum(r for _, _, r in parts) != out_features:
            raise ValueError(f"{key}: GGUF parts hold {sum(r for _, _, r in parts)} rows, expected {out_features}")
        if in_features % BLOCK:
            raise ValueError(f"{key}: {in_features} input features is not a multiple of the GGUF block ({BLOCK})")
        self.parts = list(parts)
        self.types = [src.ggml_type(name) for src, name, _ in parts]
        kw.setdefault("precision", torch.float32)
        super().__init__(key, in_features, out_features, dtype, device, bias, **kw)

    @classmethod
    def concat(cls, key: str, weights: list["GgufWeight"], dtype, device) -> "GgufWeight | None":
        """One weight over the rows of several (fused q/k/v, gate/up), or None when they cannot share a kernel."""
        if len({w.in_features for w in weights}) != 1 or len({t for w in weights for t in w.types}) != 1:
            return None
        biases = [w.bias for w in weights]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(w.out_features, dtype=dtype, device=device)
                              for b, w in zip(biases, weights)])
        return cls(key, [p for w in weights for p in w.parts], weights[0].in_features,
                   sum(w.out_features for w in weights), dtype, device, bias, fast_path=False)

    def _reference(self, precision: torch.dtype) -> torch.Tensor:
        return torch.cat([src.get_tensor(name, device=self.device, dtype=precision) for src, name, _ in self.parts])

    def _build_packed(self) -> Int4PackedMatrix | None:
        if not int4pack_available():
            return None
        blocks = [decode_blocks(*src.raw(name), name) for src, name, _ in self.parts]
        kind = blocks[0].kind
        digits = torch.cat([b.digits for b in blocks])
        scale = torch.cat([b.scale for b in blocks])
        if kind == "int4":
            # w = q * d + offset = (q - 8) * d + (offset + 8 d), the kernel's convention, exactly
            zero = torch.cat([b.offset if b.offset is not None else torch.zeros_like(b.scale) for b in blocks])
            return pack_digits(digits, scale, zero + 8.0 * scale, BLOCK, None, self.out_features, self.in_features)
        # Q8_0: code q + 128 with zero point 128 is an 8-bit EXL2-style group, packed as two exact 4-bit digits
        groups = self.in_features // BLOCK
        codes = (digits.to(torch.int64) + 128).t().contiguous()
        return build_int4pack(codes, [BLOCK] * groups, [8] * groups, scale.t().contiguous(),
                              torch.full((groups, self.out_features), 128), None, self.out_features)

    def _stored_bytes(self) -> int:
        return 0  # read from the file's memory map on demand

    def file_bytes(self) -> int:
        return sum(src.nbytes(name) for src, name, _ in self.parts)

    def bits_per_weight(self) -> float:
        return 8.0 * self.file_bytes() / self.numel()

    def describe(self) -> str:
        return f"GGUF {'/'.join(sorted(set(self.types)))} {self.bits_per_weight():.2f} bpw"
