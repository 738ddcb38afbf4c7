// The CPU kernels' instruction set, chosen at run time (AVX-512 VNNI/BF16, else AVX2), shared by the ops that pick
// a path by it (gemv.cpp, bf16_gemv.cpp); `exllamav2_cpu::set_isa` (gemv.cpp) can force a lower one for tests.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>

namespace cpu_isa {

enum Isa : int64_t { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

inline int64_t detect_isa() {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
        __builtin_cpu_supports("avx512bf16"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
        return ISA_AVX2;
    return ISA_NONE;
}

inline std::atomic<int64_t> g_isa{-1};

inline int64_t active_isa() {
    int64_t v = g_isa.load();
    if (v < 0) {
        v = detect_isa();
        g_isa.store(v);
    }
    return v;
}

inline void check_isa(const char* op) {
    TORCH_CHECK(active_isa() != ISA_NONE, "exllamav2_cpu::", op, ": this CPU has neither AVX-512 (VNNI, BF16) nor "
                "AVX2; the Python side should have kept torch's kernels");
}

}  // namespace cpu_isa
