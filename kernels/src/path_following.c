/* path_following.c — the column loop of Gram-form path following (compression time, not
 * inference): spfq_path_following_block.
 *
 * spfq_deploy/compress/path_following.py computes, per row (candidate c, group g, neuron i),
 *     z_t = (A_t - corr_t) / H_tt,  q_t = T(z_t),  corr_j += q_t * H_tj  (t < j < b1)
 * one column t at a time inside a block [b0, b1) of columns; the part of corr coming from
 * the columns before b0 is one matmul per block that stays in torch. In Python each column
 * costs ~20 tensor operations on a (c, g, n) slice, so the loop was dominated by interpreter
 * overhead; here it runs per row in C, rows split over the worker pool.
 *
 * Bit-exact with the Python reference (tests/test_path_following_native.py): the same IEEE
 * double operations in the same order, no fused multiply-add (the library is built in ISO C
 * mode, where GCC does not contract a*b+c), no reciprocal tricks. T is alphabet.quantize:
 * SPFQ_PF_IDENTITY (q = z, no codes; order-r alignment), SPFQ_PF_NEAREST, SPFQ_PF_STOCHASTIC
 * (uniforms U), on the alphabet {0 if has_zero} U +-{lam + j * delta : j < levels}, lam and
 * delta per row, or per (row, column) when per_column (group-wise scales, --group-size).
 * Rows are independent, so the result does not depend on the thread count. Optionally the
 * kernel also sums q'Hq per row (qhq), from the corrections it already has, so the caller's
 * output error needs no (Q @ H) matmul.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#include "internal.h"

typedef struct {
    const spfq_pf_desc *p;
    int32_t b0, b1;
    double *corr;
    int64_t rows;
} pf_task;

/* alphabet.quantize for one value: the signed level index of z. */
static int8_t pf_code(const spfq_pf_desc *p, double z, double lam, double delta, double u) {
    const double tiny = 1e-30;
    if (!p->has_zero) {
        int pos;
        if (p->mode == SPFQ_PF_STOCHASTIC) {
            double pp = (1.0 + z / (lam > tiny ? lam : tiny)) * 0.5;
            pp = pp < 0.0 ? 0.0 : (pp > 1.0 ? 1.0 : pp);
            pos = u < pp;
        } else {
            pos = z >= 0.0;
        }
        return pos ? 1 : -1;
    }
    double a = fabs(z), K = (double)p->levels;
    double safe_lam = lam > tiny ? lam : tiny;
    double pos;
    if (p->levels == 1)
        pos = a / safe_lam;
    else
        pos = a < lam ? a / safe_lam : 1.0 + (a - lam) / (delta > tiny ? delta : tiny);
    if (!(lam > 0.0)) pos = 0.0;
    pos = pos < 0.0 ? 0.0 : (pos > K ? K : pos);
    double lo = floor(pos), frac = pos - lo;
    int up = p->mode == SPFQ_PF_STOCHASTIC ? (u < frac) : (frac >= 0.5);
    double level = lo + (double)up;
    if (level > K) level = K;
    double sign = z < 0.0 ? -1.0 : 1.0;
    return (int8_t)(sign * level);
}

/* alphabet.Alphabet.values for one code. */
static double pf_value(int8_t code, double lam, double delta) {
    double s = code > 0 ? 1.0 : (code < 0 ? -1.0 : 0.0);
    double m = fabs((double)code) - 1.0;
    if (m < 0.0) m = 0.0;
    return s * (lam + m * delta);
}

#define PF_TILE 4 /* rows updated together: each H element loaded once serves PF_TILE rows */

/* One tile of up to PF_TILE rows of one group over columns [b0, b1). Missing rows of a short
 * tile run on a scratch row with q = 0. The update loop over j vectorises (separate mul and
 * add: exact); target_clones builds it for AVX-512, AVX2 and the baseline. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
static void pf_tile(const spfq_pf_desc *p, const pf_task *t, int64_t r, int32_t nt, double *scratch) {
    const int64_t d = p->d, per_group = p->rows, G = p->groups;
    const int32_t b0 = t->b0, b1 = t->b1, bs = b1 - b0;
    const int64_t gi = (r / per_group) % G;
    const double *H = p->H + gi * d * d, *inv = p->inv + gi * d;
    const double *A[PF_TILE], *U[PF_TILE];
    double lam[PF_TILE], delta[PF_TILE], *corr[PF_TILE], *Q[PF_TILE], *qhq[PF_TILE], sink[PF_TILE];
    const double *lam_c[PF_TILE], *delta_c[PF_TILE]; /* per_column: the row's (d) lam and delta */
    int8_t *codes[PF_TILE];
    for (int32_t k = 0; k < PF_TILE; k++) {
        int64_t rr = r + (k < nt ? k : 0), wrow = rr % (G * per_group);  /* (g, n) row of A and U */
        A[k] = p->A + wrow * d;
        U[k] = p->U ? p->U + wrow * d : NULL;
        lam_c[k] = p->per_column && p->lam ? p->lam + rr * d : NULL;
        delta_c[k] = p->per_column && p->delta ? p->delta + rr * d : NULL;
        lam[k] = p->lam && !p->per_column ? p->lam[rr] : 0.0;
        delta[k] = p->delta && !p->per_column ? p->delta[rr] : 0.0;
        corr[k] = k < nt ? t->corr + rr * bs : scratch;
        Q[k] = p->Q + rr * d;
        codes[k] = p->codes ? p->codes + rr * d : NULL;
        qhq[k] = p->qhq && k < nt ? p->qhq + rr : sink + k;
    }
    double *restrict c0 = corr[0], *restrict c1 = corr[1], *restrict c2 = corr[2], *restrict c3 = corr[3];
    for (int32_t c = b0; c < b1; c++) {
        const double *Hc = H + (int64_t)c * d;
        double q[PF_TILE];
        for (int32_t k = 0; k < PF_TILE; k++) {
            double cc = corr[k][c - b0];
            double z = (A[k][c] - cc) * inv[c];
            if (k >= nt) {
                q[k] = 0.0;
                continue;
            }
            if (p->mode == SPFQ_PF_IDENTITY) {
                q[k] = z;
            } else {
                if (lam_c[k]) {
                    lam[k] = lam_c[k][c];
                    delta[k] = delta_c[k][c];
                }
                int8_t code = pf_code(p, z, lam[k], delta[k], U[k] ? U[k][c] : 0.0);
                codes[k][c] = code;
                q[k] = pf_value(code, lam[k], delta[k]);
            }
            Q[k][c] = q[k];
            *qhq[k] += q[k] * (2.0 * cc + Hc[c] * q[k]);  /* q'Hq = sum_t q_t (2 corr_t + H_tt q_t) */
        }
        const double q0 = q[0], q1 = q[1], q2 = q[2], q3 = q[3];
        for (int32_t j = c + 1; j < b1; j++) {
            double h = Hc[j];
            c0[j - b0] += q0 * h;
            c1[j - b0] += q1 * h;
            c2[j - b0] += q2 * h;
            c3[j - b0] += q3 * h;
        }
    }
}

static void pf_rows(void *ctx, int32_t chunk, int32_t nchunks) {
    const pf_task *t = (const pf_task *)ctx;
    const int64_t per_group = t->p->rows;
    int64_t r0 = t->rows * chunk / nchunks, r1 = t->rows * (chunk + 1) / nchunks;
    double scratch[SPFQ_PF_MAX_BLOCK];
    for (int64_t r = r0; r < r1;) {
        int64_t end = (r / per_group + 1) * per_group;  /* a tile stays inside one (cand, group) */
        int32_t nt = (int32_t)((r1 < end ? r1 : end) - r);
        if (nt > PF_TILE) nt = PF_TILE;
        pf_tile(t->p, t, r, nt, scratch);
        r += nt;
    }
}

int spfq_path_following_block(const spfq_pf_desc *p, int32_t b0, int32_t b1, double *corr, int32_t nthreads) {
    if (!p || !corr || !p->A || !p->H || !p->inv || !p->Q) return SPFQ_EINVAL;
    if (p->cands < 1 || p->groups < 1 || p->rows < 1 || p->d < 1) return SPFQ_EINVAL;
    if (p->per_column != 0 && p->per_column != 1) return SPFQ_EINVAL;
    if (b0 < 0 || b1 <= b0 || b1 > p->d || b1 - b0 > SPFQ_PF_MAX_BLOCK) return SPFQ_EINVAL;
    if (p->mode != SPFQ_PF_IDENTITY) {
        if (p->mode != SPFQ_PF_NEAREST && p->mode != SPFQ_PF_STOCHASTIC) return SPFQ_EINVAL;
        if (!p->codes || !p->lam || !p->delta || p->levels < 1 || p->levels > 127) return SPFQ_EINVAL;
        if (p->mode == SPFQ_PF_STOCHASTIC && !p->U) return SPFQ_EINVAL;
    }
    pf_task t = {p, b0, b1, corr, (int64_t)p->cands * p->groups * p->rows};
    /* a chunk is >= 16 rows of the block's work; tiny layers stay on the caller */
    int64_t chunks = t.rows / 16;
    if (chunks < 1) chunks = 1;
    if (chunks > 4 * SPFQ_POOL_MAX) chunks = 4 * SPFQ_POOL_MAX;
    spfq_pool_run(nthreads, (int32_t)chunks, pf_rows, &t);
    return SPFQ_OK;
}
