/* binary.c — portable C range functions for SIGN / SIGN_MASK weights and XNOR/popcount bgemm.
 *
 * These are the semantic oracle of the binary family: one output at a time, one bit at a time,
 * written to be obviously right rather than fast (the AVX2 / NEON files must agree with them:
 * bit-exact for the integer kernels, within float summation order for the f32 ones).
 *
 * Bit layout (spfq_deploy/pack/bits.py): row n of a (N, W) buffer starts at word n * W; weight
 * k of the row is bit k % 64 of word k / 64; padding bits (k >= K) are zero.
 *   SIGN:      s_nk = sign bit ? -1 : +1
 *   SIGN_MASK: s_nk = mask bit ? (sign bit ? -1 : +1) : 0   (a sign bit under a zero mask bit
 *              is ignored, so a stray sign bit can never change a result)
 * Weight value of a nonzero code (|c| = 1): value = s_nk * scale[n] (one-level layouts: lam is
 * ignored, see spfq_kernels.h).
 *
 *   f32:   y[m,n]     = level[n] * sum_k x[m,k] * s_nk + bias[n]      (float accumulation)
 *   i8:    acc_s[m,n] = sum_k xq[m,k] * s_nk  (exact int32; also into acc_c when non-NULL)
 *   bgemm: dot[m,n]   = K - 2 * popcount(xbits[m] XOR sign[n])        (exact int32)
 */
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

static inline int bit_at(const uint64_t *row, int32_t k) {
    return (int)((row[k >> 6] >> (k & 63)) & 1u);
}

/* s_nk in {-1, 0, +1}; mask == NULL means SIGN (every weight nonzero). */
static inline int weight_sign(const uint64_t *srow, const uint64_t *mrow, int32_t k) {
    if (mrow && !bit_at(mrow, k)) return 0;
    return bit_at(srow, k) ? -1 : 1;
}

static inline int popcount64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return __builtin_popcountll(v);
#else
    v = v - ((v >> 1) & 0x5555555555555555ull);
    v = (v & 0x3333333333333333ull) + ((v >> 2) & 0x3333333333333333ull);
    v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0full;
    return (int)((v * 0x0101010101010101ull) >> 56);
#endif
}

static void f32_range(const spfq_job *j, int32_t n0, int32_t n1, int with_mask) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words;
    for (int32_t m = 0; m < j->m; m++) {
        const float *x = j->x + (size_t)m * K;
        for (int32_t n = n0; n < n1; n++) {
            const uint64_t *srow = d->sign + (size_t)n * W;
            const uint64_t *mrow = with_mask ? d->mask + (size_t)n * W : NULL;
            float acc = 0.0f;
            for (int32_t k = 0; k < K; k++) {
                int s = weight_sign(srow, mrow, k);
                if (s > 0) acc += x[k];
                else if (s < 0) acc -= x[k];
            }
            float level = d->scale[n];
            j->y[(size_t)m * N + n] = level * acc + (d->bias ? d->bias[n] : 0.0f);
        }
    }
}

static void i8_range(const spfq_job *j, int32_t n0, int32_t n1, int with_mask) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words;
    for (int32_t m = 0; m < j->m; m++) {
        const int8_t *x = j->xq + (size_t)m * K;
        for (int32_t n = n0; n < n1; n++) {
            const uint64_t *srow = d->sign + (size_t)n * W;
            const uint64_t *mrow = with_mask ? d->mask + (size_t)n * W : NULL;
            int32_t acc = 0;
            for (int32_t k = 0; k < K; k++) acc += (int32_t)x[k] * weight_sign(srow, mrow, k);
            size_t i = (size_t)m * N + n;
            j->acc_s[i] = acc;
            if (j->acc_c) j->acc_c[i] = acc;
        }
    }
}

void spfq_sign_f32_c(const spfq_job *j, int32_t n0, int32_t n1) { f32_range(j, n0, n1, 0); }
void spfq_sign_mask_f32_c(const spfq_job *j, int32_t n0, int32_t n1) { f32_range(j, n0, n1, 1); }
void spfq_sign_i8_c(const spfq_job *j, int32_t n0, int32_t n1) { i8_range(j, n0, n1, 0); }
void spfq_sign_mask_i8_c(const spfq_job *j, int32_t n0, int32_t n1) { i8_range(j, n0, n1, 1); }

void spfq_bgemm_c(const spfq_job *j, int32_t n0, int32_t n1) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words;
    for (int32_t m = 0; m < j->m; m++) {
        const uint64_t *xrow = j->xbits + (size_t)m * W;
        for (int32_t n = n0; n < n1; n++) {
            const uint64_t *wrow = d->sign + (size_t)n * W;
            int32_t pc = 0;
            for (int32_t i = 0; i < W; i++) pc += popcount64(xrow[i] ^ wrow[i]);
            j->dot[(size_t)m * N + n] = K - 2 * pc;
        }
    }
}

/* Signed codes s_nk of row n (K values) for kernels that keep weights unpacked (dwconv.c). */
void spfq_sign_row_codes(const spfq_prepared *w, int32_t n, int8_t *c) {
    const spfq_weights_desc *d = &w->d;
    const uint64_t *srow = d->sign + (size_t)n * w->words;
    const uint64_t *mrow = d->layout == SPFQ_SIGN_MASK ? d->mask + (size_t)n * w->words : NULL;
    for (int32_t k = 0; k < d->k; k++) c[k] = (int8_t)weight_sign(srow, mrow, k);
}
