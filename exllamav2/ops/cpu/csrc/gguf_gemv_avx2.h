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
template <int KIND, int M, bool TWO, int PART>
__attribute__((target("avx2"), always_inline)) inline void nibble_dots_avx2(
        __m256i (&d1)[M], __m256i (&d2)[M], const uint8_t* wb, int h, const int8_t* xb) {
    constexpr int HB = high_bits(KIND);
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i hmask = _mm256_set1_epi8(HB == 2 ? 0x30 : 0x10);
    const __m256i ones16 = _mm256_set1_epi16(1);
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
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int8_t* qb = xb + m * 64;
#pragma GCC unroll 2
            for (int st = 0; st < (TWO ? 2 : 1); ++st) {
                const int8_t* qs = qb + 32 * st;
                __m256i p;
                if constexpr (PART == 0)
                    p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(qs + 4 * c))),
                                         _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(qs + 16 + 4 * c))));
                else if constexpr (PART == 1)
                    p = _mm256_maddubs_epi16(lo, _mm256_set1_epi32(load4(qs + 4 * c)));
                else
                    p = _mm256_maddubs_epi16(hi, _mm256_set1_epi32(load4(qs + 16 + 4 * c)));
                __m256i& d = st == 0 ? d1[m] : d2[m];
                d = _mm256_add_epi32(d, _mm256_madd_epi16(p, ones16));
            }
        }
    }
}

// acc[m] += (256*d1 + d2) * (d * sx[m])
template <int M, bool TWO>
__attribute__((target("avx2,fma"), always_inline)) inline void scale_into_avx2(
        __m256 (&acc)[M], const __m256i (&d1)[M], const __m256i (&d2)[M], __m256 d, const float* sx) {
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
        const __m256i s = TWO ? _mm256_add_epi32(_mm256_slli_epi32(d1[m], 8), d2[m]) : d1[m];
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

template <int KIND, int M, bool TWO = true>
__attribute__((target("avx2,fma,f16c"))) void group_avx2(
        const Weights& wt, const QuantX& xq, int64_t g, float* out) {
    const int64_t nb = xq.K / kBlock;
    constexpr int kBytes = code_bytes(KIND);
    constexpr int kRec = record_bytes(KIND);
    constexpr int kSF = super_fields(KIND);
    // Q8_0's products are signed here: no offset to subtract
    constexpr int kOff = KIND == Q8_0 ? 0 : code_offset(KIND);
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
                const __m256 dd = load8_f16(wt.super + (g * (nb / 8) + b / 8) * kGroup + 8 * h);
                int32_t sums[M];
#pragma GCC unroll 2
                for (int part = 1; part <= 2; ++part) {
#pragma GCC unroll 8
                    for (int m = 0; m < M; ++m)
                        sums[m] = part == 1 ? xq.hsum[xi + m] : xq.nsum[xi + m] - xq.hsum[xi + m];
                    start_sums_avx2<M, TWO>(d1, d2, kOff, sums);
                    if (part == 1) nibble_dots_avx2<KIND, M, TWO, 1>(d1, d2, wb, h, xb);
                    else nibble_dots_avx2<KIND, M, TWO, 2>(d1, d2, wb, h, xb);
                    const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scp + (part - 1) * kGroup + 8 * h));
                    scale_into_avx2<M, TWO>(acc[h], d1, d2, _mm256_mul_ps(dd, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(sc))),
                                            xq.sx + xi);
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
            if constexpr (kSF == 2) {
                const uint16_t* sp = wt.super + (g * (nb / 8) + b / 8) * 2 * kGroup + 8 * h;
                const __m128i sc = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scp + 8 * h));
                const __m128i mn = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(scp + kGroup + 8 * h));
                d = _mm256_mul_ps(load8_f16(sp), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sc)));
                off = _mm256_mul_ps(load8_f16(sp + kGroup), _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(mn)));
            } else {
                d = load8_f16(dp + 8 * h);
                if constexpr (has_m(KIND)) off = load8_f16(dp + kGroup + 8 * h);
            }
            scale_into_avx2<M, TWO>(acc[h], d1, d2, d, xq.sx + xi);
            if constexpr (has_m(KIND) || kSF == 2) {
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    const __m256 xs = _mm256_set1_ps(xq.xs[xi + m]);
                    acc[h][m] = has_m(KIND) ? _mm256_fmadd_ps(off, xs, acc[h][m]) : _mm256_fnmadd_ps(off, xs, acc[h][m]);
                }
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
        _mm256_storeu_ps(out + m * kGroup, acc[0][m]);
        _mm256_storeu_ps(out + m * kGroup + 8, acc[1][m]);
    }
}

}  // namespace gguf_kernels
