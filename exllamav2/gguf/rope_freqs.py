"""Llama-3 rope scaling recovered from llama.cpp's rope_freqs tensor.

llama.cpp does not store Llama-3's rope scaling parameters; it stores the per-frequency divisors they
produce (rope_freqs.weight). HF needs the parameters, so this finds the factor (the largest divisor) and
checks that Llama 3.1's published low/high frequency factors and original context reproduce the tensor."""

import math

import numpy as np

from .errors import GGUFError

LOW_FREQ_FACTOR = 1.0
HIGH_FREQ_FACTOR = 4.0
ORIGINAL_CONTEXT = 8192


def _llama3_divisors(theta: float, dim: int, factor: float) -> np.ndarray:
    freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    wavelen = 2 * math.pi / freqs
    low_wavelen = ORIGINAL_CONTEXT / LOW_FREQ_FACTOR
    high_wavelen = ORIGINAL_CONTEXT / HIGH_FREQ_FACTOR
    smooth = (ORIGINAL_CONTEXT / wavelen - LOW_FREQ_FACTOR) / (HIGH_FREQ_FACTOR - LOW_FREQ_FACTOR)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)
    divisors = np.where(wavelen < high_wavelen, 1.0, divisors)
    return np.where(wavelen > low_wavelen, factor, divisors)


def llama3_rope_scaling(path: str, rope_freqs: np.ndarray, theta: float, head_dim: int) -> dict:
    rope_freqs = np.asarray(rope_freqs, dtype=np.float64).reshape(-1)
    if rope_freqs.size != head_dim // 2:
        raise GGUFError(f"{path}: rope_freqs.weight has {rope_freqs.size} values, expected head_dim/2 = {head_dim // 2}")
    # The file holds float32 divisors; published factors are round numbers.
    factor = round(float(rope_freqs.max()), 3)
    expected = _llama3_divisors(theta, head_dim, factor)
    if not np.allclose(rope_freqs, expected, rtol=1e-4, atol=1e-6):
        raise GGUFError(f"{path}: rope_freqs.weight does not match Llama-3 rope scaling with factor {factor}, "
                        f"low/high frequency factors {LOW_FREQ_FACTOR}/{HIGH_FREQ_FACTOR} and original context "
                        f"{ORIGINAL_CONTEXT}; this rope scaling is not supported")
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": LOW_FREQ_FACTOR,
            "high_freq_factor": HIGH_FREQ_FACTOR, "original_max_position_embeddings": ORIGINAL_CONTEXT}
