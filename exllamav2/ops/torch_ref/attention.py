"""Attention over a contiguous KV prefix, and over a paged KV cache (packed tokens of several sequences)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q, k, v, mask, scale: float, softcap: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """q (b, hq, s, d); k, v (b, hk, t, d); mask bool (b, 1, s, t) or None. Causal alignment is bottom-right:
    query i sits at key position t - s + i."""
    b, hq, s, d = q.shape
    hk = k.shape[1]
    if hq != hk and s == 1:
        # one query per head (decode): fold each KV head's query group into the query axis so K/V are read
        # once instead of being copied per query head; the mask is per key, so it broadcasts unchanged
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


def paged_attention(q, k, v, k_pages, v_pages, params, sliding_window: int, scale: float,
                    softcap: float = 0.0) -> torch.Tensor:
    """q (1, T, hq, d), k and v (1, T, hk, d) after RoPE, for the packed tokens `params` (PagedParams)
    describes; k_pages/v_pages (1, hk, slots, d) the layer's cache. Writes k/v into their slots and returns
    (1, T, hq * d). Each sequence attends to exactly its own keys, so its result does not depend on the batch."""
    kflat, vflat = k_pages[0], v_pages[0]  # (hk, slots, d)
    slots = params.slots.to(kflat.device)
    kflat.index_copy_(1, slots, k[0].transpose(0, 1).to(kflat.dtype))
    vflat.index_copy_(1, slots, v[0].transpose(0, 1).to(vflat.dtype))
    outs = []
    for sq in params.sequences:
        qs = q[:, sq.start:sq.start + sq.q_len].transpose(1, 2)  # (1, hq, q_len, d)
        if sq.slot_start is not None:
            ks = kflat[:, sq.slot_start:sq.slot_start + sq.kv_len].unsqueeze(0)
            vs = vflat[:, sq.slot_start:sq.slot_start + sq.kv_len].unsqueeze(0)
        else:
            idx = sq.slots.to(kflat.device)
            ks, vs = kflat[:, idx].unsqueeze(0), vflat[:, idx].unsqueeze(0)
        mask = sq.mask(sliding_window or 0, q.device)
        o = attention(qs, ks.to(q.dtype), vs.to(q.dtype), mask, scale, softcap, mask is None and sq.q_len > 1)
        outs.append(o.transpose(1, 2))
    out = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return out.reshape(1, params.seq_len, -1)
