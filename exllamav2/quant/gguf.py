"""GgufWeight: a linear weight kept in the GGUF file's own quant blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, IQ4_NL,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_XS, and the lattice types IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M),
possibly the row concatenation of several tensors (fused q/k/v or gate/up).

Nothing is copied at load: the blocks are read from the file's memory map when a backend prepares its kernel and
when the reference dequantises (through the GGUF reader, as a dense load would). The backends:
- triton (exllamav2/ops/triton/gguf_linear.py): the blocks as they are in the file, on the device (the lattice
  types re-encoded as 4-bit table blocks: device_blocks);
- cpu: Q4_0/Q4_1/Q8_0 packed for torch's int4 kernel (4-bit blocks one digit per weight, Q8_0 as two digits, both
  exact); the other types (`dense_on_cpu`) run by the backend's GEMV where it has one for the type, else
  dequantised to a dense matrix at prepare, as a dense load would;
- torch: the reference dequantise-then-matmul.
"""

from __future__ import annotations

import torch

from .gguf_blocks import BLOCK, BLOCK_GEOMETRY, LATTICE_TYPES, PACKED_TYPES, SUPPORTED_TYPES, decode_blocks
from .kernels.cpu_int4 import Int4PackedMatrix, build_int4pack, int4pack_available, pack_digits
from .weight import QuantWeight


def gguf_block_type(src, name: str, device=None) -> str | None:
    """The GGUF quant type of `name` when it is one GgufWeight keeps packed on `device` (the lattice types off the
    CPU only where lattice_on_device), else None."""
    if not hasattr(src, "ggml_type"):
        return None
    t = src.ggml_type(name)
    if t in LATTICE_TYPES and device is not None and torch.device(device).type != "cpu" and not lattice_on_device():
        return None
    return t if t in PACKED_TYPES else None


def lattice_on_device() -> bool:
    """Whether a lattice type can go to a GPU in blocks: re-encoded for the Triton kernels by the CPU kernels
    (`GgufWeight.device_blocks`), which must build on this machine; else those types load dense there."""
    from ..ops.cpu import build, kernels
    return build.disabled_reason() is None and kernels.decoders_ready()


class GgufWeight(QuantWeight):
    format = "gguf"

    def __init__(self, key: str, parts: list[tuple], in_features: int, out_features: int, dtype: torch.dtype,
                 device, bias: torch.Tensor | None = None, **kw):
        """parts: (source, tensor name, rows) in output order; their rows add up to out_features."""
        if sum(r for _, _, r in parts) != out_features:
            raise ValueError(f"{key}: GGUF parts hold {sum(r for _, _, r in parts)} rows, expected {out_features}")
        self.parts = list(parts)
        self.types = [src.ggml_type(name) for src, name, _ in parts]
        for t, (src, name, rows) in zip(self.types, parts):
            if t not in BLOCK_GEOMETRY:
                raise ValueError(f"{key}: tensor '{name}' is GGUF {t}, expected one of {', '.join(PACKED_TYPES)}")
            block, block_bytes = BLOCK_GEOMETRY[t]
            if in_features % block:
                raise ValueError(f"{key}: {in_features} input features is not a multiple of the GGUF {t} block "
                                 f"({block})")
            want = rows * (in_features // block) * block_bytes
            if src.nbytes(name) != want:
                raise ValueError(f"{key}: tensor '{name}' ({t}, {rows} x {in_features}) holds {src.nbytes(name)} "
                                 f"bytes, expected {want}")
        kw.setdefault("precision", torch.float32)
        super().__init__(key, in_features, out_features, dtype, device, bias, **kw)

    @classmethod
    def concat(cls, key: str, weights: list["GgufWeight"], dtype, device) -> "GgufWeight | None":
        """One weight over the rows of several (fused q/k/v, gate/up), or None when they cannot share a kernel:
        parts of one type, or of several when one is of 256-weight blocks (the CPU runs those dense, and the triton
        kernel runs each type's rows on their own: `runs_by_type`). Mixes of 32-weight block types (Q4_0, Q4_1, Q5_0,
        Q5_1, Q8_0, IQ4_NL) stay apart, each with its own kernel on every backend."""
        types = {t for w in weights for t in w.types}
        if len({w.in_features for w in weights}) != 1 or (
                len(types) != 1 and all(BLOCK_GEOMETRY[t][0] == BLOCK for t in types)):
            return None
        biases = [w.bias for w in weights]
        bias = None
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(w.out_features, dtype=dtype, device=device)
                              for b, w in zip(biases, weights)])
        return cls(key, [p for w in weights for p in w.parts], weights[0].in_features,
                   sum(w.out_features for w in weights), dtype, device, bias, fast_path=False)

    def runs_by_type(self) -> list["GgufWeight"]:
        """The weight as consecutive row ranges of one GGUF type each (itself when it has one type)."""
        if len(set(self.types)) == 1:
            return [self]
        runs, row = [], 0
        for part, t in zip(self.parts, self.types):
            if runs and runs[-1][0] == t:
                runs[-1][1].append(part)
            else:
                runs.append((t, [part]))
        out = []
        for i, (_, parts) in enumerate(runs):
            rows = sum(r for _, _, r in parts)
            bias = None if self.bias is None else self.bias[row:row + rows]
            out.append(GgufWeight(f"{self.key}[{i}]", parts, self.in_features, rows, self.dtype, self.device, bias,
                                  fast_path=False))
            row += rows
        return out

    def _reference(self, precision: torch.dtype) -> torch.Tensor:
        return torch.cat([src.get_tensor(name, device=self.device, dtype=precision) for src, name, _ in self.parts])

    @property
    def dense_on_cpu(self) -> bool:
        """True when this weight has no exact int4 mapping for the CPU (Q5_0, Q5_1, IQ4_NL, the 256-weight
        super-block types): the CPU backend runs it by its GEMV when it has one for the type, else dequantised."""
        return any(t not in SUPPORTED_TYPES for t in self.types)

    def raw_blocks(self) -> tuple[str, torch.Tensor]:
        """(GGUF type, uint8 (out_features, bytes per row)): the file's blocks of every part, rows concatenated in
        output order (HF row order), on the CPU. Raises when the parts differ in type or a part's bytes do not
        match its shape."""
        if len(set(self.types)) != 1:
            raise ValueError(f"{self.key}: parts of different GGUF types ({', '.join(self.types)}) have no common "
                             f"block layout")
        qtype = self.types[0]
        block, block_bytes = BLOCK_GEOMETRY[qtype]
        row_bytes = self.in_features // block * block_bytes
        rows = []
        for src, name, n in self.parts:
            _, data, shape = src.raw(name)
            if tuple(data.shape) != (n, row_bytes):
                raise ValueError(f"{self.key}: tensor '{name}' ({qtype}, shape {list(shape)}) holds "
                                 f"{list(data.shape)} bytes, expected [{n}, {row_bytes}]")
            rows.append(torch.from_numpy(data.copy()))
        return qtype, torch.cat(rows) if len(rows) > 1 else rows[0]

    def device_blocks(self) -> tuple[str, torch.Tensor]:
        """raw_blocks() as the Triton kernels read them: the lattice types re-encoded as 4-bit table blocks
        (exllamav2/ops/cpu/kernels.py: lut_blocks), every other type the file's own bytes."""
        qtype, blocks = self.raw_blocks()
        if qtype in LATTICE_TYPES:
            from ..ops.cpu import kernels
            blocks = kernels.lut_blocks(qtype, blocks)
        return qtype, blocks

    def _build_packed(self) -> Int4PackedMatrix | None:
        if not int4pack_available() or self.dense_on_cpu:
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
