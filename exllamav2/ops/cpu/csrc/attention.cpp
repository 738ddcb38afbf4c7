// Attention for a few query rows per sequence (decode, speculative drafts, the paged path's 16-row query blocks)
// on x86 CPUs with AVX-512, where torch's SDPA costs more in set-up than the work for one row.
// Python side: exllamav2/ops/cpu/attention.py (which takes it only for <= MAX_QUERIES query rows and head_dim a
// multiple of 16; the reference otherwise). Semantics are the reference's (exllamav2/ops/torch_ref/attention.py):
// q (b, hq, s, d), k/v (b, hk, t, d) with hq a multiple of hk (query head h reads kv head h / (hq/hk)), an
// optional bool mask broadcast as (b or 1, 1, s, t) (true = attend), causal alignment bottom-right (query i sees
// keys <= t - s + i), optional tanh softcap. Scores, softmax and the weighted sum are fp32; the output is rounded
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
// Scores: per (query row, key) one 16-lane accumulator over head_dim, and 16 keys' accumulators summed into one
// vector of 16 scores by a fixed transpose-and-add tree (one horizontal reduction per key cost 3x more).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")))

namespace {

constexpr int kMaxD = 256;
constexpr int64_t kSplit = 128;  // keys per task; fixed, so that a row's arithmetic never depends on the call
constexpr int64_t kParallelMacs = 1 << 18;  // below this many multiply-adds a call runs on the calling thread

template <typename T>
AVX512_TARGET inline __m512 load16(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
        return _mm512_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
}

// exp(x) for x <= 0 (a score minus its row's max): exp(0) = 1 exactly, exp(-inf) = 0 exactly, NaN stays NaN.
// Cephes' expf: x = n ln2 + r with |r| <= ln2/2 (ln2 in two parts), a degree-7 polynomial in r, times 2^n by
// scalef (which underflows to 0 below 2^-149). Relative error within 2 ulp of fp32 (Cephes: 1.7e-7 peak).
AVX512_TARGET inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);  // -inf -> -200 (exp underflows to 0); NaN (2nd operand) kept
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
    return _mm512_scalef_ps(p, n);
}

// 16 vectors -> one vector whose lane j is the sum of a[j]'s 16 lanes (fixed tree: same sums for every call)
AVX512_TARGET inline __m512 sum16(__m512* a) {
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; ++i)  // lanes per 128-bit quarter: a0 a1 partial sums, interleaved
        b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; ++i) {
        const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
        c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    // c[i]: each 128-bit quarter q holds keys 4i..4i+3's partial sums over lanes 4q..4q+3
    for (int i = 0; i < 2; ++i)
        e[i] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * i], c[2 * i + 1], 0xdd));
    // e[i]'s quarters: keys 8i..8i+3 (twice: two halves of the lanes), then keys 8i+4..8i+7 (twice)
    return _mm512_add_ps(_mm512_shuffle_f32x4(e[0], e[1], 0x88), _mm512_shuffle_f32x4(e[0], e[1], 0xdd));
}

struct View {  // strides in elements; the last dimension is contiguous
    int64_t sb, sh, ss;
};

// A split's key (or value) rows, row j of the split (0 <= j < its key count): the same arithmetic reads them
// whether they are one strided range (a contiguous cache, or one page) or gathered through a block table.
template <typename T>
struct StridedRows {
    const T* base;  // the split's first row
    int64_t stride;
    const T* operator()(int64_t j) const { return base + j * stride; }
};

template <typename T>
struct TableRows {
    const T* const* rows;  // the split's rows, one pointer each
    const T* operator()(int64_t j) const { return rows[j]; }
};

struct Problem {
    int64_t B, HK, G, S, T, D, splits;
    View qv, kv, vv, mv, ov;
    float scale, softcap;
    bool causal;
};

// per-thread scratch, grown once, never freed: no allocation per call or task
struct Scratch {
    std::vector<float> qf, scores, kf;
    void fit(int64_t R, int64_t D) {
        if (qf.size() < size_t(R * (D + 16))) qf.resize(R * (D + 16));  // bf16: pairs padded to 32 dims
        if (scores.size() < size_t(R * kSplit)) scores.resize(R * kSplit);
        if (kf.size() < size_t(16 * kMaxD)) kf.resize(16 * kMaxD);
    }
};

Scratch& scratch() {
    static thread_local Scratch s;
    return s;
}

// rows [r0, r0 + RT) x dims [16 c0, 16 (c0 + DC)): acc += sum over the split's n keys of p(row, key) v(key)
template <typename T, int RT, int DC, typename Rows>
AVX512_TARGET void weighted_sum_tile(const float* p, int64_t pstride, Rows v, int64_t col, int64_t n, float* acc,
                                     int64_t astride) {
    __m512 a[RT][DC];
    for (int r = 0; r < RT; ++r)
        for (int c = 0; c < DC; ++c) a[r][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
        __m512 vt[DC];
        const T* vr = v(t) + col;
        for (int c = 0; c < DC; ++c) vt[c] = load16(vr + 16 * c);
        for (int r = 0; r < RT; ++r) {
            const __m512 pr = _mm512_set1_ps(p[r * pstride + t]);
            for (int c = 0; c < DC; ++c) a[r][c] = _mm512_fmadd_ps(pr, vt[c], a[r][c]);
        }
    }
    for (int r = 0; r < RT; ++r)
        for (int c = 0; c < DC; ++c) _mm512_storeu_ps(acc + r * astride + 16 * c, a[r][c]);
}

template <typename T, int RT, typename Rows>
AVX512_TARGET void weighted_sum_rows(const float* p, Rows v, int64_t n, float* acc, int64_t D, int64_t r0) {
    const float* pr = p + r0 * kSplit;
    float* ar = acc + r0 * D;
    int64_t c = 0, nv = D / 16;
    for (; c + 4 <= nv; c += 4) weighted_sum_tile<T, RT, 4>(pr, kSplit, v, 16 * c, n, ar + 16 * c, D);
    switch (nv - c) {
        case 3: weighted_sum_tile<T, RT, 3>(pr, kSplit, v, 16 * c, n, ar + 16 * c, D); break;
        case 2: weighted_sum_tile<T, RT, 2>(pr, kSplit, v, 16 * c, n, ar + 16 * c, D); break;
        case 1: weighted_sum_tile<T, RT, 1>(pr, kSplit, v, 16 * c, n, ar + 16 * c, D); break;
        default: break;
    }
}

// fp32/fp16 scores: per (row, key) a 16-lane fp32 accumulator over head_dim in order, then sum16 and the scale
template <typename T, typename Rows>
AVX512_TARGET void scores_fp32(const Problem& P, const float* qf, Rows k, int64_t n, Scratch& w) {
    const int64_t R = P.G * P.S, D = P.D, nv = D / 16;
    const __m512 scale = _mm512_set1_ps(P.scale);
    float* kf = w.kf.data();
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t nk = std::min<int64_t>(16, n - j0);
        // the block's keys in fp32, chunk-major: kf[(c * 16 + j) * 16 + lane] = k(key j0 + j, dim 16 c + lane)
        for (int64_t j = 0; j < 16; ++j) {
            const T* src = j < nk ? k(j0 + j) : nullptr;
            for (int64_t c = 0; c < nv; ++c)
                _mm512_storeu_ps(kf + (c * 16 + j) * 16, j < nk ? load16(src + 16 * c) : _mm512_setzero_ps());
        }
        for (int64_t r = 0; r < R; ++r) {
            const float* qr = qf + r * D;
            __m512 a[16];
            const __m512 q0 = _mm512_loadu_ps(qr);
            for (int j = 0; j < 16; ++j) a[j] = _mm512_mul_ps(q0, _mm512_loadu_ps(kf + j * 16));
            for (int64_t c = 1; c < nv; ++c) {
                const __m512 qc = _mm512_loadu_ps(qr + 16 * c);
                const float* kc = kf + c * 256;
                for (int j = 0; j < 16; ++j) a[j] = _mm512_fmadd_ps(qc, _mm512_loadu_ps(kc + j * 16), a[j]);
            }
            _mm512_storeu_ps(w.scores.data() + r * kSplit + j0, _mm512_mul_ps(sum16(a), scale));
        }
    }
}

// bf16 scores: vdpbf16ps on pairs of dims (products of two bf16 are exact in fp32, each pair added in turn with
// one rounding, as two FMAs: no conversion of q or k), 32 dims per instruction, then sum16 and the scale
AVX512_TARGET inline __m512i load_pairs(const uint16_t* p, bool half) {  // 32 bf16, or 16 and zeros
    return half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
                : _mm512_loadu_si512(p);
}

template <typename Rows>
AVX512_TARGET void scores_bf16(const Problem& P, const uint16_t* q, Rows k, int64_t n, Scratch& w) {
    const int64_t R = P.G * P.S, D = P.D, nc = (D + 31) / 32;
    const bool half = D % 32 != 0;  // the last 32-dim chunk holds 16 dims
    const __m512 scale = _mm512_set1_ps(P.scale);
    // q rows as pairs, chunk-major per row; k's block as pairs, chunk-major: kb[(c * 16 + j) * 16 + pair]
    uint32_t* qb = reinterpret_cast<uint32_t*>(w.qf.data());
    uint32_t* kb = reinterpret_cast<uint32_t*>(w.kf.data());
    for (int64_t r = 0; r < R; ++r) {
        const uint16_t* qr = q + (r / P.S) * P.qv.sh + (r % P.S) * P.qv.ss;
        for (int64_t c = 0; c < nc; ++c)
            _mm512_storeu_si512(qb + (r * nc + c) * 16, load_pairs(qr + 32 * c, half && c == nc - 1));
    }
    for (int64_t j0 = 0; j0 < n; j0 += 16) {
        const int64_t nk = std::min<int64_t>(16, n - j0);
        for (int64_t j = 0; j < 16; ++j) {
            const uint16_t* src = j < nk ? reinterpret_cast<const uint16_t*>(k(j0 + j)) : nullptr;
            for (int64_t c = 0; c < nc; ++c)
                _mm512_storeu_si512(kb + (c * 16 + j) * 16, j < nk ? load_pairs(src + 32 * c, half && c == nc - 1)
                                                                   : _mm512_setzero_si512());
        }
        for (int64_t r = 0; r < R; ++r) {
            __m512 a[16];
            for (int j = 0; j < 16; ++j) a[j] = _mm512_setzero_ps();
            for (int64_t c = 0; c < nc; ++c) {
                const __m512i qc = _mm512_loadu_si512(qb + (r * nc + c) * 16);
                const uint32_t* kc = kb + c * 256;
                for (int j = 0; j < 16; ++j)
                    a[j] = _mm512_dpbf16_ps(a[j], (__m512bh)qc, (__m512bh)_mm512_loadu_si512(kc + j * 16));
            }
            _mm512_storeu_ps(w.scores.data() + r * kSplit + j0, _mm512_mul_ps(sum16(a), scale));
        }
    }
}

// One (batch row or sequence, kv head, split): keys [t0, t0 + n) of its T keys, whose rows are k(j), v(j) for key
// t0 + j; keys before `lo` are masked (a sliding window), as are those `mask` (its row starts at key 0) excludes.
// Leaves per row: m (max score), l (sum of exp(score - m)), acc (sum of exp(score - m) v) in out_m/out_l/out_acc.
template <typename T, typename Rows>
AVX512_TARGET void split_task(const Problem& P, const T* q, Rows k, Rows v, const bool* mask, int64_t T_, int64_t t0,
                              int64_t lo, float* out_m, float* out_l, float* out_acc) {
    const int64_t G = P.G, S = P.S, D = P.D, R = G * S, nv = D / 16;
    const int64_t n = std::min(kSplit, T_ - t0);
    Scratch& w = scratch();
    w.fit(R, D);
    float* qf = w.qf.data();
    if constexpr (!std::is_same_v<T, c10::BFloat16>)
        for (int64_t g = 0; g < G; ++g)
            for (int64_t s = 0; s < S; ++s) {
                const T* qr = q + g * P.qv.sh + s * P.qv.ss;
                for (int64_t c = 0; c < nv; ++c)
                    _mm512_storeu_ps(qf + (g * S + s) * D + 16 * c, load16(qr + 16 * c));
            }
    // scores (R, n) for 16 keys at a time, in fp32 rows of the scratch
    float* scores = w.scores.data();
    if constexpr (std::is_same_v<T, c10::BFloat16>)
        scores_bf16(P, reinterpret_cast<const uint16_t*>(q), k, n, w);
    else
        scores_fp32<T>(P, qf, k, n, w);
    // softmax within the split, per row: masked keys -inf, then p = exp(score - m) in place
    const __m512 ninf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    const int64_t nb = (n + 15) / 16;
    for (int64_t r = 0; r < R; ++r) {
        const int64_t s = r % S;
        float* sr = scores + r * kSplit;
        if (P.softcap > 0.f)
            for (int64_t t = 0; t < n; ++t) sr[t] = P.softcap * std::tanh(sr[t] / P.softcap);
        // keys [t0, t0 + visible) pass causality (and the split's end)
        const int64_t visible = P.causal ? std::max<int64_t>(0, std::min(n, T_ - S + s - t0 + 1)) : n;
        const bool* mr = mask ? mask + s * P.mv.ss + t0 : nullptr;
        __m512 mx = ninf;
        for (int64_t b = 0; b < nb; ++b) {
            const int64_t lim = std::min<int64_t>(16, std::max<int64_t>(0, visible - 16 * b));
            __mmask16 keep = static_cast<__mmask16>((1u << lim) - 1u);
            if (lo > t0 + 16 * b)  // keys before the window
                keep &= static_cast<__mmask16>(~((1u << std::min<int64_t>(16, lo - t0 - 16 * b)) - 1u));
            if (mr && keep) {
                const __m128i mb = _mm_maskz_loadu_epi8(keep, mr + 16 * b);
                keep &= _mm_test_epi8_mask(mb, mb);
            }
            const __m512 x = _mm512_mask_loadu_ps(ninf, keep, sr + 16 * b);
            _mm512_storeu_ps(sr + 16 * b, x);
            mx = _mm512_max_ps(mx, x);
        }
        const float m = _mm512_reduce_max_ps(mx);
        __m512 lsum = _mm512_setzero_ps();
        if (m == -std::numeric_limits<float>::infinity()) {  // nothing visible here: p = 0, l = 0
            for (int64_t b = 0; b < nb; ++b) _mm512_storeu_ps(sr + 16 * b, lsum);
        } else {
            const __m512 mv = _mm512_set1_ps(m);
            for (int64_t b = 0; b < nb; ++b) {
                const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(sr + 16 * b), mv));
                _mm512_storeu_ps(sr + 16 * b, e);
                lsum = _mm512_add_ps(lsum, e);
            }
        }
        out_m[r] = m;
        out_l[r] = _mm512_reduce_add_ps(lsum);
    }
    // weighted sum of the split's values, 4 rows at a time
    int64_t r0 = 0;
    for (; r0 + 4 <= R; r0 += 4) weighted_sum_rows<T, 4>(scores, v, n, out_acc, D, r0);
    switch (R - r0) {
        case 3: weighted_sum_rows<T, 3>(scores, v, n, out_acc, D, r0); break;
        case 2: weighted_sum_rows<T, 2>(scores, v, n, out_acc, D, r0); break;
        case 1: weighted_sum_rows<T, 1>(scores, v, n, out_acc, D, r0); break;
        default: break;
    }
}

// out rows of one (batch row, kv head) from its splits' (m, l, acc), merged in split order
template <typename T>
AVX512_TARGET void merge_splits(const Problem& P, int64_t NS, const float* m, const float* l, const float* acc,
                                T* out) {
    const int64_t R = P.G * P.S, D = P.D;
    const float ninf = -std::numeric_limits<float>::infinity();
    alignas(64) float row[kMaxD];
    for (int64_t r = 0; r < R; ++r) {
        float mx = ninf;
        for (int64_t i = 0; i < NS; ++i) mx = std::fmax(mx, m[i * R + r]);
        float sum = 0.f;
        for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(row + 16 * c, _mm512_setzero_ps());
        for (int64_t i = 0; i < NS; ++i) {
            // exp(0) = 1 and exp(-inf) = 0 exactly: a row whose keys all sit in one split gets that split's sums
            const float e = m[i * R + r] == ninf ? 0.f : std::exp(m[i * R + r] - mx);
            if (e == 0.f) continue;
            sum += l[i * R + r] * e;
            const __m512 ev = _mm512_set1_ps(e);
            const float* a = acc + (i * R + r) * D;
            for (int64_t c = 0; c < D / 16; ++c)
                _mm512_storeu_ps(row + 16 * c, _mm512_add_ps(_mm512_loadu_ps(row + 16 * c),
                                                             _mm512_mul_ps(_mm512_loadu_ps(a + 16 * c), ev)));
        }
        const float inv = 1.f / sum;  // a fully masked row: 0 * inf = NaN
        const int64_t g = r / P.S, s = r % P.S;
        T* o = out + g * P.ov.sh + s * P.ov.ss;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(row[d] * inv);
    }
}

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

bool avx512_ok() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("f16c");
}

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                            const std::optional<at::Tensor>& mask_, double scale, double softcap, bool is_causal) {
    TORCH_CHECK(avx512_ok(), "exllamav2_cpu::decode_attention needs AVX-512 with BF16 (the Python side keeps "
                "the reference elsewhere)");
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
    at::Tensor out = at::empty({B, HQ, S, D}, q.options());
    if (out.numel() == 0) return out;
    if (T_ == 0) return out.fill_(std::numeric_limits<float>::quiet_NaN());  // no keys: every row fully masked
    const int64_t G = HQ / HK;
    const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
    switch (q.scalar_type()) {
        case at::kFloat: run_tasks<float>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        case at::kBFloat16: run_tasks<c10::BFloat16>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        case at::kHalf: run_tasks<c10::Half>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
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
    TORCH_CHECK(avx512_ok(), "exllamav2_cpu::paged_decode_attention needs AVX-512 with BF16 (the Python side keeps "
                "the reference elsewhere)");
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
