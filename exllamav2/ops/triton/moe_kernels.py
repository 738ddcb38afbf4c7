"""Triton kernels for an MoE layer's experts with the routing read on the device (the launcher: moe.py).

The (token, slot) assignments arrive grouped by expert in blocks of BLOCK_M rows (`rows`: assignment indices, A
where a block is padded; `experts`: each block's expert, -1 for a spare block). A program takes one block and one
tile of output features, finds its expert's weight through a table of addresses (one int64 per expert: the
experts' tensors stay where their linears hold them) and multiplies. Nothing is read on the host, the grid depends
on the token count only, and a row's result does not depend on the rows that share its block (each output is its
own dot product over K in a fixed order), so a token gets the same result alone or in a batch.

- `moe_gate_up`: act(x W1_e^T) * (x W3_e^T) for every assignment, written at its row of `act` (A, I): routing-rank
  order, the layout of the module's `pre_down` hook point.
- `moe_route` (one program, before them): the blocks, from the routing's expert ids;
- `moe_down`: (act W2_e^T) * the assignment's router weight, written at its row of `out` (A, H);
- `moe_combine`: each token's rows of `out` added in expert order, as the grouped path's index_add does.
Four launches a layer, so a captured step holds few kernels.

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
def _sum(x, AXIS: tl.constexpr):
    # tl.reduce with tl.sum's own combine function, not tl.sum: the interpreter recognises it (and runs a numpy
    # sum), while the library's @jit tl.sum cannot be called by an interpreted kernel when triton was imported
    # before TRITON_INTERPRET was set
    return tl.reduce(x, AXIS, tl.standard._sum_combine)


@triton.jit
def _cumsum(x, AXIS: tl.constexpr):
    return tl.associative_scan(x, AXIS, tl.standard._sum_combine)


@triton.jit
def _dot(acc, a, b, DOT_F32: tl.constexpr):
    if DOT_F32:  # the interpreter's bf16 dot is wrong: it multiplies bit patterns
        acc += tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _project(acc, a_ptr, arow, r_mask, stride_a, table, E, e, offs_n, n_mask, K, p1, p2,
             FMT: tl.constexpr, BK: tl.constexpr, ALIGNED: tl.constexpr, DOT_F32: tl.constexpr):
    """acc (rows, BLOCK_N) += a[arow, :K] W_e[offs_n, :K]^T, expert e's tensors read through `table` (6, E): its
    first row the weight's address (dense matrix, GGUF blocks, EXL2 q_weight, GPTQ qweight); for EXL2 also
    q_scale, the group table, the group scales, q_perm and the group count; for GPTQ qzeros, scales, g_idx, the
    qzeros row stride and the group size. p1, p2: GGUF bytes per row; EXL2 q_weight and q_scale row strides; GPTQ
    qweight and scales row strides. ALIGNED: a promise (moe.py checks it) that every expert's weight rows (dense,
    EXL2 q_weight, GPTQ qweight and scales) start 64-byte aligned: an address made from an integer carries no
    alignment, and without it the tiles load 2 or 4 bytes at a time."""
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
                                          BITS, ZERO_PLUS, BK, SEQ, ALIGNED)
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
                w, offs_r, k_mask = exl2_tile(qw, p1, r, rows, bit0, bits, scale, offs_n, n_mask, BK, ALIGNED)
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
                w_ptrs = addr.to(a_ptr.dtype) + offs_n[:, None].to(tl.int64) * K + offs_k[None, :]
                if ALIGNED:
                    w_ptrs = tl.max_contiguous(tl.multiple_of(w_ptrs, [16, 16]), [1, BK])
                w = tl.load(w_ptrs, mask=w_mask, other=0.0)
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
def _block(rows_ptr, experts_ptr, A, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's block: its expert (-1: a spare block, nothing to do), its assignments (int64) and which are
    real (padding holds A), and its tile of output features and which are real."""
    pid_b = tl.program_id(0)
    e = tl.load(experts_ptr + pid_b)
    rows = tl.load(rows_ptr + pid_b * BLOCK_M + tl.arange(0, BLOCK_M))
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, rows.to(tl.int64), rows < A, offs_n, offs_n < N


@triton.jit
def moe_gate_up(x_ptr, rows_ptr, experts_ptr, act_ptr, t1, t3, A, E, K, N, p11, p12, p31, p32, stride_x,
                TOPK: tl.constexpr, FMT1: tl.constexpr, FMT3: tl.constexpr, BK1: tl.constexpr, BK3: tl.constexpr,
                ALN1: tl.constexpr, ALN3: tl.constexpr, ACT: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    e, rows, r_mask, offs_n, n_mask = _block(rows_ptr, experts_ptr, A, N, BLOCK_M, BLOCK_N)
    if e >= 0:
        tok = rows // TOPK
        zero = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        acc_g = _project(zero, x_ptr, tok, r_mask, stride_x, t1, E, e, offs_n, n_mask, K, p11, p12, FMT1, BK1, ALN1,
                         DOT_F32)
        acc_u = _project(zero, x_ptr, tok, r_mask, stride_x, t3, E, e, offs_n, n_mask, K, p31, p32, FMT3, BK3, ALN3,
                         DOT_F32)
        dt = x_ptr.dtype.element_ty
        g = acc_g.to(dt).to(tl.float32)
        u = acc_u.to(dt).to(tl.float32)
        a = _activation(g, ACT).to(dt).to(tl.float32)
        out = act_ptr + rows[:, None] * N + offs_n[None, :]
        tl.store(out, (a * u).to(dt), mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_down(act_ptr, rows_ptr, experts_ptr, rw_ptr, out_ptr, t2, A, E, K, N, p21, p22,
             FMT2: tl.constexpr, BK2: tl.constexpr, ALN2: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr):
    e, rows, r_mask, offs_n, n_mask = _block(rows_ptr, experts_ptr, A, N, BLOCK_M, BLOCK_N)
    if e >= 0:
        acc = _project(tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32), act_ptr, rows, r_mask, K, t2, E, e, offs_n,
                       n_mask, K, p21, p22, FMT2, BK2, ALN2, DOT_F32)
        dt = act_ptr.dtype.element_ty
        rw = tl.load(rw_ptr + rows, mask=r_mask, other=0.0)
        y = acc.to(dt).to(tl.float32) * rw[:, None]
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], y.to(dt), mask=r_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_route(ids_ptr, rows_ptr, experts_ptr, A, E, n_blocks, BLOCK_M: tl.constexpr, E_PAD: tl.constexpr,
              CHUNK: tl.constexpr):
    """One program: the A assignments (ids_ptr, their experts) grouped by expert into blocks of BLOCK_M rows.
    experts[p]: block p's expert, -1 past the last; rows[p * BLOCK_M + i]: the assignment in that place, A where a
    block is padded. Within an expert, assignments keep their order."""
    e_idx = tl.arange(0, E_PAD)
    counts = tl.full((E_PAD,), 0, tl.int32)
    for a0 in range(0, A, CHUNK):
        offs = a0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < A, other=-1).to(tl.int32)
        counts += _sum((ids[:, None] == e_idx[None, :]).to(tl.int32), 0)
    blocks = (counts + BLOCK_M - 1) // BLOCK_M
    block_end = _cumsum(blocks, 0)
    block_start = block_end - blocks
    for p0 in range(0, n_blocks, CHUNK):
        p = p0 + tl.arange(0, CHUNK)
        # the owner of block p: the number of experts whose blocks end at or before it (E_PAD past the last)
        owner = _sum((block_end[None, :] <= p[:, None]).to(tl.int32), 1)
        tl.store(experts_ptr + p, tl.where(owner < E, owner, -1), mask=p < n_blocks)
    for r0 in range(0, n_blocks * BLOCK_M, CHUNK):
        r = r0 + tl.arange(0, CHUNK)
        tl.store(rows_ptr + r, tl.full((CHUNK,), 0, tl.int32) + A, mask=r < n_blocks * BLOCK_M)
    tl.debug_barrier()  # the padding is written before any assignment lands on it
    running = tl.full((E_PAD,), 0, tl.int32)
    for a0 in range(0, A, CHUNK):
        offs = a0 + tl.arange(0, CHUNK)
        ids = tl.load(ids_ptr + offs, mask=offs < A, other=-1).to(tl.int32)
        eq = (ids[:, None] == e_idx[None, :]).to(tl.int32)
        seen = _cumsum(eq, 0) + running[None, :]  # each expert's assignments up to and including this one
        rank = _sum(eq * seen, 1) - 1
        start = _sum(eq * block_start[None, :], 1)
        tl.store(rows_ptr + start * BLOCK_M + rank, offs, mask=offs < A)
        running += _sum(eq, 0)


@triton.jit
def moe_combine(out_ptr, ids_ptr, y_ptr, H, TOPK: tl.constexpr, K_PAD: tl.constexpr, BLOCK_H: tl.constexpr):
    """y[t] = token t's TOPK rows of out (A, H) added from zero in the order of their experts (ascending ids, as
    the grouped path's index_add over experts adds them), rounded to y's dtype after each addition."""
    t = tl.program_id(0)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_mask = offs_h < H
    slots = tl.arange(0, K_PAD)
    ids = tl.load(ids_ptr + t * TOPK + slots, mask=slots < TOPK, other=2147483647).to(tl.int32)
    # a token's experts are distinct: slot j's place in expert order is how many of its experts have smaller ids
    place = _sum((ids[None, :] < ids[:, None]).to(tl.int32), 1)
    dt = y_ptr.dtype.element_ty
    y = tl.full((BLOCK_H,), 0.0, tl.float32)
    for r in range(0, TOPK):
        j = _sum(tl.where(place == r, slots, 0), 0)
        row = tl.load(out_ptr + (t * TOPK + j).to(tl.int64) * H + offs_h, mask=h_mask, other=0.0)
        y = (y + row.to(tl.float32)).to(dt).to(tl.float32)
    tl.store(y_ptr + t.to(tl.int64) * H + offs_h, y.to(dt), mask=h_mask)


# Tile sizes (moe.py reads them; BLOCK_N is the largest, moe.block_n halves it for narrow outputs; an EXL2
# projection's K tile is its groups' common divisor, exl2_kernels' BLOCK_K_CHOICES) and the signatures the AOT test
# compiles.
TILE = dict(BLOCK_M=16, BLOCK_N=64)
BLOCK_K = 64
ROUTE_CHUNK = 64
COMBINE_BLOCK = 256

_GATE_UP_SIG = {"x_ptr": "*{dt}", "rows_ptr": "*i32", "experts_ptr": "*i32", "act_ptr": "*{dt}", "t1": "*i64",
                "t3": "*i64", "A": "i32", "E": "i32", "K": "i32", "N": "i32", "p11": "i32", "p12": "i32",
                "p31": "i32", "p32": "i32", "stride_x": "i32", "TOPK": "constexpr", "FMT1": "constexpr",
                "FMT3": "constexpr", "BK1": "constexpr", "BK3": "constexpr", "ALN1": "constexpr",
                "ALN3": "constexpr", "ACT": "constexpr",
                "BLOCK_M": "constexpr", "BLOCK_N": "constexpr", "DOT_F32": "constexpr"}
_DOWN_SIG = {"act_ptr": "*{dt}", "rows_ptr": "*i32", "experts_ptr": "*i32", "rw_ptr": "*fp32", "out_ptr": "*{dt}",
             "t2": "*i64", "A": "i32", "E": "i32", "K": "i32", "N": "i32", "p21": "i32", "p22": "i32",
             "FMT2": "constexpr", "BK2": "constexpr", "ALN2": "constexpr", "BLOCK_M": "constexpr", "BLOCK_N": "constexpr",
             "DOT_F32": "constexpr"}

AOT_SPECS = [
    *({"kernel": "moe_route", "signature": {"ids_ptr": "*i64", "rows_ptr": "*i32", "experts_ptr": "*i32", "A": "i32",
                                            "E": "i32", "n_blocks": "i32", "BLOCK_M": "constexpr",
                                            "E_PAD": "constexpr", "CHUNK": "constexpr"},
       "constexprs": {"BLOCK_M": 16, "E_PAD": e_pad, "CHUNK": ROUTE_CHUNK}, "aot_default": e_pad == 128}
      for e_pad in (8, 128, 256)),
    *({"kernel": "moe_combine", "signature": {"out_ptr": f"*{dt}", "ids_ptr": "*i64", "y_ptr": f"*{dt}", "H": "i32",
                                              "TOPK": "constexpr", "K_PAD": "constexpr", "BLOCK_H": "constexpr"},
       "constexprs": {"TOPK": k, "K_PAD": 1 << (k - 1).bit_length(), "BLOCK_H": COMBINE_BLOCK},
       "aot_default": dt == "bf16" and k == 8} for dt in ("fp16", "bf16") for k in (1, 2, 6, 8)),
    *({"kernel": "moe_gate_up", "signature": {k: v.format(dt=dt) for k, v in _GATE_UP_SIG.items()},
       "constexprs": {**TILE, "BLOCK_N": bn, "TOPK": 2, "FMT1": fmt, "FMT3": fmt, "BK1": bk, "BK3": bk,
                      "ALN1": aln, "ALN3": aln, "ACT": act, "DOT_F32": False},
       "aot_default": dt == "bf16" and fmt == 16 and act == 0 and aln and bn == 64}
      for dt in ("fp16", "bf16") for fmt, bk in ((16, 64), (17, 32), (0, 64), (3, 64), (11, 64),
                                                  (32 + 16 + 2 + 1, 64), (32 + 32, 64))
      for act in (0, 2) for aln in (False, True)
      for bn in (64, 16)),
    *({"kernel": "moe_down", "signature": {k: v.format(dt=dt) for k, v in _DOWN_SIG.items()},
       "constexprs": {**TILE, "BLOCK_N": bn, "FMT2": fmt, "BK2": bk, "ALN2": aln, "DOT_F32": False},
       "aot_default": dt == "bf16" and fmt == 16 and aln and bn == 32}
      for dt in ("fp16", "bf16") for fmt, bk in ((16, 64), (17, 16), (0, 64), (5, 64), (9, 64), (32 + 16, 64))
      for aln in (False, True) for bn in (64, 32)),
]
