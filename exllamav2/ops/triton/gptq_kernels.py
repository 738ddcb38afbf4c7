"""Triton kernels for GPTQ weights (format: exllamav2/quant/gptq.py), 4 or 8 bits, read straight from the file's
tensors: qweight (in * bits / 32, out) with 32 / bits input rows per word (low bits first), qzeros
(groups, out * bits / 32) with 32 / bits columns per word, scales (groups, out), and the group of every input row
(g_idx, or sequential). Act-order needs no reshuffle: each row's group is looked up (g_idx is resident anyway).
A weight is ((q - zero) * scale) rounded to fp16 once, zero = z + 1 for v1 checkpoints and z for gptq_v2: the tile
equals the reference dequantiser's (gptq_dequantize) bit for bit.

One kernel, `gptq_matmul`, in two modes (the decoding in one @jit helper, `gptq_tile`, which the MoE kernels
(moe_kernels.py) call too):
- x times the dequantised tiles, one fp32 partial per split of the K tiles (the split comes from the matrix shape;
  linear_kernels.splitk_reduce adds the partials in a fixed order);
- DEQUANT: the (in, out) matrix into a scratch buffer, for calls with many rows.

Only builtins of triton.language are used (tl.full, not tl.zeros; ceil divisions written out): the library's @jit
helpers are decorated when triton is imported, and the interpreter cannot call them if that happened before
TRITON_INTERPRET was set.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def gptq_tile(qw_ptr, qz_ptr, sc_ptr, gidx_ptr, t, offs_n, n_mask, K, stride_qw, stride_qz, stride_sc, group_size,
              BITS: tl.constexpr, ZERO_PLUS: tl.constexpr, BLOCK_K: tl.constexpr, SEQ_GROUPS: tl.constexpr,
              ALIGNED: tl.constexpr):
    """K tile t's fp16 weights for columns offs_n, a (BLOCK_K, BLOCK_N) tile (rows past K are 0), its row indices
    and which are real. SEQ_GROUPS: rows are in groups of `group_size` in order (no act-order) and the tile lies in
    one group, so its scales and zeros are one row each; otherwise each row's group is looked up in gidx.
    ALIGNED: the caller promises qweight's and scales' rows start 64-byte aligned (pointers made from integers
    carry no alignment of their own; moe_kernels.py)."""
    PER: tl.constexpr = 32 // BITS
    MASK: tl.constexpr = (1 << BITS) - 1
    WROWS: tl.constexpr = BLOCK_K // PER
    offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    mask2 = k_mask[:, None] & n_mask[None, :]
    # each word once, unpacked to its PER rows (row PER*r + i is field i of word row r)
    offs_w = t * WROWS + tl.arange(0, WROWS)
    w_ptrs = qw_ptr + offs_w[:, None] * stride_qw + offs_n[None, :]
    if ALIGNED:
        w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [1, offs_n.shape[0]])
    words = tl.load(w_ptrs, mask=(offs_w < K // PER)[:, None] & n_mask[None, :], other=0)
    q = (words[:, None, :] >> (tl.arange(0, PER) * BITS)[None, :, None]) & MASK
    q = tl.reshape(q, (BLOCK_K, offs_n.shape[0]))
    if SEQ_GROUPS:
        g = (t * BLOCK_K) // group_size
        zw = tl.load(qz_ptr + g * stride_qz + offs_n // PER, mask=n_mask, other=0)
        z = ((zw >> ((offs_n % PER) * BITS)) & MASK) + ZERO_PLUS
        s_ptrs = sc_ptr + g * stride_sc + offs_n
        if ALIGNED:
            s_ptrs = tl.max_contiguous(tl.multiple_of(s_ptrs, 16), offs_n.shape[0])
        s = tl.load(s_ptrs, mask=n_mask, other=0.0).to(tl.float16).to(tl.float32)
        w = ((q - z[None, :]).to(tl.float32) * s[None, :]).to(tl.float16)
    else:
        g = tl.load(gidx_ptr + offs_k, mask=k_mask, other=0)
        zw = tl.load(qz_ptr + g[:, None] * stride_qz + (offs_n // PER)[None, :], mask=mask2, other=0)
        z = ((zw >> ((offs_n % PER) * BITS)[None, :]) & MASK) + ZERO_PLUS
        s = tl.load(sc_ptr + g[:, None] * stride_sc + offs_n[None, :], mask=mask2, other=0.0)
        w = ((q - z).to(tl.float32) * s.to(tl.float16).to(tl.float32)).to(tl.float16)
    return w, offs_k, k_mask


@triton.jit
def gptq_matmul(x_ptr, qw_ptr, qz_ptr, sc_ptr, gidx_ptr, out_ptr, M, N, K, stride_xm, stride_qw, stride_qz,
                stride_sc, stride_out, tiles_per_split, group_size,
                BITS: tl.constexpr, ZERO_PLUS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr, DEQUANT: tl.constexpr, SEQ_GROUPS: tl.constexpr):
    """DEQUANT=False: x (M, K) times the K tiles of split program_id(2), into the fp32 partials out (splits, M, N).
    DEQUANT=True: the tiles themselves into out (K, N) (x and M unused). SEQ_GROUPS: see gptq_tile."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)  # not tl.zeros: see the module docstring
    t_begin = pid_s * tiles_per_split
    t_end = tl.minimum(t_begin + tiles_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    for t in range(t_begin, t_end):
        w, offs_k, k_mask = gptq_tile(qw_ptr, qz_ptr, sc_ptr, gidx_ptr, t, offs_n, n_mask, K, stride_qw, stride_qz,
                                      stride_sc, group_size, BITS, ZERO_PLUS, BLOCK_K, SEQ_GROUPS, False)
        if DEQUANT:
            tl.store(out_ptr + offs_k[:, None] * stride_out + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=k_mask[:, None] & n_mask[None, :])
        else:
            xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_F32:  # the interpreter's bf16 dot is wrong: it multiplies bit patterns
                acc += tl.dot(xt.to(tl.float32), w.to(xt.dtype).to(tl.float32))
            else:
                acc += tl.dot(xt, w.to(xt.dtype))
    if not DEQUANT:
        out = out_ptr + pid_s * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(out, acc, mask=m_mask[:, None] & n_mask[None, :])


# Tile sizes the kernels run with (gptq_linear.py reads them) and the signatures the AOT test compiles.
MATMUL_TILE = dict(BLOCK_M=16, BLOCK_N=128, BLOCK_K=64)
DEQUANT_TILE = dict(BLOCK_M=16, BLOCK_K=64, BLOCK_N=128)
# Launch options (tests/test_triton_aot.py checks the shared memory against each arch's limit: 23-59 KB).
MATMUL_LAUNCH = dict(num_warps=4, num_stages=2)
DEQUANT_LAUNCH = dict(num_warps=4, num_stages=2)

_SIG = {"x_ptr": "*{dt}", "qw_ptr": "*i32", "qz_ptr": "*i32", "sc_ptr": "*fp16", "gidx_ptr": "*i32",
        "out_ptr": "*{out}", "M": "i32", "N": "i32", "K": "i32", "stride_xm": "i32", "stride_qw": "i32",
        "stride_qz": "i32", "stride_sc": "i32", "stride_out": "i32", "tiles_per_split": "i32", "group_size": "i32",
        "BITS": "constexpr", "ZERO_PLUS": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
        "BLOCK_K": "constexpr", "DOT_F32": "constexpr", "DEQUANT": "constexpr", "SEQ_GROUPS": "constexpr"}

AOT_SPECS = [
    *({"kernel": "gptq_matmul", "signature": {k: v.format(dt=dt, out="fp32") for k, v in _SIG.items()},
       "constexprs": {**MATMUL_TILE, "BITS": bits, "ZERO_PLUS": 1, "DOT_F32": False, "DEQUANT": False,
                      "SEQ_GROUPS": seq},
       "options": MATMUL_LAUNCH, "aot_default": dt == "fp16" and bits == 4}
      for dt in ("fp16", "bf16") for bits in (4, 8) for seq in (True, False)),
    *({"kernel": "gptq_matmul", "signature": {k: v.format(dt=dt, out=dt) for k, v in _SIG.items()},
       "constexprs": {**DEQUANT_TILE, "BITS": bits, "ZERO_PLUS": 0, "DOT_F32": False, "DEQUANT": True,
                      "SEQ_GROUPS": seq},
       "options": DEQUANT_LAUNCH, "aot_default": dt == "fp16" and bits == 8 and not seq}
      for dt in ("fp16", "bf16") for bits in (4, 8) for seq in (True, False)),
]
