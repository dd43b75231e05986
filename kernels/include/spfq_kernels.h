/* spfq_kernels.h — the plain C ABI of the packed GEMM kernels.
 *
 * One semantics, several ISAs (portable C = the oracle, AVX2, NEON), picked at run time.
 * The Python binding (ctypes), the ONNX Runtime custom-op library and TVM-exported libraries
 * all link this same code. Weights arrive in the .spfq layouts (spfq_deploy/pack/layouts.py,
 * bit order in spfq_deploy/pack/bits.py): 64-bit little-endian words along K, bit j of a row
 * in bit j%64 of word j/64, rows padded with zero bits to W = ceil(K/64) words.
 * spfq_prepare() may repack them into a kernel-private layout once.
 *
 * Weight values (per output row n, signed code c in [-Kmax, Kmax]):
 *     value(c) = sign(c) * (lam[n] + (|c| - 1) * scale[n])   with lam = scale when lam == NULL
 *              = scale[n] * c + (lam[n] - scale[n]) * sign(c)
 * so every integer kernel keeps two exact int32 sums per output:
 *     acc_c[m,n] = sum_k xq[m,k] * c[n,k]        acc_s[m,n] = sum_k xq[m,k] * sign(c[n,k])
 * and y[m,n] = xscale[m] * (scale[n] * acc_c + (lam[n] - scale[n]) * acc_s) + bias[n]
 * (for binary/ternary c == sign(c), the level is scale[n], and y = xscale*scale*acc_s + bias;
 * lam is ignored for the SIGN and SIGN_MASK layouts).
 */
#ifndef SPFQ_KERNELS_H
#define SPFQ_KERNELS_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SPFQ_ABI_VERSION 1

enum spfq_status {
    SPFQ_OK = 0,
    SPFQ_EINVAL = 1,       /* bad argument: null pointer, shape, bits, layout */
    SPFQ_ENOMEM = 2,
    SPFQ_EUNSUPPORTED = 3  /* this operation does not apply to this weight kind */
};

enum spfq_layout {
    SPFQ_SIGN = 1,       /* binary: sign (N,W); bit 1 = -scale */
    SPFQ_SIGN_MASK = 2,  /* ternary / pruned binary: sign (N,W) + mask (N,W), bit 1 = nonzero */
    SPFQ_PLANES = 3,     /* int b-bit dense: planes (b,N,W) of u = c + 2^(b-1) */
    SPFQ_SPARSE = 4      /* int b-bit pruned: mask (N,W) + kept (b,N,Wk): per row, nonzero codes in
                            column order as fields (c<0) | ((|c|-1) << 1), zero padded */
};

typedef struct {
    int32_t layout;      /* enum spfq_layout */
    int32_t n, k;        /* output rows N, reduction length K */
    int32_t bits;        /* field bits b of PLANES / SPARSE (2..8); 1 for SIGN, 2 for SIGN_MASK */
    int32_t kept_words;  /* Wk of SPARSE */
    const uint64_t *sign, *mask, *planes;  /* planes: the planes (PLANES) or kept (SPARSE) buffer */
    const float *scale;  /* (N) */
    const float *lam;    /* (N) or NULL */
    const float *bias;   /* (N) or NULL */
} spfq_weights_desc;

typedef struct spfq_prepared spfq_prepared;  /* owns a copy / repack of the weights */

int spfq_prepare(const spfq_weights_desc *w, spfq_prepared **out);
void spfq_free(spfq_prepared *p);

/* An output clamp fused into the epilogue of spfq_matmul_f32 / spfq_matmul_i8 (and of
 * spfq_dwconv / spfq_dwconv_nhwc through spfq_dw_set_clamp): y = min(max(y, lo), hi), as
 * v < lo ? lo : v, then v > hi ? hi : v (NaN stays NaN). ReLU: (0, inf), ReLU6: (0, 6).
 * lo > hi or a NaN bound is SPFQ_EINVAL; (-inf, inf) turns it off. */
int spfq_set_clamp(spfq_prepared *w, float lo, float hi);

/* An activation after the clamp, applied to each block of outputs while it is in cache (act.c):
 * hardswish v * min(max(v + 3, 0), 6) / 6, SiLU v / (1 + exp(-v)), PReLU v > 0 ? v : slope[n] v
 * (slope: N floats, copied; NULL for the others). SPFQ_ACT_NONE turns it off. Float results
 * (parity with the framework's op to float rounding). For spfq_prepared weights (every GEMM and
 * spfq_conv_nhwc), spfq_dw (depthwise) and spfq_dc (few-channel conv). */
enum spfq_activation { SPFQ_ACT_NONE = 0, SPFQ_ACT_HARDSWISH = 1, SPFQ_ACT_SILU = 2, SPFQ_ACT_PRELU = 3 };
int spfq_set_activation(spfq_prepared *w, int32_t kind, const float *slope);

/* Weight-only: y (M,N) = x (M,K) @ value(W)^T + bias, float accumulation (matches the
 * dequantised PyTorch model up to summation order). */
int spfq_matmul_f32(const spfq_prepared *w, int32_t m, const float *x, float *y, int32_t nthreads);

/* int8 activations, exact int32 sums (see the header comment); acc_c may be NULL for binary /
 * ternary layouts (it equals acc_s there). Internally, spfq_matmul_i8 skips acc_s for PLANES /
 * SPARSE weights without lam (value = scale * c needs acc_c only). */
int spfq_matmul_i8_raw(const spfq_prepared *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                       int32_t *acc_s, int32_t nthreads);
int spfq_matmul_i8(const spfq_prepared *w, int32_t m, const int8_t *xq, const float *xscale,
                   float *y, int32_t nthreads);
/* The activations of a call: float rows (x in, y out), or rows quantised to int8 per row with
 * their scales (xq + xscale in, yq + yscale out) exactly as spfq_quantize_i8 makes them from the
 * float rows. Exactly one of each side is set. */
typedef struct {
    const float *x;
    const int8_t *xq;
    const float *xscale;
    float *y;
    int8_t *yq;
    float *yscale;
} spfq_act;

/* spfq_matmul_q8 (float x) or spfq_matmul_i8 (xq, xscale), the output either float or quantised
 * per row: bit for bit spfq_quantize_i8 of the float result, i.e. the next layer's own input
 * quantisation, done in this call's epilogue while the rows are in cache (graph edges between
 * compressed layers then carry int8 + one scale per row instead of floats). */
int spfq_matmul_act(const spfq_prepared *w, int32_t m, const spfq_act *a, int32_t nthreads);

/* spfq_quantize_i8 of x (M, K) then spfq_matmul_i8, in one call and bit-identical with them: rows
 * are quantised in cache-sized blocks on the call's threads, right before the kernel reads them. */
int spfq_matmul_q8(const spfq_prepared *w, int32_t m, const float *x, float *y, int32_t nthreads);

/* XNOR/popcount, SIGN weights x binary activations xbits (M,W) (same bit convention, bit 1 =
 * negative): dot[m,n] = K - 2*popcount(x XOR w) exactly (padding bits are zero on both sides).
 * y = xscale[m] * scale[n] * dot + bias[n] (xscale NULL = 1). If ybits != NULL the output is
 * re-binarised for the next binary layer: bit n of row m (layout (M, ceil(N/64))) = (y < 0),
 * and y may be NULL. dot may be NULL. */
int spfq_bgemm(const spfq_prepared *w, int32_t m, const uint64_t *xbits, const float *xscale,
               int32_t *dot, float *y, uint64_t *ybits, int32_t nthreads);

/* Activation quantisers used in front of the kernels (also exact references for tests):
 * i8 (rule 2): amax = max|x_row|; below 2^-100 xscale = 0 and xq = 0; else xscale = amax / 127,
 * r = 127 / amax (float32 divisions), xq = float32(x * r) rounded to nearest, ties to even,
 * clamped to [-127, 127], 0 for NaN (the default floating-point environment is assumed).
 * binarize: bit = (x < 0), xscale = mean|x_row|. */
int spfq_quantize_i8(int32_t m, int32_t k, const float *x, int8_t *xq, float *xscale);
int spfq_binarize(int32_t m, int32_t k, const float *x, uint64_t *xbits, float *xscale);

/* Depthwise convolution (groups == input channels, one input channel per group) straight
 * from NCHW planes: no im2col, no GEMM call per channel (dwconv.c). Weights: a desc with
 * n = channels * mult output rows (output o reads channel o / mult) and k = kh * kw taps in
 * (kh, kw) order, as PyTorch flattens a depthwise weight. Same results as the im2col path of
 * the oracle: f32 as spfq_matmul_f32's C oracle (taps in column order, zero codes skipped;
 * bit-identical with it), i8 as spfq_quantize_i8 of every im2col row (one output pixel's
 * patch, zero padding included) then spfq_matmul_i8 (bit-identical: the integer sums are
 * exact, the epilogue is the same float expression). k * 127 * 127 < 2^24 is required
 * (k <= 1040 taps), so the exact sums fit float lanes. */
typedef struct {
    int32_t channels, mult;            /* input channels C (= groups); outputs per channel */
    int32_t kh, kw, sh, sw, dh, dw;    /* kernel, strides, dilations */
    int32_t pt, pl, pb, pr;            /* zero padding: top, left, bottom, right */
} spfq_dw_geom;
typedef struct spfq_dw spfq_dw;
int spfq_dw_prepare(const spfq_weights_desc *w, const spfq_dw_geom *g, spfq_dw **out);
int spfq_dw_set_clamp(spfq_dw *p, float lo, float hi);
int spfq_dw_set_activation(spfq_dw *p, int32_t kind, const float *slope); /* as spfq_set_activation */
void spfq_dw_free(spfq_dw *p);
/* x (b, channels, h, w) -> y (b, channels * mult, oh, ow); int8: activations quantised per
 * patch as above (0: weight-only float). */
int spfq_dwconv(const spfq_dw *p, int32_t int8, int32_t b, int32_t h, int32_t w, const float *x, float *y,
                int32_t nthreads);
/* The same with channels last: x (b, h, w, channels) -> y (b, oh, ow, channels * mult);
 * bit-identical with spfq_dwconv (outputs transposed). */
int spfq_dwconv_nhwc(const spfq_dw *p, int32_t int8, int32_t b, int32_t h, int32_t w, const float *x, float *y,
                     int32_t nthreads);

/* Direct convolution of an input with few channels (one group, channels <= 4, kh * kw <= 64: a
 * network's first conv), weight-only float, output channels in vector lanes, each input value
 * broadcast (dconv.c): no im2col. Weights: a desc with n = outputs, k = channels * kh * kw in
 * (c, kh, kw) order, as PyTorch flattens the weight. Bit-identical with spfq_matmul_f32's C
 * oracle on the im2col rows. nhwc: x (b, h, w, channels) -> y (b, oh, ow, outputs), else NCHW
 * both. */
typedef struct {
    int32_t channels, outputs;         /* input channels C, output channels N */
    int32_t kh, kw, sh, sw, dh, dw;    /* kernel, strides, dilations */
    int32_t pt, pl, pb, pr;            /* zero padding: top, left, bottom, right */
} spfq_conv_geom;
typedef struct spfq_dc spfq_dc;
int spfq_dc_prepare(const spfq_weights_desc *w, const spfq_conv_geom *g, spfq_dc **out);
int spfq_dc_set_clamp(spfq_dc *p, float lo, float hi);
int spfq_dc_set_activation(spfq_dc *p, int32_t kind, const float *slope); /* as spfq_set_activation */
void spfq_dc_free(spfq_dc *p);
int spfq_dconv(const spfq_dc *p, int32_t nhwc, int32_t b, int32_t h, int32_t w, const float *x, float *y,
               int32_t nthreads);

/* A convolution of one group on channels-last input through the GEMM: x (b, h, w, g.channels)
 * -> y (b, oh, ow, g.outputs), weights as for im2col rows (k = channels * kh * kw in (c, kh, kw)
 * order). The im2col rows are made per block of rows, in cache, right before the kernel reads
 * them (never the whole image's). int8: rows quantised per row (= per patch) as spfq_quantize_i8,
 * else weight-only float; bit-identical with im2col + spfq_matmul_q8 / spfq_matmul_f32. */
int spfq_conv_nhwc(const spfq_prepared *w, const spfq_conv_geom *g, int32_t int8, int32_t b, int32_t h, int32_t wd,
                   const float *x, float *y, int32_t nthreads);

/* Max pooling, channels last: x (b, h, w, g.channels) -> y (b, oh, ow, g.channels), y = the
 * maximum over each window (kh x kw taps, strides, dilations; windows start at -pt / -pl and
 * are clipped to the image, so a caller's ceil-mode oh / ow work too); padding and NaN inputs
 * never win (v > m from -inf). g.outputs is ignored. */
int spfq_maxpool_nhwc(const spfq_conv_geom *g, int32_t b, int32_t h, int32_t w, int32_t oh, int32_t ow, const float *x,
                      float *y, int32_t nthreads);

/* Depthwise, channels last, through the weight-only float kernel (bit-identical with
 * spfq_dwconv_nhwc, int8 0), the output float (a->y) or quantised per pixel (a->yq, a->yscale:
 * spfq_quantize_i8 of the float output, the quantisation a 1x1 int8 conv after it does). Input:
 * int8_pixel 0: float a->x as it is; 1 ("int8-pixel"): the pixel rows (channels) quantised as
 * spfq_quantize_i8 (a->x) or given so (a->xq, a->xscale: one scale per pixel), dequantised as
 * xscale * (float)q. A per-patch quantisation would quantise every input once per tap; a
 * per-pixel one is what a 1x1 conv before it can write in its epilogue. */
int spfq_dwconv_nhwc_act(const spfq_dw *p, int32_t int8_pixel, int32_t b, int32_t h, int32_t w, const spfq_act *a,
                         int32_t nthreads);

/* Group-wise scales (.spfq format version 3, `compress --group-size G`; grouped.c): the desc's
 * scale and lam hold (N, ngroups) floats, row-major, ngroups = ceil(K / G); group g covers the
 * columns [g G, min((g + 1) G, K)) (the last group may be shorter), and the weight value of
 * column k in row n is value(c) above with scale[n, k / G] and lam[n, k / G]. ONE exact float
 * evaluation order, the same on every ISA (the int8 and the float path alike):
 *     t_g[m,n] = the per-row result above on group g's columns alone, with its scale[n,g] and
 *                lam[n,g] as the per-row scale and lam, no bias and no clamp:
 *                int8: t_g = xscale[m] * (scale[n,g] * (float)acc_c,g + (lam[n,g] - scale[n,g])
 *                      * (float)acc_s,g) + 0.0f (the two-sum / one-sum forms of the layout, exact
 *                      int32 sums acc_*,g over the group's columns), xscale[m] the row's one scale
 *                      over all K columns (spfq_quantize_i8 of the whole row);
 *                float: t_g = the f32 C oracle's result on the group's columns of x (spfq_matmul_f32
 *                      under ISA "c"; every ISA computes exactly it here, through the output-lane
 *                      tables, unlike per-row spfq_matmul_f32 calls of < 16 rows).
 *     s = t_0; s = s + t_g for g = 1 .. ngroups - 1 (float32, ascending groups)
 *     y[m,n] = s + (bias ? bias[n] : 0.0f), then the clamp, then the activation (as spfq_prepared).
 * SPARSE weights run as PLANES groups (the same values). x, xq: (M, K) rows as for the per-row
 * calls. spfq_grouped_matmul_q8 = spfq_quantize_i8 of the rows, then spfq_grouped_matmul_i8. */
typedef struct spfq_grouped spfq_grouped;
int spfq_grouped_prepare(const spfq_weights_desc *w, int32_t group, spfq_grouped **out);
void spfq_grouped_free(spfq_grouped *p);
int spfq_grouped_set_clamp(spfq_grouped *p, float lo, float hi);
int spfq_grouped_set_activation(spfq_grouped *p, int32_t kind, const float *slope);
int spfq_grouped_matmul_f32(const spfq_grouped *p, int32_t m, const float *x, float *y, int32_t nthreads);
int spfq_grouped_matmul_i8(const spfq_grouped *p, int32_t m, const int8_t *xq, const float *xscale, float *y,
                           int32_t nthreads);
int spfq_grouped_matmul_q8(const spfq_grouped *p, int32_t m, const float *x, float *y, int32_t nthreads);

/* Compression time (spfq_deploy/compress/path_following.py): the column loop of Gram-form
 * path following over columns [b0, b1) for every row r = (candidate, group, neuron) of
 * Q (cands, groups, rows, d): z = (A[g,i,t] - corr[r,t-b0]) * inv[g,t], q = T(z),
 * corr[r,j-b0] += q * H[g,t,j] for t < j < b1. corr (cands*groups*rows, b1-b0) holds on entry
 * the part from columns < b0 and is updated in place. Bit-exact with the Python reference.
 * q'Hq is summed as sum_t q_t (2 corr_t + H_tt q_t) (H symmetric). */
enum spfq_pf_mode { SPFQ_PF_IDENTITY = 0, SPFQ_PF_NEAREST = 1, SPFQ_PF_STOCHASTIC = 2 };
typedef struct {
    int32_t cands, groups, rows, d;
    int32_t mode;                /* enum spfq_pf_mode */
    int32_t levels, has_zero;    /* alphabet: {0 if has_zero} U +-{lam + j*delta : j < levels} */
    const double *A;             /* (groups, rows, d) */
    const double *H;             /* (groups, d, d) */
    const double *inv;           /* (groups, d): 1 / H_tt, 0 for an all-zero column */
    const double *lam, *delta;   /* (cands, groups, rows); NULL for IDENTITY */
    const double *U;             /* (groups, rows, d) uniforms for STOCHASTIC, else NULL */
    int8_t *codes;               /* (cands, groups, rows, d) out; NULL for IDENTITY */
    double *Q;                   /* (cands, groups, rows, d) out: the values q */
    double *qhq;                 /* (cands, groups, rows) or NULL: q'Hq added (caller zeroes it) */
    int32_t per_column;          /* 1: lam, delta are (cands, groups, rows, d), column t rounds with
                                    lam[r,t], delta[r,t] (group-wise scales spread over the columns) */
} spfq_pf_desc;
#define SPFQ_PF_MAX_BLOCK 4096   /* b1 - b0 at most */
int spfq_path_following_block(const spfq_pf_desc *p, int32_t b0, int32_t b1, double *corr, int32_t nthreads);

/* ISA selection: "auto" (default: best the CPU has), "c", "avx2", "avx512" (F/BW/VL/VNNI/
 * VPOPCNTDQ/BITALG + BMI2; the int-b kernels also check VBMI2 and use GFNI when present, else a
 * slower exact path; kernels it lacks fall back to avx2), "amx" (avx512 plus AMX-INT8 tiles for
 * int8 GEMMs of 16 rows or more; Linux must grant the tile state), "neon". "auto" honours the
 * environment variable SPFQ_ISA when it names one this CPU has (how a benchmark pins an ISA in
 * a runtime that links the kernels, e.g. the ORT custom-op library). Returns SPFQ_OK or
 * SPFQ_EUNSUPPORTED when the CPU / build lacks it. spfq_isa() names the active one. */
int spfq_set_isa(const char *name);
const char *spfq_isa(void);
int32_t spfq_abi_version(void);

#ifdef __cplusplus
}
#endif
#endif /* SPFQ_KERNELS_H */
