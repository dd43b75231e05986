/* dwconv.h — what dwconv.c and its per-ISA micro-kernels share (not part of the ABI). */
#ifndef SPFQ_DWCONV_H
#define SPFQ_DWCONV_H

#include <stddef.h>
#include <stdint.h>

#include "spfq_kernels.h"

#define DW_MAX_TAPS 1040 /* k * 127 * 127 < 2^24: exact integer sums in float */
#define DW_LANES 8
#define DW_LANES_BELOW 64 /* NCHW: narrower planes run in lanes; measured on MobileNetV2 (AVX2): 16 -> 24.2 ms of depthwise, 64 -> 22.4, always -> 28.7 */

struct spfq_dw {
    spfq_dw_geom g;
    int32_t n, k, one_level, two; /* one_level: SIGN / SIGN_MASK; two: 1 acc_c and acc_s, 2 acc_c only */
    int8_t *code;                 /* (n, k) signed codes */
    float *wf;                    /* (n, k) f32 tap weights: +-1 (one level) or value(c) */
    float *c, *s;                 /* (n, k) code and sign(code) as floats (i8) */
    float *scale, *lamx, *bias;   /* (n): scale, lam - scale (0 if unused), bias (0 if none) */
    int32_t nblk;                 /* ceil(n / DW_LANES) blocks of output channels */
    float *lane;                  /* per block, lane order: (nblk, 4, k, DW_LANES) wf, c, s, live
                                     then (nblk, 3, DW_LANES) scale, lamx, bias */
    float lo, hi;                 /* output clamp (spfq_dw_set_clamp; -inf, inf: none) */
    int32_t act;                  /* spfq_dw_set_activation after the clamp; PReLU: act_slope (n) */
    float *act_slope;
    float *lane16;                /* f32 only, per full 16-lane block: (k, 16) wf, (k, 16) live, then
                                     (16) scale, (16) bias; NULL if n % 16 or no AVX-512 */
    uint8_t *dense16;             /* per 16-lane block: no zero code */
};

/* Where a lanes kernel reads and writes: input pixel (ih, iw) of lane l at
 * xin[((ih - ih_lo) * W + iw) * ps + l]; output (oh, ow) of lane l < nb at
 * y[((oh - oh_lo) * OW + ow) * ys + l * yl]. */
typedef struct {
    const float *xin;
    int32_t ih_lo, ps;
    float *y;
    size_t ys, yl;
    int32_t oh_lo; /* y holds output rows from oh_lo on (0: the whole image) */
} lanes_io;

/* Output rows [oh0, oh1) of block blk (nb live lanes), AVX2 (dwconv_avx2.c; weak: NULL in a
 * build without it). */
void spfq_dw_lanes_avx2(const struct spfq_dw *p, int32_t int8, int32_t blk, int32_t nb, lanes_io io, int32_t H,
                        int32_t W, int32_t oh0, int32_t oh1, int32_t OW) __attribute__((weak));

/* Output rows [oh0, oh1), every 16-channel block, weight-only float, NHWC in place (AVX-512,
 * dwconv_avx512.c; weak). zero: p->n zero floats (the padding's input); taps: room for OW * k
 * pointers. */
void spfq_dw_rows16_avx512(const struct spfq_dw *p, lanes_io io, int32_t H, int32_t W, int32_t oh0, int32_t oh1,
                           int32_t OW, const float *zero, const float **taps) __attribute__((weak));

#endif /* SPFQ_DWCONV_H */
