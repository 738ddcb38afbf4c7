// The per-split math of the CPU attention kernels (attention.cpp: the ops `decode_attention` and
// `paged_decode_attention`, which schedule it): one task is one (sequence, kv head, split of kSplit keys at fixed
// positions); it computes the split's scores for the query rows that share the kv head, their softmax within the
// split and the weighted sum of its values, and `merge_splits` combines a head's splits in split order. The key and
// value rows of a split come through an accessor (StridedRows, TableRows), so a contiguous cache and a paged one
// run the same instructions on the same values.
//
// Scores: per (query row, key) one 16-lane accumulator over head_dim, and 16 keys' accumulators summed into one
// vector of 16 scores by a fixed transpose-and-add tree (one horizontal reduction per key cost 3x more).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")))

namespace attention_kernels {

constexpr int kMaxD = 256;
constexpr int64_t kSplit = 128;  // keys per task; fixed, so that a row's arithmetic never depends on the call

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

struct Problem {  // T, splits: decode_attention's key count and splits (the paged op's vary per sequence)
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

inline Scratch& scratch() {
    static thread_local Scratch s;
    return s;
}

// RT rows x dims [col, col + 16 DC): acc += sum over the split's n keys of p(row, key) v(key)
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

}  // namespace attention_kernels
