/* api.c — the ABI of spfq_kernels.h: argument checks, owned weight copies, ISA dispatch,
 * threads over output rows (on the pool of pool.c), the float epilogue of integer kernels.
 * Kernels themselves live in the family files (binary*.c, intb*.c), the activation quantisers
 * in quant.c. */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
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
    if (!strcmp(name, "auto")) {
        active = cpu_has("avx512") ? &table_avx512 : cpu_has("avx2") ? &table_avx2
               : cpu_has("neon") ? &table_neon : &table_c;
        return SPFQ_OK;
    }
    const isa_table *t = !strcmp(name, "c") ? &table_c : !strcmp(name, "avx2") ? &table_avx2
                       : !strcmp(name, "avx512") ? &table_avx512 : !strcmp(name, "neon") ? &table_neon : NULL;
    if (!t || !cpu_has(name)) return SPFQ_EUNSUPPORTED;
    active = t;
    return SPFQ_OK;
}

static const isa_table *isa(void) {
    if (!active) spfq_set_isa("auto");
    return active;
}

const char *spfq_isa(void) { return isa()->name; }
int32_t spfq_abi_version(void) { return SPFQ_ABI_VERSION; }

static spfq_range_fn pick(spfq_range_fn simd, spfq_range_fn portable) { return simd ? simd : portable; }

/* The kernel for one (operation, layout) on the active ISA: avx512 falls back to avx2, any
 * SIMD table to the portable C one. */
#define FIND(field) (isa() == &table_avx512 && !table_avx512.field ? pick(table_avx2.field, table_c.field) \
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
    /* kernel-private interleaved codes for the AVX-512 / AVX2 int8 GEMMs (AVX2 reads b <= 4 only;
     * ternary SIGN_MASK codes are b = 2 codes; failure: the kernels decode the packed words) */
    if ((w->layout == SPFQ_PLANES && (cpu_has("avx512") || (cpu_has("avx2") && w->bits <= 4))) ||
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
    return SPFQ_OK;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EPI_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define EPI_CLONES
#endif

/* The clamp on the rows [n0, n1) this thread made (weight-only kernels write y themselves). */
EPI_CLONES static void f32_finish(const spfq_job *j, int32_t n0, int32_t n1, void *ctx) {
    (void)ctx;
    const struct spfq_prepared *w = j->w;
    const int32_t N = w->d.n;
    const float lo = w->clamp_lo, hi = w->clamp_hi;
    for (int32_t m = 0; m < j->m; m++) {
        float *y = j->y + (size_t)m * N;
        for (int32_t n = n0; n < n1; n++) y[n] = spfq_clamp(y[n], lo, hi);
    }
}

int spfq_matmul_f32(const spfq_prepared *w, int32_t m, const float *x, float *y, int32_t nthreads) {
    if (check(w, m) || !x || !y) return SPFQ_EINVAL;
    int L = w->d.layout;
    spfq_range_fn fn = FIND(f32[L]);
    if (!fn) return SPFQ_EUNSUPPORTED;
    spfq_job job = {.w = w, .m = m, .x = x, .y = y};
    return m ? parallel(fn, &job, nthreads, w->clamped ? f32_finish : NULL, NULL) : SPFQ_OK;
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

/* Per calling thread, a grow-only scratch buffer for the integer sums: a fresh malloc of a
 * conv-sized buffer is an mmap whose pages fault in (and are cleared) on every call, which cost
 * as much as the GEMM itself on MobileNetV2's 1x1 convs. Freed when the thread exits. */
static pthread_key_t scratch_key;
static pthread_once_t scratch_once = PTHREAD_ONCE_INIT;
typedef struct { void *p; size_t cap; } scratch_buf;
static void scratch_free(void *b) {
    free(((scratch_buf *)b)->p);
    free(b);
}
static void scratch_init(void) { pthread_key_create(&scratch_key, scratch_free); }
static void *scratch(size_t bytes) {
    pthread_once(&scratch_once, scratch_init);
    scratch_buf *b = pthread_getspecific(scratch_key);
    if (!b) {
        if (!(b = calloc(1, sizeof *b))) return NULL;
        if (pthread_setspecific(scratch_key, b)) {
            free(b);
            return NULL;
        }
    }
    if (b->cap < bytes) {
        free(b->p);
        b->p = malloc(bytes);
        b->cap = b->p ? bytes : 0;
    }
    return b->p;
}

/* Rows per block of a tall call (a conv's pixels): the sums of a block stay in cache for the
 * epilogue that reads them right after. */
#define I8_ROW_BLOCK 256

int spfq_matmul_i8(const spfq_prepared *w, int32_t m, const int8_t *xq, const float *xscale,
                   float *y, int32_t nthreads) {
    if (check(w, m) || !xq || !xscale || !y) return SPFQ_EINVAL;
    int L = w->d.layout;
    spfq_range_fn fn = FIND(i8[L]);
    if (!fn) return SPFQ_EUNSUPPORTED;
    if (!m) return SPFQ_OK;
    const int32_t N = w->d.n, K = w->d.k, mb = m > 2 * I8_ROW_BLOCK ? I8_ROW_BLOCK : m;
#if defined(__x86_64__)
    /* tall calls on AVX2 with RP codes: the epilogue fused into the kernel (no int32 buffer) */
    if (m >= 4 && isa() == &table_avx2 && spfq_rp_i8_fused_avx2 && spfq_rp_i8_fused_ok_avx2 &&
        spfq_rp_i8_fused_ok_avx2(w)) {
        for (int32_t m0 = 0; m0 < m; m0 += mb) {
            spfq_job job = {.w = w, .m = m - m0 < mb ? m - m0 : mb, .xq = xq + (size_t)m0 * K,
                            .xscale = xscale + m0, .y = y + (size_t)m0 * N};
            parallel(spfq_rp_i8_fused_avx2, &job, nthreads, NULL, NULL);
        }
        return SPFQ_OK;
    }
#endif
    const size_t cells = (size_t)mb * (size_t)N;
    int two = (L == SPFQ_PLANES || L == SPFQ_SPARSE);
    /* int layouts without lam need only acc_c (value = scale * c): skip the sign sums */
    int need_s = !two || w->d.lam != NULL;
    int32_t *acc = scratch(cells * sizeof(int32_t) * (size_t)(two + need_s) + 1);
    if (!acc) return SPFQ_ENOMEM;
    for (int32_t m0 = 0; m0 < m; m0 += mb) {
        spfq_job job = {.w = w, .m = m - m0 < mb ? m - m0 : mb, .xq = xq + (size_t)m0 * K,
                        .acc_s = need_s ? acc : NULL, .acc_c = two ? acc + (need_s ? cells : 0) : NULL};
        i8_epilogue e = {xscale + m0, y + (size_t)m0 * N};
        parallel(fn, &job, nthreads, i8_finish, &e);
    }
    return SPFQ_OK;
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
