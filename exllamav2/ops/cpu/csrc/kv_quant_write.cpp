// New K/V rows quantised into a quantized paged cache's slots in one call (QuantPages.write on the CPU): the
// reference (exllamav2/ops/torch_ref/kv_quant.py: GroupQuant.quantize, FP8Quant.quantize) runs a dozen small torch
// ops per tensor, ~3.5 ms of a SmolLM2 decode step. The same arithmetic, bit for bit
// (tests/test_cpu_quant_attention.py): the Hadamard butterflies in fp32 in the reference's order, the scale
// max(amax, 0) / qpos vs min(amin, 0) / -qneg clamped to the scale dtype's max and rounded to it as c10 rounds, codes
// round-half-even(x / scale) clamped and offset, two 4-bit codes a byte (low nibble first); FP8 e5m2 by c10's
// conversion after clamping to +-57344. Each token and head alone. Python side: exllamav2/ops/cpu/attention.py.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e5m2.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "kv_formats.h"

namespace {

using namespace kv_formats;

// x rounded to the scale dtype, as `.to(scale_dtype)` does, and stored; returns the stored value as fp32
inline float store_scale(void* p, at::ScalarType t, int64_t i, float x) {
    if (t == at::kFloat) {
        static_cast<float*>(p)[i] = x;
        return x;
    }
    if (t == at::kBFloat16) {
        const c10::BFloat16 v(x);
        static_cast<c10::BFloat16*>(p)[i] = v;
        return static_cast<float>(v);
    }
    const c10::Half v(x);
    static_cast<c10::Half*>(p)[i] = v;
    return static_cast<float>(v);
}

inline float dtype_max(at::ScalarType t) {
    return t == at::kFloat ? std::numeric_limits<float>::max()
         : t == at::kBFloat16 ? static_cast<float>(std::numeric_limits<c10::BFloat16>::max())
                              : static_cast<float>(std::numeric_limits<c10::Half>::max());
}

// one row of d values (x, any float dtype) into its codes (and scales) at the given pointers
void quantize_row(const void* x, at::ScalarType xt, int64_t xoff, int64_t d, int64_t fmt, uint8_t* codes,
                  void* scales, at::ScalarType st, int64_t soff) {
    if (fmt == FMT_FP8) {
        for (int64_t i = 0; i < d; ++i) {
            // clamp (exact for these bounds in any of the input dtypes; NaN stays NaN), then c10's e5m2 conversion
            const float f = load_float(x, xt, xoff + i);
            codes[i] = c10::Float8_e5m2(std::isnan(f) ? f : std::min(57344.f, std::max(-57344.f, f))).x;
        }
        return;
    }
    const int qneg = fmt == FMT_Q4 ? 8 : 128, qpos = qneg - 1;
    const float fmax = dtype_max(st);
    for (int64_t g = 0; g < d / kGroup; ++g) {
        float r[kGroup];
        for (int i = 0; i < kGroup; ++i) r[i] = load_float(x, xt, xoff + g * kGroup + i);
        hadamard32(r);
        float amax = r[0], amin = r[0];
        for (int i = 1; i < kGroup; ++i) amax = std::max(amax, r[i]), amin = std::min(amin, r[i]);
        const float hi = std::max(amax, 0.f) / static_cast<float>(qpos);
        const float lo = std::min(amin, 0.f) / static_cast<float>(-qneg);
        const float s = store_scale(scales, st, soff + g, std::min(std::max(hi, lo), fmax));
        const float div = s > 0.f ? s : 1.f;
        int q[kGroup];
        for (int i = 0; i < kGroup; ++i) {
            const float v = std::nearbyint(r[i] / div);  // round half to even, as torch.round
            q[i] = static_cast<int>(std::min(static_cast<float>(qpos), std::max(static_cast<float>(-qneg), v)));
            q[i] += qneg;
        }
        if (fmt == FMT_Q4) {
            for (int i = 0; i < kGroup / 2; ++i)
                codes[g * 16 + i] = static_cast<uint8_t>(q[2 * i] | (q[2 * i + 1] << 4));
        } else {
            for (int i = 0; i < kGroup; ++i) codes[g * kGroup + i] = static_cast<uint8_t>(q[i]);
        }
    }
}

void write_part(const char* op, const char* name, const at::Tensor& x, at::Tensor& codes,
                const std::optional<at::Tensor>& scales, int64_t fmt, const int64_t* slots, int64_t T) {
    const int64_t H = x.size(1), d = x.size(2), width = fmt == FMT_Q4 ? d / 2 : d;
    TORCH_CHECK(codes.dim() == 3 && codes.scalar_type() == at::kByte && codes.size(1) == H &&
                codes.size(2) == width && codes.stride(2) == 1, op, ": ", name, " codes must be uint8 (slots, ", H,
                ", ", width, "), got ", codes.sizes(), " ", codes.scalar_type());
    if (fmt != FMT_FP8)
        TORCH_CHECK(scales.has_value() && scales->dim() == 3 && scales->size(0) == codes.size(0) &&
                    scales->size(1) == H && scales->size(2) == d / kGroup && scales->stride(2) == 1 &&
                    (scales->scalar_type() == at::kFloat || scales->scalar_type() == at::kBFloat16 ||
                     scales->scalar_type() == at::kHalf),
                    op, ": ", name, " scales must be float (slots, ", H, ", ", d / kGroup, ")");
    for (int64_t t = 0; t < T; ++t)
        TORCH_CHECK(slots[t] >= 0 && slots[t] < codes.size(0), op, ": slots[", t, "] = ", slots[t],
                    " is outside the cache's ", codes.size(0), " slots");
    uint8_t* cp = codes.data_ptr<uint8_t>();
    void* sp = fmt != FMT_FP8 ? scales->data_ptr() : nullptr;
    const at::ScalarType st = fmt != FMT_FP8 ? scales->scalar_type() : at::kFloat;
    at::parallel_for(0, T * H, 64, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t t = i / H, h = i % H, slot = slots[t];
            quantize_row(x.data_ptr(), x.scalar_type(), t * x.stride(0) + h * x.stride(1), d, fmt,
                         cp + slot * codes.stride(0) + h * codes.stride(1), sp, st,
                         fmt != FMT_FP8 ? slot * scales->stride(0) + h * scales->stride(1) : 0);
        }
    });
}

void quant_kv_write(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_codes,
                    const std::optional<at::Tensor>& k_scales, at::Tensor& v_codes,
                    const std::optional<at::Tensor>& v_scales, int64_t k_fmt, int64_t v_fmt, const at::Tensor& slots) {
    const char* op = "exllamav2_cpu::quant_kv_write";
    TORCH_CHECK(k_fmt >= 0 && k_fmt <= 2 && v_fmt >= 0 && v_fmt <= 2, op, ": formats must be 0 (q4), 1 (q8) or 2 "
                "(fp8), got ", k_fmt, " and ", v_fmt);
    for (const at::Tensor* x : {&k, &v})
        TORCH_CHECK(x->dim() == 3 && x->stride(2) == 1 && x->size(2) % kGroup == 0 &&
                    (x->scalar_type() == at::kFloat || x->scalar_type() == at::kBFloat16 ||
                     x->scalar_type() == at::kHalf) && x->sizes() == k.sizes(), op,
                    ": k and v must be (tokens, kv_heads, head_dim) float with head_dim a multiple of 32 and "
                    "contiguous, got ", k.sizes(), " and ", v.sizes());
    TORCH_CHECK(slots.dim() == 1 && slots.size(0) == k.size(0) && slots.scalar_type() == at::kLong, op,
                ": slots must be int64 (", k.size(0), ",)");
    const at::Tensor sl = slots.contiguous();
    const int64_t* sp = sl.data_ptr<int64_t>();
    write_part(op, "k", k, k_codes, k_scales, k_fmt, sp, k.size(0));
    write_part(op, "v", v, v_codes, v_scales, v_fmt, sp, v.size(0));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("quant_kv_write(Tensor k, Tensor v, Tensor(a!) k_codes, Tensor(b!)? k_scales, Tensor(c!) v_codes, "
          "Tensor(d!)? v_scales, int k_fmt, int v_fmt, Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("quant_kv_write", &quant_kv_write);
}
