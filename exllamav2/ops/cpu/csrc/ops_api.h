// The torch ops of this library as plain C++ functions, for ops built from other ops (decode_block.cpp) to call
// without the dispatcher: each is defined beside its op in the file named, with the op's arguments and checks.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace exl2_ops {

// gemv.cpp
at::Tensor gguf_gemv(const at::Tensor& x, const at::Tensor& qweight, int64_t kind, int64_t n,
                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& super_scales,
                     int64_t act_stages);
// bf16_gemv.cpp
at::Tensor bf16_gemv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias);
// small_ops.cpp
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& w, double eps, at::ScalarType out_dtype);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved);
at::Tensor rope_kv_write(const at::Tensor& qk, const at::Tensor& v, const at::Tensor& cos, const at::Tensor& sin,
                         bool interleaved, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& index,
                         int64_t q_heads);
at::Tensor gated_activation(const at::Tensor& gate, const at::Tensor& up, int64_t act);
// attention.cpp
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, double scale, double softcap, bool is_causal);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& kflat, const at::Tensor& vflat,
                                  const at::Tensor& block_index, const at::Tensor& kv_lens, int64_t page_size,
                                  int64_t sliding_window, double scale, double softcap);

}  // namespace exl2_ops
