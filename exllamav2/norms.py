"""Pick the norm class an architecture uses."""

from __future__ import annotations


def make_norm(model, key: str, archparams, size: int | None = None, output_fp32: bool = False):
    from .layernorm import ExLlamaV2LayerNorm
    from .rmsnorm import ExLlamaV2RMSNorm
    cls = ExLlamaV2LayerNorm if archparams.norm == "layernorm" else ExLlamaV2RMSNorm
    return cls(model, key, archparams, size=size, output_fp32=output_fp32)
