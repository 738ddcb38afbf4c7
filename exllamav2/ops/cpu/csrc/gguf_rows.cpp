// Rows of a GGUF matrix dequantised straight from the file's blocks: the token embedding's lookup
// (exllamav2/quant/gguf_embedding.py), which keeps the table in the file's memory map. The values are gguf-py's
// (gguf_file_blocks.h: block_values), rounded once to the output dtype, so the rows equal a dense table's.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>

#include "gguf_file_blocks.h"
#include "gguf_file_rows.h"

namespace {

using namespace gguf_kernels;

float half_bits(uint16_t v) { return static_cast<float>(c10::Half(v, c10::Half::from_bits())); }
float half_at(const uint8_t* p) { return half_bits(u16(p)); }

// one row's K weights as floats
void row_values(int kd, const uint8_t* row, int64_t K, float* out, const uint8_t* grid) {
    const Geometry geo = geometry(kd);
    const int sf = super_fields(kd);
    Block blk;
    int q[kBlock];
    for (int64_t b = 0; b < K / kBlock; ++b) {
        decode_block(kd, row, b, blk, grid);
        for (int j = 0; j < kBlock; ++j) q[j] = blk.code[j];
        BlockFields f;
        if (sf) {
            const uint8_t* sb = row + (b / 8) * geo.bytes;
            f.sd = half_bits(super_field_bits(kd, sb, 0));
            if (sf == 2) f.sdmin = half_bits(super_field_bits(kd, sb, 1));
            f.b0 = blk.t0[0];
            f.b1 = split_halves(kd) ? blk.t0[1] : blk.t1[0];
        } else {
            f.d = half_at(blk.t0);
            if (has_m(kd)) f.m = half_at(blk.t1);
        }
        block_values(kd, q, f, out + b * kBlock);
    }
}

template <typename T>
void store_row(T* dst, const float* src, int64_t K) {
    for (int64_t i = 0; i < K; ++i) dst[i] = static_cast<T>(src[i]);
}

at::Tensor gguf_rows(const at::Tensor& raw, const at::Tensor& ids, int64_t kind, int64_t K, at::ScalarType dtype,
                     const std::optional<at::Tensor>& grid) {
    const FileRows fr = file_rows("gguf_rows", raw, kind, -1, K, grid);
    const int kd = fr.kind;
    const uint8_t* gp = fr.grid;
    TORCH_CHECK(ids.scalar_type() == at::kLong, "gguf_rows: ids must be int64, got ", ids.scalar_type());
    TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                "gguf_rows: dtype must be float32, bfloat16 or float16, got ", dtype);
    const at::Tensor flat = ids.contiguous().reshape({-1});
    const int64_t n = flat.numel(), vocab = raw.size(0);
    const int64_t* idp = flat.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i)
        TORCH_CHECK_INDEX(idp[i] >= 0 && idp[i] < vocab, "token id ", idp[i], " is out of range for the embedding's ", vocab,
                    " rows");
    std::vector<int64_t> shape(ids.sizes().begin(), ids.sizes().end());
    shape.push_back(K);
    at::Tensor out = at::empty(shape, raw.options().dtype(dtype));
    const uint8_t* src = raw.data_ptr<uint8_t>();
    const int64_t stride = raw.stride(0);
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
        std::vector<float> row(K);
        for (int64_t i = i0; i < i1; ++i) {
            row_values(kd, src + idp[i] * stride, K, row.data(), gp);
            if (dtype == at::kFloat) store_row(out.data_ptr<float>() + i * K, row.data(), K);
            else if (dtype == at::kBFloat16) store_row(out.data_ptr<c10::BFloat16>() + i * K, row.data(), K);
            else store_row(out.data_ptr<c10::Half>() + i * K, row.data(), K);
        }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("gguf_rows(Tensor raw, Tensor ids, int kind, int k, ScalarType dtype, Tensor? grid=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("gguf_rows", &gguf_rows);
}
