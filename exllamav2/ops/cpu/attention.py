"""The `cpu` backend's attention: the C++ kernel (csrc/attention.cpp) for decode, speculative drafts and prefill,
the reference (torch's SDPA) for head dims it does not take, CPUs without AVX-512 and calls that need gradients.
Registered as `ops.attention`'s cpu implementation in ops/__init__.py.

Why: torch's CPU flash-attention kernel spends ~80 us per call setting up for a single query row (SmolLM2 at
batch 1: 30 calls, 2.4 ms of a ~10 ms decode step); the kernel reads each key and value row once for all the
query heads that share it and takes a few microseconds. In a prefill it computes each row as it would alone, so a
row's result does not depend on how its prompt was cut into chunks (SDPA's does), and it is faster than SDPA
(bench/bench_cpu_attention.py --prefill)."""

from __future__ import annotations

import torch

from ..torch_ref import attention as _ref
from . import build, kernels
from .gemv_linear import needs_grad

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


def _kernels_ready() -> bool:
    # traced by dynamo (the compiled decode step), only a lookup: the kernels are loaded by then (the linears'
    # prepare loads them), and a build or a torch.ops call here would break the graph
    if torch.compiler.is_compiling() or kernels.loaded_with_avx512():
        return kernels.loaded_with_avx512()
    return build.disabled_reason() is None and kernels.ready() and kernels.loaded_with_avx512()


def kernel_mask(mask, q, k):
    """A bool mask as the kernel reads it, (b or 1, 1, s, t): any mask the reference's SDPA broadcasts over the
    query heads, e.g. a key-padding mask (b, 1, 1, t) or a 2-D (s, t) one, as an expanded view; None when the kernel
    cannot read it (a mask per query head, or a shape that does not broadcast to (b, 1, s, t))."""
    b, s, t = q.shape[0], q.shape[2], k.shape[2]
    if mask.dim() > 4:
        return None
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape)) if mask.dim() < 4 else mask
    if m.shape[1] != 1 or m.shape[0] not in (1, b) or m.shape[2] not in (1, s) or m.shape[3] not in (1, t):
        return None
    return m if m.shape[2:] == (s, t) else m.expand(m.shape[0], 1, s, t)


def takes(q, k, v, mask, softcap) -> bool:
    return (q.dtype in _FLOATS and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256
            and k.dtype == q.dtype and v.dtype == q.dtype
            and (mask is None or (mask.dtype == torch.bool and kernel_mask(mask, q, k) is not None))
            and not needs_grad(q, k, v) and _kernels_ready())


def attention(q, k, v, mask, scale: float, softcap: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    if not takes(q, k, v, mask, softcap):
        return _ref.attention(q, k, v, mask, scale, softcap, is_causal)
    return kernel(q, k, v, mask, scale, softcap, is_causal)


def kernel(q, k, v, mask, scale: float, softcap: float, is_causal: bool) -> torch.Tensor:
    """The C++ kernel itself, for a caller that has already asked `takes` (the paged decode rows). A mask is read
    as (b or 1, 1, s, t) (kernel_mask); one the kernel cannot read goes to the reference."""
    if mask is not None:
        km = kernel_mask(mask, q, k)
        if km is None:
            return _ref.attention(q, k, v, mask, scale, softcap, is_causal)
        mask = km
    return torch.ops.exllamav2_cpu.decode_attention(q, k, v, mask, float(scale), float(softcap or 0.0),
                                                    bool(is_causal))


def takes_paged_decode(q, kflat, vflat, block_index, kv_lens) -> bool:
    """Whether `paged_decode` takes a decode-only paged call: exactly when `attend_sequence` (torch_ref/attention.py)
    would send each sequence's row to the kernel (`takes`), the cache already in q's dtype, the tables on the CPU.
    Traced by dynamo in the compiled paged step: attribute reads and a dict lookup only."""
    return (q.device.type == "cpu" and q.dtype in _FLOATS and kflat.dtype == q.dtype and vflat.dtype == q.dtype
            and q.shape[-1] % 16 == 0 and q.shape[-1] <= 256 and block_index.device.type == "cpu"
            and kv_lens.device.type == "cpu" and not needs_grad(q, kflat, vflat) and _kernels_ready())


def paged_decode(q, kflat, vflat, block_index, kv_lens, page_size: int, sliding_window: int, scale: float,
                 softcap: float) -> torch.Tensor:
    """One new token per sequence over a page-major cache, all sequences in one C++ call (csrc/attention.cpp):
    q (B, hq, d), kflat/vflat (slots, hk, d), block_index (B, pages), kv_lens (B,) -> (B, hq, d), each sequence
    bit-identical to `attend_sequence` over its own keys (tests/test_cpu_paged_decode.py)."""
    return torch.ops.exllamav2_cpu.paged_decode_attention(q, kflat, vflat, block_index, kv_lens, int(page_size),
                                                          int(sliding_window or 0), float(scale),
                                                          float(softcap or 0.0))


_QUANT_FORMATS = {"q4": 0, "q8": 1, "fp8": 2}


def takes_quant_paged_decode(q, pages, block_index, kv_lens) -> bool:
    """Whether `quant_paged_decode` takes a decode-only call over a quantized paged cache (kv_quant.QuantPages):
    CPU tensors, head_dim a multiple of 32, the kernels loaded with AVX-512. Attribute reads and a dict lookup only
    (traced by dynamo in the compiled paged step)."""
    return (q.device.type == "cpu" and q.dtype in _FLOATS and q.shape[-1] % 32 == 0 and q.shape[-1] <= 256
            and pages.k_codes.device.type == "cpu" and block_index.device.type == "cpu"
            and kv_lens.device.type == "cpu" and not needs_grad(q) and _kernels_ready())


def takes_quant_paged_decode_shape(dtype: torch.dtype, head_dim: int) -> bool:
    """The same for a caller that has no pages yet (attn.py's decode over a quantized seed-API cache)."""
    return dtype in _FLOATS and head_dim % 32 == 0 and head_dim <= 256 and not torch.is_grad_enabled() \
        and _kernels_ready()


def quant_paged_decode(q, pages, block_index, kv_lens, page_size: int, sliding_window: int, scale: float,
                       softcap: float) -> torch.Tensor:
    """One new token per sequence over a quantized paged cache, every sequence in one C++ call
    (csrc/attention_quant.cpp): q (B, hq, d) -> (B, hq, d), no key or value row dequantised (the query and the
    output are rotated instead; within the activation dtype's rounding of the reference,
    tests/test_cpu_quant_attention.py)."""
    return torch.ops.exllamav2_cpu.quant_paged_decode_attention(
        q, pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales, _QUANT_FORMATS[pages.k_format.name],
        _QUANT_FORMATS[pages.v_format.name], block_index, kv_lens, int(page_size), int(sliding_window or 0),
        float(scale), float(softcap or 0.0))


def quant_write(pages, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> bool:
    """k, v (T, kv_heads, head_dim) quantised into their slots of `pages` (kv_quant.QuantPages) in one C++ call
    (csrc/kv_quant_write.cpp), bit-identical to QuantPages.write, also inside a compiled step (a mutating custom op
    with a fake); False (nothing written) where the kernel does not apply: gradients, other devices, no kernels."""
    if (k.device.type != "cpu" or pages.k_codes.device.type != "cpu"
            or slots.device.type != "cpu" or k.dtype not in _FLOATS or v.dtype not in _FLOATS
            or k.shape[-1] % 32 or needs_grad(k, v) or not _kernels_ready()):
        return False
    torch.ops.exllamav2_cpu.quant_kv_write(k, v, pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales,
                                           _QUANT_FORMATS[pages.k_format.name], _QUANT_FORMATS[pages.v_format.name],
                                           slots)
    return True
