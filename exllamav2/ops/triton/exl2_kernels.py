"""Triton kernels for EXL2 weights (format: exllamav2/quant/exl2.py), read straight from the file's tensors.

The kernels walk the matrix group by group through a small table built at load (exl2_linear.py): per group its
first quantized row, its row count, its first stream bit (q_weight row * 32) and its width. Inside a group, row r
of column n is the `bits`-wide field at stream bit `bit0 + r * bits` of column n (a field of width 3, 5 or 6 may
straddle two words; 4-bit groups, most of a 4 bpw matrix, are read a word at a time instead). Scales are decoded
per group and column from the q_scale nibble and the group's fp16(q_scale_max / 256), rounded to fp16 as the
original does, and each weight is rounded to fp16 once: the tile equals the reference dequantiser's
(exl2_dequantize) bit for bit.

One kernel, `exl2_matmul`, in two modes (the decoding in two @jit helpers, `exl2_group` and `exl2_tile`, which
the MoE kernels (moe_kernels.py) call too):
- x gathered through q_perm times the dequantised tiles, one fp32 partial per split of the groups (the split comes
  from the matrix shape; linear_kernels.splitk_reduce adds the partials in a fixed order);
- DEQUANT: the (in, out) matrix in quantized row order, into a scratch buffer, for calls with many rows.

Only builtins of triton.language are used (tl.full, not tl.zeros; ceil divisions written out): the library's @jit
helpers are decorated when triton is imported, and the interpreter cannot call them if that happened before
TRITON_INTERPRET was set.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def exl2_group(qs_ptr, groups_ptr, smax_ptr, g, offs_n, n_mask, stride_qs):
    """Group g's first quantized row, row count, first stream bit and width, and its scales for columns offs_n
    (fp32 values of fp16 roundings)."""
    k0 = tl.load(groups_ptr + g * 4)
    rows = tl.load(groups_ptr + g * 4 + 1)
    bit0 = tl.load(groups_ptr + g * 4 + 2)
    bits = tl.load(groups_ptr + g * 4 + 3)
    smax = tl.load(smax_ptr + g)
    sw = tl.load(qs_ptr + g * stride_qs + offs_n // 8, mask=n_mask, other=0)
    code = (sw >> ((offs_n % 8) * 4)) & 15
    scale = (((code + 1) * (code + 1)).to(tl.float32) * smax).to(tl.float16).to(tl.float32)
    return k0, rows, bit0, bits, scale


@triton.jit
def exl2_tile(qw_ptr, stride_qw, r, rows, bit0, bits, scale, offs_n, n_mask, BLOCK_K: tl.constexpr,
              ALIGNED: tl.constexpr):
    """The fp16 weights of rows r .. r + BLOCK_K of a group (width `bits`, stream from bit0) for columns offs_n, a
    (BLOCK_K, BLOCK_N) tile (rows past the group's end are 0), and which rows are real. ALIGNED: the caller
    promises q_weight's rows start 64-byte aligned (pointers made from integers carry no alignment of their own;
    moe_kernels.py)."""
    offs_r = r + tl.arange(0, BLOCK_K)
    r_mask = offs_r < rows
    mask2 = r_mask[:, None] & n_mask[None, :]
    if bits == 4:
        # 4 bits (most rows of a 4 bpw matrix): each word loaded once and unpacked to its 8 rows
        offs_w = r // 8 + tl.arange(0, BLOCK_K // 8)
        w_ptrs = qw_ptr + ((bit0 >> 5) + offs_w)[:, None] * stride_qw + offs_n[None, :]
        if ALIGNED:
            w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [1, offs_n.shape[0]])
        words = tl.load(w_ptrs, mask=(offs_w * 8 < rows)[:, None] & n_mask[None, :], other=0)
        v4 = (words[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 15
        q = tl.reshape(v4, (BLOCK_K, offs_n.shape[0])) - 8
    else:
        field = ((1 << bits) - 1).to(tl.uint32)
        zero = 1 << (bits - 1)
        off = bit0 + offs_r * bits
        word = off >> 5
        shift = (off & 31).to(tl.uint32)
        lo_ptrs = qw_ptr + word[:, None] * stride_qw + offs_n[None, :]
        if ALIGNED:
            lo_ptrs = tl.max_contiguous(tl.multiple_of(lo_ptrs, [16, 16]), [1, offs_n.shape[0]])
        lo = tl.load(lo_ptrs, mask=mask2, other=0)
        straddles = ((off & 31) + bits) > 32
        hi = tl.load(qw_ptr + (word + 1)[:, None] * stride_qw + offs_n[None, :],
                     mask=mask2 & straddles[:, None], other=0)
        lo = lo.to(tl.uint32, bitcast=True)
        hi = hi.to(tl.uint32, bitcast=True)
        # two shifts for the high word: a shift by 32 is undefined; when nothing straddles hi is 0
        v = ((lo >> shift[:, None]) | ((hi << (31 - shift[:, None])) << 1)) & field
        q = v.to(tl.int32) - zero
    return (q.to(tl.float32) * scale[None, :]).to(tl.float16), offs_r, r_mask


@triton.jit
def exl2_matmul(x_ptr, perm_ptr, qw_ptr, qs_ptr, groups_ptr, smax_ptr, out_ptr, M, N, stride_xm, stride_qw,
                stride_qs, stride_out, num_groups, groups_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr,
                DEQUANT: tl.constexpr):
    """DEQUANT=False: x (M, in) gathered through q_perm times the groups of split program_id(2), into the fp32
    partials out (splits, M, N). DEQUANT=True: the tiles themselves into out (in, N), quantized row order (one
    group per program_id(2); x, perm and M unused)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see the module docstring
    g_begin = pid_s * groups_per_split
    g_end = tl.minimum(g_begin + groups_per_split, num_groups)
    for g in range(g_begin, g_end):
        k0, rows, bit0, bits, scale = exl2_group(qs_ptr, groups_ptr, smax_ptr, g, offs_n, n_mask, stride_qs)
        for r in range(0, rows, BLOCK_K):
            w, offs_r, r_mask = exl2_tile(qw_ptr, stride_qw, r, rows, bit0, bits, scale, offs_n, n_mask, BLOCK_K,
                                          False)
            if DEQUANT:
                dst = out_ptr + (k0 + offs_r)[:, None] * stride_out + offs_n[None, :]
                tl.store(dst, w.to(out_ptr.dtype.element_ty), mask=r_mask[:, None] & n_mask[None, :])
            else:
                src = tl.load(perm_ptr + k0 + offs_r, mask=r_mask, other=0)
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + src[None, :],
                             mask=m_mask[:, None] & r_mask[None, :], other=0.0)
                if DOT_F32:  # the interpreter's bf16 dot is wrong: it multiplies bit patterns
                    acc += tl.dot(xt.to(tl.float32), w.to(xt.dtype).to(tl.float32))
                else:
                    acc += tl.dot(xt, w.to(xt.dtype))
    if not DEQUANT:
        out = out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


# Tile sizes the kernels run with (exl2_linear.py reads them) and the signatures the AOT test compiles. BLOCK_K is
# the largest of BLOCK_K_CHOICES that divides every group but the last (groups hold 16 to a few hundred rows), so no
# tile straddles two groups and few are partly masked.
MATMUL_TILE = dict(BLOCK_M=16, BLOCK_N=128)
DEQUANT_TILE = dict(BLOCK_M=16, BLOCK_N=128)
BLOCK_K_CHOICES = (64, 32, 16)
# Launch options (tests/test_triton_aot.py checks the shared memory against each arch's limit: 18 KB at BLOCK_K=64).
MATMUL_LAUNCH = dict(num_warps=4, num_stages=2)
DEQUANT_LAUNCH = dict(num_warps=4, num_stages=2)

_SIG = {"x_ptr": "*{dt}", "perm_ptr": "*i32", "qw_ptr": "*i32", "qs_ptr": "*i32", "groups_ptr": "*i32",
        "smax_ptr": "*fp32", "out_ptr": "*{out}", "M": "i32", "N": "i32", "stride_xm": "i32", "stride_qw": "i32",
        "stride_qs": "i32", "stride_out": "i32", "num_groups": "i32", "groups_per_split": "i32",
        "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "DOT_F32": "constexpr",
        "DEQUANT": "constexpr"}

AOT_SPECS = [
    *({"kernel": "exl2_matmul", "signature": {k: v.format(dt=dt, out="fp32") for k, v in _SIG.items()},
       "constexprs": {**MATMUL_TILE, "BLOCK_K": bk, "DOT_F32": False, "DEQUANT": False}, "options": MATMUL_LAUNCH,
       "aot_default": dt == "fp16" and bk == BLOCK_K_CHOICES[0]}
      for dt in ("fp16", "bf16") for bk in BLOCK_K_CHOICES),
    *({"kernel": "exl2_matmul", "signature": {k: v.format(dt=dt, out=dt) for k, v in _SIG.items()},
       "constexprs": {**DEQUANT_TILE, "BLOCK_K": bk, "DOT_F32": False, "DEQUANT": True}, "options": DEQUANT_LAUNCH,
       "aot_default": dt == "fp16" and bk == BLOCK_K_CHOICES[0]}
      for dt in ("fp16", "bf16") for bk in BLOCK_K_CHOICES),
]
