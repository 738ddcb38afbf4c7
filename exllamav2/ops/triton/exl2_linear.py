"""The `triton` backend's kernel for an EXL2 weight (exllamav2/quant/weight.py::Exl2Weight): the file's q_weight,
q_scale and q_scale_max as loaded, q_perm (int32, the size of the file's q_invperm), and a table of 20 bytes per
group built here (exl2_kernels.py says how the kernels read them)."""

from __future__ import annotations

import torch

from . import kernels
from .linear import PackedKernel, split_count, triton_cdiv


def group_table(q) -> tuple[torch.Tensor, torch.Tensor]:
    """(groups, 4) int32 [first quantized row, rows, first stream bit, bits] and (groups,) fp32 fp16(q_scale_max/256)
    (the same rounding as exl2_scales)."""
    lay = q.t.layout
    first = torch.cumsum(lay.rows, 0) - lay.rows
    table = torch.stack([first, lay.rows, lay.qrow_start * 32, lay.bits], 1).to(torch.int32)
    smax = (q.t.q_scale_max.to(torch.float16) * (1 / 256)).to(torch.float32)
    return table, smax


class Exl2Kernel(PackedKernel):
    def __init__(self, q, device: torch.device, dtype: torch.dtype):
        super().__init__(q, device, dtype)
        t = q.t
        self.k = kernels("exl2_kernels", self.interpret)
        self.qw = t.q_weight if t.q_weight.is_contiguous() else self.own(t.q_weight.contiguous())
        self.qs = t.q_scale if t.q_scale.is_contiguous() else self.own(t.q_scale.contiguous())
        perm = t.q_perm
        self.perm = perm if perm.dtype == torch.int32 else self.own(perm.to(torch.int32))
        table, smax = group_table(q)
        self.table = self.own(table.to(device))
        self.smax = self.own(smax.to(device))
        self.num_groups = int(table.shape[0])
        tile = self.k.MATMUL_TILE
        self.block_m, self.block_n = tile["BLOCK_M"], tile["BLOCK_N"]
        inner = q.t.layout.rows[:-1].tolist()
        self.block_k = next((b for b in self.k.BLOCK_K_CHOICES if all(r % b == 0 for r in inner)),
                            self.k.BLOCK_K_CHOICES[-1])
        n_tiles = triton_cdiv(self.out_features, self.block_n)
        splits = split_count(n_tiles, self.num_groups, max(1, self.in_features // 256))
        self.groups_per_split = triton_cdiv(self.num_groups, splits)
        self.splits = triton_cdiv(self.num_groups, self.groups_per_split)

    def resident_tensors(self) -> list[torch.Tensor]:
        t = self.q.t
        return [t.q_weight, t.q_scale, t.q_scale_max, t.q_perm, *([self.q.bias] if self.q.bias is not None else []),
                *self._own]

    def _launch_partials(self, x: torch.Tensor, part: torch.Tensor) -> None:
        m = x.shape[0]
        grid = (triton_cdiv(m, self.block_m), triton_cdiv(self.out_features, self.block_n), self.splits)
        self.k.exl2_matmul[grid](
            x, self.perm, self.qw, self.qs, self.table, self.smax, part, m, self.out_features, x.stride(0),
            self.qw.stride(0), self.qs.stride(0), 0, self.num_groups, self.groups_per_split,
            BLOCK_M=self.block_m, BLOCK_N=self.block_n, BLOCK_K=self.block_k,
            DOT_F32=self.interpret and x.dtype == torch.bfloat16, DEQUANT=False, **self.k.MATMUL_LAUNCH)

    def _launch_dequant(self, w: torch.Tensor) -> None:
        tile = self.k.DEQUANT_TILE
        grid = (1, triton_cdiv(self.out_features, tile["BLOCK_N"]), self.num_groups)
        self.k.exl2_matmul[grid](
            w, self.perm, self.qw, self.qs, self.table, self.smax, w, 0, self.out_features, 0, self.qw.stride(0),
            self.qs.stride(0), w.stride(0), self.num_groups, 1, BLOCK_K=self.block_k, DOT_F32=False, DEQUANT=True,
            **tile, **self.k.DEQUANT_LAUNCH)

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, self.perm)

    def _ungather(self, w: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(w).index_copy_(0, self.perm.to(torch.int64), w)
