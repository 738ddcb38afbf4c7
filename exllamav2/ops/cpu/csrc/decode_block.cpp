// A decoder layer's attention block and MLP block for one new token per row, each as one op made of this library's
// other ops (ops_api.h) in the order the modules call them (exllamav2/attn.py, exllamav2/mlp.py): the same
// results, bit for bit, without ~10 calls from Python per block (exllamav2/eager_decode.py says where it is taken).
//
// A linear is given as (w, kind, n, bias, super_scales): kind >= 0 is a GGUF kind of gguf_gemv (w its repacked
// blocks), kind == -1 a dense bf16 (n, K) weight for bf16_gemv.

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops_api.h"

namespace {

constexpr int64_t kDenseBf16 = -1;

at::Tensor linear(const at::Tensor& x, const at::Tensor& w, int64_t kind, int64_t n,
                  const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& super_scales,
                  int64_t act_stages) {
    if (kind == kDenseBf16) return exl2_ops::bf16_gemv(x, w, bias);
    return exl2_ops::gguf_gemv(x, w, kind, n, bias, super_scales, act_stages);
}

// the k/v heads in a fused q|k|v projection `qkv_n` wide (q_heads query heads and equal k and v heads of d)
int64_t kv_heads_of(const char* op, int64_t qkv_n, int64_t q_heads, int64_t d) {
    TORCH_CHECK(d > 0 && qkv_n % d == 0 && qkv_n / d > q_heads && (qkv_n / d - q_heads) % 2 == 0, op,
                ": q/k/v width ", qkv_n, " does not hold ", q_heads, " query heads and equal k/v heads of ", d);
    return (qkv_n / d - q_heads) / 2;
}

// x (..., hidden): the block's input norm, cast to the linears' dtype where it differs, through the block's first
// linear -> (rows, n)
at::Tensor norm_linear(const at::Tensor& x, const at::Tensor& norm_w, double eps, at::ScalarType lin_dtype,
                       const at::Tensor& w, int64_t kind, int64_t n, const std::optional<at::Tensor>& bias,
                       const std::optional<at::Tensor>& super_scales, int64_t act_stages) {
    at::Tensor xn = exl2_ops::rms_norm(x, norm_w, eps, x.scalar_type());
    if (xn.scalar_type() != lin_dtype) xn = xn.to(lin_dtype);
    return linear(xn.reshape({-1, x.size(-1)}), w, kind, n, bias, super_scales, act_stages);
}

// the block's output added to the residual stream x as ExLlamaV2Module.add_residual does, after the optional
// post-norm (exllamav2/module.py)
at::Tensor residual(const at::Tensor& x, at::Tensor y, const std::optional<at::Tensor>& post_w, double post_eps,
                    bool residual_fp32) {
    if (post_w.has_value()) y = exl2_ops::rms_norm(y, *post_w, post_eps, y.scalar_type());
    if (residual_fp32) return x.to(at::kFloat) + y.to(at::kFloat);
    return x + (y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type()));
}

// x (b, 1, hidden) -> x + o_proj(attention(rope(q), k, v)) with k/v written into the caches at `index`
at::Tensor attn_decode_block(const at::Tensor& x, const at::Tensor& norm_w, double eps,
                             const at::Tensor& qkv_w, int64_t qkv_kind, int64_t qkv_n,
                             const std::optional<at::Tensor>& qkv_bias, const std::optional<at::Tensor>& qkv_super,
                             const at::Tensor& o_w, int64_t o_kind, int64_t o_n,
                             const std::optional<at::Tensor>& o_bias, const std::optional<at::Tensor>& o_super,
                             const at::Tensor& cos, const at::Tensor& sin, bool interleaved, at::Tensor& k_cache,
                             at::Tensor& v_cache, const at::Tensor& index, int64_t q_heads, int64_t head_dim,
                             int64_t kv_len, double scale, double softcap, int64_t act_stages) {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "attn_decode_block: x must be (rows, 1, hidden), got ", x.sizes());
    const int64_t b = x.size(0), d = head_dim;
    const int64_t kv_heads = kv_heads_of("attn_decode_block", qkv_n, q_heads, d);
    const at::Tensor y = norm_linear(x, norm_w, eps, x.scalar_type(), qkv_w, qkv_kind, qkv_n, qkv_bias, qkv_super,
                                     act_stages).view({b, 1, qkv_n});
    const at::Tensor qk = y.narrow(2, 0, (q_heads + kv_heads) * d).view({b, 1, q_heads + kv_heads, d});
    const at::Tensor v = y.narrow(2, (q_heads + kv_heads) * d, kv_heads * d).view({b, 1, kv_heads, d});
    const at::Tensor q = exl2_ops::rope_kv_write(qk, v, cos, sin, interleaved, k_cache, v_cache, index, q_heads);
    const at::Tensor k = k_cache.narrow(1, 0, kv_len), vv = v_cache.narrow(1, 0, kv_len);
    const at::Tensor a = exl2_ops::decode_attention(q.transpose(1, 2), k.transpose(1, 2), vv.transpose(1, 2),
                                                    std::nullopt, scale, softcap, false);
    const at::Tensor o = linear(a.transpose(1, 2).reshape({b, q_heads * d}), o_w, o_kind, o_n, o_bias, o_super,
                                act_stages);
    return residual(x, o.view({b, 1, o_n}), std::nullopt, 0.0, false);
}

// Attention with per-head q/k norms (Qwen3, Gemma 3): the modules' other order (attn.py: project_qkv, then each of
// q and k normed and rotated, k/v copied into the caches at `index`), an optional bool mask (b or 1, 1, 1, kv_len)
// (a sliding window in reach), the input cast to `lin_dtype`, an optional post-norm and an fp32 residual add.
at::Tensor attn_normed_decode_block(const at::Tensor& x, const at::Tensor& norm_w, double eps, at::ScalarType lin_dtype,
                                    const at::Tensor& qkv_w, int64_t qkv_kind, int64_t qkv_n,
                                    const std::optional<at::Tensor>& qkv_bias,
                                    const std::optional<at::Tensor>& qkv_super, const at::Tensor& o_w,
                                    int64_t o_kind, int64_t o_n, const std::optional<at::Tensor>& o_bias,
                                    const std::optional<at::Tensor>& o_super, const at::Tensor& q_norm_w,
                                    double q_eps, const at::Tensor& k_norm_w, double k_eps, const at::Tensor& cos,
                                    const at::Tensor& sin, bool interleaved, at::Tensor& k_cache, at::Tensor& v_cache,
                                    const at::Tensor& index, const std::optional<at::Tensor>& mask, int64_t q_heads,
                                    int64_t head_dim, int64_t kv_len, double scale, double softcap,
                                    const std::optional<at::Tensor>& post_w, double post_eps, bool residual_fp32,
                                    int64_t act_stages) {
    TORCH_CHECK(x.dim() == 3 && x.size(1) == 1, "attn_normed_decode_block: x must be (rows, 1, hidden), got ",
                x.sizes());
    const int64_t b = x.size(0), d = head_dim;
    const int64_t kv_heads = kv_heads_of("attn_normed_decode_block", qkv_n, q_heads, d);
    const at::Tensor y = norm_linear(x, norm_w, eps, lin_dtype, qkv_w, qkv_kind, qkv_n, qkv_bias, qkv_super,
                                     act_stages).view({b, 1, qkv_n});
    at::Tensor q = y.narrow(2, 0, q_heads * d).reshape({b, 1, q_heads, d});
    at::Tensor k = y.narrow(2, q_heads * d, kv_heads * d).reshape({b, 1, kv_heads, d});
    const at::Tensor v = y.narrow(2, (q_heads + kv_heads) * d, kv_heads * d).reshape({b, 1, kv_heads, d});
    q = exl2_ops::rope(exl2_ops::rms_norm(q, q_norm_w, q_eps, q.scalar_type()), cos, sin, interleaved);
    k = exl2_ops::rope(exl2_ops::rms_norm(k, k_norm_w, k_eps, k.scalar_type()), cos, sin, interleaved);
    k_cache.index_copy_(1, index, k);
    v_cache.index_copy_(1, index, v);
    const at::Tensor kk = k_cache.narrow(1, 0, kv_len), vv = v_cache.narrow(1, 0, kv_len);
    const at::Tensor a = exl2_ops::decode_attention(q.transpose(1, 2), kk.transpose(1, 2), vv.transpose(1, 2), mask,
                                                    scale, softcap, false);
    const at::Tensor o = linear(a.transpose(1, 2).reshape({b, q_heads * d}), o_w, o_kind, o_n, o_bias, o_super,
                                act_stages);
    return residual(x, o.view({b, 1, o_n}), post_w, post_eps, residual_fp32);
}

// The dynamic generator's packed decode step: x (1, T, hidden), one new token for each of T sequences, k/v written
// at `slots` of the page-major caches (1, slots, kv heads, d) and each sequence attending to its own pages
// (paged_decode_attention) -> x + o_proj(attention)
at::Tensor paged_attn_decode_block(const at::Tensor& x, const at::Tensor& norm_w, double eps,
                                   const at::Tensor& qkv_w, int64_t qkv_kind, int64_t qkv_n,
                                   const std::optional<at::Tensor>& qkv_bias,
                                   const std::optional<at::Tensor>& qkv_super, const at::Tensor& o_w, int64_t o_kind,
                                   int64_t o_n, const std::optional<at::Tensor>& o_bias,
                                   const std::optional<at::Tensor>& o_super, const at::Tensor& cos,
                                   const at::Tensor& sin, bool interleaved, at::Tensor& k_pages, at::Tensor& v_pages,
                                   const at::Tensor& slots, const at::Tensor& block_index, const at::Tensor& kv_lens,
                                   int64_t page_size, int64_t sliding_window, int64_t q_heads, int64_t head_dim,
                                   double scale, double softcap, int64_t act_stages) {
    TORCH_CHECK(x.dim() == 3 && x.size(0) == 1, "paged_attn_decode_block: x must be (1, tokens, hidden), got ",
                x.sizes());
    TORCH_CHECK(k_pages.dim() == 4 && k_pages.size(0) == 1 && v_pages.dim() == 4 && v_pages.size(0) == 1,
                "paged_attn_decode_block: the caches must be (1, slots, kv heads, head dim)");
    const int64_t t = x.size(1), d = head_dim;
    const int64_t kv_heads = kv_heads_of("paged_attn_decode_block", qkv_n, q_heads, d);
    const at::Tensor y = norm_linear(x, norm_w, eps, x.scalar_type(), qkv_w, qkv_kind, qkv_n, qkv_bias, qkv_super,
                                     act_stages).view({1, t, qkv_n});
    const at::Tensor qk = y.narrow(2, 0, (q_heads + kv_heads) * d).view({1, t, q_heads + kv_heads, d});
    const at::Tensor v = y.narrow(2, (q_heads + kv_heads) * d, kv_heads * d).view({1, t, kv_heads, d});
    const at::Tensor q = exl2_ops::rope_kv_write(qk, v, cos, sin, interleaved, k_pages, v_pages, slots, q_heads);
    const at::Tensor a = exl2_ops::paged_decode_attention(q[0], k_pages[0], v_pages[0], block_index, kv_lens,
                                                          page_size, sliding_window, scale, softcap);
    const at::Tensor o = linear(a.reshape({t, q_heads * d}), o_w, o_kind, o_n, o_bias, o_super, act_stages);
    return residual(x, o.view({1, t, o_n}), std::nullopt, 0.0, false);
}

// x (b, s, hidden) -> x + down(act(gate) * up) of the fused gate|up projection (gate first, `interm` wide each),
// row by row (the dynamic generator's packed steps have every sequence's new token as one of s positions). The
// norm's output is cast to the linears' dtype `lin_dtype` where it differs (an fp32 residual stream, Gemma 2/3);
// `post_w`: a norm on the block's output before the residual add; `residual_fp32`: the add in fp32.
at::Tensor mlp_decode_block(const at::Tensor& x, const at::Tensor& norm_w, double eps,
                            const at::Tensor& gu_w, int64_t gu_kind, int64_t gu_n,
                            const std::optional<at::Tensor>& gu_bias, const std::optional<at::Tensor>& gu_super,
                            const at::Tensor& down_w, int64_t down_kind, int64_t down_n,
                            const std::optional<at::Tensor>& down_bias, const std::optional<at::Tensor>& down_super,
                            int64_t act, int64_t act_stages, at::ScalarType lin_dtype,
                            const std::optional<at::Tensor>& post_w, double post_eps, bool residual_fp32) {
    TORCH_CHECK(x.dim() == 3, "mlp_decode_block: x must be (batch, positions, hidden), got ", x.sizes());
    TORCH_CHECK(gu_n % 2 == 0, "mlp_decode_block: the gate|up width must be even, got ", gu_n);
    const int64_t b = x.size(0), s = x.size(1), interm = gu_n / 2;
    const at::Tensor y = norm_linear(x, norm_w, eps, lin_dtype, gu_w, gu_kind, gu_n, gu_bias, gu_super, act_stages);
    const at::Tensor a = exl2_ops::gated_activation(y.narrow(1, 0, interm), y.narrow(1, interm, interm), act);
    return residual(x, linear(a, down_w, down_kind, down_n, down_bias, down_super, act_stages).view({b, s, down_n}),
                    post_w, post_eps, residual_fp32);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("attn_decode_block(Tensor x, Tensor norm_w, float eps, Tensor qkv_w, int qkv_kind, int qkv_n, "
          "Tensor? qkv_bias, Tensor? qkv_super, Tensor o_w, int o_kind, int o_n, Tensor? o_bias, Tensor? o_super, "
          "Tensor cos, Tensor sin, bool interleaved, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor index, "
          "int q_heads, int head_dim, int kv_len, float scale, float softcap, int act_stages) -> Tensor");
    m.def("paged_attn_decode_block(Tensor x, Tensor norm_w, float eps, Tensor qkv_w, int qkv_kind, int qkv_n, "
          "Tensor? qkv_bias, Tensor? qkv_super, Tensor o_w, int o_kind, int o_n, Tensor? o_bias, Tensor? o_super, "
          "Tensor cos, Tensor sin, bool interleaved, Tensor(a!) k_pages, Tensor(b!) v_pages, Tensor slots, "
          "Tensor block_index, Tensor kv_lens, int page_size, int sliding_window, int q_heads, int head_dim, "
          "float scale, float softcap, int act_stages) -> Tensor");
    m.def("attn_normed_decode_block(Tensor x, Tensor norm_w, float eps, ScalarType lin_dtype, Tensor qkv_w, "
          "int qkv_kind, int qkv_n, Tensor? qkv_bias, Tensor? qkv_super, Tensor o_w, int o_kind, int o_n, "
          "Tensor? o_bias, Tensor? o_super, Tensor q_norm_w, float q_eps, Tensor k_norm_w, float k_eps, Tensor cos, "
          "Tensor sin, bool interleaved, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor index, Tensor? mask, "
          "int q_heads, int head_dim, int kv_len, float scale, float softcap, Tensor? post_w, float post_eps, "
          "bool residual_fp32, int act_stages) -> Tensor");
    m.def("mlp_decode_block(Tensor x, Tensor norm_w, float eps, Tensor gu_w, int gu_kind, int gu_n, "
          "Tensor? gu_bias, Tensor? gu_super, Tensor down_w, int down_kind, int down_n, Tensor? down_bias, "
          "Tensor? down_super, int act, int act_stages, ScalarType lin_dtype, Tensor? post_w, float post_eps, "
          "bool residual_fp32) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("attn_decode_block", &attn_decode_block);
    m.impl("paged_attn_decode_block", &paged_attn_decode_block);
    m.impl("attn_normed_decode_block", &attn_normed_decode_block);
    m.impl("mlp_decode_block", &mlp_decode_block);
}
