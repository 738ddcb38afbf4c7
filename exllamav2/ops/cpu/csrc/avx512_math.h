// AVX-512 helpers shared by the CPU kernels (attention_kernels.h, attention_quant.cpp, small_ops.cpp): loads of 16
// fp32/bf16/fp16 values as fp32, a vectorized exp, c10's bf16 rounding in 512-bit integers, and the dispatch of
// register tiles four at a time.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <immintrin.h>

#include <cstdint>
#include <type_traits>

#define AVX512_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c")))

namespace avx512_math {

// whether this CPU runs the AVX-512 kernels (F, BW, VL, BF16 and F16C): the ops that have no AVX2 path check it
inline bool cpu_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16") &&
           __builtin_cpu_supports("f16c");
}

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

// the first n (< 16) values, zeros after
template <typename T>
AVX512_TARGET inline __m512 load16_partial(const T* p, int n) {
    const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
    if constexpr (std::is_same_v<T, float>) {
        return _mm512_maskz_loadu_ps(m, p);
    } else {
        const __m256i h = _mm256_maskz_loadu_epi16(m, p);
        if constexpr (std::is_same_v<T, c10::BFloat16>)
            return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        else
            return _mm512_cvtph_ps(h);
    }
}

// 16 floats -> bf16 bits, c10's rounding (nearest even, NaN -> 0x7FC0), as bf16_round::bits8
AVX512_TARGET inline __m256i bf16_bits16(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(
        _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)), _mm512_set1_epi32(0x7FFF))), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0)));
}

// the same rounding by vcvtneps2bf16 (one instruction) for finite values; NaN stays a NaN (sign and payload may
// differ from 0x7FC0) and fp32 denormals (below 1.2e-38) become zero
AVX512_TARGET inline __m256i bf16_bits16_fast(__m512 v) { return (__m256i)_mm512_cvtneps_pbh(v); }

// v rounded to T and stored (the first n values when n < 16)
template <typename T>
AVX512_TARGET inline void store16(T* p, __m512 v, int n = 16) {
    const __mmask16 m = static_cast<__mmask16>(n >= 16 ? 0xFFFF : (1u << n) - 1u);
    if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(p, m, v);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        _mm256_mask_storeu_epi16(p, m, bf16_bits16_fast(v));
    } else {
        _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

// v rounded to T's precision, as fp32 again (what a T intermediate holds)
template <typename T>
AVX512_TARGET inline __m512 as_dtype(__m512 v) {
    if constexpr (std::is_same_v<T, float>) {
        return v;
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16_fast(v)), 16));
    } else {
        return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
}

// exp(x): exp(0) = 1 exactly, exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN. Cephes' expf: x = n ln2 + r with
// |r| <= ln2/2 (ln2 in two parts), a degree-7 polynomial in r, times 2^n by scalef (which underflows to 0 below
// 2^-149 and overflows to inf above 2^128). Relative error within 2 ulp of fp32 (Cephes: 1.7e-7 peak).
AVX512_TARGET inline __m512 exp_ps(__m512 x) {
    // clamp first: -inf -> -200 (exp underflows to 0), +inf -> 200 (overflows to inf); NaN (2nd operand) kept
    x = _mm512_min_ps(_mm512_set1_ps(200.f), _mm512_max_ps(_mm512_set1_ps(-200.f), x));
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

// f(width, i) for i = 0, 4, 8, ... with width std::integral_constant<int, 4>, then once for the 1-3 left over (so
// n <= 4 is a single call of width n): tiles of rows or 16-dim chunks whose width is a template argument
template <typename F>
inline void in_fours(int64_t n, F&& f) {
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) f(std::integral_constant<int, 4>{}, i);
    switch (n - i) {
        case 3: f(std::integral_constant<int, 3>{}, i); break;
        case 2: f(std::integral_constant<int, 2>{}, i); break;
        case 1: f(std::integral_constant<int, 1>{}, i); break;
        default: break;
    }
}

}  // namespace avx512_math
