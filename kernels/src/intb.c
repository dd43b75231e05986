/* intb.c — portable C kernels (the semantic oracle) for the int b-bit layouts PLANES and SPARSE.
 *
 * Range functions (internal.h): output rows [n0, n1) for every activation row m < job->m.
 *   spfq_planes_f32_c / spfq_sparse_f32_c : y[m,n] = sum_k x[m,k] * value(c[n,k]) + bias[n]
 *   spfq_planes_i8_c  / spfq_sparse_i8_c  : acc_c[m,n] = sum_k xq*c, acc_s[m,n] = sum_k xq*sign(c)
 *                                           (exact, no epilogue; a NULL output is not written)
 * value(c) = sign(c) * (lam + (|c| - 1) * scale), = c * scale when lam == NULL, computed per
 * weight in float as CompressedLayer.dequantize() does; y is accumulated in float in column
 * order. Integer sums are accumulated in int64 and stored as int32 (two's complement wrap).
 *
 * Bit layouts (spfq_deploy/pack/layouts.py): bit j of a row is bit j%64 of 64-bit word j/64.
 *   PLANES: planes (b, N, W); u = sum_p bit_p << p, c = u - 2^(b-1); padding bits are 0.
 *   SPARSE: mask (N, W), kept (b, N, Wk); the i-th set mask bit of a row (column order) owns
 *           field i of the row's compact stream, field = sum_p (bit i of kept[p, n]) << p,
 *           c = (field & 1 ? -1 : +1) * ((field >> 1) + 1). All-zero mask words are skipped
 *           (they read nothing and advance nothing). Fields past Wk*64 (a corrupt mask) are
 *           never read: those weights count as 0.
 *
 * Structure: for each output row, one 64-column block of codes is decoded at a time into a
 * small array and applied to a chunk of up to MCHUNK activation rows (local accumulators), so
 * each weight is decoded once per row and chunk, with no heap memory.
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define MCHUNK 32

/* PLANES codes of row n, word `word` into c[0..63] (columns past K come out as -2^(b-1) and
 * are never used). */
static void planes_block(const spfq_prepared *w, int32_t n, int32_t word, int8_t c[64])
{
    const int b = w->d.bits;
    const size_t W = (size_t)w->words;
    const size_t plane_stride = (size_t)w->d.n * W;
    const uint64_t *base = w->d.planes + (size_t)n * W + (size_t)word;
    int u[64] = {0};
    for (int p = 0; p < b; p++) {
        const uint64_t bits = base[(size_t)p * plane_stride];
        for (int j = 0; j < 64; j++) u[j] |= (int)((bits >> j) & 1u) << p;
    }
    for (int j = 0; j < 64; j++) c[j] = (int8_t)(u[j] - (1 << (b - 1)));
}

/* SPARSE codes of row n for mask word mw into c[0..63] (0 where the mask bit is 0); *pos is
 * the compact index of the block's first kept code (the number of set mask bits in the row's
 * earlier words) and is advanced past the block. */
static void sparse_block(const spfq_prepared *w, int32_t n, uint64_t mw, size_t *pos, int8_t c[64])
{
    const int b = w->d.bits;
    const size_t Wk = (size_t)w->d.kept_words;
    const size_t plane_stride = (size_t)w->d.n * Wk;
    for (int j = 0; j < 64; j++) {
        c[j] = 0;
        if (!((mw >> j) & 1u)) continue;
        const size_t i = (*pos)++;
        if (i >= Wk * 64) continue; /* corrupt mask: never read past the row's kept words */
        int f = 0;
        for (int p = 0; p < b; p++)
            f |= (int)((w->d.planes[(size_t)p * plane_stride + (size_t)n * Wk + i / 64] >> (i % 64)) & 1u)
                 << p;
        const int mag = (f >> 1) + 1;
        c[j] = (int8_t)((f & 1) ? -mag : mag);
    }
}

/* Decode block `word` of row n; returns 0 for an all-zero SPARSE block (nothing decoded). */
static int block(const spfq_prepared *w, int sparse, int32_t n, int32_t word, size_t *pos,
                 int8_t c[64])
{
    if (!sparse) {
        planes_block(w, n, word, c);
        return 1;
    }
    const uint64_t mw = w->d.mask[(size_t)n * (size_t)w->words + (size_t)word];
    if (!mw) return 0;
    sparse_block(w, n, mw, pos, c);
    return 1;
}

static float weight_value(int c, float scale, const float *lam, int32_t n)
{
    if (c == 0) return 0.0f;
    if (!lam) return (float)c * scale;
    const float v = lam[n] + (float)((c < 0 ? -c : c) - 1) * scale;
    return c < 0 ? -v : v;
}

static void run_f32(const spfq_job *job, int32_t n0, int32_t n1, int sparse)
{
    const spfq_prepared *w = job->w;
    const int32_t N = w->d.n, K = w->d.k, W = w->words, M = job->m;
    for (int32_t n = n0; n < n1; n++) {
        const float bias = w->d.bias ? w->d.bias[n] : 0.0f;
        for (int32_t m0 = 0; m0 < M; m0 += MCHUNK) {
            const int32_t mc = M - m0 < MCHUNK ? M - m0 : MCHUNK;
            float acc[MCHUNK] = {0};
            size_t pos = 0;
            for (int32_t word = 0; word < W; word++) {
                int8_t c[64];
                float v[64];
                if (!block(w, sparse, n, word, &pos, c)) continue; /* all-zero block */
                const int32_t kend = K - word * 64 < 64 ? K - word * 64 : 64;
                for (int32_t j = 0; j < kend; j++) v[j] = weight_value(c[j], w->d.scale[n], w->d.lam, n);
                for (int32_t i = 0; i < mc; i++) {
                    const float *x = job->x + (size_t)(m0 + i) * (size_t)K + (size_t)word * 64;
                    for (int32_t j = 0; j < kend; j++)
                        if (c[j]) acc[i] += x[j] * v[j];
                }
            }
            for (int32_t i = 0; i < mc; i++) job->y[(size_t)(m0 + i) * (size_t)N + (size_t)n] = acc[i] + bias;
        }
    }
}

static void run_i8(const spfq_job *job, int32_t n0, int32_t n1, int sparse)
{
    const spfq_prepared *w = job->w;
    const int32_t N = w->d.n, K = w->d.k, W = w->words, M = job->m;
    for (int32_t n = n0; n < n1; n++) {
        for (int32_t m0 = 0; m0 < M; m0 += MCHUNK) {
            const int32_t mc = M - m0 < MCHUNK ? M - m0 : MCHUNK;
            int64_t sc[MCHUNK] = {0}, ss[MCHUNK] = {0};
            size_t pos = 0;
            for (int32_t word = 0; word < W; word++) {
                int8_t c[64], sg[64];
                if (!block(w, sparse, n, word, &pos, c)) continue; /* all-zero block */
                const int32_t kend = K - word * 64 < 64 ? K - word * 64 : 64;
                for (int32_t j = 0; j < kend; j++) sg[j] = (int8_t)((c[j] > 0) - (c[j] < 0));
                for (int32_t i = 0; i < mc; i++) {
                    const int8_t *xq = job->xq + (size_t)(m0 + i) * (size_t)K + (size_t)word * 64;
                    int64_t a = 0, s = 0;
                    for (int32_t j = 0; j < kend; j++) {
                        a += (int64_t)xq[j] * c[j];
                        s += (int64_t)xq[j] * sg[j];
                    }
                    sc[i] += a;
                    ss[i] += s;
                }
            }
            for (int32_t i = 0; i < mc; i++) {
                const size_t o = (size_t)(m0 + i) * (size_t)N + (size_t)n;
                if (job->acc_c) job->acc_c[o] = (int32_t)(uint32_t)(uint64_t)sc[i];
                if (job->acc_s) job->acc_s[o] = (int32_t)(uint32_t)(uint64_t)ss[i];
            }
        }
    }
}

void spfq_planes_f32_c(const spfq_job *j, int32_t n0, int32_t n1) { run_f32(j, n0, n1, 0); }
void spfq_planes_i8_c(const spfq_job *j, int32_t n0, int32_t n1) { run_i8(j, n0, n1, 0); }
void spfq_sparse_f32_c(const spfq_job *j, int32_t n0, int32_t n1) { run_f32(j, n0, n1, 1); }
void spfq_sparse_i8_c(const spfq_job *j, int32_t n0, int32_t n1) { run_i8(j, n0, n1, 1); }

/* ------------------------------------------------------------------ prepare-time repack */

/* The RP layout of internal.h, built from the planes, from SIGN_MASK words as the two planes of
 * u = c + 2 (bit 0 = mask, bit 1 = not (mask and sign)), or from SIGN words as the one plane
 * u = not sign. Portable; read by intb_avx512.c (every rp_cb) / intb_avx2.c (rp_cb 2 and 4). */
int spfq_planes_repack(spfq_prepared *w)
{
    w->rp = NULL;
    w->rp_cb = w->rp_steps = w->rp_off = w->rp_mul = 0;
    const spfq_weights_desc *d = &w->d;
    const int ternary = d->layout == SPFQ_SIGN_MASK, binary = d->layout == SPFQ_SIGN;
    if (!ternary && !binary && (d->layout != SPFQ_PLANES || d->bits < 2 || d->bits > 8)) return SPFQ_OK;
    const int b = binary ? 1 : ternary ? 2 : d->bits, cb = b <= 2 ? b : b <= 4 ? 4 : 8, kstep = 4 * (8 / cb);
    const int32_t N = d->n, K = d->k;
    const size_t W = (size_t)w->words, plane_stride = (size_t)N * W;
    const size_t steps = ((size_t)K + (size_t)kstep - 1) / (size_t)kstep, tiles = ((size_t)N + 63) / 64;
    const size_t bytes = tiles * steps * 256;
    uint8_t *rp = aligned_alloc(64, bytes);
    if (!rp) return SPFQ_ENOMEM;
    memset(rp, 0, bytes);
    for (int32_t n = 0; n < N; n++) {
        const size_t t = (size_t)n / 64, g = (size_t)(n % 64) / 16, lane = (size_t)(n % 16);
        uint8_t *row = rp + (t * steps * 4 + g) * 64 + 4 * lane; /* + step * 256 + i */
        for (int32_t word = 0; word < (int32_t)W; word++) {
            uint64_t pl[8];
            const size_t at = (size_t)n * W + (size_t)word;
            if (binary) {
                pl[0] = ~d->sign[at];
            } else if (ternary) {
                pl[0] = d->mask[at];
                pl[1] = ~(d->mask[at] & d->sign[at]);
            } else {
                for (int p = 0; p < b; p++) pl[p] = d->planes[(size_t)p * plane_stride + at];
            }
            const int32_t kend = K - word * 64 < 64 ? K - word * 64 : 64;
            for (int32_t j = 0; j < kend; j++) {
                unsigned u = 0;
                for (int p = 0; p < b; p++) u |= (unsigned)((pl[p] >> j) & 1u) << p;
                const int32_t k = word * 64 + j, r = k % kstep;
                row[(size_t)(k / kstep) * 256 + (size_t)(r % 4)] |= (uint8_t)(u << ((r / 4) * cb));
            }
        }
    }
    w->rp = rp;
    w->rp_off = 1 << (b - 1); /* binary: c = 2u - 1 */
    w->rp_mul = binary ? 2 : 1;
    w->rp_cb = cb;
    w->rp_steps = (int32_t)steps;
    return SPFQ_OK;
}

/* Signed codes c of row n (K values) of PLANES / SPARSE weights, for kernels that keep
 * weights unpacked (dwconv.c). */
void spfq_int_row_codes(const spfq_prepared *w, int32_t n, int8_t *c)
{
    const int sparse = w->d.layout == SPFQ_SPARSE;
    size_t pos = 0;
    for (int32_t word = 0; word < w->words; word++) {
        int8_t blk[64];
        const int32_t kend = w->d.k - word * 64 < 64 ? w->d.k - word * 64 : 64;
        if (!block(w, sparse, n, word, &pos, blk)) memset(blk, 0, sizeof blk);
        memcpy(c + (size_t)word * 64, blk, (size_t)kend);
    }
}

/* value(c) of row n as the f32 oracle computes it (for dwconv.c's unpacked weights). */
float spfq_int_value(int c, float scale, const float *lam, int32_t n) { return weight_value(c, scale, lam, n); }
