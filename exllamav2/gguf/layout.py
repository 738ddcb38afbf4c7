"""llama.cpp → HF tensor layout conventions, applied to row-major arrays (rows = output features)."""

import numpy as np


def unpermute_rotary_rows(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: per head, llama.cpp interleaves the two rotary halves
    (HF order [x0..x(d/2-1), x(d/2)..x(d-1)] becomes pairs); this restores HF order. Works on any
    trailing shape, so on dequantised weights, biases and raw quantized rows alike (quant blocks lie
    along a row, never across rows)."""
    half = rows.shape[0] // num_heads // 2
    if half * 2 * num_heads != rows.shape[0]:
        raise ValueError(f"{rows.shape[0]} rows do not split into {num_heads} heads of rotary pairs")
    grouped = rows.reshape(num_heads, half, 2, *rows.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(rows.shape)
