"""QuantWeight: one quantized linear weight (EXL2 or GPTQ) with a reference dequantiser and fast matmul paths.

forward(x) picks, per call:
- CPU, bf16 activations, and a packed int4 repack exists: torch's int4 kernel, except that with dense_prefill=True
  calls of more than dense_threshold rows use dense bf16 GEMM on a kept dequantised copy (about 1.5x faster at
  M=512 in bench/bench_quant_matmul.py, for +2 bytes per weight);
- otherwise (other dtypes, CUDA, no repack): a dense matmul on the dequantised matrix, kept after the first call,
  because the reference dequantiser costs far more than the matmul. The int4 kernel falls onto a 10-30x slower path
  for non-bf16 activations, so it is never used for them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .exl2 import Exl2Tensors, exl2_bits_per_weight, exl2_codes, exl2_dequantize, exl2_scales
from .gptq import GptqTensors, gptq_bits_per_weight, gptq_dequantize, gptq_zero_points, unpack_nibble_rows
from .kernels.cpu_int4 import Int4PackedMatrix, build_int4pack

DENSE_THRESHOLD_ROWS = 32


def _tensor_bytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


class QuantWeight:
    format: str = ""

    def __init__(self, key: str, in_features: int, out_features: int, dtype: torch.dtype, device: str | torch.device,
                 bias: torch.Tensor | None, precision: torch.dtype = torch.float16, fast_path: bool = True,
                 dense_prefill: bool = False, dense_threshold: int = DENSE_THRESHOLD_ROWS):
        self.key = key
        self.in_features = in_features
        self.out_features = out_features
        self.dtype = dtype
        self.device = torch.device(device)
        self.precision = precision  # dequantisation precision: fp16 as the original (default), or fp32
        self.bias = None if bias is None else bias.to(self.device, dtype)
        self.dense_prefill = dense_prefill
        self.dense_threshold = dense_threshold
        self._dense: torch.Tensor | None = None
        self.packed: Int4PackedMatrix | None = None
        self._packed_built = False
        if fast_path:
            self.packed_matrix()

    # -- format-specific
    def _reference(self, precision: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def _build_packed(self) -> Int4PackedMatrix | None:
        raise NotImplementedError

    def _stored_bytes(self) -> int:
        raise NotImplementedError

    def bits_per_weight(self) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    # -- common
    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """(out, in) matrix, computed at self.precision and cast to dtype (default: the layer dtype)."""
        return self._reference(self.precision).to(dtype or self.dtype)

    def numel(self) -> int:
        return self.in_features * self.out_features

    def footprint_bytes(self) -> int:
        """Bytes held: the stored tensors, the packed kernel copy and any kept dense copy (see release_dense)."""
        extra = self.packed.nbytes() if self.packed is not None else 0
        cpu_gemv = getattr(self, "_cpu_gemv_packed", None)  # the cpu backend's repack (ops/cpu/linear.py), if built
        extra += cpu_gemv.nbytes() if cpu_gemv else 0
        return self._stored_bytes() + extra + _tensor_bytes(self._dense, self.bias)

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """The dequantised (out, in) matrix in dtype, kept for later calls (one dtype at a time)."""
        if self._dense is None or self._dense.dtype != dtype:
            self._dense = self.dequantize(dtype)
        return self._dense

    def release_dense(self) -> None:
        self._dense = None

    def packed_matrix(self) -> Int4PackedMatrix | None:
        """The repack for the CPU int4 kernel, built on first use (None off the CPU or when the groups cannot be
        aligned to the kernel's)."""
        if not self._packed_built:
            self.packed = self._build_packed() if self.device.type == "cpu" else None
            self._packed_built = True
        return self.packed

    def uses_packed(self, x: torch.Tensor) -> bool:
        if self.packed is None or x.device.type != "cpu" or x.dtype != torch.bfloat16:
            return False
        rows = x.numel() // max(x.shape[-1], 1)
        return not (self.dense_prefill and rows > self.dense_threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in) -> x @ W.T + bias, in x's dtype."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{self.key}: input has {x.shape[-1]} features, the layer expects {self.in_features}")
        if self.uses_packed(x):
            y = self.packed.matmul(x.reshape(-1, self.in_features)).reshape(*x.shape[:-1], self.out_features)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dense(x.dtype), bias)

    __call__ = forward


class Exl2Weight(QuantWeight):
    format = "exl2"

    def __init__(self, key: str, t: Exl2Tensors, dtype: torch.dtype, device: str | torch.device, **kw):
        dev = torch.device(device)
        # q_perm as int32 (the file's width) and no q_invperm: the resident tensors stay the file's size
        self.t = Exl2Tensors(t.q_weight.to(dev), t.q_perm.to(dev, torch.int32), None, t.q_scale.to(dev),
                             t.q_scale_max.to(dev), t.layout, t.out_features, t.bias)
        super().__init__(key, t.in_features, t.out_features, dtype, dev, t.bias, **kw)

    def _reference(self, precision: torch.dtype) -> torch.Tensor:
        return exl2_dequantize(self.t, self.key, precision)

    def _build_packed(self) -> Int4PackedMatrix | None:
        lay = self.t.layout
        zeros = (1 << lay.bits.unsqueeze(1)).expand(-1, self.t.out_pad) // 2
        return build_int4pack(exl2_codes(self.t), lay.rows.tolist(), lay.bits.tolist(),
                              exl2_scales(self.t, torch.float16).float(), zeros, self.t.q_perm, self.out_features)

    def _stored_bytes(self) -> int:
        t = self.t
        return _tensor_bytes(t.q_weight, t.q_perm, t.q_scale, t.q_scale_max) + t.layout.num_groups * 4

    def bits_per_weight(self) -> float:
        return exl2_bits_per_weight(self.t)

    def describe(self) -> str:
        lay = self.t.layout
        shares = {}
        for b, r in zip(lay.bits.tolist(), lay.rows.tolist()):
            shares[b] = shares.get(b, 0) + r
        mix = ", ".join(f"{b}:{round(100 * r / lay.in_features)}%" for b, r in shares.items())
        sizes = sorted(set(lay.rows[:-1].tolist() or lay.rows.tolist()))
        gs = "g" + "/".join(str(s) for s in sizes)
        return f"EXL2 {self.bits_per_weight():.2f} bpw [{mix}] {gs}"


class GptqWeight(QuantWeight):
    format = "gptq"

    def __init__(self, key: str, t: GptqTensors, dtype: torch.dtype, device: str | torch.device, **kw):
        dev = torch.device(device)
        # scales as fp16 (the reference casts them so anyway), groups as int32 (the file's g_idx width)
        self.t = GptqTensors(t.qweight.to(dev), t.qzeros.to(dev), t.scales.to(dev, torch.float16),
                             t.row_group.to(dev, torch.int32), t.act_order, t.group_size, t.offset_qzeros,
                             t.out_features, t.bias, t.bits)
        super().__init__(key, t.in_features, t.out_features, dtype, dev, t.bias, **kw)

    def _reference(self, precision: torch.dtype) -> torch.Tensor:
        return gptq_dequantize(self.t, self.key, precision)

    def _build_packed(self) -> Int4PackedMatrix | None:
        t = self.t
        # make_sequential: a stable sort of rows by group makes every group contiguous; x is gathered by that order.
        order = torch.argsort(t.row_group, stable=True)
        counts = torch.bincount(t.row_group, minlength=t.num_groups)
        used = counts > 0
        codes = unpack_nibble_rows(t.qweight, t.bits).index_select(0, order)
        scales = t.scales.to(torch.float16).float()[used]
        zeros = gptq_zero_points(t)[used]
        rows = counts[used].tolist()
        return build_int4pack(codes, rows, [t.bits] * len(rows), scales, zeros, order, self.out_features)

    def _stored_bytes(self) -> int:
        t = self.t
        return _tensor_bytes(t.qweight, t.qzeros, t.scales) + t.in_features * 4

    def bits_per_weight(self) -> float:
        return gptq_bits_per_weight(self.t)

    def describe(self) -> str:
        t = self.t
        g = "no groups" if t.num_groups == 1 else f"g{t.group_size}"
        extras = (" act-order" if t.act_order else "") + (" v2" if t.offset_qzeros else "")
        return f"GPTQ {t.bits}-bit {g}{extras}"
