// The lattice types (IQ2_*, IQ3_*, IQ1_*: gguf_file_blocks.h) re-encoded as plain 4-bit table blocks for the Triton
// kernels (exllamav2/ops/triton/gguf_kernels.py: _decode_lut4), which cannot look their grids up cheaply. Per
// 256 weights, 146 bytes: the fp16 d, 16 bytes of odd scale factors (one per 16 weights), then per 32 weights 16
// bytes of table codes, byte i holding weight i (low nibble) and i + 16 (high), as Q4_0 orders them.
// w = (d * scale) * table[code] * 2^-lut_shift(kind): the file's weights exactly.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>

#include "gguf_file_blocks.h"
#include "gguf_file_rows.h"

namespace {

using namespace gguf_kernels;

constexpr int64_t kLutBlockBytes = 146;

at::Tensor gguf_lut_blocks(const at::Tensor& raw, int64_t kind, int64_t n, int64_t k,
                           const std::optional<at::Tensor>& grid) {
    TORCH_CHECK(kind >= 0 && kind < kKinds && lattice(static_cast<int>(kind)), "gguf_lut_blocks: kind ", kind,
                " is not a lattice kind (", static_cast<int>(IQ2_XXS), "..", kKinds - 1, ")");
    const FileRows fr = file_rows("gguf_lut_blocks", raw, kind, n, k, grid);
    const int kd = fr.kind;
    const uint8_t* gp = fr.grid;
    const Geometry geo = fr.geo;
    const int64_t supers = k / 256;
    at::Tensor out = at::empty({n, supers * kLutBlockBytes}, raw.options());
    const uint8_t* src = raw.data_ptr<uint8_t>();
    uint8_t* dst = out.data_ptr<uint8_t>();
    const int64_t stride = raw.stride(0);
    at::parallel_for(0, n, 16, [&](int64_t r0, int64_t r1) {
        Block blk;
        for (int64_t r = r0; r < r1; ++r)
            for (int64_t s = 0; s < supers; ++s) {
                const uint8_t* row = src + r * stride;
                uint8_t* o = dst + (r * supers + s) * kLutBlockBytes;
                const uint16_t d = super_field_bits(kd, row + s * geo.bytes, 0);
                std::memcpy(o, &d, 2);
                for (int j = 0; j < 8; ++j) {
                    decode_block(kd, row, s * 8 + j, blk, gp);
                    o[2 + 2 * j] = blk.t0[0];
                    o[3 + 2 * j] = split_halves(kd) ? blk.t0[1] : blk.t0[0];
                    for (int i = 0; i < 16; ++i)
                        o[18 + 16 * j + i] = static_cast<uint8_t>(blk.code[i] | (blk.code[16 + i] << 4));
                }
            }
    });
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("gguf_lut_blocks(Tensor raw, int kind, int n, int k, Tensor? grid=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("gguf_lut_blocks", &gguf_lut_blocks);
}
