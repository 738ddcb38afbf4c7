// Packs a GGUF matrix's blocks into the GEMV's layout (gguf_gemv_kernels.h) at load: the same bytes as
// exllamav2/ops/cpu/gguf_pack.py, which stays the reference (tests/test_cpu_kernels.py compares them byte for byte),
// at memory speed instead of numpy's 100-600 MB/s (an 8B Q4_K_M file took ~20 s of its load there).
// Each row's blocks are decoded to their codes (the layout's form: nibble values with their high bits, crumbs,
// IQ4 table indices, Q8_0 codes + 128) and per-block fields, then scattered into the row's slots of its group's
// records; groups of 16 rows run in parallel.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <vector>

#include "gguf_file_blocks.h"
#include "gguf_file_rows.h"

namespace {

using namespace gguf_kernels;

// Row rr's slots of its group's record for one block.
void place(int kind, const Block& blk, int rr, uint8_t* rec) {
    const int cbytes = code_bytes(kind);
    if (kind == Q8_0) {
        for (int c = 0; c < 8; ++c)
            for (int i = 0; i < 4; ++i) rec[c * 64 + rr * 4 + i] = blk.code[4 * c + i];
    } else if (crumbs(kind)) {
        for (int i = 0; i < 4; ++i) {
            uint8_t a = 0, b = 0, t = 0;
            for (int c = 0; c < 4; ++c) {
                a |= (blk.code[4 * c + i] & 3) << (2 * c);
                b |= (blk.code[16 + 4 * c + i] & 3) << (2 * c);
                t |= ((blk.code[4 * c + i] >> 2) & 1) << c;
                t |= ((blk.code[16 + 4 * c + i] >> 2) & 1) << (4 + c);
            }
            rec[rr * 4 + i] = a;
            rec[64 + rr * 4 + i] = b;
            if (high_bits(kind) == 1) rec[128 + rr * 4 + i] = t;
        }
    } else {
        for (int c = 0; c < 4; ++c)
            for (int i = 0; i < 4; ++i)
                rec[c * 64 + rr * 4 + i] = (blk.code[4 * c + i] & 15) | ((blk.code[16 + 4 * c + i] & 15) << 4);
        const int hb = high_bits(kind);
        for (int i = 0; i < 4 && hb; ++i) {
            uint8_t a = 0, b = 0;
            for (int c = 0; c < 4; ++c) {
                const int lo = blk.code[4 * c + i] >> 4, hi = blk.code[16 + 4 * c + i] >> 4;
                if (hb == 1) {
                    a |= (lo & 1) << c;
                    a |= (hi & 1) << (4 + c);
                } else {
                    a |= (lo & 3) << (2 * c);
                    b |= (hi & 3) << (2 * c);
                }
            }
            rec[256 + rr * 4 + i] = a;
            if (hb == 2) rec[320 + rr * 4 + i] = b;
        }
    }
    uint8_t* tail = rec + cbytes;
    if (super_fields(kind) == 0) {  // fp16 d (and m)
        std::memcpy(tail + 2 * rr, blk.t0, 2);
        if (has_m(kind)) std::memcpy(tail + 32 + 2 * rr, blk.t1, 2);
    } else {  // one byte per row per field: sc / mn, or the two halves'
        tail[rr] = blk.t0[0];
        tail[16 + rr] = kind == IQ4_XS ? 0 : split_halves(kind) ? blk.t0[1] : blk.t1[0];
    }
}

std::tuple<at::Tensor, at::Tensor> gguf_pack(const at::Tensor& raw, int64_t kind, int64_t n, int64_t k,
                                             const std::optional<at::Tensor>& grid) {
    const FileRows fr = file_rows("gguf_pack", raw, kind, n, k, grid);
    const int kd = fr.kind;
    const uint8_t* gp = fr.grid;
    const Geometry geo = fr.geo;
    const int64_t row_bytes = fr.row_bytes;
    const int64_t nb = k / kBlock, groups = (n + kGroup - 1) / kGroup, rec = record_bytes(kd);
    const int sf = super_fields(kd);
    at::Tensor out = at::zeros({groups * nb * rec}, raw.options());
    at::Tensor super = at::zeros({sf ? groups * (nb / 8) * sf * kGroup : 0}, raw.options().dtype(at::kHalf));
    const uint8_t* src = raw.data_ptr<uint8_t>();
    const int64_t stride = raw.stride(0);
    uint8_t* dst = out.data_ptr<uint8_t>();
    uint8_t* sup = reinterpret_cast<uint8_t*>(super.data_ptr<at::Half>());
    // padding rows are packed from zero bytes, as the reference pads them (Q8_0's codes then read 0x80)
    const std::vector<uint8_t> zero_row(row_bytes, 0);
    at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
        Block blk;
        for (int64_t g = g0; g < g1; ++g)
            for (int rr = 0; rr < kGroup; ++rr) {
                const int64_t r = g * kGroup + rr;
                const uint8_t* row = r < n ? src + r * stride : zero_row.data();
                for (int64_t b = 0; b < nb; ++b) {
                    decode_block(kd, row, b, blk, gp);
                    place(kd, blk, rr, dst + (g * nb + b) * rec);
                }
                for (int64_t s = 0; s < nb / 8 && sf; ++s) {
                    const uint8_t* sb = row + s * geo.bytes;
                    for (int f = 0; f < sf; ++f) {
                        const uint16_t bits = super_field_bits(kd, sb, f);
                        std::memcpy(sup + (((g * (nb / 8) + s) * sf + f) * kGroup + rr) * 2, &bits, 2);
                    }
                }
            }
    });
    return {out, super};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("gguf_pack(Tensor raw, int kind, int n, int k, Tensor? grid=None) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("gguf_pack", &gguf_pack);
}
