"""RMSNorm and LayerNorm, statistics in fp32."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float, out_dtype: torch.dtype) -> torch.Tensor:
    # x * rsqrt(mean(x^2) + eps) in fp32, as HF computes it (F.rms_norm is that formula in one op)
    xf = F.rms_norm(x.float(), (x.shape[-1],), eps=eps)
    if w.dtype == torch.float32 or out_dtype == torch.float32:
        return (xf * w.float()).to(out_dtype)
    # as HF Llama: cast back to the activation dtype, then scale in that dtype
    return xf.to(out_dtype) * w.to(out_dtype)


def layer_norm(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float, out_dtype: torch.dtype,
               fp32_stats: bool = False) -> torch.Tensor:
    """`fp32_stats`: mean and variance in fp32 whatever the input (Cohere's per-head norm); otherwise in the
    weight's dtype, as torch's layer_norm does (what HF runs)."""
    if fp32_stats:
        xf = x.float()
        mean = xf.mean(-1, keepdim=True)
        var = (xf - mean).pow(2).mean(-1, keepdim=True)
        y = (xf - mean) * torch.rsqrt(var + eps) * w.float()
        if b is not None:
            y = y + b.float()
        return y.to(out_dtype)
    y = F.layer_norm(x.to(w.dtype), (x.shape[-1],), w, b, eps)
    return y.to(out_dtype)
