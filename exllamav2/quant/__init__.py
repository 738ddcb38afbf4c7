"""Quantized weight formats: EXL2 and 4-bit GPTQ, detected by tensor name (survey §4.9)."""

from __future__ import annotations

import torch

from .exl2 import QuantFormatError, exl2_dequantize, exl2_pack, read_exl2, strip_prefix
from .gptq import gptq_dequantize, gptq_quantize, read_gptq
from .weight import DENSE_THRESHOLD_ROWS, Exl2Weight, GptqWeight, QuantWeight

__all__ = [
    "QuantFormatError", "QuantWeight", "Exl2Weight", "GptqWeight", "make_quant_weight", "detect_quant_format",
    "exl2_dequantize", "exl2_pack", "gptq_dequantize", "gptq_quantize", "DENSE_THRESHOLD_ROWS",
]


def detect_quant_format(tensors: dict[str, torch.Tensor], key: str = "") -> str | None:
    """"exl2" if q_weight is present, "gptq" if qweight is, else None."""
    names = strip_prefix(tensors, key)
    if "q_weight" in names:
        return "exl2"
    if "qweight" in names:
        return "gptq"
    return None


def make_quant_weight(key: str, tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                      dtype: torch.dtype, device: str, checkpoint_offset_qzeros: bool = False,
                      **options) -> QuantWeight:
    """Validate a quantized tensor set for the linear layer `key` and prepare it for forward().

    tensors: keyed by suffix ("q_weight", ...) or by full name ("<key>.q_weight"); "bias" is applied by forward.
    checkpoint_offset_qzeros: True for GPTQ checkpoint_format "gptq_v2" (zero = z, not z + 1).
    options: precision (torch.float16 default, as the original; or torch.float32), fast_path (True: repack for
    the CPU int4 kernel), dense_prefill (False: with True, bf16 calls of more than dense_threshold rows use dense
    GEMM on a kept bf16 copy), dense_threshold (rows, default 32).
    """
    fmt = detect_quant_format(tensors, key)
    if fmt == "exl2":
        t = read_exl2(tensors, key, in_features, out_features)
        return Exl2Weight(key, t, dtype, device, **options)
    if fmt == "gptq":
        t = read_gptq(tensors, key, in_features, out_features, offset_qzeros=checkpoint_offset_qzeros)
        return GptqWeight(key, t, dtype, device, **options)
    raise QuantFormatError(f"{key}: no quantized weight found (expected {key}.q_weight for EXL2 or {key}.qweight for GPTQ), "
                           f"got {sorted(tensors)}")
