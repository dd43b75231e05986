/* maxpool.c — max pooling on channels-last input (spfq_maxpool_nhwc).
 *
 * The custom ONNX flavour keeps activations NHWC between compressed convs; an NCHW MaxPool
 * between two of them (the MNIST CNN: conv, ReLU, pool, conv) cost two full transposes, more
 * than the pooling itself. Here a window's pixels are read as whole channel rows (the inner loop
 * runs along the channels, so it vectorises on every ISA). The maximum of floats is exact in any
 * order; the padding and NaN inputs never win (v > m from -inf), as ONNX MaxPool ignores padding.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "internal.h"

typedef struct {
    const spfq_conv_geom *g;
    int32_t B, H, W, OH, OW;
    const float *x;
    float *y;
} pool_task;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define POOL_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define POOL_CLONES
#endif

/* output rows [r0, r1) of the flattened (b, oh) index */
POOL_CLONES static void pool_rows(const pool_task *t, int64_t r0, int64_t r1) {
    const spfq_conv_geom *g = t->g;
    const int32_t C = g->channels;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / t->OH;
        const int32_t oh = (int32_t)(r % t->OH);
        const float *xb = t->x + (size_t)b * t->H * t->W * C;
        for (int32_t ow = 0; ow < t->OW; ow++) {
            float *restrict y = t->y + (((size_t)b * t->OH + oh) * t->OW + ow) * C;
            for (int32_t c = 0; c < C; c++) y[c] = -INFINITY;
            for (int32_t kh = 0; kh < g->kh; kh++) {
                const int32_t ih = oh * g->sh - g->pt + kh * g->dh;
                if (ih < 0 || ih >= t->H) continue;
                for (int32_t kw = 0; kw < g->kw; kw++) {
                    const int32_t iw = ow * g->sw - g->pl + kw * g->dw;
                    if (iw < 0 || iw >= t->W) continue;
                    const float *restrict x = xb + ((size_t)ih * t->W + iw) * C;
                    for (int32_t c = 0; c < C; c++) y[c] = x[c] > y[c] ? x[c] : y[c];
                }
            }
        }
    }
}

static void pool_chunk(void *ctx, int32_t c, int32_t n) {
    const pool_task *t = ctx;
    const int64_t rows = (int64_t)t->B * t->OH;
    pool_rows(t, rows * c / n, rows * (c + 1) / n);
}

int spfq_maxpool_nhwc(const spfq_conv_geom *g, int32_t b, int32_t h, int32_t w, int32_t oh, int32_t ow, const float *x,
                      float *y, int32_t nthreads) {
    if (!g || b < 0 || h < 1 || w < 1 || oh < 1 || ow < 1 || !x || !y || g->channels < 1 || g->kh < 1 || g->kw < 1 ||
        g->sh < 1 || g->sw < 1 || g->dh < 1 || g->dw < 1 || g->pt < 0 || g->pl < 0)
        return SPFQ_EINVAL;
    if (!b) return SPFQ_OK;
    pool_task t = {g, b, h, w, oh, ow, x, y};
    const int64_t rows = (int64_t)b * oh;
    nthreads = spfq_threads_for(rows * ow * g->channels * g->kh * g->kw, nthreads);
    int64_t chunks = nthreads <= 1 ? 1 : 4 * (int64_t)nthreads;
    if (chunks > rows) chunks = rows;
    spfq_pool_run(nthreads, (int32_t)chunks, pool_chunk, &t);
    return SPFQ_OK;
}
