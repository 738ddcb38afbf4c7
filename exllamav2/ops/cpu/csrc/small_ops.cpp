// RMSNorm in one pass for eager decode on the CPU, where torch's composite (casts, pow, mean, rsqrt, two muls)
// costs more in dispatch than in arithmetic (F.rms_norm on bf16 [1, 576]: 10-17 us).
// It reproduces the reference's roundings (exllamav2/ops/torch_ref/norm.py): statistics and products in fp32,
// rounded to the output dtype where the reference rounds. Only the order of the fp32 sum of squares differs, so an
// output may differ from the reference by one unit in the last place of its dtype. Rows are split over threads;
// each row is reduced by one thread in one fixed order, whatever the number of rows (batch invariant).
// Python side: exllamav2/ops/cpu/small_ops.py.

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

namespace {

template <typename T>
inline float to_f(T v) { return static_cast<float>(v); }

// y = x * rsqrt(mean(x^2) + eps), then scaled by w: in fp32 and cast once when w or the output is fp32; else cast
// to the output dtype first and multiplied in it (HF Llama's order, what the reference does)
template <typename TX, typename TW, typename TO>
void rms_norm_rows(const TX* x, const TW* w, TO* y, int64_t rows, int64_t n, float eps, bool fp32_scale) {
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
void rope_rows(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& y, bool interleaved) {
    const int64_t B = x.size(0), S = x.size(1), H = x.size(2), D = x.size(3), rd = cos.size(3);
    const T* xp = x.data_ptr<T>();
    const T* cp = cos.data_ptr<T>();
    const T* sp = sin.data_ptr<T>();
    T* yp = y.data_ptr<T>();
    const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), sb = sin.size(0) == 1 ? 0 : sin.stride(0);
    const int64_t half = rd / 2;
    auto rnd = [](float v) { return static_cast<float>(static_cast<T>(v)); };
    at::parallel_for(0, B * S, 64, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / S, s = r % S;
            const T* c = cp + b * cb + s * cos.stride(1);
            const T* n = sp + b * sb + s * sin.stride(1);
            for (int64_t h = 0; h < H; ++h) {
                const T* xi = xp + b * x.stride(0) + s * x.stride(1) + h * x.stride(2);
                T* yo = yp + ((b * S + s) * H + h) * D;
                for (int64_t j = 0; j < rd; ++j) {
                    float rot;
                    if (interleaved)
                        rot = (j & 1) ? static_cast<float>(xi[j - 1]) : -static_cast<float>(xi[j + 1]);
                    else
                        rot = j < half ? -static_cast<float>(xi[j + half]) : static_cast<float>(xi[j - half]);
                    const float a = rnd(static_cast<float>(xi[j]) * static_cast<float>(c[j]));
                    const float bb = rnd(rot * static_cast<float>(n[j]));
                    yo[j] = static_cast<T>(a + bb);
                }
                for (int64_t j = rd; j < D; ++j) yo[j] = xi[j];
            }
        }
    });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
    TORCH_CHECK(x.dim() == 4 && x.stride(3) == 1, "exllamav2_cpu::rope: x must be (batch, seq, heads, head_dim) "
                "with contiguous channels, got ", x.sizes(), " strides ", x.strides());
    TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type() && float_type(x.scalar_type()),
                "exllamav2_cpu::rope: x, cos and sin must share a float dtype");
    TORCH_CHECK(cos.dim() == 4 && cos.sizes() == sin.sizes() && cos.size(1) == x.size(1) && cos.size(2) == 1 &&
                (cos.size(0) == 1 || cos.size(0) == x.size(0)) && cos.size(3) <= x.size(3) && cos.size(3) % 2 == 0 &&
                cos.stride(3) == 1 && sin.stride(3) == 1 && cos.stride(1) == sin.stride(1),
                "exllamav2_cpu::rope: cos and sin must be (", x.size(0), " or 1, ", x.size(1), ", 1, even rot_dim <= ",
                x.size(3), ") with contiguous channels, got ", cos.sizes(), " and ", sin.sizes());
    at::Tensor y = at::empty(x.sizes(), x.options());
    if (y.numel() == 0) return y;
    switch (x.scalar_type()) {
        case at::kFloat: rope_rows<float>(x, cos, sin, y, interleaved); break;
        case at::kBFloat16: rope_rows<c10::BFloat16>(x, cos, sin, y, interleaved); break;
        default: rope_rows<c10::Half>(x, cos, sin, y, interleaved); break;
    }
    return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("rms_norm(Tensor x, Tensor weight, float eps, ScalarType out_dtype) -> Tensor");
    m.def("rope(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("rms_norm", &rms_norm);
    m.impl("rope", &rope);
}
