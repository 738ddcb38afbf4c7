"""Little-endian bitstreams packed into int32 words, one stream per output column.

Value i of a stream with per-value widths occupies stream bits [off_i, off_i + b_i); stream bit j lives in word j // 32
at bit j % 32 (survey §4.3). Words are stored as int32 on disk and read as uint32.
"""

from __future__ import annotations

import torch

_U32 = 0xFFFFFFFF
_ROW_BLOCK = 2048  # bounds the int64 temporaries of unpack to 2 x 2048 x N


def words_to_u32(words: torch.Tensor) -> torch.Tensor:
    """int32 words -> int64 holding the unsigned 32-bit value."""
    return words.to(torch.int64) & _U32


def u32_to_words(values: torch.Tensor) -> torch.Tensor:
    """int64 in [0, 2^32) -> int32 with the same bit pattern."""
    values = values & _U32
    return torch.where(values >= 2**31, values - 2**32, values).to(torch.int32)


def unpack_bitstream(words: torch.Tensor, bit_offsets: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Read values from a (num_words, N) int32 tensor.

    bit_offsets, widths: (K,) int64, the stream position and width of every value (row).
    Returns (K, N) int64 codes in [0, 2^width).
    """
    u = words_to_u32(words)
    num_words = u.shape[0]
    out = torch.empty((bit_offsets.shape[0], u.shape[1]), dtype=torch.int64, device=u.device)
    for a in range(0, bit_offsets.shape[0], _ROW_BLOCK):
        off = bit_offsets[a:a + _ROW_BLOCK].to(u.device)
        b = widths[a:a + _ROW_BLOCK].to(u.device)
        word = off // 32
        shift = (off % 32).unsqueeze(1)
        lo = u.index_select(0, word)
        hi = u.index_select(0, (word + 1).clamp(max=num_words - 1))
        # The word after a value's first word only matters when the value straddles; (hi << 32-shift) lands above
        # the mask otherwise. int64 wrap-around of hi << 32 only touches bits the mask drops.
        v = (lo >> shift) | (hi << (32 - shift))
        out[a:a + _ROW_BLOCK] = v & ((1 << b) - 1).unsqueeze(1)
    return out


def pack_bitstream(codes: torch.Tensor, bit_offsets: torch.Tensor, widths: torch.Tensor, num_words: int) -> torch.Tensor:
    """Inverse of unpack_bitstream: (K, N) codes -> (num_words, N) int32. Bits not covered by any value are zero."""
    codes = codes.to(torch.int64)
    off = bit_offsets.to(codes.device)
    b = widths.to(codes.device)
    if ((codes < 0) | (codes >= (1 << b).unsqueeze(1))).any():
        raise ValueError("pack_bitstream: a code does not fit its bit width")
    word = off // 32
    shift = (off % 32).unsqueeze(1)
    acc = torch.zeros((num_words, codes.shape[1]), dtype=torch.int64, device=codes.device)
    # Fields never overlap, so adding them is the same as OR-ing them.
    acc.index_add_(0, word, (codes << shift) & _U32)
    straddle = (off % 32 + b) > 32
    if straddle.any():
        rows = straddle.nonzero().squeeze(1)
        acc.index_add_(0, word[rows] + 1, codes[rows] >> (32 - shift[rows]))
    return u32_to_words(acc)


def unpack_nibble_columns(words: torch.Tensor, columns: int | None = None) -> torch.Tensor:
    """(R, C/8) int32, 8 columns per word, low nibble first -> (R, C) int64 in [0, 16)."""
    u = words_to_u32(words)
    shifts = torch.arange(0, 32, 4, device=u.device)
    v = ((u.unsqueeze(-1) >> shifts) & 15).reshape(u.shape[0], u.shape[1] * 8)
    return v if columns is None else v[:, :columns]


def pack_nibble_columns(codes: torch.Tensor) -> torch.Tensor:
    """(R, C) codes in [0, 16), C a multiple of 8 -> (R, C/8) int32, low nibble first."""
    codes = codes.to(torch.int64)
    if codes.shape[1] % 8:
        raise ValueError(f"pack_nibble_columns: {codes.shape[1]} columns is not a multiple of 8")
    if ((codes < 0) | (codes > 15)).any():
        raise ValueError("pack_nibble_columns: a code is outside [0, 16)")
    shifts = torch.arange(0, 32, 4, device=codes.device)
    return u32_to_words((codes.reshape(codes.shape[0], -1, 8) << shifts).sum(-1))
