// Dense weights against a few activation rows at a time: bf16 through AVX512-BF16 vdpbf16ps (AVX2: fp32 FMAs), and
// (dense_gemv) float32 and float16 weights through fp32 FMAs, float16 widened by F16C. Decode calls of up to 8 rows;
// under batch invariance (the default) every call (exllamav2/ops/cpu/gemv_linear.py). Batch invariance: a row's
// result is the same instruction sequence whatever the number of rows and the thread split (threads split output
// rows; the reduction over k stays in one thread).

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
#include <vector>

#include "cpu_isa.h"
#include "ops_api.h"

namespace {

using namespace cpu_isa;
constexpr int64_t kMaxRows = 8;  // activation rows per kernel call

// ------------------------------------------------------------------------------------------------ bf16 GEMV

// The horizontal sum of an accumulator's 16 lanes, in one fixed tree: lane i + lane i+8, then i + i+4, i + i+2,
// then 0 + 1. hsum16x16 sums 16 accumulators at once by the same pairs (float addition is commutative, so each sum
// is bit for bit hsum16's): about a third of the instructions, which is what a many-row call's reduction costs.
__attribute__((target("avx512f"), always_inline)) inline float hsum16(__m512 v) {
    const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(v),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    const __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    const __m128 w = _mm_add_ps(u, _mm_movehl_ps(u, u));
    return _mm_cvtss_f32(_mm_add_ss(w, _mm_movehdup_ps(w)));
}

// out[j] = hsum16(v[j]) for j < 16
__attribute__((target("avx512f"), always_inline)) inline void hsum16x16(const __m512 (&v)[16], float* out) {
    // the tree leaves sum j in lane 4 (j % 4) + j / 4 of slot order; feeding slot s the accumulator 4 (s % 4) + s / 4
    // (its own inverse) puts sum j in lane j
    __m512 c[8], e[4], g[2];
    #pragma GCC unroll 8
    for (int p = 0; p < 8; ++p) {
        const __m512 a = v[4 * ((2 * p) % 4) + (2 * p) / 4], b = v[4 * ((2 * p + 1) % 4) + (2 * p + 1) / 4];
        c[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));  // i + i+8
    }
    #pragma GCC unroll 4
    for (int q = 0; q < 4; ++q)  // i + i+4
        e[q] = _mm512_add_ps(_mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0x88),
                             _mm512_shuffle_f32x4(c[2 * q], c[2 * q + 1], 0xDD));
    #pragma GCC unroll 2
    for (int r = 0; r < 2; ++r)  // i + i+2
        g[r] = _mm512_add_ps(_mm512_shuffle_ps(e[2 * r], e[2 * r + 1], 0x44),
                             _mm512_shuffle_ps(e[2 * r], e[2 * r + 1], 0xEE));
    _mm512_storeu_ps(out, _mm512_add_ps(_mm512_shuffle_ps(g[0], g[1], 0x88), _mm512_shuffle_ps(g[0], g[1], 0xDD)));
}

// acc[r][m] -> out[m * R + r]
template <int R, int M>
__attribute__((target("avx512f"), always_inline)) inline void reduce_tile(const __m512 (&acc)[R][M], float* out) {
    if constexpr (R * M == 16) {
        __m512 v[16];
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
            #pragma GCC unroll 8
            for (int m = 0; m < M; ++m) v[m * R + r] = acc[r][m];
        hsum16x16(v, out);
    } else {
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r)
            #pragma GCC unroll 8
            for (int m = 0; m < M; ++m) out[m * R + r] = hsum16(acc[r][m]);
    }
}

// One output row against M activation rows: 32 columns per vdpbf16ps, a masked tail, one horizontal sum in a fixed
// order. R rows of W share the activation loads; the per (row, activation row) sequence does not depend on R.
// The weight rows are R short streams (K*2 bytes each) that the hardware prefetcher picks up late: each step
// prefetches R cache lines of the next R rows (`next`, `next_lines` lines in all), so they arrive just as they are
// needed (single-thread stream rate 12.5 -> 18 GB/s on SmolLM2's shapes, Zen 4).
template <int R, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline void bf16_steps(
        const uint16_t* w, const uint16_t* x, int64_t K, int64_t k0, int64_t k1, __m512 (&acc)[R][M],
        const uint16_t* next, int64_t next_lines) {
    int64_t k = k0, line = 0;
    const char* pf = reinterpret_cast<const char*>(next);
    for (; k + 32 <= k1; k += 32) {
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
    if (k < k1) {
        const __mmask32 mask = (__mmask32)((1ull << (k1 - k)) - 1);
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
}

template <int R, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_rows_avx512(
        const uint16_t* w, const uint16_t* x, int64_t K, float* out /* (M, R) */, const uint16_t* next,
        int64_t next_lines) {
    __m512 acc[R][M];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    bf16_steps<R, M>(w, x, K, 0, K, acc, next, next_lines);
    reduce_tile<R, M>(acc, out);
}

// float32 / float16 weights and activations (one dtype): 16 columns per FMA, a masked tail, one horizontal sum in a
// fixed order; as bf16_rows_avx512, the per (row, activation row) sequence does not depend on R or M.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"), always_inline)) inline __m512 load16(const T* p, __mmask16 m) {
    if constexpr (sizeof(T) == 4) return _mm512_maskz_loadu_ps(m, reinterpret_cast<const float*>(p));
    else return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

template <typename T, int R, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"), always_inline)) inline void float_steps(
        const T* w, const T* x, int64_t K, int64_t k0, int64_t k1, __m512 (&acc)[R][M], const T* next,
        int64_t next_lines) {
    int64_t line = 0;
    const char* pf = reinterpret_cast<const char*>(next);
    for (int64_t k = k0; k < k1; k += 16) {
        const __mmask16 mask = k1 - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (k1 - k)) - 1);
        if ((k * sizeof(T)) % 64 == 0) {
            #pragma GCC unroll 8
            for (int r = 0; r < R; ++r, ++line)
                if (line < next_lines) _mm_prefetch(pf + 64 * line, _MM_HINT_T0);
        }
        __m512 xv[M];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) xv[m] = load16(x + m * K + k, mask);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m512 wv = load16(w + r * K + k, mask);
            #pragma GCC unroll 8
            for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
    }
}

template <typename T, int R, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void float_rows_avx512(
        const T* w, const T* x, int64_t K, float* out /* (M, R) */, const T* next, int64_t next_lines) {
    __m512 acc[R][M];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    float_steps<T, R, M>(w, x, K, 0, K, acc, next, next_lines);
    reduce_tile<R, M>(acc, out);
}

// Part of the k loop, [k0, k1) with k0 and k1 multiples of 32 unless k1 == K: the accumulators come from `state`
// (zeros at k0 == 0) and go back to it, or, at k1 == K, are summed into out. Each accumulator sees the same
// operations in the same order as in the one-pass kernels above, so the result is theirs bit for bit.
template <bool BF16, typename T, int R, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,f16c"))) void part_avx512(
        const T* w, const T* x, int64_t K, int64_t k0, int64_t k1, float* state, float* out) {
    __m512 acc[R][M];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m)
            acc[r][m] = k0 == 0 ? _mm512_setzero_ps() : _mm512_loadu_ps(state + (r * M + m) * 16);
    if constexpr (BF16) bf16_steps<R, M>(w, x, K, k0, k1, acc, nullptr, 0);
    else float_steps<T, R, M>(w, x, K, k0, k1, acc, nullptr, 0);
    if (k1 == K) {
        reduce_tile<R, M>(acc, out);
        return;
    }
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) _mm512_storeu_ps(state + (r * M + m) * 16, acc[r][m]);
}

// AVX2, all three weight types in fp32 FMAs: 8 columns a step, one fixed horizontal order, a scalar tail. BF16
// widens bf16 (stored as uint16_t, as float16 is) by a shift.
template <bool BF16, typename T>
__attribute__((target("avx2,fma,f16c"), always_inline)) inline __m256 load8(const T* p) {
    if constexpr (sizeof(T) == 4) return _mm256_loadu_ps(reinterpret_cast<const float*>(p));
    else if constexpr (BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
    else return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <bool BF16, typename T>
inline float scalar_of(T v) {
    if constexpr (sizeof(T) == 4) {
        return v;
    } else if constexpr (BF16) {
        const uint32_t bits = static_cast<uint32_t>(v) << 16;
        float f;
        std::memcpy(&f, &bits, 4);
        return f;
    } else {
        return static_cast<float>(c10::Half(v, c10::Half::from_bits()));
    }
}

template <bool BF16, typename T, int R, int M>
__attribute__((target("avx2,fma,f16c"))) void float_rows_avx2(const T* w, const T* x, int64_t K,
                                                             float* out /* (M, R) */, const T*, int64_t) {
    __m256 acc[R][M];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 xv[M];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) xv[m] = load8<BF16>(x + m * K + k);
        #pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
            const __m256 wv = load8<BF16>(w + r * K + k);
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
            for (int64_t kk = k; kk < K; ++kk)
                sum = std::fma(scalar_of<BF16>(w[r * K + kk]), scalar_of<BF16>(x[m * K + kk]), sum);
            out[m * R + r] = sum;
        }
}

template <typename T>
using RowsFn = void (*)(const T*, const T*, int64_t, float*, const T*, int64_t);
template <typename T>
using PartFn = void (*)(const T*, const T*, int64_t, int64_t, int64_t, float*, float*);

// the weight types: storage element, output element, and the row kernels for R output rows x M activation rows
struct Bf16W {
    using T = uint16_t;
    using Out = c10::BFloat16;
    template <int R, int M>
    static RowsFn<T> pick(int64_t isa) {
        return isa == ISA_AVX512 ? &bf16_rows_avx512<R, M> : &float_rows_avx2<true, T, R, M>;
    }
    template <int R, int M>
    static PartFn<T> pick_part() { return &part_avx512<true, T, R, M>; }
};
struct F16W {
    using T = uint16_t;
    using Out = c10::Half;
    template <int R, int M>
    static RowsFn<T> pick(int64_t isa) {
        return isa == ISA_AVX512 ? &float_rows_avx512<T, R, M> : &float_rows_avx2<false, T, R, M>;
    }
    template <int R, int M>
    static PartFn<T> pick_part() { return &part_avx512<false, T, R, M>; }
};
struct F32W {
    using T = float;
    using Out = float;
    template <int R, int M>
    static RowsFn<T> pick(int64_t isa) {
        return isa == ISA_AVX512 ? &float_rows_avx512<T, R, M> : &float_rows_avx2<false, T, R, M>;
    }
    template <int R, int M>
    static PartFn<T> pick_part() { return &part_avx512<false, T, R, M>; }
};

// R output rows per step: 4 for one activation row down to 1 for eight, keeping R*M accumulators in registers
template <typename W, int R>
RowsFn<typename W::T> rows_fn(int64_t m, int64_t isa) {
    switch (m) {
        case 1: return W::template pick<R, 1>(isa);
        case 2: return W::template pick<R, 2>(isa);
        case 3: return W::template pick<R, 3>(isa);
        case 4: return W::template pick<R, 4>(isa);
        case 5: return W::template pick<R, 5>(isa);
        case 6: return W::template pick<R, 6>(isa);
        case 7: return W::template pick<R, 7>(isa);
        default: return W::template pick<R, 8>(isa);
    }
}

template <typename W, int R>
PartFn<typename W::T> part_fn(int64_t m) {
    switch (m) {
        case 1: return W::template pick_part<R, 1>();
        case 2: return W::template pick_part<R, 2>();
        case 3: return W::template pick_part<R, 3>();
        case 4: return W::template pick_part<R, 4>();
        case 5: return W::template pick_part<R, 5>();
        case 6: return W::template pick_part<R, 6>();
        case 7: return W::template pick_part<R, 7>();
        default: return W::template pick_part<R, 8>();
    }
}

// tile (mr, count) plus the bias, rounded once into y's rows r0.. and columns first..
template <typename Out>
inline void emit_tile(const float* tile, int64_t mr, int count, const float* bptr, Out* y, int64_t n, int64_t r0,
                      int64_t first) {
    for (int64_t m = 0; m < mr; ++m)
        #pragma GCC unroll 8
        for (int r = 0; r < count; ++r) {
            float v = tile[m * count + r];
            if (bptr) v += bptr[first + r];
            y[(r0 + m) * n + first + r] = static_cast<Out>(v);
        }
}

// Calls of more than kMaxRows rows (prefill): each thread takes a range of weight rows in blocks that stay in L2;
// for each block, every chunk of 8 activation rows (in L1) runs against the block's weight rows two at a time. On
// AVX-512, rows longer than 32 KiB for 8 activation rows (a large model's down projection) run the k loop in parts
// that keep a chunk's part in L1, the accumulators kept between parts (part_avx512). The same operations per
// accumulator as a decode call, so a row's result is the same.
template <typename W>
void gemm_rows(const at::Tensor& xc, const at::Tensor& weight, const float* bptr, at::Tensor& out) {
    using T = typename W::T;
    const int64_t rows = xc.size(0), K = xc.size(1), n = weight.size(0);
    const int64_t isa = active_isa();
    const T* w = static_cast<const T*>(weight.data_ptr());
    const T* x = static_cast<const T*>(xc.data_ptr());
    typename W::Out* y = static_cast<typename W::Out*>(out.data_ptr());
    const int64_t block = std::max<int64_t>(2, (256 * 1024 / (K * static_cast<int64_t>(sizeof(T)))) / 2 * 2);
    const bool parts = isa == ISA_AVX512;
    const int64_t kpart = parts ? std::min<int64_t>(K, 4096 / static_cast<int64_t>(sizeof(T))) : K;
    at::parallel_for(0, n, 16, [&](int64_t n0, int64_t n1) {
        float tile[2 * kMaxRows];
        std::vector<float> state;
        for (int64_t nb0 = n0; nb0 < n1; nb0 += block) {
            const int64_t nb1 = std::min(n1, nb0 + block);
            state.resize(static_cast<size_t>((nb1 - nb0 + 1) / 2) * 2 * kMaxRows * 16);
            for (int64_t r0 = 0; r0 < rows; r0 += kMaxRows) {
                const int64_t mr = std::min<int64_t>(kMaxRows, rows - r0);
                const RowsFn<T> two = parts ? nullptr : rows_fn<W, 2>(mr, isa);
                const RowsFn<T> one = parts ? nullptr : rows_fn<W, 1>(mr, isa);
                const PartFn<T> two_p = parts ? part_fn<W, 2>(mr) : nullptr;
                const PartFn<T> one_p = parts ? part_fn<W, 1>(mr) : nullptr;
                for (int64_t k0 = 0; k0 < K; k0 += kpart) {
                    const int64_t k1 = std::min(K, k0 + kpart);
                    for (int64_t i = nb0; i < nb1; i += 2) {
                        const int R = i + 2 <= nb1 ? 2 : 1;
                        if (parts)
                            (R == 2 ? two_p : one_p)(w + i * K, x + r0 * K, K, k0, k1,
                                                     state.data() + (i - nb0) / 2 * 2 * kMaxRows * 16, tile);
                        else
                            (R == 2 ? two : one)(w + i * K, x + r0 * K, K, tile, nullptr, 0);
                        if (k1 == K) emit_tile(tile, mr, R, bptr, y, n, r0, i);
                    }
                }
            }
        }
    });
}

template <typename W>
void gemv_rows(const at::Tensor& xc, const at::Tensor& weight, const float* bptr, at::Tensor& out) {
    using T = typename W::T;
    const int64_t rows = xc.size(0), K = xc.size(1), n = weight.size(0);
    if (rows > kMaxRows) return gemm_rows<W>(xc, weight, bptr, out);
    const int64_t isa = active_isa();
    const T* w = static_cast<const T*>(weight.data_ptr());
    const T* xp = static_cast<const T*>(xc.data_ptr());
    typename W::Out* y = static_cast<typename W::Out*>(out.data_ptr());
    const int R = rows <= 2 ? 4 : rows <= 4 ? 2 : 1;
    const RowsFn<T> main =
        R == 4 ? rows_fn<W, 4>(rows, isa) : R == 2 ? rows_fn<W, 2>(rows, isa) : rows_fn<W, 1>(rows, isa);
    const RowsFn<T> one = rows_fn<W, 1>(rows, isa);
    at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
        float tile[4 * kMaxRows];
        int64_t i = n0;
        for (; i + R <= n1; i += R) {
            const int64_t ahead = std::min<int64_t>(R, n1 - i - R);  // rows of the next step in this range
            main(w + i * K, xp, K, tile, w + (i + R) * K,
                 ahead > 0 ? ahead * K * static_cast<int64_t>(sizeof(T)) / 64 : 0);
            emit_tile(tile, rows, R, bptr, y, n, 0, i);
        }
        for (; i < n1; ++i) {
            one(w + i * K, xp, K, tile, nullptr, 0);
            emit_tile(tile, rows, 1, bptr, y, n, 0, i);
        }
    });
}

// x (rows, K) against weight (n, K), both of one dtype (bfloat16, float16 or float32) -> (rows, n) in that dtype,
// the bias added in fp32 before the one rounding
at::Tensor dense_gemv_impl(const char* op, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias) {
    check_isa(op);
    const at::ScalarType dt = x.scalar_type();
    TORCH_CHECK(dt == at::kBFloat16 || dt == at::kHalf || dt == at::kFloat, op,
                ": x must be bfloat16, float16 or float32, got ", dt);
    TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D, got ", x.sizes());
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == dt && weight.is_contiguous(), op,
                ": weight must be a contiguous 2-D tensor of x's dtype ", dt, ", got ", weight.scalar_type(), " ",
                weight.sizes());
    const int64_t rows = x.size(0), K = x.size(1), n = weight.size(0);
    TORCH_CHECK(weight.size(1) == K, op, ": x has ", K, " columns, weight expects ", weight.size(1));
    if (bias.has_value()) TORCH_CHECK(bias->numel() == n, op, ": bias must hold ", n, " values");
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty({rows, n}, x.options());
    if (rows == 0 || n == 0) return out;
    const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
    if (dt == at::kBFloat16) gemv_rows<Bf16W>(xc, weight, bptr, out);
    else if (dt == at::kHalf) gemv_rows<F16W>(xc, weight, bptr, out);
    else gemv_rows<F32W>(xc, weight, bptr, out);
    return out;
}

at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "bf16_gemv: x must be 2-D bfloat16, got ", x.scalar_type(), " ",
                x.sizes());
    return dense_gemv_impl("bf16_gemv", x, weight, bias);
}

at::Tensor dense_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    return dense_gemv_impl("dense_gemv", x, weight, bias);
}

}  // namespace

namespace exl2_ops {
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    return ::bf16_gemv(x, weight, bias);
}
}  // namespace exl2_ops

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    m.def("dense_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("bf16_gemv", &bf16_gemv);
    m.impl("dense_gemv", &dense_gemv);
}
