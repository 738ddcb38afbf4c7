"""The `triton` backend of `paged_attention` (the reference: ops/torch_ref/attention.py::paged_attention): the
packed new tokens of several sequences over the layer's paged cache, page-major (1, slots, kv_heads, head_dim)
(cache.py). K/V are written into their slots first, then every sequence attends to exactly its own keys through
its block table, all sequences in one launch per class (split decode-like sequences, whole prefill sequences;
attn_meta.py).

Decode-only forwards (paged_attn.PagedDecodeParams: one token per sequence, device tensors only) go through one
custom op, `torch.ops.exllamav2.triton_paged_decode`, so that a compiled or graph-captured decode step sees one
opaque node: no host sync and no host-built tensor inside it.
"""

from __future__ import annotations

import torch

from . import attn_meta
from ..torch_ref import attention as _ref
from .attn_launch import kv_write, last_dim_contiguous, launch, prefill_impl


def _check_layout(q, kflat, vflat):
    hq, hk = q.shape[-2], kflat.shape[1]
    if hq % hk:
        raise ValueError(f"paged_attention: {hq} query heads are not a multiple of {hk} KV heads")
    if kflat.stride(-1) != 1 or vflat.stride(-1) != 1:
        raise ValueError("paged_attention: KV cache pages must be contiguous in the head dim")


def _packed_meta(params, group: int, d: int, elem_bytes: int, device) -> tuple[attn_meta.AttnMeta, torch.Tensor]:
    """Per forward (shared by the layers through params._cache): the launch metadata and the int32 block table."""
    key = ("triton_attn", group, d, elem_bytes, str(device))
    hit = params._cache.get(key)
    if hit is None:
        kv = torch.tensor([p + ql for p, ql in zip(params.past_lens, params.q_lens)], dtype=torch.int32)
        meta = attn_meta.build(params.q_lens, kv, group, d, device, elem_bytes=elem_bytes)
        hit = params._cache[key] = (meta, params.block_index.to(device=device, dtype=torch.int32))
    return hit


def _paged_launch(meta, q0, kflat, vflat, out0, block_table, page_size, window, scale, softcap):
    """q0/out0 (T, hq, d) packed rows, kflat/vflat (slots, hk, d)."""
    launch(meta, q0, kflat, vflat, out0, None, block_table,
           q_strides=(0, q0.stride(0), q0.stride(1)), k_strides=(0, kflat.stride(1), kflat.stride(0)),
           v_strides=(0, vflat.stride(1), vflat.stride(0)), o_strides=(0, out0.stride(0), out0.stride(1)),
           m_strides=(0, 0, 0), paged=True, page_size=page_size, max_kv_len=block_table.shape[1] * page_size,
           scale=scale, softcap=softcap, window=int(window or 0), causal=True)


def paged_attention(q, k, v, k_pages, v_pages, params, sliding_window: int, scale: float,
                    softcap: float = 0.0) -> torch.Tensor:
    """As torch_ref.paged_attention: q (1, T, hq, d), k/v (1, T, hk, d); writes k/v into their slots of k_pages/
    v_pages (1, slots, hk, d) and returns (1, T, hq * d)."""
    _, T, hq, d = q.shape
    kflat, vflat = k_pages[0], v_pages[0]
    _check_layout(q, kflat, vflat)
    if getattr(params, "sequences", None) is None:  # decode-only, device tensors (paged_attn.PagedDecodeParams)
        out = torch.ops.exllamav2.triton_paged_decode(q[0], k[0], v[0], kflat, vflat, params.block_index,
                                                      params.kv_lens, params.slots, params.page_size,
                                                      int(sliding_window or 0), float(scale), float(softcap or 0.0))
        return out.view(1, T, hq * d)
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    kv_write(k[0], v[0], kflat, vflat, params.slots.to(q.device))
    meta, block_table = _packed_meta(params, hq // kflat.shape[1], d, q.element_size(), q.device)
    out = torch.empty(1, T, hq, d, dtype=q.dtype, device=q.device)
    if prefill_impl() == "sdpa" and any(not ln.split for ln in meta.launches):
        meta = attn_meta.AttnMeta(meta.q_starts, meta.q_lens, meta.kv_lens, meta.part_base,
                                  [ln for ln in meta.launches if ln.split])
        _prefill_by_reference(q, out, kflat, vflat, params, sliding_window, scale, softcap)
    _paged_launch(meta, q[0], kflat, vflat, out[0], block_table, params.page_size, sliding_window, scale, softcap)
    return out.view(1, T, hq * d)


_DECODE_META: dict = {}


def _decode_meta(num_seqs: int, kv_lens: torch.Tensor, group: int, d: int, elem_bytes: int,
                 device) -> attn_meta.AttnMeta:
    """The tiles of a decode-only call depend on the batch size alone: built once per shape, on the device."""
    key = (num_seqs, group, d, elem_bytes, str(device))
    meta = _DECODE_META.get(key)
    if meta is None:
        if len(_DECODE_META) > 64:
            _DECODE_META.clear()
        meta = _DECODE_META[key] = attn_meta.build_decode(num_seqs, kv_lens, group, d, device, elem_bytes)
    return attn_meta.AttnMeta(meta.q_starts, meta.q_lens, kv_lens, meta.part_base, meta.launches)


@torch.library.custom_op("exllamav2::triton_paged_decode", mutates_args=("kflat", "vflat"))
def triton_paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kflat: torch.Tensor,
                        vflat: torch.Tensor, block_index: torch.Tensor, kv_lens: torch.Tensor, slots: torch.Tensor,
                        page_size: int, window: int, scale: float, softcap: float) -> torch.Tensor:
    """One new token per sequence: q (B, hq, d), k/v (B, hk, d) written at `slots` into kflat/vflat (slots, hk,
    d); sequence i attends to its kv_lens[i] keys through block_index[i] (int32 or int64, read on the device)."""
    q, k, v = last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v)
    kv_write(k, v, kflat, vflat, slots)
    out = torch.empty_like(q)
    meta = _decode_meta(q.shape[0], kv_lens, q.shape[1] // kflat.shape[1], q.shape[2], q.element_size(), q.device)
    _paged_launch(meta, q, kflat, vflat, out, block_index, page_size, window, scale, softcap)
    return out


@triton_paged_decode.register_fake
def _(q, k, v, kflat, vflat, block_index, kv_lens, slots, page_size, window, scale, softcap):
    return torch.empty_like(q)


def _prefill_by_reference(q, out, kflat, vflat, params, sliding_window, scale, softcap) -> None:
    """EXLLAMAV2_TRITON_PREFILL=sdpa: the prefill sequences through the reference's per-sequence attention."""
    for sq in params.sequences:
        if sq.q_len <= attn_meta.DECODE_MAX_Q:
            continue
        qs = q[:, sq.start:sq.start + sq.q_len].transpose(1, 2)
        mask = sq.mask(sliding_window or 0, q.device)
        where = (slice(sq.slot_start, sq.slot_start + sq.kv_len) if sq.slot_start is not None
                 else sq.slots.to(kflat.device))
        ks, vs = kflat[where].transpose(0, 1).unsqueeze(0), vflat[where].transpose(0, 1).unsqueeze(0)
        o = _ref.attention(qs, ks.to(q.dtype), vs.to(q.dtype), mask, scale, softcap, mask is None)
        out[:, sq.start:sq.start + sq.q_len] = o.transpose(1, 2)
