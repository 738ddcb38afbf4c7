"""The `triton` backend of the `attention` and `paged_attention` ops (the reference: ops/torch_ref/attention.py).

Kernels: attn_kernels.py (flash attention with split-KV decode, the split combine, the KV write); their launch
metadata: attn_meta.py. GQA reads each K/V block once per KV head (no per-query-head copies), softcap and
sliding windows are applied in the kernel, and one paged call serves mixed prefill and decode sequences.

This file: the backend's `declines` hooks and the contiguous op; the paged op is attention_paged.py; the launches,
the KV write and the prefill switch (EXLLAMAV2_TRITON_PREFILL=triton|sdpa) are attn_launch.py.
"""

from __future__ import annotations

import torch

from . import attn_meta
from . import declines as _declines_device
from ..torch_ref import attention as _ref
from .attention_paged import paged_attention  # noqa: F401  (registered by ops/__init__.py from here)
from .attn_launch import last_dim_contiguous, launch, prefill_impl

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _declines_common(q: torch.Tensor) -> str | None:
    why = _declines_device(q)
    if why is not None:
        return why
    if q.dtype not in _FLOATS:
        return f"query dtype {q.dtype}, expected float16, bfloat16 or float32"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} above {MAX_HEAD_DIM}"
    return None


def declines_attention(q, k, v, mask, scale, softcap=0.0, is_causal=False) -> str | None:
    return _declines_common(q)


def declines_paged(q, k, v, k_pages, v_pages, params, sliding_window, scale, softcap=0.0) -> str | None:
    why = _declines_common(q)
    if why is not None:
        return why
    if k_pages.dtype not in _FLOATS:
        return (f"KV cache pages of dtype {k_pages.dtype} (quantized caches are read by the quant_paged_attention "
                f"op)")
    if k is None:
        return "k/v written beforehand (attn.py writes them with RoPE only for CPU tensors)"
    if k_pages.dim() != 4 or k_pages.shape[0] != 1:
        return f"KV cache pages of shape {tuple(k_pages.shape)}, expected (1, slots, kv_heads, head_dim)"
    return None


_CONTIG_META: dict = {}


def attention(q, k, v, mask, scale: float, softcap: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """q (b, hq, s, d); k, v (b, hk, t, d); mask bool (b or 1, 1, s, t) or None; bottom-right causal (as
    torch_ref.attention)."""
    b, hq, s, d = q.shape
    hk, t = k.shape[1], k.shape[2]
    if hq % hk:
        raise ValueError(f"attention: {hq} query heads are not a multiple of {hk} KV heads")
    if s > attn_meta.DECODE_MAX_Q and prefill_impl() == "sdpa":
        return _ref.attention(q, k, v, mask, scale, softcap, is_causal)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    key = (b, s, hq // hk, d, q.element_size(), str(q.device))
    meta = _CONTIG_META.get(key)
    if meta is None:
        if len(_CONTIG_META) > 64:
            _CONTIG_META.clear()
        meta = _CONTIG_META[key] = attn_meta.build([s] * b, torch.zeros(b, dtype=torch.int32), hq // hk, d,
                                                   q.device, packed=False, elem_bytes=q.element_size())
    meta = attn_meta.AttnMeta(meta.q_starts, meta.q_lens, torch.full((b,), t, dtype=torch.int32, device=q.device),
                              meta.part_base, meta.launches)
    out = torch.empty_like(q)
    m_strides = (0, 0, 0)
    if mask is not None:
        if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[-2:] != (s, t) or mask.shape[0] not in (1, b):
            raise ValueError(f"attention: mask of shape {tuple(mask.shape)} and dtype {mask.dtype}, expected bool "
                             f"({b} or 1, 1, {s}, {t})")
        mask = mask.view(torch.uint8)
        m_strides = (mask.stride(0) if mask.shape[0] > 1 else 0, mask.stride(2), mask.stride(3))
    launch(meta, q, k, v, out, mask, None,
           q_strides=(q.stride(0), q.stride(2), q.stride(1)), k_strides=(k.stride(0), k.stride(1), k.stride(2)),
           v_strides=(v.stride(0), v.stride(1), v.stride(2)), o_strides=(out.stride(0), out.stride(2), out.stride(1)),
           m_strides=m_strides, paged=False, page_size=1, max_kv_len=t, scale=scale, softcap=softcap, window=0,
           causal=bool(is_causal) and mask is None)
    return out
