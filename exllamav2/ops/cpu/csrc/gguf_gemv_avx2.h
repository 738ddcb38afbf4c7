// GGUF GEMV inner kernel, AVX2: the layout of gguf_gemv_kernels.h, 8 rows per 256-bit half. vpmaddubsw multiplies
// unsigned by signed bytes into saturating int16 pairs: 4- to 6-bit codes (<= 63 * 127 * 2, or two 5-bit pairs
// <= 2 * 31 * 127 * 2) never saturate; 8-bit codes are made signed and multiplied as |q| * sign(x, q)
// (<= 128 * 127 * 2). The integers equal the VNNI path's (there the offset is subtracted through the accumulator's
// start value; here the Q8_0 products are signed already), and so do the float operations and their order.
#pragma once

#include "gguf_gemv_kernels.h"

namespace gguf_kernels {

// Rows 8h..8h+7 of the block's 4-bit (and high-bit) codes against the activations into d1/d2 (per activation
// row). PART 0: both column halves (their int16 pair sums added before widening), 1: columns 0..15, 2: 16..31.
// IQ4: the table's signed values, multiplied as Q8_0's are (|w| * sign(x, w): up to 2 * 127 * 127 per int16, so
// each half is widened on its own).
template <int KIND, int M, bool TWO, int PART>
__attribute__((target("avx2"), always_inline)) inline void nibble_dots_avx2(
        __m256i (&d1)[M], __m256i (&d2)[M], const uint8_t* wb, int h, const int8_t* xb) {
    constexpr int HB = high_bits(KIND);
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i hmask = _mm256_set1_epi8(HB == 2 ? 0x30 : 0x10);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i table = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(lut_values(KIND))));
    // the high bits as in gguf_gemv_avx512.h's nibble_dots (two bits: chunks 2 and 3 start over from the plane)
    __m256i pl, ph, al, ah;
    if constexpr (HB > 0) {
        al = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 256 + h * 32));
        ah = HB == 1 ? al : _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 320 + h * 32));
        pl = _mm256_slli_epi16(al, 4);
        ph = HB == 1 ? al : _mm256_slli_epi16(ah, 4);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
        if (HB == 2 && c == 2) {
            pl = al;
            ph = ah;
        }
        const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
        __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
        if constexpr (HB > 0) {
            lo = _mm256_or_si256(lo, _mm256_and_si256(pl, hmask));
            hi = _mm256_or_si256(hi, _mm256_and_si256(ph, hmask));
            pl = _mm256_srli_epi16(pl, HB);
            ph = _mm256_srli_epi16(ph, HB);
        }
        __m256i slo, shi;  // IQ4: the signed weights; lo, hi become their magnitudes
        if constexpr (lut(KIND)) {
            slo = _mm256_shuffle_epi8(table, lo);
            shi = _mm256_shuffle_epi8(table, hi);
            lo = _mm256_sign_epi8(slo, slo);
            hi = _mm256_sign_epi8(shi, shi);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int8_t* qb = xb + m * 64;
#pragma GCC unroll 2
            for (int st = 0; st < (TWO ? 2 : 1); ++st) {
                const int8_t* qs = qb + 32 * st;
                __m256i& d = st == 0 ? d1[m] : d2[m];
                if constexpr (lut(KIND)) {
                    if constexpr (PART != 2) {
                        const __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(load4(qs + 4 * c)), slo);
                        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(lo, xv), ones16));
                    }
                    if constexpr (PART != 1) {
                        const __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(load4(qs + 16 + 4 * c)), shi);
                        d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(hi, xv), ones16));
                    }
                    continue;
                }
                __m256i p;
                if constexpr (PART == 0)
                    p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(qs + 4 * c))),
                                         _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(qs + 16 + 4 * c))));
                else if constexpr (PART == 1)
                    p = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(qs + 4 * c)));
                else
                    p = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(qs + 16 + 4 * c)));
                d = _mm256_add_epi32(d, _mm256_madd_epi16(p, ones16));
            }
        }
    }
}

// Rows 8h..8h+7 of one half (PART 1, 2) of the block's 2-bit codes (and Q3_K's third bit), times 16, as
// gguf_gemv_avx512.h's crumb_dots (one product pair: 2 * 112 * 127 fits int16)
template <int KIND, int M, bool TWO, int PART>
__attribute__((target("avx2"), always_inline)) inline void crumb_dots_avx2(
        __m256i (&d1)[M], __m256i (&d2)[M], const uint8_t* wb, int h, const int8_t* xb) {
    constexpr bool kThird = high_bits(KIND) == 1;
    const __m256i m30 = _mm256_set1_epi8(0x30), m40 = _mm256_set1_epi8(0x40);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i base = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + (PART == 1 ? 0 : 64) + h * 32));
    __m256i run = _mm256_slli_epi16(base, 4), top, trun;
    if constexpr (kThird) {
        top = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + 128 + h * 32));
        trun = PART == 1 ? _mm256_slli_epi16(top, 6) : _mm256_slli_epi16(top, 2);
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
        if (c == 2) {
            run = base;
            if constexpr (kThird) trun = PART == 1 ? _mm256_slli_epi16(top, 4) : top;
        }
        __m256i w = _mm256_and_si256(run, m30);
        run = _mm256_srli_epi16(run, 2);
        if constexpr (kThird) {
            w = _mm256_or_si256(w, _mm256_and_si256(trun, m40));
            trun = _mm256_srli_epi16(trun, 1);
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int8_t* qb = xb + m * 64 + (PART == 1 ? 0 : 16);
            d1[m] = _mm256_add_epi32(d1[m], _mm256_madd_epi16(_mm256_maddubs_epi16(w, _mm256_set1_epi32(load4(qb + 4 * c))), ones16));
            if constexpr (TWO)
                d2[m] = _mm256_add_epi32(d2[m], _mm256_madd_epi16(
                    _mm256_maddubs_epi16(w, _mm256_set1_epi32(load4(qb + 32 + 4 * c))), ones16));
        }
    }
}

// acc[m] += (256*d1 + d2) / 2^SH * (d * sx[m])
template <int M, bool TWO, int SH = 0>
__attribute__((target("avx2,fma"), always_inline)) inline void scale_into_avx2(
        __m256 (&acc)[M], const __m256i (&d1)[M], const __m256i (&d2)[M], __m256 d, const float* sx) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
        __m256i s = TWO ? _mm256_add_epi32(_mm256_slli_epi32(d1[m], 8), d2[m]) : d1[m];
        if constexpr (SH > 0) s = _mm256_srai_epi32(s, SH);
        const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(TWO ? sx[m] : 256.f * sx[m]));
        acc[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), scale, acc[m]);
    }
}

template <int M, bool TWO>
__attribute__((target("avx2"), always_inline)) inline void start_sums_avx2(
        __m256i (&d1)[M], __m256i (&d2)[M], int off, const int32_t* sums) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
        const __m256i init = _mm256_set1_epi32(-off * (TWO ? sums[m] : sums[m] >> 8));
        d1[m] = TWO ? _mm256_setzero_si256() : init;
        d2[m] = TWO ? init : _mm256_setzero_si256();
    }
}

__attribute__((target("avx2,f16c"), always_inline)) inline __m256 load8_f16(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

// 8 integer sub-block scales (int8 or uint8) as floats
template <bool SIGNED>
__attribute__((target("avx2"), always_inline)) inline __m256 scales8(const uint8_t* p) {
    const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(SIGNED ? _mm256_cvtepi8_epi32(v) : _mm256_cvtepu8_epi32(v));
}

template <int KIND, int M, bool TWO = true>
__attribute__((target("avx2,fma,f16c"))) void group_avx2(
        const Weights& wt, const QuantX& xq, int64_t g, float* out) {
    const int64_t nb = xq.K / kBlock;
    constexpr int kBytes = code_bytes(KIND);
    constexpr int kRec = record_bytes(KIND);
    constexpr int kSF = super_fields(KIND);
    constexpr int kSH = crumbs(KIND) ? 4 : 0;
    // Q8_0's and IQ4's products are signed here: no offset to subtract
    constexpr int kOff = KIND == Q8_0 || lut(KIND) ? 0 : code_offset(KIND);
    const uint8_t* wg = wt.rec + g * nb * kRec;
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256 acc[2][M];
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wg + b * kRec;
        const uint16_t* dp = reinterpret_cast<const uint16_t*>(wb + kBytes);  // d, then m
        const uint8_t* scp = wb + kBytes;                                     // K-quants: sc, then mn (Q6_K: sc, sc)
        const int8_t* xb = xq.q + b * kMaxRows * 64;
        const int64_t xi = b * kMaxRows;
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
            __m256i d1[M], d2[M];
            if constexpr (split_halves(KIND)) {
                const uint16_t* sp = wt.super + (g * (nb / 8) + b / 8) * kSF * kGroup + 8 * h;
                int32_t sums[M];
#pragma GCC unroll 2
                for (int part = 0; part < 2; ++part) {
                    half_sums<M>(xq, xi, part, sums);
                    start_sums_avx2<M, TWO>(d1, d2, kOff << kSH, sums);
                    if constexpr (crumbs(KIND)) {
                        if (part == 0) crumb_dots_avx2<KIND, M, TWO, 1>(d1, d2, wb, h, xb);
                        else crumb_dots_avx2<KIND, M, TWO, 2>(d1, d2, wb, h, xb);
                    } else {
                        if (part == 0) nibble_dots_avx2<KIND, M, TWO, 1>(d1, d2, wb, h, xb);
                        else nibble_dots_avx2<KIND, M, TWO, 2>(d1, d2, wb, h, xb);
                    }
                    const uint8_t* sc = scp + part * kGroup + 8 * h;
                    __m256 d;
                    if constexpr (KIND == Q2_K)  // the file's byte: scale | min << 4
                        d = _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_cvtepu8_epi32(_mm_loadl_epi64(
                                reinterpret_cast<const __m128i*>(sc))), _mm256_set1_epi32(15)));
                    else
                        d = scales8<signed_scales(KIND)>(sc);
                    scale_into_avx2<M, TWO, kSH>(acc[h], d1, d2, _mm256_mul_ps(load8_f16(sp), d), xq.sx + xi);
                    if constexpr (has_min(KIND)) {
                        const __m256 mn = _mm256_mul_ps(load8_f16(sp + kGroup), _mm256_cvtepi32_ps(_mm256_srli_epi32(
                            _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(sc))), 4)));
#pragma GCC unroll 8
                        for (int m = 0; m < M; ++m)
                            acc[h][m] = _mm256_fnmadd_ps(mn, _mm256_set1_ps(xq.sx[xi + m] * static_cast<float>(sums[m])),
                                                         acc[h][m]);
                    }
                }
                continue;
            }
            start_sums_avx2<M, TWO>(d1, d2, kOff, xq.nsum + xi);
            if constexpr (KIND == Q8_0) {
#pragma GCC unroll 8
                for (int c = 0; c < 8; ++c) {
                    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
                    const __m256i s = _mm256_xor_si256(u, flip);   // signed code q
                    const __m256i a = _mm256_sign_epi8(s, s);      // |q| (128 stays 0x80 = 128 unsigned)
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) {
                        const int8_t* qb = xb + m * 64;
                        const __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(load4(qb + 4 * c)), s);
                        d1[m] = _mm256_add_epi32(d1[m], _mm256_madd_epi16(_mm256_maddubs_epi16(a, xv), ones16));
                        if constexpr (TWO) {
                            const __m256i xv2 = _mm256_sign_epi8(_mm256_set1_epi32(load4(qb + 32 + 4 * c)), s);
                            d2[m] = _mm256_add_epi32(d2[m], _mm256_madd_epi16(_mm256_maddubs_epi16(a, xv2), ones16));
                        }
                    }
                }
            } else {
                nibble_dots_avx2<KIND, M, TWO, 0>(d1, d2, wb, h, xb);
            }
            __m256 d, off;
            if constexpr (kSF > 0) {
                const uint16_t* sp = wt.super + (g * (nb / 8) + b / 8) * kSF * kGroup + 8 * h;
                d = _mm256_mul_ps(load8_f16(sp), scales8<signed_scales(KIND)>(scp + 8 * h));
                if constexpr (has_min(KIND)) off = _mm256_mul_ps(load8_f16(sp + kGroup), scales8<false>(scp + kGroup + 8 * h));
            } else {
                d = load8_f16(dp + 8 * h);
                if constexpr (has_m(KIND)) off = load8_f16(dp + kGroup + 8 * h);
            }
            scale_into_avx2<M, TWO>(acc[h], d1, d2, d, xq.sx + xi);
            if constexpr (has_m(KIND) || has_min(KIND)) {
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    const __m256 xs = _mm256_set1_ps(xq.xs[xi + m]);
                    acc[h][m] = has_m(KIND) ? _mm256_fmadd_ps(off, xs, acc[h][m]) : _mm256_fnmadd_ps(off, xs, acc[h][m]);
                }
            }
        }
    }
    const __m256 kmul = _mm256_set1_ps(1.f / static_cast<float>(1 << lut_shift(KIND)));
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
        _mm256_storeu_ps(out + m * kGroup, lut_shift(KIND) ? _mm256_mul_ps(acc[0][m], kmul) : acc[0][m]);
        _mm256_storeu_ps(out + m * kGroup + 8, lut_shift(KIND) ? _mm256_mul_ps(acc[1][m], kmul) : acc[1][m]);
    }
}

}  // namespace gguf_kernels
