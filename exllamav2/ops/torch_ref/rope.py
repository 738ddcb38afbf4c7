"""Rotary embedding applied to (b, s, heads, head_dim) with cos/sin already gathered per position."""

from __future__ import annotations

import torch


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """cos, sin: (b, s, 1, rot_dim); channels past rot_dim pass through. `interleaved`: GPT-J pairs (0,1), (2,3)...
    instead of NeoX halves."""
    rd = cos.shape[-1]
    xr, xp = (x, None) if rd == x.shape[-1] else (x[..., :rd], x[..., rd:])
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack((-x2, x1), dim=-1).flatten(-2)
    else:
        half = rd // 2
        rot = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    out = xr * cos + rot * sin
    return out if xp is None else torch.cat((out, xp), dim=-1)
