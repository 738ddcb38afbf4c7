// GGUF Q4_0/Q4_1/Q8_0/Q4_K GEMV inner kernels (no torch, so they can be built alone; bench/bench_cpu_kernels.py times them).
// The torch op around them is gemv.cpp; the weight layout is made by exllamav2/ops/cpu/gguf_pack.py.
//
// Weight layout (gguf_pack.py): output rows in groups of 16 (padded); per (group, 32-column block) one record, the
// records in column order and the groups one after another, so a thread streams one sequential range:
//   codes, 4-bit: 4 chunks x 16 rows x 4 bytes; byte i of chunk c of row r holds column 4c+i (low nibble) and
//          16+4c+i (high nibble), the GGUF block's own byte order, only interleaved over 16 rows;
//   codes, 8-bit: 8 chunks x 16 rows x 4 bytes, column 4c+i, stored as q + 128 (unsigned);
//   then the 16 rows' fp16 scales d, and for Q4_1 their fp16 offsets m (records of 288, 320, 544 bytes);
//   Q4_K: each 32-column sub-block's codes in the 4-bit layout, then its 16 rows' 6-bit scales sc and mins mn as
//   uint8 (288 bytes), and beside the records per group and 256-column super-block the fp16 d and dmin (2 x 16),
//   so w = (d*sc) * q - (dmin*mn): d*sc and dmin*mn are exact in fp32 (11-bit by 6-bit products), the file's own
//   weights (4.625 bits per weight against the file's 4.5).
// A 32-bit lane of a vector holds 4 weights of one output row, so the activation's 4 matching int8 values are
// broadcast to all lanes and one vpdpbusd advances 16 output rows.
//
// Activations: per 32-column block, x ~ sx * (256*q1 + q2) with sx = amax/127/256: q1 = round(x/(256 sx)) is
// llama.cpp's whole int8 quantisation, q2 = round(residual/sx) (|q2| <= 128, clamped to 127) carries its rounding
// error. One stage alone costs about 0.5% relative error per dot product, more than bf16 activations (0.2-0.4%),
// enough to move whole-model logits past tests/test_backends.py's tolerance; with q2 the activation error is ~1e-5.
// Because the two stages differ by exactly 2^8, their dot products combine in int32 (256*dot1 + dot2: at most
// 32*255*127*257 < 2^31), and the code offset of Q4_0 (-8) and Q8_0 (-128, the stored +128) is subtracted in
// integers too (the accumulator starts at -offset * (256*sum(q1) + sum(q2))). Per row and block that leaves one
// int->float conversion and one FMA: acc += cvt(s) * (d*sx)  [+ m * (sx*sum) for Q4_1, - dmin*mn * (sx*sum) for Q4_K].
// The AVX2 path computes the same integers (vpmaddubsw) and the same float operations in the same order, so its
// outputs are bit-identical. A row's instruction sequence never depends on the other rows of the call.
//
// One stage (two_stage false, TWO = false; ops.set_cpu_activations("int8")): q2 is 0 and its products are skipped,
// which is llama.cpp's own q8_0 activation (x ~ d1 * q1, d1 = amax/127) at half the dot products: the kernels are
// then the two-stage kernels given q2 = 0, bit for bit; compute-bound calls (prefill, batches) ~1.2-1.4x faster.
#pragma once

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace gguf_kernels {

constexpr int kBlock = 32;   // columns per quant block
constexpr int kGroup = 16;   // output rows per interleaved group
constexpr int kMaxRows = 8;  // activation rows per kernel call

enum Kind : int { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q4_K = 3 };

// The packed weight (gguf_pack.py).
struct Weights {
    const uint8_t* rec;     // (groups, blocks) records
    const uint16_t* super;  // Q4_K: fp16 (groups, blocks / 8, 2, 16) d, dmin; null otherwise
};

// bytes of codes per (group, block), and of the whole record
constexpr int code_bytes(int kind) { return kind == Q8_0 ? 512 : 256; }
constexpr int record_bytes(int kind) { return code_bytes(kind) + (kind == Q4_1 ? 64 : 32); }
// the code offset subtracted in integers (Q4_1's and Q4_K's offsets are floats per row and block)
constexpr int code_offset(int kind) { return kind == Q4_0 ? 8 : kind == Q8_0 ? 128 : 0; }

// A chunk of up to kMaxRows activation rows quantised, block-major with the rows side by side (one base pointer
// and constant offsets in the kernels: no per-row pointers to keep in registers): per block and row 64 bytes
// (q1[32], q2[32]), sx, the int sum 256*sum(q1) + sum(q2), and (for Q4_1 / Q4_K) xs = sx * that sum.
struct QuantX {
    const int8_t* q;      // (K/32, kMaxRows, 64)
    const float* sx;      // (K/32, kMaxRows)
    const int32_t* nsum;  // (K/32, kMaxRows)
    const float* xs;      // (K/32, kMaxRows)
    int64_t K;
};

// x (K floats) -> per block b: 64 bytes at q + b * stride * 64, and sx, nsum, xs [b * stride] (stride: the rows
// of a chunk side by side). Scalar on purpose: it is the contract (nearbyint: ties to even) that the vector
// quantisers below reproduce bit for bit.
inline void quantize_row(const float* x, int64_t K, int8_t* q, float* sx, int32_t* nsum, float* xs, int64_t stride,
                         bool two_stage = true) {
    const int64_t nb = K / kBlock;
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * kBlock;
        int8_t* qb = q + b * stride * 64;
        float amax = 0.f;
        for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
        const float d1 = amax / 127.f;
        const float s = d1 * (1.f / 256.f);
        const float id1 = d1 > 0.f ? 1.f / d1 : 0.f, id2 = s > 0.f ? 1.f / s : 0.f;
        int n1 = 0, n2 = 0;
        for (int j = 0; j < kBlock; ++j) {
            const int v1 = static_cast<int>(std::nearbyint(xb[j] * id1));
            const float r = xb[j] - d1 * static_cast<float>(v1);
            int v2 = static_cast<int>(std::nearbyint(r * id2));
            v2 = !two_stage ? 0 : v2 > 127 ? 127 : v2 < -127 ? -127 : v2;
            qb[j] = static_cast<int8_t>(v1);
            qb[32 + j] = static_cast<int8_t>(v2);
            n1 += v1;
            n2 += v2;
        }
        sx[b * stride] = s;
        nsum[b * stride] = 256 * n1 + n2;
        xs[b * stride] = s * static_cast<float>(nsum[b * stride]);
    }
}

// The same quantisation, 16 (AVX-512) or 8 (AVX2) columns per instruction, bit-identical to quantize_row for finite
// inputs: the same float operations per element (x*id1 rounded to nearest even by vcvtps2dq under the default
// MXCSR, as nearbyint; d1*v1 and the subtraction unfused), the max and the integer sums exact in any order.
// The input is read in its own dtype (IN: float, or the bits of bf16 / fp16, widened exactly as c10 does).
enum InType : int { IN_F32 = 0, IN_BF16 = 1, IN_F16 = 2 };

template <int IN>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline __m512 load16_f32(const void* p) {
    if constexpr (IN == IN_F32) return _mm512_loadu_ps(p);
    const __m256i h = _mm256_loadu_si256(static_cast<const __m256i*>(p));
    if constexpr (IN == IN_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    return _mm512_cvtph_ps(h);
}

template <int IN>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void quantize_row_avx512(
        const void* x, int64_t K, int8_t* q, float* sx, int32_t* nsum, float* xs, int64_t stride,
        bool two_stage = true) {
    constexpr int kElem = IN == IN_F32 ? 4 : 2;
    const char* xp = static_cast<const char*>(x);
    const int64_t nb = K / kBlock;
    const __m512i lim = _mm512_set1_epi32(two_stage ? 127 : 0), nlim = _mm512_set1_epi32(two_stage ? -127 : 0);
    for (int64_t b = 0; b < nb; ++b) {
        const __m512 x0 = load16_f32<IN>(xp + (b * kBlock) * kElem), x1 = load16_f32<IN>(xp + (b * kBlock + 16) * kElem);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
        const float d1 = amax / 127.f;
        const float s = d1 * (1.f / 256.f);
        const float id1 = d1 > 0.f ? 1.f / d1 : 0.f, id2 = s > 0.f ? 1.f / s : 0.f;
        const __m512 vd1 = _mm512_set1_ps(d1), vid1 = _mm512_set1_ps(id1), vid2 = _mm512_set1_ps(id2);
        __m512i v1[2], v2[2];
        const __m512 xv[2] = {x0, x1};
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            v1[h] = _mm512_cvtps_epi32(_mm512_mul_ps(xv[h], vid1));
            const __m512 r = _mm512_sub_ps(xv[h], _mm512_mul_ps(vd1, _mm512_cvtepi32_ps(v1[h])));
            v2[h] = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(r, vid2)), nlim), lim);
        }
        int8_t* qb = q + b * stride * 64;
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb), _mm512_cvtepi32_epi8(v1[0]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 16), _mm512_cvtepi32_epi8(v1[1]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 32), _mm512_cvtepi32_epi8(v2[0]));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qb + 48), _mm512_cvtepi32_epi8(v2[1]));
        const int n1 = _mm512_reduce_add_epi32(_mm512_add_epi32(v1[0], v1[1]));
        const int n2 = _mm512_reduce_add_epi32(_mm512_add_epi32(v2[0], v2[1]));
        sx[b * stride] = s;
        nsum[b * stride] = 256 * n1 + n2;
        xs[b * stride] = s * static_cast<float>(nsum[b * stride]);
    }
}

template <int IN>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8_f32(const void* p) {
    if constexpr (IN == IN_F32) return _mm256_loadu_ps(static_cast<const float*>(p));
    const __m128i h = _mm_loadu_si128(static_cast<const __m128i*>(p));
    if constexpr (IN == IN_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

template <int IN>
__attribute__((target("avx2,fma,f16c"))) void quantize_row_avx2(
        const void* x, int64_t K, int8_t* q, float* sx, int32_t* nsum, float* xs, int64_t stride,
        bool two_stage = true) {
    constexpr int kElem = IN == IN_F32 ? 4 : 2;
    const char* xp = static_cast<const char*>(x);
    const int64_t nb = K / kBlock;
    const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i lim = _mm256_set1_epi32(two_stage ? 127 : 0), nlim = _mm256_set1_epi32(two_stage ? -127 : 0);
    for (int64_t b = 0; b < nb; ++b) {
        __m256 xv[4];
        __m256 m = _mm256_setzero_ps();
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
            xv[i] = load8_f32<IN>(xp + (b * kBlock + 8 * i) * kElem);
            m = _mm256_max_ps(m, _mm256_and_ps(xv[i], absmask));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
        const float amax = _mm_cvtss_f32(m4);
        const float d1 = amax / 127.f;
        const float s = d1 * (1.f / 256.f);
        const float id1 = d1 > 0.f ? 1.f / d1 : 0.f, id2 = s > 0.f ? 1.f / s : 0.f;
        const __m256 vd1 = _mm256_set1_ps(d1), vid1 = _mm256_set1_ps(id1), vid2 = _mm256_set1_ps(id2);
        __m256i n1 = _mm256_setzero_si256(), n2 = _mm256_setzero_si256();
        __m256i v1[4], v2[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
            v1[i] = _mm256_cvtps_epi32(_mm256_mul_ps(xv[i], vid1));
            const __m256 r = _mm256_sub_ps(xv[i], _mm256_mul_ps(vd1, _mm256_cvtepi32_ps(v1[i])));
            v2[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(r, vid2)), nlim), lim);
            n1 = _mm256_add_epi32(n1, v1[i]);
            n2 = _mm256_add_epi32(n2, v2[i]);
        }
        // int32 -> int8 in column order: packs interleave 128-bit lanes, the permute puts them back
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        const __m256i p1 = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(v1[0], v1[1]), _mm256_packs_epi32(v1[2], v1[3])), order);
        const __m256i p2 = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(v2[0], v2[1]), _mm256_packs_epi32(v2[2], v2[3])), order);
        int8_t* qb = q + b * stride * 64;
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb), p1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(qb + 32), p2);
        __m128i t1 = _mm_add_epi32(_mm256_castsi256_si128(n1), _mm256_extracti128_si256(n1, 1));
        __m128i t2 = _mm_add_epi32(_mm256_castsi256_si128(n2), _mm256_extracti128_si256(n2, 1));
        t1 = _mm_hadd_epi32(_mm_hadd_epi32(t1, t1), t1);
        t2 = _mm_hadd_epi32(_mm_hadd_epi32(t2, t2), t2);
        sx[b * stride] = s;
        nsum[b * stride] = 256 * _mm_cvtsi128_si32(t1) + _mm_cvtsi128_si32(t2);
        xs[b * stride] = s * static_cast<float>(nsum[b * stride]);
    }
}

inline int32_t load4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}


// ------------------------------------------------------------------------------------------------ AVX-512 VNNI

// acc += w (16 lanes of 4 unsigned bytes) . the 4 signed bytes at p broadcast to every lane. gcc and clang load the
// broadcast with its own vpbroadcastd; vpdpbusd's embedded {1to16} broadcast does it in the same instruction (half
// the instructions of the inner loops: 8-row Q4_0 calls ~6% faster on one Zen 5 core, bench/README_PERF.md
// "Session 13").
__attribute__((target("avx512f,avx512vnni"))) inline __m512i dpbusd_bcast(__m512i acc, __m512i w, const int8_t* p) {
#if defined(__GNUC__)
    asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*reinterpret_cast<const int32_t*>(p)));
    return acc;
#else
    return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(load4(p)));
#endif
}

// Decode calls (G = 1) stream their group's records from memory once: prefetching the record kPrefetchBlocks ahead
// into L1 made SmolLM2's step of GEMVs 6-10% faster at 1 row, 9-17% at 4-8 rows on 2 Zen 5 cores (Q4_0, Q8_0;
// python bench/bench_cpu_kernels.py --rows N, session 15). A prefetch past the weights' end is a hint, never a fault.
// (The AVX2 path, timed on the same cores, showed no difference either way and has none.)
constexpr int64_t kPrefetchBlocks = 8;

template <int REC>
inline void prefetch_record(const uint8_t* p) {
#pragma GCC unroll 16
    for (int i = 0; i < REC; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// d[j][m][s] += w[j] . the 4 activation bytes at p, for each group j (one broadcast for all of them)
template <int G, int M, int S>
__attribute__((target("avx512f,avx512vnni"), always_inline)) inline void dot_groups(
        __m512i (&d)[G][M][S], int m, int s, const __m512i (&w)[G], const int8_t* p) {
    if constexpr (G == 1) {
        d[0][m][s] = dpbusd_bcast(d[0][m][s], w[0], p);
    } else {
        const __m512i xv = _mm512_set1_epi32(load4(p));
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) d[j][m][s] = _mm512_dpbusd_epi32(d[j][m][s], w[j], xv);
    }
}

// 16 * G output rows (groups g .. g+G-1) against M activation rows -> out (M, 16 * G) fp32. TWO: the q2 stage's
// products too. With G = 2 each activation broadcast feeds both groups' products (a register broadcast reused:
// 8-row one-stage calls on cached weights ~10% faster on Zen 5 than a broadcast per product); a row's integer sums
// and float operations are the same for any G, so its result is too.
template <int KIND, int M, bool TWO = true, int G = 1>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) void group_avx512(
        const Weights& wt, const QuantX& xq, int64_t g, float* out) {
    const int64_t nb = xq.K / kBlock;
    constexpr int kBytes = code_bytes(KIND);
    constexpr int kOff = code_offset(KIND);
    // few rows: the low/high nibble (or even/odd chunk) products in separate registers, so that there are enough
    // independent dependency chains; integer sums, so the result is the same
    constexpr int S = (M * G <= 2 || (!TWO && G == 1)) ? 2 : 1;
    constexpr int kRec = record_bytes(KIND);
    const uint8_t* wg[G];
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) wg[j] = wt.rec + (g + j) * nb * kRec;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[G][M];
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[j][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        __m512i d1[G][M][S], d2[G][M][S];
        if constexpr (G == 1) prefetch_record<kRec>(wg[0] + (b + kPrefetchBlocks) * kRec);
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m) {
#pragma GCC unroll 2
                for (int s = 0; s < S; ++s) d1[j][m][s] = d2[j][m][s] = _mm512_setzero_si512();
                if (kOff && TWO) d2[j][m][0] = _mm512_set1_epi32(-kOff * xq.nsum[b * kMaxRows + m]);
                if (kOff && !TWO) d1[j][m][0] = _mm512_set1_epi32(-kOff * (xq.nsum[b * kMaxRows + m] >> 8));
            }
        if constexpr (KIND == Q8_0) {
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) {
                __m512i v[G];
#pragma GCC unroll 4
                for (int j = 0; j < G; ++j) v[j] = _mm512_loadu_si512(wg[j] + b * kRec + c * 64);
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    const int8_t* qb = xq.q + (b * kMaxRows + m) * 64;
                    dot_groups<G, M, S>(d1, m, c % S, v, qb + 4 * c);
                    if constexpr (TWO) dot_groups<G, M, S>(d2, m, c % S, v, qb + 32 + 4 * c);
                }
            }
        } else {
#pragma GCC unroll 4
            for (int c = 0; c < 4; ++c) {
                __m512i lo[G], hi[G];
#pragma GCC unroll 4
                for (int j = 0; j < G; ++j) {
                    const __m512i v = _mm512_loadu_si512(wg[j] + b * kRec + c * 64);
                    lo[j] = _mm512_and_si512(v, low);
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                }
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    const int8_t* qb = xq.q + (b * kMaxRows + m) * 64;
                    dot_groups<G, M, S>(d1, m, 0, lo, qb + 4 * c);
                    dot_groups<G, M, S>(d1, m, S - 1, hi, qb + 16 + 4 * c);
                    if constexpr (TWO) {
                        dot_groups<G, M, S>(d2, m, 0, lo, qb + 32 + 4 * c);
                        dot_groups<G, M, S>(d2, m, S - 1, hi, qb + 48 + 4 * c);
                    }
                }
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) {
            const uint8_t* wb = wg[j] + b * kRec;
            const uint16_t* dp = reinterpret_cast<const uint16_t*>(wb + kBytes);  // d, then m (Q4_1)
            const uint8_t* scp = wb + kBytes;                                     // Q4_K: sc, then mn
            __m512 d, off;
            if constexpr (KIND == Q4_K) {
                const uint16_t* sp = wt.super + ((g + j) * (nb / 8) + b / 8) * 2 * kGroup;
                const __m512 dd = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp)));
                const __m512 dm = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sp + kGroup)));
                const __m128i sc = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scp));
                const __m128i mn = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scp + kGroup));
                d = _mm512_mul_ps(dd, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(sc)));
                off = _mm512_mul_ps(dm, _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(mn)));
            } else {
                d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dp)));
                if constexpr (KIND == Q4_1)
                    off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(dp + kGroup)));
            }
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m) {
                __m512i t1 = d1[j][m][0], t2 = d2[j][m][0];
                if constexpr (S == 2) {
                    t1 = _mm512_add_epi32(t1, d1[j][m][1]);
                    if constexpr (TWO) t2 = _mm512_add_epi32(t2, d2[j][m][1]);
                }
                const __m512i s = TWO ? _mm512_add_epi32(_mm512_slli_epi32(t1, 8), t2) : t1;
                const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(TWO ? xq.sx[b * kMaxRows + m]
                                                                         : 256.f * xq.sx[b * kMaxRows + m]));
                acc[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j][m]);
                if constexpr (KIND == Q4_1)
                    acc[j][m] = _mm512_fmadd_ps(off, _mm512_set1_ps(xq.xs[b * kMaxRows + m]), acc[j][m]);
                if constexpr (KIND == Q4_K)
                    acc[j][m] = _mm512_fnmadd_ps(off, _mm512_set1_ps(xq.xs[b * kMaxRows + m]), acc[j][m]);
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + m * G * kGroup + j * kGroup, acc[j][m]);
}

// ------------------------------------------------------------------------------------------------------- AVX2

// The same layout, 8 rows per 256-bit half. vpmaddubsw multiplies unsigned by signed bytes into saturating int16
// pairs: 4-bit codes (<= 15 * 127 * 2) never saturate; 8-bit codes are made signed and multiplied as
// |q| * sign(x, q) (<= 128 * 127 * 2). The integers equal the VNNI path's (there the offset is subtracted through
// the accumulator's start value; here the Q8_0 products are signed already).
template <int KIND, int M, bool TWO = true>
__attribute__((target("avx2,fma,f16c"))) void group_avx2(
        const Weights& wt, const QuantX& xq, int64_t g, float* out) {
    const int64_t nb = xq.K / kBlock;
    constexpr int kBytes = code_bytes(KIND);
    constexpr int kRec = record_bytes(KIND);
    const uint8_t* wg = wt.rec + g * nb * kRec;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256 acc[M][2];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wg + b * kRec;
        const uint16_t* dp = reinterpret_cast<const uint16_t*>(wb + kBytes);  // d, then m (Q4_1)
        const uint8_t* scp = wb + kBytes;                                     // Q4_K: sc, then mn
        __m256i d1[M][2], d2[M][2];
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int32_t ns = xq.nsum[b * kMaxRows + m];
            const __m256i init = _mm256_set1_epi32(KIND == Q4_0 ? -8 * (TWO ? ns : ns >> 8) : 0);
            d1[m][0] = d1[m][1] = TWO ? _mm256_setzero_si256() : init;
            d2[m][0] = d2[m][1] = TWO ? init : _mm256_setzero_si256();
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            if constexpr (KIND == Q8_0) {
#pragma GCC unroll 8
                for (int c = 0; c < 8; ++c) {
                    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
                    const __m256i s = _mm256_xor_si256(u, flip);   // signed code q
                    const __m256i a = _mm256_sign_epi8(s, s);      // |q| (128 stays 0x80 = 128 unsigned)
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) {
                        const int8_t* qb = xq.q + (b * kMaxRows + m) * 64;
                        const __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(load4(qb + 4 * c)), s);
                        d1[m][h] = _mm256_add_epi32(d1[m][h], _mm256_madd_epi16(_mm256_maddubs_epi16(a, xv), ones16));
                        if constexpr (TWO) {
                            const __m256i xv2 = _mm256_sign_epi8(_mm256_set1_epi32(load4(qb + 32 + 4 * c)), s);
                            d2[m][h] = _mm256_add_epi32(d2[m][h], _mm256_madd_epi16(_mm256_maddubs_epi16(a, xv2), ones16));
                        }
                    }
                }
            } else {
#pragma GCC unroll 4
                for (int c = 0; c < 4; ++c) {
                    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
                    const __m256i lo = _mm256_and_si256(v, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) {
                        const int8_t* qb = xq.q + (b * kMaxRows + m) * 64;
                        const __m256i pl = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(qb + 4 * c)));
                        const __m256i ph = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(qb + 16 + 4 * c)));
                        d1[m][h] = _mm256_add_epi32(d1[m][h], _mm256_madd_epi16(_mm256_add_epi16(pl, ph), ones16));
                        if constexpr (TWO) {
                            const __m256i pl2 = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(qb + 32 + 4 * c)));
                            const __m256i ph2 = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(qb + 48 + 4 * c)));
                            d2[m][h] = _mm256_add_epi32(d2[m][h], _mm256_madd_epi16(_mm256_add_epi16(pl2, ph2), ones16));
                        }
                    }
                }
            }
        }
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            __m256 d, off;
            if constexpr (KIND == Q4_K) {
                const uint16_t* sp = wt.super + (g * (nb / 8) + b / 8) * 2 * kGroup + 8 * h;
                const __m256 dd = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp)));
                const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sp + kGroup)));
                const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scp + 8 * h));
                const __m128i mn = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scp + kGroup + 8 * h));
                d = _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
                off = _mm256_mul_ps(dm, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
            } else {
                d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dp + 8 * h)));
                if constexpr (KIND == Q4_1)
                    off = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dp + kGroup + 8 * h)));
            }
#pragma GCC unroll 8
            for (int m = 0; m < M; ++m) {
                const __m256i s = TWO ? _mm256_add_epi32(_mm256_slli_epi32(d1[m][h], 8), d2[m][h]) : d1[m][h];
                const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(TWO ? xq.sx[b * kMaxRows + m]
                                                                         : 256.f * xq.sx[b * kMaxRows + m]));
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[m][h]);
                if constexpr (KIND == Q4_1) acc[m][h] = _mm256_fmadd_ps(off, _mm256_set1_ps(xq.xs[b * kMaxRows + m]), acc[m][h]);
                if constexpr (KIND == Q4_K) acc[m][h] = _mm256_fnmadd_ps(off, _mm256_set1_ps(xq.xs[b * kMaxRows + m]), acc[m][h]);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
        _mm256_storeu_ps(out + m * kGroup, acc[m][0]);
        _mm256_storeu_ps(out + m * kGroup + 8, acc[m][1]);
    }
}

}  // namespace gguf_kernels
