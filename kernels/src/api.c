/* api.c — the ABI of spfq_kernels.h: argument checks, owned weight copies, ISA dispatch,
 * threads over output rows (on the pool of pool.c), the float epilogue of integer kernels.
 * Kernels themselves live in the family files (binary*.c, intb*.c), the activation quantisers
 * in quant.c. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* Every range function is referenced weakly: a family or ISA not built in is NULL here. */
#define SPFQ_WEAK_ISA(isa)                                                            \
    __attribute__((weak)) void spfq_sign_f32_##isa(const spfq_job *, int32_t, int32_t);      \
    __attribute__((weak)) void spfq_sign_i8_##isa(const spfq_job *, int32_t, int32_t);       \
    __attribute__((weak)) void spfq_sign_mask_f32_##isa(const spfq_job *, int32_t, int32_t); \
    __attribute__((weak)) void spfq_sign_mask_i8_##isa(const spfq_job *, int32_t, int32_t);  \
    __attribute__((weak)) void spfq_bgemm_##isa(const spfq_job *, int32_t, int32_t);         \
    __attribute__((weak)) void spfq_planes_f32_##isa(const spfq_job *, int32_t, int32_t);    \
    __attribute__((weak)) void spfq_planes_i8_##isa(const spfq_job *, int32_t, int32_t);     \
    __attribute__((weak)) void spfq_sparse_f32_##isa(const spfq_job *, int32_t, int32_t);    \
    __attribute__((weak)) void spfq_sparse_i8_##isa(const spfq_job *, int32_t, int32_t);
SPFQ_WEAK_ISA(c)
SPFQ_WEAK_ISA(avx2)
SPFQ_WEAK_ISA(avx512)
SPFQ_WEAK_ISA(neon)

typedef struct {
    const char *name;
    spfq_range_fn f32[5], i8[5], bgemm;
} isa_table;

#define SPFQ_TABLE(isa)                                                                    \
    {#isa,                                                                                 \
     {NULL, spfq_sign_f32_##isa, spfq_sign_mask_f32_##isa, spfq_planes_f32_##isa,           \
      spfq_sparse_f32_##isa},                                                              \
     {NULL, spfq_sign_i8_##isa, spfq_sign_mask_i8_##isa, spfq_planes_i8_##isa,              \
      spfq_sparse_i8_##isa},                                                               \
     spfq_bgemm_##isa}

static const isa_table table_c = SPFQ_TABLE(c);
static const isa_table table_avx2 = SPFQ_TABLE(avx2);
static const isa_table table_avx512 = SPFQ_TABLE(avx512);
/* AVX-512 with AMX tiles: the AVX-512 kernels, and AMX for tall int8 GEMMs (intb_amx.c) */
static const isa_table table_amx = {"amx",
                                    {NULL, spfq_sign_f32_avx512, spfq_sign_mask_f32_avx512, spfq_planes_f32_avx512,
                                     spfq_sparse_f32_avx512},
                                    {NULL, spfq_sign_i8_avx512, spfq_sign_mask_i8_avx512, spfq_planes_i8_avx512,
                                     spfq_sparse_i8_avx512},
                                    spfq_bgemm_avx512};
static const isa_table table_neon = SPFQ_TABLE(neon);
static const isa_table *active = NULL;

static int cpu_has(const char *isa) {
    if (!strcmp(isa, "c")) return 1;
#if defined(__x86_64__)
    if (!strcmp(isa, "avx512")) { /* the subset the avx512 kernels may use */
        __builtin_cpu_init();
        return cpu_has("avx2") && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
               __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512bitalg") &&
               __builtin_cpu_supports("bmi2");
    }
    if (!strcmp(isa, "amx")) return cpu_has("avx512") && spfq_amx_available && spfq_amx_available();
    if (!strcmp(isa, "avx2")) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
               __builtin_cpu_supports("popcnt");
    }
#endif
#if defined(__aarch64__)
    if (!strcmp(isa, "neon")) return 1; /* baseline on aarch64 */
#endif
    return 0;
}

int spfq_set_isa(const char *name) {
    if (!name) return SPFQ_EINVAL;
    if (!strcmp(name, "auto")) { /* SPFQ_ISA pins one the CPU has (benchmarks' A/B runs) */
        const char *env = getenv("SPFQ_ISA");
        if (env && *env && strcmp(env, "auto") && spfq_set_isa(env) == SPFQ_OK) return SPFQ_OK;
        active = cpu_has("amx") ? &table_amx : cpu_has("avx512") ? &table_avx512 : cpu_has("avx2") ? &table_avx2
               : cpu_has("neon") ? &table_neon : &table_c;
        return SPFQ_OK;
    }
    const isa_table *t = !strcmp(name, "c") ? &table_c : !strcmp(name, "avx2") ? &table_avx2
                       : !strcmp(name, "avx512") ? &table_avx512 : !strcmp(name, "amx") ? &table_amx
                       : !strcmp(name, "neon") ? &table_neon : NULL;
    if (!t || !cpu_has(name)) return SPFQ_EUNSUPPORTED;
    active = t;
    return SPFQ_OK;
}

static const isa_table *isa(void) {
    if (!active) spfq_set_isa("auto");
    return active;
}

const char *spfq_isa(void) { return isa()->name; }
int spfq_isa_avx512(void) { return isa() == &table_avx512 || isa() == &table_amx; }
int32_t spfq_abi_version(void) { return SPFQ_ABI_VERSION; }

static spfq_range_fn pick(spfq_range_fn simd, spfq_range_fn portable) { return simd ? simd : portable; }

/* The kernel for one (operation, layout) on the active ISA: avx512 falls back to avx2, any
 * SIMD table to the portable C one. */
#define FIND(field) (spfq_isa_avx512() && !table_avx512.field ? pick(table_avx2.field, table_c.field) \
                                                                 : pick(isa()->field, table_c.field))

/* ------------------------------------------------------------------ weights */

static void *copy(const void *src, size_t bytes, int *fail) {
    if (!src || !bytes) return NULL;
    void *dst = malloc(bytes);
    if (!dst) { *fail = 1; return NULL; }
    memcpy(dst, src, bytes);
    return dst;
}

int spfq_prepare(const spfq_weights_desc *w, spfq_prepared **out) {
    if (!w || !out || w->n <= 0 || w->k <= 0 || !w->scale) return SPFQ_EINVAL;
    *out = NULL;
    size_t W = SPFQ_WORDS((size_t)w->k), N = (size_t)w->n, rowbytes = N * W * 8;
    size_t plane_bytes = 0;
    switch (w->layout) {
    case SPFQ_SIGN: if (!w->sign) return SPFQ_EINVAL; break;
    case SPFQ_SIGN_MASK: if (!w->sign || !w->mask) return SPFQ_EINVAL; break;
    case SPFQ_PLANES:
        if (!w->planes || w->bits < 2 || w->bits > 8) return SPFQ_EINVAL;
        plane_bytes = (size_t)w->bits * rowbytes; break;
    case SPFQ_SPARSE:
        if (!w->mask || w->bits < 2 || w->bits > 8 || w->kept_words < 0 ||
            (w->kept_words > 0 && !w->planes)) return SPFQ_EINVAL;
        plane_bytes = (size_t)w->bits * N * (size_t)w->kept_words * 8; break;
    default: return SPFQ_EINVAL;
    }
    spfq_prepared *p = calloc(1, sizeof *p);
    if (!p) return SPFQ_ENOMEM;
    int fail = 0;
    p->d = *w;
    p->words = (int32_t)W;
    if (w->layout == SPFQ_SIGN || w->layout == SPFQ_SIGN_MASK) p->sign = copy(w->sign, rowbytes, &fail);
    if (w->layout != SPFQ_SIGN && w->layout != SPFQ_PLANES) p->mask = copy(w->mask, rowbytes, &fail);
    p->planes = copy(w->planes, plane_bytes, &fail);
    p->scale = copy(w->scale, N * 4, &fail);
    p->lam = copy(w->lam, N * 4, &fail);
    p->bias = copy(w->bias, N * 4, &fail);
    p->d.sign = p->sign; p->d.mask = p->mask; p->d.planes = p->planes;
    p->d.scale = p->scale; p->d.lam = p->lam; p->d.bias = p->bias;
    if (w->layout == SPFQ_SIGN || w->layout == SPFQ_SIGN_MASK) { /* one level: scale; lam unused */
        free(p->lam);
        p->lam = NULL;
        p->d.lam = NULL;
    }
    if (fail) { spfq_free(p); return SPFQ_ENOMEM; }
#if defined(__x86_64__)
    /* kernel-private interleaved codes for the AVX-512 / AVX2 int8 GEMMs (AVX2: every PLANES width;
     * ternary SIGN_MASK codes are b = 2 codes; failure: the kernels decode the packed words) */
    if ((w->layout == SPFQ_PLANES && (cpu_has("avx512") || cpu_has("avx2"))) ||
        (w->layout == SPFQ_SIGN_MASK && (cpu_has("avx512") || cpu_has("avx2"))) ||
        (w->layout == SPFQ_SIGN && cpu_has("avx512"))) /* 1-bit fields: AVX-512 reads them */
        spfq_planes_repack(p);
#endif
    *out = p;
    return SPFQ_OK;
}

void spfq_free(spfq_prepared *p) {
    if (!p) return;
    free(p->sign); free(p->mask); free(p->planes);
    free(p->scale); free(p->lam); free(p->bias);
    free(p->rp);
    free(p->gscale);
    free(p->amx);
    free(p->act_slope);
    spfq_free(p->hwc);
    spfq_dc_free(p->f32_lanes);
    free(p);
}

/* ------------------------------------------------------------------ threads */

typedef struct {
    spfq_range_fn fn;
    const spfq_job *job;
    void (*after)(const spfq_job *, int32_t, int32_t, void *);
    void *after_ctx;
    int32_t mparts; /* the call's rows split into this many parts (1: every chunk has all rows) */
} task;

/* Chunk t of nt: whole 64-row blocks (re-binarised output words are never shared), then the
 * epilogue on the same rows while they are hot. */
static void run_slice(void *arg, int32_t t, int32_t nt) {
    const task *s = arg;
    const spfq_job *j = s->job;
    const int32_t N = j->w->d.n, blocks = (N + 63) / 64, mparts = s->mparts, nparts = nt / mparts;
    const int32_t tn = t % nparts, tm = t / nparts;
    const int32_t b0 = (int32_t)((int64_t)blocks * tn / nparts), b1 = (int32_t)((int64_t)blocks * (tn + 1) / nparts);
    const int32_t n0 = b0 * 64, n1 = b1 * 64 < N ? b1 * 64 : N;
    if (n0 >= n1) return;
    if (mparts == 1) {
        s->fn(j, n0, n1);
        if (s->after) s->after(j, n0, n1, s->after_ctx);
        return;
    }
    const int32_t m0 = (int32_t)((int64_t)j->m * tm / mparts), m1 = (int32_t)((int64_t)j->m * (tm + 1) / mparts);
    if (m0 >= m1) return;
    const size_t K = (size_t)j->w->d.k, W = (size_t)j->w->words, r = (size_t)m0;
    spfq_job sub = *j; /* rows [m0, m1): every M-indexed pointer moved to row m0 */
    sub.m = m1 - m0;
    sub.m0 = j->m0 + m0;
    if (j->x) sub.x = j->x + r * K;
    if (j->y) sub.y = j->y + r * N;
    if (j->xq) sub.xq = j->xq + r * K;
    if (j->acc_c) sub.acc_c = j->acc_c + r * N;
    if (j->acc_s) sub.acc_s = j->acc_s + r * N;
    if (j->xbits) sub.xbits = j->xbits + r * W;
    if (j->dot) sub.dot = j->dot + r * N;
    if (j->xscale) sub.xscale = j->xscale + r;
    s->fn(&sub, n0, n1);
    if (s->after) s->after(&sub, n0, n1, s->after_ctx);
}

/* Split [0, N) over up to nthreads threads of the persistent pool (pool.c): 4 chunks per thread
 * (at most one per 64-row block), claimed dynamically, so a thread that starts late or runs
 * slowly (a busy shared machine) leaves its chunks to the others. Kernels repeat small per-call
 * setup (activation sums / permutations) per chunk, hence not more chunks than that. */
static int parallel(spfq_range_fn fn, const spfq_job *job, int32_t nthreads,
                    void (*after)(const spfq_job *, int32_t, int32_t, void *), void *ctx) {
    const int32_t blocks = (job->w->d.n + 63) / 64;
    nthreads = spfq_threads_for((int64_t)job->m * job->w->d.k * job->w->d.n, nthreads);
    if (nthreads > SPFQ_POOL_MAX) nthreads = SPFQ_POOL_MAX;
    /* fewer 64-row blocks than 4 per thread (a conv's pixels x a few output channels): the
     * activation rows are split too, into parts of at least 64 rows */
    int32_t mparts = 1;
    if (nthreads > 1 && blocks < 4 * nthreads && job->m >= 128) {
        const int32_t want = (4 * nthreads + blocks - 1) / blocks, most = job->m / 64;
        mparts = want < most ? want : most;
    }
    if (mparts == 1 && nthreads > blocks) nthreads = blocks;
    const int32_t nparts = nthreads <= 1 ? 1 : (4 * nthreads < blocks ? 4 * nthreads : blocks);
    task s = {fn, job, after, ctx, mparts};
    spfq_pool_run(nthreads, nparts * mparts, run_slice, &s);
    return SPFQ_OK;
}

/* ------------------------------------------------------------------ entry points */

static int check(const spfq_prepared *w, int32_t m) { return (!w || m < 0) ? SPFQ_EINVAL : SPFQ_OK; }

int spfq_set_clamp(spfq_prepared *w, float lo, float hi) {
    if (!w || lo != lo || hi != hi || lo > hi) return SPFQ_EINVAL;
    w->clamp_lo = lo;
    w->clamp_hi = hi;
    w->clamped = !(lo == -INFINITY && hi == INFINITY);
    if (w->hwc) spfq_set_clamp(w->hwc, lo, hi); /* the reordered copy of spfq_conv_nhwc */
    if (w->f32_lanes) spfq_dc_set_clamp(w->f32_lanes, lo, hi);
    return SPFQ_OK;
}

int spfq_set_activation(spfq_prepared *w, int32_t kind, const float *slope) {
    if (!w) return SPFQ_EINVAL;
    int rc;
    float *copy = spfq_act_slope(kind, slope, w->d.n, &rc);
    if (rc) return rc;
    if (w->hwc && (rc = spfq_set_activation(w->hwc, kind, slope))) { /* the reordered copy */
        free(copy);
        return rc;
    }
    free(w->act_slope);
    w->act_slope = copy;
    w->act = kind; /* (the lane tables of f32_lanes: tall_unit applies it after them) */
    return SPFQ_OK;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EPI_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define EPI_CLONES
#endif

/* The clamp and activation on the rows [n0, n1) this thread made (weight-only kernels write y
 * themselves). */
EPI_CLONES static void f32_finish(const spfq_job *j, int32_t n0, int32_t n1, void *ctx) {
    (void)ctx;
    const struct spfq_prepared *w = j->w;
    const int32_t N = w->d.n;
    const float lo = w->clamp_lo, hi = w->clamp_hi;
    for (int32_t m = 0; w->clamped && m < j->m; m++) {
        float *y = j->y + (size_t)m * N;
        for (int32_t n = n0; n < n1; n++) y[n] = spfq_clamp(y[n], lo, hi);
    }
    if (w->act) spfq_apply_act(w->act, w->act_slope, j->m, n0, n1, j->y, (size_t)N);
}


int spfq_matmul_i8_raw(const spfq_prepared *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                       int32_t *acc_s, int32_t nthreads) {
    if (check(w, m) || !xq || !acc_s) return SPFQ_EINVAL;
    int L = w->d.layout;
    if (!acc_c && (L == SPFQ_PLANES || L == SPFQ_SPARSE)) return SPFQ_EINVAL;
    spfq_range_fn fn = FIND(i8[L]);
    if (!fn) return SPFQ_EUNSUPPORTED;
    spfq_job job = {.w = w, .m = m, .xq = xq, .acc_c = acc_c, .acc_s = acc_s};
    return m ? parallel(fn, &job, nthreads, NULL, NULL) : SPFQ_OK;
}

typedef struct { const float *xscale; float *y; } i8_epilogue;

/* y = xscale * (scale * acc_c + (lam - scale) * acc_s) + bias (then the clamp), on the rows
 * this thread made. One loop per form so each vectorises (no fused multiply-add: ISO C). */
EPI_CLONES static void i8_finish(const spfq_job *j, int32_t n0, int32_t n1, void *ctx) {
    const i8_epilogue *e = ctx;
    const struct spfq_prepared *w = j->w;
    const spfq_weights_desc *d = &w->d;
    const int32_t N = d->n;
    const int two = (d->layout == SPFQ_PLANES || d->layout == SPFQ_SPARSE);
    const float *restrict sc = d->scale, *restrict lam = d->lam, *restrict bias = d->bias;
    const float lo = w->clamped ? w->clamp_lo : -INFINITY, hi = w->clamped ? w->clamp_hi : INFINITY;
    for (int32_t m = 0; m < j->m; m++) {
        const float xs = e->xscale[j->m0 + m];
        const size_t r = (size_t)m * N;
        const int32_t *restrict ac = two ? j->acc_c + r : NULL, *restrict as = j->acc_s ? j->acc_s + r : NULL;
        float *restrict y = e->y + (size_t)j->m0 * N + r;
        if (!two)
            for (int32_t n = n0; n < n1; n++)
                y[n] = spfq_clamp(xs * (sc[n] * (float)as[n]) + (bias ? bias[n] : 0.0f), lo, hi);
        else if (lam)
            for (int32_t n = n0; n < n1; n++)
                y[n] = spfq_clamp(xs * (sc[n] * (float)ac[n] + (lam[n] - sc[n]) * (float)as[n]) + (bias ? bias[n] : 0.0f),
                                  lo, hi);
        else
            for (int32_t n = n0; n < n1; n++)
                y[n] = spfq_clamp(xs * (sc[n] * (float)ac[n]) + (bias ? bias[n] : 0.0f), lo, hi);
    }
}

/* ------------------------------------------------------------------ tall int8 calls */

/* A call with many activation rows (a conv's pixels) runs in units of `rows` rows x a part of the
 * outputs, claimed dynamically by the call's threads: each unit quantises its rows (float input)
 * into a cache-resident block, runs the kernel on them, and applies the epilogue while the sums
 * are hot (fused into the kernel where the ISA has one). One pool hand-off per call, not one per
 * row block, and quantisation runs on every thread. */
/* A convolution's GEMM rows made per block (spfq_conv_nhwc): row (b, oh, ow), columns
 * (c, kh, kw) as PyTorch flattens the weight, zeros in the padding. */
typedef struct conv_src_s {
    spfq_conv_geom g;
    int32_t H, W, OH, OW, hwc; /* hwc: columns (tap, c) instead (the reordered weights of conv_hwc) */
    const float *x;            /* (B, H, W, channels) */
} conv_src;

static void conv_rows(const conv_src *s, int32_t r0, int32_t r, float *dst) {
    const spfq_conv_geom *g = &s->g;
    const int32_t C = g->channels, taps = g->kh * g->kw, K = C * taps;
    for (int32_t i = 0; i < r; i++, dst += K) {
        const int64_t row = (int64_t)r0 + i, pix = row % ((int64_t)s->OH * s->OW), b = row / ((int64_t)s->OH * s->OW);
        const int32_t oh = (int32_t)(pix / s->OW), ow = (int32_t)(pix % s->OW);
        if (s->hwc) { /* columns (tap, c): one channel vector per tap */
            for (int32_t kh = 0; kh < g->kh; kh++) {
                const int32_t ih = oh * g->sh - g->pt + kh * g->dh;
                for (int32_t kw = 0; kw < g->kw; kw++) {
                    const int32_t iw = ow * g->sw - g->pl + kw * g->dw;
                    float *d = dst + (size_t)(kh * g->kw + kw) * C;
                    if (ih < 0 || ih >= s->H || iw < 0 || iw >= s->W)
                        memset(d, 0, (size_t)C * sizeof(float));
                    else
                        memcpy(d, s->x + (((size_t)b * s->H + ih) * s->W + iw) * C, (size_t)C * sizeof(float));
                }
            }
            continue;
        }
        for (int32_t kh = 0; kh < g->kh; kh++) {
            const int32_t ih = oh * g->sh - g->pt + kh * g->dh;
            for (int32_t kw = 0; kw < g->kw; kw++) {
                const int32_t iw = ow * g->sw - g->pl + kw * g->dw, t = kh * g->kw + kw;
                if (ih < 0 || ih >= s->H || iw < 0 || iw >= s->W) {
                    for (int32_t c = 0; c < C; c++) dst[c * taps + t] = 0.0f;
                    continue;
                }
                const float *px = s->x + (((size_t)b * s->H + ih) * s->W + iw) * C;
                for (int32_t c = 0; c < C; c++) dst[c * taps + t] = px[c];
            }
        }
    }
}

/* Tall weight-only calls with at least this many rows and at most SPFQ_F32_LANES_MAX weights
 * run on float weight tables in output-lane order (dconv.c's micro-kernel; 4 bytes per weight,
 * hence the cap): the packed f32 kernels are GEMV kernels (MobileNetV2's 12544 x 16 -> 96 conv:
 * 51 ms on them). */
#ifndef SPFQ_F32_LANES_MIN_ROWS
#define SPFQ_F32_LANES_MIN_ROWS 16
#endif
#define SPFQ_F32_LANES_MAX ((int64_t)1 << 22)

static pthread_mutex_t lanes_mu = PTHREAD_MUTEX_INITIALIZER;
static const struct spfq_dc *f32_lanes(const spfq_prepared *cw) {
    spfq_prepared *w = (spfq_prepared *)cw; /* a cache, not part of the weights' value */
    struct spfq_dc *have = atomic_load_explicit(&w->f32_lanes, memory_order_acquire);
    if (have) return have;
    pthread_mutex_lock(&lanes_mu);
    if (!w->f32_lanes) atomic_store_explicit(&w->f32_lanes, spfq_dc_gemm(w), memory_order_release);
    pthread_mutex_unlock(&lanes_mu);
    return w->f32_lanes;
}

typedef struct {
    const spfq_prepared *w;
    const struct spfq_dc *lanes;  /* f32 on the lane tables (whole rows: nparts == 1) */
    spfq_range_fn fused, fn;      /* fused kernel, else kernel + i8_finish (f32: the f32 kernel) */
    int32_t m, rows, nparts, units, kp, f32;
    const conv_src *conv;         /* float rows made per unit from a conv input; or */
    const float *x;               /* float rows (quantised per unit unless f32); or NULL: */
    const int8_t *xq;             /* int8 rows (row stride xq_ld) and their scales */
    const float *xscale;
    size_t xq_ld;
    float *y;                     /* float outputs; or NULL: */
    int8_t *yq;                   /* outputs quantised per row (whole rows: nparts == 1) */
    float *yscale;
    _Atomic int failed;
} tall_task;

/* Bytes per padded int8 row the kernel reads: whole 64-byte tile rows for AMX, whole RP steps
 * for the other fused kernels, K for the rest. */
static int32_t tall_kp(const spfq_prepared *w, spfq_range_fn fused) {
    if (!fused) return w->d.k;
    if (fused == spfq_rp_i8_fused_amx) return (w->d.k + 63) / 64 * 64;
    const int32_t kstep = 4 * (8 / w->rp_cb);
    return w->rp_steps * kstep;
}

static void tall_unfused(tall_task *t, int32_t r, const int8_t *xq, const float *xs, float *y, int32_t n0, int32_t n1);

static void tall_unit(tall_task *t, int32_t u) {
    const spfq_prepared *w = t->w;
    const int32_t N = w->d.n, K = w->d.k, rb = u / t->nparts, part = u % t->nparts;
    const int32_t r0 = rb * t->rows, r = t->m - r0 < t->rows ? t->m - r0 : t->rows;
    const int32_t blocks = (N + 63) / 64;
    const int32_t n0 = (int32_t)((int64_t)blocks * part / t->nparts) * 64;
    const int32_t n1b = (int32_t)((int64_t)blocks * (part + 1) / t->nparts) * 64, n1 = n1b < N ? n1b : N;
    if (n0 >= n1 || r <= 0) return;
    const float *rows = t->x ? t->x + (size_t)r0 * K : NULL;
    if (t->conv) {
        float *buf = spfq_scratch(SPFQ_SCR_ROWS, (size_t)r * (size_t)K * sizeof(float), 0);
        if (!buf) {
            atomic_store(&t->failed, 1);
            return;
        }
        conv_rows(t->conv, r0, r, buf);
        rows = buf;
    }
    float *y = t->y ? t->y + (size_t)r0 * N : spfq_scratch(SPFQ_SCR_Y, (size_t)r * (size_t)N * sizeof(float), 0);
    if (!y) {
        atomic_store(&t->failed, 1);
        return;
    }
    if (t->f32) {
        spfq_job job = {.w = w, .m = r, .x = rows, .y = y};
        if (!t->lanes) {
            t->fn(&job, n0, n1);
            if (w->clamped || w->act) f32_finish(&job, n0, n1, NULL);
        } else if (spfq_dc_gemm_rows(t->lanes, r, rows, y)) { /* clamped inside */
            atomic_store(&t->failed, 1);
            return;
        } else if (w->act) {
            spfq_apply_act(w->act, w->act_slope, r, n0, n1, y, (size_t)N);
        }
        if (t->yq) spfq_quant_rows(r, N, y, (size_t)N, t->yq + (size_t)r0 * N, (size_t)N, t->yscale + r0);
        return;
    }
    const int8_t *xq;
    const float *xs;
    const size_t kp = (size_t)t->kp;
    if (rows || (t->xq_ld != kp)) { /* quantise, or copy to the padded stride */
        int8_t *buf = spfq_scratch(SPFQ_SCR_XQ, (size_t)r * kp, 0);
        float *sb = rows ? spfq_scratch(SPFQ_SCR_XS, (size_t)r * sizeof(float), 0) : NULL;
        if (!buf || (rows && !sb)) {
            atomic_store(&t->failed, 1);
            return;
        }
        if (rows) {
            spfq_quant_rows(r, K, rows, (size_t)K, buf, kp, sb);
            xs = sb;
        } else {
            for (int32_t i = 0; i < r; i++) memcpy(buf + (size_t)i * kp, t->xq + (size_t)(r0 + i) * t->xq_ld, (size_t)K);
            xs = t->xscale + r0;
        }
        if (kp > (size_t)K)
            for (int32_t i = 0; i < r; i++) memset(buf + (size_t)i * kp + K, 0, kp - (size_t)K);
        xq = buf;
    } else {
        xq = t->xq + (size_t)r0 * kp;
        xs = t->xscale + r0;
    }
    if (t->fused) {
        spfq_job job = {.w = w, .m = r, .xq = xq, .xscale = xs, .y = y, .xstride = (int32_t)kp};
        t->fused(&job, n0, n1);
    } else {
        tall_unfused(t, r, xq, xs, y, n0, n1);
        if (atomic_load(&t->failed)) return;
    }
    if (w->act) spfq_apply_act(w->act, w->act_slope, r, n0, n1, y, (size_t)N); /* while in cache */
    if (t->yq) /* the next layer's quantisation of these rows, while they are in cache */
        spfq_quant_rows(r, N, y, (size_t)N, t->yq + (size_t)r0 * N, (size_t)N, t->yscale + r0);
}

/* The unfused integer kernel then i8_finish, on the sums of a unit's rows. */
static void tall_unfused(tall_task *t, int32_t r, const int8_t *xq, const float *xs, float *y, int32_t n0, int32_t n1) {
    const spfq_prepared *w = t->w;
    const int32_t N = w->d.n;
    const int L = w->d.layout, two = (L == SPFQ_PLANES || L == SPFQ_SPARSE);
    const int need_s = !two || w->d.lam != NULL; /* int layouts without lam: acc_c only */
    const size_t cells = (size_t)r * (size_t)N;
    int32_t *acc = spfq_scratch(SPFQ_SCR_ACC, cells * sizeof(int32_t) * (size_t)(two + need_s), 0);
    if (!acc) {
        atomic_store(&t->failed, 1);
        return;
    }
    spfq_job job = {.w = w, .m = r, .xq = xq, .acc_s = need_s ? acc : NULL,
                    .acc_c = two ? acc + (need_s ? cells : 0) : NULL};
    i8_epilogue e = {xs, y};
    t->fn(&job, n0, n1);
    i8_finish(&job, n0, n1, &e);
}

static void tall_chunk(void *ctx, int32_t c, int32_t n) {
    tall_task *t = ctx;
    const int32_t u0 = (int32_t)((int64_t)t->units * c / n), u1 = (int32_t)((int64_t)t->units * (c + 1) / n);
    for (int32_t u = u0; u < u1; u++) tall_unit(t, u);
}

/* The fused kernel of the active ISA for these weights and m rows, or NULL. */
static spfq_range_fn fused_kernel(const spfq_prepared *w, int32_t m) {
#if defined(__x86_64__)
    if (w->gscale) { /* group-wise scales: only these kernels know them */
        if (w->ngroups > SPFQ_GROUPED_MAX_GROUPS) return NULL;
        if (spfq_isa_avx512() && spfq_rp_grouped_avx512 && spfq_rp_grouped_ok_avx512(w)) return spfq_rp_grouped_avx512;
        if (isa() == &table_avx2 && spfq_rp_grouped_avx2 && spfq_rp_grouped_ok_avx2(w)) return spfq_rp_grouped_avx2;
        return NULL;
    }
    if (isa() == &table_amx && m >= SPFQ_AMX_MIN_ROWS && spfq_rp_i8_fused_amx && spfq_rp_i8_fused_ok_amx(w))
        return spfq_rp_i8_fused_amx;
    if (spfq_isa_avx512() && spfq_rp_i8_fused_avx512 && spfq_rp_i8_fused_ok_avx512(w)) return spfq_rp_i8_fused_avx512;
    if (isa() == &table_avx2 && spfq_rp_i8_fused_avx2 && spfq_rp_i8_fused_ok_avx2(w)) return spfq_rp_i8_fused_avx2;
#endif
    (void)w;
    (void)m;
    return NULL;
}

int spfq_grouped_fused_ok(const spfq_prepared *w, int32_t m) { return w && w->gscale && fused_kernel(w, m) != NULL; }

/* x (float) or xq + xscale (int8) or a conv's input -> y through the row-block driver; f32:
 * weight-only (x or conv). */
static int tall_run(const spfq_prepared *w, int32_t m, const float *x, const int8_t *xq, const float *xscale,
                    const struct conv_src_s *conv, int f32, float *y, int8_t *yq, float *yscale, int32_t nthreads) {
    const int L = w->d.layout;
    tall_task t = {.w = w, .m = m, .x = x, .xq = xq, .xscale = xscale, .conv = conv, .f32 = f32, .y = y,
                   .yq = yq, .yscale = yscale};
    t.fused = f32 ? NULL : fused_kernel(w, m);
    if (f32 && (m >= SPFQ_F32_LANES_MIN_ROWS || f32 == 2) && (int64_t)w->d.k * w->d.n <= SPFQ_F32_LANES_MAX)
        t.lanes = f32_lanes(w);
    t.fn = t.fused ? NULL : f32 == 2 ? table_c.f32[L] : f32 ? FIND(f32[L]) : FIND(i8[L]);
    if (!t.fused && !t.fn) return SPFQ_EUNSUPPORTED;
    t.kp = tall_kp(w, t.fused);
    t.xq_ld = (size_t)w->d.k;
    /* rows per unit: their int8 block stays in L1 (16 KiB), 16..SPFQ_TALL_ROWS, a multiple of 4 */
    int32_t rows = 16384 / (t.kp > 0 ? t.kp : 1);
    rows = rows < 16 ? 16 : rows > SPFQ_TALL_ROWS ? SPFQ_TALL_ROWS : rows & ~3;
    if (t.fused == spfq_rp_i8_fused_amx && rows < 32) rows = 32; /* 2 A tiles of 16 rows per pass */
    t.rows = rows;
    const int32_t rblocks = (m + rows - 1) / rows, blocks = (w->d.n + 63) / 64;
    if (nthreads > SPFQ_POOL_MAX) nthreads = SPFQ_POOL_MAX;
    nthreads = spfq_threads_for((int64_t)m * w->d.k * w->d.n, nthreads);
    int32_t nparts = 1; /* few row blocks: split the outputs too, so that every thread has work */
    if (nthreads > 1 && rblocks < 4 * nthreads && !yq && !t.lanes) { /* (these two need whole rows) */
        nparts = (4 * nthreads + rblocks - 1) / rblocks;
        if (nparts > blocks) nparts = blocks;
    }
    t.nparts = nparts;
    t.units = rblocks * nparts;
    int8_t *own = NULL;
    float *own_s = NULL;
    if (x && !f32 && nparts > 1) { /* quantise once, not once per part */
        own = malloc((size_t)m * (size_t)w->d.k + 1);
        own_s = malloc((size_t)m * sizeof(float) + 1);
        if (!own || !own_s) {
            free(own);
            free(own_s);
            return SPFQ_ENOMEM;
        }
        spfq_quant_rows(m, w->d.k, x, (size_t)w->d.k, own, (size_t)w->d.k, own_s);
        t.x = NULL;
        t.xq = own;
        t.xscale = own_s;
    }
    spfq_pool_run(nthreads, t.units, tall_chunk, &t);
    free(own);
    free(own_s);
    return atomic_load(&t.failed) ? SPFQ_ENOMEM : SPFQ_OK;
}

int spfq_matmul_i8(const spfq_prepared *w, int32_t m, const int8_t *xq, const float *xscale,
                   float *y, int32_t nthreads) {
    if (check(w, m) || !xq || !xscale || !y) return SPFQ_EINVAL;
    if (!FIND(i8[w->d.layout])) return SPFQ_EUNSUPPORTED;
    return m ? tall_run(w, m, NULL, xq, xscale, NULL, 0, y, NULL, NULL, nthreads) : SPFQ_OK;
}

int spfq_matmul_q8(const spfq_prepared *w, int32_t m, const float *x, float *y, int32_t nthreads) {
    if (check(w, m) || !x || !y) return SPFQ_EINVAL;
    if (!FIND(i8[w->d.layout])) return SPFQ_EUNSUPPORTED;
    return m ? tall_run(w, m, x, NULL, NULL, NULL, 0, y, NULL, NULL, nthreads) : SPFQ_OK;
}

int spfq_matmul_f32(const spfq_prepared *w, int32_t m, const float *x, float *y, int32_t nthreads) {
    if (check(w, m) || !x || !y) return SPFQ_EINVAL;
    int L = w->d.layout;
    spfq_range_fn fn = FIND(f32[L]);
    if (!fn) return SPFQ_EUNSUPPORTED;
    if (m >= SPFQ_F32_LANES_MIN_ROWS && (int64_t)w->d.k * w->d.n <= SPFQ_F32_LANES_MAX)
        return tall_run(w, m, x, NULL, NULL, NULL, 1, y, NULL, NULL, nthreads);
    spfq_job job = {.w = w, .m = m, .x = x, .y = y};
    return m ? parallel(fn, &job, nthreads, (w->clamped || w->act) ? f32_finish : NULL, NULL) : SPFQ_OK;
}

/* spfq_matmul_f32 in the f32 C oracle's order on every ISA, whatever the number of rows (grouped.c):
 * the output-lane tables when they fit (bit-identical with the oracle), else the portable kernel. */
int spfq_matmul_f32_oracle(const spfq_prepared *w, int32_t m, const float *x, float *y, int32_t nthreads) {
    if (check(w, m) || !x || !y) return SPFQ_EINVAL;
    if (!table_c.f32[w->d.layout]) return SPFQ_EUNSUPPORTED;
    return m ? tall_run(w, m, x, NULL, NULL, NULL, 2, y, NULL, NULL, nthreads) : SPFQ_OK;
}

/* One of x / (xq, xscale) and one of y / (yq, yscale), or NULL. */
static int act_ok(const spfq_act *a) {
    return a && (!a->x != !(a->xq && a->xscale)) && !(a->x && (a->xq || a->xscale)) &&
           (!a->y != !(a->yq && a->yscale)) && !(a->y && (a->yq || a->yscale));
}

int spfq_matmul_act(const spfq_prepared *w, int32_t m, const spfq_act *a, int32_t nthreads) {
    if (check(w, m) || !act_ok(a)) return SPFQ_EINVAL;
    if (!FIND(i8[w->d.layout])) return SPFQ_EUNSUPPORTED;
    return m ? tall_run(w, m, a->x, a->xq, a->xscale, NULL, 0, a->y, a->yq, a->yscale, nthreads) : SPFQ_OK;
}

/* Codes of one row (K int8 values) into the packed words of layout SIGN / SIGN_MASK / PLANES
 * (the .spfq conventions of spfq_kernels.h; rows of W words, planes `ps` words apart). */
void spfq_encode_row(int layout, int bits, const int8_t *c, int32_t K, int32_t W, uint64_t *sign, uint64_t *mask,
                     uint64_t *planes, size_t ps) {
    for (int32_t i = 0; i < W; i++) {
        if (sign) sign[i] = 0;
        if (mask) mask[i] = 0;
        for (int p = 0; planes && p < bits; p++) planes[(size_t)p * ps + i] = 0;
    }
    for (int32_t k = 0; k < K; k++) {
        const uint64_t bit = 1ull << (k % 64);
        const int32_t i = k / 64;
        if (layout == SPFQ_PLANES) {
            const unsigned u = (unsigned)(c[k] + (1 << (bits - 1)));
            for (int p = 0; p < bits; p++)
                if ((u >> p) & 1u) planes[(size_t)p * ps + i] |= bit;
            continue;
        }
        if (c[k] < 0) sign[i] |= bit;
        if (mask && c[k] != 0) mask[i] |= bit;
    }
}

/* w with its columns (c, tap) reordered to (tap, c) for C input channels (cached in w->hwc), or
 * NULL (SPARSE weights, no memory: the caller keeps the (c, tap) rows). */
static pthread_mutex_t hwc_mu = PTHREAD_MUTEX_INITIALIZER;
static const spfq_prepared *conv_hwc(const spfq_prepared *cw, int32_t C) {
    spfq_prepared *w = (spfq_prepared *)cw; /* a cache, not part of the weights' value */
    spfq_prepared *have = atomic_load_explicit(&w->hwc, memory_order_acquire);
    if (have) return w->hwc_c == C ? have : NULL;
    const int L = w->d.layout;
    if (L == SPFQ_SPARSE) return NULL;
    pthread_mutex_lock(&hwc_mu);
    if (!w->hwc) {
        const int32_t N = w->d.n, K = w->d.k, W = w->words, taps = K / C;
        const int bits = L == SPFQ_PLANES ? w->d.bits : 0;
        int8_t *c = malloc((size_t)K), *p = malloc((size_t)K);
        uint64_t *sign = L != SPFQ_PLANES ? calloc((size_t)N * W, 8) : NULL;
        uint64_t *mask = L == SPFQ_SIGN_MASK ? calloc((size_t)N * W, 8) : NULL;
        uint64_t *planes = L == SPFQ_PLANES ? calloc((size_t)bits * N * W, 8) : NULL;
        spfq_prepared *out = NULL;
        if (c && p && (L == SPFQ_PLANES ? planes != NULL : sign != NULL) && (L != SPFQ_SIGN_MASK || mask)) {
            for (int32_t n = 0; n < N; n++) {
                spfq_row_codes(w, n, c);
                for (int32_t ch = 0; ch < C; ch++)
                    for (int32_t t = 0; t < taps; t++) p[t * C + ch] = c[ch * taps + t];
                spfq_encode_row(L, bits, p, K, W, sign ? sign + (size_t)n * W : NULL, mask ? mask + (size_t)n * W : NULL,
                           planes ? planes + (size_t)n * W : NULL, (size_t)N * W);
            }
            spfq_weights_desc d = w->d;
            d.sign = sign;
            d.mask = mask;
            d.planes = planes;
            if (spfq_prepare(&d, &out) == SPFQ_OK &&
                ((w->clamped && spfq_set_clamp(out, w->clamp_lo, w->clamp_hi)) ||
                 spfq_set_activation(out, w->act, w->act_slope))) {
                spfq_free(out);
                out = NULL;
            }
            if (out) {
                w->hwc_c = C;
                atomic_store_explicit(&w->hwc, out, memory_order_release);
            }
        }
        free(c);
        free(p);
        free(sign);
        free(mask);
        free(planes);
    }
    pthread_mutex_unlock(&hwc_mu);
    return w->hwc_c == C ? w->hwc : NULL;
}

int spfq_conv_nhwc(const spfq_prepared *w, const spfq_conv_geom *g, int32_t int8, int32_t b, int32_t h, int32_t wd,
                   const float *x, float *y, int32_t nthreads) {
    if (check(w, b) || !g || !x || !y || h < 1 || wd < 1) return SPFQ_EINVAL;
    if (g->channels < 1 || g->kh < 1 || g->kw < 1 || g->sh < 1 || g->sw < 1 || g->dh < 1 || g->dw < 1 || g->pt < 0 ||
        g->pl < 0 || g->pb < 0 || g->pr < 0 || g->outputs != w->d.n || (int64_t)g->channels * g->kh * g->kw != w->d.k)
        return SPFQ_EINVAL;
    const int64_t OH = ((int64_t)h + g->pt + g->pb - (int64_t)g->dh * (g->kh - 1) - 1) / g->sh + 1;
    const int64_t OW = ((int64_t)wd + g->pl + g->pr - (int64_t)g->dw * (g->kw - 1) - 1) / g->sw + 1;
    if (OH < 1 || OW < 1 || (int64_t)b * OH * OW > INT32_MAX) return SPFQ_EINVAL;
    if (!FIND(i8[w->d.layout]) || !FIND(f32[w->d.layout])) return SPFQ_EUNSUPPORTED;
    const int32_t m = (int32_t)((int64_t)b * OH * OW);
    if (!m) return SPFQ_OK;
    /* int8: exact integer sums in any column order, so the rows are gathered a channel vector
     * per tap against weights reordered to match; weight-only float keeps the oracle's order */
    const spfq_prepared *hw = int8 && g->kh * g->kw > 1 ? conv_hwc(w, g->channels) : NULL;
    const conv_src src = {*g, h, wd, (int32_t)OH, (int32_t)OW, hw != NULL, x};
    return tall_run(hw ? hw : w, m, NULL, NULL, NULL, &src, !int8, y, NULL, NULL, nthreads);
}

typedef struct { const float *xscale; float *y; uint64_t *ybits; } b_epilogue;

static void bgemm_finish(const spfq_job *j, int32_t n0, int32_t n1, void *ctx) {
    const b_epilogue *e = ctx;
    const spfq_weights_desc *d = &j->w->d;
    int32_t N = d->n, NW = (N + 63) / 64;
    for (int32_t m = 0; m < j->m; m++) {
        const size_t mm = (size_t)j->m0 + (size_t)m;
        float xs = e->xscale ? e->xscale[mm] : 1.0f;
        for (int32_t n = n0; n < n1; n++) {
            size_t i = (size_t)m * N + n;
            float v = xs * d->scale[n] * (float)j->dot[i] + (d->bias ? d->bias[n] : 0.0f);
            if (e->y) e->y[mm * N + n] = v;
            if (e->ybits) {
                uint64_t *word = &e->ybits[mm * NW + n / 64], bit = 1ull << (n % 64);
                *word = v < 0.0f ? (*word | bit) : (*word & ~bit);
            }
        }
    }
}

int spfq_bgemm(const spfq_prepared *w, int32_t m, const uint64_t *xbits, const float *xscale,
               int32_t *dot, float *y, uint64_t *ybits, int32_t nthreads) {
    if (check(w, m) || !xbits) return SPFQ_EINVAL;
    if (w->d.layout != SPFQ_SIGN) return SPFQ_EUNSUPPORTED;
    spfq_range_fn fn = FIND(bgemm);
    if (!fn) return SPFQ_EUNSUPPORTED;
    size_t cells = (size_t)m * (size_t)w->d.n;
    int32_t *tmp = NULL;
    if (!dot) {
        tmp = malloc(cells * sizeof(int32_t) + 1);
        if (!tmp) return SPFQ_ENOMEM;
    }
    if (ybits) { /* padding bits of the output rows must be zero */
        int32_t NW = (w->d.n + 63) / 64;
        for (int32_t r = 0; r < m; r++) ybits[(size_t)r * NW + NW - 1] = 0;
    }
    spfq_job job = {.w = w, .m = m, .xbits = xbits, .dot = dot ? dot : tmp};
    b_epilogue e = {xscale, y, ybits};
    int rc = m ? parallel(fn, &job, nthreads, (y || ybits) ? bgemm_finish : NULL, &e) : SPFQ_OK;
    free(tmp);
    return rc;
}
