// GEMV / skinny GEMM kernels on x86 CPUs: GGUF blocks of every type in llama.cpp's K-quant and IQ4 mixes through
// int8 dot products (AVX512-VNNI vpdpbusd, or AVX2 vpmaddubsw) for any number of rows (decode, batched decode and
// prefill, in chunks of 8 rows); the instruction-set switch (`isa`, `set_isa`). The bf16 GEMV is bf16_gemv.cpp.
// Built at first use by exllamav2/ops/cpu/build.py; the Python side is exllamav2/ops/cpu/kernels.py and the
// weight layout is made by csrc/gguf_pack.cpp (reference: exllamav2/ops/cpu/gguf_pack.py).
//
// The weight layout and the two-stage int8 activations are described in gguf_gemv_kernels.h, the inner kernels
// are gguf_gemv_avx512.h and gguf_gemv_avx2.h; this file holds the torch ops around them (checks, activation
// quantisation, the thread split).
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

#include "bf16_round.h"
#include "cpu_isa.h"
#include "gguf_gemv_avx2.h"
#include "gguf_gemv_avx512.h"
#include "gguf_file_blocks.h"
#include "ops_api.h"

namespace {

using gguf_kernels::kBlock;
using gguf_kernels::kGroup;
using gguf_kernels::kMaxRows;
using gguf_kernels::kKinds;
using gguf_kernels::Q4_0;
using gguf_kernels::Q4_1;
using gguf_kernels::Q8_0;
using gguf_kernels::Q4_K;
using gguf_kernels::Q5_0;
using gguf_kernels::Q5_1;
using gguf_kernels::Q5_K;
using gguf_kernels::Q6_K;
using gguf_kernels::Q2_K;
using gguf_kernels::Q3_K;
using gguf_kernels::IQ4_NL;
using gguf_kernels::IQ4_XS;
using gguf_kernels::IQ2_XXS;
using gguf_kernels::IQ2_XS;
using gguf_kernels::IQ2_S;
using gguf_kernels::IQ3_XXS;
using gguf_kernels::IQ3_S;
using gguf_kernels::IQ1_S;
using gguf_kernels::IQ1_M;
using namespace cpu_isa;

// ------------------------------------------------------------------------------------------- output storing

template <typename T>
inline void store_out(T* dst, const float* src, int n) {
    for (int i = 0; i < n; ++i) dst[i] = static_cast<T>(src[i]);
}

// ------------------------------------------------------------------------------------------- GGUF GEMV

// One row of a GGUF tile (`n` <= 32 fp32 values: one group, or a pair in prefill) plus the bias (or none) to out.
// 8 columns per step in AVX2 (both ISAs), the rest scalar: the same float add and, for bf16, c10's rounding (nearest even,
// NaN -> 0x7FC0) in integers, so the values equal store_out's. fp16 stays scalar (c10's software conversion).
__attribute__((target("avx2"))) void store_tile_row(void* dst, at::ScalarType dtype, const float* t,
                                                   const float* bias, int64_t n) {
    int64_t j = 0;
    if (dtype == at::kFloat) {
        float* y = static_cast<float*>(dst);
        for (; j + 8 <= n; j += 8) {
            __m256 v = _mm256_loadu_ps(t + j);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
            _mm256_storeu_ps(y + j, v);
        }
        for (; j < n; ++j) y[j] = bias ? t[j] + bias[j] : t[j];
    } else if (dtype == at::kBFloat16) {
        uint16_t* y = static_cast<uint16_t*>(dst);
        for (; j + 8 <= n; j += 8) {
            __m256 v = _mm256_loadu_ps(t + j);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + j));
            const __m256i h = bf16_round::bits8(v);
            _mm_storeu_si128(reinterpret_cast<__m128i*>(y + j),
                             _mm_packus_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
        }
        c10::BFloat16* yb = static_cast<c10::BFloat16*>(dst);
        for (; j < n; ++j) yb[j] = static_cast<c10::BFloat16>(bias ? t[j] + bias[j] : t[j]);
    } else {
        c10::Half* y = static_cast<c10::Half*>(dst);
        for (; j < n; ++j) y[j] = static_cast<c10::Half>(bias ? t[j] + bias[j] : t[j]);
    }
}


using gguf_kernels::QuantX;
using gguf_kernels::Weights;
using GroupFn = void (*)(const Weights&, const QuantX&, int64_t, float*);

template <int KIND, int M>
GroupFn pick_group_fn(int64_t isa, bool two) {
    if (two) return isa == ISA_AVX512 ? &gguf_kernels::group_avx512<KIND, M> : &gguf_kernels::group_avx2<KIND, M>;
    return isa == ISA_AVX512 ? &gguf_kernels::group_avx512<KIND, M, false> : &gguf_kernels::group_avx2<KIND, M, false>;
}

template <int KIND>
GroupFn group_fn_for_rows(int64_t rows, int64_t isa, bool two) {
    switch (rows) {
        case 1: return pick_group_fn<KIND, 1>(isa, two);
        case 2: return pick_group_fn<KIND, 2>(isa, two);
        case 3: return pick_group_fn<KIND, 3>(isa, two);
        case 4: return pick_group_fn<KIND, 4>(isa, two);
        case 5: return pick_group_fn<KIND, 5>(isa, two);
        case 6: return pick_group_fn<KIND, 6>(isa, two);
        case 7: return pick_group_fn<KIND, 7>(isa, two);
        default: return pick_group_fn<KIND, 8>(isa, two);
    }
}

// Two groups (32 output rows) against up to kPairRows activation rows, AVX-512 only (group_avx512's G = 2)
constexpr int64_t kPairRows = 4;

template <int KIND, int M>
GroupFn pick_pair_fn(bool two) {
    return two ? &gguf_kernels::group_avx512<KIND, M, true, 2> : &gguf_kernels::group_avx512<KIND, M, false, 2>;
}

template <int KIND>
GroupFn pair_fn_for_rows(int64_t rows, bool two) {
    switch (rows) {
        case 1: return pick_pair_fn<KIND, 1>(two);
        case 2: return pick_pair_fn<KIND, 2>(two);
        case 3: return pick_pair_fn<KIND, 3>(two);
        default: return pick_pair_fn<KIND, 4>(two);
    }
}

GroupFn group_fn(int64_t kind, int64_t rows, int64_t isa, bool two) {
    switch (kind) {
        case Q4_0: return group_fn_for_rows<Q4_0>(rows, isa, two);
        case Q4_1: return group_fn_for_rows<Q4_1>(rows, isa, two);
        case Q8_0: return group_fn_for_rows<Q8_0>(rows, isa, two);
        case Q4_K: return group_fn_for_rows<Q4_K>(rows, isa, two);
        case Q5_0: return group_fn_for_rows<Q5_0>(rows, isa, two);
        case Q5_1: return group_fn_for_rows<Q5_1>(rows, isa, two);
        case Q5_K: return group_fn_for_rows<Q5_K>(rows, isa, two);
        case Q6_K: return group_fn_for_rows<Q6_K>(rows, isa, two);
        case Q2_K: return group_fn_for_rows<Q2_K>(rows, isa, two);
        case Q3_K: return group_fn_for_rows<Q3_K>(rows, isa, two);
        case IQ4_NL: return group_fn_for_rows<IQ4_NL>(rows, isa, two);
        case IQ4_XS: return group_fn_for_rows<IQ4_XS>(rows, isa, two);
        case IQ2_XXS: return group_fn_for_rows<IQ2_XXS>(rows, isa, two);
        case IQ2_XS: return group_fn_for_rows<IQ2_XS>(rows, isa, two);
        case IQ2_S: return group_fn_for_rows<IQ2_S>(rows, isa, two);
        case IQ3_XXS: return group_fn_for_rows<IQ3_XXS>(rows, isa, two);
        case IQ3_S: return group_fn_for_rows<IQ3_S>(rows, isa, two);
        case IQ1_S: return group_fn_for_rows<IQ1_S>(rows, isa, two);
        default: return group_fn_for_rows<IQ1_M>(rows, isa, two);
    }
}

GroupFn pair_fn(int64_t kind, int64_t rows, bool two) {
    switch (kind) {
        case Q4_0: return pair_fn_for_rows<Q4_0>(rows, two);
        case Q4_1: return pair_fn_for_rows<Q4_1>(rows, two);
        case Q8_0: return pair_fn_for_rows<Q8_0>(rows, two);
        case Q4_K: return pair_fn_for_rows<Q4_K>(rows, two);
        case Q5_0: return pair_fn_for_rows<Q5_0>(rows, two);
        case Q5_1: return pair_fn_for_rows<Q5_1>(rows, two);
        case Q5_K: return pair_fn_for_rows<Q5_K>(rows, two);
        case Q6_K: return pair_fn_for_rows<Q6_K>(rows, two);
        case Q2_K: return pair_fn_for_rows<Q2_K>(rows, two);
        case Q3_K: return pair_fn_for_rows<Q3_K>(rows, two);
        case IQ4_NL: return pair_fn_for_rows<IQ4_NL>(rows, two);
        case IQ4_XS: return pair_fn_for_rows<IQ4_XS>(rows, two);
        case IQ2_XXS: return pair_fn_for_rows<IQ2_XXS>(rows, two);
        case IQ2_XS: return pair_fn_for_rows<IQ2_XS>(rows, two);
        case IQ2_S: return pair_fn_for_rows<IQ2_S>(rows, two);
        case IQ3_XXS: return pair_fn_for_rows<IQ3_XXS>(rows, two);
        case IQ3_S: return pair_fn_for_rows<IQ3_S>(rows, two);
        case IQ1_S: return pair_fn_for_rows<IQ1_S>(rows, two);
        default: return pair_fn_for_rows<IQ1_M>(rows, two);
    }
}

// rows [m0, m1) of x (float32, bfloat16 or float16) quantised for the GGUF kernels (gguf_gemv_kernels.h), read in
// their own dtype by the vector quantiser of the active ISA (both bit-identical to gguf_kernels::quantize_row)
void quantize_x(const at::Tensor& x, int64_t isa, int64_t m0, int64_t m1, int8_t* q, float* sx, int32_t* nsum,
                int32_t* hsum, float* xs, bool two) {
    using namespace gguf_kernels;
    using QuantFn = void (*)(const void*, int64_t, int8_t*, float*, int32_t*, int32_t*, float*, int64_t, bool);
    const int in = x.scalar_type() == at::kFloat ? IN_F32 : x.scalar_type() == at::kBFloat16 ? IN_BF16 : IN_F16;
    static constexpr QuantFn avx512[3] = {&quantize_row_avx512<IN_F32>, &quantize_row_avx512<IN_BF16>,
                                          &quantize_row_avx512<IN_F16>};
    static constexpr QuantFn avx2[3] = {&quantize_row_avx2<IN_F32>, &quantize_row_avx2<IN_BF16>,
                                        &quantize_row_avx2<IN_F16>};
    const QuantFn fn = isa == ISA_AVX512 ? avx512[in] : avx2[in];
    const int64_t K = x.size(1), nb = K / kBlock;
    const char* base = static_cast<const char*>(x.data_ptr());
    for (int64_t m = m0; m < m1; ++m) {
        // row m's place in its chunk of kMaxRows rows (QuantX: block-major, the chunk's rows side by side)
        const int64_t i = (m / kMaxRows) * nb * kMaxRows + m % kMaxRows;
        fn(base + m * K * x.element_size(), K, q + i * 64, sx + i, nsum + i, hsum + i, xs + i, kMaxRows, two);
    }
}


// The packed weight for `kind`, checked against n x K (gguf_pack.py makes it).
Weights check_weights(const char* op, int64_t kind, int64_t n, int64_t K, const at::Tensor& qweight,
                      const std::optional<at::Tensor>& super_scales) {
    static const char* const names[kKinds] = {"Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q2_K",
                                              "Q3_K", "IQ4_NL", "IQ4_XS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                                              "IQ3_S", "IQ1_S", "IQ1_M"};
    TORCH_CHECK(kind >= 0 && kind < kKinds, op, ": kind ", kind, " is not one of 0..", kKinds - 1, " (Q4_0, Q4_1, "
                "Q8_0, Q4_K, Q5_0, Q5_1, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_NL, IQ4_XS, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, "
                "IQ3_S, IQ1_S, IQ1_M)");
    const int sf = gguf_kernels::super_fields(static_cast<int>(kind));
    const int64_t blk = sf ? 256 : kBlock;
    TORCH_CHECK(K % blk == 0, op, ": ", K, " columns, expected a multiple of ", blk, " (", names[kind], ")");
    const int64_t nb = K / kBlock, groups = (n + kGroup - 1) / kGroup;
    const int64_t rec = gguf_kernels::record_bytes(static_cast<int>(kind));
    TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.is_contiguous() && qweight.numel() == groups * nb * rec,
                op, ": qweight must be contiguous uint8 with ", groups * nb * rec, " bytes for ", n, " rows x ", K,
                " columns of ", names[kind], ", got ", qweight.numel());
    Weights wt{qweight.data_ptr<uint8_t>(), nullptr};
    if (sf) {
        const int64_t want = groups * nb / 8 * sf * kGroup;
        TORCH_CHECK(super_scales.has_value() && super_scales->scalar_type() == at::kHalf &&
                    super_scales->is_contiguous() && super_scales->numel() == want, op, ": ", names[kind],
                    " needs float16 super-block scales (", sf == 2 ? "d, dmin" : "d", ") with ", want, " values");
        wt.super = reinterpret_cast<const uint16_t*>(super_scales->data_ptr<c10::Half>());
    }
    return wt;
}

at::Tensor gguf_gemv(const at::Tensor& x, const at::Tensor& qweight, int64_t kind, int64_t n,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& super_scales,
                     int64_t act_stages) {
    check_isa("gguf_gemv");
    TORCH_CHECK(act_stages == 1 || act_stages == 2, "gguf_gemv: act_stages must be 1 (int8 activations, llama.cpp's) "
                "or 2 (int8 plus its rounding residual), got ", act_stages);
    const bool two = act_stages == 2;
    TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "gguf_gemv: x must be a 2-D CPU tensor, got ", x.sizes());
    const int64_t rows = x.size(0), K = x.size(1);
    TORCH_CHECK(K % kBlock == 0, "gguf_gemv: x has ", K, " columns, expected a multiple of ", kBlock);
    const Weights wt = check_weights("gguf_gemv", kind, n, K, qweight, super_scales);
    const int64_t nb = K / kBlock, groups = (n + kGroup - 1) / kGroup;
    if (bias.has_value())
        TORCH_CHECK(bias->numel() == n && bias->is_contiguous(), "gguf_gemv: bias must hold ", n, " values");

    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                "gguf_gemv: x must be float32, bfloat16 or float16, got ", x.scalar_type());
    const at::Tensor xc = x.contiguous();
    at::Tensor out = at::empty({rows, n}, x.options());
    if (rows == 0 || n == 0) return out;
    // the quantised activations in per-thread scratch (two tensor allocations a call cost ~1 us at batch 1)
    static thread_local std::vector<int8_t> q_scratch;
    static thread_local std::vector<float> s_scratch;
    const int64_t chunks = (rows + kMaxRows - 1) / kMaxRows, slots = chunks * kMaxRows;  // rows padded per chunk
    q_scratch.resize(std::max<size_t>(q_scratch.size(), slots * nb * 64));
    s_scratch.resize(std::max<size_t>(s_scratch.size(), 4 * slots * nb));
    int8_t* qp = q_scratch.data();
    float* sxp = s_scratch.data();
    int32_t* nsp = reinterpret_cast<int32_t*>(sxp + slots * nb);
    int32_t* hsp = reinterpret_cast<int32_t*>(sxp + 2 * slots * nb);
    float* xsp = sxp + 3 * slots * nb;
    const int64_t isa = active_isa();
    at::parallel_for(0, rows, 16, [&](int64_t m0, int64_t m1) {
        quantize_x(xc, isa, m0, m1, qp, sxp, nsp, hsp, xsp, two);
    });
    const at::Tensor bias_f = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();
    const float* bptr = bias.has_value() ? bias_f.data_ptr<float>() : nullptr;

    // groups outer, row chunks inner: a group's weights (K/2 or K bytes x 16 rows) stay in cache while every chunk
    // of 8 activation rows uses them, so a prefill reads the weights once
    const at::ScalarType out_type = out.scalar_type();
    char* out_base = static_cast<char*>(out.data_ptr());
    const int64_t out_elem = out.element_size();
    // Calls of more than one chunk (prefill) run two groups at a time in sub-chunks of kPairRows rows on AVX-512
    // (each activation broadcast feeds both groups; 512 rows of SmolLM2's layer shapes: 4-8% faster). Not for one
    // chunk (batched decode): there the weights stream from memory once, and a second pass over each pair from
    // cache left the stream idle (8 rows: 4.3 -> 5.4 ms over the step's weights). A row's result is the same.
    const bool pairs = isa == ISA_AVX512 && rows > kMaxRows;
    at::parallel_for(0, groups, 4, [&](int64_t g0, int64_t g1) {
        alignas(64) float tile[kMaxRows * kGroup * 2];
        for (int64_t g = g0; g < g1;) {
            const int64_t ng = pairs && g + 1 < g1 ? 2 : 1;
            const int64_t c0 = g * kGroup, nc = std::min<int64_t>(ng * kGroup, n - c0);
            for (int64_t ch = 0; ch < chunks; ++ch) {
                const int64_t r0 = ch * kMaxRows, mr = std::min<int64_t>(kMaxRows, rows - r0);
                const int64_t step = ng == 2 ? kPairRows : mr;
                for (int64_t s0 = 0; s0 < mr; s0 += step) {
                    const int64_t sr = std::min<int64_t>(step, mr - s0);
                    const int64_t i = ch * nb * kMaxRows + s0;  // row s0 of the chunk (rows side by side per block)
                    const QuantX xq{qp + i * 64, sxp + i, nsp + i, hsp + i, xsp + i, K};
                    (ng == 2 ? pair_fn(kind, sr, two) : group_fn(kind, sr, isa, two))(wt, xq, g, tile);
                    for (int64_t m = 0; m < sr; ++m)
                        store_tile_row(out_base + ((r0 + s0 + m) * n + c0) * out_elem, out_type,
                                       tile + m * ng * kGroup, bptr ? bptr + c0 : nullptr, nc);
                }
            }
            g += ng;
        }
    });
    return out;
}

// Dense (n, K) weights from the interleaved layout, for calls with more rows than the GEMV serves (prefill): a
// transient copy the caller feeds to oneDNN and drops.
at::Tensor gguf_dequant(const at::Tensor& qweight, int64_t kind, int64_t n, int64_t K, at::ScalarType dtype,
                        const std::optional<at::Tensor>& super_scales) {
    using namespace gguf_kernels;
    const Weights wt = check_weights("gguf_dequant", kind, n, K, qweight, super_scales);
    const int kd = static_cast<int>(kind);
    const int64_t nb = K / kBlock;
    const int64_t cbytes = code_bytes(kd), rec = record_bytes(kd), sf = super_fields(kd), hb = high_bits(kd);
    at::Tensor out = at::empty({n, K}, qweight.options().dtype(dtype));
    auto half = [](const uint16_t* p, int64_t i) { return static_cast<float>(c10::Half(p[i], c10::Half::from_bits())); };
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
        std::vector<float> row(K);
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t g = r / kGroup, rr = r % kGroup;
            for (int64_t b = 0; b < nb; ++b) {
                const uint8_t* wb = wt.rec + (g * nb + b) * rec;
                const uint16_t* dp = reinterpret_cast<const uint16_t*>(wb + cbytes);
                float* rb = row.data() + b * kBlock;
                // the 32 codes of this row, high bits included
                int q[kBlock];
                if (kd == Q8_0)
                    for (int ch = 0; ch < 8; ++ch)
                        for (int i = 0; i < 4; ++i) q[4 * ch + i] = wb[ch * 64 + rr * 4 + i];
                const int64_t hp = crumbs(kd) ? 128 : 256;  // the high-bit planes
                for (int ch = 0; ch < 4 && kd != Q8_0; ++ch)
                    for (int i = 0; i < 4; ++i) {
                        int lo, hi;
                        if (crumbs(kd)) {
                            lo = (wb[rr * 4 + i] >> (2 * ch)) & 3;
                            hi = (wb[64 + rr * 4 + i] >> (2 * ch)) & 3;
                        } else {
                            lo = wb[ch * 64 + rr * 4 + i] & 15;
                            hi = wb[ch * 64 + rr * 4 + i] >> 4;
                        }
                        if (hb == 1) {  // the top bit: above the nibble, or above the crumb (Q3_K)
                            const uint8_t h = wb[hp + rr * 4 + i];
                            const int at = crumbs(kd) ? 2 : 4;
                            lo |= ((h >> ch) & 1) << at;
                            hi |= ((h >> (4 + ch)) & 1) << at;
                        } else if (hb == 2) {
                            lo |= ((wb[256 + rr * 4 + i] >> (2 * ch)) & 3) << 4;
                            hi |= ((wb[320 + rr * 4 + i] >> (2 * ch)) & 3) << 4;
                        }
                        q[4 * ch + i] = lo;
                        q[16 + 4 * ch + i] = hi;
                    }
                BlockFields f;
                const int64_t sp = (g * (nb / 8) + b / 8) * sf * kGroup + rr;
                if (sf) {
                    f.b0 = wb[cbytes + rr];
                    f.b1 = wb[cbytes + kGroup + rr];
                    f.sd = half(wt.super, sp);
                    if (sf == 2) f.sdmin = half(wt.super, sp + kGroup);
                } else {
                    f.d = half(dp, rr);
                    if (has_m(kd)) f.m = half(dp, kGroup + rr);
                }
                block_values(kd, q, f, rb);
            }
            if (dtype == at::kFloat) store_out(out.data_ptr<float>() + r * K, row.data(), K);
            else if (dtype == at::kBFloat16) store_out(out.data_ptr<c10::BFloat16>() + r * K, row.data(), K);
            else store_out(out.data_ptr<c10::Half>() + r * K, row.data(), K);
        }
    });
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

namespace exl2_ops {
at::Tensor gguf_gemv(const at::Tensor& x, const at::Tensor& qweight, int64_t kind, int64_t n,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& super_scales,
                     int64_t act_stages) {
    return ::gguf_gemv(x, qweight, kind, n, bias, super_scales, act_stages);
}
}  // namespace exl2_ops

TORCH_LIBRARY(exllamav2_cpu, m) {
    m.def("gguf_gemv(Tensor x, Tensor qweight, int kind, int n, Tensor? bias, Tensor? super_scales=None, "
          "int act_stages=2) -> Tensor");
    m.def("gguf_dequant(Tensor qweight, int kind, int n, int k, ScalarType dtype, Tensor? super_scales=None) "
          "-> Tensor");
    m.def("isa() -> int", &isa_op);
    m.def("set_isa(int level) -> int", &set_isa_op);
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("gguf_gemv", &gguf_gemv);
    m.impl("gguf_dequant", &gguf_dequant);
}
