// A GGUF file's blocks read row by row: each type's block geometry, one 32-column block decoded to the GEMV
// layout's codes and tail fields (gguf_gemv_kernels.h), and a block's weights as gguf-py dequantises them. Used by
// the packer (gguf_pack.cpp), the packed matrices' dequantisation (gemv.cpp) and the token embedding's row lookup
// (gguf_rows.cpp).
#pragma once

#include <cstdint>
#include <cstring>

#include "gguf_gemv_kernels.h"

namespace gguf_kernels {

// bytes per file block and weights per file block
struct Geometry {
    int per, bytes;
};
inline Geometry geometry(int kind) {
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
        case IQ4_XS: return {256, 136};
        case IQ2_XXS: return {256, 66};
        case IQ2_XS: return {256, 74};
        case IQ2_S: return {256, 82};
        case IQ3_XXS: return {256, 98};
        case IQ3_S: return {256, 110};
        case IQ1_S: return {256, 50};
        default: return {256, 56};  // IQ1_M
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

// One 32-column block of one row: its codes and the bytes of its tail fields (t0: d / sc / the first half's,
// t1: m / mn / the second half's; fp16 fields as their two bytes).
struct Block {
    uint8_t code[32];
    uint8_t t0[2], t1[2];
};

// The lattice kinds' grids as exllamav2/ops/cpu/kernels.py's lattice_grid gives them: per entry 8 (IQ2, IQ1) or
// 4 (IQ3) indices into the type's grid values (IQ2: 0x08 0x19 0x2b; IQ3_XXS: 0x04 .. 0x3e; IQ3_S: 1 .. 15; IQ1:
// -1 0 1).
constexpr int grid_width(int kind) { return kind == IQ3_XXS || kind == IQ3_S ? 4 : 8; }
constexpr int grid_entries(int kind) {
    return kind == IQ2_XXS || kind == IQ3_XXS ? 256 : kind == IQ2_XS || kind == IQ3_S ? 512 : kind == IQ2_S ? 1024 : 2048;
}

// The 8 sign bits of a 7-bit sign index (llama.cpp's ksigns_iq2xs): the eighth makes their count even.
inline uint8_t even_signs(uint32_t i) { return static_cast<uint8_t>(i | ((__builtin_popcount(i) & 1) << 7)); }

// The table code of magnitude index m with a sign (lut_values: m_i at 8 + i, -m_i at 7 - i).
inline uint8_t signed_code(int m, bool negative) { return static_cast<uint8_t>(negative ? 7 - m : 8 + m); }

// 8 weights from grid entry gi (IQ2 / IQ3 halves) with their 8 sign bits, into code[0..7]
inline void grid_codes8(const uint8_t* grid, int width, uint32_t gi, uint32_t gi2, uint8_t signs, uint8_t* code) {
    for (int i = 0; i < 8; ++i) {
        const int m = width == 8 ? grid[gi * 8 + i] : i < 4 ? grid[gi * 4 + i] : grid[gi2 * 4 + i - 4];
        code[i] = signed_code(m, (signs >> i) & 1);
    }
}

// IQ1: 8 weights of grid entry gi (values -1, 0, 1) plus the delta (+1/8, or -1/8 when `negative`), times 8: the
// codes of +-1, +-7, +-9
inline void iq1_codes8(const uint8_t* grid, uint32_t gi, bool negative, uint8_t* code) {
    for (int i = 0; i < 8; ++i) {
        const int v = 8 * (grid[gi * 8 + i] - 1) + (negative ? -1 : 1);
        const int a = v < 0 ? -v : v;
        code[i] = signed_code(a == 1 ? 0 : a == 7 ? 1 : 2, v < 0);
    }
}

// The fp16 bits of super-block field f (0: d, 1: dmin) of a K-quant, IQ4_XS or lattice super-block sb. IQ1_M keeps
// its d in the top nibbles of its four 16-bit scale words.
inline uint16_t super_field_bits(int kind, const uint8_t* sb, int f) {
    if (kind == IQ1_M)
        return static_cast<uint16_t>((u16(sb + 48) >> 12) | ((u16(sb + 50) >> 8) & 0x00F0) |
                                     ((u16(sb + 52) >> 4) & 0x0F00) | (u16(sb + 54) & 0xF000));
    const int at = kind == Q6_K ? 208 : kind == Q3_K ? 108 : kind == Q2_K ? 80 : 0;
    return u16(sb + at + 2 * f);
}

// Sub-block j (32 weights) of a lattice kind's super-block sb: codes and the odd scale factor(s) in t0.
inline void decode_lattice(int kind, const uint8_t* sb, int j, const uint8_t* grid, Block& out) {
    const int w = grid_width(kind);
    switch (kind) {
        case IQ2_XXS: {
            const uint32_t grids = u32(sb + 2 + 8 * j), aux = u32(sb + 2 + 8 * j + 4);
            for (int l = 0; l < 4; ++l)
                grid_codes8(grid, w, (grids >> (8 * l)) & 255, 0, even_signs((aux >> (7 * l)) & 127), out.code + 8 * l);
            out.t0[0] = static_cast<uint8_t>(2 * (aux >> 28) + 1);
            return;
        }
        case IQ2_XS:
        case IQ2_S: {
            for (int l = 0; l < 4; ++l) {
                const int g = 4 * j + l;
                if (kind == IQ2_XS) {
                    const uint16_t q = u16(sb + 2 + 2 * g);
                    grid_codes8(grid, w, q & 511, 0, even_signs(q >> 9), out.code + 8 * l);
                } else {
                    const uint32_t gi = sb[2 + g] | (((sb[66 + j] >> (2 * l)) & 3) << 8);
                    grid_codes8(grid, w, gi, 0, sb[34 + g], out.code + 8 * l);
                }
            }
            const uint8_t sc = sb[kind == IQ2_XS ? 66 + j : 74 + j];
            out.t0[0] = static_cast<uint8_t>(2 * (sc & 15) + 1);
            out.t0[1] = static_cast<uint8_t>(2 * (sc >> 4) + 1);
            return;
        }
        case IQ3_XXS: {
            const uint32_t aux = u32(sb + 66 + 4 * j);
            for (int l = 0; l < 4; ++l)
                grid_codes8(grid, w, sb[2 + 8 * j + 2 * l], sb[2 + 8 * j + 2 * l + 1],
                            even_signs((aux >> (7 * l)) & 127), out.code + 8 * l);
            out.t0[0] = static_cast<uint8_t>(2 * (aux >> 28) + 1);
            return;
        }
        case IQ3_S: {
            for (int l = 0; l < 4; ++l) {
                const int t = 2 * l;  // the group's two quads, 4 weights each
                const uint32_t gi = sb[2 + 8 * j + t] | (((sb[66 + j] >> t) & 1) << 8);
                const uint32_t gi2 = sb[2 + 8 * j + t + 1] | (((sb[66 + j] >> (t + 1)) & 1) << 8);
                grid_codes8(grid, w, gi, gi2, sb[74 + 4 * j + l], out.code + 8 * l);
            }
            out.t0[0] = static_cast<uint8_t>(2 * ((sb[106 + j / 2] >> (4 * (j % 2))) & 15) + 1);
            return;
        }
        case IQ1_S: {  // 8 * (grid value + delta), delta = +-1/8 per sub-block
            const uint16_t h = u16(sb + 34 + 2 * j);
            for (int l = 0; l < 4; ++l)
                iq1_codes8(grid, sb[2 + 4 * j + l] | (((h >> (3 * l)) & 7) << 8), h & 0x8000, out.code + 8 * l);
            out.t0[0] = static_cast<uint8_t>(2 * ((h >> 12) & 7) + 1);
            return;
        }
        default: {  // IQ1_M: a delta per 8 weights, a 3-bit scale per 16 (d is spread over the scales' top nibbles)
            for (int l = 0; l < 4; ++l) {
                const int g = 4 * j + l;
                const uint8_t h = static_cast<uint8_t>(sb[32 + g / 2] >> (4 * (g % 2)));
                iq1_codes8(grid, sb[g] | ((h & 7u) << 8), h & 8, out.code + 8 * l);
            }
            for (int hf = 0; hf < 2; ++hf) {
                const int t = 2 * j + hf;
                out.t0[hf] = static_cast<uint8_t>(2 * ((u16(sb + 48 + 2 * (t / 4)) >> (3 * (t % 4))) & 7) + 1);
            }
            return;
        }
    }
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


// Block b (32 columns) of a row whose file bytes start at `row`.
// (grid: the lattice kinds' grid, null for the others)
inline void decode_block(int kind, const uint8_t* row, int64_t b, Block& out, const uint8_t* grid = nullptr) {
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
    if (lattice(kind)) {
        decode_lattice(kind, sb, j, grid, out);
        return;
    }
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

// One row's block as its fields: fp16 types d (and m) as floats; K-quants and IQ4_XS the block's byte fields as the
// layout keeps them (b0: sc, the first half's scale, or Q2_K's scale | min << 4 byte; b1: mn, or the second half's)
// and the super-block's d and dmin.
struct BlockFields {
    float d = 0.f, m = 0.f;
    uint8_t b0 = 0, b1 = 0;
    float sd = 0.f, sdmin = 0.f;
};

// The block's 32 weights from its codes (the layout's values: high bits merged, Q8_0 and IQ4 as stored) in gguf-py's
// fp32 order of operations: d * q + m, (d * sc) * q - dmin * mn, d * (q - offset), d * table[q], so a dense table
// made by gguf-py and these values are the same bits.
inline void block_values(int kd, const int* q, const BlockFields& f, float* out) {
    auto scale = [&](uint8_t b) {
        return static_cast<float>(signed_scales(kd) ? static_cast<int>(static_cast<int8_t>(b)) : static_cast<int>(b));
    };
    if (kd == Q8_0) {
        for (int j = 0; j < kBlock; ++j) out[j] = f.d * static_cast<float>(q[j]) + -128.f * f.d;
        return;
    }
    // the table kinds' power-of-two factor, applied last (exact)
    const float kmul = 1.f / static_cast<float>(1 << lut_shift(kd));
    if (split_halves(kd)) {
        for (int hf = 0; hf < 2; ++hf) {
            const uint8_t sb = hf ? f.b1 : f.b0;
            const float ds = f.sd * (kd == Q2_K ? static_cast<float>(sb & 15) : scale(sb));
            const float mn = kd == Q2_K ? f.sdmin * static_cast<float>(sb >> 4) : 0.f;
            for (int j = 0; j < 16; ++j) {
                const int c = q[16 * hf + j];
                if (lut(kd)) {
                    out[16 * hf + j] = ds * static_cast<float>(lut_values(kd)[c]) * kmul;
                    continue;
                }
                const float w = ds * static_cast<float>(c - code_offset(kd));
                out[16 * hf + j] = has_min(kd) ? w - mn : w;
            }
        }
        return;
    }
    if (lut(kd)) {
        const float d = super_fields(kd) ? f.sd * scale(f.b0) : f.d;
        for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(lut_values(kd)[q[j]]) * kmul;
        return;
    }
    float d, c;
    if (super_fields(kd) == 2) {
        d = f.sd * scale(f.b0);
        c = -(f.sdmin * static_cast<float>(f.b1));
    } else {
        d = f.d;
        c = has_m(kd) ? f.m : -static_cast<float>(code_offset(kd)) * d;
    }
    for (int j = 0; j < kBlock; ++j) out[j] = d * static_cast<float>(q[j]) + c;
}

}  // namespace gguf_kernels
