"""Host side of the Triton attention kernels (attn_kernels.py): the launches of one attention call over its
metadata (attn_meta.py), the KV write, and the prefill switch. Used by attention.py and attention_paged.py."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from . import attn_meta, interpreting, kernels

PREFILL_ENV = "EXLLAMAV2_TRITON_PREFILL"


def prefill_impl() -> str:
    """EXLLAMAV2_TRITON_PREFILL: "triton" (default) runs prompts (more than attn_meta.DECODE_MAX_Q new tokens)
    through our flash kernel; "sdpa" hands them to torch SDPA (the contiguous op) or the reference's per-sequence
    path (the paged op). The default was chosen without a GPU to measure on; bench/gpu/bench_attention.py times
    both."""
    v = os.environ.get(PREFILL_ENV, "triton").strip().lower() or "triton"
    if v not in ("triton", "sdpa"):
        raise ValueError(f"{PREFILL_ENV}={v!r}: expected 'triton' or 'sdpa'")
    return v


@dataclass
class QuantLayout:
    """Quantized pages for `launch`: the scales (slots, kv_heads, head_dim / 32) of K and V (any tensor when the
    format has none), the kernel's format codes (attn_kernels.py: 0 float, 4 / 8 group codes, 2 FP8 e5m2) and the
    scales' (head, slot) strides."""
    k_scales: torch.Tensor
    v_scales: torch.Tensor
    k_fmt: int
    v_fmt: int
    ks_strides: tuple
    vs_strides: tuple


def dot_flags(dtype: torch.dtype) -> tuple[bool, bool]:
    """(DOT_F32, IEEE): the interpreter's tl.dot is wrong on bf16, so interpreted bf16 dots run in fp32; fp32
    inputs use exact fp32 products (not TF32) so that fp32 matches the reference."""
    dot_f32 = interpreting() and dtype == torch.bfloat16
    return dot_f32, dot_f32 or dtype == torch.float32


def launch(meta: attn_meta.AttnMeta, q, kc, vc, out, mask, block_table, *, q_strides, k_strides, v_strides,
           o_strides, m_strides, paged: bool, page_size: int, max_kv_len: int, scale: float, softcap: float,
           window: int, causal: bool, quant: QuantLayout | None = None):
    """Runs attn_fwd (and attn_combine for split sequences) over `meta`'s launches. Strides are given per
    (sequence, token, head) for q/out, per (sequence, head, slot) for K/V and per (sequence, query, key) for the
    mask; the head dim is contiguous. `block_table` (paged) maps a sequence's key position to its slot. `quant`:
    kc/vc hold quantized pages (codes), described there."""
    kern = kernels("attn_kernels")
    hq, d = q.shape[-2] if paged else q.shape[1], q.shape[-1]
    hk = kc.shape[1]  # paged: (slots, hk, width); contiguous: (b, hk, t, d)
    group = hq // hk
    bd = attn_meta.block_d(d)
    dot_f32, ieee = dot_flags(q.dtype)
    dummy = meta.q_lens
    qz = quant or QuantLayout(dummy, dummy, 0, 0, (0, 0), (0, 0))
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
            q, kc, vc, qz.k_scales, qz.v_scales, out, part_o, part_l, mask if mask is not None else dummy,
            block_table if block_table is not None else dummy, meta.kv_lens, meta.q_starts, meta.q_lens,
            meta.part_base, ln.tile_seq, ln.tile_m,
            *q_strides, *k_strides, *v_strides, *qz.ks_strides, *qz.vs_strides, *o_strides, *m_strides,
            block_table.stride(0) if block_table is not None else 0, po_s[0], po_s[1], po_s[2], pl_s[0], pl_s[1],
            page_size, d, float(scale), float(softcap or 1.0), int(window),
            G=group, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=bd, PAGED=paged, CAUSAL=causal,
            HAS_MASK=mask is not None, HAS_WINDOW=window > 0, SOFTCAP=bool(softcap), SPLIT=ln.split,
            MIN_SPLIT=attn_meta.MIN_SPLIT, MAX_SPLITS=attn_meta.MAX_SPLITS, DOT_F32=dot_f32, IEEE=ieee,
            WHILE_LOOP=interpreting(), K_FMT=qz.k_fmt, V_FMT=qz.v_fmt, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages)
        if ln.split:
            kern.attn_combine[(ln.num_rows, hq)](
                part_o, part_l, out, ln.part_seq, ln.part_tok, meta.kv_lens, meta.q_starts,
                po_s[0], po_s[1], po_s[2], pl_s[0], pl_s[1], *o_strides, d,
                BLOCK_N=cfg.block_n, BLOCK_D=bd, MIN_SPLIT=attn_meta.MIN_SPLIT, MAX_SPLITS=attn_meta.MAX_SPLITS,
                num_warps=4)


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def kv_write(k, v, kflat, vflat, slots) -> None:
    """k, v (T, hk, d) into kflat/vflat (slots, hk, d) at slots (T,)."""
    T, hk, d = k.shape
    if T == 0:
        return
    kernels("attn_kernels").kv_write[(T, hk)](
        k, v, kflat, vflat, slots, k.stride(0), k.stride(1), v.stride(0), v.stride(1), kflat.stride(1),
        kflat.stride(0), vflat.stride(1), vflat.stride(0), d, BLOCK_D=attn_meta.block_d(d), num_warps=1)
