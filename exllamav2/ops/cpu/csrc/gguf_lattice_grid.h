// The grid argument of the ops that decode a GGUF file's blocks (gguf_pack.cpp, gguf_rows.cpp): required, and
// checked, for the lattice kinds (IQ2_*, IQ3_*, IQ1_S: gguf_file_blocks.h), ignored otherwise.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

#include "gguf_file_blocks.h"

namespace gguf_kernels {

inline const uint8_t* lattice_grid(int kind, const std::optional<at::Tensor>& grid, const char* op) {
    if (!lattice(kind)) return nullptr;
    TORCH_CHECK(grid.has_value() && grid->scalar_type() == at::kByte && grid->is_contiguous() && grid->dim() == 2 &&
                grid->size(0) == grid_entries(kind) && grid->size(1) == grid_width(kind), op, ": kind ", kind,
                " needs its grid as contiguous uint8 (", grid_entries(kind), ", ", grid_width(kind), ")");
    return grid->data_ptr<uint8_t>();
}

}  // namespace gguf_kernels
