"""Paged attention over a quantized KV cache (the reference; the Triton kernel: ops/triton/attention_quant.py).

The op `quant_paged_attention` takes the layer's pages as a `kv_quant.QuantPages` (codes and scales, cache_q.py):
the new tokens' K/V are quantised into their slots, then each sequence dequantises the keys and values of its own
pages (in block-table order) and attends to them alone, as the plain paged path does (attention.attend_sequence),
so a request's result does not depend on the batch. Nothing dequantises the cache as a whole.
"""

from __future__ import annotations

from typing import Optional

import torch

from .attention import _cpu_modules, attend_sequence, window_mask
from .kv_quant import QuantPages, format_named


def quant_paged_attention(q, k, v, pages: QuantPages, params, sliding_window: int, scale: float,
                          softcap: float = 0.0) -> torch.Tensor:
    """q (1, T, hq, d), k and v (1, T, hk, d) after RoPE, for the packed tokens `params` (paged_attn.PagedParams
    or PagedDecodeParams) describes. Quantises k/v into their slots and returns (1, T, hq * d)."""
    slots = params.slots.to(pages.k_codes.device)
    dispatch, cpu_attention = _cpu_modules()
    # on the CPU with the cpu backend's kernels one C++ call writes the codes (bit-identical to pages.write)
    if not ("cpu" in dispatch.active_backends() and cpu_attention.quant_write(pages, k[0], v[0], slots)):
        pages.write(k[0], v[0], slots)
    if params.sequences is None or params.decode_only:
        # one new token per sequence on the CPU with the cpu backend's kernels: every sequence in one C++ call that
        # reads the codes as they are (ops/cpu/attention.py)
        if "cpu" in dispatch.active_backends() and cpu_attention.takes_quant_paged_decode(
                q, pages, params.block_index, params.kv_lens):
            out = cpu_attention.quant_paged_decode(q[0], pages, params.block_index, params.kv_lens, params.page_size,
                                                   sliding_window or 0, scale, softcap)
            return out.reshape(1, params.seq_len, -1)
    if params.sequences is None:  # decode-only, built from device tensors (paged_attn.PagedDecodeParams)
        out = torch.ops.exllamav2.quant_paged_decode_attention(
            q[0], pages.k_codes, pages.k_scales, pages.v_codes, pages.v_scales, pages.k_format.name,
            pages.v_format.name, params.block_index, params.kv_lens, params.page_size, sliding_window or 0, scale,
            softcap)
        return out.reshape(1, params.seq_len, -1)
    outs = []
    for sq in params.sequences:
        qs = q[:, sq.start:sq.start + sq.q_len].transpose(1, 2)  # (1, hq, q_len, d)
        # a sequence's keys are dequantised alone (kv_quant.GroupQuant.dequantize: a matmul whose rows must not
        # depend on the batch)
        where = slice(sq.slot_start, sq.slot_start + sq.kv_len) if sq.slot_start is not None else sq.slots
        ks, vs = pages.read(where, q.dtype)
        mask = sq.mask(sliding_window or 0, q.device)
        outs.append(attend_sequence(qs, ks, vs, sq.kv_len, 0, None, mask, scale, softcap))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.reshape(1, params.seq_len, -1)


@torch.library.custom_op("exllamav2::quant_paged_decode_attention", mutates_args=())
def quant_paged_decode_attention(q: torch.Tensor, k_codes: torch.Tensor, k_scales: Optional[torch.Tensor],
                                 v_codes: torch.Tensor, v_scales: Optional[torch.Tensor], k_format: str,
                                 v_format: str, block_index: torch.Tensor, kv_lens: torch.Tensor, page_size: int,
                                 sliding_window: int, scale: float, softcap: float) -> torch.Tensor:
    """One new token per sequence: q (B, hq, d) over each sequence's kv_lens[i] keys through its block table row,
    dequantised per sequence. One opaque node for a compiled decode step (the lengths are read on the host here,
    as in attention.paged_decode_attention)."""
    pages = QuantPages(k_codes, k_scales, v_codes, v_scales, format_named(k_format), format_named(v_format),
                       q.dtype)
    outs = []
    for i, kv_len in enumerate(kv_lens.tolist()):
        pos = torch.arange(kv_len, device=k_codes.device)
        slots = block_index[i].to(k_codes.device)[pos // page_size] * page_size + pos % page_size
        ks, vs = pages.read(slots, q.dtype)
        mask = window_mask(kv_len, 1, sliding_window, q.device)
        outs.append(attend_sequence(q[i:i + 1].unsqueeze(2), ks, vs, kv_len, 0, None, mask, scale, softcap)[0, 0])
    return torch.stack(outs)


@quant_paged_decode_attention.register_fake
def _(q, k_codes, k_scales, v_codes, v_scales, k_format, v_format, block_index, kv_lens, page_size, sliding_window,
      scale, softcap):
    return torch.empty_like(q)
