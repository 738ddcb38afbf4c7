// The vector activation quantisers of exllamav2/ops/cpu/csrc/gguf_gemv_kernels.h (AVX-512, AVX2; fp32, bf16 and
// fp16 inputs) against the scalar contract quantize_row, bit for bit: random rows over 12 decades of scale, integer
// rows (exact .5 ties), zero blocks, and the chunk stride. Built and run by tests/test_cpu_kernels.py; prints
// "ok <rows checked>" or the first mismatch and exits 1.
#include "../../exllamav2/ops/cpu/csrc/gguf_gemv_kernels.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace gguf_kernels;

static uint16_t to_bf16(float f) {  // truncation: any bf16 value will do
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return static_cast<uint16_t>(u >> 16);
}
static float from_bf16(uint16_t h) {
    const uint32_t u = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

struct Out {
    std::vector<int8_t> q;
    std::vector<float> sx, xs;
    std::vector<int32_t> nsum, hsum;
    Out(int64_t nb, int64_t stride)
        : q(nb * stride * 64), sx(nb * stride), xs(nb * stride), nsum(nb * stride), hsum(nb * stride) {}
    bool operator==(const Out& o) const {
        return q == o.q && std::memcmp(sx.data(), o.sx.data(), sx.size() * 4) == 0 && nsum == o.nsum &&
               hsum == o.hsum &&
               std::memcmp(xs.data(), o.xs.data(), xs.size() * 4) == 0;
    }
};

template <int IN>
static bool check_stages(const void* src, const float* xf, int64_t K, int64_t stride, bool avx512, bool two) {
    const int64_t nb = K / kBlock;
    Out ref(nb, stride), a(nb, stride), b(nb, stride);
    quantize_row(xf, K, ref.q.data(), ref.sx.data(), ref.nsum.data(), ref.hsum.data(), ref.xs.data(), stride, two);
    if (!two)  // one stage: no residual codes, and the sum is 256 * sum(q1) (what the kernels' offsets assume)
        for (int64_t blk = 0; blk < nb; ++blk) {
            const int8_t* qb = ref.q.data() + blk * stride * 64;
            int n1 = 0, h1 = 0;
            for (int j = 0; j < 32; ++j) {
                n1 += qb[j];
                if (j < 16) h1 += qb[j];
                if (qb[32 + j] != 0) return false;
            }
            if (ref.nsum[blk * stride] != 256 * n1 || ref.hsum[blk * stride] != 256 * h1) return false;
        }
    quantize_row_avx2<IN>(src, K, a.q.data(), a.sx.data(), a.nsum.data(), a.hsum.data(), a.xs.data(), stride, two);
    if (!(a == ref)) return false;
    if (!avx512) return true;
    quantize_row_avx512<IN>(src, K, b.q.data(), b.sx.data(), b.nsum.data(), b.hsum.data(), b.xs.data(), stride, two);
    return b == ref;
}

template <int IN>
static bool check(const void* src, const float* xf, int64_t K, int64_t stride, bool avx512) {
    return check_stages<IN>(src, xf, K, stride, avx512, true) && check_stages<IN>(src, xf, K, stride, avx512, false);
}

int main() {
    __builtin_cpu_init();
    const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                        __builtin_cpu_supports("avx512vl");
    std::mt19937 g(1);
    std::normal_distribution<float> normal(0.f, 1.f);
    std::uniform_int_distribution<int> ints(-300, 300);
    const int64_t K = 1024;
    long checked = 0;
    for (int it = 0; it < 600; ++it) {
        const float scale = std::pow(10.f, static_cast<float>(it % 12 - 6));
        std::vector<float> x(K), xb(K), xh(K);
        std::vector<uint16_t> bb(K), hb(K);
        for (int64_t k = 0; k < K; ++k) {
            float v = it % 3 == 0 ? static_cast<float>(ints(g)) * scale : normal(g) * scale;
            if ((it % 7 == 0 && k % 32 < 5) || (it % 11 == 0 && (k / 32) % 3 == 0)) v = 0.f;
            x[k] = v;
            bb[k] = to_bf16(v);
            xb[k] = from_bf16(bb[k]);
            hb[k] = _cvtss_sh(v, 0);
            xh[k] = _cvtsh_ss(hb[k]);
        }
        bool fp16_finite = true;
        for (float v : xh) fp16_finite = fp16_finite && std::isfinite(v);
        const int64_t stride = 1 + it % 8;
        const bool ok = check<IN_F32>(x.data(), x.data(), K, stride, avx512) &&
                        check<IN_BF16>(bb.data(), xb.data(), K, stride, avx512) &&
                        (!fp16_finite || check<IN_F16>(hb.data(), xh.data(), K, stride, avx512));
        if (!ok) {
            std::printf("mismatch in row %d (scale %g, stride %ld)\n", it, scale, static_cast<long>(stride));
            return 1;
        }
        checked += 2 + fp16_finite;
    }
    std::printf("ok %ld\n", checked);
    return 0;
}
