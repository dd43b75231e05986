/* intb_neon.c — NEON (aarch64) range functions for int b-bit weights: PLANES and SPARSE
 * (f32, i8). Same semantics as intb.c (the oracle). Only the decoders live here; the per-row
 * drivers (decode a chunk of K once into int8 codes c and signs s, then exact smull + sadalp or
 * sdot sums / fma dots for every activation row) are spfq_neon_rows_{i8,f32} of binary_neon.c.
 *
 * PLANES: u = sum_p bit_p << p, c = u - 2^(b-1). SPARSE: the mask says which columns are
 * nonzero; the kept fields f = (c < 0) | ((|c| - 1) << 1) of a row, in column order, are decoded
 * 64 at a time into a compact window and scattered to their columns with one tbl over 64 bytes
 * per 16 columns (index = rank of the column among the row's set mask bits, 0xFF = zero).
 */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <string.h>

#include "internal.h"

/* From binary_neon.c (declared there; would belong in internal.h). */
#define CHUNK 1024
typedef void (*spfq_neon_decode_fn)(const struct spfq_prepared *p, int32_t n, int32_t w0,
                                    int32_t nw, int8_t *c, int8_t *s, uint8_t *live,
                                    int32_t *cursor);
void spfq_neon_rows_i8(const spfq_job *j, int32_t n0, int32_t n1, spfq_neon_decode_fn decode);
void spfq_neon_rows_f32(const spfq_job *j, int32_t n0, int32_t n1, spfq_neon_decode_fn decode, int two);

static const uint8_t k_bytes[64] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                    2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
                                    4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
                                    6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7};
static const uint8_t k_bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};
static const uint8_t k_below[16] = {0, 1, 3, 7, 15, 31, 63, 127, 0, 1, 3, 7, 15, 31, 63, 127};

static inline uint8x16_t bcast(uint64_t w) { return vreinterpretq_u8_u64(vdupq_n_u64(w)); }

/* sign(c) = (c < 0 ? -1 : 0) - (c > 0 ? -1 : 0) */
static inline int8x16_t sign8(int8x16_t c) {
    return vsubq_s8(vreinterpretq_s8_u8(vcltzq_s8(c)), vreinterpretq_s8_u8(vcgtzq_s8(c)));
}

/* The 64 b-bit fields of word w of a row whose plane p word is planes[p * stride]: out[g]
 * holds fields 16g..16g+15. */
static inline void fields64(const uint64_t *planes, size_t stride, int32_t b, uint8x16_t out[4]) {
    const uint8x16_t bit = vld1q_u8(k_bit);
    const uint8x16_t idx[4] = {vld1q_u8(k_bytes), vld1q_u8(k_bytes + 16), vld1q_u8(k_bytes + 32),
                               vld1q_u8(k_bytes + 48)};
    for (int g = 0; g < 4; g++) out[g] = vdupq_n_u8(0);
    for (int32_t p = 0; p < b; p++) {
        uint8x16_t t = bcast(planes[(size_t)p * stride]), weight = vdupq_n_u8((uint8_t)(1u << p));
        for (int g = 0; g < 4; g++)
            out[g] = vorrq_u8(out[g], vandq_u8(vtstq_u8(vqtbl1q_u8(t, idx[g]), bit), weight));
    }
}

/* ------------------------------------------------------------------ PLANES */

static void decode_planes(const struct spfq_prepared *p, int32_t n, int32_t w0, int32_t nw,
                          int8_t *c, int8_t *s, uint8_t *live, int32_t *cursor) {
    (void)cursor;
    const int32_t W = p->words, b = p->d.bits;
    const size_t stride = (size_t)p->d.n * W; /* plane stride of (b, N, W) */
    const uint64_t *row = p->d.planes + (size_t)n * W + w0;
    const uint8x16_t half = vdupq_n_u8((uint8_t)(1u << (b - 1)));
    for (int32_t w = 0; w < nw; w++) {
        uint8x16_t u[4];
        fields64(row + w, stride, b, u);
        for (int g = 0; g < 4; g++) {
            int8x16_t cv = vreinterpretq_s8_u8(vsubq_u8(u[g], half)); /* u in [1, 2^b - 1] */
            vst1q_s8(c + 64 * w + 16 * g, cv);
            if (s) vst1q_s8(s + 64 * w + 16 * g, sign8(cv));
        }
        live[w] = 1;
    }
}

/* ------------------------------------------------------------------ SPARSE */

static void decode_sparse(const struct spfq_prepared *p, int32_t n, int32_t w0, int32_t nw,
                          int8_t *c, int8_t *s, uint8_t *live, int32_t *cursor) {
    const int32_t W = p->words, b = p->d.bits, Wk = p->d.kept_words;
    const uint64_t *mk = p->d.mask + (size_t)n * W + w0;
    int32_t nnz = 0;
    for (int32_t w = 0; w < nw; w++) {
        live[w] = mk[w] != 0;
        nnz += __builtin_popcountll(mk[w]);
    }
    if (!nnz) return;

    /* Codes of kept fields [r0, r0 + nnz) into win, starting at window offset q. The window
     * holds whole kept words j0..j1-1 plus 64 zero bytes so a 64-byte table load from any
     * rank inside it stays in bounds. */
    int8_t win[CHUNK + 64 + 64];
    const int32_t r0 = *cursor, j0 = r0 / 64;
    int32_t j1 = (r0 + nnz + 63) / 64;
    if (j1 > Wk) j1 = Wk; /* more mask bits than kept fields: malformed; never read past kept */
    const size_t stride = (size_t)p->d.n * Wk;
    const uint64_t *kept = p->d.planes + (size_t)n * Wk;
    const uint8x16_t one = vdupq_n_u8(1);
    int32_t filled = 0;
    for (int32_t jw = j0; jw < j1; jw++, filled += 64) {
        uint8x16_t f[4];
        fields64(kept + jw, stride, b, f);
        for (int g = 0; g < 4; g++) {
            uint8x16_t mag = vaddq_u8(vshrq_n_u8(f[g], 1), one);  /* |c| */
            uint8x16_t neg = vreinterpretq_u8_s8(vnegq_s8(vreinterpretq_s8_u8(vandq_u8(f[g], one)))); /* 0 or -1 */
            vst1q_s8(win + filled + 16 * g, vreinterpretq_s8_u8(vsubq_u8(veorq_u8(mag, neg), neg)));
        }
    }
    memset(win + filled, 0, (size_t)(CHUNK + 128 - filled));

    const uint8x16_t bit = vld1q_u8(k_bit), below = vld1q_u8(k_below);
    int32_t q = r0 - j0 * 64;
    for (int32_t w = 0; w < nw; w++) {
        const uint64_t m = mk[w];
        if (!m) continue;
        /* rank of the first set bit of each byte: byte popcounts, prefix-summed by a multiply */
        const uint64_t pc = vget_lane_u64(vreinterpret_u64_u8(vcnt_u8(vcreate_u8(m))), 0);
        const uint64_t incl = pc * 0x0101010101010101ull, excl = incl - pc;
        const uint8x16_t tm = bcast(m), te = bcast(excl);
        int8x16x4_t tab;
        tab.val[0] = vld1q_s8(win + q);
        tab.val[1] = vld1q_s8(win + q + 16);
        tab.val[2] = vld1q_s8(win + q + 32);
        tab.val[3] = vld1q_s8(win + q + 48);
        for (int g = 0; g < 4; g++) {
            const uint8x16_t idx = vld1q_u8(k_bytes + 16 * g);
            const uint8x16_t bytes = vqtbl1q_u8(tm, idx);
            const uint8x16_t rank = vaddq_u8(vqtbl1q_u8(te, idx), vcntq_u8(vandq_u8(bytes, below)));
            const uint8x16_t sel = vorrq_u8(rank, vmvnq_u8(vtstq_u8(bytes, bit))); /* 0xFF -> 0 */
            const int8x16_t cv = vqtbl4q_s8(tab, sel);
            vst1q_s8(c + 64 * w + 16 * g, cv);
            if (s) vst1q_s8(s + 64 * w + 16 * g, sign8(cv));
        }
        q += (int32_t)(incl >> 56);
    }
    *cursor = r0 + nnz;
}

void spfq_planes_f32_neon(const spfq_job *j, int32_t n0, int32_t n1) { spfq_neon_rows_f32(j, n0, n1, decode_planes, 1); }
void spfq_planes_i8_neon(const spfq_job *j, int32_t n0, int32_t n1) { spfq_neon_rows_i8(j, n0, n1, decode_planes); }
void spfq_sparse_f32_neon(const spfq_job *j, int32_t n0, int32_t n1) { spfq_neon_rows_f32(j, n0, n1, decode_sparse, 1); }
void spfq_sparse_i8_neon(const spfq_job *j, int32_t n0, int32_t n1) { spfq_neon_rows_i8(j, n0, n1, decode_sparse); }

#else
typedef int spfq_intb_neon_not_built; /* not aarch64: nothing to compile */
#endif /* __aarch64__ */
