// bf16 weights through AVX512-BF16 vdpbf16ps (AVX2: fp32 FMAs) for calls of up to 8 rows (decode); above it oneDNN
// (exllamav2/ops/cpu/gemv_linear.py). Batch invariance: a row's result is the same instruction sequence whatever
// the number of rows and the thread split (threads split output rows; the reduction over k stays in one thread).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>

#include "cpu_isa.h"
#include "ops_api.h"

namespace {

using namespace cpu_isa;
constexpr int64_t kMaxRows = 8;  // activation rows per kernel call

// ------------------------------------------------------------------------------------------------ bf16 GEMV

// One output row against M activation rows: 32 columns per vdpbf16ps, a masked tail, one horizontal sum in a fixed
// order. R rows of W share the activation loads; the per (row, activation row) sequence does not depend on R.
// The weight rows are R short streams (K*2 bytes each) that the hardware prefetcher picks up late: each step
// prefetches R cache lines of the next R rows (`next`, `next_lines` lines in all), so they arrive just as they are
// needed (single-thread stream rate 12.5 -> 18 GB/s on SmolLM2's shapes, Zen 4).
template <int R, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_rows_avx512(
        const uint16_t* w, const uint16_t* x, int64_t K, float* out /* (M, R) */, const uint16_t* next,
        int64_t next_lines) {
    __m512 acc[R][M];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0, line = 0;
    const char* pf = reinterpret_cast<const char*>(next);
    for (; k + 32 <= K; k += 32) {
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r, ++line)
            if (line < next_lines) _mm_prefetch(pf + 64 * line, _MM_HINT_T0);
        __m512i xv[M];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(x + m * K + k);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m512i wv = _mm512_loadu_si512(w + r * K + k);
            #pragma GCC unroll 8
            for (int m = 0; m < M; ++m)
                acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv, (__m512bh)xv[m]);
        }
    }
    if (k < K) {
        const __mmask32 mask = (__mmask32)((1ull << (K - k)) - 1);
        __m512i xv[M];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m512i wv = _mm512_maskz_loadu_epi16(mask, w + r * K + k);
            #pragma GCC unroll 8
            for (int m = 0; m < M; ++m)
                acc[r][m] = _mm512_dpbf16_ps(acc[r][m], (__m512bh)wv, (__m512bh)xv[m]);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) out[m * R + r] = _mm512_reduce_add_ps(acc[r][m]);
}

__attribute__((target("avx2,fma"))) inline __m256 widen_bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <int R, int M>
__attribute__((target("avx2,fma"))) void bf16_rows_avx2(const uint16_t* w, const uint16_t* x, int64_t K,
                                                        float* out /* (M, R) */, const uint16_t*, int64_t) {
    __m256 acc[R][M];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[M];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) xv[m] = widen_bf16(x + m * K + k);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m256 wv = widen_bf16(w + r * K + k);
            #pragma GCC unroll 8
            for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            alignas(32) float lanes[8];
            _mm256_store_ps(lanes, acc[r][m]);
            float sum = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            for (int64_t kk = k; kk < K; ++kk) {
                uint32_t wb = static_cast<uint32_t>(w[r * K + kk]) << 16, xb = static_cast<uint32_t>(x[m * K + kk]) << 16;
                float wf, xf;
                std::memcpy(&wf, &wb, 4);
                std::memcpy(&xf, &xb, 4);
                sum = std::fma(wf, xf, sum);
            }
            out[m * R + r] = sum;
        }
}

using RowsFn = void (*)(const uint16_t*, const uint16_t*, int64_t, float*, const uint16_t*, int64_t);

template <int R, int M>
RowsFn pick_rows_fn(int64_t isa) {
    return isa == ISA_AVX512 ? &bf16_rows_avx512<R, M> : &bf16_rows_avx2<R, M>;
}

// R output rows per step: 4 for one activation row down to 1 for eight, keeping R*M accumulators in registers
template <int R>
RowsFn rows_fn(int64_t m, int64_t isa) {
    switch (m) {
        case 1: return pick_rows_fn<R, 1>(isa);
        case 2: return pick_rows_fn<R, 2>(isa);
        case 3: return pick_rows_fn<R, 3>(isa);
        case 4: return pick_rows_fn<R, 4>(isa);
        case 5: return pick_rows_fn<R, 5>(isa);
        case 6: return pick_rows_fn<R, 6>(isa);
        case 7: return pick_rows_fn<R, 7>(isa);
        default: return pick_rows_fn<R, 8>(isa);
    }
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    check_isa("bf16_gemv");
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16, "bf16_gemv: x must be 2-D bfloat16, got ",
                x.scalar_type(), " ", x.sizes());
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous(),
                "bf16_gemv: weight must be a contiguous 2-D bfloat16 tensor");
    const int64_t rows = x.size(0), K = x.size(1), n = weight.size(0);
    TORCH_CHECK(weight.size(1) == K, "bf16_gemv: x has ", K, " columns, weight expects ", weight.size(1));
    if (bias.has_value()) TORCH_CHECK(bias->numel() == n, "bf16_gemv: bias must hold ", n, " values");
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty({rows, n}, x.options());
    if (rows == 0 || n == 0) return out;
    const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
    const int64_t isa = active_isa();
    const uint16_t* w = reinterpret_cast<const uint16_t*>(weight.data_ptr<c10::BFloat16>());
    c10::BFloat16* y = out.data_ptr<c10::BFloat16>();
    for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
        const int64_t mr = std::min<int64_t>(kMaxRows, rows - r0);
        const uint16_t* xp = reinterpret_cast<const uint16_t*>(xc.data_ptr<c10::BFloat16>()) + r0 * K;
        const int R = mr == 1 ? 4 : mr == 2 ? 4 : mr <= 4 ? 2 : 1;
        const RowsFn main = R == 4 ? rows_fn<4>(mr, isa) : R == 2 ? rows_fn<2>(mr, isa) : rows_fn<1>(mr, isa);
        const RowsFn one = rows_fn<1>(mr, isa);
        at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
            float tile[4 * kMaxRows];
            int64_t i = n0;
            auto emit = [&](int64_t first, int count) {
                for (int64_t m = 0; m < mr; ++m)
                    #pragma GCC unroll 8
                    for (int r = 0; r < count; ++r) {
                        float v = tile[m * count + r];
                        if (bptr) v += bptr[first + r];
                        y[(r0 + m) * n + first + r] = static_cast<c10::BFloat16>(v);
                    }
            };
            for (; i + R <= n1; i += R) {
                const int64_t ahead = std::min<int64_t>(R, n1 - i - R);  // rows of the next step in this range
                main(w + i * K, xp, K, tile, w + (i + R) * K, ahead > 0 ? ahead * K * 2 / 64 : 0);
                emit(i, R);
            }
            for (; i < n1; ++i) {
                one(w + i * K, xp, K, tile, nullptr, 0);
                emit(i, 1);
            }
        });
    }
    return out;
}

}  // namespace

namespace exl2_ops {
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    return ::bf16_gemv(x, weight, bias);
}
}  // namespace exl2_ops

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("bf16_gemv", &bf16_gemv);
}
