// Decode attention over a quantized paged KV cache (the formats of exllamav2/ops/torch_ref/kv_quant.py, stored by
// cache_q.py): one new token per sequence, each sequence over its own keys through its block table row, as
// `exllamav2::quant_paged_decode_attention` (ops/torch_ref/attention_quant.py) computes, without dequantising any
// key or value row. Python side: exllamav2/ops/cpu/attention.py (`quant_paged_decode`).
//
// Group formats (q4, q8) store r = H x per group of 32 values (H the unnormalised Walsh-Hadamard matrix, symmetric,
// H H = 32 I) as r ~ s (c - off). So q . x = (H q / 32) . r: the query is rotated once per head, and a score is
// sum over groups of s * (q' . c - off * sum(q')); the output is H u / 32 with u = sum over keys of p s (c - off),
// rotated once. FP8 (e5m2) codes are the top byte of an fp16: no scale, no rotation. Scores, softmax and sums in
// fp32; a key's codes are decoded once for the G query heads that share its kv head; the output is rounded once
// to q's dtype. Against the reference, which rounds each dequantised key and value to the activation dtype first,
// results differ by about that rounding (tests/test_cpu_quant_attention.py). A task is one (sequence, kv head,
// split of kSplitKeys keys at fixed positions); a second pass merges each (sequence, kv head)'s splits in order,
// so a sequence's result depends on neither the thread count nor the other sequences in the call.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "avx512_math.h"
#include "kv_formats.h"

namespace {

using namespace kv_formats;
constexpr int kMaxD = 256;

// One code row's 16 values starting at position 16 * part of group g, as fp32 lanes in the order the query and
// the accumulators are kept: q4 lanes hold bytes (lane i: positions 2i (low nibble) and 2i + 1 (high) of the
// group), so a group is (low nibbles, high nibbles) = two vectors; q8 and fp8 lanes hold positions in order.
struct Codes {
    int64_t fmt;
    int off;  // the stored offset (q4: 8, q8: 128; fp8: none)

    // group g's two vectors of 16 (a: first, b: second) for the code row at p
    AVX512_TARGET inline void load(const uint8_t* p, int g, __m512* a, __m512* b) const {
        if (fmt == FMT_Q4) {
            const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16 * g)));
            *a = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, _mm512_set1_epi32(15)));
            *b = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
        } else if (fmt == FMT_Q8) {
            const __m128i* q8 = reinterpret_cast<const __m128i*>(p + 32 * g);
            *a = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(q8)));
            *b = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(q8 + 1)));
        } else {  // e5m2 is the high byte of an fp16
            const __m512i lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 * g)));
            const __m512i hi =
                _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 * g + 16)));
            *a = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_slli_epi32(lo, 8)));
            *b = _mm512_cvtph_ps(_mm512_cvtepi32_epi16(_mm512_slli_epi32(hi, 8)));
        }
    }
    bool rotated() const { return fmt != FMT_FP8; }
};

constexpr int64_t kPrefetch = 16;  // keys ahead
constexpr int64_t kSplitKeys = 256;  // keys per task, at fixed positions

inline int64_t code_bytes(const Codes& c, int64_t D) { return c.fmt == FMT_Q4 ? D / 2 : D; }

inline void prefetch_row(const uint8_t* p, int64_t bytes) {
    for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

// a group's 32 values in the lane order of Codes::load (q4: even positions, then odd), from position order
inline void to_lanes(const Codes& c, const float* x, float* lanes) {
    for (int i = 0; i < kGroup; ++i)
        lanes[i] = c.fmt == FMT_Q4 ? x[i < 16 ? 2 * i : 2 * (i - 16) + 1] : x[i];
}

inline void from_lanes(const Codes& c, const float* lanes, float* x) {
    for (int i = 0; i < kGroup; ++i)
        x[c.fmt == FMT_Q4 ? (i < 16 ? 2 * i : 2 * (i - 16) + 1) : i] = lanes[i];
}

struct Problem {
    const void* q;
    at::ScalarType qt;
    int64_t q_sb, q_sh;  // strides of q (B, hq, d); the last is 1
    const uint8_t *kc, *vc;
    int64_t kc_ss, kc_sh, vc_ss, vc_sh;  // strides of the codes (slots, hk, width)
    const void *ks, *vs;                 // scales (slots, hk, d / 32) or null
    at::ScalarType kst, vst;
    int64_t ks_ss, ks_sh, vs_ss, vs_sh;
    Codes kf, vf;
    const int64_t* table;
    int64_t pages, page_size;
    const int64_t* lens;
    int64_t window, G, D, HK;
    float scale, softcap;
    void* out;
    int64_t o_sb, o_sh;
};

struct Scratch {
    std::vector<float> scores;
    std::vector<int64_t> slots;
};

template <typename T>
inline void store_row(void* out, int64_t off, const float* x, int64_t D) {
    T* o = static_cast<T*>(out) + off;
    for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(x[d]);
}

inline void store_any(const Problem& P, int64_t off, const float* x) {
    if (P.qt == at::kFloat) store_row<float>(P.out, off, x, P.D);
    else if (P.qt == at::kBFloat16) store_row<c10::BFloat16>(P.out, off, x, P.D);
    else store_row<c10::Half>(P.out, off, x, P.D);
}

// [sum(a0), sum(a1), sum(a2), sum(a3)]: the horizontal sums of four vectors at once (~10 instructions for four)
AVX512_TARGET inline __m128 sum4(__m512 a0, __m512 a1, __m512 a2, __m512 a3) {
    const __m512 t0 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t1 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512d x = _mm512_castps_pd(t0), y = _mm512_castps_pd(t1);
    __m512 t = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)), _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(1, 0, 3, 2)));
    t = _mm512_add_ps(t, _mm512_shuffle_f32x4(t, t, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm512_castps512_ps128(t);
}

// scores of GN query rows (from g0) for the 4 keys from t0 (nk of them real; the rest repeat key t0 and are
// dropped): per row and key a 16-lane sum over the groups, then four keys' sums at once
template <int GN>
AVX512_TARGET void score_quad(const Problem& P, const float* qr, const float* qsum, int64_t h, const int64_t* slots,
                              int nk, int64_t g0, int64_t t0, int64_t n, float* sc) {
    const int64_t D = P.D, NG = D / kGroup;
    const float koff = static_cast<float>(P.kf.off);
    __m512 acc[GN][4];
    float corr[GN][4];
    for (int g = 0; g < GN; ++g)
        for (int k = 0; k < 4; ++k) acc[g][k] = _mm512_setzero_ps(), corr[g][k] = 0.f;
    for (int64_t gi = 0; gi < NG; ++gi)
        for (int k = 0; k < 4; ++k) {
            const int64_t slot = slots[k < nk ? k : 0];
            __m512 a, c;
            P.kf.load(P.kc + slot * P.kc_ss + h * P.kc_sh, static_cast<int>(gi), &a, &c);
            const float s = P.ks ? load_float(P.ks, P.kst, slot * P.ks_ss + h * P.ks_sh + gi) : 1.f;
            const __m512 sv = _mm512_set1_ps(s);
            for (int g = 0; g < GN; ++g) {
                const float* qg = qr + (g0 + g) * D + gi * kGroup;
                const __m512 d =
                    _mm512_fmadd_ps(_mm512_loadu_ps(qg), a, _mm512_mul_ps(_mm512_loadu_ps(qg + 16), c));
                acc[g][k] = _mm512_fmadd_ps(sv, d, acc[g][k]);
                corr[g][k] += s * koff * qsum[(g0 + g) * NG + gi];
            }
        }
    for (int g = 0; g < GN; ++g) {
        alignas(16) float x[4];
        _mm_store_ps(x, sum4(acc[g][0], acc[g][1], acc[g][2], acc[g][3]));
        for (int k = 0; k < nk; ++k) {
            float v = (x[k] - corr[g][k]) * P.scale;
            if (P.softcap > 0.f) v = P.softcap * std::tanh(v / P.softcap);
            sc[(g0 + g) * n + t0 + k] = v;
        }
    }
}

// u[g][group gi] += p(g, t) s(t, gi) codes(t, gi) over keys [lo, n), GN rows from g0, kept in registers per group
template <int GN>
AVX512_TARGET void value_rows(const Problem& P, const float* sc, int64_t h, const int64_t* slots, int64_t lo,
                              int64_t n, int64_t g0, float* u, float* ws) {
    const int64_t D = P.D, NG = D / kGroup;
    for (int64_t gi = 0; gi < NG; ++gi) {
        __m512 ua[GN], uc[GN];
        float wsum[GN];
        for (int g = 0; g < GN; ++g) ua[g] = uc[g] = _mm512_setzero_ps(), wsum[g] = 0.f;
        for (int64_t t = lo; t < n; ++t) {
            const int64_t slot = slots[t - lo];
            if (gi == 0 && t + kPrefetch < n)
                prefetch_row(P.vc + slots[t + kPrefetch - lo] * P.vc_ss + h * P.vc_sh, code_bytes(P.vf, D));
            __m512 a, c;
            P.vf.load(P.vc + slot * P.vc_ss + h * P.vc_sh, static_cast<int>(gi), &a, &c);
            const float s = P.vs ? load_float(P.vs, P.vst, slot * P.vs_ss + h * P.vs_sh + gi) : 1.f;
            for (int g = 0; g < GN; ++g) {
                const float ps = sc[(g0 + g) * n + t] * s;
                const __m512 pv = _mm512_set1_ps(ps);
                ua[g] = _mm512_fmadd_ps(pv, a, ua[g]);
                uc[g] = _mm512_fmadd_ps(pv, c, uc[g]);
                wsum[g] += ps;
            }
        }
        for (int g = 0; g < GN; ++g) {
            _mm512_storeu_ps(u + (g0 + g) * D + gi * kGroup, ua[g]);
            _mm512_storeu_ps(u + (g0 + g) * D + gi * kGroup + 16, uc[g]);
            ws[(g0 + g) * NG + gi] = wsum[g];
        }
    }
}

// The query rows of (b, h), rotated per group (H q / 32) for a rotated key format, in the key codes' lane order,
// and each group's sum of them.
void rotated_query(const Problem& P, int64_t b, int64_t h, float* qr, float* qsum) {
    const int64_t G = P.G, D = P.D, NG = D / kGroup;
    alignas(64) float tmp[kGroup];
    for (int64_t g = 0; g < G; ++g) {
        const int64_t qoff = b * P.q_sb + (h * G + g) * P.q_sh;
        for (int64_t gi = 0; gi < NG; ++gi) {
            for (int i = 0; i < kGroup; ++i) tmp[i] = load_float(P.q, P.qt, qoff + gi * kGroup + i);
            float s = 0.f;
            if (P.kf.rotated()) {
                hadamard32(tmp);
                for (int i = 0; i < kGroup; ++i) tmp[i] *= 1.f / kGroup;
            }
            for (int i = 0; i < kGroup; ++i) s += tmp[i];
            to_lanes(P.kf, tmp, qr + g * D + gi * kGroup);
            qsum[g * NG + gi] = s;
        }
    }
}

// Per split, per query row: its max score m, sum of exp(score - m) l, the weighted sums of the values' scaled
// codes u (D, lane order) and of their scales ws (NG); `Partial` points into the call's buffer.
struct Partial {
    float* m;   // (G)
    float* l;   // (G)
    float* u;   // (G, D)
    float* ws;  // (G, NG)
};

// One split of (b, h)'s keys, [t_lo, t_hi) (not empty): its partial sums for the G query rows, whose rotated
// values and group sums (rotated_query) are qr and qsum.
AVX512_TARGET void split_task(const Problem& P, int64_t b, int64_t h, int64_t t_lo, int64_t t_hi, const float* qr,
                              const float* qsum, Partial out, Scratch& w) {
    const int64_t G = P.G, D = P.D, n = t_hi - t_lo;
    w.scores.resize(G * n);
    float* sc = w.scores.data();
    const int64_t* row = P.table + b * P.pages;
    w.slots.resize(n);
    int64_t* slots = w.slots.data();
    for (int64_t t = 0; t < n; ++t) slots[t] = row[(t_lo + t) / P.page_size] * P.page_size + (t_lo + t) % P.page_size;
    // the scores, four keys at a time (keys indexed from 0 within the split)
    for (int64_t t0 = 0; t0 < n; t0 += 4) {
        const int nk = static_cast<int>(std::min<int64_t>(4, n - t0));
        // the keys kPrefetch ahead into L1: the rows are a few hundred bytes apart, and a cache streamed from
        // memory otherwise waits on each (measured: Q8 codes 2x slower from memory than from L2 without it)
        for (int64_t t = t0 + kPrefetch; t < std::min<int64_t>(t0 + kPrefetch + 4, n); ++t)
            prefetch_row(P.kc + slots[t] * P.kc_ss + h * P.kc_sh, code_bytes(P.kf, D));
        avx512_math::in_fours(G, [&](auto gn, int64_t g0) {
            score_quad<decltype(gn)::value>(P, qr, qsum, h, slots + t0, nk, g0, t0, n, sc);
        });
    }
    // exp(score - m) per row, then the weighted sums of the values' scaled codes
    for (int64_t g = 0; g < G; ++g) {
        float* s = sc + g * n;
        float m = -std::numeric_limits<float>::infinity();
        for (int64_t t = 0; t < n; ++t) m = std::fmax(m, s[t]);
        int64_t t = 0;
        __m512 sum = _mm512_setzero_ps();
        const __m512 mv = _mm512_set1_ps(m);
        for (; t + 16 <= n; t += 16) {
            const __m512 e = avx512_math::exp_ps(_mm512_sub_ps(_mm512_loadu_ps(s + t), mv));
            _mm512_storeu_ps(s + t, e);
            sum = _mm512_add_ps(sum, e);
        }
        float tail = 0.f;
        for (; t < n; ++t) {
            s[t] = std::exp(s[t] - m);
            tail += s[t];
        }
        out.m[g] = m;
        out.l[g] = _mm512_reduce_add_ps(sum) + tail;
    }
    avx512_math::in_fours(G, [&](auto gn, int64_t g0) {
        value_rows<decltype(gn)::value>(P, sc, h, slots, 0, n, g0, out.u, out.ws);
    });
}

// (b, h)'s splits merged in split order (each rescaled to the largest max), the values' offset and rotation
// undone, divided by the softmax's sum, stored in q's dtype.
void merge(const Problem& P, int64_t b, int64_t h, int64_t NS, const Partial* parts) {
    const int64_t G = P.G, D = P.D, NG = D / kGroup;
    const float voff = static_cast<float>(P.vf.off);
    alignas(64) float u[kMaxD], outrow[kMaxD], tmp[kGroup];
    float ws[kMaxD / kGroup];
    for (int64_t g = 0; g < G; ++g) {
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t s = 0; s < NS; ++s) M = std::fmax(M, parts[s].m[g]);
        float L = 0.f;
        for (int64_t d = 0; d < D; ++d) u[d] = 0.f;
        for (int64_t gi = 0; gi < NG; ++gi) ws[gi] = 0.f;
        for (int64_t s = 0; s < NS; ++s) {
            const float c = std::exp(parts[s].m[g] - M);
            L += c * parts[s].l[g];
            for (int64_t d = 0; d < D; ++d) u[d] += c * parts[s].u[g * D + d];
            for (int64_t gi = 0; gi < NG; ++gi) ws[gi] += c * parts[s].ws[g * NG + gi];
        }
        const float inv = 1.f / L;
        for (int64_t gi = 0; gi < NG; ++gi) {
            for (int i = 0; i < kGroup; ++i) tmp[i] = u[gi * kGroup + i] - voff * ws[gi];
            from_lanes(P.vf, tmp, outrow + gi * kGroup);
            if (P.vf.rotated()) {
                hadamard32(outrow + gi * kGroup);
                for (int i = 0; i < kGroup; ++i) outrow[gi * kGroup + i] *= 1.f / kGroup;
            }
        }
        for (int64_t d = 0; d < D; ++d) outrow[d] *= inv;
        store_any(P, b * P.o_sb + (h * G + g) * P.o_sh, outrow);
    }
}

Codes codes_of(int64_t fmt) {
    return {fmt, fmt == FMT_Q4 ? 8 : fmt == FMT_Q8 ? 128 : 0};
}

int64_t code_width(int64_t fmt, int64_t D) { return fmt == FMT_Q4 ? D / 2 : D; }

at::Tensor quant_paged_decode_attention(const at::Tensor& q, const at::Tensor& k_codes,
                                        const std::optional<at::Tensor>& k_scales, const at::Tensor& v_codes,
                                        const std::optional<at::Tensor>& v_scales, int64_t k_fmt, int64_t v_fmt,
                                        const at::Tensor& block_index, const at::Tensor& kv_lens, int64_t page_size,
                                        int64_t sliding_window, double scale, double softcap) {
    const char* op = "exllamav2_cpu::quant_paged_decode_attention";
    TORCH_CHECK(avx512_math::cpu_supported(), op,
                " needs AVX-512 with BF16 (the Python side keeps the reference elsewhere)");
    TORCH_CHECK(k_fmt >= 0 && k_fmt <= 2 && v_fmt >= 0 && v_fmt <= 2, op, ": formats must be 0 (q4), 1 (q8) or "
                "2 (fp8), got ", k_fmt, " and ", v_fmt);
    TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && (q.scalar_type() == at::kFloat ||
                q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf), op,
                ": q must be (B, q_heads, head_dim) float32/bfloat16/float16 with contiguous head_dim, got ",
                q.sizes(), " ", q.scalar_type());
    const int64_t B = q.size(0), HQ = q.size(1), D = q.size(2);
    TORCH_CHECK(D % kGroup == 0 && D <= kMaxD, op, ": head_dim must be a multiple of 32 up to ", kMaxD, ", got ", D);
    for (auto [name, c, fmt] : {std::tuple{"k_codes", &k_codes, k_fmt}, std::tuple{"v_codes", &v_codes, v_fmt}})
        TORCH_CHECK(c->dim() == 3 && c->scalar_type() == at::kByte && c->stride(2) == 1 &&
                    c->size(2) == code_width(fmt, D) && c->size(1) == k_codes.size(1) && c->size(0) == k_codes.size(0),
                    op, ": ", name, " must be uint8 (slots, kv_heads, ", code_width(fmt, D), "), got ", c->sizes(),
                    " ", c->scalar_type());
    const int64_t HK = k_codes.size(1), slots = k_codes.size(0);
    TORCH_CHECK(HK > 0 && HQ % HK == 0, op, ": ", HQ, " query heads are not a multiple of ", HK, " kv heads");
    for (auto [name, s, fmt] : {std::tuple{"k_scales", &k_scales, k_fmt}, std::tuple{"v_scales", &v_scales, v_fmt}}) {
        if (fmt == FMT_FP8) continue;
        TORCH_CHECK(s->has_value() && (*s)->dim() == 3 && (*s)->size(0) == slots && (*s)->size(1) == HK &&
                    (*s)->size(2) == D / kGroup && (*s)->stride(2) == 1 &&
                    ((*s)->scalar_type() == at::kFloat || (*s)->scalar_type() == at::kBFloat16 ||
                     (*s)->scalar_type() == at::kHalf),
                    op, ": ", name, " must be float (slots, kv_heads, ", D / kGroup, ") for a group format");
    }
    TORCH_CHECK(block_index.dim() == 2 && block_index.size(0) == B && block_index.scalar_type() == at::kLong &&
                kv_lens.dim() == 1 && kv_lens.size(0) == B && kv_lens.scalar_type() == at::kLong, op,
                ": block_index must be int64 (", B, ", pages) and kv_lens int64 (", B, ",)");
    TORCH_CHECK(page_size > 0, op, ": page_size must be positive, got ", page_size);
    const at::Tensor table = block_index.contiguous(), lens = kv_lens.contiguous();
    const int64_t pages = table.size(1);
    const int64_t* tp = table.data_ptr<int64_t>();
    const int64_t* lp = lens.data_ptr<int64_t>();
    for (int64_t b = 0; b < B; ++b) {
        TORCH_CHECK(lp[b] >= 0 && lp[b] <= pages * page_size, op, ": kv_lens[", b, "] = ", lp[b], " is outside 0..",
                    pages * page_size);
        for (int64_t p = 0; p < (lp[b] + page_size - 1) / page_size; ++p)
            TORCH_CHECK(tp[b * pages + p] >= 0 && (tp[b * pages + p] + 1) * page_size <= slots, op,
                        ": block_index[", b, ", ", p, "] = ", tp[b * pages + p], " is outside the cache's ",
                        slots / page_size, " pages");
    }
    at::Tensor out = at::empty({B, HQ, D}, q.options());
    if (out.numel() == 0) return out;
    Problem P{};
    P.q = q.data_ptr();
    P.qt = q.scalar_type();
    P.q_sb = q.stride(0);
    P.q_sh = q.stride(1);
    P.kc = k_codes.data_ptr<uint8_t>();
    P.vc = v_codes.data_ptr<uint8_t>();
    P.kc_ss = k_codes.stride(0);
    P.kc_sh = k_codes.stride(1);
    P.vc_ss = v_codes.stride(0);
    P.vc_sh = v_codes.stride(1);
    if (k_fmt != FMT_FP8) {
        P.ks = k_scales->data_ptr();
        P.kst = k_scales->scalar_type();
        P.ks_ss = k_scales->stride(0);
        P.ks_sh = k_scales->stride(1);
    }
    if (v_fmt != FMT_FP8) {
        P.vs = v_scales->data_ptr();
        P.vst = v_scales->scalar_type();
        P.vs_ss = v_scales->stride(0);
        P.vs_sh = v_scales->stride(1);
    }
    P.kf = codes_of(k_fmt);
    P.vf = codes_of(v_fmt);
    P.table = tp;
    P.pages = pages;
    P.page_size = page_size;
    P.lens = lp;
    P.window = sliding_window;
    P.G = HQ / HK;
    P.D = D;
    P.HK = HK;
    P.scale = static_cast<float>(scale);
    P.softcap = static_cast<float>(softcap);
    P.out = out.data_ptr();
    P.o_sb = out.stride(0);
    P.o_sh = out.stride(1);
    // tasks: (b, h, split) over each row's visible keys [lo, n) cut at fixed positions 0, kSplitKeys, ... (so a
    // row's arithmetic depends on neither the thread count nor the other rows), then one merge per (b, h)
    const int64_t G = P.G, NG = D / kGroup, per = G * (2 + D + NG);
    std::vector<int64_t> first(B + 1, 0), lo(B), ns(B);
    for (int64_t b = 0; b < B; ++b) {
        lo[b] = sliding_window > 0 ? std::max<int64_t>(0, lp[b] - sliding_window) : 0;
        ns[b] = lp[b] > lo[b] ? (lp[b] - 1) / kSplitKeys - lo[b] / kSplitKeys + 1 : 0;
        first[b + 1] = first[b] + HK * ns[b];
    }
    const int64_t tasks = first[B];
    std::vector<float> buf(static_cast<size_t>(std::max<int64_t>(tasks, 1) * per));
    // each (b, h)'s query rows rotated once, for all its splits
    const int64_t qper = G * (D + NG);
    std::vector<float> qbuf(static_cast<size_t>(B * HK * qper));
    for (int64_t i = 0; i < B * HK; ++i)
        if (ns[i / HK] > 0) rotated_query(P, i / HK, i % HK, qbuf.data() + i * qper, qbuf.data() + i * qper + G * D);
    auto part = [&](int64_t i) {
        float* p = buf.data() + i * per;
        return Partial{p, p + G, p + 2 * G, p + 2 * G + G * D};
    };
    auto split_work = [&](int64_t i0, int64_t i1) {
        static thread_local Scratch w;
        int64_t b = std::upper_bound(first.begin(), first.end(), i0) - first.begin() - 1;
        for (int64_t i = i0; i < i1; ++i) {
            while (i >= first[b + 1]) ++b;
            const int64_t h = (i - first[b]) / ns[b], s = (i - first[b]) % ns[b];
            const int64_t s0 = lo[b] / kSplitKeys + s;
            const float* q = qbuf.data() + (b * HK + h) * qper;
            split_task(P, b, h, std::max(lo[b], s0 * kSplitKeys), std::min(lp[b], (s0 + 1) * kSplitKeys), q,
                       q + G * D, part(i), w);
        }
    };
    auto merge_work = [&](int64_t i0, int64_t i1) {
        std::vector<Partial> parts;
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t b = i / HK, h = i % HK;
            if (ns[b] == 0) {  // no key visible: NaN, as a fully masked row of the reference
                std::vector<float> nan(D, std::numeric_limits<float>::quiet_NaN());
                for (int64_t g = 0; g < G; ++g) store_any(P, b * P.o_sb + (h * G + g) * P.o_sh, nan.data());
                continue;
            }
            parts.clear();
            for (int64_t s = 0; s < ns[b]; ++s) parts.push_back(part(first[b] + h * ns[b] + s));
            merge(P, b, h, ns[b], parts.data());
        }
    };
    int64_t keys = 0;
    for (int64_t b = 0; b < B; ++b) keys += lp[b];
    if (keys * HQ * D < (1 << 16) || tasks <= 1) {
        split_work(0, tasks);
        merge_work(0, B * HK);
    } else {
        at::parallel_for(0, tasks, 1, split_work);
        at::parallel_for(0, B * HK, std::max<int64_t>(1, B * HK / 8), merge_work);
    }
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(exllamav2_cpu, m) {
    m.def("quant_paged_decode_attention(Tensor q, Tensor k_codes, Tensor? k_scales, Tensor v_codes, "
          "Tensor? v_scales, int k_fmt, int v_fmt, Tensor block_index, Tensor kv_lens, int page_size, "
          "int sliding_window, float scale, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(exllamav2_cpu, CPU, m) {
    m.impl("quant_paged_decode_attention", &quant_paged_decode_attention);
}
