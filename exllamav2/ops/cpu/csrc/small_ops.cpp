// Small ops for eager decode on the CPU, each one call instead of several aten ops: RMSNorm, RoPE, RoPE plus the
// KV-cache write, and the gated MLP activation act(gate) * up. Python side: exllamav2/ops/cpu/small_ops.py.
//
// RMSNorm in one pass, where torch's composite (casts, pow, mean, rsqrt, two muls)
// costs more in dispatch than in arithmetic (F.rms_norm on bf16 [1, 576]: 10-17 us).
// It reproduces the reference's roundings (exllamav2/ops/torch_ref/norm.py): statistics and products in fp32,
// rounded to the output dtype where the reference rounds. Only the order of the fp32 sum of squares differs, so an
// output may differ from the reference by one unit in the last place of its dtype. Rows are split over threads;
// each row is reduced by one thread in one fixed order, whatever the number of rows (batch invariant).

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "avx512_math.h"
#include "bf16_round.h"
#include "ops_api.h"

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// RMSNorm rows in AVX2, 8 columns per instruction, for fp32 and bf16 (the model's usual dtypes; fp16 keeps the
// scalar loop): the 8 partial sums are the 8 lanes of one vector, accumulated in the scalar loop's order, products
// and sums unfused (the build has -ffp-contract=off and the intrinsics are explicit), and bf16 rounded as c10 does
// (nearest even, NaN -> 0x7FC0), so the outputs are bit-identical to the scalar loop's (rms_norm_rows below; a
// 512-token bf16 prompt on SmolLM2's 576 columns, 2 threads: 113 -> 57 us a call).
template <typename T>
constexpr bool kVecType = std::is_same_v<T, float> || std::is_same_v<T, c10::BFloat16>;

template <typename T>
__attribute__((target("avx2"))) inline __m256 load8(const T* p) {
    if constexpr (std::is_same_v<T, float>) return _mm256_loadu_ps(p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}

template <typename T>
__attribute__((target("avx2"))) inline __m256 as_dtype(__m256 v) {  // to_f(static_cast<T>(v))
    if constexpr (std::is_same_v<T, float>) return v;
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_round::bits8(v), 16));
}

template <typename T>
__attribute__((target("avx2"))) inline void store8(T* p, __m256 v) {
    if constexpr (std::is_same_v<T, float>) {
        _mm256_storeu_ps(p, v);
    } else {
        const __m256i h = bf16_round::bits8(v);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                         _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
    }
}

// R rows at once: R independent sum chains (one row's chain alone waits on the add latency)
template <int R, typename TX, typename TW, typename TO>
__attribute__((target("avx2"))) void rms_norm_rows_avx2(const TX* x, const TW* w, TO* y, int64_t n, float eps,
                                                        bool fp32_scale) {
    __m256 acc[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
#pragma GCC unroll 4
        for (int r = 0; r < R; ++r) {
            const __m256 v = load8(x + r * n + i);
            acc[r] = _mm256_add_ps(acc[r], _mm256_mul_ps(v, v));
        }
    for (int r = 0; r < R; ++r) {
        const TX* xr = x + r * n;
        TO* yr = y + r * n;
        alignas(32) float part[8];
        _mm256_store_ps(part, acc[r]);
        for (int64_t j = i; j < n; ++j) {
            const float v = to_f(xr[j]);
            part[0] += v * v;
        }
        const float ss = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
        const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
        const __m256 vinv = _mm256_set1_ps(inv);
        int64_t k = 0;
        for (; k + 8 <= n; k += 8) {
            const __m256 v = _mm256_mul_ps(load8(xr + k), vinv);
            store8(yr + k, fp32_scale ? _mm256_mul_ps(v, load8(w + k))
                                      : _mm256_mul_ps(as_dtype<TO>(v), as_dtype<TO>(load8(w + k))));
        }
        for (; k < n; ++k) {
            const float v = to_f(xr[k]) * inv;
            yr[k] = fp32_scale ? static_cast<TO>(v * to_f(w[k]))
                               : static_cast<TO>(to_f(static_cast<TO>(v)) * to_f(static_cast<TO>(w[k])));
        }
    }
}

bool cpu_has_avx2() {
    static const bool yes = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2");
    }();
    return yes;
}

// y = x * rsqrt(mean(x^2) + eps), then scaled by w: in fp32 and cast once when w or the output is fp32; else cast
// to the output dtype first and multiplied in it (HF Llama's order, what the reference does)
template <typename TX, typename TW, typename TO>
void rms_norm_rows(const TX* x, const TW* w, TO* y, int64_t rows, int64_t n, float eps, bool fp32_scale) {
    if constexpr (kVecType<TX> && kVecType<TW> && kVecType<TO>) {
        if (cpu_has_avx2()) {
            at::parallel_for(0, rows, 4, [&](int64_t r0, int64_t r1) {
                int64_t r = r0;
                for (; r + 4 <= r1; r += 4) rms_norm_rows_avx2<4>(x + r * n, w, y + r * n, n, eps, fp32_scale);
                for (; r < r1; ++r) rms_norm_rows_avx2<1>(x + r * n, w, y + r * n, n, eps, fp32_scale);
            });
            return;
        }
    }
    at::parallel_for(0, rows, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const TX* xr = x + r * n;
            TO* yr = y + r * n;
            // 8 partial sums in a fixed order (whatever the thread split)
            float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
            int64_t i = 0;
            for (; i + 8 <= n; i += 8)
                for (int j = 0; j < 8; ++j) {
                    const float v = to_f(xr[i + j]);
                    part[j] += v * v;
                }
            for (; i < n; ++i) {
                const float v = to_f(xr[i]);
                part[0] += v * v;
            }
            const float ss = ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
            const float inv = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
            for (int64_t k = 0; k < n; ++k) {
                const float v = to_f(xr[k]) * inv;
                if (fp32_scale)
                    yr[k] = static_cast<TO>(v * to_f(w[k]));
                else
                    yr[k] = static_cast<TO>(to_f(static_cast<TO>(v)) * to_f(static_cast<TO>(w[k])));
            }
        }
    });
}

template <typename TX, typename TW>
void rms_norm_out(const at::Tensor& x, const at::Tensor& w, at::Tensor& y, int64_t rows, int64_t n, float eps,
                  bool fp32_scale) {
    const TX* xp = x.data_ptr<TX>();
    const TW* wp = w.data_ptr<TW>();
    switch (y.scalar_type()) {
        case at::kFloat: rms_norm_rows(xp, wp, y.data_ptr<float>(), rows, n, eps, fp32_scale); break;
        case at::kBFloat16: rms_norm_rows(xp, wp, y.data_ptr<c10::BFloat16>(), rows, n, eps, fp32_scale); break;
        default: rms_norm_rows(xp, wp, y.data_ptr<c10::Half>(), rows, n, eps, fp32_scale); break;
    }
}

bool float_type(at::ScalarType t) { return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf; }

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType out_dtype) {
    TORCH_CHECK(float_type(x.scalar_type()) && float_type(w.scalar_type()) && float_type(out_dtype),
                "exllamav2_cpu::rms_norm: x, weight and output must be float32, bfloat16 or float16");
    const int64_t n = x.size(-1);
    TORCH_CHECK(w.dim() == 1 && w.size(0) == n, "exllamav2_cpu::rms_norm: weight must hold ", n, " values (the "
                "last dimension of x), got ", w.sizes());
    const at::Tensor xc = x.contiguous(), wc = w.contiguous();
    at::Tensor y = at::empty(x.sizes(), x.options().dtype(out_dtype));
    const int64_t rows = n ? x.numel() / n : 0;
    const bool fp32_scale = w.scalar_type() == at::kFloat || out_dtype == at::kFloat;
    const float e = static_cast<float>(eps);
    AT_DISPATCH_SWITCH(xc.scalar_type(), "rms_norm",
        AT_DISPATCH_CASE(at::kFloat, [&] {
            if (wc.scalar_type() == at::kFloat) rms_norm_out<float, float>(xc, wc, y, rows, n, e, fp32_scale);
            else if (wc.scalar_type() == at::kBFloat16) rms_norm_out<float, c10::BFloat16>(xc, wc, y, rows, n, e, fp32_scale);
            else rms_norm_out<float, c10::Half>(xc, wc, y, rows, n, e, fp32_scale);
        })
        AT_DISPATCH_CASE(at::kBFloat16, [&] {
            if (wc.scalar_type() == at::kFloat) rms_norm_out<c10::BFloat16, float>(xc, wc, y, rows, n, e, fp32_scale);
            else if (wc.scalar_type() == at::kBFloat16) rms_norm_out<c10::BFloat16, c10::BFloat16>(xc, wc, y, rows, n, e, fp32_scale);
            else rms_norm_out<c10::BFloat16, c10::Half>(xc, wc, y, rows, n, e, fp32_scale);
        })
        AT_DISPATCH_CASE(at::kHalf, [&] {
            if (wc.scalar_type() == at::kFloat) rms_norm_out<c10::Half, float>(xc, wc, y, rows, n, e, fp32_scale);
            else if (wc.scalar_type() == at::kBFloat16) rms_norm_out<c10::Half, c10::BFloat16>(xc, wc, y, rows, n, e, fp32_scale);
            else rms_norm_out<c10::Half, c10::Half>(xc, wc, y, rows, n, e, fp32_scale);
        }));
    return y;
}

// RoPE on (b, s, heads, d) with cos/sin (b or 1, s, 1, rd) gathered per position, in one pass instead of the
// reference's six ops (exllamav2/ops/torch_ref/rope.py). Bit-identical to it: x and the tables share a dtype, and
// each step rounds where the reference's elementwise ops round: out = T(T(x*cos) + T(rot*sin)), products and the
// sum in fp32 (negation is exact). Channels past rd pass through. x may be a strided view (the fused qkv output).
template <typename T>
inline float rope_term(T x, T c) {  // one product, rounded to T where the reference's op rounds
    return static_cast<float>(static_cast<T>(static_cast<float>(x) * static_cast<float>(c)));
}

// bf16, rotate-half: the same roundings 8 channels per instruction (c10's bf16 rounding in integers, as
// store8/as_dtype above); products of two bf16 are exact in fp32, so only the roundings matter
__attribute__((target("avx2"))) void rope_half_bf16_avx2(const c10::BFloat16* xi, const c10::BFloat16* c,
                                                         const c10::BFloat16* n, c10::BFloat16* yo, int64_t half) {
    for (int64_t j = 0; j < half; j += 8) {
        const __m256 x1 = load8(xi + j), x2 = load8(xi + j + half);
        const __m256 a = as_dtype<c10::BFloat16>(_mm256_mul_ps(x1, load8(c + j)));
        const __m256 b = as_dtype<c10::BFloat16>(_mm256_mul_ps(x2, load8(n + j)));
        store8(yo + j, _mm256_sub_ps(a, b));
        const __m256 a2 = as_dtype<c10::BFloat16>(_mm256_mul_ps(x2, load8(c + j + half)));
        const __m256 b2 = as_dtype<c10::BFloat16>(_mm256_mul_ps(x1, load8(n + j + half)));
        store8(yo + j + half, _mm256_add_ps(a2, b2));
    }
}

template <typename T>
inline void rope_head(const T* xi, const T* c, const T* n, T* yo, int64_t rd, int64_t D, bool interleaved) {
    const int64_t half = rd / 2;
    if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (!interleaved && half % 8 == 0 && cpu_has_avx2()) {
            rope_half_bf16_avx2(xi, c, n, yo, half);
            for (int64_t j = rd; j < D; ++j) yo[j] = xi[j];
            return;
        }
    }
    if (interleaved) {
        for (int64_t j = 0; j < rd; j += 2) {
            yo[j] = static_cast<T>(rope_term(xi[j], c[j]) - rope_term(xi[j + 1], n[j]));
            yo[j + 1] = static_cast<T>(rope_term(xi[j + 1], c[j + 1]) + rope_term(xi[j], n[j + 1]));
        }
    } else {  // two branch-free halves, so that the compiler vectorizes them
        for (int64_t j = 0; j < half; ++j)
            yo[j] = static_cast<T>(rope_term(xi[j], c[j]) - rope_term(xi[j + half], n[j]));
        for (int64_t j = half; j < rd; ++j)
            yo[j] = static_cast<T>(rope_term(xi[j], c[j]) + rope_term(xi[j - half], n[j]));
    }
    for (int64_t j = rd; j < D; ++j) yo[j] = xi[j];
}

template <typename T>
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y, bool interleaved) {
    const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), rd = cos.size(3);
    const T* xp = x.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), sb = sin.size(0) == 1 ? 0 : sin.stride(0);
    at::parallel_for(0, B * S, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / S, s = r % S;
            const T* c = cp + b * cb + s * cos.stride(1);
            const T* n = sp + b * sb + s * sin.stride(1);
            for (int64_t h = 0; h < H; ++h)
                rope_head(xp + b * x.stride(0) + s * x.stride(1) + h * x.stride(2), c, n,
                          yp + ((b * S + s) * H + h) * D, rd, D, interleaved);
        }
    });
}

void check_rope_args(const char* op, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "exllamav2_cpu::", op, ": x must be (batch, seq, heads, head_dim) "
                "with contiguous channels, got ", x.sizes(), " strides ", x.strides());
    TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && float_type(x.scalar_type()),
                "exllamav2_cpu::", op, ": x, cos and sin must share a float dtype");
    TORCH_CHECK(cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(1) == x.size(1) && cos.size(2) == 1 &&
                (cos.size(0) == 1 || cos.size(0) == x.size(0)) && cos.size(3) <= x.size(3) && cos.size(3) % 2 == 0 &&
                cos.stride(3) == 1 && sin.stride(3) == 1 && cos.stride(1) == sin.stride(1),
                "exllamav2_cpu::", op, ": cos and sin must be (", x.size(0), " or 1, ", x.size(1), ", 1, even rot_dim <= ",
                x.size(3), ") with contiguous channels, got ", cos.sizes(), " and ", sin.sizes());
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
    check_rope_args("rope", x, cos, sin);
    at::Tensor y = at::empty(x.sizes(), x.options());
    if (y.numel() == 0) return y;
    switch (x.scalar_type()) {
        case at::kFloat: rope_rows<float>(x, cos, sin, y, interleaved); break;
        case at::kBFloat16: rope_rows<c10::BFloat16>(x, cos, sin, y, interleaved); break;
        default: rope_rows<c10::Half>(x, cos, sin, y, interleaved); break;
    }
    return y;
}

// RoPE on the fused q|k heads plus the KV-cache write, for attend's plain-cache path (exllamav2/attn.py): the first
// q_heads heads of qk are rotated into the returned q (b, s, q_heads, d); the rest (k) are rotated straight into
// k_cache[:, index[i]], and v is copied into v_cache[:, index[i]]. The same per-head arithmetic as `rope`, so the
// values equal the reference's rope + index_copy_ (exllamav2/ops/torch_ref/rope_kv.py) to the bit.
template <typename T>
void rope_kv_rows(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                  bool interleaved, at::Tensor& kc, at::Tensor& vc, const int64_t* index, int64_t Hq, at::Tensor& q) {
    const int64_t B = qk.size(0), S = qk.size(1), H = qk.size(2), D = qk.size(3), rd = cos.size(3), Hkv = v.size(2);
    const T* xp = qk.data_ptr<T>();
    const T* vp = v.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* qp = q.data_ptr<T>();
    T* kp = kc.data_ptr<T>();
    T* vcp = vc.data_ptr<T>();
    const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), sb = sin.size(0) == 1 ? 0 : sin.stride(0);
    at::parallel_for(0, B * S, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / S, s = r % S;
            const T* c = cp + b * cb + s * cos.stride(1);
            const T* n = sp + b * sb + s * sin.stride(1);
            const T* xrow = xp + b * qk.stride(0) + s * qk.stride(1);
            for (int64_t h = 0; h < Hq; ++h)
                rope_head(xrow + h * qk.stride(2), c, n, qp + ((b * S + s) * Hq + h) * D, rd, D, interleaved);
            T* krow = kp + b * kc.stride(0) + index[s] * kc.stride(1);
            for (int64_t h = Hq; h < H; ++h)
                rope_head(xrow + h * qk.stride(2), c, n, krow + (h - Hq) * kc.stride(2), rd, D, interleaved);
            const T* vrow = vp + b * v.stride(0) + s * v.stride(1);
            T* vcrow = vcp + b * vc.stride(0) + index[s] * vc.stride(1);
            for (int64_t h = 0; h < Hkv; ++h)
                std::memcpy(vcrow + h * vc.stride(2), vrow + h * v.stride(2), D * sizeof(T));
        }
    });
}

at::Tensor rope_kv_write(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                         bool interleaved, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& index,
                         int64_t q_heads) {
    check_rope_args("rope_kv_write", qk, cos, sin);
    const int64_t B = qk.size(0), S = qk.size(1), D = qk.size(3), Hkv = qk.size(2) - q_heads;
    TORCH_CHECK(q_heads > 0 && Hkv > 0, "exllamav2_cpu::rope_kv_write: q_heads must be in 1..", qk.size(2) - 1,
                " (qk holds the q heads then the k heads), got ", q_heads);
    TORCH_CHECK(v.dim() == 4 && v.size(0) == B && v.size(1) == S && v.size(2) == Hkv && v.size(3) == D &&
                v.stride(3) == 1 && v.scalar_type() == qk.scalar_type(),
                "exllamav2_cpu::rope_kv_write: v must be (", B, ", ", S, ", ", Hkv, ", ", D, ") of qk's dtype with "
                "contiguous channels, got ", v.sizes(), " ", v.scalar_type());
    for (const at::Tensor* c : {&k_cache, &v_cache})
        TORCH_CHECK(c->dim() == 4 && c->size(0) == B && c->size(2) == Hkv && c->size(3) == D && c->stride(3) == 1 &&
                    c->scalar_type() == qk.scalar_type() && c->size(1) == k_cache.size(1),
                    "exllamav2_cpu::rope_kv_write: k_cache and v_cache must be (", B, ", positions, ", Hkv, ", ", D,
                    ") of qk's dtype with contiguous channels, got ", c->sizes(), " ", c->scalar_type());
    TORCH_CHECK(index.dim() == 1 && index.size(0) == S && index.scalar_type() == at::kLong,
                "exllamav2_cpu::rope_kv_write: index must be (", S, ",) int64 cache positions, got ", index.sizes(), " ",
                index.scalar_type());
    const at::Tensor idx = index.contiguous();
    const int64_t* ip = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < S; ++i)
        TORCH_CHECK(ip[i] >= 0 && ip[i] < k_cache.size(1), "exllamav2_cpu::rope_kv_write: index[", i, "] = ", ip[i],
                    " is outside the cache's ", k_cache.size(1), " positions");
    at::Tensor q = at::empty({B, S, q_heads, D}, qk.options());
    if (q.numel() == 0) return q;
    switch (qk.scalar_type()) {
        case at::kFloat: rope_kv_rows<float>(qk, v, cos, sin, interleaved, k_cache, v_cache, ip, q_heads, q); break;
        case at::kBFloat16:
            rope_kv_rows<c10::BFloat16>(qk, v, cos, sin, interleaved, k_cache, v_cache, ip, q_heads, q); break;
        default: rope_kv_rows<c10::Half>(qk, v, cos, sin, interleaved, k_cache, v_cache, ip, q_heads, q); break;
    }
    return q;
}

// ------------------------------------------------------------------------------------------ act(gate) * up
// One pass over gate and up (rows of the fused gate|up output, last dim contiguous) instead of torch's act, then
// mul, each a pass of its own with a T intermediate (a 512-token SmolLM2 prompt's 512 x 1536 bf16 on 2 threads:
// 173 -> 100 us). The reference's roundings (exllamav2/ops/torch_ref/activation.py): act in fp32 rounded to T, then
// the product in fp32 rounded to T (bf16 by vcvtneps2bf16: fp32 denormals flush to zero, NaN stays NaN). silu is
// torch's formula with exp within 2 ulp of fp32 (avx512_math.h), so a value can differ from the reference by one
// unit in T's last place where the fp32 result sits at a rounding boundary; the tanh GELU is rewritten (below).
// Each element is computed alone: batch invariant.
enum GatedAct : int64_t { ACT_SILU = 0, ACT_GELU_TANH = 1 };

template <typename T, int ACT>
AVX512_TARGET inline __m512 gated16(__m512 g, __m512 u) {
    __m512 a;
    if constexpr (ACT == ACT_SILU) {  // x / (1 + exp(-x)), as torch's silu
        const __m512 e = avx512_math::exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), g));
        a = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    } else {
        // torch's gelu(approximate="tanh"), 0.5 x (1 + tanh(y)) with y = b (x + k x^3), as x / (1 + exp(-2y)):
        // the same function without the cancellation of 1 + tanh(y) for negative y (there torch's value is the
        // less accurate one: below x ~ -5 it can differ from ours by more than its last place, by < 1e-6 of x)
        const __m512 cube = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
        const __m512 y = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                       _mm512_add_ps(g, _mm512_mul_ps(_mm512_set1_ps(0.044715f), cube)));
        const __m512 e = avx512_math::exp_ps(_mm512_mul_ps(_mm512_set1_ps(-2.f), y));
        a = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
    }
    return _mm512_mul_ps(avx512_math::as_dtype<T>(a), u);
}

// the element offset of row r of x (rows: every index but the last, in order)
inline int64_t row_offset(const at::Tensor& x, int64_t r) {
    int64_t off = 0;
    for (int64_t d = x.dim() - 2; d >= 0; --d) {
        off += (r % x.size(d)) * x.stride(d);
        r /= x.size(d);
    }
    return off;
}

template <typename T, int ACT>
AVX512_TARGET void gated_rows(const at::Tensor& gate, const at::Tensor& up, T* out, int64_t C, int64_t r0,
                              int64_t r1) {
    using avx512_math::load16;
    const T* g0 = static_cast<const T*>(gate.data_ptr());
    const T* u0 = static_cast<const T*>(up.data_ptr());
    for (int64_t r = r0; r < r1; ++r) {
        const T* gr = g0 + row_offset(gate, r);
        const T* ur = u0 + row_offset(up, r);
        T* o = out + r * C;
        int64_t c = 0;
        for (; c + 16 <= C; c += 16) avx512_math::store16(o + c, gated16<T, ACT>(load16(gr + c), load16(ur + c)));
        if (c < C) {
            const int n = static_cast<int>(C - c);
            avx512_math::store16(o + c, gated16<T, ACT>(avx512_math::load16_partial(gr + c, n),
                                                        avx512_math::load16_partial(ur + c, n)), n);
        }
    }
}

// gate and up of one shape and dtype, any strides but a contiguous last dimension (the halves of a fused gate|up
// output) -> a new contiguous tensor of that shape
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, int64_t act) {
    TORCH_CHECK(act == ACT_SILU || act == ACT_GELU_TANH, "exllamav2_cpu::gated_activation: act must be 0 (silu) or "
                "1 (gelu_tanh), got ", act);
    TORCH_CHECK(gate.dim() >= 1 && gate.sizes() == up.sizes() && gate.stride(-1) == 1 && up.stride(-1) == 1 &&
                gate.scalar_type() == up.scalar_type(),
                "exllamav2_cpu::gated_activation: gate and up must have one shape and dtype and contiguous last "
                "dimensions, got ", gate.sizes(), " ", gate.scalar_type(), " and ", up.sizes(), " ", up.scalar_type());
    TORCH_CHECK(gate.scalar_type() == at::kFloat || gate.scalar_type() == at::kBFloat16 ||
                gate.scalar_type() == at::kHalf, "exllamav2_cpu::gated_activation: float32, bfloat16 or float16, got ",
                gate.scalar_type());
    TORCH_CHECK(gate.device().is_cpu() && up.device().is_cpu(), "exllamav2_cpu::gated_activation: CPU tensors");
    at::Tensor out = at::empty(gate.sizes(), gate.options());
    if (out.numel() == 0) return out;
    const int64_t C = gate.size(-1), R = out.numel() / C;
    const int64_t grain = std::max<int64_t>(1, 16384 / C);
    auto run = [&](auto tag, auto act_c) {
        using T = decltype(tag);
        constexpr int A = decltype(act_c)::value;
        T* o = static_cast<T*>(out.data_ptr());
        if (R <= grain) return gated_rows<T, A>(gate, up, o, C, 0, R);  // one task: no parallel region
        at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) { gated_rows<T, A>(gate, up, o, C, r0, r1); });
    };
    auto by_act = [&](auto tag) {
        if (act == ACT_SILU) run(tag, std::integral_constant<int, ACT_SILU>{});
        else run(tag, std::integral_constant<int, ACT_GELU_TANH>{});
    };
    switch (gate.scalar_type()) {
        case at::kFloat: by_act(float{}); break;
        case at::kBFloat16: by_act(c10::BFloat16{}); break;
        default: by_act(c10::Half{}); break;
    }
    return out;
}

}  // namespace

namespace exl2_ops {
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType out_dtype) {
    return ::rms_norm(x, w, eps, out_dtype);
}
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
    return ::rope(x, cos, sin, interleaved);
}
at::Tensor rope_kv_write(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                         bool interleaved, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& index,
                         int64_t q_heads) {
    return ::rope_kv_write(qk, v, cos, sin, interleaved, k_cache, v_cache, index, q_heads);
}
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, int64_t act) {
    return ::gated_activation(gate, up, act);
}
}  // namespace exl2_ops

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("rms_norm(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> Tensor");
    m.def("gated_activation(Tensor gate, Tensor up, int act) -> Tensor");
    m.def("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor");
    m.def("rope_kv_write(Tensor qk, Tensor v, Tensor cos, Tensor sin, bool interleaved, Tensor(a!) k_cache, "
          "Tensor(b!) v_cache, Tensor index, int q_heads) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("gated_activation", &gated_activation);
    m.impl("rope", &rope);
    m.impl("rope_kv_write", &rope_kv_write);
}
