// The arguments of the ops that read a GGUF file's rows of blocks (gguf_pack.cpp, gguf_rows.cpp,
// gguf_lut_blocks.cpp), checked once here: the kind, the width, the uint8 rows and, for the lattice kinds
// (IQ2_*, IQ3_*, IQ1_*: gguf_file_blocks.h), their grid.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "gguf_file_blocks.h"

namespace gguf_kernels {

struct FileRows {
    int kind;
    Geometry geo;
    int64_t row_bytes;
    const uint8_t* grid;  // the lattice kinds' grid, null for the others
};

// `raw`: uint8 (n, bytes per row) with contiguous rows (n < 0: any number of rows) of `kind`, `k` weights a row.
inline FileRows file_rows(const char* op, const at::Tensor& raw, int64_t kind, int64_t n, int64_t k,
                          const std::optional<at::Tensor>& grid) {
    TORCH_CHECK(kind >= 0 && kind < kKinds, op, ": kind ", kind, " is not one of 0..", kKinds - 1);
    const int kd = static_cast<int>(kind);
    const Geometry geo = geometry(kd);
    TORCH_CHECK(k > 0 && k % geo.per == 0, op, ": ", k, " columns, expected a multiple of ", geo.per);
    const int64_t row_bytes = k / geo.per * geo.bytes;
    TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && (n < 0 || raw.size(0) == n) &&
                raw.size(1) == row_bytes && raw.stride(1) == 1, op, ": the rows must be uint8 (",
                n < 0 ? "rows" : std::to_string(n), ", ", row_bytes, ") with contiguous rows, got ", raw.sizes());
    const uint8_t* gp = nullptr;
    if (lattice(kd)) {
        TORCH_CHECK(grid.has_value() && grid->scalar_type() == at::kByte && grid->is_contiguous() &&
                    grid->dim() == 2 && grid->size(0) == grid_entries(kd) && grid->size(1) == grid_width(kd), op,
                    ": kind ", kind, " needs its grid as contiguous uint8 (", grid_entries(kd), ", ", grid_width(kd),
                    ")");
        gp = grid->data_ptr<uint8_t>();
    }
    return {kd, geo, row_bytes, gp};
}

}  // namespace gguf_kernels
