// The per-split math of the CPU attention kernels (attention.cpp: the ops `decode_attention` and
// `paged_decode_attention`, which schedule it): one task is one (sequence, kv head, split of kSplit keys at fixed
// positions); it computes the split's scores for the query rows that share the kv head, their softmax within the
// split and the weighted sum of its values, and `merge_splits` combines a head's splits in split order. The key and
// value rows of a split come through an accessor (StridedRows, TableRows), so a contiguous cache and a paged one
// run the same instructions on the same values.
//
// Scores: keys laid out in quads, one order of sums per score for any number of rows (compute_scores below).

#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#include "avx512_math.h"

namespace attention_kernels {

constexpr int kMaxD = 256;
constexpr int64_t kSplit = 128;  // keys per task; fixed, so that a row's arithmetic never depends on the call

using avx512_math::in_fours;
using avx512_math::load16;

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
    std::vector<float> qe, scores, kb, vb, pb;  // kb, vb, pb: 32-bit units (bf16 pairs or fp32)
    void fit(int64_t R, int64_t D) {
        if (qe.size() < size_t(R * D)) qe.resize(R * D);
        if (scores.size() < size_t(R * kSplit)) scores.resize(R * kSplit);
        if (kb.size() < size_t(kSplit * kMaxD)) kb.resize(kSplit * kMaxD);
        if (vb.size() < size_t(kSplit * kMaxD)) vb.resize(kSplit * kMaxD);
        if (pb.size() < size_t(R * kSplit / 2)) pb.resize(R * kSplit / 2);
    }
};

inline Scratch& scratch() {
    static thread_local Scratch s;
    return s;
}

// ---- weighted sum for fp32 and fp16: FMAs over fp32 p ------------------------------------------------------------
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
    in_fours(D / 16, [&](auto dc, int64_t c) {
        weighted_sum_tile<T, RT, decltype(dc)::value>(pr, kSplit, v, 16 * c, n, ar + 16 * c, D);
    });
}

// ---- weighted sum for bf16: vdpbf16ps over pairs of keys ---------------------------------------------------------
// p is rounded to bf16 (round to nearest even) before it multiplies v, as torch's CPU flash attention does for
// bf16 inputs; products and sums stay fp32. One instruction then takes two keys for 16 dims, half the FMAs' count.
// For more than 4 rows the split's values are laid out once per task as pairs of keys (vb[(tp * D/16 + cc) * 16 +
// lane] holds dim 16 cc + lane of keys 2 tp and 2 tp + 1, the second zero past n); for up to 4 rows the same pairs
// are formed as they are read. A row's p as bf16 pairs in pb (zero past n).

// dims [32 c, 32 c + 32) of a bf16 row (the upper 16 zero when `half`; all zero for no row)
AVX512_TARGET inline __m512i load_dims32(const uint16_t* row, int64_t c, bool half) {
    if (!row) return _mm512_setzero_si512();
    return half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + 32 * c)))
                : _mm512_loadu_si512(row + 32 * c);
}

// keys 2 tp and 2 tp + 1 (b null past n), dims [32 c, 32 c + 32) -> two vectors of 16 dims, each lane a key pair
AVX512_TARGET inline void interleave_pair(const uint16_t* a, const uint16_t* b, int64_t c, bool half, __m512i* lo,
                                          __m512i* hi) {
    // per 128-bit lane k: 64-bit units k and 4 + k (dims 4k..4k+3 and 16+4k..16+4k+3), so that the 16-bit
    // interleaves give dims 0..15 (low halves) and 16..31 (high halves) in order
    const __m512i units = _mm512_setr_epi64(0, 4, 1, 5, 2, 6, 3, 7);
    const __m512i x = _mm512_permutexvar_epi64(units, load_dims32(a, c, half));
    const __m512i y = _mm512_permutexvar_epi64(units, load_dims32(b, c, half));
    *lo = _mm512_unpacklo_epi16(x, y);
    *hi = _mm512_unpackhi_epi16(x, y);
}

template <typename Rows>
AVX512_TARGET inline const uint16_t* pair_row(Rows v, int64_t t, int64_t n) {
    return t < n ? reinterpret_cast<const uint16_t*>(v(t)) : nullptr;
}

template <typename Rows>
AVX512_TARGET void layout_values_bf16(Rows v, int64_t n, int64_t D, uint32_t* vb) {
    const int64_t nc = (D + 31) / 32, DC16 = D / 16;
    const bool half = D % 32 != 0;
    for (int64_t tp = 0; tp < (n + 1) / 2; ++tp)
        for (int64_t c = 0; c < nc; ++c) {
            const bool h = half && c == nc - 1;
            __m512i lo, hi;
            interleave_pair(pair_row(v, 2 * tp, n), pair_row(v, 2 * tp + 1, n), c, h, &lo, &hi);
            uint32_t* dst = vb + (tp * DC16 + 2 * c) * 16;
            _mm512_storeu_si512(dst, lo);
            if (!h) _mm512_storeu_si512(dst + 16, hi);
        }
}

// a few rows (decode): all R rows x all dims, the pairs interleaved as they are read (no layout to amortize)
template <int RT, typename Rows>
AVX512_TARGET void weighted_sum_bf16_direct(const uint32_t* pb, Rows v, int64_t n, int64_t D, int64_t cc0, float* acc) {
    constexpr int DC = 4;  // 64 dims per pass, the last pass masked to D
    const int64_t DC16 = D / 16, dcs = std::min<int64_t>(DC, DC16 - cc0);
    __m512 a[RT][DC];
    for (int r = 0; r < RT; ++r)
        for (int c = 0; c < DC; ++c) a[r][c] = _mm512_setzero_ps();
    for (int64_t tp = 0; tp < (n + 1) / 2; ++tp) {
        __m512i vt[DC];
        const uint16_t *x = pair_row(v, 2 * tp, n), *y = pair_row(v, 2 * tp + 1, n);
        for (int c = 0; c < DC; c += 2)
            if (c < dcs) interleave_pair(x, y, (cc0 + c) / 2, c + 1 >= dcs, &vt[c], &vt[c + 1]);
        for (int r = 0; r < RT; ++r) {
            const __m512i pr = _mm512_set1_epi32(static_cast<int>(pb[r * (kSplit / 2) + tp]));
            for (int c = 0; c < DC; ++c)
                if (c < dcs) a[r][c] = _mm512_dpbf16_ps(a[r][c], (__m512bh)pr, (__m512bh)vt[c]);
        }
    }
    for (int r = 0; r < RT; ++r)
        for (int c = 0; c < DC; ++c)
            if (c < dcs) _mm512_storeu_ps(acc + r * D + 16 * (cc0 + c), a[r][c]);
}

// RT rows x dims [16 cc0, 16 (cc0 + DC)): acc = sum over the split's np key pairs of p(row, pair) . v(pair)
template <int RT, int DC>
AVX512_TARGET void weighted_sum_bf16_tile(const uint32_t* pb, const uint32_t* vb, int64_t DC16, int64_t cc0,
                                          int64_t np, float* acc, int64_t D) {
    __m512 a[RT][DC];
    for (int r = 0; r < RT; ++r)
        for (int c = 0; c < DC; ++c) a[r][c] = _mm512_setzero_ps();
    for (int64_t tp = 0; tp < np; ++tp) {
        __m512i vt[DC];
        for (int c = 0; c < DC; ++c) vt[c] = _mm512_loadu_si512(vb + (tp * DC16 + cc0 + c) * 16);
        for (int r = 0; r < RT; ++r) {
            const __m512i pr = _mm512_set1_epi32(static_cast<int>(pb[r * (kSplit / 2) + tp]));
            for (int c = 0; c < DC; ++c) a[r][c] = _mm512_dpbf16_ps(a[r][c], (__m512bh)pr, (__m512bh)vt[c]);
        }
    }
    for (int r = 0; r < RT; ++r)
        for (int c = 0; c < DC; ++c) _mm512_storeu_ps(acc + r * D + 16 * (cc0 + c), a[r][c]);
}

template <int RT>
AVX512_TARGET void weighted_sum_bf16_rows(const uint32_t* pb, const uint32_t* vb, int64_t np, float* acc, int64_t D) {
    const int64_t DC16 = D / 16;
    in_fours(DC16, [&](auto dc, int64_t c) {
        weighted_sum_bf16_tile<RT, decltype(dc)::value>(pb, vb, DC16, c, np, acc, D);
    });
}

// R rows of p (fp32, the split's n keys; the scratch past n may hold anything) -> bf16 pairs, then the sums
template <typename Rows>
AVX512_TARGET void weighted_sum_bf16(const float* p, Rows v, int64_t n, int64_t R, int64_t D, float* acc,
                                     Scratch& w) {
    uint32_t* vb = reinterpret_cast<uint32_t*>(w.vb.data());
    uint32_t* pb = reinterpret_cast<uint32_t*>(w.pb.data());
    const int64_t np = (n + 1) / 2;
    for (int64_t r = 0; r < R; ++r)
        for (int64_t t = 0; t < n; t += 32) {
            const __mmask16 lo = static_cast<__mmask16>(n - t >= 16 ? 0xffff : (1u << (n - t)) - 1u);
            const __mmask16 hi = static_cast<__mmask16>(n - t >= 32 ? 0xffff : n - t <= 16 ? 0 : (1u << (n - t - 16)) - 1u);
            const __m512bh x = _mm512_cvtne2ps_pbh(_mm512_maskz_loadu_ps(hi, p + r * kSplit + t + 16),
                                                   _mm512_maskz_loadu_ps(lo, p + r * kSplit + t));
            _mm512_storeu_si512(pb + r * (kSplit / 2) + t / 2, (__m512i)x);
        }
    if (R <= 4) {  // the same products and sums, without the layout: one call of width R
        in_fours(R, [&](auto rt, int64_t) {
            for (int64_t cc = 0; cc < D / 16; cc += 4) weighted_sum_bf16_direct<decltype(rt)::value>(pb, v, n, D, cc, acc);
        });
        return;
    }
    layout_values_bf16(v, n, D, vb);
    in_fours(R, [&](auto rt, int64_t r0) {
        weighted_sum_bf16_rows<decltype(rt)::value>(pb + r0 * (kSplit / 2), vb, np, acc + r0 * D, D);
    });
}

// ---- scores ------------------------------------------------------------------------------------------------------
// A row's elements are 32-bit units: pairs of dims for bf16 (vdpbf16ps multiplies and adds a pair: two bf16
// products are exact in fp32, added in turn), single fp32 dims for fp32 and fp16 (converted on load, then FMA);
// E = D/2 or D of them, a multiple of 8. A split's keys are laid out once per task in blocks of 16 keys, and per
// block, quarter-group g (elements 4g..4g+3) and key quad kq (keys 4kq..4kq+3) one vector holds those 4 keys' 4
// elements: lane 4i + c = key 4kq + i, element 4g + c. A query row's 4 elements of group g are broadcast to the
// 4 quarters, so lane (i, c) sums the products of elements c, c + 4, c + 8, ... in order, and each score is then
// (class 0 + class 2) + (class 1 + class 3). That order is the same for any number of rows, which is what keeps a
// row's bits independent of its neighbours; the layout costs a 4 x 4 shuffle of 128-bit pieces per 16 keys and 16
// elements (shared by all the rows of the task) and 10 instructions per row and 16 keys for the sums, against 45
// for a full horizontal sum of 16 lanes per score.

template <typename T>
constexpr int64_t elems(int64_t D) {
    return std::is_same_v<T, c10::BFloat16> ? D / 2 : D;
}

// elements [16 c, 16 c + 16) of a row (the upper 8 zero when `half`): bf16 pairs as they are, else fp32
template <typename T>
AVX512_TARGET inline __m512i load_elems(const T* row, int64_t c, bool half) {
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const T* p = row + 32 * c;
        return half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
                    : _mm512_loadu_si512(p);
    } else if constexpr (std::is_same_v<T, float>) {
        const float* p = row + 16 * c;
        return half ? _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)))
                    : _mm512_loadu_si512(p);
    } else {
        const T* p = row + 16 * c;
        const __m256i h = half ? _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)))
                               : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castps_si512(_mm512_cvtph_ps(h));
    }
}

// the split's n keys in quads (see above): kb[((b * G4 + g) * 4 + kq) * 16 + lane], zero keys past n
template <typename T, typename Rows>
AVX512_TARGET void layout_keys(Rows k, int64_t n, int64_t D, uint32_t* kb) {
    const int64_t E = elems<T>(D), G4 = E / 4, nc = (E + 15) / 16;
    const bool half = E % 16 != 0;
    for (int64_t b = 0; b < (n + 15) / 16; ++b)
        for (int64_t kq = 0; kq < 4; ++kq) {
            const int64_t j0 = 16 * b + 4 * kq;
            for (int64_t c = 0; c < nc; ++c) {
                const bool h = half && c == nc - 1;
                __m512i r[4];
                for (int i = 0; i < 4; ++i) r[i] = j0 + i < n ? load_elems(k(j0 + i), c, h) : _mm512_setzero_si512();
                const __m512i t0 = _mm512_shuffle_i32x4(r[0], r[1], 0x44), t1 = _mm512_shuffle_i32x4(r[0], r[1], 0xee);
                const __m512i t2 = _mm512_shuffle_i32x4(r[2], r[3], 0x44), t3 = _mm512_shuffle_i32x4(r[2], r[3], 0xee);
                const __m512i v[4] = {_mm512_shuffle_i32x4(t0, t2, 0x88), _mm512_shuffle_i32x4(t0, t2, 0xdd),
                                      _mm512_shuffle_i32x4(t1, t3, 0x88), _mm512_shuffle_i32x4(t1, t3, 0xdd)};
                for (int q = 0; q < (h ? 2 : 4); ++q)
                    _mm512_storeu_si512(kb + ((b * G4 + 4 * c + q) * 4 + kq) * 16, v[q]);
            }
        }
}

// 4 quad accumulators of 16 keys -> their 16 scores in key order: per key (class 0 + 2) + (class 1 + 3)
AVX512_TARGET inline __m512 reduce_quads(const __m512* a) {
    const __m512 s01 = _mm512_add_ps(_mm512_unpacklo_ps(a[0], a[1]), _mm512_unpackhi_ps(a[0], a[1]));
    const __m512 s23 = _mm512_add_ps(_mm512_unpacklo_ps(a[2], a[3]), _mm512_unpackhi_ps(a[2], a[3]));
    const __m512d x = _mm512_castps_pd(s01), y = _mm512_castps_pd(s23);
    // quarter i: keys i, 4 + i, 8 + i, 12 + i
    const __m512 s = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    const __m512i to_keys = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    return _mm512_permutexvar_ps(to_keys, s);
}

// rows [r0, r0 + RT) x key blocks [b0, b0 + NB): scores (scaled) into the scratch rows
template <bool BF16, int RT, int NB>
AVX512_TARGET void score_tile(const uint32_t* qe, const uint32_t* kb, int64_t E, int64_t r0, int64_t b0,
                              float scale_, float* scores) {
    const int64_t G4 = E / 4;
    const __m512 scale = _mm512_set1_ps(scale_);
    __m512 a[RT][4 * NB];
    for (int r = 0; r < RT; ++r)
        for (int x = 0; x < 4 * NB; ++x) a[r][x] = _mm512_setzero_ps();
    for (int64_t g = 0; g < G4; ++g) {
        __m512i kv[4 * NB];
        for (int x = 0; x < 4 * NB; ++x) kv[x] = _mm512_loadu_si512(kb + (((b0 + x / 4) * G4 + g) * 4 + x % 4) * 16);
        for (int r = 0; r < RT; ++r) {
            const __m512i qv = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(qe + (r0 + r) * E + 4 * g)));
            for (int x = 0; x < 4 * NB; ++x) {
                if constexpr (BF16)
                    a[r][x] = _mm512_dpbf16_ps(a[r][x], (__m512bh)qv, (__m512bh)kv[x]);
                else
                    a[r][x] = _mm512_fmadd_ps(_mm512_castsi512_ps(qv), _mm512_castsi512_ps(kv[x]), a[r][x]);
            }
        }
    }
    for (int r = 0; r < RT; ++r)
        for (int b = 0; b < NB; ++b)
            _mm512_storeu_ps(scores + (r0 + r) * kSplit + 16 * (b0 + b), _mm512_mul_ps(reduce_quads(a[r] + 4 * b), scale));
}

// rows [r0, r0 + RT) over all nb blocks: two blocks at a time for one or two rows (enough independent sums)
template <bool BF16, int RT>
AVX512_TARGET void score_rows(const uint32_t* qe, const uint32_t* kb, int64_t E, int64_t r0, int64_t nb, float scale,
                              float* scores) {
    int64_t b = 0;
    if constexpr (RT <= 2)
        for (; b + 2 <= nb; b += 2) score_tile<BF16, RT, 2>(qe, kb, E, r0, b, scale, scores);
    for (; b < nb; ++b) score_tile<BF16, RT, 1>(qe, kb, E, r0, b, scale, scores);
}

// the split's scores (R rows x n keys, scaled) into the scratch: query rows as elements, keys laid out in quads
template <typename T, typename Rows>
AVX512_TARGET void compute_scores(const Problem& P, const T* q, Rows k, int64_t n, Scratch& w) {
    constexpr bool BF16 = std::is_same_v<T, c10::BFloat16>;
    const int64_t R = P.G * P.S, D = P.D, E = elems<T>(D), nc = (E + 15) / 16, nb = (n + 15) / 16;
    const bool half = E % 16 != 0;
    uint32_t* qe = reinterpret_cast<uint32_t*>(w.qe.data());
    uint32_t* kb = reinterpret_cast<uint32_t*>(w.kb.data());
    for (int64_t r = 0; r < R; ++r) {
        const T* qr = q + (r / P.S) * P.qv.sh + (r % P.S) * P.qv.ss;
        for (int64_t c = 0; c < nc; ++c) {
            const bool h = half && c == nc - 1;
            const __m512i x = load_elems(qr, c, h);
            if (h)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(qe + r * E + 16 * c), _mm512_castsi512_si256(x));
            else
                _mm512_storeu_si512(qe + r * E + 16 * c, x);
        }
    }
    layout_keys<T>(k, n, D, kb);
    float* sc = w.scores.data();
    in_fours(R, [&](auto rt, int64_t r0) { score_rows<BF16, decltype(rt)::value>(qe, kb, E, r0, nb, P.scale, sc); });
}

// One (batch row or sequence, kv head, split): keys [t0, t0 + n) of its T keys, whose rows are k(j), v(j) for key
// t0 + j; keys before `lo` are masked (a sliding window), as are those `mask` (its row starts at key 0) excludes.
// Leaves per row: m (max score), l (sum of exp(score - m)), acc (sum of exp(score - m) v) in out_m/out_l/out_acc.
template <typename T, typename Rows>
AVX512_TARGET void split_task(const Problem& P, const T* q, Rows k, Rows v, const bool* mask, int64_t T_, int64_t t0,
                              int64_t lo, float* out_m, float* out_l, float* out_acc) {
    const int64_t S = P.S, D = P.D, R = P.G * S;
    const int64_t n = std::min(kSplit, T_ - t0);
    Scratch& w = scratch();
    w.fit(R, D);
    // scores (R, n) in fp32 rows of the scratch
    float* scores = w.scores.data();
    compute_scores<T>(P, q, k, n, w);
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
                const __m512 e = avx512_math::exp_ps(_mm512_sub_ps(_mm512_loadu_ps(sr + 16 * b), mv));
                _mm512_storeu_ps(sr + 16 * b, e);
                lsum = _mm512_add_ps(lsum, e);
            }
        }
        out_m[r] = m;
        out_l[r] = _mm512_reduce_add_ps(lsum);
    }
    // weighted sum of the split's values
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        weighted_sum_bf16(scores, v, n, R, D, out_acc, w);
        return;
    }
    // fp32 and fp16: FMAs over fp32 p, 4 rows at a time
    in_fours(R, [&](auto rt, int64_t r0) { weighted_sum_rows<T, decltype(rt)::value>(scores, v, n, out_acc, D, r0); });
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
