"""Triton kernels of the attention ops (the ops: attention.py, attention_paged.py; launches: attn_launch.py;
launch metadata: attn_meta.py).

- `attn_fwd`: flash attention for one (tile of query rows, KV head, KV split). A tile's rows are (token, query head
  of the KV head's group) pairs, row = token * G + g, so the G query heads that share a KV head read each K/V
  block once (GQA without copies). Keys are read through the sequence's block table (PAGED) or from a contiguous
  per-batch-row prefix. Causal alignment is bottom-right: query token i of a sequence with q_len new tokens and
  kv_len keys sits at position kv_len - q_len + i.
- `attn_combine`: merges the KV splits of one (row, head) in a fixed order (no atomics).
- `kv_write`: copies new K/V rows into their cache slots.

Quantized pages (K_FMT / V_FMT, cache_q.py's formats; the reference: ops/torch_ref/kv_quant.py): 0 reads float
pages as they are; 4 and 8 read group codes (4 bits, two per byte, low nibble first; or 8 bits) and one scale per 32
values and dequantise them in registers; 2 reads FP8 e5m2 bytes (the high byte of an fp16). Group codes hold
Hadamard-rotated values, and the kernel does not un-rotate them: H is symmetric with H @ H = 32 I, so
q . (H g / 32) = (H q / 32) . g, and sum_j p_j (H g_j / 32) = H (sum_j p_j g_j) / 32. A program rotates its query
tile once after loading it and its output tile once before storing it (`_rotate_groups`), and the loop over keys
stays a plain dot product over the stored groups.

Split-KV (decode): a sequence's keys are cut into splits of `split_size` keys, a multiple of BLOCK_N that depends
only on that sequence's kv_len (never on the batch), and each split is one program; blocks sit at absolute key
positions that are multiples of BLOCK_N, so a row's reduction order depends only on its own sequence and a request
gives the same bits alone or batched.

Only builtins of triton.language are used (tl.full, not tl.zeros; ceil divisions written out, not tl.cdiv;
tl.reduce with tl.max's and tl.sum's own combine functions, which the interpreter recognises and runs as numpy
reductions): the library's @jit helpers are decorated when triton is imported, and if that happened before
TRITON_INTERPRET was set, the interpreter cannot call them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _split_size(kv_len, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per split: at least MIN_SPLIT (a multiple of every BLOCK_N), and large enough that at most MAX_SPLITS
    splits cover kv_len."""
    per = ((kv_len + MAX_SPLITS - 1) // MAX_SPLITS + BLOCK_N - 1) // BLOCK_N * BLOCK_N
    return tl.maximum(per, MIN_SPLIT)


@triton.jit
def _load_kv(base, s_base, slot, dd, kv_mask, s_slot, ss_slot, FMT: tl.constexpr):
    """A block of keys or values (slots x head dim) as stored (FMT 0) or dequantised (FMT 4, 8: codes times their
    group's scale, still rotated; FMT 2: FP8 e5m2). Masked-off lanes read as 0."""
    if FMT == 0:
        x = tl.load(base + slot[:, None] * s_slot + dd[None, :], mask=kv_mask, other=0.0)
    elif FMT == 2:
        b = tl.load(base + slot[:, None] * s_slot + dd[None, :], mask=kv_mask, other=0)
        x = (b.to(tl.uint16) << 8).to(tl.float16, bitcast=True)
    else:
        if FMT == 4:
            b = tl.load(base + slot[:, None] * s_slot + (dd // 2)[None, :], mask=kv_mask, other=0)
            c = ((b.to(tl.int32) >> ((dd % 2) * 4)[None, :]) & 15) - 8
        else:
            c = tl.load(base + slot[:, None] * s_slot + dd[None, :], mask=kv_mask, other=0).to(tl.int32) - 128
        sc = tl.load(s_base + slot[:, None] * ss_slot + (dd // 32)[None, :], mask=kv_mask, other=0.0)
        x = c.to(tl.float32) * sc.to(tl.float32)
    return x


@triton.jit
def _butterfly(x, sel, AXIS: tl.constexpr):
    a = tl.reduce(tl.where(sel == 0, x, 0.0), AXIS, tl.standard._sum_combine, keep_dims=True)
    b = tl.reduce(tl.where(sel == 1, x, 0.0), AXIS, tl.standard._sum_combine, keep_dims=True)
    return tl.where(sel == 0, a + b, a - b)


@triton.jit
def _rotate_groups(x, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """x (ROWS, BLOCK_D) fp32 -> each group of 32 columns times H / 32: the reference's butterflies
    (ops/torch_ref/kv_quant.py::hadamard_rotate) in its order, on a (rows, groups, 2, 2, 2, 2, 2) view (a butterfly
    over an index bit splits its axis with two sums, each adding a value to an exact 0)."""
    y = tl.reshape(x, (ROWS, BLOCK_D // 32, 2, 2, 2, 2, 2))
    ar = tl.arange(0, 2)
    y = _butterfly(y, ar[None, None, None, None, None, None, :], 6)
    y = _butterfly(y, ar[None, None, None, None, None, :, None], 5)
    y = _butterfly(y, ar[None, None, None, None, :, None, None], 4)
    y = _butterfly(y, ar[None, None, None, :, None, None, None], 3)
    y = _butterfly(y, ar[None, None, :, None, None, None, None], 2)
    return tl.reshape(y, (ROWS, BLOCK_D)) * (1.0 / 32)


@triton.jit
def _attn_block(q, m_i, l_i, acc, start, k_hi, k_base, v_base, ks_base, vs_base, block_table, Mask, seq, tok, qpos,
                row_ok, dd, d_ok, sk_slot, sv_slot, sks_slot, svs_slot, sm_seq, sm_q, sm_k, sbt, page_size, scale,
                softcap, window, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, CAUSAL: tl.constexpr,
                HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr,
                K_FMT: tl.constexpr, V_FMT: tl.constexpr):
    """One BLOCK_N block of keys at absolute positions start.. into the online softmax (m_i, l_i, acc)."""
    kpos = start + tl.arange(0, BLOCK_N)
    k_ok = kpos < k_hi
    if PAGED:
        page = tl.load(block_table + seq * sbt + kpos // page_size, mask=k_ok, other=0)
        slot = page.to(tl.int64) * page_size + kpos % page_size
    else:
        slot = kpos.to(tl.int64)
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k = _load_kv(k_base, ks_base, slot, dd, kv_mask, sk_slot, sks_slot, K_FMT).to(q.dtype)
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    if SOFTCAP:
        # softcap * tanh(s / softcap), tanh written with exp (saturates cleanly to +-1 in fp32)
        s = softcap * (1.0 - 2.0 / (tl.exp(2.0 * s / softcap) + 1.0))
    valid = row_ok[:, None] & k_ok[None, :]
    if CAUSAL:
        valid = valid & (kpos[None, :] <= qpos[:, None])
    if HAS_WINDOW:
        valid = valid & ((qpos[:, None] - kpos[None, :]) < window)
    if HAS_MASK:
        mval = tl.load(Mask + seq * sm_seq + tok[:, None] * sm_q + kpos[None, :] * sm_k, mask=valid, other=0)
        valid = valid & (mval != 0)
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.reduce(s, 1, tl.standard._elementwise_max))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_use[:, None])
    alpha = tl.exp(m_i - m_use)
    l_i = l_i * alpha + tl.reduce(p, 1, tl.standard._sum_combine)
    v = _load_kv(v_base, vs_base, slot, dd, kv_mask, sv_slot, svs_slot, V_FMT).to(q.dtype)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v)
    m_i = m_new
    return m_i, l_i, acc


@triton.jit
def attn_fwd(Q, K, V, KScale, VScale, Out, PartO, PartL, Mask,
             block_table, kv_lens, q_starts, q_lens, part_base, tile_seq, tile_m,
             sq_seq, sq_tok, sq_h,
             sk_seq, sk_h, sk_slot,
             sv_seq, sv_h, sv_slot,
             sks_h, sks_slot, svs_h, svs_slot,
             so_seq, so_tok, so_h,
             sm_seq, sm_q, sm_k,
             sbt, spo_row, spo_h, spo_split, spl_row, spl_h,
             page_size, head_dim, scale, softcap, window,
             G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             PAGED: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, HAS_WINDOW: tl.constexpr,
             SOFTCAP: tl.constexpr, SPLIT: tl.constexpr, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr,
             DOT_F32: tl.constexpr, IEEE: tl.constexpr, WHILE_LOOP: tl.constexpr, K_FMT: tl.constexpr,
             V_FMT: tl.constexpr):
    tile = tl.program_id(0)
    # 64-bit offsets: a batch row or KV head of a large cache lies beyond 2**31 elements
    kvh = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    seq = tl.load(tile_seq + tile).to(tl.int64)
    mb = tl.load(tile_m + tile)
    q_len = tl.load(q_lens + seq)
    kv_len = tl.load(kv_lens + seq)
    q0 = tl.load(q_starts + seq)

    rows = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // G
    head = kvh * G + rows % G
    row_ok = tok < q_len
    qpos = kv_len - q_len + tok
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim

    if SPLIT:
        split_size = _split_size(kv_len, MIN_SPLIT, MAX_SPLITS, BLOCK_N)
        n_splits = (kv_len + split_size - 1) // split_size
        k_lo = split * split_size
        k_hi = tl.minimum(kv_len, k_lo + split_size)
    else:
        n_splits = 1
        k_lo = 0
        k_hi = kv_len
    # the keys this tile can see at all: up to its last row's position (causal), from its first row's window
    first_tok = tl.minimum((mb * BLOCK_M) // G, q_len - 1)
    last_tok = tl.minimum((mb * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    if CAUSAL:
        k_hi = tl.minimum(k_hi, kv_len - q_len + last_tok + 1)
    if HAS_WINDOW:
        k_lo = tl.maximum(k_lo, ((kv_len - q_len + first_tok - window + 1) // BLOCK_N) * BLOCK_N)

    q_ptr = Q + seq * sq_seq + (q0 + tok)[:, None] * sq_tok + head[:, None] * sq_h + dd[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if K_FMT == 4 or K_FMT == 8:  # keys stored rotated: q' = q H / 32, rounded to q's dtype as the keys' dots take it
        q = _rotate_groups(q.to(tl.float32), BLOCK_M, BLOCK_D).to(Q.dtype.element_ty)
    if DOT_F32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.full([BLOCK_M], 0.0, tl.float32)
    acc = tl.full([BLOCK_M, BLOCK_D], 0.0, tl.float32)
    k_base = K + seq * sk_seq + kvh * sk_h
    v_base = V + seq * sv_seq + kvh * sv_h
    ks_base = KScale + kvh * sks_h  # scales of quantized pages (paged only: no batch axis)
    vs_base = VScale + kvh * svs_h
    if WHILE_LOOP:
        # the interpreter (with numpy 2) cannot turn a loaded scalar into a range() bound; a GPU build keeps the
        # for loop, which Triton software-pipelines
        start = k_lo
        while start < k_hi:
            m_i, l_i, acc = _attn_block(q, m_i, l_i, acc, start, k_hi, k_base, v_base, ks_base, vs_base, block_table,
                                        Mask, seq, tok, qpos, row_ok, dd, d_ok, sk_slot, sv_slot, sks_slot,
                                        svs_slot, sm_seq, sm_q, sm_k, sbt, page_size, scale, softcap, window,
                                        BLOCK_N, PAGED, CAUSAL, HAS_MASK, HAS_WINDOW, SOFTCAP, IEEE, K_FMT, V_FMT)
            start += BLOCK_N
    else:
        for start in range(k_lo, k_hi, BLOCK_N):
            m_i, l_i, acc = _attn_block(q, m_i, l_i, acc, start, k_hi, k_base, v_base, ks_base, vs_base, block_table,
                                        Mask, seq, tok, qpos, row_ok, dd, d_ok, sk_slot, sv_slot, sks_slot,
                                        svs_slot, sm_seq, sm_q, sm_k, sbt, page_size, scale, softcap, window,
                                        BLOCK_N, PAGED, CAUSAL, HAS_MASK, HAS_WINDOW, SOFTCAP, IEEE, K_FMT, V_FMT)

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    if V_FMT == 4 or V_FMT == 8:  # values stored rotated: o = o' H / 32 (linear, so split partials may be merged after)
        o = _rotate_groups(o, BLOCK_M, BLOCK_D)
    if SPLIT:
        prow = tl.load(part_base + seq) + tok
        ok = row_ok & ((tok * 0 + split) < n_splits)  # vector compare: Triton 3.9 interprets scalar & vector as int32
        lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(PartL + prow * spl_row + head * spl_h + split, lse, mask=ok)
        po = PartO + prow[:, None] * spo_row + head[:, None] * spo_h + split * spo_split + dd[None, :]
        tl.store(po, o, mask=ok[:, None] & d_ok[None, :])
    else:
        o_ptr = Out + seq * so_seq + (q0 + tok)[:, None] * so_tok + head[:, None] * so_h + dd[None, :]
        tl.store(o_ptr, o.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def attn_combine(PartO, PartL, Out, part_seq, part_tok, kv_lens, q_starts,
                 spo_row, spo_h, spo_split, spl_row, spl_h, so_seq, so_tok, so_h, head_dim,
                 BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MIN_SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr):
    """out = sum_s w_s o_s / sum_s w_s, w_s = exp(lse_s - max lse), over the row's splits. The reduction always
    spans MAX_SPLITS lanes (a power of two; absent splits weigh 0), never a width taken from the batch, so its
    order, and with it the result, is the same whatever else is batched."""
    prow = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(part_seq + prow).to(tl.int64)
    tok = tl.load(part_tok + prow)
    kv_len = tl.load(kv_lens + seq)
    split_size = _split_size(kv_len, MIN_SPLIT, MAX_SPLITS, BLOCK_N)
    n_splits = (kv_len + split_size - 1) // split_size
    sp = tl.arange(0, MAX_SPLITS)
    s_ok = sp < n_splits
    dd = tl.arange(0, BLOCK_D)
    d_ok = dd < head_dim
    lse = tl.load(PartL + prow * spl_row + head * spl_h + sp, mask=s_ok, other=float("-inf"))
    mx = tl.reduce(lse, 0, tl.standard._elementwise_max)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp(lse - mx)
    o = tl.load(PartO + prow * spo_row + head * spo_h + sp[:, None] * spo_split + dd[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    num = tl.reduce(w[:, None] * o, 0, tl.standard._sum_combine)
    den = tl.reduce(w, 0, tl.standard._sum_combine)
    res = num / tl.where(den > 0.0, den, 1.0)
    q0 = tl.load(q_starts + seq)
    tl.store(Out + seq * so_seq + (q0 + tok) * so_tok + head * so_h + dd, res.to(Out.dtype.element_ty), mask=d_ok)


@triton.jit
def kv_write(K, V, KC, VC, slots, sk_tok, sk_h, sv_tok, sv_h, skc_h, skc_slot, svc_h, svc_slot, head_dim,
             BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slots + t).to(tl.int64)
    dd = tl.arange(0, BLOCK_D)
    ok = dd < head_dim
    k = tl.load(K + t * sk_tok + h * sk_h + dd, mask=ok)
    v = tl.load(V + t * sv_tok + h * sv_h + dd, mask=ok)
    tl.store(KC + h * skc_h + slot * skc_slot + dd, k.to(KC.dtype.element_ty), mask=ok)
    tl.store(VC + h * svc_h + slot * svc_slot + dd, v.to(VC.dtype.element_ty), mask=ok)
