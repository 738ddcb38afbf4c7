"""Linear kernels of the `torch` backend: F.linear on the dense weight, or on the quantized weight dequantised by
its reference dequantiser (kept after the first call, one dtype at a time: the reference dequantisers are slow)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class DenseKernel:
    backend = "torch"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.to(self.weight.dtype), self.weight, self.bias)

    def nbytes(self) -> int:
        return 0  # the module's own weight, no copy


class DequantKernel:
    backend = "torch"

    def __init__(self, q):
        self.q = q
        self.out_features, self.in_features = q.out_features, q.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.q.bias is None else self.q.bias.to(x.dtype)
        return F.linear(x, self.q.dense(x.dtype), bias)

    def nbytes(self) -> int:
        d = self.q._dense
        return 0 if d is None else d.numel() * d.element_size()


def prepare(dense: torch.Tensor | None, bias: torch.Tensor | None, quant, device: torch.device,
            dtype: torch.dtype):
    if quant is not None:
        return DequantKernel(quant)
    return DenseKernel(dense, bias)
