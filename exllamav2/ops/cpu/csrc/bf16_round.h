// c10's float -> bfloat16 rounding (nearest even, NaN -> 0x7FC0) in AVX2 integers, shared by the kernels that
// store bf16 (gemv.cpp, small_ops.cpp), so that their values equal a static_cast<c10::BFloat16> bit for bit.
#pragma once

#include <immintrin.h>

namespace bf16_round {

// 8 floats -> their bf16 bits in the low 16 bits of each 32-bit lane
__attribute__((target("avx2"))) inline __m256i bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(
        _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)), _mm256_set1_epi32(0x7FFF))), 16);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}

}  // namespace bf16_round
