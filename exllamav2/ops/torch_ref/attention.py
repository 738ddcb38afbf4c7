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
    (1, T, hq * d). Sequences that feed the same number of tokens share one attention call: their keys are
    gathered from the pages with a mask for causality, length and sliding window."""
    kflat, vflat = k_pages[0], v_pages[0]  # (hk, slots, d)
    slots = params.slots.to(kflat.device)
    kflat.index_copy_(1, slots, k[0].transpose(0, 1).to(kflat.dtype))
    vflat.index_copy_(1, slots, v[0].transpose(0, 1).to(vflat.dtype))
    hq, d = q.shape[2], q.shape[3]
    out = None
    for g in params.groups:
        n, q_len = g.q_index.shape
        if g.whole:
            qg = q[0].view(n, q_len, hq, d).transpose(1, 2)
        else:
            qg = q[0][g.q_index].transpose(1, 2)  # (n, hq, q_len, d)
        if g.slot_start is not None:
            L = g.key_pos.shape[0]
            kg = kflat[:, g.slot_start:g.slot_start + L].unsqueeze(0)  # (1, hk, L, d)
            vg = vflat[:, g.slot_start:g.slot_start + L].unsqueeze(0)
        else:
            kg = kflat[:, g.kv_slots].transpose(0, 1)  # (n, hk, L, d)
            vg = vflat[:, g.kv_slots].transpose(0, 1)
        mask = g.mask(sliding_window or 0, q.device)
        o = attention(qg, kg.to(q.dtype), vg.to(q.dtype), mask, scale, softcap, mask is None and q_len > 1)
        if g.whole:
            return o.transpose(1, 2).reshape(1, params.seq_len, hq * d)
        if out is None:
            out = torch.empty(params.seq_len, hq, d, dtype=q.dtype, device=q.device)
        out[g.q_index] = o.transpose(1, 2)
    return out.reshape(1, params.seq_len, hq * d)
