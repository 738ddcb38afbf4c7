"""The `triton` backend of `quant_paged_attention` (the reference: ops/torch_ref/attention_quant.py): paged attention
over a quantized cache (cache_q.py), whose codes and scales the kernel (attn_kernels.py, K_FMT / V_FMT) reads and
dequantises per block of keys, in registers; the cache is never dequantised into a temporary. Group formats store
Hadamard-rotated values: the kernel rotates its query tile and its output tile instead of the keys and values
(attn_kernels.py's docstring has the algebra).

The new tokens are quantised into their pages by one kernel per tensor (attn_kv_quant.py), which gives the
reference's codes bit for bit (FP8 pages take the reference's write: a clamp and a cast).

Decode-only forwards (paged_attn.PagedDecodeParams) launch through one custom op,
`torch.ops.exllamav2.triton_quant_paged_decode`, so that a compiled or graph-captured step sees one opaque node.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..torch_ref.kv_quant import GROUP, QuantPages, format_named, write_part
from . import interpreting, kernels
from .attention import _declines_common
from .attention_paged import _decode_meta, _packed_meta
from .attn_launch import QuantLayout, last_dim_contiguous, launch

FORMAT_CODES = {"q4": 4, "q8": 8, "fp8": 2}  # attn_kernels.py's K_FMT / V_FMT
WRITE_ROWS = 32  # groups of 32 values quantised per program of attn_kv_quant.kv_quant_write


def declines_quant_paged(q, k, v, pages: QuantPages, params, sliding_window, scale, softcap=0.0) -> str | None:
    why = _declines_common(q)
    if why is not None:
        return why
    for name, fmt in (("key", pages.k_format), ("value", pages.v_format)):
        if fmt.name not in FORMAT_CODES:
            return f"{name} format {fmt.name!r}, expected one of {', '.join(FORMAT_CODES)}"
    return None


def _layout(k_codes, k_scales, v_codes, v_scales, k_format: str, v_format: str) -> QuantLayout:
    ks = k_scales if k_scales is not None else k_codes
    vs = v_scales if v_scales is not None else v_codes
    return QuantLayout(ks, vs, FORMAT_CODES[k_format], FORMAT_CODES[v_format],
                       (ks.stride(1), ks.stride(0)) if k_scales is not None else (0, 0),
                       (vs.stride(1), vs.stride(0)) if v_scales is not None else (0, 0))


def write(pages: QuantPages, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
    """k, v (T, kv_heads, head_dim) into their slots (T,): group formats through attn_kv_quant.kv_quant_write."""
    for fmt, codes, scales, x in pages.parts(k, v):
        if not fmt.has_scales or x.shape[0] == 0:
            write_part(fmt, codes, scales, x, slots, pages.dtype)
            continue
        torch.ops.exllamav2.triton_kv_quant_write(x, codes, scales, slots, fmt.bits)


@torch.library.custom_op("exllamav2::triton_kv_quant_write", mutates_args=("codes", "scales"))
def triton_kv_quant_write(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, slots: torch.Tensor,
                          bits: int) -> None:
    """x (T, kv_heads, head_dim) quantised into codes/scales (slots, kv_heads, ...) at slots (T,); a custom op so
    that a compiled step calls the launch as one node."""
    T, hk, d = x.shape
    x = last_dim_contiguous(x)
    rows = T * hk * (d // GROUP)
    kernels("attn_kv_quant").kv_quant_write[(-(-rows // WRITE_ROWS),)](
        x, codes, scales, slots, rows, hk, d // GROUP, x.stride(0), x.stride(1), codes.stride(0), codes.stride(1),
        scales.stride(0), scales.stride(1), torch.finfo(scales.dtype).max, BITS=bits, BLOCK_R=WRITE_ROWS,
        SCALE_BF16=scales.dtype == torch.bfloat16, EXACT_DIV=not interpreting(), num_warps=4)


@triton_kv_quant_write.register_fake
def _(x, codes, scales, slots, bits):
    return None


def _launch(meta, q0, k_codes, v_codes, out0, block_table, layout: QuantLayout, page_size, window, scale, softcap):
    """q0/out0 (T, hq, d) packed rows, codes (slots, hk, width)."""
    launch(meta, q0, k_codes, v_codes, out0, None, block_table,
           q_strides=(0, q0.stride(0), q0.stride(1)), k_strides=(0, k_codes.stride(1), k_codes.stride(0)),
           v_strides=(0, v_codes.stride(1), v_codes.stride(0)), o_strides=(0, out0.stride(0), out0.stride(1)),
           m_strides=(0, 0, 0), paged=True, page_size=page_size, max_kv_len=block_table.shape[1] * page_size,
           scale=scale, softcap=softcap, window=int(window or 0), causal=True, quant=layout)


def quant_paged_attention(q, k, v, pages: QuantPages, params, sliding_window: int, scale: float,
                          softcap: float = 0.0) -> torch.Tensor:
    """As torch_ref.attention_quant.quant_paged_attention: q (1, T, hq, d), k/v (1, T, hk, d); quantises k/v into
    their slots and returns (1, T, hq * d)."""
    _, T, hq, d = q.shape
    hk = pages.k_codes.shape[1]
    if hq % hk:
        raise ValueError(f"quant_paged_attention: {hq} query heads are not a multiple of {hk} KV heads")
    write(pages, k[0], v[0], params.slots.to(pages.k_codes.device))
    q0 = last_dim_contiguous(q[0])
    tensors = (pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales, pages.k_format.name, pages.v_format.name)
    if getattr(params, "sequences", None) is None:  # decode-only, device tensors (paged_attn.PagedDecodeParams)
        out = torch.ops.exllamav2.triton_quant_paged_decode(q0, *tensors, params.block_index, params.kv_lens,
                                                            params.page_size, int(sliding_window or 0),
                                                            float(scale), float(softcap or 0.0))
    else:
        meta, block_table = _packed_meta(params, hq // hk, d, q.element_size(), q.device)
        out = torch.empty(T, hq, d, dtype=q.dtype, device=q.device)
        _launch(meta, q0, pages.k_codes, pages.v_codes, out, block_table, _layout(*tensors), params.page_size,
                sliding_window, scale, softcap)
    return out.view(1, T, hq * d)


@torch.library.custom_op("exllamav2::triton_quant_paged_decode", mutates_args=())
def triton_quant_paged_decode(q: torch.Tensor, k_codes: torch.Tensor, k_scales: Optional[torch.Tensor],
                              v_codes: torch.Tensor, v_scales: Optional[torch.Tensor], k_format: str, v_format: str,
                              block_index: torch.Tensor, kv_lens: torch.Tensor, page_size: int, window: int,
                              scale: float, softcap: float) -> torch.Tensor:
    """One new token per sequence: q (B, hq, d) over each sequence's kv_lens[i] keys through block_index[i]."""
    q = last_dim_contiguous(q)
    for name in (k_format, v_format):
        format_named(name)
    out = torch.empty_like(q)
    meta = _decode_meta(q.shape[0], kv_lens, q.shape[1] // k_codes.shape[1], q.shape[2], q.element_size(), q.device)
    _launch(meta, q, k_codes, v_codes, out, block_index, _layout(k_codes, k_scales, v_codes, v_scales, k_format,
                                                                  v_format), page_size, window, scale, softcap)
    return out


@triton_quant_paged_decode.register_fake
def _(q, k_codes, k_scales, v_codes, v_scales, k_format, v_format, block_index, kv_lens, page_size, window, scale,
      softcap):
    return torch.empty_like(q)
