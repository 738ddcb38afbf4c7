"""The `triton` backend of the `attention` and `paged_attention` ops (the reference: ops/torch_ref/attention.py).

Kernels: attn_kernels.py (flash attention with split-KV decode, the split combine, the KV write); their launch
metadata: attn_meta.py. GQA reads each K/V block once per KV head (no per-query-head copies), softcap and
sliding windows are applied in the kernel, and one paged call serves mixed prefill and decode sequences.

Prefill switch: EXLLAMAV2_TRITON_PREFILL=triton (default) runs prompts (more than attn_meta.DECODE_MAX_Q new
tokens) through our flash kernel; =sdpa runs the contiguous op's prompts through torch SDPA and the paged op's
prefill sequences through the reference per-sequence path. The default was chosen without a GPU to measure on;
bench/gpu/bench_attention.py times both.
"""

from __future__ import annotations

import os

import torch

from . import declines as _declines_device
from . import interpreting, kernels
from . import attn_meta
from ..torch_ref import attention as _ref

PREFILL_ENV = "EXLLAMAV2_TRITON_PREFILL"
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def prefill_impl() -> str:
    """"triton" or "sdpa" (see the module docstring)."""
    v = os.environ.get(PREFILL_ENV, "triton").strip().lower() or "triton"
    if v not in ("triton", "sdpa"):
        raise ValueError(f"{PREFILL_ENV}={v!r}: expected 'triton' or 'sdpa'")
    return v


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
        return f"KV cache pages of dtype {k_pages.dtype} (quantized caches are not read by this kernel)"
    if k_pages.dim() != 4 or k_pages.shape[0] != 1:
        return f"KV cache pages of shape {tuple(k_pages.shape)}, expected (1, kv_heads, slots, head_dim)"
    return None


def _dot_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """(DOT_F32, IEEE): the interpreter's tl.dot is wrong on bf16, so interpreted bf16 dots run in fp32; fp32
    inputs use exact fp32 products (not TF32) so that fp32 matches the reference."""
    dot_f32 = interpreting() and dtype == torch.bfloat16
    return dot_f32, dot_f32 or dtype == torch.float32


def _launch(meta: attn_meta.AttnMeta, q, kc, vc, out, mask, block_table, *, q_strides, k_strides, v_strides,
            o_strides, m_strides, paged: bool, page_size: int, max_kv_len: int, scale: float, softcap: float,
            window: int, causal: bool):
    kern = kernels("attn_kernels")
    hq, d = q.shape[-2] if paged else q.shape[1], q.shape[-1]
    hk = kc.shape[0] if paged else kc.shape[1]
    group = hq // hk
    bd = attn_meta.block_d(d)
    dot_f32, ieee = _dot_flags(q.dtype)
    dummy = meta.q_lens
    for ln in meta.launches:
        cfg = ln.cfg
        n_split = attn_meta.split_grid(max_kv_len) if ln.split else 1
        if ln.split:
            part_o = torch.empty(ln.num_rows, hq, n_split, d, dtype=torch.float32, device=q.device)
            part_l = torch.empty(ln.num_rows, hq, n_split, dtype=torch.float32, device=q.device)
        else:
            part_o = part_l = torch.empty(1, dtype=torch.float32, device=q.device)
        po_s = part_o.stride() if ln.split else (0, 0, 0, 0)
        pl_s = part_l.stride() if ln.split else (0, 0, 0)
        grid = (ln.tile_seq.shape[0], hk, n_split)
        kern.attn_fwd[grid](
            q, kc, vc, out, part_o, part_l, mask if mask is not None else dummy,
            block_table if block_table is not None else dummy, meta.kv_lens, meta.q_starts, meta.q_lens,
            meta.part_base, ln.tile_seq, ln.tile_m,
            *q_strides, *k_strides, *v_strides, *o_strides, *m_strides,
            block_table.stride(0) if block_table is not None else 0, po_s[0], po_s[1], po_s[2], pl_s[0], pl_s[1],
            page_size, d, float(scale), float(softcap or 1.0), int(window),
            G=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, PAGED=paged, CAUSAL=causal,
            HAS_MASK=mask is not None, HAS_WINDOW=window > 0, SOFTCAP=bool(softcap), SPLIT=ln.split,
            MIN_SPLIT=attn_meta.MIN_SPLIT, MAX_SPLITS=attn_meta.MAX_SPLITS, DOT_F32=dot_f32, IEEE=ieee,
            WHILE_LOOP=interpreting(),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        if ln.split:
            kern.attn_combine[(ln.num_rows, hq)](
                part_o, part_l, out, ln.part_seq, ln.part_tok, meta.kv_lens, meta.q_starts,
                po_s[0], po_s[1], po_s[2], pl_s[0], pl_s[1], *o_strides, d,
                BLOCK_N=cfg.block_n, BLOCK_D=bd, MIN_SPLIT=attn_meta.MIN_SPLIT, MAX_SPLITS=attn_meta.MAX_SPLITS,
                num_warps=4)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


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
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    key = (b, s, hq // hk, d, str(q.device))
    meta = _CONTIG_META.get(key)
    if meta is None:
        if len(_CONTIG_META) > 64:
            _CONTIG_META.clear()
        meta = _CONTIG_META[key] = attn_meta.build([s] * b, torch.zeros(b, dtype=torch.int32), hq // hk, d,
                                                   q.device, packed=False)
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
    _launch(meta, q, k, v, out, mask, None,
            q_strides=(q.stride(0), q.stride(2), q.stride(1)), k_strides=(k.stride(0), k.stride(1), k.stride(2)),
            v_strides=(v.stride(0), v.stride(1), v.stride(2)), o_strides=(out.stride(0), out.stride(2), out.stride(1)),
            m_strides=m_strides, paged=False, page_size=1, max_kv_len=t, scale=scale, softcap=softcap, window=0,
            causal=bool(is_causal) and mask is None)
    return out


def kv_write(k, v, kflat, vflat, slots) -> None:
    """k, v (T, hk, d) into kflat/vflat (hk, slots, d) at slots (T,)."""
    T, hk, d = k.shape
    if T == 0:
        return
    kernels("attn_kernels").kv_write[(T, hk)](
        k, v, kflat, vflat, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1), kflat.stride(0),
        kflat.stride(1), vflat.stride(0), vflat.stride(1), d, BLOCK_D=attn_meta.block_d(d), num_warps=1)


def _paged_meta(params, group: int, d: int, device) -> tuple[attn_meta.AttnMeta, torch.Tensor]:
    """Per forward (shared by the layers through params._cache): the launch metadata and int32 block table."""
    key = ("triton_attn", group, d, str(device))
    hit = params._cache.get(key)
    if hit is None:
        if getattr(params, "sequences", None) is None:  # decode-only params, device tensors (PagedDecodeParams)
            meta = attn_meta.build_decode(params.seq_len, params.kv_lens, group, d, device)
        else:
            kv = torch.tensor([p + ql for p, ql in zip(params.past_lens, params.q_lens)], dtype=torch.int32)
            meta = attn_meta.build(params.q_lens, kv, group, d, device)
        hit = params._cache[key] = (meta, params.block_index.to(device=device, dtype=torch.int32))
    return hit


def paged_attention(q, k, v, k_pages, v_pages, params, sliding_window: int, scale: float,
                    softcap: float = 0.0) -> torch.Tensor:
    """As torch_ref.paged_attention: q (1, T, hq, d), k/v (1, T, hk, d); writes k/v into their slots of k_pages/
    v_pages (1, hk, slots, d) and returns (1, T, hq * d)."""
    _, T, hq, d = q.shape
    kflat, vflat = k_pages[0], v_pages[0]
    hk = kflat.shape[0]
    if hq % hk:
        raise ValueError(f"paged_attention: {hq} query heads are not a multiple of {hk} KV heads")
    if kflat.stride(-1) != 1 or vflat.stride(-1) != 1:
        raise ValueError("paged_attention: KV cache pages must be contiguous in the head dim")
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    kv_write(k[0], v[0], kflat, vflat, params.slots.to(q.device))
    meta, block_table = _paged_meta(params, hq // hk, d, q.device)
    out = torch.empty(1, T, hq, d, dtype=q.dtype, device=q.device)
    if prefill_impl() == "sdpa" and any(not ln.split for ln in meta.launches):
        meta = attn_meta.AttnMeta(meta.q_starts, meta.q_lens, meta.kv_lens, meta.part_base,
                                  [ln for ln in meta.launches if ln.split])
        _prefill_by_reference(q, out, kflat, vflat, params, sliding_window, scale, softcap)
    q0 = q[0]
    _launch(meta, q0, kflat, vflat, out[0], None, block_table,
            q_strides=(0, q0.stride(0), q0.stride(1)), k_strides=(0, kflat.stride(0), kflat.stride(1)),
            v_strides=(0, vflat.stride(0), vflat.stride(1)), o_strides=(0, out.stride(1), out.stride(2)),
            m_strides=(0, 0, 0), paged=True, page_size=params.page_size,
            max_kv_len=block_table.shape[1] * params.page_size, scale=scale, softcap=softcap,
            window=int(sliding_window or 0), causal=True)
    return out.view(1, T, hq * d)


def _prefill_by_reference(q, out, kflat, vflat, params, sliding_window, scale, softcap) -> None:
    """EXLLAMAV2_TRITON_PREFILL=sdpa: the prefill sequences through the reference's per-sequence attention."""
    for sq in params.sequences:
        if sq.q_len <= attn_meta.DECODE_MAX_Q:
            continue
        qs = q[:, sq.start:sq.start + sq.q_len].transpose(1, 2)
        mask = sq.mask(sliding_window or 0, q.device)
        if sq.slot_start is not None:
            ks = kflat[:, sq.slot_start:sq.slot_start + sq.kv_len].unsqueeze(0)
            vs = vflat[:, sq.slot_start:sq.slot_start + sq.kv_len].unsqueeze(0)
        else:
            idx = sq.slots.to(kflat.device)
            ks, vs = kflat[:, idx].unsqueeze(0), vflat[:, idx].unsqueeze(0)
        o = _ref.attention(qs, ks.to(q.dtype), vs.to(q.dtype), mask, scale, softcap, mask is None)
        out[:, sq.start:sq.start + sq.q_len] = o.transpose(1, 2)
