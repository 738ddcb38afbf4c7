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

Weights: DENSE (an (N, K) row-major matrix in the activations' dtype), or a GGUF block type (its code in
gguf_kernels.QTYPE_CODES, decoded by gguf_kernels._decode).
"""

import triton
import triton.language as tl

from . import interpreting, kernels

# the GGUF decoder of the same mode (interpreted or compiled) as this module: a kernel can only call jit functions
# of its own mode
_decode = kernels("gguf_kernels", interpreting())._decode

DENSE = tl.constexpr(16)

# activation codes (moe.py: ACT_CODES)
SILU = tl.constexpr(0)
GELU = tl.constexpr(1)
GELU_TANH = tl.constexpr(2)
RELU = tl.constexpr(3)
QUICK_GELU = tl.constexpr(4)


@triton.jit
def _weight_tile(table, e, offs_n, offs_k, K, row_bytes, mask, x_ptr, FMT: tl.constexpr):
    """W_e[n, k] as an (n, k) tile in x's dtype; expert e's tensor found at table[e]."""
    addr = tl.load(table + e)
    if FMT == DENSE:
        w_ptr = addr.to(x_ptr.dtype)
        w = tl.load(w_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0.0)
    else:
        w8 = addr.to(tl.pointer_type(tl.uint8))
        w16 = addr.to(tl.pointer_type(tl.float16))
        w = _decode(w8, w16, offs_n[:, None], offs_k[None, :], row_bytes, mask, FMT)
    return w.to(x_ptr.dtype.element_ty)


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
def moe_gate_up(x_ptr, rows_ptr, experts_ptr, act_ptr, t1, t3, A, K, N, rb1, rb3, stride_x,
                TOPK: tl.constexpr, FMT1: tl.constexpr, FMT3: tl.constexpr, ACT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    pid_b = tl.program_id(0)
    pid_n = tl.program_id(1)
    e = tl.load(experts_ptr + pid_b)
    if e >= 0:
        rows = tl.load(rows_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
        r_mask = rows < A
        tok = (rows // TOPK).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        acc_g = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_u = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            xt = tl.load(x_ptr + tok[:, None] * stride_x + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                         other=0.0)
            w_mask = n_mask[:, None] & k_mask[None, :]
            wg = tl.trans(_weight_tile(t1, e, offs_n, offs_k, K, rb1, w_mask, x_ptr, FMT1))
            wu = tl.trans(_weight_tile(t3, e, offs_n, offs_k, K, rb3, w_mask, x_ptr, FMT3))
            if DOT_F32:  # the interpreter's bf16 dot is wrong: it multiplies bit patterns
                acc_g += tl.dot(xt.to(tl.float32), wg.to(tl.float32))
                acc_u += tl.dot(xt.to(tl.float32), wu.to(tl.float32))
            else:
                acc_g += tl.dot(xt, wg)
                acc_u += tl.dot(xt, wu)
        dt = x_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        a = _activation(g, ACT).to(dt).to(tl.float32)
        out = act_ptr + rows[:, None].to(tl.int64) * N + offs_n[None, :]
        tl.store(out, (a * u).to(dt), mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_down(act_ptr, rows_ptr, experts_ptr, rw_ptr, out_ptr, t2, A, K, N, rb2,
             FMT2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
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
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            at = tl.load(act_ptr + r64[:, None] * K + offs_k[None, :], mask=r_mask[:, None] & k_mask[None, :],
                         other=0.0)
            w = tl.trans(_weight_tile(t2, e, offs_n, offs_k, K, rb2, n_mask[:, None] & k_mask[None, :], act_ptr,
                                      FMT2))
            if DOT_F32:
                acc += tl.dot(at.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(at, w)
        dt = act_ptr.dtype.element_ty
        rw = tl.load(rw_ptr + r64, mask=r_mask, other=0.0)
        y = acc.to(dt).to(tl.float32) * rw[:, None]
        tl.store(out_ptr + r64[:, None] * N + offs_n[None, :], y.to(dt), mask=r_mask[:, None] & n_mask[None, :])


# Tile sizes (moe.py reads them) and the signatures the AOT test compiles.
TILE = dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)

_GATE_UP_SIG = {"x_ptr": "*{dt}", "rows_ptr": "*i32", "experts_ptr": "*i32", "act_ptr": "*{dt}", "t1": "*i64",
                "t3": "*i64", "A": "i32", "K": "i32", "N": "i32", "rb1": "i32", "rb3": "i32", "stride_x": "i32",
                "TOPK": "constexpr", "FMT1": "constexpr", "FMT3": "constexpr", "ACT": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "DOT_F32": "constexpr"}
_DOWN_SIG = {"act_ptr": "*{dt}", "rows_ptr": "*i32", "experts_ptr": "*i32", "rw_ptr": "*fp32", "out_ptr": "*{dt}",
             "t2": "*i64", "A": "i32", "K": "i32", "N": "i32", "rb2": "i32", "FMT2": "constexpr",
             "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "BLOCK_K": "constexpr", "DOT_F32": "constexpr"}

AOT_SPECS = [
    *({"kernel": "moe_gate_up", "signature": {k: v.format(dt=dt) for k, v in _GATE_UP_SIG.items()},
       "constexprs": {**TILE, "TOPK": 2, "FMT1": fmt, "FMT3": fmt, "ACT": act, "DOT_F32": False},
       "aot_default": dt == "bf16" and fmt == 16 and act == 0}
      for dt in ("fp16", "bf16") for fmt in (16, 0, 3) for act in (0, 2)),
    *({"kernel": "moe_down", "signature": {k: v.format(dt=dt) for k, v in _DOWN_SIG.items()},
       "constexprs": {**TILE, "FMT2": fmt, "DOT_F32": False}, "aot_default": dt == "bf16" and fmt == 16}
      for dt in ("fp16", "bf16") for fmt in (16, 0, 5)),
]
