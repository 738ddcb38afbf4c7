"""The `triton` backend's kernel for a GPTQ weight (exllamav2/quant/weight.py::GptqWeight), 4 or 8 bits: the file's
qweight, qzeros and scales (fp16) and the group of every row (int32, the size of the file's g_idx), read as they
are (gptq_kernels.py says how)."""

from __future__ import annotations

import torch

from . import kernels
from .linear import PackedKernel, split_count, triton_cdiv


class GptqKernel(PackedKernel):
    @classmethod
    def create(cls, q, device: torch.device, dtype: torch.dtype):
        bits = getattr(q.t, "bits", 4)
        if bits not in (4, 8):
            return f"{q.key}: {bits}-bit GPTQ has no Triton kernel (4 and 8 bits do)"
        return cls(q, device, dtype, bits)

    def __init__(self, q, device: torch.device, dtype: torch.dtype, bits: int):
        super().__init__(q, device, dtype)
        t = q.t
        self.bits = bits
        self.zero_plus = 0 if t.offset_qzeros else 1
        self.k = kernels("gptq_kernels", self.interpret)
        self.qw = t.qweight if t.qweight.is_contiguous() else self.own(t.qweight.contiguous())
        self.qz = t.qzeros if t.qzeros.is_contiguous() else self.own(t.qzeros.contiguous())
        sc = t.scales
        self.sc = sc if sc.dtype == torch.float16 and sc.is_contiguous() else self.own(sc.to(torch.float16).contiguous())
        gi = t.row_group
        self.gidx = gi if gi.dtype == torch.int32 and gi.is_contiguous() else self.own(gi.to(torch.int32).contiguous())
        tile = self.k.MATMUL_TILE
        self.block_m, self.block_n, self.block_k = tile["BLOCK_M"], tile["BLOCK_N"], tile["BLOCK_K"]
        # groups in row order, each a whole number of K tiles: one scale row per tile (see gptq_kernels.py)
        gs = t.group_size
        self.group_size = gs
        self.seq_groups = (not t.act_order and gs % self.block_k == 0 and gs % self.k.DEQUANT_TILE["BLOCK_K"] == 0
                           and torch.equal(gi.cpu().long(), torch.arange(self.in_features) // gs))
        k_tiles = triton_cdiv(self.in_features, self.block_k)
        splits = split_count(triton_cdiv(self.out_features, self.block_n), k_tiles, max(1, self.in_features // 256))
        self.tiles_per_split = triton_cdiv(k_tiles, splits)
        self.splits = triton_cdiv(k_tiles, self.tiles_per_split)

    def resident_tensors(self) -> list[torch.Tensor]:
        t = self.q.t
        return [t.qweight, t.qzeros, t.scales, t.row_group, *([self.q.bias] if self.q.bias is not None else []),
                *self._own]

    def _launch_partials(self, x: torch.Tensor, part: torch.Tensor) -> None:
        m = x.shape[0]
        grid = (triton_cdiv(m, self.block_m), triton_cdiv(self.out_features, self.block_n), self.splits)
        self.k.gptq_matmul[grid](
            x, self.qw, self.qz, self.sc, self.gidx, part, m, self.out_features, self.in_features, x.stride(0),
            self.qw.stride(0), self.qz.stride(0), self.sc.stride(0), 0, self.tiles_per_split, self.group_size,
            BITS=self.bits, ZERO_PLUS=self.zero_plus, BLOCK_M=self.block_m, BLOCK_N=self.block_n,
            BLOCK_K=self.block_k, DOT_F32=self.interpret and x.dtype == torch.bfloat16, DEQUANT=False,
            SEQ_GROUPS=self.seq_groups, **self.k.MATMUL_LAUNCH)

    def _launch_dequant(self, w: torch.Tensor) -> None:
        tile = self.k.DEQUANT_TILE
        grid = (1, triton_cdiv(self.out_features, tile["BLOCK_N"]), triton_cdiv(self.in_features, tile["BLOCK_K"]))
        self.k.gptq_matmul[grid](
            w, self.qw, self.qz, self.sc, self.gidx, w, 0, self.out_features, self.in_features, 0,
            self.qw.stride(0), self.qz.stride(0), self.sc.stride(0), w.stride(0), 1, self.group_size,
            BITS=self.bits, ZERO_PLUS=self.zero_plus, DOT_F32=False, DEQUANT=True, SEQ_GROUPS=self.seq_groups,
            **tile, **self.k.DEQUANT_LAUNCH)
