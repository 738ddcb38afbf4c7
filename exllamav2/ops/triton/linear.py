"""Linear kernels of the `triton` backend: packed EXL2 / GPTQ weights (exl2_linear.py, gptq_linear.py), GGUF
blocks (gguf_linear.py, when present) and dense weights (F.linear, cuBLAS on a GPU).

A quantized kernel keeps only the file's packed tensors (and a table of a few bytes per group): no dense copy.
- Up to `DENSE_ROWS` rows (decode, batched decode): one kernel dequantises tiles in registers and multiplies them
  (`*_matmul_partials`), splitting K into a number of parts chosen from the matrix shape alone; a second kernel
  (linear_kernels.splitk_reduce) adds the parts in a fixed order with the bias. A row's result therefore does not
  depend on the other rows of the call.
- Above it (prefill): the matrix is dequantised into one scratch buffer shared by every linear on the device
  (`scratch`), then one dense matmul. Rows then take a different path, so results are batch invariant only among
  calls on the same side of the threshold; EXLLAMAV2_TRITON_DENSE_ROWS=<rows> in the environment (or a kernel's
  `dense_rows`) moves it, and a large value keeps every call on the fused path, as `ops.set_batch_invariant()`
  (serve --deterministic) does.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .. import dispatch
from . import declines_device, interpreting, kernels


def _dense_rows(default: int = 32) -> int:
    raw = os.environ.get("EXLLAMAV2_TRITON_DENSE_ROWS", "")
    if raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"EXLLAMAV2_TRITON_DENSE_ROWS={raw!r}: expected a whole number of rows (0 or more)")
    return value


# Rows above which a call dequantises into the scratch buffer and runs a dense matmul. The original switches at
# 32, ExLlamaV3 at 144; bench/gpu/bench_linears.py measures both paths per shape so this can be set from figures.
DENSE_ROWS = _dense_rows()
# Programs the fused kernel aims for on a GPU (about two per SM on an H100/H200); the K split follows from it and
# from the matrix shape, never from the row count.
TARGET_PROGRAMS = 264
_FLOAT_TYPES = (torch.float16, torch.bfloat16)

_scratch: dict[tuple, torch.Tensor] = {}


def scratch(device: torch.device, dtype: torch.dtype, numel: int) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, one per device and dtype, shared by every quantized linear (the
    many-row path dequantises one matrix at a time into it)."""
    key = (device, dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        _scratch.pop(key, None)
        buf = _scratch[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def scratch_bytes() -> int:
    return sum(b.numel() * b.element_size() for b in _scratch.values())


def split_count(n_tiles: int, k_units: int, max_splits: int) -> int:
    """How many parts K is split into: enough programs to fill the GPU, from the shape alone."""
    return max(1, min(k_units, max_splits, -(-TARGET_PROGRAMS // max(n_tiles, 1))))


class PackedKernel:
    """What the packed kernels (EXL2, GPTQ, GGUF) share: argument checks, the two paths, the split-K reduction. A
    format sets `splits` and implements `_launch_partials`, `_launch_dequant` and `resident_tensors`."""
    backend = "triton"

    def __init__(self, q, device: torch.device, dtype: torch.dtype):
        self.q = q
        self.device, self.dtype = device, dtype
        self.in_features, self.out_features = q.in_features, q.out_features
        self.interpret = interpreting() if device.type == "cpu" else False
        self.dense_rows = DENSE_ROWS
        self.bias = q.bias if q.bias is None or q.bias.dtype == dtype else q.bias.to(dtype)
        self._reduce = kernels("linear_kernels", self.interpret)
        self._own: list[torch.Tensor] = []   # tensors this kernel allocated (nbytes counts them)
        if self.bias is not None and self.bias is not q.bias:
            self._own.append(self.bias)

    def own(self, t: torch.Tensor) -> torch.Tensor:
        self._own.append(t)
        return t

    def nbytes(self) -> int:
        """Bytes this kernel holds beyond the weight's own tensors."""
        return sum(t.numel() * t.element_size() for t in self._own)

    def resident_tensors(self) -> list[torch.Tensor]:
        """Every tensor the kernel reads: the weight's packed tensors and its own."""
        raise NotImplementedError

    def _check(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"{self.q.key}: input of shape {list(x.shape)}, expected (rows, {self.in_features})")
        if x.dtype != self.dtype:
            raise ValueError(f"{self.q.key}: input in {x.dtype}, this kernel was prepared for {self.dtype}")
        if x.device.type != self.device.type:
            raise ValueError(f"{self.q.key}: input on {x.device}, the weight is on {self.device}")
        return x if x.stride(1) == 1 else x.contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = self._check(x)
        m = x.shape[0]
        if m == 0:
            return x.new_empty((0, self.out_features))
        if m > self.dense_rows and not dispatch.batch_invariant():
            return self.dense_matmul(x)
        return self.fused_matmul(x)

    def fused_matmul(self, x: torch.Tensor) -> torch.Tensor:
        m, n = x.shape[0], self.out_features
        splits = self.splits
        part = torch.empty((splits, m, n), dtype=torch.float32, device=x.device)
        self._launch_partials(x, part)
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
        block = self._reduce.REDUCE_BLOCK
        bias = self.bias if self.bias is not None else out
        self._reduce.splitk_reduce[(triton_cdiv(m * n, block),)](part, bias, out, m, n, splits,
                                                                 HAS_BIAS=self.bias is not None, BLOCK=block)
        return out

    def dense_matmul(self, x: torch.Tensor) -> torch.Tensor:
        w = scratch(x.device, x.dtype, self.in_features * self.out_features).view(self.in_features, self.out_features)
        self._launch_dequant(w)
        x = self._gather(x)
        return torch.mm(x, w) if self.bias is None else torch.addmm(self.bias, x, w)

    def dequantize(self) -> torch.Tensor:
        """The (out, in) matrix as the dense path sees it (in input order), for tests and the bench."""
        w = torch.empty((self.in_features, self.out_features), dtype=self.dtype, device=self.device)
        self._launch_dequant(w)
        return self._ungather(w).t()

    # per format
    splits: int = 1

    def _launch_partials(self, x: torch.Tensor, part: torch.Tensor) -> None:
        raise NotImplementedError

    def _launch_dequant(self, w: torch.Tensor) -> None:
        raise NotImplementedError

    def _gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _ungather(self, w: torch.Tensor) -> torch.Tensor:
        return w


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


class DenseKernel:
    """Dense weights: F.linear on the module's own weight (cuBLAS on a GPU)."""
    backend = "triton"

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        self.weight, self.bias = weight, bias
        self.out_features, self.in_features = weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def nbytes(self) -> int:
        return 0


def prepare(dense: torch.Tensor | None, bias: torch.Tensor | None, quant, device: torch.device,
            dtype: torch.dtype):
    """A kernel, or a reason string when this backend declines."""
    why = declines_device(device)
    if why is not None:
        return why
    if dtype not in _FLOAT_TYPES:
        return f"activations in {str(dtype).removeprefix('torch.')}; the Triton kernels take float16 or bfloat16"
    if quant is None:
        if dense.dtype != dtype:
            return f"weight in {dense.dtype}, activations in {dtype}"
        return DenseKernel(dense, bias)
    if quant.device.type != device.type:
        return f"{quant.key}: weight on {quant.device}, kernel asked for {device}"
    fmt = getattr(quant, "format", "")
    if fmt == "exl2":
        from .exl2_linear import Exl2Kernel
        return Exl2Kernel(quant, device, dtype)
    if fmt == "gptq":
        from .gptq_linear import GptqKernel
        return GptqKernel.create(quant, device, dtype)
    if fmt == "gguf":
        import importlib.util
        if importlib.util.find_spec(f"{__package__}.gguf_linear") is None:
            return "no Triton kernels for GGUF blocks yet (exllamav2/ops/triton/gguf_linear.py)"
        return kernels("gguf_linear").prepare(quant, bias, device, dtype)
    return f"no Triton kernel for {quant.describe()}"
