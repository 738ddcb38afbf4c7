// Attention for a few query rows per sequence (decode, speculative drafts) on x86 CPUs with AVX-512, where
// torch's flash-attention kernel costs ~80 us per layer at batch 1 in set-up alone (SmolLM2: 2.4 ms a token).
// Python side: exllamav2/ops/cpu/attention.py (which takes it only for <= MAX_QUERIES query rows and head_dim a
// multiple of 16; the reference otherwise). Semantics are the reference's (exllamav2/ops/torch_ref/attention.py):
// q (b, hq, s, d), k/v (b, hk, t, d) with hq a multiple of hk (query head h reads kv head h / (hq/hk)), an
// optional bool mask broadcast as (b or 1, 1, s, t) (true = attend), causal alignment bottom-right (query i sees
// keys <= t - s + i), optional tanh softcap. Scores, softmax and the weighted sum are fp32; the output is rounded
// once to q's dtype. One task per (batch row, kv head): it reads each key and value row once for all the query
// rows that share it. A task's arithmetic does not depend on the other tasks or the thread split.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr int kMaxD = 256;

template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) inline __m512 load16(const T* p) {
    if constexpr (std::is_same_v<T, float>) {
        return _mm512_loadu_ps(p);
    } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
        const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    } else {
        return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
}

struct View {  // strides in elements; the last dimension is contiguous
    int64_t sb, sh, ss;
};

// One (batch row, kv head): the G*S query rows (G query heads, S positions) against T keys.
template <typename T>
__attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) void attend_task(
        const T* q, View qv, const T* k, View kv, const T* v, View vv, const bool* mask, View mv, T* out, View ov,
        int64_t G, int64_t S, int64_t T_, int64_t D, float scale, float softcap, bool causal, float* scores) {
    const int64_t R = G * S, nv = D / 16;
    std::vector<float> qf(R * D);
    for (int64_t g = 0; g < G; ++g)
        for (int64_t s = 0; s < S; ++s)
            for (int64_t d = 0; d < D; ++d) qf[(g * S + s) * D + d] = static_cast<float>(q[g * qv.sh + s * qv.ss + d]);
    // scores (R, T): each key row is loaded once for every query row
    for (int64_t t = 0; t < T_; ++t) {
        const T* kt = k + t * kv.ss;
        __m512 kr[kMaxD / 16];
        for (int64_t j = 0; j < nv; ++j) kr[j] = load16(kt + 16 * j);
        for (int64_t r = 0; r < R; ++r) {
            __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(&qf[r * D]), kr[0]);
            for (int64_t j = 1; j < nv; ++j) acc = _mm512_fmadd_ps(_mm512_loadu_ps(&qf[r * D + 16 * j]), kr[j], acc);
            scores[r * T_ + t] = _mm512_reduce_add_ps(acc) * scale;
        }
    }
    const float ninf = -std::numeric_limits<float>::infinity();
    std::vector<float> inv(R);
    for (int64_t r = 0; r < R; ++r) {
        const int64_t s = r % S;
        float* sr = scores + r * T_;
        const int64_t last = causal ? T_ - S + s : T_ - 1;  // keys after `last` are masked by causality
        float mx = ninf;
        for (int64_t t = 0; t < T_; ++t) {
            float x = sr[t];
            if (softcap > 0.f) x = softcap * std::tanh(x / softcap);
            if (t > last || (mask && !mask[s * mv.ss + t])) x = ninf;
            sr[t] = x;
            mx = std::fmax(mx, x);
        }
        float sum = 0.f;
        for (int64_t t = 0; t < T_; ++t) {
            const float e = sr[t] == ninf ? 0.f : std::exp(sr[t] - mx);
            sr[t] = e;
            sum += e;
        }
        inv[r] = 1.f / sum;  // a fully masked row gives inf * 0 = NaN, as torch's SDPA does
    }
    // out = sum_t p_t v_t: each value row loaded once for every query row
    std::vector<float> acc(R * D, 0.f);
    for (int64_t t = 0; t < T_; ++t) {
        const T* vt = v + t * vv.ss;
        __m512 vr[kMaxD / 16];
        for (int64_t j = 0; j < nv; ++j) vr[j] = load16(vt + 16 * j);
        for (int64_t r = 0; r < R; ++r) {
            const __m512 p = _mm512_set1_ps(scores[r * T_ + t]);
            float* ar = &acc[r * D];
            for (int64_t j = 0; j < nv; ++j)
                _mm512_storeu_ps(ar + 16 * j, _mm512_fmadd_ps(p, vr[j], _mm512_loadu_ps(ar + 16 * j)));
        }
    }
    for (int64_t g = 0; g < G; ++g)
        for (int64_t s = 0; s < S; ++s) {
            const int64_t r = g * S + s;
            for (int64_t d = 0; d < D; ++d)
                out[g * ov.sh + s * ov.ss + d] = static_cast<T>(acc[r * D + d] * inv[r]);
        }
}

View view_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

template <typename T>
void run_tasks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& mask, View mv,
               at::Tensor& out, int64_t G, float scale, float softcap, bool causal) {
    const int64_t HK = k.size(1), S = q.size(2), T_ = k.size(2), D = q.size(3), tasks = q.size(0) * HK;
    const View qv = view_of(q), kv = view_of(k), vv = view_of(v), ov = view_of(out);
    const T *qp = q.data_ptr<T>(), *kp = k.data_ptr<T>(), *vp = v.data_ptr<T>();
    const bool* mp = mask.defined() ? mask.data_ptr<bool>() : nullptr;
    T* op = out.data_ptr<T>();
    // small problems run on the calling thread: a parallel region costs more than they do
    const int64_t grain = G * S * T_ * D * tasks < (1 << 17) ? tasks : 1;
    at::parallel_for(0, tasks, grain, [&](int64_t i0, int64_t i1) {
        std::vector<float> scores(G * S * T_);
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / HK, h = i % HK;
            attend_task<T>(qp + b * qv.sb + h * G * qv.sh, qv, kp + b * kv.sb + h * kv.sh, kv,
                           vp + b * vv.sb + h * vv.sh, vv, mp ? mp + b * mv.sb : nullptr, mv,
                           op + b * ov.sb + h * G * ov.sh, ov, G, S, T_, D, scale, softcap, causal, scores.data());
        }
    });
}

bool avx512_ok() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c");
}

at::Tensor decode_attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                            const std::optional<at::Tensor>& mask_, double scale, double softcap, bool is_causal) {
    TORCH_CHECK(avx512_ok(), "exllamav2_cpu::decode_attention needs AVX-512 (the Python side keeps the reference "
                "elsewhere)");
    TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, "decode_attention: q, k, v must be 4-D "
                "(batch, heads, seq, head_dim), got ", q_.sizes(), ", ", k_.sizes(), ", ", v_.sizes());
    TORCH_CHECK(q_.scalar_type() == k_.scalar_type() && q_.scalar_type() == v_.scalar_type(),
                "decode_attention: q, k, v must share a dtype");
    const int64_t B = q_.size(0), HQ = q_.size(1), S = q_.size(2), D = q_.size(3);
    const int64_t HK = k_.size(1), T_ = k_.size(2);
    TORCH_CHECK(k_.size(0) == B && v_.size(0) == B && v_.size(1) == HK && v_.size(2) == T_ && k_.size(3) == D &&
                v_.size(3) == D, "decode_attention: k and v must be (", B, ", hk, t, ", D, "), got ", k_.sizes(),
                " and ", v_.sizes());
    TORCH_CHECK(HK > 0 && HQ % HK == 0, "decode_attention: ", HQ, " query heads are not a multiple of ", HK,
                " kv heads");
    TORCH_CHECK(D % 16 == 0 && D <= kMaxD, "decode_attention: head_dim ", D, " must be a multiple of 16 up to ",
                kMaxD);
    TORCH_CHECK(!is_causal || S <= T_, "decode_attention: causal with more queries (", S, ") than keys (", T_, ")");
    auto lastdim = [](const at::Tensor& t) { return t.stride(3) == 1 ? t : t.contiguous(); };
    const at::Tensor q = lastdim(q_), k = lastdim(k_), v = lastdim(v_);
    at::Tensor mask;
    View mv{0, 0, 0};
    if (mask_.has_value()) {
        TORCH_CHECK(mask_->scalar_type() == at::kBool && mask_->dim() == 4 && mask_->size(1) == 1 &&
                    (mask_->size(0) == 1 || mask_->size(0) == B) && mask_->size(2) == S && mask_->size(3) == T_,
                    "decode_attention: mask must be bool (", B, " or 1, 1, ", S, ", ", T_, "), got ",
                    mask_->sizes());
        mask = mask_->contiguous();
        mv = {mask.size(0) == 1 ? 0 : mask.stride(0), 0, mask.stride(2)};
    }
    at::Tensor out = at::empty({B, HQ, S, D}, q.options());
    if (out.numel() == 0) return out;
    const int64_t G = HQ / HK;
    const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
    switch (q.scalar_type()) {
        case at::kFloat: run_tasks<float>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        case at::kBFloat16: run_tasks<c10::BFloat16>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        case at::kHalf: run_tasks<c10::Half>(q, k, v, mask, mv, out, G, sc, cap, is_causal); break;
        default: TORCH_CHECK(false, "decode_attention: q must be float32, bfloat16 or float16, got ", q.scalar_type());
    }
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, float softcap, bool is_causal) "
          "-> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("decode_attention", &decode_attention);
}
