"""The `triton` backend's kernel for GGUF quant blocks (exllamav2/quant/gguf.py::GgufWeight): Q4_0, Q4_1, Q5_0,
Q5_1, Q8_0, IQ4_NL, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and IQ4_XS, uploaded as the file's bytes, one row of blocks per
output feature (a fused q/k/v or gate/up weight is its parts' rows one after the other; parts of different types run
as one kernel per type, GgufRunsKernel), and read as they are by gguf_kernels.py. The resident weight is exactly the
file's bytes. The two paths (fused few-row matmul, dequantise-then-matmul for many rows) and the split-K reduction
are linear.py's PackedKernel."""

from __future__ import annotations

import torch

from . import declines_device, interpreting, kernels
from .linear import PackedKernel, split_count, triton_cdiv

_FLOAT_TYPES = (torch.float16, torch.bfloat16)


class GgufKernel(PackedKernel):
    """One GGUF type's blocks (uint8 (out_features, bytes per row)) on the device; K split from the shape alone."""

    def __init__(self, q, device: torch.device, dtype: torch.dtype):
        super().__init__(q, device, dtype)
        self.k = kernels("gguf_kernels", self.interpret)
        qtype, blocks = q.device_blocks()
        self.qtype, self.qcode = qtype, self.k.QTYPE_CODES[qtype]
        self.blocks = self.own(blocks.to(device))
        self.row_bytes = self.blocks.shape[1]
        self.blocks16 = self.blocks.view(torch.float16)  # the same bytes: every block's fp16 fields are 2-aligned
        tile = self.k.MATMUL_TILE
        self.block_m, self.block_n, self.block_k = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
        k_tiles = triton_cdiv(self.in_features, self.block_k)
        splits = split_count(triton_cdiv(self.out_features, self.block_n), k_tiles, max(1, self.in_features // 256))
        self.tiles_per_split = triton_cdiv(k_tiles, splits)
        self.splits = triton_cdiv(k_tiles, self.tiles_per_split)

    def resident_tensors(self) -> list[torch.Tensor]:
        # GgufWeight itself holds nothing (it reads the file's memory map); the blocks are this kernel's own
        return [*([self.q.bias] if self.q.bias is not None else []), *self._own]

    def _launch_partials(self, x: torch.Tensor, part: torch.Tensor) -> None:
        m = x.shape[0]
        grid = (triton_cdiv(m, self.block_m), triton_cdiv(self.out_features, self.block_n), self.splits)
        self.k.gguf_matmul_partials[grid](
            x, self.blocks, self.blocks16, part, m, self.out_features, self.in_features, self.row_bytes,
            x.stride(0), self.tiles_per_split, QTYPE=self.qcode, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            BLOCK_K=self.block_k, DOT_F32=self.interpret and x.dtype == torch.bfloat16)

    def _launch_dequant(self, w: torch.Tensor) -> None:
        tile = self.k.DEQUANT_TILE
        grid = (triton_cdiv(self.in_features, tile["BLOCK_K"]), triton_cdiv(self.out_features, tile["BLOCK_N"]))
        self.k.gguf_dequant[grid](self.blocks, self.blocks16, w, self.out_features, self.in_features,
                                  self.row_bytes, w.stride(0), QTYPE=self.qcode, **tile)


class GgufRunsKernel:
    """Fused parts of different GGUF types (a Q4_K_M file's q/k in Q4_K beside v in Q6_K): one GgufKernel per run
    of rows of one type, their outputs side by side."""
    backend = "triton"

    def __init__(self, q, device: torch.device, dtype: torch.dtype):
        self.q = q
        self.runs = [GgufKernel(r, device, dtype) for r in q.runs_by_type()]
        self.in_features, self.out_features = q.in_features, q.out_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([k(x) for k in self.runs], dim=1)

    def nbytes(self) -> int:
        return sum(k.nbytes() for k in self.runs)

    def resident_tensors(self) -> list[torch.Tensor]:
        return [t for k in self.runs for t in k.resident_tensors()]


def prepare(quant, bias: torch.Tensor | None, device: torch.device, dtype: torch.dtype):
    """A GgufKernel for `quant` (a GgufWeight; its own bias is the one applied, as the other backends do), or the
    reason this backend declines it."""
    why = declines_device(device)
    if why is not None:
        return why
    if dtype not in _FLOAT_TYPES:
        return f"activations in {str(dtype).removeprefix('torch.')}; the Triton kernels take float16 or bfloat16"
    if not hasattr(quant, "raw_blocks"):
        return f"{getattr(quant, 'key', 'weight')}: not GGUF blocks"
    device = torch.device(device)
    codes = kernels("gguf_kernels", device.type == "cpu" and interpreting()).QTYPE_CODES
    missing = sorted(set(quant.types) - set(codes))
    if missing:
        return f"{quant.key}: no Triton kernel for GGUF {', '.join(missing)}"
    if len(set(quant.types)) != 1:
        return GgufRunsKernel(quant, device, dtype)
    return GgufKernel(quant, device, dtype)
