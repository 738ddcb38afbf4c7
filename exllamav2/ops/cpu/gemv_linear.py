"""Linear kernels of the `cpu` backend over the C++ kernels (csrc/gemv.cpp, csrc/bf16_gemv.cpp, kernels.py).

- GGUF blocks, every type of GGUF_KINDS (kernels.py: the legacy, K-quant, IQ4 and lattice types; gguf_pack.py): the
  int8-dot kernel for every number of rows, in
  chunks of 8 sharing each weight group while it is in cache, so a row's result never depends on the rows beside
  it (tests/test_batch_invariance.py holds the dynamic generator to that, prefill included).
- EXL2 and GPTQ weights repacked as Q4_0/Q4_1/Q8_0 blocks, one segment per block kind (quant_repack.py): the same
  kernel per segment on the input columns it reads, the segments summed in fp32.
- Dense bf16 (the module's own weight, no copy): the AVX512-BF16 GEMV for calls of up to GEMV_MAX_ROWS rows
  (decode); above it the GEMM is compute-bound and oneDNN's blocking (F.linear) wins.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import dispatch
from . import kernels
from .gguf_pack import GgufPacked, GgufRowRuns
from .quant_repack import SegmentedPacked

# Rows up to which the dense GEMV runs when batch invariance is switched off; above it F.linear (oneDNN).
GEMV_MAX_ROWS = 8
# Batch invariance (exllamav2.ops.set_batch_invariant; on by default): the dense GEMV for every number of rows. The
# GEMV and oneDNN round differently, so otherwise a request decoded alone (1 row) and among 16 others (16 rows) can
# get other tokens; the GEMV computes each row alone, at some cost to prefill and to batches above GEMV_MAX_ROWS
# (bench/bench_determinism.py).


def needs_grad(*tensors: torch.Tensor) -> bool:
    """The C++ kernels have no backward: a call that autograd must differentiate runs torch's ops instead (an
    intervention trained by gradient, the converter's sensitivity pass), never a silently missing gradient."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class GgufGemvKernel:
    """GGUF blocks (repacked, gguf_pack.py; runs of rows of several types side by side) for activations of any
    float dtype."""
    backend = "cpu"

    def __init__(self, packed: GgufPacked | GgufRowRuns, bias: torch.Tensor | None, dtype: torch.dtype, quant=None):
        self.packed = packed
        self.quant = quant  # the weight, dequantised for calls that need gradients
        self.bias = None if bias is None else bias.to(dtype).contiguous()
        self.out_features, self.in_features = packed.out_features, packed.in_features
        self.single = None if isinstance(packed, GgufRowRuns) else (packed.qweight, packed.kind, packed.out_features)
        self.super_scales = None if self.single is None else packed.super_scales
        self.op = torch.ops.exllamav2_cpu.gguf_gemv.default  # kernels.gguf_gemv's op, without its Python frame

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x) and self.quant is not None:
            return F.linear(x, self.quant.dense(x.dtype), self.bias)
        stages = dispatch.cpu_activation_stages()
        if self.single is not None:  # one run: the op called directly (this is every decode step's linear)
            return self.op(x, *self.single, self.bias, self.super_scales, stages)
        ys, row = [], 0
        for run in self.packed.runs:
            bias = None if self.bias is None else self.bias[row:row + run.out_features]
            ys.append(kernels.gguf_gemv(x, run, bias, stages))
            row += run.out_features
        return torch.cat(ys, dim=-1)

    def nbytes(self) -> int:
        return self.packed.nbytes()


class SegmentedGemvKernel:
    """An EXL2 or GPTQ weight as GGUF blocks per kind (quant_repack.py), for activations of any float dtype. One
    segment: the kernel's own output (bias added in fp32, one rounding to x's dtype, as GgufGemvKernel). Several:
    each segment's output in fp32 (x converted first: the kernel reads bf16/fp16 exactly as their fp32 values),
    summed in segment order, the bias added, then one rounding to x's dtype. Row by row, so batch invariant."""
    backend = "cpu"

    def __init__(self, packed: SegmentedPacked, bias: torch.Tensor | None, dtype: torch.dtype, quant):
        self.packed = packed
        self.segments = packed.segments
        self.quant = quant  # the weight, dequantised for calls that need gradients
        self.bias = None if bias is None else bias.to(dtype).contiguous()
        self.bias_f32 = None if bias is None else bias.float().contiguous()
        self.out_features, self.in_features = packed.out_features, packed.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if needs_grad(x):
            return F.linear(x, self.quant.dense(x.dtype), self.bias)
        stages = dispatch.cpu_activation_stages()
        if len(self.segments) == 1:
            s = self.segments[0]
            return kernels.gguf_gemv(s.input(x), s.packed, self.bias, stages)
        xf = x.float()
        y = None
        for s in self.segments:
            ys = kernels.gguf_gemv(s.input(xf), s.packed, None, stages)
            y = ys if y is None else y + ys
        if self.bias_f32 is not None:
            y = y + self.bias_f32
        return y.to(x.dtype)

    def nbytes(self) -> int:
        return self.packed.nbytes()


class DenseGemvKernel:
    """A dense bf16, fp16 or fp32 weight, the module's own tensor (no copy): the GEMV (csrc/bf16_gemv.cpp) for every
    call while batch invariance is on (the default), else for decode and F.linear (oneDNN) above GEMV_MAX_ROWS."""
    backend = "cpu"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape
        self.op = kernels.bf16_gemv if weight.dtype == torch.bfloat16 else kernels.dense_gemv

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (x.shape[0] <= GEMV_MAX_ROWS or dispatch.dense_gemv_every_call()) and not needs_grad(x, self.weight):
            return self.op(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return 0  # the module's own weight
