"""Attention over a contiguous KV prefix, and over a paged KV cache (packed tokens of several sequences)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q, k, v, mask, scale: float, softcap: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """q (b, hq, s, d); k, v (b, hk, t, d); mask bool (b, 1, s, t) or None. Causal alignment is bottom-right:
    query i sits at key position t - s + i."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    if hq != hk and s == 1 and (mask is None or mask.dim() < 4 or mask.shape[1] == 1):
        # one query per head (decode): fold each KV head's query group into the query axis so K/V are read
        # once instead of being copied per query head; the mask is per key, so it broadcasts unchanged (a mask
        # per query head takes the path below)
        out = attention(q.reshape(b, hk, hq // hk, d), k, v, mask, scale, softcap, False)
        return out.reshape(b, hq, 1, d)
    if hq != hk:
        k = k.repeat_interleave(hq // hk, dim=1)
        v = v.repeat_interleave(hq // hk, dim=1)
    t = k.shape[2]
    if softcap:
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        if mask is None and is_causal:
            mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return (scores.softmax(-1) @ v.float()).to(q.dtype)
    if is_causal and s != t:
        mask = torch.ones(s, t, dtype=torch.bool, device=q.device).tril(t - s)
        is_causal = False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale)


def window_mask(kv_len: int, q_len: int, sliding_window: int, device) -> torch.Tensor | None:
    """None when the window keeps every key; else a bool mask (1, 1, q_len, kv_len) for the last q_len queries."""
    if not sliding_window or kv_len <= sliding_window:
        return None
    qp = torch.arange(kv_len - q_len, kv_len, device=device).view(-1, 1)
    kp = torch.arange(kv_len, device=device).view(1, -1)
    return ((kp <= qp) & (qp - kp < sliding_window)).view(1, 1, q_len, kv_len)


_CPU_MODULES: list = []


def _cpu_modules():
    """(ops.dispatch, ops.cpu.attention), imported at first use: ops/cpu/attention.py imports this module."""
    if not _CPU_MODULES:
        from .. import dispatch
        from ..cpu import attention as cpu_attention
        _CPU_MODULES.extend((dispatch, cpu_attention))
    return _CPU_MODULES


def _slot_view(flat: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """flat (slots, hk, d)[start:start + n] as (1, hk, n, d)."""
    s0, s1, s2 = flat.stride()
    return flat.as_strided((1, flat.shape[1], n, flat.shape[2]), (s0 * n, s1, s0, s2),
                           flat.storage_offset() + start * s0)


def attend_sequence(qs, kflat, vflat, kv_len: int, slot_start: int | None, slots, mask, scale: float,
                    softcap: float) -> torch.Tensor:
    """One sequence of a paged forward: qs (1, hq, q_len, d), its last q_len positions, over its kv_len keys, read
    as consecutive cache slots from slot_start or gathered at `slots`; kflat/vflat (cache slots, hk, d). Returns
    (1, q_len, hq, d). Both paged paths (packed and decode-only) attend through here, so they agree to the bit.

    When the cpu backend is active, the queries go to its C++ kernel (ops/cpu/attention.py: torch's SDPA spends
    ~80 us per call setting up for one decode row), which computes each row alone, so a row's result is then the
    same however its prompt was cut into chunks, which depends on the other jobs of a step
    (tests/test_paged_chunk_invariance.py; SDPA's rows depend on the call's shape). Otherwise one call of
    `attention` here. Never a GPU backend: this is their reference."""
    if slot_start is not None:  # (1, hk, kv_len, d) views of the consecutive slots, each in one op
        ks, vs = _slot_view(kflat, slot_start, kv_len), _slot_view(vflat, slot_start, kv_len)
    else:
        ks, vs = kflat[slots].transpose(0, 1).unsqueeze(0), vflat[slots].transpose(0, 1).unsqueeze(0)
    if ks.dtype != qs.dtype:
        ks, vs = ks.to(qs.dtype), vs.to(qs.dtype)
    dispatch, cpu_attention = _cpu_modules()
    causal = mask is None and qs.shape[2] > 1
    if qs.device.type != "cpu" or "cpu" not in dispatch.active_backends() or not cpu_attention.takes(
            qs, ks, vs, None, softcap):
        return attention(qs, ks, vs, mask, scale, softcap, causal).transpose(1, 2)
    return cpu_attention.kernel(qs, ks, vs, mask, scale, softcap, causal).transpose(1, 2)


def paged_attention(q, k, v, k_pages, v_pages, params, sliding_window: int, scale: float,
                    softcap: float = 0.0) -> torch.Tensor:
    """q (1, T, hq, d), k and v (1, T, hk, d) after RoPE, for the packed tokens `params` (PagedParams or
    PagedDecodeParams) describes; k_pages/v_pages (1, slots, hk, d) the layer's cache (cache.py: page-major).
    Writes k/v into their slots (k = v = None: they are there already) and returns (1, T, hq * d). Each sequence
    attends to exactly its own keys, so its result does not depend on the batch."""
    kflat, vflat = k_pages[0], v_pages[0]  # (slots, hk, d)
    if k is not None:  # None: the caller wrote them with RoPE (attn.py, ops.rope_kv_write)
        slots = params.slots if params.slots.device == kflat.device else params.slots.to(kflat.device)
        # into the (1, slots, hk, d) caches themselves, not their [0] views: compiled, a write through a view of the
        # step's input became a copy of the layer's whole cache and back (~1 ms a SmolLM2 step)
        k_pages.index_copy_(1, slots, k if k.dtype == k_pages.dtype else k.to(k_pages.dtype))
        v_pages.index_copy_(1, slots, v if v.dtype == v_pages.dtype else v.to(v_pages.dtype))
    # one new token per sequence: built from device tensors (paged_attn.PagedDecodeParams, sequences None), or a
    # packed step whose sequences all feed one token (PagedParams.decode_only)
    if params.sequences is None or params.decode_only:
        # on the CPU with the cpu backend's kernels, every sequence in one C++ call, bit-identical to the op below
        # and to the per-sequence loop (which cost ~30-50 us of Python per layer)
        dispatch, cpu_attention = _cpu_modules()
        out = None
        if "cpu" in dispatch.active_backends() and cpu_attention.takes_paged_decode(
                q, kflat, vflat, params.block_index, params.kv_lens):
            out = cpu_attention.paged_decode(q[0], kflat, vflat, params.block_index, params.kv_lens, params.page_size,
                                             sliding_window or 0, scale, softcap)
        elif params.sequences is None:  # the packed step keeps its per-sequence loop (no host sync on a GPU)
            out = torch.ops.exllamav2.paged_decode_attention(q[0], kflat, vflat, params.block_index, params.kv_lens,
                                                             params.page_size, sliding_window or 0, scale, softcap)
        if out is not None:
            return out.reshape(1, params.seq_len, -1)
    outs = []
    for sq in params.sequences:
        qs = q[:, sq.start:sq.start + sq.q_len].transpose(1, 2)  # (1, hq, q_len, d)
        mask = sq.mask(sliding_window or 0, q.device)
        outs.append(attend_sequence(qs, kflat, vflat, sq.kv_len, sq.slot_start, sq.slots, mask, scale, softcap))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.reshape(1, params.seq_len, -1)


@torch.library.custom_op("exllamav2::paged_decode_attention", mutates_args=())
def paged_decode_attention(q: torch.Tensor, kflat: torch.Tensor, vflat: torch.Tensor, block_index: torch.Tensor,
                           kv_lens: torch.Tensor, page_size: int, sliding_window: int, scale: float,
                           softcap: float) -> torch.Tensor:
    """One new token per sequence: q (B, hq, d) over each sequence's kv_lens[i] keys through its block table row.
    A custom op so that a compiled decode step calls it as one opaque node: each sequence still attends alone,
    over exactly its own keys, as the packed path does (its lengths are read on the host here, outside the graph)."""
    lens = kv_lens.tolist()
    tables = block_index.tolist()
    outs = []
    for i, kv_len in enumerate(lens):
        n = -(-kv_len // page_size)
        pages = tables[i][:n]
        slot_start = slots = None
        if pages == list(range(pages[0], pages[0] + n)):
            slot_start = pages[0] * page_size
        else:
            pos = torch.arange(kv_len, device=kflat.device)
            slots = block_index[i].to(kflat.device)[pos // page_size] * page_size + pos % page_size
        mask = window_mask(kv_len, 1, sliding_window, q.device)
        qs = q[i:i + 1].unsqueeze(2)  # (1, hq, 1, d)
        outs.append(attend_sequence(qs, kflat, vflat, kv_len, slot_start, slots, mask, scale, softcap)[0, 0])
    return torch.stack(outs)


@paged_decode_attention.register_fake
def _(q, kflat, vflat, block_index, kv_lens, page_size, sliding_window, scale, softcap):
    return torch.empty_like(q)
