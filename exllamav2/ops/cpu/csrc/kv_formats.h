// The quantized KV cache formats' shared pieces for the CPU kernels (attention_quant.cpp, kv_quant_write.cpp); the
// formats themselves: exllamav2/ops/torch_ref/kv_quant.py.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace kv_formats {

enum Format : int64_t { FMT_Q4 = 0, FMT_Q8 = 1, FMT_FP8 = 2 };
constexpr int kGroup = 32;  // values per Hadamard group and scale

// the unnormalised Walsh-Hadamard transform of 32 values in place, kv_quant.hadamard_rotate's butterflies in its
// order ((a + b, a - b) over pairs h apart, h = 1, 2, 4, 8, 16), so the results are its bits
inline void hadamard32(float* x) {
    for (int h = 1; h < kGroup; h *= 2)
        for (int i = 0; i < kGroup; i += 2 * h)
            for (int j = i; j < i + h; ++j) {
                const float a = x[j], b = x[j + h];
                x[j] = a + b;
                x[j + h] = a - b;
            }
}

// element i of a float32 / bfloat16 / float16 array as fp32 (exact)
inline float load_float(const void* p, at::ScalarType t, int64_t i) {
    if (t == at::kFloat) return static_cast<const float*>(p)[i];
    if (t == at::kBFloat16) return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
    return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
}

}  // namespace kv_formats
