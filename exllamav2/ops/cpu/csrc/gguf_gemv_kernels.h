// GGUF GEMV inner kernels, shared part: the weight layout's constants, the quantised activations and their
// quantisers (no torch, so they can be built alone: tests/cpp/gguf_quantize_check.cpp). The kernels are
// gguf_gemv_avx512.h and gguf_gemv_avx2.h, the torch op around them gemv.cpp; the layout is made by
// exllamav2/ops/cpu/gguf_pack.py.
//
// Weight layout: output rows in groups of 16 (padded); per (group, 32-column block) one record, the records in
// column order and the groups one after another, so a thread streams one sequential range. A record:
//   codes, 4-bit: 4 chunks x 16 rows x 4 bytes; byte i of chunk c of row r holds column 4c+i (low nibble) and
//          16+4c+i (high nibble), the GGUF Q4_0 block's own byte order, only interleaved over 16 rows
//          (IQ4_NL/IQ4_XS's and the lattice kinds' nibbles index lut_values(kind));
//   codes, 2-bit (Q2_K, Q3_K's low bits): two planes of 16 rows x 4 bytes, byte i of row r of the first holding
//          columns 4c+i (c = 0..3) in bits 2c, 2c+1, the second columns 16+4c+i;
//   codes, 8-bit (Q8_0): 8 chunks x 16 rows x 4 bytes, column 4c+i, stored as q + 128 (unsigned);
//   the codes' high bits, 16 rows x 4 bytes per plane, byte i of row r:
//     one bit (Q5_0, Q5_1, Q5_K, Q3_K): bit c = the top bit of column 4c+i, bit 4+c that of column 16+4c+i;
//     two bits (Q6_K): two planes, the first for columns 0..15 (bits 2c, 2c+1: column 4c+i), the second for 16..31;
//   then per row: Q4_0/Q5_0/Q8_0/IQ4_NL the fp16 scale d; Q4_1/Q5_1 d, then the fp16 offset m; Q4_K/Q5_K the
//   sub-block's 6-bit scale sc and min mn as uint8 (llama.cpp's get_scale_min_k4); IQ4_XS its 6-bit scale less 32
//   as int8 (16 bytes unused); IQ3_XXS/IQ3_S/IQ2_XXS/IQ1_S the odd factor 2s + 1 of the sub-block's scale (16
//   unused), IQ2_XS/IQ2_S/IQ1_M that of each 16-column half; Q6_K/Q3_K the int8 scales of columns 0..15 and of 16..31; Q2_K the file's byte of
//   each half (scale | min << 4). Records of 160 (Q2_K), 224 (Q3_K), 288 (Q4_0, Q4_K, the table kinds), 320 (Q4_1),
//   352 (Q5_0, Q5_K), 384 (Q5_1), 416 (Q6_K), 544 (Q8_0) bytes: each type's own weights at its file's size, the
//   6-bit scales as bytes (Q4_K 4.625 bits per weight against the file's 4.5, Q3_K 3.5625 against 3.4375).
//   K-quants and IQ4_XS: beside the records per group and 256-column super-block the fp16 d and dmin (Q4_K, Q5_K,
//   Q2_K: 2 x 16) or d (Q6_K, Q3_K, IQ4_XS, the lattice kinds: 16), so w = (d*sc) * q - (dmin*mn), or (d*sc) * (q - offset): d*sc and
//   dmin*mn are exact in fp32 (11-bit by 6- or 8-bit products).
// A 32-bit lane of a vector holds 4 weights of one output row, so the activation's 4 matching int8 values are
// broadcast to all lanes and one vpdpbusd advances 16 output rows.
//
// Activations: per 32-column block, x ~ sx * (256*q1 + q2) with sx = amax/127/256: q1 = round(x/(256 sx)) is
// llama.cpp's whole int8 quantisation, q2 = round(residual/sx) (|q2| <= 128, clamped to 127) carries its rounding
// error. One stage alone costs about 0.5% relative error per dot product, more than bf16 activations (0.2-0.4%),
// enough to move whole-model logits past tests/test_backends.py's tolerance; with q2 the activation error is ~1e-5.
// Because the two stages differ by exactly 2^8, their dot products combine in int32 (256*dot1 + dot2: at most
// 32*255*127*257 < 2^31), and a code offset (Q4_0 8, Q5_0 16, Q6_K 32, Q3_K 4, Q8_0 and IQ4 128: their stored
// +128) is subtracted in integers too (the accumulator starts at -offset * (256*sum(q1) + sum(q2)), over the block,
// or over each 16-column half for Q6_K/Q3_K/Q2_K, whose halves have their own scales). Per row and block (or half)
// that leaves one int->float conversion and one FMA: acc += cvt(s) * (d*sx)  [+ m * (sx*sum) for Q4_1/Q5_1,
// - dmin*mn * (sx*sum) for Q4_K/Q5_K/Q2_K].
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

enum Kind : int {
    Q4_0 = 0, Q4_1 = 1, Q8_0 = 2, Q4_K = 3, Q5_0 = 4, Q5_1 = 5, Q5_K = 6, Q6_K = 7, Q2_K = 8, Q3_K = 9,
    IQ4_NL = 10, IQ4_XS = 11, IQ2_XXS = 12, IQ2_XS = 13, IQ2_S = 14, IQ3_XXS = 15, IQ3_S = 16, IQ1_S = 17,
    IQ1_M = 18
};
constexpr int kKinds = 19;

// The 4-bit table kinds: a code indexes a 16-value table. IQ4_NL / IQ4_XS: llama.cpp's non-linear table
// (kvalues_iq4nl). The lattice kinds (IQ2_*, IQ3_*, IQ1_S, IQ1_M) keep their grids' values: each weight is one grid
// value times a sign (IQ1: a grid value in {-1, 0, 1} plus its delta of +-1/8, times 8), so the
// table holds the magnitudes m_i at 8 + i and -m_i at 7 - i (unused entries 0, never indexed), and a code is
// 8 + i or 7 - i. Their fractional factors (IQ2: 1/8, IQ3_XXS: 1/4, IQ1: 1/8) are powers of two, applied to
// the fp32 output (exact: a power-of-two scale commutes with every rounding of the sum, barring fp32 under-
// or overflow).
alignas(16) constexpr int8_t kLutValues[5][16] = {
    {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113},   // IQ4_NL, IQ4_XS
    {0, 0, 0, 0, 0, -43, -25, -8, 8, 25, 43, 0, 0, 0, 0, 0},                       // IQ2_*: grid 0x08 0x19 0x2b
    {-62, -52, -44, -36, -28, -20, -12, -4, 4, 12, 20, 28, 36, 44, 52, 62},         // IQ3_XXS
    {-15, -13, -11, -9, -7, -5, -3, -1, 1, 3, 5, 7, 9, 11, 13, 15},                 // IQ3_S
    {0, 0, 0, 0, 0, -9, -7, -1, 1, 7, 9, 0, 0, 0, 0, 0},                           // IQ1: 8 * (grid +- 1/8)
};
constexpr const int8_t* lut_values(int kind) {
    return kind == IQ2_XXS || kind == IQ2_XS || kind == IQ2_S ? kLutValues[1]
         : kind == IQ3_XXS ? kLutValues[2] : kind == IQ3_S ? kLutValues[3] : kind == IQ1_S || kind == IQ1_M ? kLutValues[4]
         : kLutValues[0];
}
// the output's factor 2^-lut_shift
constexpr int lut_shift(int kind) {
    return kind == IQ2_XXS || kind == IQ2_XS || kind == IQ2_S || kind == IQ1_S || kind == IQ1_M ? 3
         : kind == IQ3_XXS ? 2 : 0;
}
constexpr bool lattice(int kind) { return kind >= IQ2_XXS; }

// The packed weight (gguf_pack.py).
struct Weights {
    const uint8_t* rec;     // (groups, blocks) records
    const uint16_t* super;  // K-quants: fp16 (groups, blocks / 8, super_fields, 16) d[, dmin]; null otherwise
};

// 2-bit codes in two planes instead of nibbles (Q2_K; Q3_K with its third bit in a high-bit plane)
constexpr bool crumbs(int kind) { return kind == Q2_K || kind == Q3_K; }
// high bits per code beyond the nibble (or the crumb); 0: 4-bit codes, or Q8_0
constexpr int high_bits(int kind) {
    return kind == Q6_K ? 2 : kind == Q5_0 || kind == Q5_1 || kind == Q5_K || kind == Q3_K ? 1 : 0;
}
// the nibble indexes lut_values(kind)
constexpr bool lut(int kind) { return kind == IQ4_NL || kind == IQ4_XS || lattice(kind); }
// an fp16 offset m per row and block (w = d*q + m)
constexpr bool has_m(int kind) { return kind == Q4_1 || kind == Q5_1; }
// 256-column super-blocks: fp16 d (and dmin) beside the records
constexpr int super_fields(int kind) {
    return kind == Q4_K || kind == Q5_K || kind == Q2_K ? 2
         : kind == Q6_K || kind == Q3_K || kind == IQ4_XS || lattice(kind) ? 1 : 0;
}
// integer sub-block scales (K-quants, IQ4_XS): int8 (else uint8), and a uint8 min scaled by dmin (w = ... - dmin*mn)
constexpr bool signed_scales(int kind) { return kind == Q6_K || kind == Q3_K || kind == IQ4_XS || lattice(kind); }
constexpr bool has_min(int kind) { return kind == Q4_K || kind == Q5_K || kind == Q2_K; }
// a scale (and min) per 16 columns: each block's halves summed apart
constexpr bool split_halves(int kind) {
    return kind == Q6_K || kind == Q3_K || kind == Q2_K || kind == IQ2_XS || kind == IQ2_S || kind == IQ1_M;
}
// bytes of codes (high-bit planes included) per (group, block), and of the whole record
constexpr int code_bytes(int kind) { return kind == Q8_0 ? 512 : (crumbs(kind) ? 128 : 256) + 64 * high_bits(kind); }
constexpr int record_bytes(int kind) { return code_bytes(kind) + (has_m(kind) ? 64 : 32); }
// the code offset subtracted in integers (the offsets of Q4_1/Q5_1 and of the mins are floats per row and block);
// the table kinds store lut_values(kind) + 128 (unsigned for vpdpbusd)
constexpr int code_offset(int kind) {
    return kind == Q4_0 ? 8 : kind == Q5_0 ? 16 : kind == Q6_K ? 32 : kind == Q3_K ? 4
         : kind == Q8_0 || lut(kind) ? 128 : 0;
}

// A chunk of up to kMaxRows activation rows quantised, block-major with the rows side by side (one base pointer
// and constant offsets in the kernels: no per-row pointers to keep in registers): per block and row 64 bytes
// (q1[32], q2[32]), sx, the int sum 256*sum(q1) + sum(q2), the same over columns 0..15 (for Q6_K's halves), and
// xs = sx * the block's sum (for the float offsets).
struct QuantX {
    const int8_t* q;      // (K/32, kMaxRows, 64)
    const float* sx;      // (K/32, kMaxRows)
    const int32_t* nsum;  // (K/32, kMaxRows)
    const int32_t* hsum;  // (K/32, kMaxRows)
    const float* xs;      // (K/32, kMaxRows)
    int64_t K;
};

// x (K floats) -> per block b: 64 bytes at q + b * stride * 64, and sx, nsum, hsum, xs [b * stride] (stride: the rows
// of a chunk side by side). Scalar on purpose: it is the contract (nearbyint: ties to even) that the vector
// quantisers below reproduce bit for bit.
inline void quantize_row(const float* x, int64_t K, int8_t* q, float* sx, int32_t* nsum, int32_t* hsum, float* xs,
                         int64_t stride, bool two_stage = true) {
    const int64_t nb = K / kBlock;
    for (int64_t b = 0; b < nb; ++b) {
        const float* xb = x + b * kBlock;
        int8_t* qb = q + b * stride * 64;
        float amax = 0.f;
        for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
        const float d1 = amax / 127.f;
        const float s = d1 * (1.f / 256.f);
        const float id1 = d1 > 0.f ? 1.f / d1 : 0.f, id2 = s > 0.f ? 1.f / s : 0.f;
        int n1 = 0, n2 = 0, h = 0;
        for (int j = 0; j < kBlock; ++j) {
            if (j == kBlock / 2) h = 256 * n1 + n2;
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
        hsum[b * stride] = h;
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
        const void* x, int64_t K, int8_t* q, float* sx, int32_t* nsum, int32_t* hsum, float* xs, int64_t stride,
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
        const int h1 = _mm512_reduce_add_epi32(v1[0]), h2 = _mm512_reduce_add_epi32(v2[0]);
        const int n1 = h1 + _mm512_reduce_add_epi32(v1[1]), n2 = h2 + _mm512_reduce_add_epi32(v2[1]);
        sx[b * stride] = s;
        nsum[b * stride] = 256 * n1 + n2;
        hsum[b * stride] = 256 * h1 + h2;
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

__attribute__((target("avx2"))) inline int hsum8(__m256i v) {
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    t = _mm_hadd_epi32(_mm_hadd_epi32(t, t), t);
    return _mm_cvtsi128_si32(t);
}

template <int IN>
__attribute__((target("avx2,fma,f16c"))) void quantize_row_avx2(
        const void* x, int64_t K, int8_t* q, float* sx, int32_t* nsum, int32_t* hsum, float* xs, int64_t stride,
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
        __m256i v1[4], v2[4];
#pragma GCC unroll 4
        for (int i = 0; i < 4; ++i) {
            v1[i] = _mm256_cvtps_epi32(_mm256_mul_ps(xv[i], vid1));
            const __m256 r = _mm256_sub_ps(xv[i], _mm256_mul_ps(vd1, _mm256_cvtepi32_ps(v1[i])));
            v2[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(r, vid2)), nlim), lim);
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
        // columns 0..15 are v[0], v[1]; 16..31 v[2], v[3]
        const int h1 = hsum8(_mm256_add_epi32(v1[0], v1[1])), h2 = hsum8(_mm256_add_epi32(v2[0], v2[1]));
        const int n1 = h1 + hsum8(_mm256_add_epi32(v1[2], v1[3])), n2 = h2 + hsum8(_mm256_add_epi32(v2[2], v2[3]));
        sx[b * stride] = s;
        nsum[b * stride] = 256 * n1 + n2;
        hsum[b * stride] = 256 * h1 + h2;
        xs[b * stride] = s * static_cast<float>(nsum[b * stride]);
    }
}

// The integer activation sums (256*sum(q1) + sum(q2)) of M rows over one half of block slot xi (part 0: columns
// 0..15, 1: 16..31), for the kinds whose halves have their own scales
template <int M>
inline void half_sums(const QuantX& xq, int64_t xi, int part, int32_t (&sums)[M]) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) sums[m] = part == 0 ? xq.hsum[xi + m] : xq.nsum[xi + m] - xq.hsum[xi + m];
}

inline int32_t load4(const int8_t* p) {
    int32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

}  // namespace gguf_kernels
