"""Triton kernel quantising new K or V rows into a quantized cache's pages (the reference:
ops/torch_ref/kv_quant.py, GroupQuant.quantize; the caller: ops/triton/attention_quant.py). One launch per
tensor per layer does what the reference's ~30 torch ops do; each program takes BLOCK_R groups of 32 values (a
group: one token's one KV head's 32 head-dim values).

Every step repeats the reference's fp32 arithmetic in the same order, so the codes and scales are bit-identical to
it (tests/test_paged_quant_cache.py compares them):
- the Hadamard rotation as the same 5 butterflies (a + b, a - b), on the 32 values of a group held as a
  (2, 2, 2, 2, 2) tensor, one index bit per axis: a butterfly over bit j splits its axis with two sums (each adds
  a value to an exact 0);
- the scale from the group's max and min, rounded to the scale dtype to nearest-even (done on the bits for bf16:
  the interpreter's bf16 conversion truncates);
- codes = round-half-even(x / scale) with an IEEE division (div_rn on a GPU, whose `/` is approximate), clamped,
  offset, packed two per byte for 4 bits (low nibble first).

Only builtins of triton.language and tl.reduce with the library's own combine functions (see attn_kernels.py: the
library's @jit helpers cannot run under an interpreter switched on after triton was imported).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .attn_kernels import _butterfly


@triton.jit
def kv_quant_write(X, Codes, Scales, slots, n_rows, kv_heads, n_groups, sx_tok, sx_h, sc_slot, sc_h, ss_slot, ss_h,
                   scale_max, BITS: tl.constexpr, BLOCK_R: tl.constexpr, SCALE_BF16: tl.constexpr,
                   EXACT_DIV: tl.constexpr):
    """One program quantises BLOCK_R groups: row r is group r % n_groups of KV head (r // n_groups) % kv_heads of
    new token r // (n_groups * kv_heads)."""
    r1 = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok1 = r1 < n_rows
    grp1 = r1 % n_groups
    head1 = ((r1 // n_groups) % kv_heads).to(tl.int64)
    tok1 = r1 // (n_groups * kv_heads)
    slot1 = tl.load(slots + tok1, mask=r_ok1, other=0).to(tl.int64)
    x_row = tok1.to(tl.int64) * sx_tok + head1 * sx_h + grp1 * 32
    s_row = slot1 * ss_slot + head1 * ss_h + grp1
    ar = tl.arange(0, 2)
    b4 = ar[None, :, None, None, None, None]
    b3 = ar[None, None, :, None, None, None]
    b2 = ar[None, None, None, :, None, None]
    b1 = ar[None, None, None, None, :, None]
    b0 = ar[None, None, None, None, None, :]
    within = b4 * 16 + b3 * 8 + b2 * 4 + b1 * 2 + b0
    ok = r_ok1[:, None, None, None, None, None] & (within >= 0)
    x = tl.load(X + x_row[:, None, None, None, None, None] + within, mask=ok, other=0.0).to(tl.float32)
    # the reference's butterflies run over index bits 0, 1, 2, 3, 4 in that order
    x = _butterfly(x, b0, 5)
    x = _butterfly(x, b1, 4)
    x = _butterfly(x, b2, 3)
    x = _butterfly(x, b3, 2)
    x = _butterfly(x, b4, 1)

    QNEG: tl.constexpr = 1 << (BITS - 1)
    QPOS: tl.constexpr = QNEG - 1
    flat = tl.reshape(x, (BLOCK_R, 32))
    hi = tl.maximum(tl.reduce(flat, 1, tl.standard._elementwise_max), 0.0)
    lo = tl.minimum(tl.reduce(flat, 1, tl.standard._elementwise_min), 0.0)
    if EXACT_DIV:
        hi = tl.math.div_rn(hi, tl.full(hi.shape, QPOS, tl.float32))
        lo = tl.math.div_rn(lo, tl.full(lo.shape, -QNEG, tl.float32))
    else:
        hi = hi / QPOS
        lo = lo / -QNEG
    s32 = tl.minimum(tl.maximum(hi, lo), scale_max)
    if SCALE_BF16:
        u = s32.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        sc = u.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        sc = s32.to(Scales.dtype.element_ty)
    tl.store(Scales + s_row, sc, mask=r_ok1)

    s = sc.to(tl.float32)
    s = tl.where(s > 0, s, 1.0)
    s6 = s[:, None, None, None, None, None]
    if EXACT_DIV:
        y = tl.math.div_rn(x, s6)
    else:
        y = x / s6
    f = tl.floor(y)
    r = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    q = tl.where(r > 0.5, f + 1.0, tl.where(r < 0.5, f, tl.where(odd, f + 1.0, f)))
    q = tl.minimum(tl.maximum(q, -QNEG), QPOS).to(tl.int32) + QNEG
    c_row = slot1 * sc_slot + head1 * sc_h + grp1 * (BITS * 4)  # a group's codes: 32 * BITS / 8 bytes
    if BITS == 4:
        packed = tl.reduce(tl.where(b0 == 0, q, q << 4), 5, tl.standard._sum_combine)
        poff = (ar[None, :, None, None, None] * 8 + ar[None, None, :, None, None] * 4
                + ar[None, None, None, :, None] * 2 + ar[None, None, None, None, :])
        tl.store(Codes + c_row[:, None, None, None, None] + poff, packed.to(tl.uint8),
                 mask=r_ok1[:, None, None, None, None] & (poff >= 0))
    else:
        tl.store(Codes + c_row[:, None, None, None, None, None] + within, q.to(tl.uint8), mask=ok)
