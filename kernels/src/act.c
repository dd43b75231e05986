/* act.c — the non-clamp activations a layer's epilogue can apply after its clamp
 * (spfq_set_activation): hardswish, SiLU, PReLU. They run on a block of outputs right after the
 * kernel wrote it (api.c's row units, dwconv.c's row steps), while it is in cache, instead of as
 * a separate graph node reading and writing the whole tensor again.
 *
 *   hardswish: v * min(max(v + 3, 0), 6) / 6      (torch's hardswish)
 *   silu:      v / (1 + exp(-v))                  (exp below: within 2 ulp of expf)
 *   prelu:     v > 0 ? v : slope[n] * v           (one slope per output channel n)
 * Float activations: parity with the framework's op to float rounding, like the weight-only
 * kernels (validate's per-layer checks apply the same op to the reference).
 *
 * exp is written here so that the loops vectorise on every ISA (GCC does not vectorise libm's
 * expf without -ffast-math): x = n ln2 + r (Cody-Waite, |r| <= ln2 / 2), e^r by a degree-6
 * polynomial, 2^n put into the exponent bits; inputs are clamped to [-88, 88] first (SiLU: v
 * to float precision above 88, and -0 below -88, where torch's float e^-v overflows). */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define ACT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ACT_CLONES
#endif

static inline float exp_approx(float x) {
    x = x < -88.0f ? -88.0f : x > 88.0f ? 88.0f : x;
    const float n = (x * 1.44269504f + 12582912.0f) - 12582912.0f; /* round(x / ln2) */
    const float r = (x - n * 0.693145752f) - n * 1.42860677e-6f;    /* ln2 in two parts */
    float p = 1.38888889e-3f;
    p = p * r + 8.33333333e-3f;
    p = p * r + 4.16666667e-2f;
    p = p * r + 1.66666667e-1f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const int32_t bits = ((int32_t)n + 127) << 23; /* 2^n, n in [-127, 127] */
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

ACT_CLONES void spfq_apply_act(int32_t kind, const float *slope, int32_t rows, int32_t n0, int32_t n1, float *y,
                               size_t ldy) {
    for (int32_t r = 0; r < rows; r++) {
        float *restrict v = y + (size_t)r * ldy;
        switch (kind) {
        case SPFQ_ACT_HARDSWISH:
            for (int32_t n = n0; n < n1; n++) {
                const float t = v[n] + 3.0f;
                v[n] = v[n] * (t < 0.0f ? 0.0f : t > 6.0f ? 6.0f : t) / 6.0f;
            }
            break;
        case SPFQ_ACT_SILU:
            for (int32_t n = n0; n < n1; n++) /* below -88: 0 (e^-v overflows float, as in torch) */
                v[n] = v[n] < -88.0f ? 0.0f * v[n] : v[n] / (1.0f + exp_approx(-v[n]));
            break;
        case SPFQ_ACT_PRELU:
            for (int32_t n = n0; n < n1; n++) v[n] = v[n] > 0.0f ? v[n] : slope[n] * v[n];
            break;
        default:
            break;
        }
    }
}

/* Channel-major outputs (NCHW planes of p pixels): channel c's slope for all its pixels. */
void spfq_apply_act_planes(int32_t kind, const float *slope, int32_t batches, int32_t n, size_t p, float *y) {
    for (int32_t b = 0; b < batches; b++)
        for (int32_t c = 0; c < n; c++) {
            float *plane = y + ((size_t)b * n + c) * p;
            if (kind != SPFQ_ACT_PRELU) {
                spfq_apply_act(kind, NULL, 1, 0, (int32_t)p, plane, p);
                continue;
            }
            const float s = slope[c];
            for (size_t i = 0; i < p; i++) plane[i] = plane[i] > 0.0f ? plane[i] : s * plane[i];
        }
}

void spfq_act_output(int32_t kind, const float *slope, int32_t nhwc, int32_t batches, int32_t n, size_t pixels,
                     float *y) {
    if (!nhwc) {
        spfq_apply_act_planes(kind, slope, batches, n, pixels, y);
        return;
    }
    const size_t rows = (size_t)batches * pixels, step = 4096;
    for (size_t r = 0; r < rows; r += step)
        spfq_apply_act(kind, slope, (int32_t)(rows - r < step ? rows - r : step), 0, n, y + r * (size_t)n, (size_t)n);
}

float *spfq_act_slope(int32_t kind, const float *slope, int32_t n, int *rc) {
    *rc = SPFQ_OK;
    if (kind < SPFQ_ACT_NONE || kind > SPFQ_ACT_PRELU || (kind == SPFQ_ACT_PRELU && !slope) || n < 1) {
        *rc = SPFQ_EINVAL;
        return NULL;
    }
    if (kind != SPFQ_ACT_PRELU) return NULL;
    float *copy = malloc((size_t)n * sizeof(float));
    if (!copy) {
        *rc = SPFQ_ENOMEM;
        return NULL;
    }
    memcpy(copy, slope, (size_t)n * sizeof(float));
    return copy;
}

int spfq_act_set(int32_t *act, float **act_slope, int32_t kind, const float *slope, int32_t n) {
    int rc;
    float *copy = spfq_act_slope(kind, slope, n, &rc);
    if (rc) return rc;
    free(*act_slope);
    *act_slope = copy;
    *act = kind;
    return SPFQ_OK;
}
