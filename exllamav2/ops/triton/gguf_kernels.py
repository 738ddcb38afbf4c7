"""Triton kernels over GGUF quant blocks as the file stores them (the launcher: exllamav2/ops/triton/gguf_linear.py):
- `gguf_matmul_partials`: few rows; weight tiles decoded in registers and fed to `tl.dot`, one fp32 partial per
  split of the K tiles (the split comes from the matrix shape; linear_kernels.splitk_reduce adds the partials in a
  fixed order);
- `gguf_dequant`: the (in, out) matrix into a scratch buffer, for calls with many rows.

The weight is a uint8 tensor (N, row_bytes), one row of blocks per output feature; `w16` is the same storage seen
as float16 (every block's fp16 fields sit at even offsets, every block size is even). Layouts (little endian),
with w the weight at index j of its block:
- Q4_0 (32 weights, 18 bytes): d, qs[16];       w = d * (q - 8), q of j<16 the low nibble of qs[j], else the high
                                                nibble of qs[j-16]
- Q4_1 (32, 20): d, m, qs[16];                  w = d * q + m (nibbles as Q4_0)
- Q5_0 (32, 22): d, qh[4], qs[16];               w = d * (q - 16), q the Q4_0 nibble with bit j of qh (little
                                                endian uint32) as its fifth bit
- Q5_1 (32, 24): d, m, qh[4], qs[16];           w = d * q + m (q as Q5_0)
- Q8_0 (32, 34): d, int8 qs[32];                w = d * q
- Q4_K (256, 144): d, dmin, scales[12], qs[128]; 8 sub-blocks of 32 with 6-bit scale sc and min mn packed in
  `scales`; sub-block s uses the low (s even) or high nibbles of qs[32 * (s // 2) ...]; w = (d * sc) * q - dmin * mn
- Q5_K (256, 176): as Q4_K plus qh[32] before qs: bit s of qh[j % 32] is the fifth bit of q
- Q6_K (256, 210): ql[128], qh[64], int8 scales[16], d; 16 sub-blocks of 16; w = (d * scale) * (q - 32)
- Q2_K (256, 84): scales[16], qs[64], d, dmin; 16 sub-blocks of 16, scales[s] holds the 4-bit scale sc (low nibble)
  and min mn (high); bits 2 * ((j % 128) // 32) of qs[32 * (j // 128) + j % 32] are q; w = (d * sc) * q - dmin * mn
- Q3_K (256, 110): hmask[32], qs[64], scales[12], d; 16 sub-blocks of 16 with 6-bit scales (low 4 bits in nibble
  s // 8 of scales[s % 8], high 2 bits in bits 2 * (s // 4) of scales[8 + s % 4]); q the Q2_K 2-bit code minus 4
  unless bit j // 32 of hmask[j % 32] is set; w = (d * (sc - 32)) * q
- IQ4_NL (32, 18): d, qs[16];                  w = d * KVALUES[q] (nibbles as Q4_0)
- IQ4_XS (256, 136): d, uint16 scales_h, scales_l[4], qs[128]; 8 sub-blocks of 32, sub-block s's 6-bit scale ls
  the nibble s % 2 of scales_l[s // 2] below bits 2s, 2s + 1 of scales_h, its nibbles as IQ4_NL's in qs[16 s ...];
  w = (d * (ls - 32)) * KVALUES[q]
KVALUES (IQ4_NL and IQ4_XS) = -127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113.
- the lattice types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M), re-encoded at load by the CPU kernels
  (exllamav2/ops/cpu/csrc/gguf_lut_blocks.cpp) as 4-bit table blocks (256, 146): d, scales[16] (the odd factor of
  each 16 weights' scale), qs[128] (32 weights per 16 bytes, nibbles as Q4_0's); w = (d * scale) * T[q] * 2^-e with
  the type's table T and exponent e (LUT_* below: IQ2 8/25/43 and e = 3, IQ3_XXS 4..62 and 2, IQ3_S 1..15 and 0,
  IQ1 8 * (grid +- 1/8) = 1/7/9 and 3), each weight's sign in its code (T holds m_i at 8 + i, -m_i at 7 - i)
The arithmetic (fp32, the same association) is that of gguf-py's `gguf.quants.dequantize`, so the interpreter
reproduces it bit for bit; a GPU may contract a multiply-add into an FMA.
"""

import triton
import triton.language as tl

# block type codes (QTYPE_CODES below)
Q4_0 = tl.constexpr(0)
Q4_1 = tl.constexpr(1)
Q8_0 = tl.constexpr(2)
Q4_K = tl.constexpr(3)
Q5_K = tl.constexpr(4)
Q6_K = tl.constexpr(5)
Q5_0 = tl.constexpr(6)
Q5_1 = tl.constexpr(7)
Q2_K = tl.constexpr(8)
Q3_K = tl.constexpr(9)
IQ4_NL = tl.constexpr(10)
IQ4_XS = tl.constexpr(11)
LUT_IQ2 = tl.constexpr(12)     # the 4-bit table blocks of the lattice types, one code per table
LUT_IQ3_XXS = tl.constexpr(13)
LUT_IQ3_S = tl.constexpr(14)
LUT_IQ1 = tl.constexpr(15)


def _halves(table):
    """A 16-entry table as two int64 constants of eight bytes each (byte i: entry i): the negated first half and
    the second half, so that every byte, the top one included, is below 128 and neither overflows int64
    (_table_value reads them)."""
    return (tl.constexpr(sum(-v << (8 * i) for i, v in enumerate(table[:8]))),
            tl.constexpr(sum(v << (8 * i) for i, v in enumerate(table[8:]))))


def _lattice(mags):
    """A lattice type's table: magnitudes m_i at 8 + i, -m_i at 7 - i, the unused entries 0."""
    table = [0] * 16
    for i, m in enumerate(mags):
        table[8 + i], table[7 - i] = m, -m
    return table


IQ4_NEG, IQ4_POS = _halves((-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113))  # KVALUES
IQ2_NEG, IQ2_POS = _halves(_lattice((8, 25, 43)))
IQ3XXS_NEG, IQ3XXS_POS = _halves(_lattice((4, 12, 20, 28, 36, 44, 52, 62)))
IQ3S_NEG, IQ3S_POS = _halves(_lattice((1, 3, 5, 7, 9, 11, 13, 15)))
IQ1_NEG, IQ1_POS = _halves(_lattice((1, 7, 9)))


@triton.jit
def _signed_byte(b):
    """A uint8 value (held in int32) read as int8."""
    return b - ((b >> 7) << 8)


@triton.jit
def _decode_q4_0(w8, w16, row0, k, mask):
    base = row0 + (k // 32) * 18
    j = k % 32
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(w8 + base + 2 + (j % 16), mask=mask, other=0).to(tl.int32)
    q = (b >> ((j // 16) * 4)) & 15
    return d * (q - 8).to(tl.float32)


@triton.jit
def _decode_q4_1(w8, w16, row0, k, mask):
    base = row0 + (k // 32) * 20
    j = k % 32
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(w16 + base // 2 + 1, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(w8 + base + 4 + (j % 16), mask=mask, other=0).to(tl.int32)
    q = (b >> ((j // 16) * 4)) & 15
    return d * q.to(tl.float32) + m


@triton.jit
def _q5_nibble(w8, base, j, mask):
    """The 5-bit q of weight j of a Q5_0/Q5_1 block whose qh starts at `base` (qs follows it)."""
    h = tl.load(w8 + base + j // 8, mask=mask, other=0).to(tl.int32)
    b = tl.load(w8 + base + 4 + (j % 16), mask=mask, other=0).to(tl.int32)
    return ((b >> ((j // 16) * 4)) & 15) | (((h >> (j % 8)) & 1) << 4)


@triton.jit
def _decode_q5_0(w8, w16, row0, k, mask):
    base = row0 + (k // 32) * 22
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    q = _q5_nibble(w8, base + 2, k % 32, mask)
    return d * (q - 16).to(tl.float32)


@triton.jit
def _decode_q5_1(w8, w16, row0, k, mask):
    base = row0 + (k // 32) * 24
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(w16 + base // 2 + 1, mask=mask, other=0.0).to(tl.float32)
    q = _q5_nibble(w8, base + 4, k % 32, mask)
    return d * q.to(tl.float32) + m


@triton.jit
def _decode_q8_0(w8, w16, row0, k, mask):
    base = row0 + (k // 32) * 34
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(w8 + base + 2 + (k % 32), mask=mask, other=0).to(tl.int32)
    return d * _signed_byte(b).to(tl.float32)


@triton.jit
def _k_scale_min(w8, base, s, mask):
    """The 6-bit scale and min of sub-block s (0..7) of a Q4_K/Q5_K super-block whose scales start at `base`."""
    lo = tl.load(w8 + base + s, mask=mask, other=0).to(tl.int32)             # scales[s]
    hi = tl.load(w8 + base + 4 + s, mask=mask, other=0).to(tl.int32)         # scales[s + 4]
    top = tl.load(w8 + base + (s & 3), mask=mask, other=0).to(tl.int32)      # scales[s - 4] when s >= 4
    upper = s >= 4
    sc = tl.where(upper, (hi & 15) | ((top >> 6) << 4), lo & 63)
    mn = tl.where(upper, (hi >> 4) | ((lo >> 6) << 4), hi & 63)
    return sc, mn


@triton.jit
def _decode_q4_k(w8, w16, row0, k, mask):
    base = row0 + (k // 256) * 144
    j = k % 256
    s = j // 32
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    dmin = tl.load(w16 + base // 2 + 1, mask=mask, other=0.0).to(tl.float32)
    sc, mn = _k_scale_min(w8, base + 4, s, mask)
    b = tl.load(w8 + base + 16 + (j // 64) * 32 + (j % 32), mask=mask, other=0).to(tl.int32)
    q = (b >> ((s & 1) * 4)) & 15
    return (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)


@triton.jit
def _decode_q5_k(w8, w16, row0, k, mask):
    base = row0 + (k // 256) * 176
    j = k % 256
    s = j // 32
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    dmin = tl.load(w16 + base // 2 + 1, mask=mask, other=0.0).to(tl.float32)
    sc, mn = _k_scale_min(w8, base + 4, s, mask)
    h = tl.load(w8 + base + 16 + (j % 32), mask=mask, other=0).to(tl.int32)
    b = tl.load(w8 + base + 48 + (j // 64) * 32 + (j % 32), mask=mask, other=0).to(tl.int32)
    q = ((b >> ((s & 1) * 4)) & 15) | (((h >> s) & 1) << 4)
    return (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)


@triton.jit
def _decode_q6_k(w8, w16, row0, k, mask):
    base = row0 + (k // 256) * 210
    j = k % 256
    half = j // 128
    g = (j % 128) // 32     # which of the four 32-weight groups of the half
    l = j % 32
    d = tl.load(w16 + base // 2 + 104, mask=mask, other=0.0).to(tl.float32)
    sc = _signed_byte(tl.load(w8 + base + 192 + j // 16, mask=mask, other=0).to(tl.int32))
    lo = tl.load(w8 + base + half * 64 + (g & 1) * 32 + l, mask=mask, other=0).to(tl.int32)
    hi = tl.load(w8 + base + 128 + half * 32 + l, mask=mask, other=0).to(tl.int32)
    q = ((lo >> ((g >> 1) * 4)) & 15) | (((hi >> (g * 2)) & 3) << 4)
    return (d * sc.to(tl.float32)) * (q - 32).to(tl.float32)


@triton.jit
def _decode_q2_k(w8, w16, row0, k, mask):
    base = row0 + (k // 256) * 84
    j = k % 256
    d = tl.load(w16 + base // 2 + 40, mask=mask, other=0.0).to(tl.float32)
    dmin = tl.load(w16 + base // 2 + 41, mask=mask, other=0.0).to(tl.float32)
    sm = tl.load(w8 + base + j // 16, mask=mask, other=0).to(tl.int32)
    b = tl.load(w8 + base + 16 + (j // 128) * 32 + (j % 32), mask=mask, other=0).to(tl.int32)
    q = (b >> (((j % 128) // 32) * 2)) & 3
    return (d * (sm & 15).to(tl.float32)) * q.to(tl.float32) - dmin * (sm >> 4).to(tl.float32)


@triton.jit
def _decode_q3_k(w8, w16, row0, k, mask):
    base = row0 + (k // 256) * 110
    j = k % 256
    s = j // 16
    d = tl.load(w16 + base // 2 + 54, mask=mask, other=0.0).to(tl.float32)
    lo = tl.load(w8 + base + 96 + (s % 8), mask=mask, other=0).to(tl.int32)
    hi = tl.load(w8 + base + 104 + (s % 4), mask=mask, other=0).to(tl.int32)
    sc = (((lo >> ((s // 8) * 4)) & 15) | (((hi >> ((s // 4) * 2)) & 3) << 4)) - 32
    b = tl.load(w8 + base + 32 + (j // 128) * 32 + (j % 32), mask=mask, other=0).to(tl.int32)
    h = tl.load(w8 + base + (j % 32), mask=mask, other=0).to(tl.int32)
    q = ((b >> (((j % 128) // 32) * 2)) & 3) - (((h >> (j // 32)) & 1) ^ 1) * 4
    return (d * sc.to(tl.float32)) * q.to(tl.float32)


@triton.jit
def _table_value(q, NEG: tl.constexpr, POS: tl.constexpr):
    """Entry q (0..15, int32) of a table given as its negated first half and its second half, a byte an entry."""
    low = q < 8
    v = ((tl.where(low, NEG, POS) >> ((q & 7) * 8)) & 255).to(tl.int32)
    return tl.where(low, -v, v)


@triton.jit
def _decode_lut4(w8, w16, row0, k, mask, NEG: tl.constexpr, POS: tl.constexpr, SHIFT: tl.constexpr):
    base = row0 + (k // 256) * 146
    j = k % 256
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    sc = tl.load(w8 + base + 2 + j // 16, mask=mask, other=0).to(tl.float32)
    b = tl.load(w8 + base + 18 + (j // 32) * 16 + (j % 16), mask=mask, other=0).to(tl.int32)
    q = (b >> (((j % 32) // 16) * 4)) & 15
    return (d * sc) * _table_value(q, NEG, POS).to(tl.float32) * (1.0 / (1 << SHIFT))


@triton.jit
def _decode_iq4_nl(w8, w16, row0, k, mask):
    base = row0 + (k // 32) * 18
    j = k % 32
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(w8 + base + 2 + (j % 16), mask=mask, other=0).to(tl.int32)
    return d * _table_value((b >> ((j // 16) * 4)) & 15, IQ4_NEG, IQ4_POS).to(tl.float32)


@triton.jit
def _decode_iq4_xs(w8, w16, row0, k, mask):
    base = row0 + (k // 256) * 136
    j = k % 256
    s = j // 32
    d = tl.load(w16 + base // 2, mask=mask, other=0.0).to(tl.float32)
    hi = tl.load(w8 + base + 2 + s // 4, mask=mask, other=0).to(tl.int32)        # scales_h, little endian
    lo = tl.load(w8 + base + 4 + s // 2, mask=mask, other=0).to(tl.int32)        # scales_l[s // 2]
    ls = (((lo >> ((s % 2) * 4)) & 15) | (((hi >> ((s % 4) * 2)) & 3) << 4)) - 32
    b = tl.load(w8 + base + 8 + s * 16 + (j % 16), mask=mask, other=0).to(tl.int32)
    q = (b >> (((j % 32) // 16) * 4)) & 15
    return (d * ls.to(tl.float32)) * _table_value(q, IQ4_NEG, IQ4_POS).to(tl.float32)


@triton.jit
def _decode(w8, w16, n, k, row_bytes, mask, QTYPE: tl.constexpr):
    """fp32 weights W[n, k] (n, k: broadcastable index tensors)."""
    row0 = n.to(tl.int64) * row_bytes
    if QTYPE == Q4_0:
        w = _decode_q4_0(w8, w16, row0, k, mask)
    elif QTYPE == Q4_1:
        w = _decode_q4_1(w8, w16, row0, k, mask)
    elif QTYPE == Q8_0:
        w = _decode_q8_0(w8, w16, row0, k, mask)
    elif QTYPE == Q4_K:
        w = _decode_q4_k(w8, w16, row0, k, mask)
    elif QTYPE == Q5_K:
        w = _decode_q5_k(w8, w16, row0, k, mask)
    elif QTYPE == Q5_0:
        w = _decode_q5_0(w8, w16, row0, k, mask)
    elif QTYPE == Q5_1:
        w = _decode_q5_1(w8, w16, row0, k, mask)
    elif QTYPE == Q2_K:
        w = _decode_q2_k(w8, w16, row0, k, mask)
    elif QTYPE == Q3_K:
        w = _decode_q3_k(w8, w16, row0, k, mask)
    elif QTYPE == IQ4_NL:
        w = _decode_iq4_nl(w8, w16, row0, k, mask)
    elif QTYPE == IQ4_XS:
        w = _decode_iq4_xs(w8, w16, row0, k, mask)
    elif QTYPE == LUT_IQ2:
        w = _decode_lut4(w8, w16, row0, k, mask, IQ2_NEG, IQ2_POS, 3)
    elif QTYPE == LUT_IQ3_XXS:
        w = _decode_lut4(w8, w16, row0, k, mask, IQ3XXS_NEG, IQ3XXS_POS, 2)
    elif QTYPE == LUT_IQ3_S:
        w = _decode_lut4(w8, w16, row0, k, mask, IQ3S_NEG, IQ3S_POS, 0)
    elif QTYPE == LUT_IQ1:
        w = _decode_lut4(w8, w16, row0, k, mask, IQ1_NEG, IQ1_POS, 3)
    else:
        w = _decode_q6_k(w8, w16, row0, k, mask)
    return w


@triton.jit
def gguf_matmul_partials(x_ptr, w8, w16, part_ptr, M, N, K, row_bytes, stride_xm, tiles_per_split,
                         QTYPE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         DOT_F32: tl.constexpr):
    """part[split, m, n] = sum over K tiles [split * tiles_per_split, ...) of x[m, k] W[n, k], each tile's
    tl.dot added to one fp32 accumulator in K order (linear_kernels.splitk_reduce adds the splits). The weights
    are rounded to x's dtype before the dot, as the dequantise path rounds them."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: a jit function, which the interpreter
    # cannot call when triton was imported before TRITON_INTERPRET was set
    k_begin = pid_s * tiles_per_split * BLOCK_K
    # a loop of fixed trip count (the interpreter takes no tensor range bounds); tiles past K are masked off
    for t in range(0, tiles_per_split):
        offs_k = k_begin + t * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                     mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        # decoded as (n, k), k the fastest index: neighbouring threads read neighbouring bytes of a row
        w = _decode(w8, w16, offs_n[:, None], offs_k[None, :], row_bytes, n_mask[:, None] & k_mask[None, :], QTYPE)
        w = tl.trans(w.to(xt.dtype))
        if DOT_F32:  # the interpreter's bf16 dot is wrong: it multiplies bit patterns
            acc += tl.dot(xt.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(xt, w)
    out = part_ptr + (pid_s * M + offs_m[:, None]).to(tl.int64) * N + offs_n[None, :]
    tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def gguf_dequant(w8, w16, out_ptr, N, K, row_bytes, stride_out, QTYPE: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """out[k, n] = W[n, k] (the (in, out) matrix the dense path multiplies by), in out's dtype."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    w = _decode(w8, w16, offs_n[:, None], offs_k[None, :], row_bytes, mask, QTYPE)   # (n, k), as in the matmul
    tl.store(out_ptr + offs_k[None, :].to(tl.int64) * stride_out + offs_n[:, None], w.to(out_ptr.dtype.element_ty),
             mask=mask)


# Tile sizes the kernels run with (gguf_linear.py reads them) and the signatures the AOT test compiles.
QTYPE_CODES = {"Q4_0": 0, "Q4_1": 1, "Q8_0": 2, "Q4_K": 3, "Q5_K": 4, "Q6_K": 5, "Q5_0": 6, "Q5_1": 7, "Q2_K": 8,
               "Q3_K": 9, "IQ4_NL": 10, "IQ4_XS": 11, "IQ2_XXS": 12, "IQ2_XS": 12, "IQ2_S": 12, "IQ3_XXS": 13,
               "IQ3_S": 14, "IQ1_S": 15, "IQ1_M": 15}   # the lattice types' blocks re-encoded: a code per table
MATMUL_TILE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)
DEQUANT_TILE = dict(BLOCK_K=32, BLOCK_N=64)

_MATMUL_SIG = {"x_ptr": "*{dt}", "w8": "*u8", "w16": "*fp16", "part_ptr": "*fp32", "M": "i32", "N": "i32",
               "K": "i32", "row_bytes": "i32", "stride_xm": "i32", "tiles_per_split": "i32", "QTYPE": "constexpr",
               "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "DOT_F32": "constexpr"}
_DEQUANT_SIG = {"w8": "*u8", "w16": "*fp16", "out_ptr": "*{dt}", "N": "i32", "K": "i32", "row_bytes": "i32",
                "stride_out": "i32", "QTYPE": "constexpr", "BLOCK_K": "constexpr", "BLOCK_N": "constexpr"}

AOT_SPECS = [
    *({"kernel": "gguf_matmul_partials", "signature": {k: v.format(dt=dt) for k, v in _MATMUL_SIG.items()},
       "constexprs": {**MATMUL_TILE, "QTYPE": code, "DOT_F32": False}}
      for dt in ("fp16", "bf16") for code in sorted(set(QTYPE_CODES.values()))),
    *({"kernel": "gguf_dequant", "signature": {k: v.format(dt=dt) for k, v in _DEQUANT_SIG.items()},
       "constexprs": {**DEQUANT_TILE, "QTYPE": code}}
      for dt in ("fp16", "bf16", "fp32") for code in sorted(set(QTYPE_CODES.values()))),   # fp32: embedding rows
]
