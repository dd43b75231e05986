/* binary_neon.c — NEON (aarch64) range functions for SIGN and SIGN_MASK weights (f32, i8) and
 * the XNOR/popcount bgemm, plus the row drivers the NEON int-b family (intb_neon.c) shares.
 * Same semantics as binary.c (the oracle): integer results bit-exact, f32 up to summation order.
 * NEON is baseline on aarch64: no target attributes; the whole file is aarch64-only.
 *
 * i8 x SIGN / SIGN_MASK ("transpose + cmtst"): sum_k x_k s_k = sum_{mask} x - 2 sum_{neg} x
 *   (mask = every column for SIGN; neg = sign & mask), so only masked sums of the int8
 *   activations are needed. A chunk of activations is byte-transposed once per 8x8 block (one
 *   tbl per 16 bytes, zero padded past K): then, with a weight word broadcast to 16 bytes, one
 *   cmtst against a constant turns 16 weight bits into 16 byte masks lined up with 16
 *   activations, and and + sadalp accumulate (int16 lanes, widened once per chunk). Up to 4
 *   activation rows share each expansion; all-zero mask words are skipped. ~4 ops per 16 MACs
 *   at M = 1, ~2.5 at M >= 4.
 *
 * Everything else: for each output row n, the bits of a chunk of K (CHUNK columns, whole 64-bit
 * words) are decoded once into int8 codes c (and s = sign(c) for int-b), reused by every
 * activation row m:
 *   i8 (int-b, intb_neon.c): exact int32 sums by smull/smull2 + sadalp (exact for any int8
 *        code), or sdot when compiled for the dot-product extension (__ARM_FEATURE_DOTPROD);
 *   f32: the codes become float weights (c for the sign layouts, times the level at the end;
 *        scale*c + (lam-scale)*s for int-b) and a 4-accumulator fma dot product.
 * bgemm: eor + cnt per pair of words; byte counts summed in u8 and widened late (uadalp).
 * Activations are read only inside [0, K).
 */
#if defined(__aarch64__)

#include <arm_neon.h>
#include <string.h>

#include "internal.h"

/* ------------------------------------------------------------------ shared with intb_neon.c */

/* K columns per chunk: a multiple of 64, and <= 1024 so the int16 lanes of the masked sums
 * (<= 1024 per word) cannot overflow within a chunk. */
#define CHUNK 1024
_Static_assert(CHUNK % 64 == 0 && CHUNK <= 1024, "CHUNK");

/* Decodes words [w0, w0 + nw) of row n: c[i] = code of column 64*w0 + i (and s[i] = sign(c[i])
 * when s != NULL) for every word with live[word] = 1; a word with live = 0 is all zero and its
 * bytes are left unwritten. *cursor starts at 0 for each row (the SPARSE decoder keeps its
 * kept-field position there). */
typedef void (*spfq_neon_decode_fn)(const struct spfq_prepared *p, int32_t n, int32_t w0,
                                    int32_t nw, int8_t *c, int8_t *s, uint8_t *live,
                                    int32_t *cursor);
void spfq_neon_rows_i8(const spfq_job *j, int32_t n0, int32_t n1, spfq_neon_decode_fn decode);
void spfq_neon_rows_f32(const spfq_job *j, int32_t n0, int32_t n1, spfq_neon_decode_fn decode, int two);

/* ------------------------------------------------------------------ dot products */

/* *ac += sum x*c, *as += sum x*s over [0, len), exact for any int8 values. */
static inline void dot2_i8(const int8_t *x, const int8_t *c, const int8_t *s, int32_t len,
                           int32_t *ac, int32_t *as) {
    int32x4_t a0 = vdupq_n_s32(0), a1 = a0, b0 = a0, b1 = a0;
    int32_t i = 0;
    for (; i + 16 <= len; i += 16) {
        int8x16_t xv = vld1q_s8(x + i), cv = vld1q_s8(c + i), sv = vld1q_s8(s + i);
#if defined(__ARM_FEATURE_DOTPROD)
        a0 = vdotq_s32(a0, xv, cv);
        b0 = vdotq_s32(b0, xv, sv);
#else
        a0 = vpadalq_s16(a0, vmull_s8(vget_low_s8(xv), vget_low_s8(cv)));
        a1 = vpadalq_s16(a1, vmull_high_s8(xv, cv));
        b0 = vpadalq_s16(b0, vmull_s8(vget_low_s8(xv), vget_low_s8(sv)));
        b1 = vpadalq_s16(b1, vmull_high_s8(xv, sv));
#endif
    }
    int32_t sc = vaddvq_s32(vaddq_s32(a0, a1)), ss = vaddvq_s32(vaddq_s32(b0, b1));
    for (; i < len; i++) {
        sc += (int32_t)x[i] * c[i];
        ss += (int32_t)x[i] * s[i];
    }
    *ac += sc;
    *as += ss;
}

static inline float dot_f32(const float *x, const float *v, int32_t len) {
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = a0, a2 = a0, a3 = a0;
    int32_t i = 0;
    for (; i + 16 <= len; i += 16) {
        a0 = vfmaq_f32(a0, vld1q_f32(x + i), vld1q_f32(v + i));
        a1 = vfmaq_f32(a1, vld1q_f32(x + i + 4), vld1q_f32(v + i + 4));
        a2 = vfmaq_f32(a2, vld1q_f32(x + i + 8), vld1q_f32(v + i + 8));
        a3 = vfmaq_f32(a3, vld1q_f32(x + i + 12), vld1q_f32(v + i + 12));
    }
    for (; i + 4 <= len; i += 4) a0 = vfmaq_f32(a0, vld1q_f32(x + i), vld1q_f32(v + i));
    float acc = vaddvq_f32(vaddq_f32(vaddq_f32(a0, a1), vaddq_f32(a2, a3)));
    for (; i < len; i++) acc += x[i] * v[i];
    return acc;
}

/* Next run of live words at or after word *i (< nw): columns [*b, *e), clipped to len.
 * Returns 0 when there is none. */
static inline int next_run(const uint8_t *live, int32_t nw, int32_t len, int32_t *i,
                           int32_t *b, int32_t *e) {
    int32_t w = *i;
    while (w < nw && !live[w]) w++;
    if (w >= nw) return 0;
    int32_t end = w;
    while (end < nw && live[end]) end++;
    *i = end;
    *b = w * 64;
    *e = end * 64 < len ? end * 64 : len;
    return 1;
}

/* ------------------------------------------------------------------ row drivers */

/* int32 sums across chunks wrap like the oracle's int64 -> int32 store (no signed overflow). */
static inline int32_t wrap_add(int32_t a, int32_t b) { return (int32_t)((uint32_t)a + (uint32_t)b); }

/* int-b i8: acc_c = sum xq*c, acc_s = sum xq*sign(c), both exact (acc_s skipped when NULL). */
void spfq_neon_rows_i8(const spfq_job *j, int32_t n0, int32_t n1, spfq_neon_decode_fn decode) {
    const struct spfq_prepared *p = j->w;
    const int32_t N = p->d.n, K = p->d.k, M = j->m;
    int8_t c[CHUNK], s[CHUNK];
    uint8_t live[CHUNK / 64];
    for (int32_t n = n0; n < n1; n++) {
        int32_t cursor = 0;
        for (int32_t k0 = 0; k0 < K; k0 += CHUNK) {
            const int32_t len = K - k0 < CHUNK ? K - k0 : CHUNK, nw = (len + 63) / 64;
            decode(p, n, k0 / 64, nw, c, s, live, &cursor);
            for (int32_t m = 0; m < M; m++) {
                const int8_t *x = j->xq + (size_t)m * K + k0;
                const size_t o = (size_t)m * N + n;
                int32_t ac = 0, as = 0, i = 0, b, e; /* chunk sums: |.| <= CHUNK * 128 * 128 */
                while (next_run(live, nw, len, &i, &b, &e)) dot2_i8(x + b, c + b, s + b, e - b, &ac, &as);
                j->acc_c[o] = k0 ? wrap_add(j->acc_c[o], ac) : ac;
                if (j->acc_s) j->acc_s[o] = k0 ? wrap_add(j->acc_s[o], as) : as; /* NULL: not wanted */
            }
        }
    }
}

/* Float weights of 16 codes: two ? scale*c + d*s : c. */
static inline void codes_to_f32(const int8_t *c, const int8_t *s, float scale, float d, float *v) {
    int8x16_t cv = vld1q_s8(c);
    int16x8_t lo = vmovl_s8(vget_low_s8(cv)), hi = vmovl_high_s8(cv);
    float32x4_t f[4] = {vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), vcvtq_f32_s32(vmovl_high_s16(lo)),
                        vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), vcvtq_f32_s32(vmovl_high_s16(hi))};
    if (s) {
        int8x16_t sv = vld1q_s8(s);
        int16x8_t slo = vmovl_s8(vget_low_s8(sv)), shi = vmovl_high_s8(sv);
        float32x4_t g[4] = {vcvtq_f32_s32(vmovl_s16(vget_low_s16(slo))), vcvtq_f32_s32(vmovl_high_s16(slo)),
                            vcvtq_f32_s32(vmovl_s16(vget_low_s16(shi))), vcvtq_f32_s32(vmovl_high_s16(shi))};
        float32x4_t dv = vdupq_n_f32(d);
        for (int q = 0; q < 4; q++) f[q] = vfmaq_f32(vmulq_n_f32(f[q], scale), g[q], dv);
    }
    for (int q = 0; q < 4; q++) vst1q_f32(v + 4 * q, f[q]);
}

/* f32, all layouts: y = sum x * value(c) + bias. value(c) = scale*c + (lam-scale)*sign(c)
 * (two, int-b); for the sign layouts (|c| <= 1) it is c * scale (lam ignored), applied
 * once after the sum as binary.c does. */
void spfq_neon_rows_f32(const spfq_job *j, int32_t n0, int32_t n1, spfq_neon_decode_fn decode, int two) {
    const struct spfq_prepared *p = j->w;
    const int32_t N = p->d.n, K = p->d.k, M = j->m;
    int8_t c[CHUNK], s[CHUNK];
    float v[CHUNK];
    uint8_t live[CHUNK / 64];
    for (int32_t n = n0; n < n1; n++) {
        const float scale = p->d.scale[n], lam = p->d.lam ? p->d.lam[n] : scale, d = lam - scale;
        const float bias = p->d.bias ? p->d.bias[n] : 0.0f;
        int32_t cursor = 0;
        for (int32_t k0 = 0; k0 < K; k0 += CHUNK) {
            const int32_t len = K - k0 < CHUNK ? K - k0 : CHUNK, nw = (len + 63) / 64;
            decode(p, n, k0 / 64, nw, c, two ? s : NULL, live, &cursor);
            for (int32_t w = 0; w < nw; w++)
                if (live[w])
                    for (int32_t q = 0; q < 64; q += 16)
                        codes_to_f32(c + 64 * w + q, two ? s + 64 * w + q : NULL, scale, d, v + 64 * w + q);
            for (int32_t m = 0; m < M; m++) {
                const float *x = j->x + (size_t)m * K + k0;
                float acc = 0.0f;
                int32_t i = 0, b, e;
                while (next_run(live, nw, len, &i, &b, &e)) acc += dot_f32(x + b, v + b, e - b);
                float *y = &j->y[(size_t)m * N + n];
                *y = k0 ? *y + acc : acc;
            }
        }
        for (int32_t m = 0; m < M; m++) {
            float *y = &j->y[(size_t)m * N + n];
            *y = (two ? *y : scale * *y) + bias; /* one-level layouts: level = scale */
        }
    }
}

/* ------------------------------------------------------------------ SIGN / SIGN_MASK decoders (f32) */

/* Lane i of group g (columns 16g..16g+15 of a word) tests bit i%8 of byte 2g + i/8. */
static const uint8_t k_bytes[64] = {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1,
                                    2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
                                    4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5,
                                    6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7};
static const uint8_t k_bit[16] = {1, 2, 4, 8, 16, 32, 64, 128, 1, 2, 4, 8, 16, 32, 64, 128};

static inline uint8x16_t bcast(uint64_t w) { return vreinterpretq_u8_u64(vdupq_n_u64(w)); }

/* 0xFF where bit 16g + i of the word broadcast in t is set */
static inline uint8x16_t expand16(uint8x16_t t, int g) {
    return vtstq_u8(vqtbl1q_u8(t, vld1q_u8(k_bytes + 16 * g)), vld1q_u8(k_bit));
}

/* SIGN: c = bit ? -1 : +1 (0xFF | 1 = -1, 0 | 1 = +1) */
static void decode_sign(const struct spfq_prepared *p, int32_t n, int32_t w0, int32_t nw,
                        int8_t *c, int8_t *s, uint8_t *live, int32_t *cursor) {
    (void)s; (void)cursor;
    const uint64_t *sg = p->d.sign + (size_t)n * p->words + w0;
    const uint8x16_t one = vdupq_n_u8(1);
    for (int32_t w = 0; w < nw; w++) {
        uint8x16_t t = bcast(sg[w]);
        for (int g = 0; g < 4; g++)
            vst1q_s8(c + 64 * w + 16 * g, vreinterpretq_s8_u8(vorrq_u8(expand16(t, g), one)));
        live[w] = 1;
    }
}

/* SIGN_MASK: c = mask ? (sign ? -1 : +1) : 0 (a sign bit under a zero mask bit is ignored) */
static void decode_sign_mask(const struct spfq_prepared *p, int32_t n, int32_t w0, int32_t nw,
                             int8_t *c, int8_t *s, uint8_t *live, int32_t *cursor) {
    (void)s; (void)cursor;
    const uint64_t *sg = p->d.sign + (size_t)n * p->words + w0;
    const uint64_t *mk = p->d.mask + (size_t)n * p->words + w0;
    const uint8x16_t one = vdupq_n_u8(1);
    for (int32_t w = 0; w < nw; w++) {
        const uint64_t m = mk[w];
        live[w] = m != 0;
        if (!m) continue;
        uint8x16_t tm = bcast(m), ts = bcast(sg[w] & m);
        for (int g = 0; g < 4; g++)
            vst1q_s8(c + 64 * w + 16 * g,
                     vreinterpretq_s8_u8(vorrq_u8(vandq_u8(expand16(tm, g), one), expand16(ts, g))));
    }
}

void spfq_sign_f32_neon(const spfq_job *j, int32_t n0, int32_t n1) { spfq_neon_rows_f32(j, n0, n1, decode_sign, 0); }
void spfq_sign_mask_f32_neon(const spfq_job *j, int32_t n0, int32_t n1) { spfq_neon_rows_f32(j, n0, n1, decode_sign_mask, 0); }

/* ------------------------------------------------------------------ i8: transpose + cmtst */

/* xt[64w + 8q + b] = x[64w + 8b + q]: output byte p takes input byte (p % 8) * 8 + p / 8. */
static const uint8_t k_transpose[64] = {
    0, 8, 16, 24, 32, 40, 48, 56, 1, 9, 17, 25, 33, 41, 49, 57,
    2, 10, 18, 26, 34, 42, 50, 58, 3, 11, 19, 27, 35, 43, 51, 59,
    4, 12, 20, 28, 36, 44, 52, 60, 5, 13, 21, 29, 37, 45, 53, 61,
    6, 14, 22, 30, 38, 46, 54, 62, 7, 15, 23, 31, 39, 47, 55, 63};
/* After the transpose, byte 16g + i of a block is column 8(i%8) + 2g + i/8, i.e. bit 2g + i/8
 * of byte i%8 of the weight word: a broadcast word tested against this selects it. */
static const uint8_t k_pick[64] = {1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2,
                                   4, 4, 4, 4, 4, 4, 4, 4, 8, 8, 8, 8, 8, 8, 8, 8,
                                   16, 16, 16, 16, 16, 16, 16, 16, 32, 32, 32, 32, 32, 32, 32, 32,
                                   64, 64, 64, 64, 64, 64, 64, 64, 128, 128, 128, 128, 128, 128, 128, 128};

/* Transposes len (<= CHUNK) activations into xt (whole 64-byte blocks, zeros past len);
 * returns their sum. */
static int32_t transpose_chunk(const int8_t *x, int32_t len, int8_t *xt) {
    const uint8x16_t i0 = vld1q_u8(k_transpose), i1 = vld1q_u8(k_transpose + 16),
                     i2 = vld1q_u8(k_transpose + 32), i3 = vld1q_u8(k_transpose + 48);
    int32x4_t sum = vdupq_n_s32(0);
    for (int32_t k = 0; k < len; k += 64) {
        int8_t tail[64];
        const int8_t *src = x + k;
        if (len - k < 64) { /* last partial block: zero padded copy, never a read past len */
            memset(tail, 0, sizeof tail);
            memcpy(tail, src, (size_t)(len - k));
            src = tail;
        }
        int8x16x4_t t = {{vld1q_s8(src), vld1q_s8(src + 16), vld1q_s8(src + 32), vld1q_s8(src + 48)}};
        vst1q_s8(xt + k, vqtbl4q_s8(t, i0));
        vst1q_s8(xt + k + 16, vqtbl4q_s8(t, i1));
        vst1q_s8(xt + k + 32, vqtbl4q_s8(t, i2));
        vst1q_s8(xt + k + 48, vqtbl4q_s8(t, i3));
        int16x8_t h = vpaddlq_s8(t.val[0]);
        h = vpadalq_s8(h, t.val[1]);
        h = vpadalq_s8(h, t.val[2]);
        h = vpadalq_s8(h, t.val[3]);
        sum = vpadalq_s16(sum, h);
    }
    return vaddvq_s32(sum);
}

/* For R activation rows (xt[r * CHUNK ...], transposed) and one weight row's nw words:
 * neg[r] = sum of x over columns with (sign & mask) set, nz[r] = over columns with mask set
 * (masked only). Each int16 lane gains <= 1024 per word: no overflow within a chunk. */
static inline __attribute__((always_inline)) void masked_sums(const int8_t *xt, const int R, const int masked,
                                                              const uint64_t *sg, const uint64_t *mk,
                                                              int32_t nw, int32_t *neg, int32_t *nz) {
    const uint8x16_t pk[4] = {vld1q_u8(k_pick), vld1q_u8(k_pick + 16), vld1q_u8(k_pick + 32), vld1q_u8(k_pick + 48)};
    int16x8_t an[4], am[4];
    for (int r = 0; r < R; r++) an[r] = am[r] = vdupq_n_s16(0);
    for (int32_t w = 0; w < nw; w++) {
        const uint64_t mw = masked ? mk[w] : ~0ull;
        if (masked && !mw) continue;
        const uint8x16_t tn = bcast(sg[w] & mw), tm = bcast(mw);
        for (int g = 0; g < 4; g++) {
            const int8x16_t sn = vreinterpretq_s8_u8(vtstq_u8(tn, pk[g]));
            const int8x16_t sm = vreinterpretq_s8_u8(vtstq_u8(tm, pk[g]));
            for (int r = 0; r < R; r++) {
                const int8x16_t xv = vld1q_s8(xt + r * CHUNK + 64 * w + 16 * g);
                an[r] = vpadalq_s8(an[r], vandq_s8(xv, sn));
                if (masked) am[r] = vpadalq_s8(am[r], vandq_s8(xv, sm));
            }
        }
    }
    for (int r = 0; r < R; r++) {
        neg[r] = vaddlvq_s16(an[r]);
        if (masked) nz[r] = vaddlvq_s16(am[r]);
    }
}

static void sign_rows_i8(const spfq_job *j, int32_t n0, int32_t n1, const int masked) {
    const struct spfq_prepared *p = j->w;
    const int32_t N = p->d.n, K = p->d.k, W = p->words, M = j->m;
    int8_t xt[4 * CHUNK];
    for (int32_t k0 = 0; k0 < K; k0 += CHUNK) {
        const int32_t len = K - k0 < CHUNK ? K - k0 : CHUNK, nw = (len + 63) / 64, w0 = k0 / 64;
        for (int32_t m0 = 0; m0 < M; m0 += 4) {
            const int R = M - m0 < 4 ? (int)(M - m0) : 4;
            int32_t total[4], neg[4], nz[4];
            for (int r = 0; r < R; r++) total[r] = transpose_chunk(j->xq + (size_t)(m0 + r) * K + k0, len, xt + r * CHUNK);
            for (int32_t n = n0; n < n1; n++) {
                const uint64_t *sg = p->d.sign + (size_t)n * W + w0;
                const uint64_t *mk = masked ? p->d.mask + (size_t)n * W + w0 : NULL;
                if (masked) {
                    switch (R) { /* constant R and masked: one specialised, fully unrolled body each */
                    case 4: masked_sums(xt, 4, 1, sg, mk, nw, neg, nz); break;
                    case 3: masked_sums(xt, 3, 1, sg, mk, nw, neg, nz); break;
                    case 2: masked_sums(xt, 2, 1, sg, mk, nw, neg, nz); break;
                    default: masked_sums(xt, 1, 1, sg, mk, nw, neg, nz); break;
                    }
                } else {
                    switch (R) {
                    case 4: masked_sums(xt, 4, 0, sg, mk, nw, neg, nz); break;
                    case 3: masked_sums(xt, 3, 0, sg, mk, nw, neg, nz); break;
                    case 2: masked_sums(xt, 2, 0, sg, mk, nw, neg, nz); break;
                    default: masked_sums(xt, 1, 0, sg, mk, nw, neg, nz); break;
                    }
                }
                for (int r = 0; r < R; r++) {
                    const size_t o = (size_t)(m0 + r) * N + n;
                    const int32_t part = (masked ? nz[r] : total[r]) - 2 * neg[r];
                    j->acc_s[o] = k0 ? wrap_add(j->acc_s[o], part) : part;
                }
            }
        }
    }
    if (j->acc_c)
        for (int32_t m = 0; m < M; m++)
            memcpy(j->acc_c + (size_t)m * N + n0, j->acc_s + (size_t)m * N + n0, (size_t)(n1 - n0) * sizeof(int32_t));
}

void spfq_sign_i8_neon(const spfq_job *j, int32_t n0, int32_t n1) { sign_rows_i8(j, n0, n1, 0); }
void spfq_sign_mask_i8_neon(const spfq_job *j, int32_t n0, int32_t n1) { sign_rows_i8(j, n0, n1, 1); }

/* ------------------------------------------------------------------ XNOR / popcount */

/* popcount(a XOR b) over W words. Per 8 words, four cnt vectors are summed in u8 (<= 32 per
 * lane) and widened once with uadalp (<= 64 per u16 lane per round), flushed to u32 every
 * 512 rounds. */
static inline uint32_t xor_popcount(const uint64_t *a, const uint64_t *b, int32_t W) {
    uint32x4_t acc32 = vdupq_n_u32(0);
    int32_t i = 0;
    while (i + 8 <= W) {
        uint16x8_t acc16 = vdupq_n_u16(0);
        for (int32_t r = 0; r < 512 && i + 8 <= W; r++, i += 8) {
            uint8x16_t c0 = vcntq_u8(vreinterpretq_u8_u64(veorq_u64(vld1q_u64(a + i), vld1q_u64(b + i))));
            uint8x16_t c1 = vcntq_u8(vreinterpretq_u8_u64(veorq_u64(vld1q_u64(a + i + 2), vld1q_u64(b + i + 2))));
            uint8x16_t c2 = vcntq_u8(vreinterpretq_u8_u64(veorq_u64(vld1q_u64(a + i + 4), vld1q_u64(b + i + 4))));
            uint8x16_t c3 = vcntq_u8(vreinterpretq_u8_u64(veorq_u64(vld1q_u64(a + i + 6), vld1q_u64(b + i + 6))));
            acc16 = vpadalq_u8(acc16, vaddq_u8(vaddq_u8(c0, c1), vaddq_u8(c2, c3)));
        }
        acc32 = vpadalq_u16(acc32, acc16);
    }
    uint16x8_t acc16 = vdupq_n_u16(0);
    for (; i + 2 <= W; i += 2)
        acc16 = vpadalq_u8(acc16, vcntq_u8(vreinterpretq_u8_u64(veorq_u64(vld1q_u64(a + i), vld1q_u64(b + i)))));
    if (i < W) acc16 = vaddw_u8(acc16, vcnt_u8(vcreate_u8(a[i] ^ b[i])));
    acc32 = vpadalq_u16(acc32, acc16);
    return vaddvq_u32(acc32);
}

void spfq_bgemm_neon(const spfq_job *j, int32_t n0, int32_t n1) {
    const struct spfq_prepared *p = j->w;
    const int32_t N = p->d.n, K = p->d.k, W = p->words, M = j->m;
    for (int32_t n = n0; n < n1; n++) {
        const uint64_t *w = p->d.sign + (size_t)n * W;
        for (int32_t m = 0; m < M; m++)
            j->dot[(size_t)m * N + n] = K - 2 * (int32_t)xor_popcount(j->xbits + (size_t)m * W, w, W);
    }
}

#else
typedef int spfq_binary_neon_not_built; /* not aarch64: nothing to compile */
#endif /* __aarch64__ */
