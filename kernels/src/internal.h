/* internal.h — what the per-ISA kernel files and api.c share (not part of the ABI).
 *
 * A kernel is a "range function": it computes output rows [n0, n1) for all M activation rows.
 * api.c splits N over threads of the pool in pool.c (chunks are multiples of 64 rows so
 * re-binarised output words are never shared between threads), applies the float epilogue of integer kernels, and picks the
 * ISA table. A NULL entry in an ISA table falls back to the portable C table.
 */
#ifndef SPFQ_INTERNAL_H
#define SPFQ_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "spfq_kernels.h"

#define SPFQ_WORDS(k) (((k) + 63) / 64)
#define SPFQ_DC_MAX_C 4 /* input channels of the direct few-channel conv (dconv.c) */

struct spfq_prepared {
    spfq_weights_desc d;  /* pointers point at the owned copies below */
    int32_t words;        /* W = ceil(K / 64) */
    /* owned storage */
    uint64_t *sign, *mask, *planes;
    float *scale, *lam, *bias;
    /* PLANES, SIGN_MASK and SIGN, x86-64 only (NULL elsewhere or if the allocation failed): the
     * same codes repacked once by spfq_planes_repack (intb.c) for the SIMD int8 GEMMs, layout
     * "RP": codes u with c = rp_mul * u - rp_off (PLANES: u = c + 2^(b-1); SIGN_MASK: c in
     * {-1, 0, 1}, u = c + 2 as for b = 2; SIGN: u = 1 - sign bit, c = 2u - 1) in fields of rp_cb
     * bits (1 for SIGN, 2 for b = 2 and SIGN_MASK, 4 for b = 3..4, 8 for b = 5..8), F = 8 / rp_cb fields per byte, kstep = 4 F columns per step. Rows in tiles of
     * 64 (4 groups of 16), columns in rp_steps = ceil(K / kstep) steps; byte
     *   rp[((tile * rp_steps + step) * 4 + group) * 64 + 4 * lane + i]
     * holds in bits [f * rp_cb, (f + 1) * rp_cb) the code of row tile * 64 + group * 16 + lane,
     * column step * kstep + 4 f + i (0 past N or K). So a 64-byte vector is 16 rows x kstep
     * columns: int32 lane = one row, its 4 bytes = 4 consecutive columns per field. */
    uint8_t *rp;
    int32_t rp_cb, rp_steps, rp_off, rp_mul;
    int32_t clamped;           /* spfq_set_clamp: y = min(max(y, lo), hi) in the epilogue */
    float clamp_lo, clamp_hi;
    int32_t act;               /* spfq_set_activation: enum spfq_activation after the clamp */
    float *act_slope;          /* PReLU: (N) owned */
    /* x86-64 with AMX: the signed codes in the tile layout of intb_amx.c, built by its first tall
     * call (NULL until then) */
    int8_t *_Atomic amx;
    /* spfq_conv_nhwc (int8): the same weights with columns (c, tap) reordered to (tap, c), so
     * the conv's GEMM rows are whole channel vectors per tap (api.c; built by its first call
     * with hwc_c input channels; NULL until then) */
    struct spfq_prepared *_Atomic hwc;
    int32_t hwc_c;
    /* tall weight-only calls: the codes as float values in output-lane order (dconv.c's tables,
     * spfq_dc_gemm; built by the first such call, NULL until then) */
    struct spfq_dc *_Atomic f32_lanes;
    /* group-wise scales (grouped.c's whole-K weight set, per-row scale 1): gscale[((n / 16) *
     * ngroups + g) * 16 + n % 16] = the float16 bits of row n's scale in group g (0 past N; the
     * .spfq scales are float16 values, and a decode step streams these with the codes: half the
     * bytes of float32); a group is gsteps RP steps (G = gsteps * kstep columns). NULL: per-row
     * scales. Only the fused grouped kernels read such a weight set (spfq_grouped_fused_ok). */
    uint16_t *gscale;
    int32_t gsteps, ngroups;
};

/* dconv.c: weight-only float GEMM rows through the few-channel conv's micro-kernel (outputs in
 * vector lanes, each x value broadcast), bit-identical with the f32 oracle. */
struct spfq_dc *spfq_dc_gemm(const struct spfq_prepared *w);
int spfq_dc_gemm_rows(const struct spfq_dc *p, int32_t m, const float *x, float *y);

/* api.c: spfq_matmul_f32 in the C oracle's order on every ISA and for any row count (the
 * output-lane tables when they fit, else the portable kernel); grouped.c's float path. */
int spfq_matmul_f32_oracle(const struct spfq_prepared *w, int32_t m, const float *x, float *y, int32_t nthreads);

/* act.c: the activation of spfq_set_activation on rows [0, rows) x outputs [n0, n1) of y (row
 * stride ldy; slope indexed by output), and on channel-major planes (NCHW outputs). */
void spfq_apply_act(int32_t kind, const float *slope, int32_t rows, int32_t n0, int32_t n1, float *y, size_t ldy);
void spfq_apply_act_planes(int32_t kind, const float *slope, int32_t batches, int32_t n, size_t p, float *y);
/* The whole output of a direct conv (NHWC or NCHW), after its kernels ran: the depthwise
 * layouts whose units are not rows of pixels, and spfq_dconv. */
void spfq_act_output(int32_t kind, const float *slope, int32_t nhwc, int32_t batches, int32_t n, size_t pixels,
                     float *y);
/* A validated, owned copy of an activation's slope (NULL: none needed / bad kind / no memory:
 * *rc says). */
float *spfq_act_slope(int32_t kind, const float *slope, int32_t n, int *rc);
/* Codes of one row (K int8 values) into its W packed words of layout SIGN / SIGN_MASK / PLANES
 * (api.c; planes `ps` words apart): the .spfq conventions of spfq_kernels.h. */
void spfq_encode_row(int layout, int bits, const int8_t *c, int32_t K, int32_t W, uint64_t *sign, uint64_t *mask,
                     uint64_t *planes, size_t ps);
/* Validate and install an activation on a prepared object's (act, act_slope) pair: the old
 * slopes are freed only once the new ones are in hand (nothing changes on an error). */
int spfq_act_set(int32_t *act, float **act_slope, int32_t kind, const float *slope, int32_t n);

/* The fused output clamp (NaN stays NaN; the same expression everywhere it is applied). */
static inline float spfq_clamp(float v, float lo, float hi) {
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

/* Fill w->rp / rp_cb / rp_steps / rp_off for PLANES or SIGN_MASK weights (intb.c). Returns
 * SPFQ_OK or SPFQ_ENOMEM (then w->rp stays NULL and the kernels decode the packed words). */
int spfq_planes_repack(struct spfq_prepared *w);

/* Signed codes of one weight row (K int8 values): SIGN / SIGN_MASK (binary.c), PLANES /
 * SPARSE (intb.c); for kernels that keep small weights unpacked (dwconv.c). */
void spfq_sign_row_codes(const struct spfq_prepared *w, int32_t n, int8_t *c);
void spfq_int_row_codes(const struct spfq_prepared *w, int32_t n, int8_t *c);
float spfq_int_value(int c, float scale, const float *lam, int32_t n); /* the f32 oracle's value(c) */
/* Signed codes of one weight row of any layout: the two above by the weights' layout. */
static inline void spfq_row_codes(const struct spfq_prepared *w, int32_t n, int8_t *c) {
    if (w->d.layout == SPFQ_SIGN || w->d.layout == SPFQ_SIGN_MASK)
        spfq_sign_row_codes(w, n, c);
    else
        spfq_int_row_codes(w, n, c);
}

typedef struct {
    const struct spfq_prepared *w;
    int32_t m;
    const float *x;        /* f32: (M, K) */
    float *y;              /* f32 out: (M, N) */
    const int8_t *xq;      /* i8: (M, K) */
    int32_t *acc_c;        /* i8 out: (M, N); NULL allowed for SIGN / SIGN_MASK */
    int32_t *acc_s;        /* i8 out: (M, N) */
    const uint64_t *xbits; /* bgemm: (M, W) */
    int32_t *dot;          /* bgemm out: (M, N) exact K - 2 popcount */
    int32_t m0;            /* rows [m0, m0 + m) of the call (api.c splits M too): the epilogues'
                              own arrays are indexed from m0; the pointers above already are */
    const float *xscale;   /* fused i8 kernels (y written directly): (M) activation scales */
    int32_t xstride;       /* fused i8 kernels: bytes between rows of xq (zero padded to whole RP steps) */
} spfq_job;

typedef void (*spfq_range_fn)(const spfq_job *job, int32_t n0, int32_t n1);

/* x86-64: acc (M, N) int32 = sum_k xq * c for rows [n0, n1) from the RP codes (w->rp), whatever
 * the layout they came from; 0 when it cannot run here (no rp, CPU lacks the ISA, no scratch).
 * intb_avx512.c / intb_avx2.c; the SIGN_MASK kernels use them for ternary weights. Weak: a build
 * without the intb files (a test) has NULL here. */
int spfq_rp_i8_avx512(const spfq_job *j, int32_t n0, int32_t n1, int32_t *acc) __attribute__((weak));
int spfq_rp_i8_avx2(const spfq_job *j, int32_t n0, int32_t n1, int32_t *acc) __attribute__((weak));

/* Tall int8 calls (api.c's row-block driver: at most SPFQ_TALL_ROWS rows per job) from RP codes
 * without lam, the epilogue fused: y = clamp(xscale * (scale * acc) + bias) from j->xq (rows
 * j->xstride bytes apart, zero padded to whole RP steps), j->xscale into j->y, the expression of
 * api.c's i8_finish. AVX2 (intb_avx2.c): PLANES b <= 4 and SIGN_MASK; AVX-512 (intb_avx512.c):
 * every layout with RP codes. api.c uses the active ISA's when its _ok(w) says so. */
#define SPFQ_TALL_ROWS 256
int spfq_rp_i8_fused_ok_avx2(const struct spfq_prepared *w) __attribute__((weak));
void spfq_rp_i8_fused_avx2(const spfq_job *j, int32_t n0, int32_t n1) __attribute__((weak));
int spfq_rp_i8_fused_ok_avx512(const struct spfq_prepared *w) __attribute__((weak));
void spfq_rp_i8_fused_avx512(const spfq_job *j, int32_t n0, int32_t n1) __attribute__((weak));

/* Group-wise scales with the epilogue fused (grouped.c's fast route, w->gscale set, no lam):
 * for each group g the exact int32 sum over its RP steps, then t_g = xscale * (gscale * acc) +
 * 0.0f, s = t_0 + t_1 + ... in registers, y = clamp(s + bias) -- spfq_kernels.h's order, so the
 * same bits as the per-group route. Job contract as spfq_rp_i8_fused_* (rows padded to whole RP
 * steps, j->xstride). AVX-512: every RP width; AVX2: rp_cb 2 / 4 with rp_mul 1. */
#define SPFQ_GROUPED_MAX_GROUPS 1024 /* per-group activation sums of 4 rows live on the stack */
int spfq_rp_grouped_ok_avx512(const struct spfq_prepared *w) __attribute__((weak));
void spfq_rp_grouped_avx512(const spfq_job *j, int32_t n0, int32_t n1) __attribute__((weak));
int spfq_rp_grouped_ok_avx2(const struct spfq_prepared *w) __attribute__((weak));
void spfq_rp_grouped_avx2(const spfq_job *j, int32_t n0, int32_t n1) __attribute__((weak));
/* api.c: spfq_matmul_i8 / _q8 on a weight set with gscale run one of them (1), or cannot (0:
 * the caller runs the per-group route) */
int spfq_grouped_fused_ok(const struct spfq_prepared *w, int32_t m);
/* Sums of each padded int8 row's group columns: xsg[a * ng + g] for rows [0, mr) of x (row
 * stride xstride, groups of gcols columns, ng groups). */
static inline void spfq_group_sums(const int8_t *x, size_t xstride, int32_t mr, int32_t gcols, int32_t ng,
                                   int32_t *xsg) {
    for (int32_t a = 0; a < mr; a++) {
        const int8_t *row = x + (size_t)a * xstride;
        for (int32_t g = 0; g < ng; g++) {
            const size_t c0 = (size_t)g * (size_t)gcols, c1 = c0 + (size_t)gcols < xstride ? c0 + (size_t)gcols : xstride;
            int32_t s = 0;
            for (size_t c = c0; c < c1; c++) s += row[c];
            xsg[a * ng + g] = s;
        }
    }
}

/* AMX (intb_amx.c): tall calls (m >= SPFQ_AMX_MIN_ROWS) of weights without lam on int8 tiles,
 * rows zero padded to 64-byte multiples; spfq_amx_available: the CPU has AMX-INT8 and the OS
 * granted the tile state. */
#define SPFQ_AMX_MIN_ROWS 16
int spfq_amx_available(void) __attribute__((weak));
int spfq_rp_i8_fused_ok_amx(const struct spfq_prepared *w) __attribute__((weak));
void spfq_rp_i8_fused_amx(const spfq_job *j, int32_t n0, int32_t n1) __attribute__((weak));
/* api.c: the active ISA is "avx512" or "amx" (AMX adds tiles to the AVX-512 kernels) */
int spfq_isa_avx512(void);

/* quant.c: spfq_quantize_i8 on rows ldx floats apart, written ldq bytes apart (columns [k, ldq)
 * untouched). */
void spfq_quant_rows(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq, float *xscale);

/* SIGN / SIGN_MASK kernels that computed acc_s only: acc_c (when asked for) is the same sums. */
static inline void spfq_mirror_acc(const spfq_job *j, int32_t n0, int32_t n1)
{
    if (!j->acc_c || j->acc_c == j->acc_s) return;
    const size_t N = (size_t)j->w->d.n;
    for (int32_t m = 0; m < j->m; m++)
        for (int32_t n = n0; n < n1; n++) j->acc_c[(size_t)m * N + n] = j->acc_s[(size_t)m * N + n];
}

/* Ternary (SIGN_MASK) x int8 through the RP codes? Measured (4096^2, 1536^2, 384^2; AVX-512):
 * RP wins at every M < 64 (M = 1: 3.1x) and at K = 4096 for every M; at M >= 64 with K <= 1536
 * the SIGN_MASK VNNI kernel, which reuses each decoded weight across more rows, is 3-11% faster.
 * The AVX2 kernels (no VNNI) take RP at every shape: MobileNetV2 1x1 convs 3136x24x144 3.5 ->
 * 1.4 ms, 3136x144x24 2.4 -> 0.8, 196x384x576 4.0 -> 1.8 (AVX2 EPYC, 1 thread). */
static inline int spfq_ternary_use_rp(int32_t m, int32_t k) { return m < 64 || k > 2048; }

/* Binary (SIGN) x int8 through the 1-bit RP codes (AVX-512 only)? Measured (384^2, 1536^2,
 * 4096^2): 4096^2 M = 1 0.085 -> 0.053 ms, RP ahead for every M < 16 and at M = 16 for K >= 1536;
 * at M >= 64 the SIGN VNNI / tile kernels are 1-17% faster. */
static inline int spfq_binary_use_rp(int32_t m, int32_t k) { return m < 16 || (m < 64 && k > 1024); }

/* Range functions, one per (layout, operation, ISA). Family files define them:
 *   binary.c / binary_avx2.c / binary_avx512.c / binary_neon.c : SIGN and SIGN_MASK (f32, i8), bgemm
 *   intb.c   / intb_avx2.c   / intb_avx512.c   / intb_neon.c   : PLANES and SPARSE (f32, i8)
 * A NULL avx512 entry falls back to avx2, then to C.
 * SIMD files use function-level target attributes (no global -mavx2), and are compiled only
 * on their architecture. api.c references every name weakly: a missing one is NULL and the
 * dispatcher falls back to the C version (or reports SPFQ_EUNSUPPORTED if that is missing). */
#define SPFQ_DECLARE_ISA(isa)                                                   \
    void spfq_sign_f32_##isa(const spfq_job *j, int32_t n0, int32_t n1);        \
    void spfq_sign_i8_##isa(const spfq_job *j, int32_t n0, int32_t n1);         \
    void spfq_sign_mask_f32_##isa(const spfq_job *j, int32_t n0, int32_t n1);   \
    void spfq_sign_mask_i8_##isa(const spfq_job *j, int32_t n0, int32_t n1);    \
    void spfq_bgemm_##isa(const spfq_job *j, int32_t n0, int32_t n1);           \
    void spfq_planes_f32_##isa(const spfq_job *j, int32_t n0, int32_t n1);      \
    void spfq_planes_i8_##isa(const spfq_job *j, int32_t n0, int32_t n1);       \
    void spfq_sparse_f32_##isa(const spfq_job *j, int32_t n0, int32_t n1);      \
    void spfq_sparse_i8_##isa(const spfq_job *j, int32_t n0, int32_t n1);

SPFQ_DECLARE_ISA(c)
SPFQ_DECLARE_ISA(avx2)
SPFQ_DECLARE_ISA(avx512)
SPFQ_DECLARE_ISA(neon)

/* pool.c: the persistent worker pool. spfq_pool_run calls fn(ctx, c, n) for every c in [0, n)
 * and returns n: n = nchunks claimed dynamically by the caller and up to nthreads - 1 workers
 * (<= SPFQ_POOL_MAX threads), or n = 1 (one call on the caller) when nthreads <= 1 or the pool
 * is busy with another host thread's task. spfq_pool_workers: workers started (-1 if busy). */
#define SPFQ_POOL_MAX 64
/* Per-thread grow-only scratch buffers (pool.c), one per slot, 64-byte aligned: a fresh malloc
 * of a conv-sized buffer is an mmap whose pages fault in (and are cleared) on every call, which
 * cost as much as the GEMM itself on MobileNetV2's 1x1 convs. Freed when the thread exits.
 * zeroed: the buffer is zero when (re)allocated (for a slot no caller writes). NULL: no memory. */
enum spfq_scratch_slot {
    SPFQ_SCR_XQ, SPFQ_SCR_XS, SPFQ_SCR_ACC, SPFQ_SCR_ROWS, SPFQ_SCR_Y,          /* api.c row units */
    SPFQ_SCR_DW_XIN, SPFQ_SCR_DW_QTMP, SPFQ_SCR_DW_STMP, SPFQ_SCR_DW_YTMP,       /* dwconv.c */
    SPFQ_SCR_DW_ZERO, SPFQ_SCR_DW_TAPS, SPFQ_SCR_DC_TOFS, SPFQ_SCR_SLOTS
};
void *spfq_scratch(int slot, size_t bytes, int zeroed);

/* nthreads, or 1 for a call with less work (multiply-adds, or taps x outputs of a direct conv /
 * pooling) than SPFQ_PARALLEL_MIN_WORK (default 2^20; the environment variable overrides it,
 * e.g. 0 in the tests of thread splitting): waking the pool costs more than such a call saves
 * (MNIST at batch 1: 0.08 ms on 1 thread, 0.10-0.11 ms on 2 before this rule). pool.c. */
int32_t spfq_threads_for(int64_t work, int32_t nthreads);
typedef void (*spfq_pool_fn)(void *ctx, int32_t c, int32_t n);
int32_t spfq_pool_run(int32_t nthreads, int32_t nchunks, spfq_pool_fn fn, void *ctx);
int32_t spfq_pool_workers(void);

#endif /* SPFQ_INTERNAL_H */
