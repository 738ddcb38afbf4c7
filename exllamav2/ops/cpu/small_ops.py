"""The `cpu` backend's small ops: RMSNorm, RoPE, RoPE plus the KV-cache write, and the gated MLP activation
act(gate) * up (AVX-512 only) through the C++ kernels (csrc/small_ops.cpp) in eager mode. Under torch.compile the reference code is traced instead, so that
inductor fuses them with their neighbours; where the kernels are not built (no compiler), the reference runs, so
pinning the `cpu` backend still covers a model."""

from __future__ import annotations

import torch

from ..torch_ref import activation as _act
from ..torch_ref import norm as _norm
from ..torch_ref import rope as _rope
from ..torch_ref import rope_kv as _rope_kv
from . import build, kernels
from .gemv_linear import needs_grad

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_ready: list[bool] = []


def _kernels_ready() -> bool:
    if not _ready:
        _ready.append(build.disabled_reason() is None and kernels.ready())
    return _ready[0]


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    if (torch.compiler.is_compiling() or x.dtype not in _FLOATS or w.dtype not in _FLOATS or w.dim() != 1
            or out_dtype not in _FLOATS or needs_grad(x, w) or not _kernels_ready()):
        return _norm.rms_norm(x, w, eps, out_dtype)
    return torch.ops.exllamav2_cpu.rms_norm(x, w, eps, out_dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """One C++ pass instead of the reference's six ops (bit-identical, see csrc/small_ops.cpp)."""
    if (torch.compiler.is_compiling() or x.dtype not in _FLOATS or cos.dtype != x.dtype or sin.dtype != x.dtype
            or x.dim() != 4 or cos.dim() != 4 or x.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1
            or needs_grad(x, cos, sin) or not _kernels_ready()):
        return _rope.rope(x, cos, sin, interleaved)
    return torch.ops.exllamav2_cpu.rope(x, cos, sin, interleaved)


def rope_kv_write(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor, q_heads: int) -> torch.Tensor:
    """RoPE on q|k and the k/v cache write in one C++ pass instead of rope + slices + two index_copy_ (bit-identical:
    the same per-head arithmetic as `rope`). Returns q contiguous where the reference returns a view of the same
    values."""
    t = qk.dtype
    if (torch.compiler.is_compiling() or t not in _FLOATS or cos.dtype != t or sin.dtype != t or v.dtype != t
            or k_cache.dtype != t or v_cache.dtype != t or qk.dim() != 4 or cos.dim() != 4 or qk.stride(-1) != 1
            or v.stride(-1) != 1 or cos.stride(-1) != 1 or sin.stride(-1) != 1 or k_cache.stride(-1) != 1
            or v_cache.stride(-1) != 1 or index.dtype != torch.int64 or needs_grad(qk, v, cos, sin)
            or not _kernels_ready()):
        return _rope_kv.rope_kv_write(qk, v, cos, sin, interleaved, k_cache, v_cache, index, q_heads)
    return torch.ops.exllamav2_cpu.rope_kv_write(qk, v, cos, sin, interleaved, k_cache, v_cache, index, q_heads)



_GATED = {"silu": 0, "swish": 0, "gelu_tanh": 1, "gelu_pytorch_tanh": 1, "gelu_new": 1, "gelu_fast": 1}


def gated_activation(gate: torch.Tensor, up: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up in one C++ pass (silu and the tanh GELU; the reference's roundings, exp within 2 ulp of
    fp32, see csrc/small_ops.cpp); other activations, or no AVX-512, run the reference. Few checks here: this runs
    once per MLP per step, and the op checks its arguments itself."""
    code = _GATED.get(act)
    if (code is None or gate.dtype not in _FLOATS or torch.compiler.is_compiling() or not kernels.active_avx512()
            or gate.shape != up.shape or gate.stride(-1) != 1 or up.stride(-1) != 1 or needs_grad(gate, up)):
        return _act.gated_activation(gate, up, act)
    return torch.ops.exllamav2_cpu.gated_activation(gate, up, code)
