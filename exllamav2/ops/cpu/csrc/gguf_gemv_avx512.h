// GGUF GEMV inner kernel, AVX-512 VNNI: 16 output rows (or two groups of 16) against up to 8 activation rows.
// Layout, activations and the integer/float contract: gguf_gemv_kernels.h.
#pragma once

#include "gguf_gemv_kernels.h"

namespace gguf_kernels {

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

// The block's 4-bit (and high-bit) codes against the activations: columns 0..15 (the chunks' low nibbles) into
// sub-accumulator 0, 16..31 (high nibbles) into S - 1. PART 0 does both halves, 1 only 0..15, 2 only 16..31.
// The high bits reach bit 4 (and 5) of each byte by one running right shift per chunk from the plane shifted left
// by 4 (constant counts; a 16-bit lane's shift moves bits across its two bytes only outside the mask). Two bits:
// the left shift would push the upper byte's bits 6-7 out of the lane, so chunks 2 and 3 start over from the plane.
template <int KIND, int M, bool TWO, int G, int S, int PART>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline void nibble_dots(
        __m512i (&d1)[G][M][S], __m512i (&d2)[G][M][S], const uint8_t* const (&wb)[G], const int8_t* xb) {
    constexpr int HB = high_bits(KIND);
    const __m512i low = _mm512_set1_epi8(0x0F);
    const __m512i hmask = _mm512_set1_epi8(HB == 2 ? 0x30 : 0x10);
    // the table kinds: the table + 128 in each 128-bit lane, looked up by vpshufb
    const __m512i table = _mm512_xor_si512(
        _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(lut_values(KIND)))), _mm512_set1_epi8(-128));
    __m512i pl[G], ph[G], al[G], ah[G];
    if constexpr (HB > 0) {
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) {
            al[j] = _mm512_loadu_si512(wb[j] + 256);
            ah[j] = HB == 1 ? al[j] : _mm512_loadu_si512(wb[j] + 320);
            pl[j] = _mm512_slli_epi16(al[j], 4);
            ph[j] = HB == 1 ? al[j] : _mm512_slli_epi16(ah[j], 4);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
        __m512i lo[G], hi[G];
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) {
            if (HB == 2 && c == 2) {
                pl[j] = al[j];
                ph[j] = ah[j];
            }
            const __m512i v = _mm512_loadu_si512(wb[j] + c * 64);
            if constexpr (PART != 2) {
                lo[j] = _mm512_and_si512(v, low);
                if constexpr (HB > 0) {
                    lo[j] = _mm512_ternarylogic_epi32(lo[j], pl[j], hmask, 0xF8);  // lo | (pl & hmask)
                    pl[j] = _mm512_srli_epi16(pl[j], HB);
                }
                if constexpr (lut(KIND)) lo[j] = _mm512_shuffle_epi8(table, lo[j]);
            }
            if constexpr (PART != 1) {
                hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                if constexpr (HB > 0) {
                    hi[j] = _mm512_ternarylogic_epi32(hi[j], ph[j], hmask, 0xF8);
                    ph[j] = _mm512_srli_epi16(ph[j], HB);
                }
                if constexpr (lut(KIND)) hi[j] = _mm512_shuffle_epi8(table, hi[j]);
            }
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int8_t* qb = xb + m * 64;
            if constexpr (PART != 2) {
                dot_groups<G, M, S>(d1, m, 0, lo, qb + 4 * c);
                if constexpr (TWO) dot_groups<G, M, S>(d2, m, 0, lo, qb + 32 + 4 * c);
            }
            if constexpr (PART != 1) {
                dot_groups<G, M, S>(d1, m, S - 1, hi, qb + 16 + 4 * c);
                if constexpr (TWO) dot_groups<G, M, S>(d2, m, S - 1, hi, qb + 48 + 4 * c);
            }
        }
    }
}

// Q2_K/Q3_K: one 16-column half (PART 1: columns 0..15, 2: 16..31) of the block's 2-bit codes (and Q3_K's third
// bit) against the activations, the codes taken times 16 (bits 4-6 of each byte, where the running shifts of
// nibble_dots put them; scale_into shifts the exact sums back).
template <int KIND, int M, bool TWO, int G, int S, int PART>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni"), always_inline)) inline void crumb_dots(
        __m512i (&d1)[G][M][S], __m512i (&d2)[G][M][S], const uint8_t* const (&wb)[G], const int8_t* xb) {
    static_assert(PART == 1 || PART == 2, "crumb kinds sum each half apart");
    constexpr bool kThird = high_bits(KIND) == 1;
    const __m512i m30 = _mm512_set1_epi8(0x30), m40 = _mm512_set1_epi8(0x40);
    __m512i base[G], run[G], top[G], trun[G];
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) {
        base[j] = _mm512_loadu_si512(wb[j] + (PART == 1 ? 0 : 64));
        run[j] = _mm512_slli_epi16(base[j], 4);
        if constexpr (kThird) {
            top[j] = _mm512_loadu_si512(wb[j] + 128);
            trun[j] = PART == 1 ? _mm512_slli_epi16(top[j], 6) : _mm512_slli_epi16(top[j], 2);
        }
    }
#pragma GCC unroll 4
    for (int c = 0; c < 4; ++c) {
        __m512i w[G];
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) {
            if (c == 2) {  // the left shifts would have pushed the upper bytes' top bits out of their lanes
                run[j] = base[j];
                if constexpr (kThird) trun[j] = PART == 1 ? _mm512_slli_epi16(top[j], 4) : top[j];
            }
            w[j] = _mm512_and_si512(run[j], m30);
            run[j] = _mm512_srli_epi16(run[j], 2);
            if constexpr (kThird) {
                w[j] = _mm512_ternarylogic_epi32(w[j], trun[j], m40, 0xF8);  // w | (trun & 0x40)
                trun[j] = _mm512_srli_epi16(trun[j], 1);
            }
        }
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int8_t* qb = xb + m * 64 + (PART == 1 ? 0 : 16);
            dot_groups<G, M, S>(d1, m, 0, w, qb + 4 * c);
            if constexpr (TWO) dot_groups<G, M, S>(d2, m, 0, w, qb + 32 + 4 * c);
        }
    }
}

// the accumulators' start: minus the code offset times the activations' sum (see gguf_gemv_kernels.h)
template <int G, int M, int S, bool TWO>
__attribute__((target("avx512f"), always_inline)) inline void start_sums(
        __m512i (&d1)[G][M][S], __m512i (&d2)[G][M][S], int off, const int32_t* sums) {
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
#pragma GCC unroll 2
            for (int s = 0; s < S; ++s) d1[j][m][s] = d2[j][m][s] = _mm512_setzero_si512();
            if (off && TWO) d2[j][m][0] = _mm512_set1_epi32(-off * sums[m]);
            if (off && !TWO) d1[j][m][0] = _mm512_set1_epi32(-off * (sums[m] >> 8));
        }
}

// acc[j][m] += (256*d1 + d2) / 2^SH * (d[j] * sx[m]) for one block or half (SH: the codes' scaling, exact)
template <int G, int M, int S, bool TWO, int SH = 0>
__attribute__((target("avx512f"), always_inline)) inline void scale_into(
        __m512 (&acc)[G][M], const __m512i (&d1)[G][M][S], const __m512i (&d2)[G][M][S], const __m512 (&d)[G],
        const float* sx) {
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            __m512i t1 = d1[j][m][0], t2 = d2[j][m][0];
            if constexpr (S == 2) {
                t1 = _mm512_add_epi32(t1, d1[j][m][1]);
                if constexpr (TWO) t2 = _mm512_add_epi32(t2, d2[j][m][1]);
            }
            __m512i s = TWO ? _mm512_add_epi32(_mm512_slli_epi32(t1, 8), t2) : t1;
            if constexpr (SH > 0) s = _mm512_srai_epi32(s, SH);
            const __m512 scale = _mm512_mul_ps(d[j], _mm512_set1_ps(TWO ? sx[m] : 256.f * sx[m]));
            acc[j][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), scale, acc[j][m]);
        }
}

__attribute__((target("avx512f,f16c"), always_inline)) inline __m512 load16_f16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// 16 integer sub-block scales (int8 or uint8) as floats
template <bool SIGNED>
__attribute__((target("avx512f"), always_inline)) inline __m512 scales16(const uint8_t* p) {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm512_cvtepi32_ps(SIGNED ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
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
    constexpr int kSF = super_fields(KIND);
    constexpr bool kSplit = split_halves(KIND);
    constexpr int kSH = crumbs(KIND) ? 4 : 0;
    // few rows: the low/high nibble (or even/odd chunk) products in separate registers, so that there are enough
    // independent dependency chains; integer sums, so the result is the same. Split kinds sum each half in its
    // own pass, and so use one.
    constexpr int S = !kSplit && (M * G <= 2 || (!TWO && G == 1)) ? 2 : 1;
    constexpr int kRec = record_bytes(KIND);
    const uint8_t* wg[G];
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j) wg[j] = wt.rec + (g + j) * nb * kRec;
    __m512 acc[G][M];
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[j][m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        if constexpr (G == 1) prefetch_record<kRec>(wg[0] + (b + kPrefetchBlocks) * kRec);
        const uint8_t* wb[G];
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) wb[j] = wg[j] + b * kRec;
        const int8_t* xb = xq.q + b * kMaxRows * 64;
        const int64_t xi = b * kMaxRows;
        __m512i d1[G][M][S], d2[G][M][S];
        __m512 d[G];
        if constexpr (kSplit) {
            // Q6_K, Q3_K, Q2_K: each 16-column half with its own scale (and min), low half first
#pragma GCC unroll 2
            for (int part = 0; part < 2; ++part) {
                int32_t sums[M];
                half_sums<M>(xq, xi, part, sums);
                start_sums<G, M, S, TWO>(d1, d2, kOff << kSH, sums);
                if constexpr (crumbs(KIND)) {
                    if (part == 0) crumb_dots<KIND, M, TWO, G, S, 1>(d1, d2, wb, xb);
                    else crumb_dots<KIND, M, TWO, G, S, 2>(d1, d2, wb, xb);
                } else {
                    if (part == 0) nibble_dots<KIND, M, TWO, G, S, 1>(d1, d2, wb, xb);
                    else nibble_dots<KIND, M, TWO, G, S, 2>(d1, d2, wb, xb);
                }
                __m512 mn[G];
#pragma GCC unroll 4
                for (int j = 0; j < G; ++j) {
                    const uint16_t* sp = wt.super + ((g + j) * (nb / 8) + b / 8) * kSF * kGroup;
                    const uint8_t* scp = wb[j] + kBytes + part * kGroup;
                    if constexpr (KIND == Q2_K) {  // the file's byte: scale | min << 4
                        const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scp)));
                        const __m512i f = _mm512_set1_epi32(15);
                        d[j] = _mm512_mul_ps(load16_f16(sp), _mm512_cvtepi32_ps(_mm512_and_si512(v, f)));
                        mn[j] = _mm512_mul_ps(load16_f16(sp + kGroup), _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4)));
                    } else {
                        d[j] = _mm512_mul_ps(load16_f16(sp), scales16<signed_scales(KIND)>(scp));
                    }
                }
                scale_into<G, M, S, TWO, kSH>(acc, d1, d2, d, xq.sx + xi);
                if constexpr (has_min(KIND)) {
#pragma GCC unroll 4
                    for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
                        for (int m = 0; m < M; ++m)
                            acc[j][m] = _mm512_fnmadd_ps(mn[j], _mm512_set1_ps(xq.sx[xi + m] * static_cast<float>(sums[m])),
                                                         acc[j][m]);
                }
            }
            continue;
        }
        start_sums<G, M, S, TWO>(d1, d2, kOff, xq.nsum + xi);
        if constexpr (KIND == Q8_0) {
#pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) {
                __m512i v[G];
#pragma GCC unroll 4
                for (int j = 0; j < G; ++j) v[j] = _mm512_loadu_si512(wb[j] + c * 64);
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    const int8_t* qb = xb + m * 64;
                    dot_groups<G, M, S>(d1, m, c % S, v, qb + 4 * c);
                    if constexpr (TWO) dot_groups<G, M, S>(d2, m, c % S, v, qb + 32 + 4 * c);
                }
            }
        } else {
            nibble_dots<KIND, M, TWO, G, S, 0>(d1, d2, wb, xb);
        }
        __m512 off[G];
#pragma GCC unroll 4
        for (int j = 0; j < G; ++j) {
            const uint16_t* dp = reinterpret_cast<const uint16_t*>(wb[j] + kBytes);  // d, then m
            const uint8_t* scp = wb[j] + kBytes;                                     // K-quants: sc, then mn
            if constexpr (kSF > 0) {
                const uint16_t* sp = wt.super + ((g + j) * (nb / 8) + b / 8) * kSF * kGroup;
                d[j] = _mm512_mul_ps(load16_f16(sp), scales16<signed_scales(KIND)>(scp));
                if constexpr (has_min(KIND)) off[j] = _mm512_mul_ps(load16_f16(sp + kGroup), scales16<false>(scp + kGroup));
            } else {
                d[j] = load16_f16(dp);
                if constexpr (has_m(KIND)) off[j] = load16_f16(dp + kGroup);
            }
        }
        scale_into<G, M, S, TWO>(acc, d1, d2, d, xq.sx + xi);
        if constexpr (has_m(KIND) || has_min(KIND)) {
#pragma GCC unroll 4
            for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    const __m512 xs = _mm512_set1_ps(xq.xs[xi + m]);
                    acc[j][m] = has_m(KIND) ? _mm512_fmadd_ps(off[j], xs, acc[j][m])
                                            : _mm512_fnmadd_ps(off[j], xs, acc[j][m]);
                }
        }
    }
    const __m512 kmul = _mm512_set1_ps(1.f / static_cast<float>(1 << lut_shift(KIND)));
#pragma GCC unroll 4
    for (int j = 0; j < G; ++j)
#pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
            _mm512_storeu_ps(out + m * G * kGroup + j * kGroup, lut_shift(KIND) ? _mm512_mul_ps(acc[j][m], kmul) : acc[j][m]);
}

}  // namespace gguf_kernels
