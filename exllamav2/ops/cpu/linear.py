"""Linear kernels of the `cpu` backend: the C++ GEMV kernels built at first use (gemv_linear.py: GGUF Q4_0/Q4_1/Q5_0/
Q5_1/Q8_0 and K-quant blocks, EXL2 and GPTQ weights repacked as such blocks (quant_repack.py), and dense bf16) when
they are available, else torch's int4 kernel (quant/kernels/cpu_int4.py) and oneDNN."""

from __future__ import annotations

import torch

from .. import dispatch
from ..torch_ref import linear as torch_linear
from . import build, kernels
from .gemv_linear import DenseGemvKernel, GgufGemvKernel, SegmentedGemvKernel
from .gguf_pack import pack_gguf_weight
from .quant_repack import repack_quant_weight

# Activation dtypes for which EXL2/GPTQ weights run through the C++ GEMV (bench/bench_cpu_quant_gemv.py measured it
# faster than torch's int4 kernel (bf16 only) and than the `torch` backend's dequantised F.linear).
QUANT_GEMV_DTYPES = (torch.bfloat16, torch.float32, torch.float16)


class Int4Kernel:
    backend = "cpu"

    def __init__(self, packed, bias: torch.Tensor | None):
        self.packed = packed
        self.bias = None if bias is None else bias.to(torch.bfloat16)
        self.out_features, self.in_features = packed.out_features, packed.in_features

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed.matmul(x)
        return y if self.bias is None else y + self.bias

    def nbytes(self) -> int:
        return self.packed.nbytes()


class DenseKernel(torch_linear.DenseKernel):
    """F.linear on the module's own weight (oneDNN underneath); the weight and activations share a dtype.

    Taken where the C++ kernels are not built (their dense GEMV is batch invariant: gemv_linear.py). With batch
    invariance asked for explicitly (ops.set_batch_invariant(True)) each row runs alone, from a fresh copy: torch's
    GEMM picks its blocking by the row count, and a BLAS may take other code paths by the data's alignment, so a
    row computed among others can round differently from the same row alone; one call per row makes prefill slow.
    A traced (compiled) step keeps the single call."""
    backend = "cpu"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1 and dispatch.batch_invariant() and not torch.compiler.is_compiling():
            one = super().__call__
            return torch.cat([one(x[i:i + 1].clone()) for i in range(x.shape[0])])
        return super().__call__(x)


class DequantizedKernel:
    """A quantized weight dequantised once at prepare (a GGUF weight the C++ GEMV does not run: fp32 activations, or
    no kernels and a type or dtype torch's int4 kernel cannot take; the same dense matrix a dense load of the file
    gives), run by the kernel this backend prepares for that matrix.
    The kernel owns that copy."""
    backend = "cpu"

    def __init__(self, quant, device: torch.device, dtype: torch.dtype):
        self.weight = quant.dequantize(dtype).contiguous()
        bias = None if quant.bias is None else quant.bias.to(dtype)
        self.dense = prepare(self.weight, bias, None, device, dtype)
        self.out_features, self.in_features = self.weight.shape

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)

    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size() + self.dense.nbytes()


def prepare(dense: torch.Tensor | None, bias: torch.Tensor | None, quant, device: torch.device,
            dtype: torch.dtype):
    """A kernel, or a reason string when this backend declines."""
    if device.type != "cpu":
        return f"weights on {device}, this backend runs on the CPU"
    if quant is not None:
        if getattr(quant, "format", None) == "gguf" and dtype != torch.float32:
            # every GGUF type the kernels know, each run of rows of one type packed on its own
            gemv = _gguf_gemv_kernel(quant, dtype)
            if gemv is not None:
                return gemv
        if getattr(quant, "dense_on_cpu", False) or (getattr(quant, "format", None) == "gguf"
                                                     and dtype != torch.bfloat16):
            # fp32 activations keep the exact dequantised matmul: the GEMV's int8 activations (~1e-5) moved
            # SmolLM2's fp32 logits past the HF oracle's 1e-4 (tests/test_real_models.py); also without kernels.
            # Every GGUF type, Q4_0/Q4_1/Q8_0 included: torch's int4 kernel below takes bf16 only, so an fp32 (or,
            # without the kernels, fp16) model of those types pinned to this backend had no linear at all
            return DequantizedKernel(quant, device, dtype)
        gemv = _quant_gemv_kernel(quant, dtype)
        if gemv is not None:
            return gemv
        if dtype != torch.bfloat16:
            return f"the int4 kernel takes bfloat16 activations, got {str(dtype).removeprefix('torch.')}"
        packed = quant.packed_matrix()
        if packed is None:
            return f"{quant.describe()} cannot be packed for the int4 kernel (group sizes do not align)"
        return Int4Kernel(packed, quant.bias)
    if dense.dtype != dtype:
        return f"weight in {dense.dtype}, activations in {dtype}"
    if dtype in (torch.bfloat16, torch.float16, torch.float32) and dense.is_contiguous() and _kernels_ready():
        return DenseGemvKernel(dense, bias)
    return DenseKernel(dense, bias)


def _kernels_ready() -> bool:
    if torch.compiler.is_compiling():
        # a kernel prepared inside the compiled decode step (after a backend switch, say): a lookup only, since
        # a build check (os.uname) or an op call here would make dynamo give up the step and run it eagerly
        return kernels.loaded_usable()
    return build.disabled_reason() is None and kernels.ready()


def _gguf_gemv_kernel(quant, dtype: torch.dtype) -> GgufGemvKernel | None:
    """The C++ GEMV over a GGUF weight's blocks (packed once per weight), or None."""
    if getattr(quant, "format", None) != "gguf" or not _kernels_ready():
        return None
    packed = _cpu_gemv_packed(quant, pack_gguf_weight)
    return None if packed is None else GgufGemvKernel(packed, quant.bias, dtype, quant)


def _quant_gemv_kernel(quant, dtype: torch.dtype) -> SegmentedGemvKernel | None:
    """The C++ GEMV over an EXL2 or GPTQ weight repacked as GGUF blocks (once per weight), or None."""
    if getattr(quant, "format", None) not in ("exl2", "gptq") or dtype not in QUANT_GEMV_DTYPES \
            or not _kernels_ready():
        return None
    packed = _cpu_gemv_packed(quant, repack_quant_weight)
    return None if packed is None else SegmentedGemvKernel(packed, quant.bias, dtype, quant)


def _cpu_gemv_packed(quant, repack):
    """The weight's repack for the GEMV, built once and kept on the weight (None: it cannot be repacked; counted by
    QuantWeight.footprint_bytes)."""
    packed = getattr(quant, "_cpu_gemv_packed", False)
    if packed is False:
        packed = quant._cpu_gemv_packed = repack(quant)
    return packed
