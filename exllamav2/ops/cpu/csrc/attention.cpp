// Attention on x86 CPUs with AVX-512: a few query rows per sequence (decode, speculative drafts), where torch's SDPA
// costs more in set-up than the work for one row, and prefills, where it is 3.4-5.4x torch's flash kernel (bf16,
// SmolLM2 shapes, 128-2048 tokens: python bench/bench_cpu_attention.py --prefill). Python side: exllamav2/ops/cpu/attention.py (head_dim a
// multiple of 16; the reference otherwise). Semantics are the reference's (exllamav2/ops/torch_ref/attention.py):
// q (b, hq, s, d), k/v (b, hk, t, d) with hq a multiple of hk (query head h reads kv head h / (hq/hk)), an
// optional bool mask broadcast as (b or 1, 1, s, t) (true = attend), causal alignment bottom-right (query i sees
// keys <= t - s + i), optional tanh softcap. Scores, softmax and the weighted sum are fp32 (for bf16 the
// probabilities are rounded to bf16 before they multiply v, as torch's flash kernel does); the output is rounded
// once to q's dtype; a fully masked row gives NaN (as the reference's softcap path; torch 2.13's SDPA gives 0).
//
// Work: the keys are cut into splits of kSplit keys at fixed positions (0, kSplit, 2 kSplit, ...), and one task
// is one (batch row, kv head, split): it reads the split's key and value rows once for the G*S query rows that
// share them and leaves, per row, the split's max score m, its sum of exp(score - m) l and its weighted sum of
// values; the task that finishes a (batch row, kv head) last merges its splits in split order. The split depends
// on nothing but the key positions, and keys a row cannot see contribute exact zeros (exp(-inf) = 0, m = -inf for
// a split it cannot see at all), so a row's result is bit-identical whatever the thread count, the other rows of
// the call (batch rows, query rows) and the keys beyond its last visible one: the team's rule that a request gives
// the same tokens alone or among others (tests/test_cpu_attention.py, tests/test_paged_chunk_invariance.py).
//
// `paged_decode_attention` runs the same tasks for one new token per sequence over a page-major cache (below).
// The per-split math: attention_kernels.h.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "attention_kernels.h"
#include "ops_api.h"

namespace {

using namespace attention_kernels;

constexpr int64_t kParallelMacs = 1 << 18;  // below this many multiply-adds a call runs on the calling thread

View view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

struct MergeState {  // per call, on the calling thread: partial results and a countdown per (batch row, kv head)
    std::vector<float> m, l, acc;
    std::unique_ptr<std::atomic<int64_t>[]> pending;
    int64_t pending_size = 0;
};

template <typename T>
void run_tasks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, View mv,
               at::Tensor& out, int64_t G, float scale, float softcap, bool causal) {
    Problem P{q.size(0), k.size(1), G, q.size(2), k.size(2), q.size(3), 0,
              view_of(q), view_of(k), view_of(v), mv, view_of(out), scale, softcap, causal};
    P.splits = (P.T + kSplit - 1) / kSplit;
    const int64_t R = G * P.S, heads = P.B * P.HK, NS = P.splits, tasks = heads * NS;
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    T* op = out.data_ptr<T>();
    static thread_local MergeState ms;
    const size_t parts = size_t(tasks * R);
    if (ms.m.size() < parts) ms.m.resize(parts), ms.l.resize(parts);
    if (ms.acc.size() < parts * P.D) ms.acc.resize(parts * P.D);
    if (ms.pending_size < heads) {
        ms.pending.reset(new std::atomic<int64_t>[heads]);
        ms.pending_size = heads;
    }
    for (int64_t i = 0; i < heads; ++i) ms.pending[i].store(NS, std::memory_order_relaxed);
    float *pm = ms.m.data(), *pl = ms.l.data(), *pa = ms.acc.data();
    std::atomic<int64_t>* pending = ms.pending.get();
    // small problems run on the calling thread: a parallel region costs more than they do
    const int64_t macs = 2 * R * P.T * P.D * heads;
    auto work = [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t bh = i / NS, sp = i % NS, b = bh / P.HK, h = bh % P.HK, t0 = sp * kSplit;
            split_task<T>(P, qp + b * P.qv.sb + h * G * P.qv.sh,
                          StridedRows<T>{kp + b * P.kv.sb + h * P.kv.sh + t0 * P.kv.ss, P.kv.ss},
                          StridedRows<T>{vp + b * P.vv.sb + h * P.vv.sh + t0 * P.vv.ss, P.vv.ss},
                          mp ? mp + b * P.mv.sb : nullptr, P.T, t0, 0, pm + i * R, pl + i * R, pa + i * R * P.D);
            // the last of this head's splits to finish merges them (acq_rel: it sees the others' writes)
            if (pending[bh].fetch_sub(1, std::memory_order_acq_rel) == 1)
                merge_splits<T>(P, NS, pm + bh * NS * R, pl + bh * NS * R, pa + bh * NS * R * P.D,
                                op + b * P.ov.sb + h * G * P.ov.sh);
        }
    };
    if (macs < kParallelMacs || tasks == 1)
        work(0, tasks);
    else
        at::parallel_for(0, tasks, 1, work);
}

// ---- many query rows per sequence (prefill): one task per (batch row, kv head, block of query rows) ---------------
// A block of rows runs the same splits at the same key positions as the few-row path above, over the keys up to
// its last row (causal), one split after another, and merges them in split order as merge_splits does there; the
// splits a causal block cannot see are never computed (they would leave m = -inf, which the merge skips). So a
// row's result is bit-identical to the few-row path's for that row alone, whatever the block it sits in.

constexpr int64_t kManyRows = 16;  // above this many query rows per sequence, tasks take blocks of rows

inline int64_t row_block(int64_t G) { return std::max<int64_t>(8, 64 / G); }  // ~64 score rows per task

struct BlockScratch {  // per thread: one block's per-split (m, l, acc)
    std::vector<float> m, l, acc;
};

template <typename T>
void run_row_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, View mv,
                    at::Tensor& out, int64_t G, float scale, float softcap, bool causal) {
    const Problem P{q.size(0), k.size(1), G, q.size(2), k.size(2), q.size(3), 0,
                    view_of(q), view_of(k), view_of(v), mv, view_of(out), scale, softcap, causal};
    const int64_t RB = row_block(G), nblocks = (P.S + RB - 1) / RB, tasks = P.B * P.HK * nblocks;
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    T* op = out.data_ptr<T>();
    // the keys a block reads: up to its last row's (causal), else all
    auto block_keys = [&](int64_t blk) {
        const int64_t end = std::min(P.S, (blk + 1) * RB);
        return causal ? P.T - P.S + end : P.T;
    };
    // tasks handed out costliest first (the last blocks of a causal prompt read the most keys), so two threads
    // finish together; the order of tasks changes no result
    std::atomic<int64_t> next{0};
    auto work = [&](int64_t, int64_t) {
        static thread_local BlockScratch bs;
        for (int64_t i = next.fetch_add(1); i < tasks; i = next.fetch_add(1)) {
            const int64_t blk = nblocks - 1 - i % nblocks, bh = i / nblocks, b = bh / P.HK, h = bh % P.HK;
            const int64_t a = blk * RB, rows = std::min(RB, P.S - a), T_ = block_keys(blk);
            Problem Pb = P;
            Pb.S = rows;
            Pb.T = T_;
            Pb.splits = (T_ + kSplit - 1) / kSplit;
            const int64_t R = G * rows, NS = Pb.splits;
            if (bs.m.size() < size_t(NS * R)) bs.m.resize(NS * R), bs.l.resize(NS * R);
            if (bs.acc.size() < size_t(NS * R * P.D)) bs.acc.resize(NS * R * P.D);
            const T* qb = qp + b * P.qv.sb + h * G * P.qv.sh + a * P.qv.ss;
            const bool* mb = mp ? mp + b * P.mv.sb + a * P.mv.ss : nullptr;
            for (int64_t sp = 0; sp < NS; ++sp) {
                const int64_t t0 = sp * kSplit;
                split_task<T>(Pb, qb, StridedRows<T>{kp + b * P.kv.sb + h * P.kv.sh + t0 * P.kv.ss, P.kv.ss},
                              StridedRows<T>{vp + b * P.vv.sb + h * P.vv.sh + t0 * P.vv.ss, P.vv.ss}, mb, T_, t0, 0,
                              bs.m.data() + sp * R, bs.l.data() + sp * R, bs.acc.data() + sp * R * P.D);
            }
            merge_splits<T>(Pb, NS, bs.m.data(), bs.l.data(), bs.acc.data(),
                            op + b * P.ov.sb + h * G * P.ov.sh + a * P.ov.ss);
        }
    };
    if (tasks == 1 || 2 * G * P.S * P.T * P.D * P.B * P.HK < kParallelMacs)
        work(0, 1);
    else
        at::parallel_for(0, at::get_num_threads(), 1, work);
}

template <typename T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, View mv,
         at::Tensor& out, int64_t G, float scale, float softcap, bool causal) {
    if (q.size(2) > kManyRows)
        run_row_blocks<T>(q, k, v, mask, mv, out, G, scale, softcap, causal);
    else
        run_tasks<T>(q, k, v, mask, mv, out, G, scale, softcap, causal);
}


at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                            const std::optional<at::Tensor>& mask_, double scale, double softcap, bool is_causal) {
    TORCH_CHECK(avx512_math::cpu_supported(), "exllamav2_cpu::decode_attention needs AVX-512 with BF16 (the Python "
                "side keeps the reference elsewhere)");
    TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, "decode_attention: q, k, v must be 4-D "
                "(batch, heads, seq, head_dim), got ", q_.sizes(), ", ", k_.sizes(), ", ", v_.sizes());
    TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
                "decode_attention: q, k, v must share a dtype");
    const int64_t B = q_.size(0), HQ = q_.size(1), S = q_.size(2), D = q_.size(3);
    const int64_t HK = k_.size(1), T_ = k_.size(2);
    TORCH_CHECK(k_.size(0) == B && v_.size(0) == B && v_.size(1) == HK && v_.size(2) == T_ && k_.size(3) == D &&
                v_.size(3) == D, "decode_attention: k and v must be (", B, ", hk, t, ", D, "), got ", k_.sizes(),
                " and ", v_.sizes());
    TORCH_CHECK(HK > 0 && HQ % HK == 0, "decode_attention: ", HQ, " query heads are not a multiple of ", HK,
                " kv heads");
    TORCH_CHECK(D % 16 == 0 && D <= kMaxD, "decode_attention: head_dim ", D, " must be a multiple of 16 up to ",
                kMaxD);
    TORCH_CHECK(!is_causal || S <= T_, "decode_attention: causal with more queries (", S, ") than keys (", T_, ")");
    auto lastdim = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
    const at::Tensor q = lastdim(q_), k = lastdim(k_), v = lastdim(v_);
    at::Tensor mask;
    View mv{0, 0, 0};
    if (mask_.has_value()) {
        TORCH_CHECK(mask_->scalar_type() == at::kBool && mask_->dim() == 4 && mask_->size(1) == 1 &&
                    (mask_->size(0) == 1 || mask_->size(0) == B) && mask_->size(2) == S && mask_->size(3) == T_,
                    "decode_attention: mask must be bool (", B, " or 1, 1, ", S, ", ", T_, "), got ",
                    mask_->sizes());
        mask = mask_->contiguous();
        mv = {mask.size(0) == 1 ? 0 : mask.stride(0), 0, mask.stride(2)};
    }
    // (b, s, hq, d) in memory, returned as its (b, hq, s, d) view (as torch's SDPA does): the caller's
    // transpose back to (b, s, hq * d) is then free
    at::Tensor out = at::empty({B, S, HQ, D}, q.options()).transpose(1, 2);
    if (out.numel() == 0) return out;
    if (T_ == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());  // no keys: every row fully masked
    const int64_t G = HQ / HK;
    const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
    switch (q.scalar_type()) {
        case at::kFloat: run<float>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        case at::kBFloat16: run<c10::BFloat16>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        case at::kHalf: run<c10::Half>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        default: TORCH_CHECK(false, "decode_attention: q must be float32, bfloat16 or float16, got ", q.scalar_type());
    }
    return out;
}

// ---- paged decode: one new token per sequence over a page-major cache --------------------------------------------
// Each sequence's keys are cut into splits at the same fixed positions as decode_attention's over that sequence's
// (1, hk, kv_len, d) view, a split's rows read through the block table (one strided range when its pages are
// consecutive, else one pointer per key), and a sliding window masks the keys before kv_len - window as
// window_mask's bool mask does: the result is bit-identical to decode_attention on the sequence alone
// (exllamav2/ops/torch_ref/attention.py: attend_sequence; tests/test_cpu_paged_decode.py).

struct PagedTables {
    const int64_t* block_index;  // (B, pages) row-major
    int64_t pages, page_size;
    const int64_t* kv_lens;
    int64_t window;  // 0: every key
};

template <typename T>
void run_paged(const at::Tensor& q, const at::Tensor& kflat, const at::Tensor& vflat, const PagedTables& pt,
               at::Tensor& out, int64_t G, float scale, float softcap) {
    const int64_t B = q.size(0), HK = kflat.size(1), D = q.size(2), R = G, ps = pt.page_size;
    Problem P{B, HK, G, 1, 0, D, 0, {q.stride(0), q.stride(1), 0}, {0, kflat.stride(1), kflat.stride(0)},
              {0, vflat.stride(1), vflat.stride(0)}, {0, 0, 0}, {out.stride(0), out.stride(1), 0}, scale, softcap,
              false};
    // tasks: per sequence b, HK heads x its splits, numbered from first[b] (head-major, so a head's partial results
    // sit together for its merge)
    static thread_local std::vector<int64_t> first_tasks;
    first_tasks.resize(B + 1);
    int64_t* first = first_tasks.data();
    first[0] = 0;
    int64_t keys = 0;
    for (int64_t b = 0; b < B; ++b) {
        first[b + 1] = first[b] + HK * ((pt.kv_lens[b] + kSplit - 1) / kSplit);
        keys += pt.kv_lens[b];
    }
    const int64_t tasks = first[B], heads = B * HK;
    static thread_local MergeState ms;
    const size_t parts = size_t(tasks * R);
    if (ms.m.size() < parts) ms.m.resize(parts), ms.l.resize(parts);
    if (ms.acc.size() < parts * D) ms.acc.resize(parts * D);
    if (ms.pending_size < heads) {
        ms.pending.reset(new std::atomic<int64_t>[heads]);
        ms.pending_size = heads;
    }
    for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < HK; ++h)
            ms.pending[b * HK + h].store((first[b + 1] - first[b]) / HK, std::memory_order_relaxed);
    float *pm = ms.m.data(), *pl = ms.l.data(), *pa = ms.acc.data();
    std::atomic<int64_t>* pending = ms.pending.get();
    const T *qp = q.data_ptr<T>(), *kp = kflat.data_ptr<T>(), *vp = vflat.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t kss = P.kv.ss, vss = P.vv.ss;
    auto work = [&](int64_t i0, int64_t i1) {
        const T* krow[kSplit];
        const T* vrow[kSplit];
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = std::upper_bound(first, first + B + 1, i) - first - 1;
            const int64_t NS = (first[b + 1] - first[b]) / HK, h = (i - first[b]) / NS, sp = (i - first[b]) % NS;
            const int64_t T_ = pt.kv_lens[b], t0 = sp * kSplit, n = std::min(kSplit, T_ - t0);
            const int64_t lo = pt.window > 0 ? std::max<int64_t>(0, T_ - pt.window) : 0;
            float *tm = pm + i * R, *tl = pl + i * R;
            if (t0 + n <= lo) {  // the whole split is outside the window: what its task would leave, m = -inf
                for (int64_t r = 0; r < R; ++r) tm[r] = -std::numeric_limits<float>::infinity(), tl[r] = 0.f;
            } else {
                const int64_t* table = pt.block_index + b * pt.pages;
                const T* qr = qp + b * P.qv.sb + h * G * P.qv.sh;
                const T *kh = kp + h * P.kv.sh, *vh = vp + h * P.vv.sh;
                const int64_t p0 = t0 / ps, p1 = (t0 + n - 1) / ps;
                bool consecutive = true;
                for (int64_t p = p0 + 1; p <= p1 && consecutive; ++p) consecutive = table[p] == table[p0] + (p - p0);
                if (consecutive) {
                    const int64_t slot = table[p0] * ps + t0 % ps;
                    split_task<T>(P, qr, StridedRows<T>{kh + slot * kss, kss}, StridedRows<T>{vh + slot * vss, vss},
                                  nullptr, T_, t0, lo, tm, tl, pa + i * R * D);
                } else {
                    for (int64_t j = 0; j < n; ++j) {
                        const int64_t t = t0 + j, slot = table[t / ps] * ps + t % ps;
                        krow[j] = kh + slot * kss;
                        vrow[j] = vh + slot * vss;
                    }
                    split_task<T>(P, qr, TableRows<T>{krow}, TableRows<T>{vrow}, nullptr, T_, t0, lo, tm, tl,
                                  pa + i * R * D);
                }
            }
            const int64_t bh = b * HK + h;
            if (pending[bh].fetch_sub(1, std::memory_order_acq_rel) == 1) {
                const int64_t h0 = first[b] + h * NS;
                merge_splits<T>(P, NS, pm + h0 * R, pl + h0 * R, pa + h0 * R * D, op + b * P.ov.sb + h * G * P.ov.sh);
            }
        }
    };
    const int64_t macs = 2 * R * keys * D * HK;
    if (macs < kParallelMacs || tasks == 1)
        work(0, tasks);
    else
        at::parallel_for(0, tasks, 1, work);
}

at::Tensor paged_decode_attention(const at::Tensor& q_, const at::Tensor& kflat_, const at::Tensor& vflat_,
                                  const at::Tensor& block_index_, const at::Tensor& kv_lens_, int64_t page_size,
                                  int64_t sliding_window, double scale, double softcap) {
    TORCH_CHECK(avx512_math::cpu_supported(), "exllamav2_cpu::paged_decode_attention needs AVX-512 with BF16 (the "
                "Python side keeps the reference elsewhere)");
    TORCH_CHECK(q_.dim() == 3, "paged_decode_attention: q must be (sequences, q heads, head_dim), got ", q_.sizes());
    TORCH_CHECK(kflat_.dim() == 3 && kflat_.sizes() == vflat_.sizes(), "paged_decode_attention: kflat and vflat "
                "must be (slots, kv heads, head_dim) of one shape, got ", kflat_.sizes(), " and ", vflat_.sizes());
    const auto dt = q_.scalar_type();
    TORCH_CHECK(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, "paged_decode_attention: q must be "
                "float32, bfloat16 or float16, got ", dt);
    TORCH_CHECK(kflat_.scalar_type() == dt && vflat_.scalar_type() == dt, "paged_decode_attention: kflat and vflat "
                "must have q's dtype ", dt, ", got ", kflat_.scalar_type(), " and ", vflat_.scalar_type());
    const int64_t B = q_.size(0), HQ = q_.size(1), D = q_.size(2), slots = kflat_.size(0), HK = kflat_.size(1);
    TORCH_CHECK(kflat_.size(2) == D, "paged_decode_attention: kflat's head_dim ", kflat_.size(2), " is not q's ", D);
    TORCH_CHECK(HK > 0 && HQ % HK == 0, "paged_decode_attention: ", HQ, " query heads are not a multiple of ", HK,
                " kv heads");
    TORCH_CHECK(D % 16 == 0 && D <= kMaxD, "paged_decode_attention: head_dim ", D, " must be a multiple of 16 up to ",
                kMaxD);
    TORCH_CHECK(block_index_.scalar_type() == at::kLong && block_index_.dim() == 2 && block_index_.size(0) == B,
                "paged_decode_attention: block_index must be int64 (", B, ", pages), got ", block_index_.scalar_type(),
                " ", block_index_.sizes());
    TORCH_CHECK(kv_lens_.scalar_type() == at::kLong && kv_lens_.dim() == 1 && kv_lens_.size(0) == B,
                "paged_decode_attention: kv_lens must be int64 (", B, "), got ", kv_lens_.scalar_type(), " ",
                kv_lens_.sizes());
    TORCH_CHECK(page_size > 0, "paged_decode_attention: page_size must be positive, got ", page_size);
    TORCH_CHECK(sliding_window >= 0, "paged_decode_attention: sliding_window must be >= 0 (0: none), got ",
                sliding_window);
    const at::Tensor block_index = block_index_.contiguous(), kv_lens = kv_lens_.contiguous();
    const int64_t* bi = block_index.data_ptr<int64_t>();
    const int64_t* lens = kv_lens.data_ptr<int64_t>();
    const int64_t pages = block_index.size(1);
    for (int64_t b = 0; b < B; ++b) {  // every slot the op will read exists
        const int64_t len = lens[b], need = (len + page_size - 1) / page_size;
        TORCH_CHECK(len >= 1, "paged_decode_attention: kv_lens[", b, "] = ", len, ", expected >= 1 (the new token's "
                    "key is in the cache)");
        TORCH_CHECK(need <= pages, "paged_decode_attention: block_index has ", pages, " pages per sequence; sequence ",
                    b, " needs ", need, " for kv_lens[", b, "] = ", len, " at page_size ", page_size);
        for (int64_t p = 0; p < need; ++p) {
            const int64_t page = bi[b * pages + p], used = std::min(page_size, len - p * page_size);
            TORCH_CHECK(page >= 0 && slots >= used && page <= (slots - used) / page_size,
                        "paged_decode_attention: block_index[", b, ", ", p, "] = ", page, " reads slots past the "
                        "cache's ", slots, " (page_size ", page_size, ")");
        }
    }
    auto lastdim = [](const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); };
    const at::Tensor q = lastdim(q_), kflat = lastdim(kflat_), vflat = lastdim(vflat_);
    at::Tensor out = at::empty({B, HQ, D}, q.options());
    if (out.numel() == 0) return out;
    const PagedTables pt{bi, pages, page_size, lens, sliding_window};
    const int64_t G = HQ / HK;
    const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
    switch (dt) {
        case at::kFloat: run_paged<float>(q, kflat, vflat, pt, out, G, sc, cap); break;
        case at::kBFloat16: run_paged<c10::BFloat16>(q, kflat, vflat, pt, out, G, sc, cap); break;
        default: run_paged<c10::Half>(q, kflat, vflat, pt, out, G, sc, cap); break;
    }
    return out;
}

}  // namespace

namespace exl2_ops {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale, double softcap, bool is_causal) {
    return ::decode_attention(q, k, v, mask, scale, softcap, is_causal);
}
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kflat, const at::Tensor& vflat,
                                  const at::Tensor& block_index, const at::Tensor& kv_lens, int64_t page_size,
                                  int64_t sliding_window, double scale, double softcap) {
    return ::paged_decode_attention(q, kflat, vflat, block_index, kv_lens, page_size, sliding_window, scale, softcap);
}
}  // namespace exl2_ops

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float softcap, bool is_causal) "
          "-> Tensor");
    m.def("paged_decode_attention(Tensor q, Tensor kflat, Tensor vflat, Tensor block_index, Tensor kv_lens, "
          "int page_size, int sliding_window, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("decode_attention", &decode_attention);
    m.impl("paged_decode_attention", &paged_decode_attention);
}
