"""Triton kernels for an MoE layer's experts with the routing read on the device (the launcher: moe.py).

The (token, slot) assignments arrive grouped by expert in blocks of BLOCK_M rows (`rows`: assignment indices, A
where a block is padded; `experts`: each block's expert, -1 for a spare block). A program takes one block and one
tile of output features, finds its expert's weight through a table of addresses (one int64 per expert: the
experts' tensors stay where their linears hold them) and multiplies. Nothing is read on the host, the grid depends
on the token count only, and a row's result does not depend on the rows that share its block (each output is its
own dot product over K in a fixed order), so a token gets the same result alone or in a batch.

- `moe_gate_up`: act(x W1_e^T) * (x W3_e^T) for every assignment, written at its row of `act` (A, I): routing-rank
  order, the layout of the module's `pre_down` hook point.
- `moe_down`: (act W2_e^T) * the assignment's router weight, written at its row of `out` (A, H); moe.py adds each
  token's rows in expert order, as the grouped path's index_add does.

Rounding follows the eager path's (exllamav2/moe_mlp.py: forward_grouped): each projection rounded to the
activations' dtype, the activation computed in fp32 and rounded, the product rounded; the down projection rounded
before its fp32 router weight multiplies it, and that product rounded.

Weights: DENSE (an (N, K) row-major matrix in the activations' dtype), a GGUF block type (its code in
gguf_kernels.QTYPE_CODES, decoded by gguf_kernels._decode), EXL2 (exl2_kernels.exl2_group / exl2_tile, the
activations gathered through the expert's q_perm) or GPTQ (gptq_kernels.gptq_tile).
"""

import triton
import triton.language as tl

from . import interpreting, kernels

# helpers of the same mode (interpreted or compiled) as this module: a kernel can only call jit functions of its
# own mode
_decode = kernels("gguf_kernels", interpreting())._decode
_exl2 = kernels("exl2_kernels", interpreting())
exl2_group, exl2_tile = _exl2.exl2_group, _exl2.exl2_tile
gptq_tile = kernels("gptq_kernels", interpreting()).gptq_tile

DENSE = tl.constexpr(16)
EXL2 = tl.constexpr(17)
# GPTQ: GPTQ + 4 * bits + 2 * zero_plus + seq_groups (gptq_kernels.gptq_tile's constexprs in one code)
GPTQ = tl.constexpr(32)

# activation codes (moe.py: _act_codes)
SILU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
RELU = tl.constexpr(3)
QUICK_GELU = tl.constexpr(4)


@triton.jit
def _dot(acc, a, b, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter's bf16 dot is wrong: it multiplies bit patterns
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _project(acc, a_ptr, arow, r_mask, stride_a, table, E, e, offs_n, n_mask, K, p1, p2,
             FMT: tl.constexpr, BK: tl.constexpr, DOT_F32: tl.constexpr):
    """acc (rows, BLOCK_N) += a[arow, :K] W_e[offs_n, :K]^T, expert e's tensors read through `table` (6, E): its
    first row the weight's address (dense matrix, GGUF blocks, EXL2 q_weight, GPTQ qweight); for EXL2 also
    q_scale, the group table, the group scales, q_perm and the group count; for GPTQ qzeros, scales, g_idx, the
    qzeros row stride and the group size. p1, p2: GGUF bytes per row; EXL2 q_weight and q_scale row strides; GPTQ
    qweight and scales row strides."""
    addr = tl.load(table + e)
    if FMT >= GPTQ:
        # 32: GPTQ, written out (the interpreter's constexpr values do not shift)
        BITS: tl.constexpr = (FMT - 32) // 4
        ZERO_PLUS: tl.constexpr = ((FMT - 32) // 2) % 2
        SEQ: tl.constexpr = (FMT - 32) % 2
        qw = addr.to(tl.pointer_type(tl.int32))
        qz = tl.load(table + E + e).to(tl.pointer_type(tl.int32))
        sc = tl.load(table + 2 * E + e).to(tl.pointer_type(tl.float16))
        gidx = tl.load(table + 3 * E + e).to(tl.pointer_type(tl.int32))
        stride_qz = tl.load(table + 4 * E + e)
        group_size = tl.load(table + 5 * E + e)
        for t in range(0, (K + BK - 1) // BK):
            w, offs_k, k_mask = gptq_tile(qw, qz, sc, gidx, t, offs_n, n_mask, K, p1, stride_qz, p2, group_size,
                                          BITS, ZERO_PLUS, BK, SEQ)
            at = tl.load(a_ptr + arow[:, None] * stride_a + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                         other=0.0)
            acc = _dot(acc, at, w.to(at.dtype), DOT_F32)
    elif FMT == EXL2:
        qw = addr.to(tl.pointer_type(tl.int32))
        qs = tl.load(table + E + e).to(tl.pointer_type(tl.int32))
        groups = tl.load(table + 2 * E + e).to(tl.pointer_type(tl.int32))
        smax = tl.load(table + 3 * E + e).to(tl.pointer_type(tl.float32))
        perm = tl.load(table + 4 * E + e).to(tl.pointer_type(tl.int32))
        num_groups = tl.load(table + 5 * E + e)
        for g in range(0, num_groups):
            k0, rows, bit0, bits, scale = exl2_group(qs, groups, smax, g, offs_n, n_mask, p2)
            for r in range(0, rows, BK):
                w, offs_r, k_mask = exl2_tile(qw, p1, r, rows, bit0, bits, scale, offs_n, n_mask, BK)
                src = tl.load(perm + k0 + offs_r, mask=k_mask, other=0)
                at = tl.load(a_ptr + arow[:, None] * stride_a + src[None, :], mask=r_mask[:, None] & k_mask[None, :],
                             other=0.0)
                acc = _dot(acc, at, w.to(at.dtype), DOT_F32)
    else:
        for k0 in range(0, K, BK):
            offs_k = k0 + tl.arange(0, BK)
            k_mask = offs_k < K
            at = tl.load(a_ptr + arow[:, None] * stride_a + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                         other=0.0)
            w_mask = n_mask[:, None] & k_mask[None, :]
            if FMT == DENSE:
                w = tl.load(addr.to(a_ptr.dtype) + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=w_mask,
                            other=0.0)
            else:
                w = _decode(addr.to(tl.pointer_type(tl.uint8)), addr.to(tl.pointer_type(tl.float16)),
                            offs_n[:, None], offs_k[None, :], p1, w_mask, FMT)
            acc = _dot(acc, at, tl.trans(w.to(at.dtype)), DOT_F32)
    return acc


@triton.jit
def _activation(g, ACT: tl.constexpr):
    """act(g) in fp32, the formulas torch computes in (tanh(y) through the logistic: 0.5 x (1 + tanh y) equals
    x / (1 + exp(-2y)))."""
    if ACT == SILU:
        a = g / (1.0 + tl.exp(-g))
    elif ACT == GELU:
        a = 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    elif ACT == GELU_TANH:
        y = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        a = g / (1.0 + tl.exp(-2.0 * y))
    elif ACT == RELU:
        a = tl.maximum(g, 0.0)
    else:
        a = g / (1.0 + tl.exp(-1.702 * g))
    return a


@triton.jit
def moe_gate_up(x_ptr, rows_ptr, experts_ptr, act_ptr, t1, t3, A, E, K, N, p11, p12, p31, p32, stride_x,
                TOPK: tl.constexpr, FMT1: tl.constexpr, FMT3: tl.constexpr, BK1: tl.constexpr, BK3: tl.constexpr,
                ACT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(experts_ptr + pid_b)
    if e >= 0:
        rows = tl.load(rows_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        r_mask = rows < A
        tok = (rows // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc_g = _project(tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), x_ptr, tok, r_mask, stride_x, t1, E, e, offs_n, n_mask, K, p11, p12, FMT1, BK1,
                         DOT_F32)
        acc_u = _project(tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), x_ptr, tok, r_mask, stride_x, t3, E, e, offs_n, n_mask, K, p31, p32, FMT3, BK3,
                         DOT_F32)
        dt = x_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        a = _activation(g, ACT).to(dt).to(tl.float32)
        out = act_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(out, (a * u).to(dt), mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_down(act_ptr, rows_ptr, experts_ptr, rw_ptr, out_ptr, t2, A, E, K, N, p21, p22,
             FMT2: tl.constexpr, BK2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             DOT_F32: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(experts_ptr + pid_b)
    if e >= 0:
        rows = tl.load(rows_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        r_mask = rows < A
        r64 = rows.to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc = _project(tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), act_ptr, r64, r_mask, K, t2, E, e, offs_n,
                       n_mask, K, p21, p22, FMT2, BK2, DOT_F32)
        dt = act_ptr.dtype.element_ty
        rw = tl.load(rw_ptr + r64, mask=r_mask, other=0.0)
        y = acc.to(dt).to(tl.float32) * rw[:, None]
        tl.store(out_ptr + r64[:, None] * N + offs_n[None, :], y.to(dt), mask=r_mask[:, None] & n_mask[None, :])


# Tile sizes (moe.py reads them; an EXL2 projection's K tile is its groups' common divisor, exl2_kernels'
# BLOCK_K_CHOICES) and the signatures the AOT test compiles.
TILE = dict(BLOCK_M=16, BLOCK_N=64)
BLOCK_K = 64

_GATE_UP_SIG = {"x_ptr": "*{dt}", "rows_ptr": "*i32", "experts_ptr": "*i32", "act_ptr": "*{dt}", "t1": "*i64",
                "t3": "*i64", "A": "i32", "E": "i32", "K": "i32", "N": "i32", "p11": "i32", "p12": "i32",
                "p31": "i32", "p32": "i32", "stride_x": "i32", "TOPK": "constexpr", "FMT1": "constexpr",
                "FMT3": "constexpr", "BK1": "constexpr", "BK3": "constexpr", "ACT": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "DOT_F32": "constexpr"}
_DOWN_SIG = {"act_ptr": "*{dt}", "rows_ptr": "*i32", "experts_ptr": "*i32", "rw_ptr": "*fp32", "out_ptr": "*{dt}",
             "t2": "*i64", "A": "i32", "E": "i32", "K": "i32", "N": "i32", "p21": "i32", "p22": "i32",
             "FMT2": "constexpr", "BK2": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
             "DOT_F32": "constexpr"}

AOT_SPECS = [
    *({"kernel": "moe_gate_up", "signature": {k: v.format(dt=dt) for k, v in _GATE_UP_SIG.items()},
       "constexprs": {**TILE, "TOPK": 2, "FMT1": fmt, "FMT3": fmt, "BK1": bk, "BK3": bk, "ACT": act,
                      "DOT_F32": False},
       "aot_default": dt == "bf16" and fmt == 16 and act == 0}
      for dt in ("fp16", "bf16") for fmt, bk in ((16, 64), (17, 32), (0, 64), (3, 64), (32 + 16 + 2 + 1, 64),
                                                  (32 + 32, 64)) for act in (0, 2)),
    *({"kernel": "moe_down", "signature": {k: v.format(dt=dt) for k, v in _DOWN_SIG.items()},
       "constexprs": {**TILE, "FMT2": fmt, "BK2": bk, "DOT_F32": False}, "aot_default": dt == "bf16" and fmt == 16}
      for dt in ("fp16", "bf16") for fmt, bk in ((16, 64), (17, 16), (0, 64), (5, 64), (32 + 16, 64))),
]
