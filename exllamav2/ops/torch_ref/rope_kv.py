"""RoPE on the q|k heads of a fused qkv output plus the KV-cache write (attend's plain-cache path, exllamav2/attn.py)."""

from __future__ import annotations

import torch

from .rope import rope


def rope_kv_write(qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                  k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor, q_heads: int) -> torch.Tensor:
    """qk (b, s, q_heads + kv_heads, d) rotated by cos/sin (rope.py); its k heads and v (b, s, kv_heads, d) are written
    into k_cache/v_cache (b, positions, kv_heads, d) at positions `index` (s,); returns the rotated q heads (a view).
    index_copy_, not a slice assignment: compiled, a slice assignment at a symbolic offset copies the whole buffer."""
    qk = rope(qk, cos, sin, interleaved)
    k = qk[:, :, q_heads:]
    k_cache.index_copy_(1, index, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype))
    v_cache.index_copy_(1, index, v if v.dtype == v_cache.dtype else v.to(v_cache.dtype))
    return qk[:, :, :q_heads]
