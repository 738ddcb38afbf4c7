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
#include <tuple>
#include <vector>

#include "gguf_gemv_kernels.h"

namespace {

using namespace gguf_kernels;

// bytes per file block and weights per file block
struct Geometry {
    int per, bytes;
};
Geometry geometry(int kind) {
    switch (kind) {
        case Q4_0: return {32, 18};
        case Q4_1: return {32, 20};
        case Q8_0: return {32, 34};
        case Q5_0: return {32, 22};
        case Q5_1: return {32, 24};
        case IQ4_NL: return {32, 18};
        case Q2_K: return {256, 84};
        case Q3_K: return {256, 110};
        case Q4_K: return {256, 144};
        case Q5_K: return {256, 176};
        case Q6_K: return {256, 210};
        default: return {256, 136};  // IQ4_XS
    }
}

inline uint16_t u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, 2);
    return v;
}

inline uint32_t u32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    return v;
}

// llama.cpp's get_scale_min_k4: sub-block j's 6-bit scale and min of a Q4_K/Q5_K super-block
inline void scale_min_k4(int j, const uint8_t* q, uint8_t& sc, uint8_t& mn) {
    if (j < 4) {
        sc = q[j] & 63;
        mn = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        mn = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// One 32-column block of one row: its codes and the bytes of its tail fields (t0: d / sc / the first half's,
// t1: m / mn / the second half's; fp16 fields as their two bytes).
struct Block {
    uint8_t code[32];
    uint8_t t0[2], t1[2];
};

// Block b (32 columns) of a row whose file bytes start at `row`.
void decode_block(int kind, const uint8_t* row, int64_t b, Block& out) {
    const Geometry geo = geometry(kind);
    std::memset(out.t0, 0, 2);
    std::memset(out.t1, 0, 2);
    if (geo.per == 32) {
        const uint8_t* blk = row + b * geo.bytes;
        std::memcpy(out.t0, blk, 2);  // d
        if (kind == Q8_0) {
            for (int j = 0; j < 32; ++j) out.code[j] = blk[2 + j] ^ 0x80;
            return;
        }
        const bool m = kind == Q4_1 || kind == Q5_1;
        if (m) std::memcpy(out.t1, blk + 2, 2);
        const bool five = kind == Q5_0 || kind == Q5_1;
        const uint8_t* qs = blk + 2 + (m ? 2 : 0) + (five ? 4 : 0);
        const uint32_t qh = five ? u32(blk + 2 + (m ? 2 : 0)) : 0;
        for (int j = 0; j < 16; ++j) {
            out.code[j] = (qs[j] & 15) | (((qh >> j) & 1) << 4);
            out.code[16 + j] = (qs[j] >> 4) | (((qh >> (16 + j)) & 1) << 4);
        }
        return;
    }
    const uint8_t* sb = row + (b / 8) * geo.bytes;
    const int j = static_cast<int>(b % 8), n = j / 4, jj = j % 4;
    switch (kind) {
        case Q4_K:
        case Q5_K: {
            const uint8_t* qs = sb + (kind == Q5_K ? 48 : 16) + 32 * (j / 2);
            for (int l = 0; l < 32; ++l) {
                uint8_t c = j % 2 ? qs[l] >> 4 : qs[l] & 15;
                if (kind == Q5_K) c |= ((sb[16 + l] >> j) & 1) << 4;
                out.code[l] = c;
            }
            scale_min_k4(j, sb + 4, out.t0[0], out.t1[0]);
            return;
        }
        case Q6_K: {
            for (int l = 0; l < 32; ++l) {
                const uint8_t ql = (sb[64 * n + (jj % 2) * 32 + l] >> (4 * (jj / 2))) & 15;
                out.code[l] = ql | (((sb[128 + 32 * n + l] >> (2 * jj)) & 3) << 4);
            }
            out.t0[0] = sb[192 + 2 * j];
            out.t0[1] = sb[192 + 2 * j + 1];
            return;
        }
        case Q3_K: {
            for (int l = 0; l < 32; ++l)
                out.code[l] = ((sb[32 + 32 * n + l] >> (2 * jj)) & 3) | (((sb[l] >> j) & 1) << 2);
            for (int h = 0; h < 2; ++h) {
                const int i = 2 * j + h;
                const int low = i < 8 ? sb[96 + i] & 15 : sb[96 + i - 8] >> 4;
                const int high = (sb[104 + i % 4] >> (2 * (i / 4))) & 3;
                out.t0[h] = static_cast<uint8_t>(static_cast<int8_t>((low | (high << 4)) - 32));
            }
            return;
        }
        case Q2_K: {
            for (int l = 0; l < 32; ++l) out.code[l] = (sb[16 + 32 * n + l] >> (2 * jj)) & 3;
            out.t0[0] = sb[2 * j];
            out.t0[1] = sb[2 * j + 1];
            return;
        }
        default: {  // IQ4_XS
            const uint8_t* qs = sb + 8 + 16 * j;
            for (int i = 0; i < 16; ++i) {
                out.code[i] = qs[i] & 15;
                out.code[16 + i] = qs[i] >> 4;
            }
            const int ls = ((sb[4 + j / 2] >> (4 * (j % 2))) & 15) | (((u16(sb + 2) >> (2 * j)) & 3) << 4);
            out.t0[0] = static_cast<uint8_t>(static_cast<int8_t>(ls - 32));
            return;
        }
    }
}

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

std::tuple<at::Tensor, at::Tensor> gguf_pack(const at::Tensor& raw, int64_t kind, int64_t n, int64_t k) {
    TORCH_CHECK(kind >= 0 && kind < kKinds, "gguf_pack: kind ", kind, " is not one of 0..", kKinds - 1);
    const int kd = static_cast<int>(kind);
    const Geometry geo = geometry(kd);
    TORCH_CHECK(k % geo.per == 0, "gguf_pack: ", k, " columns, expected a multiple of ", geo.per);
    const int64_t row_bytes = k / geo.per * geo.bytes;
    TORCH_CHECK(raw.scalar_type() == at::kByte && raw.dim() == 2 && raw.size(0) == n && raw.size(1) == row_bytes &&
                raw.stride(1) == 1, "gguf_pack: raw must be uint8 (", n, ", ", row_bytes, ") with contiguous rows, got ",
                raw.sizes());
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
                    decode_block(kd, row, b, blk);
                    place(kd, blk, rr, dst + (g * nb + b) * rec);
                }
                for (int64_t s = 0; s < nb / 8 && sf; ++s) {
                    const uint8_t* sb = row + s * geo.bytes;
                    const int at_d = kd == Q6_K ? 208 : kd == Q3_K ? 108 : kd == Q2_K ? 80 : 0;
                    for (int f = 0; f < sf; ++f)
                        std::memcpy(sup + (((g * (nb / 8) + s) * sf + f) * kGroup + rr) * 2, sb + at_d + 2 * f, 2);
                }
            }
    });
    return {out, super};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("gguf_pack(Tensor raw, int kind, int n, int k) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("gguf_pack", &gguf_pack);
}
