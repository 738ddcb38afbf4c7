// Decode GEMV / skinny GEMM kernels for 1..8 rows on x86 CPUs: GGUF Q4_0/Q4_1/Q8_0 blocks through int8 dot
// products (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw), bf16 weights through AVX512-BF16 vdpbf16ps (or AVX2 FMA).
// Built at first use by exllamav2/ops/cpu/build.py; the Python side is exllamav2/ops/cpu/kernels.py and the
// weight layout is made by exllamav2/ops/cpu/gguf_pack.py.
//
// GGUF layout (see gguf_pack.py): output rows in groups of 16 (padded), per (group, 32-column block):
//   4-bit: 4 chunks x 16 rows x 4 bytes; byte i of chunk c of row r holds column 4c+i (low nibble) and 16+4c+i
//          (high nibble), the GGUF block's own byte order, only interleaved over 16 rows;
//   8-bit: 8 chunks x 16 rows x 4 bytes, column 4c+i, stored as q + 128 (unsigned).
//   scales (fp16, 16 per group and block) and, for Q4_1, offsets m (fp16) in the same order.
// A 32-bit lane of a vector then holds 4 weights of one output row, so the activation's 4 matching int8 values are
// broadcast to all lanes and one vpdpbusd advances 16 output rows.
//
// Activations are quantised per 32-column block in two int8 stages: x ~ dx1*q1 + dx2*q2, q1 = round(x/dx1) with
// dx1 = amax/127 (llama.cpp's whole quantisation), q2 the residual x - dx1*q1 quantised the same way. One stage
// alone costs about 0.5% relative error per dot product, more than bf16 activations (0.2-0.4%), enough to move
// whole-model logits past the tolerance tests/test_backends.py holds the cpu backend to; the second stage brings
// the activation error to ~1e-5 for one more vpdpbusd per weight vector (the weights are unpacked once).
// With w = d*q + c per weight block: sum_k w x = d*(dx1*sum(q*q1) + dx2*sum(q*q2)) + c*(dx1*sum(q1) + dx2*sum(q2)),
// c = -8d (Q4_0), m (Q4_1) or -128d (Q8_0, whose stored codes carry +128).
//
// Batch invariance: a row's result is computed by the same instruction sequence whatever the number of rows and
// whatever the thread split (threads split output rows; the reduction over k never crosses threads).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kBlock = 32;      // columns per quant block
constexpr int kGroup = 16;      // output rows per interleaved group
constexpr int kMaxRows = 8;     // activation rows per call (the Python side splits larger batches)

enum Kind : int64_t { Q4_0 = 0, Q4_1 = 1, Q8_0 = 2 };
enum Isa : int64_t { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

int64_t detect_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512bf16"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
    return ISA_NONE;
}

std::atomic<int64_t> g_isa{-1};

int64_t active_isa() {
    int64_t v = g_isa.load();
    if (v < 0) {
        v = detect_isa();
        g_isa.store(v);
    }
    return v;
}

// --------------------------------------------------------------------------------------- activation quantisation

struct QuantX {
    const int8_t* q;     // (rows, K) first stage
    const int8_t* q2;    // (rows, K) second stage (the residual)
    const float* d;      // (rows, K/32) first-stage block scale
    const float* d2;     // (rows, K/32) second-stage block scale
    const float* ds;     // (rows, K/32) d * sum(q) + d2 * sum(q2)
    int64_t K;
};

inline void quantize_block(const float* xb, int8_t* qb, float& scale, int& sum) {
    float amax = 0.f;
    for (int j = 0; j < kBlock; ++j) amax = std::fmax(amax, std::fabs(xb[j]));
    scale = amax / 127.f;
    const float id = scale > 0.f ? 1.f / scale : 0.f;
    sum = 0;
    for (int j = 0; j < kBlock; ++j) {
        const int v = static_cast<int>(std::nearbyint(xb[j] * id));
        qb[j] = static_cast<int8_t>(v);
        sum += v;
    }
}

void quantize_rows(const float* x, int64_t rows, int64_t K, int8_t* q, int8_t* q2, float* d, float* d2,
                   float* ds) {
    const int64_t nb = K / kBlock;
    for (int64_t m = 0; m < rows; ++m) {
        for (int64_t b = 0; b < nb; ++b) {
            const float* xb = x + m * K + b * kBlock;
            int8_t* qb = q + m * K + b * kBlock;
            float s1, s2, r[kBlock];
            int n1, n2;
            quantize_block(xb, qb, s1, n1);
            for (int j = 0; j < kBlock; ++j) r[j] = xb[j] - s1 * static_cast<float>(qb[j]);
            quantize_block(r, q2 + m * K + b * kBlock, s2, n2);
            d[m * nb + b] = s1;
            d2[m * nb + b] = s2;
            ds[m * nb + b] = s1 * static_cast<float>(n1) + s2 * static_cast<float>(n2);
        }
    }
}

// ------------------------------------------------------------------------------------------- output storing

template <typename T>
inline void store_out(T* dst, const float* src, int n) {
    for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// ------------------------------------------------------------------------------------- GGUF GEMV, AVX-512 VNNI

template <int KIND, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,f16c"))) void gguf_group_avx512(
        const uint8_t* w, const c10::Half* scales, const c10::Half* offsets, const QuantX& xq, int64_t g,
        float* out /* (M, 16) */) {
    const int64_t nb = xq.K / kBlock;
    constexpr int kBytes = KIND == Q8_0 ? 512 : 256;
    const uint8_t* wg = w + g * nb * kBytes;
    const uint16_t* sg = reinterpret_cast<const uint16_t*>(scales) + g * nb * kGroup;
    const uint16_t* og = offsets ? reinterpret_cast<const uint16_t*>(offsets) + g * nb * kGroup : nullptr;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[M];
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wg + b * kBytes;
        __m512i dot[M], dot2[M];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) dot[m] = dot2[m] = _mm512_setzero_si512();
        if constexpr (KIND == Q8_0) {
            #pragma GCC unroll 8
            for (int c = 0; c < 8; ++c) {
                const __m512i v = _mm512_loadu_si512(wb + c * 64);
                #pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    int32_t xs, xs2;
                    std::memcpy(&xs, xq.q + m * xq.K + b * kBlock + 4 * c, 4);
                    std::memcpy(&xs2, xq.q2 + m * xq.K + b * kBlock + 4 * c, 4);
                    dot[m] = _mm512_dpbusd_epi32(dot[m], v, _mm512_set1_epi32(xs));
                    dot2[m] = _mm512_dpbusd_epi32(dot2[m], v, _mm512_set1_epi32(xs2));
                }
            }
        } else {
            #pragma GCC unroll 8
            for (int c = 0; c < 4; ++c) {
                const __m512i v = _mm512_loadu_si512(wb + c * 64);
                const __m512i lo = _mm512_and_si512(v, low);
                const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                #pragma GCC unroll 8
                for (int m = 0; m < M; ++m) {
                    int32_t xl, xh, xl2, xh2;
                    std::memcpy(&xl, xq.q + m * xq.K + b * kBlock + 4 * c, 4);
                    std::memcpy(&xh, xq.q + m * xq.K + b * kBlock + 16 + 4 * c, 4);
                    std::memcpy(&xl2, xq.q2 + m * xq.K + b * kBlock + 4 * c, 4);
                    std::memcpy(&xh2, xq.q2 + m * xq.K + b * kBlock + 16 + 4 * c, 4);
                    dot[m] = _mm512_dpbusd_epi32(dot[m], lo, _mm512_set1_epi32(xl));
                    dot[m] = _mm512_dpbusd_epi32(dot[m], hi, _mm512_set1_epi32(xh));
                    dot2[m] = _mm512_dpbusd_epi32(dot2[m], lo, _mm512_set1_epi32(xl2));
                    dot2[m] = _mm512_dpbusd_epi32(dot2[m], hi, _mm512_set1_epi32(xh2));
                }
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(sg + b * kGroup)));
        __m512 off;
        if constexpr (KIND == Q4_1)
            off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(og + b * kGroup)));
        else
            off = _mm512_mul_ps(d, _mm512_set1_ps(KIND == Q4_0 ? -8.f : -128.f));
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
            const int64_t i = m * nb + b;
            const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(xq.d[i]));
            const __m512 scale2 = _mm512_mul_ps(d, _mm512_set1_ps(xq.d2[i]));
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[m]), scale, acc[m]);
            acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot2[m]), scale2, acc[m]);
            acc[m] = _mm512_fmadd_ps(off, _mm512_set1_ps(xq.ds[i]), acc[m]);
        }
    }
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) _mm512_storeu_ps(out + m * kGroup, acc[m]);
}

// ---------------------------------------------------------------------------------------- GGUF GEMV, AVX2

// The same layout, 8 rows per 256-bit half. vpmaddubsw multiplies unsigned by signed bytes into saturating int16
// pairs: 4-bit codes (<= 15 * 127 * 2) never saturate; 8-bit codes are made signed again and multiplied as
// |q| * sign(x, q) (<= 128 * 127 * 2), and the +128 term the VNNI path sees is added back, so both paths produce the
// same integers.
template <int KIND, int M>
__attribute__((target("avx2,fma,f16c"))) void gguf_group_avx2(
        const uint8_t* w, const c10::Half* scales, const c10::Half* offsets, const QuantX& xq, int64_t g,
        float* out /* (M, 16) */) {
    const int64_t nb = xq.K / kBlock;
    constexpr int kBytes = KIND == Q8_0 ? 512 : 256;
    const uint8_t* wg = w + g * nb * kBytes;
    const uint16_t* sg = reinterpret_cast<const uint16_t*>(scales) + g * nb * kGroup;
    const uint16_t* og = offsets ? reinterpret_cast<const uint16_t*>(offsets) + g * nb * kGroup : nullptr;
    const __m256i low = _mm256_set1_epi8(0x0F);
    const __m256i ones16 = _mm256_set1_epi16(1);
    const __m256i flip = _mm256_set1_epi8(static_cast<char>(0x80));
    __m256 acc[M][2];
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wg + b * kBytes;
        __m256i dot[M][2], dot2[M][2];
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) dot[m][0] = dot[m][1] = dot2[m][0] = dot2[m][1] = _mm256_setzero_si256();
        #pragma GCC unroll 8
        for (int h = 0; h < 2; ++h) {
            if constexpr (KIND == Q8_0) {
                #pragma GCC unroll 8
                for (int c = 0; c < 8; ++c) {
                    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
                    const __m256i s = _mm256_xor_si256(u, flip);   // signed code q
                    const __m256i a = _mm256_sign_epi8(s, s);      // |q| (128 stays 0x80 = 128 unsigned)
                    #pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) {
                        int32_t xs, xs2;
                        std::memcpy(&xs, xq.q + m * xq.K + b * kBlock + 4 * c, 4);
                        std::memcpy(&xs2, xq.q2 + m * xq.K + b * kBlock + 4 * c, 4);
                        const __m256i xv = _mm256_sign_epi8(_mm256_set1_epi32(xs), s);
                        const __m256i xv2 = _mm256_sign_epi8(_mm256_set1_epi32(xs2), s);
                        const __m256i p = _mm256_madd_epi16(_mm256_maddubs_epi16(a, xv), ones16);
                        const __m256i p2 = _mm256_madd_epi16(_mm256_maddubs_epi16(a, xv2), ones16);
                        dot[m][h] = _mm256_add_epi32(dot[m][h], p);
                        dot2[m][h] = _mm256_add_epi32(dot2[m][h], p2);
                    }
                }
            } else {
                #pragma GCC unroll 8
                for (int c = 0; c < 4; ++c) {
                    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + c * 64 + h * 32));
                    const __m256i lo = _mm256_and_si256(v, low);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    #pragma GCC unroll 8
                    for (int m = 0; m < M; ++m) {
                        int32_t xl, xh, xl2, xh2;
                        std::memcpy(&xl, xq.q + m * xq.K + b * kBlock + 4 * c, 4);
                        std::memcpy(&xh, xq.q + m * xq.K + b * kBlock + 16 + 4 * c, 4);
                        std::memcpy(&xl2, xq.q2 + m * xq.K + b * kBlock + 4 * c, 4);
                        std::memcpy(&xh2, xq.q2 + m * xq.K + b * kBlock + 16 + 4 * c, 4);
                        const __m256i pl = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl)), ones16);
                        const __m256i ph = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh)), ones16);
                        const __m256i pl2 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(xl2)), ones16);
                        const __m256i ph2 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, _mm256_set1_epi32(xh2)), ones16);
                        dot[m][h] = _mm256_add_epi32(dot[m][h], _mm256_add_epi32(pl, ph));
                        dot2[m][h] = _mm256_add_epi32(dot2[m][h], _mm256_add_epi32(pl2, ph2));
                    }
                }
            }
        }
        #pragma GCC unroll 8
        for (int h = 0; h < 2; ++h) {
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sg + b * kGroup + 8 * h)));
            __m256 off;
            if constexpr (KIND == Q4_1)
                off = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(og + b * kGroup + 8 * h)));
            else
                off = _mm256_mul_ps(d, _mm256_set1_ps(KIND == Q4_0 ? -8.f : -128.f));
            #pragma GCC unroll 8
            for (int m = 0; m < M; ++m) {
                const int64_t i = m * nb + b;
                __m256i di = dot[m][h], di2 = dot2[m][h];
                if constexpr (KIND == Q8_0) {
                    int32_t sx = 0, sx2 = 0;
                    for (int j = 0; j < kBlock; ++j) {
                        sx += xq.q[m * xq.K + b * kBlock + j];
                        sx2 += xq.q2[m * xq.K + b * kBlock + j];
                    }
                    di = _mm256_add_epi32(di, _mm256_set1_epi32(128 * sx));
                    di2 = _mm256_add_epi32(di2, _mm256_set1_epi32(128 * sx2));
                }
                const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(xq.d[i]));
                const __m256 scale2 = _mm256_mul_ps(d, _mm256_set1_ps(xq.d2[i]));
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(di), scale, acc[m][h]);
                acc[m][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(di2), scale2, acc[m][h]);
                acc[m][h] = _mm256_fmadd_ps(off, _mm256_set1_ps(xq.ds[i]), acc[m][h]);
            }
        }
    }
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
        _mm256_storeu_ps(out + m * kGroup, acc[m][0]);
        _mm256_storeu_ps(out + m * kGroup + 8, acc[m][1]);
    }
}

using GroupFn = void (*)(const uint8_t*, const c10::Half*, const c10::Half*, const QuantX&, int64_t, float*);

template <int KIND, int M>
GroupFn pick_group_fn(int64_t isa) {
    return isa == ISA_AVX512 ? &gguf_group_avx512<KIND, M> : &gguf_group_avx2<KIND, M>;
}

template <int KIND>
GroupFn group_fn_for_rows(int64_t rows, int64_t isa) {
    switch (rows) {
        case 1: return pick_group_fn<KIND, 1>(isa);
        case 2: return pick_group_fn<KIND, 2>(isa);
        case 3: return pick_group_fn<KIND, 3>(isa);
        case 4: return pick_group_fn<KIND, 4>(isa);
        case 5: return pick_group_fn<KIND, 5>(isa);
        case 6: return pick_group_fn<KIND, 6>(isa);
        case 7: return pick_group_fn<KIND, 7>(isa);
        default: return pick_group_fn<KIND, 8>(isa);
    }
}

void check_isa(const char* op) {
    TORCH_CHECK(active_isa() != ISA_NONE, "exllamav2_cpu::", op, ": this CPU has neither AVX-512 (VNNI, BF16) nor "
                "AVX2; the Python side should have kept torch's kernels");
}

at::Tensor gguf_gemv(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                     const std::optional<at::Tensor>& offsets, int64_t kind, int64_t n,
                     const std::optional<at::Tensor>& bias) {
    check_isa("gguf_gemv");
    TORCH_CHECK(kind == Q4_0 || kind == Q4_1 || kind == Q8_0, "gguf_gemv: kind ", kind, " is not 0 (Q4_0), 1 (Q4_1) "
                "or 2 (Q8_0)");
    TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "gguf_gemv: x must be a 2-D CPU tensor, got ", x.sizes());
    const int64_t rows = x.size(0), K = x.size(1);
    TORCH_CHECK(K % kBlock == 0, "gguf_gemv: x has ", K, " columns, expected a multiple of ", kBlock);
    const int64_t nb = K / kBlock, groups = (n + kGroup - 1) / kGroup;
    const int64_t block_bytes = kind == Q8_0 ? 512 : 256;
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() &&
                qweight.numel() == groups * nb * block_bytes, "gguf_gemv: qweight must be contiguous uint8 with ",
                groups * nb * block_bytes, " bytes for ", n, " rows x ", K, " columns, got ", qweight.numel());
    TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.is_contiguous() && scales.numel() == groups * nb * kGroup,
                "gguf_gemv: scales must be contiguous float16 with ", groups * nb * kGroup, " values");
    if (kind == Q4_1)
        TORCH_CHECK(offsets.has_value() && offsets->scalar_type() == at::kHalf && offsets->is_contiguous() &&
                    offsets->numel() == groups * nb * kGroup, "gguf_gemv: Q4_1 needs float16 offsets like scales");
    if (bias.has_value())
        TORCH_CHECK(bias->numel() == n && bias->is_contiguous(), "gguf_gemv: bias must hold ", n, " values");

    const at::Tensor xf = x.to(at::kFloat).contiguous();
    at::Tensor out = at::empty({rows, n}, x.options());
    if (rows == 0 || n == 0) return out;
    at::Tensor q = at::empty({2, rows, K}, x.options().dtype(at::kChar));
    at::Tensor dd = at::empty({3, rows, nb}, x.options().dtype(at::kFloat));
    int8_t* q1p = q.data_ptr<int8_t>();
    int8_t* q2p = q1p + rows * K;
    float* d1p = dd.data_ptr<float>();
    float* d2p = d1p + rows * nb;
    float* dsp = d2p + rows * nb;
    at::parallel_for(0, rows, 16, [&](int64_t m0, int64_t m1) {
        quantize_rows(xf.data_ptr<float>() + m0 * K, m1 - m0, K, q1p + m0 * K, q2p + m0 * K, d1p + m0 * nb,
                      d2p + m0 * nb, dsp + m0 * nb);
    });
    const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;
    const int64_t isa = active_isa();
    const uint8_t* w = qweight.data_ptr<uint8_t>();
    const c10::Half* s = scales.data_ptr<c10::Half>();
    const c10::Half* o = kind == Q4_1 ? offsets->data_ptr<c10::Half>() : nullptr;

    // groups outer, row chunks inner: a group's weights (K/2 or K bytes x 16 rows) stay in cache while every chunk
    // of 8 activation rows uses them, so a prefill reads the weights once
    const int64_t chunks = (rows + kMaxRows - 1) / kMaxRows;
    at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
        alignas(64) float tile[kMaxRows * kGroup];
        for (int64_t g = g0; g < g1; ++g) {
            for (int64_t ch = 0; ch < chunks; ++ch) {
                const int64_t r0 = ch * kMaxRows, mr = std::min<int64_t>(kMaxRows, rows - r0);
                const QuantX xq{q1p + r0 * K, q2p + r0 * K, d1p + r0 * nb, d2p + r0 * nb, dsp + r0 * nb, K};
                const GroupFn fn = kind == Q4_0 ? group_fn_for_rows<Q4_0>(mr, isa)
                                 : kind == Q4_1 ? group_fn_for_rows<Q4_1>(mr, isa) : group_fn_for_rows<Q8_0>(mr, isa);
                fn(w, s, o, xq, g, tile);
                const int64_t c0 = g * kGroup, nc = std::min<int64_t>(kGroup, n - c0);
                for (int64_t m = 0; m < mr; ++m) {
                    float* t = tile + m * kGroup;
                    if (bptr)
                        for (int64_t j = 0; j < nc; ++j) t[j] += bptr[c0 + j];
                    if (out.scalar_type() == at::kFloat)
                        store_out(out.data_ptr<float>() + (r0 + m) * n + c0, t, nc);
                    else if (out.scalar_type() == at::kBFloat16)
                        store_out(out.data_ptr<c10::BFloat16>() + (r0 + m) * n + c0, t, nc);
                    else
                        store_out(out.data_ptr<c10::Half>() + (r0 + m) * n + c0, t, nc);
                }
            }
        }
    });
    return out;
}

// Dense (n, K) weights from the interleaved layout, for calls with more rows than the GEMV serves (prefill): a
// transient copy the caller feeds to oneDNN and drops.
at::Tensor gguf_dequant(const at::Tensor& qweight, const at::Tensor& scales, const std::optional<at::Tensor>& offsets,
                        int64_t kind, int64_t n, int64_t K, at::ScalarType dtype) {
    TORCH_CHECK(kind == Q4_0 || kind == Q4_1 || kind == Q8_0, "gguf_dequant: kind ", kind, " is not 0, 1 or 2");
    TORCH_CHECK(K % kBlock == 0, "gguf_dequant: K=", K, " is not a multiple of ", kBlock);
    const int64_t nb = K / kBlock, groups = (n + kGroup - 1) / kGroup;
    const int64_t block_bytes = kind == Q8_0 ? 512 : 256;
    TORCH_CHECK(qweight.numel() == groups * nb * block_bytes && qweight.is_contiguous(),
                "gguf_dequant: qweight has ", qweight.numel(), " bytes, expected ", groups * nb * block_bytes);
    TORCH_CHECK(scales.numel() == groups * nb * kGroup && scales.scalar_type() == at::kHalf && scales.is_contiguous(),
                "gguf_dequant: scales must be contiguous float16 with ", groups * nb * kGroup, " values");
    if (kind == Q4_1)
        TORCH_CHECK(offsets.has_value() && offsets->numel() == scales.numel() &&
                    offsets->scalar_type() == at::kHalf && offsets->is_contiguous(),
                    "gguf_dequant: Q4_1 needs float16 offsets like scales");
    at::Tensor out = at::empty({n, K}, qweight.options().dtype(dtype));
    const uint8_t* w = qweight.data_ptr<uint8_t>();
    const c10::Half* s = scales.data_ptr<c10::Half>();
    const c10::Half* o = kind == Q4_1 ? offsets->data_ptr<c10::Half>() : nullptr;
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
        std::vector<float> row(K);
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t g = r / kGroup, rr = r % kGroup;
            for (int64_t b = 0; b < nb; ++b) {
                const int64_t si = (g * nb + b) * kGroup + rr;
                const float d = static_cast<float>(s[si]);
                const float c = kind == Q4_1 ? static_cast<float>(o[si]) : (kind == Q4_0 ? -8.f * d : -128.f * d);
                const uint8_t* wb = w + (g * nb + b) * block_bytes;
                float* rb = row.data() + b * kBlock;
                if (kind == Q8_0) {
                    for (int ch = 0; ch < 8; ++ch)
                        for (int i = 0; i < 4; ++i) rb[4 * ch + i] = d * wb[ch * 64 + rr * 4 + i] + c;
                } else {
                    for (int ch = 0; ch < 4; ++ch)
                        for (int i = 0; i < 4; ++i) {
                            const uint8_t v = wb[ch * 64 + rr * 4 + i];
                            rb[4 * ch + i] = d * (v & 15) + c;
                            rb[16 + 4 * ch + i] = d * (v >> 4) + c;
                        }
                }
            }
            if (dtype == at::kFloat) store_out(out.data_ptr<float>() + r * K, row.data(), K);
            else if (dtype == at::kBFloat16) store_out(out.data_ptr<c10::BFloat16>() + r * K, row.data(), K);
            else store_out(out.data_ptr<c10::Half>() + r * K, row.data(), K);
        }
    });
    return out;
}

// ------------------------------------------------------------------------------------------------ bf16 GEMV

// One output row against M activation rows: 32 columns per vdpbf16ps, a masked tail, one horizontal sum in a fixed
// order. R rows of W share the activation loads; the per (row, activation row) sequence does not depend on R.
template <int R, int M>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void bf16_rows_avx512(
        const uint16_t* w, const uint16_t* x, int64_t K, float* out /* (M, R) */) {
    __m512 acc[R][M];
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
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
                                                        float* out /* (M, R) */) {
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

using RowsFn = void (*)(const uint16_t*, const uint16_t*, int64_t, float*);

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
                main(w + i * K, xp, K, tile);
                emit(i, R);
            }
            for (; i < n1; ++i) {
                one(w + i * K, xp, K, tile);
                emit(i, 1);
            }
        });
    }
    return out;
}

int64_t isa_op() { return active_isa(); }

int64_t set_isa_op(int64_t level) {
    const int64_t best = detect_isa();
    TORCH_CHECK(level >= 0 && level <= best, "exllamav2_cpu::set_isa: level ", level, " is not supported here (0: "
                "none, 1: AVX2, 2: AVX-512 VNNI/BF16; this CPU has up to ", best, ")");
    g_isa.store(level);
    return level;
}

}  // namespace

TORCH_LIBRARY(exllamav2_cpu, m) {
    m.def("gguf_gemv(Tensor x, Tensor qweight, Tensor scales, Tensor? offsets, int kind, int n, Tensor? bias) -> Tensor");
    m.def("gguf_dequant(Tensor qweight, Tensor scales, Tensor? offsets, int kind, int n, int k, ScalarType dtype) -> Tensor");
    m.def("bf16_gemv(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
    m.def("isa() -> int", &isa_op);
    m.def("set_isa(int level) -> int", &set_isa_op);
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("gguf_gemv", &gguf_gemv);
    m.impl("gguf_dequant", &gguf_dequant);
    m.impl("bf16_gemv", &bf16_gemv);
}
