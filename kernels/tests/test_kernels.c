/* test_kernels.c — standalone test of the kernel library through its public ABI
 * (kernels/include/spfq_kernels.h), no Python: it runs natively and under qemu-aarch64.
 *
 * For every layout (SIGN, SIGN_MASK, PLANES b=2..8, SPARSE b=2..8; sparsity 0 / 0.5 / 0.95 / 1
 * for the masked ones; lam NULL and lam != scale) it draws random signed codes, packs them
 * here directly in the documented bit layout (spfq_deploy/pack/bits.py, layouts.py), computes
 * a naive reference from those codes (int64 sums, double floats) and checks spfq_matmul_i8_raw
 * (bit-exact), spfq_matmul_i8 and spfq_matmul_f32 (within summation-order tolerance) and, for
 * SIGN, spfq_bgemm (dot exact, y, re-binarised bits) for every ISA the build and CPU have and 1
 * and 2 threads (SPFQ_TEST_THREADS); spfq_quantize_i8 and spfq_binarize against the header's formulas,
 * and spfq_quantize_i8 of every ISA bit-exact against the portable C one (adversarial rows).
 * Activation buffers end at a PROT_NONE page, so a kernel reading past K faults.
 * The thread pool (check_pool): thread counts 1..9, 64 and 100 on N = 9 blocks + 5 rows, the
 * thread count changing from call to call, four host threads calling at once (pool busy: the
 * others run single-threaded), and a fork() child that recreates the pool (unless
 * SPFQ_TEST_FORK_THREADS=0); every result bit-exact against the naive reference. SPFQ_TEST_THREADS=1,2,4 sets the thread counts of the
 * per-shape checks (default 1,2).
 *
 * Prints "N passed, M failed" as its last line; exit status 1 on any failure.
 * Environment: SPFQ_TEST_ISAS=c,neon (default: every ISA spfq_set_isa accepts),
 * SPFQ_TEST_VERBOSE=1 (one line per failure, not only the first 20).
 */
#define _GNU_SOURCE
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "spfq_kernels.h"

/* ------------------------------------------------------------------ harness */

static long n_passed, n_failed;
static int verbose;

static void report(int ok, const char *fmt, ...) {
    if (ok) { n_passed++; return; }
    n_failed++;
    if (n_failed <= 20 || verbose) {
        va_list ap;
        va_start(ap, fmt);
        printf("FAIL ");
        vprintf(fmt, ap);
        printf("\n");
        va_end(ap);
    }
}

static uint64_t rng = 0x9E3779B97F4A7C15ull;
static uint64_t rnd(void) { /* splitmix64 */
    uint64_t z = (rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double urand(void) { return (double)(rnd() >> 11) * (1.0 / 9007199254740992.0); }
static int irand(int lo, int hi) { return lo + (int)(rnd() % (uint64_t)(hi - lo + 1)); } /* [lo, hi] */
static float nrand(void) { /* roughly normal */
    return (float)(urand() + urand() + urand() + urand() - 2.0) * 1.7f;
}

static void *xmalloc(size_t n) {
    void *p = calloc(n ? n : 1, 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(3); }
    return p;
}

/* A buffer whose last byte is the last byte before a PROT_NONE page. */
typedef struct { void *base; size_t len; } guarded;
static void *galloc(guarded *g, size_t bytes) {
    size_t page = (size_t)sysconf(_SC_PAGESIZE), data = (bytes + page - 1) / page * page;
    g->len = data + page;
    g->base = mmap(NULL, g->len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (g->base == MAP_FAILED || mprotect((char *)g->base + data, page, PROT_NONE)) {
        fprintf(stderr, "mmap failed\n");
        exit(3);
    }
    return (char *)g->base + data - bytes;
}
static void gfree(guarded *g) { munmap(g->base, g->len); }

/* ------------------------------------------------------------------ weights */

typedef struct {
    int layout, bits, n, k, w, wk;
    double sparsity;
    int8_t *codes;                   /* (N, K) signed codes */
    uint64_t *sign, *mask, *planes;  /* packed, exactly sized */
    float *scale, *lam, *bias;
} wcase;

static const char *layout_name(int l) {
    return l == SPFQ_SIGN ? "sign" : l == SPFQ_SIGN_MASK ? "sign_mask" : l == SPFQ_PLANES ? "planes" : "sparse";
}

static int multi_level(int layout) { return layout == SPFQ_PLANES || layout == SPFQ_SPARSE; }

/* lam only shapes multi-level codes; SIGN / SIGN_MASK have one level, scale (lam is ignored) */
static const float *level_lam(const wcase *c) { return multi_level(c->layout) ? c->lam : NULL; }

static int kmax_of(const wcase *c) { return c->layout == SPFQ_PLANES || c->layout == SPFQ_SPARSE ? (1 << (c->bits - 1)) - 1 : 1; }

static void set_bit(uint64_t *row, int j) { row[j / 64] |= 1ull << (j % 64); }

static void make_case(wcase *c, int layout, int bits, int n, int k, double sparsity, int with_lam, int with_bias) {
    memset(c, 0, sizeof *c);
    c->layout = layout; c->bits = bits; c->n = n; c->k = k; c->sparsity = sparsity;
    c->w = (k + 63) / 64;
    const int K = kmax_of(c), W = c->w;
    c->codes = xmalloc((size_t)n * k);
    for (int r = 0; r < n; r++)
        for (int j = 0; j < k; j++) {
            int v;
            if (layout == SPFQ_SIGN) v = rnd() & 1 ? -1 : 1;
            else if (layout == SPFQ_PLANES) v = irand(-K, K);
            else {
                v = irand(1, K) * (rnd() & 1 ? -1 : 1);
                if (urand() < sparsity) v = 0;
            }
            /* row 0: extreme magnitudes, to exercise int16 / int32 headroom */
            if (r == 0 && v) v = v < 0 ? -K : K;
            c->codes[(size_t)r * k + j] = (int8_t)v;
        }
    c->scale = xmalloc((size_t)n * 4);
    for (int r = 0; r < n; r++) c->scale[r] = (float)(0.01 + 0.1 * urand());
    if (with_lam) {
        c->lam = xmalloc((size_t)n * 4);
        for (int r = 0; r < n; r++) c->lam[r] = c->scale[r] * (float)(1.3 + 0.6 * urand());
    }
    if (with_bias) {
        c->bias = xmalloc((size_t)n * 4);
        for (int r = 0; r < n; r++) c->bias[r] = nrand();
    }
    const size_t rowbuf = (size_t)n * W;
    if (layout == SPFQ_SIGN || layout == SPFQ_SIGN_MASK) {
        c->sign = xmalloc(rowbuf * 8);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < k; j++)
                if (c->codes[(size_t)r * k + j] < 0 ||
                    (layout == SPFQ_SIGN_MASK && !c->codes[(size_t)r * k + j] && (rnd() & 1)))
                    set_bit(c->sign + (size_t)r * W, j); /* stray sign bits under a zero mask are ignored */
    }
    if (layout == SPFQ_SIGN_MASK || layout == SPFQ_SPARSE) {
        c->mask = xmalloc(rowbuf * 8);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < k; j++)
                if (c->codes[(size_t)r * k + j]) set_bit(c->mask + (size_t)r * W, j);
    }
    if (layout == SPFQ_PLANES) { /* planes (b, N, W) of u = c + 2^(b-1) */
        c->planes = xmalloc((size_t)bits * rowbuf * 8);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < k; j++) {
                int u = c->codes[(size_t)r * k + j] + (1 << (bits - 1));
                for (int p = 0; p < bits; p++)
                    if ((u >> p) & 1) set_bit(c->planes + ((size_t)p * n + r) * W, j);
            }
    }
    if (layout == SPFQ_SPARSE) { /* kept (b, N, Wk): fields (c<0) | ((|c|-1) << 1) in column order */
        int maxnnz = 0;
        for (int r = 0; r < n; r++) {
            int nnz = 0;
            for (int j = 0; j < k; j++) nnz += c->codes[(size_t)r * k + j] != 0;
            if (nnz > maxnnz) maxnnz = nnz;
        }
        c->wk = (maxnnz + 63) / 64;
        if (c->wk) c->planes = xmalloc((size_t)bits * n * c->wk * 8);
        for (int r = 0; r < n; r++) {
            int rank = 0;
            for (int j = 0; j < k; j++) {
                int v = c->codes[(size_t)r * k + j];
                if (!v) continue;
                int f = (v < 0) | ((abs(v) - 1) << 1);
                for (int p = 0; p < bits; p++)
                    if ((f >> p) & 1) set_bit(c->planes + ((size_t)p * n + r) * c->wk, rank);
                rank++;
            }
        }
    }
}

static void free_case(wcase *c) {
    free(c->codes); free(c->sign); free(c->mask); free(c->planes);
    free(c->scale); free(c->lam); free(c->bias);
}

static spfq_prepared *prepare(const wcase *c) {
    spfq_weights_desc d = {c->layout, c->n, c->k, c->layout == SPFQ_SIGN ? 1 : c->layout == SPFQ_SIGN_MASK ? 2 : c->bits,
                           c->wk, c->sign, c->mask, c->planes, c->scale, c->lam, c->bias};
    spfq_prepared *p = NULL;
    int rc = spfq_prepare(&d, &p);
    report(rc == SPFQ_OK && p, "spfq_prepare(%s b=%d N=%d K=%d) = %d", layout_name(c->layout), c->bits, c->n, c->k, rc);
    return rc == SPFQ_OK ? p : NULL;
}

/* value(c) = sign(c) * (lam + (|c| - 1) * scale), lam = scale when NULL (spfq_kernels.h)
 *          = scale * c + (lam - scale) * sign(c);
 * for SIGN / SIGN_MASK (|c| <= 1) that is sign(c) * scale (lam is ignored there). So every
 * reference output is built from four sums over a row: sum x*c, sum x*sign(c) (the exact ones),
 * and sum |x|*|c|, sum_{c != 0} |x| (the scale of the float tolerance). */
static void row_sums_i8(const int8_t *c, const int8_t *x, int k, int64_t out[4]) {
    int64_t sc = 0, ss = 0, ac = 0, an = 0;
    for (int j = 0; j < k; j++) {
        const int v = c[j], xv = x[j], ax = xv < 0 ? -xv : xv;
        sc += (int64_t)xv * v;
        ss += (int64_t)xv * ((v > 0) - (v < 0));
        ac += (int64_t)ax * (v < 0 ? -v : v);
        an += (int64_t)ax * (v != 0);
    }
    out[0] = sc; out[1] = ss; out[2] = ac; out[3] = an;
}

static void row_sums_f32(const int8_t *c, const float *x, int k, double out[4]) {
    double sc = 0, ss = 0, ac = 0, an = 0;
    for (int j = 0; j < k; j++) {
        const int v = c[j];
        const double xv = x[j];
        sc += xv * v;
        ss += xv * ((v > 0) - (v < 0));
        ac += fabs(xv) * (v < 0 ? -v : v);
        an += fabs(xv) * (v != 0);
    }
    out[0] = sc; out[1] = ss; out[2] = ac; out[3] = an;
}

/* y = sum x * value(c) + bias from the four sums; *tol = rel * (sum |x * value(c)| + |bias|) */
static double reference_y(const wcase *c, int r, const double s4[4], double rel, double *tol) {
    const float *lam = level_lam(c);
    const double sc = c->scale[r], d = (lam ? lam[r] : sc) - sc, b = c->bias ? c->bias[r] : 0.0;
    *tol = rel * (fabs(sc * s4[2] + d * s4[3]) + fabs(b)) + 1e-6;
    return sc * s4[0] + d * s4[1] + b;
}

/* ------------------------------------------------------------------ one shape */

typedef struct {
    const char *isa;
    int threads;
} run_cfg;

static char ctx[160];

static void check_i8(const wcase *c, spfq_prepared *p, int m, const int8_t *xq, const run_cfg *cfgs, int ncfg) {
    const int N = c->n, K = c->k;
    const int two = c->layout == SPFQ_PLANES || c->layout == SPFQ_SPARSE;
    const size_t cells = (size_t)m * N;
    int64_t *rc_ = xmalloc(cells * 8), *rs = xmalloc(cells * 8);
    double *ry = xmalloc(cells * 8), *rtol = xmalloc(cells * 8);
    float *xs = xmalloc((size_t)m * 4);
    for (int i = 0; i < m; i++) xs[i] = (float)(0.001 + 0.02 * urand());
    for (int i = 0; i < m; i++)
        for (int r = 0; r < N; r++) {
            const size_t o = (size_t)i * N + r;
            int64_t s4[4];
            row_sums_i8(c->codes + (size_t)r * K, xq + (size_t)i * K, K, s4);
            rc_[o] = s4[0];
            rs[o] = s4[1];
            const double d4[4] = {xs[i] * (double)s4[0], xs[i] * (double)s4[1], xs[i] * (double)s4[2], xs[i] * (double)s4[3]};
            ry[o] = reference_y(c, r, d4, 2e-5, &rtol[o]);
        }
    int32_t *acc_c = xmalloc(cells * 4), *acc_s = xmalloc(cells * 4);
    float *y = xmalloc(cells * 4);
    for (int t = 0; t < ncfg; t++) {
        spfq_set_isa(cfgs[t].isa);
        const int th = cfgs[t].threads;
        /* raw sums, both buffers */
        memset(acc_c, 0x7f, cells * 4);
        memset(acc_s, 0x7f, cells * 4);
        int rc = spfq_matmul_i8_raw(p, m, xq, acc_c, acc_s, th);
        size_t bad = cells, i;
        for (i = 0; i < cells && rc == SPFQ_OK; i++)
            if (acc_s[i] != rs[i] || acc_c[i] != (two ? rc_[i] : rs[i])) { bad = i; break; }
        report(rc == SPFQ_OK && bad == cells, "%s %s t=%d matmul_i8_raw rc=%d at %zu: acc_c %d acc_s %d want %lld %lld", ctx,
               cfgs[t].isa, th, rc, bad, bad < cells ? acc_c[bad] : 0, bad < cells ? acc_s[bad] : 0,
               bad < cells ? (long long)(two ? rc_[bad] : rs[bad]) : 0LL, bad < cells ? (long long)rs[bad] : 0LL);
        /* acc_c NULL: allowed for the sign layouts, rejected for int-b */
        memset(acc_s, 0x7f, cells * 4);
        rc = spfq_matmul_i8_raw(p, m, xq, NULL, acc_s, th);
        if (two) {
            report(rc == SPFQ_EINVAL, "%s %s t=%d matmul_i8_raw(acc_c NULL) on int-b = %d, want EINVAL", ctx, cfgs[t].isa, th, rc);
        } else {
            for (bad = cells, i = 0; i < cells && rc == SPFQ_OK; i++)
                if (acc_s[i] != rs[i]) { bad = i; break; }
            report(rc == SPFQ_OK && bad == cells, "%s %s t=%d matmul_i8_raw(acc_c NULL) rc=%d at %zu", ctx, cfgs[t].isa, th, rc, bad);
        }
        /* float epilogue */
        for (i = 0; i < cells; i++) y[i] = NAN;
        rc = spfq_matmul_i8(p, m, xq, xs, y, th);
        for (bad = cells, i = 0; i < cells && rc == SPFQ_OK; i++)
            if (!(fabs(y[i] - ry[i]) <= rtol[i])) { bad = i; break; }
        report(rc == SPFQ_OK && bad == cells, "%s %s t=%d matmul_i8 rc=%d at %zu: y %.9g want %.9g", ctx, cfgs[t].isa, th, rc,
               bad, bad < cells ? y[bad] : 0.0, bad < cells ? ry[bad] : 0.0);
    }
    free(rc_); free(rs); free(ry); free(rtol); free(xs); free(acc_c); free(acc_s); free(y);
}

static void check_f32(const wcase *c, spfq_prepared *p, int m, const float *x, const run_cfg *cfgs, int ncfg) {
    const int N = c->n, K = c->k;
    const size_t cells = (size_t)m * N;
    double *ry = xmalloc(cells * 8), *rtol = xmalloc(cells * 8);
    for (int i = 0; i < m; i++)
        for (int r = 0; r < N; r++) {
            const size_t o = (size_t)i * N + r;
            double s4[4];
            row_sums_f32(c->codes + (size_t)r * K, x + (size_t)i * K, K, s4);
            ry[o] = reference_y(c, r, s4, 2e-5, &rtol[o]);
        }
    float *y = xmalloc(cells * 4);
    for (int t = 0; t < ncfg; t++) {
        spfq_set_isa(cfgs[t].isa);
        for (size_t i = 0; i < cells; i++) y[i] = NAN;
        int rc = spfq_matmul_f32(p, m, x, y, cfgs[t].threads);
        size_t bad = cells;
        for (size_t i = 0; i < cells && rc == SPFQ_OK; i++)
            if (!(fabs(y[i] - ry[i]) <= rtol[i])) { bad = i; break; }
        report(rc == SPFQ_OK && bad == cells, "%s %s t=%d matmul_f32 rc=%d at %zu: y %.9g want %.9g (tol %.3g)", ctx, cfgs[t].isa,
               cfgs[t].threads, rc, bad, bad < cells ? y[bad] : 0.0, bad < cells ? ry[bad] : 0.0, bad < cells ? rtol[bad] : 0.0);
    }
    free(ry); free(rtol); free(y);
}

static void check_bgemm(const wcase *c, spfq_prepared *p, int m, const uint64_t *xbits, const run_cfg *cfgs, int ncfg) {
    const int N = c->n, K = c->k, W = c->w, NW = (N + 63) / 64;
    const size_t cells = (size_t)m * N;
    int32_t *rdot = xmalloc(cells * 4);
    float *xs = xmalloc((size_t)m * 4);
    for (int i = 0; i < m; i++) xs[i] = (float)(0.2 + urand());
    int8_t *xpm = xmalloc((size_t)K); /* +-1 activations of one row */
    for (int i = 0; i < m; i++) {
        for (int j = 0; j < K; j++) xpm[j] = (xbits[(size_t)i * W + j / 64] >> (j % 64)) & 1 ? -1 : 1;
        for (int r = 0; r < N; r++) {
            int64_t s4[4];
            row_sums_i8(c->codes + (size_t)r * K, xpm, K, s4);
            rdot[(size_t)i * N + r] = (int32_t)s4[0];
        }
    }
    free(xpm);
    int32_t *dot = xmalloc(cells * 4);
    float *y = xmalloc(cells * 4);
    uint64_t *yb = xmalloc((size_t)m * NW * 8), *yb2 = xmalloc((size_t)m * NW * 8);
    for (int t = 0; t < ncfg; t++) {
        spfq_set_isa(cfgs[t].isa);
        const int th = cfgs[t].threads;
        for (int pass = 0; pass < 2; pass++) { /* xscale given / NULL (= 1) */
            const float *xsp = pass ? NULL : xs;
            memset(dot, 0x7f, cells * 4);
            memset(yb, 0xff, (size_t)m * NW * 8); /* stale bits, padding included, must be cleared */
            for (size_t i = 0; i < cells; i++) y[i] = NAN;
            int rc = spfq_bgemm(p, m, xbits, xsp, dot, y, yb, th);
            size_t bd = cells, by = cells, bb = cells;
            for (size_t i = 0; i < cells && rc == SPFQ_OK; i++) {
                const int r = (int)(i % N);
                const double lvl = c->scale[r], b = c->bias ? c->bias[r] : 0.0; /* SIGN: lam ignored */
                const double s = (xsp ? xsp[i / N] : 1.0) * lvl;
                const double want = s * rdot[i] + b, tol = 2e-6 * (fabs(s * rdot[i]) + fabs(b)) + 1e-6;
                if (dot[i] != rdot[i] && bd == cells) bd = i;
                if (!(fabs(y[i] - want) <= tol) && by == cells) by = i;
                const int bit = (yb[(i / N) * NW + r / 64] >> (r % 64)) & 1;
                if (bit != (y[i] < 0.0f) && bb == cells) bb = i;
            }
            for (int i = 0; i < m && rc == SPFQ_OK; i++) /* padding bits of each output row are zero */
                if (N % 64 && (yb[(size_t)i * NW + NW - 1] >> (N % 64)) && bb == cells) bb = (size_t)i * N;
            report(rc == SPFQ_OK && bd == cells, "%s %s t=%d bgemm rc=%d dot at %zu: %d want %d", ctx, cfgs[t].isa, th, rc, bd,
                   bd < cells ? dot[bd] : 0, bd < cells ? rdot[bd] : 0);
            report(rc == SPFQ_OK && by == cells, "%s %s t=%d bgemm xscale=%s y at %zu: %.9g", ctx, cfgs[t].isa, th,
                   xsp ? "given" : "NULL", by, by < cells ? y[by] : 0.0);
            report(rc == SPFQ_OK && bb == cells, "%s %s t=%d bgemm ybits at %zu", ctx, cfgs[t].isa, th, bb);
            /* dot and y NULL: the same bits */
            memset(yb2, 0xff, (size_t)m * NW * 8);
            rc = spfq_bgemm(p, m, xbits, xsp, NULL, NULL, yb2, th);
            report(rc == SPFQ_OK && !memcmp(yb, yb2, (size_t)m * NW * 8), "%s %s t=%d bgemm(dot=y=NULL) ybits rc=%d", ctx,
                   cfgs[t].isa, th, rc);
        }
    }
    free(rdot); free(xs); free(dot); free(y); free(yb); free(yb2);
}

/* One weight case at one shape: every op, every ISA / thread count. */
static void run_case(int layout, int bits, double sp, int with_lam, int n, int k, int m, const run_cfg *cfgs, int ncfg) {
    wcase c;
    make_case(&c, layout, bits, n, k, sp, with_lam, (n + k + m) % 2 == 0);
    snprintf(ctx, sizeof ctx, "[%s b=%d sp=%.2f lam=%d bias=%d N=%d K=%d M=%d]", layout_name(layout), bits, sp, with_lam,
             c.bias != NULL, n, k, m);
    spfq_prepared *p = prepare(&c);
    if (!p) { free_case(&c); return; }

    guarded gq, gx;
    int8_t *xq = galloc(&gq, (size_t)m * k);
    for (size_t i = 0; i < (size_t)m * k; i++) xq[i] = (int8_t)irand(-128, 127);
    for (int j = 0; j < k; j++) xq[j] = rnd() & 1 ? -128 : 127; /* row 0 at the extremes */
    check_i8(&c, p, m, xq, cfgs, ncfg);
    gfree(&gq);

    float *x = galloc(&gx, (size_t)m * k * 4);
    for (size_t i = 0; i < (size_t)m * k; i++) x[i] = nrand();
    check_f32(&c, p, m, x, cfgs, ncfg);
    gfree(&gx);

    if (layout == SPFQ_SIGN) {
        guarded gb;
        const int W = c.w;
        uint64_t *xb = galloc(&gb, (size_t)m * W * 8);
        for (int i = 0; i < m; i++)
            for (int w = 0; w < W; w++) {
                uint64_t v = rnd();
                if (w == W - 1 && k % 64) v &= (1ull << (k % 64)) - 1; /* zero padding */
                xb[(size_t)i * W + w] = v;
            }
        if (m > 1) { /* row 0: all -1 */
            memset(xb, 0xff, (size_t)W * 8);
            if (k % 64) xb[W - 1] = (1ull << (k % 64)) - 1;
        }
        check_bgemm(&c, p, m, xb, cfgs, ncfg);
        gfree(&gb);
    }
    spfq_free(p);
    free_case(&c);
}

/* ------------------------------------------------------------------ depthwise conv */

/* spfq_dwconv against the im2col path it replaces: per-patch spfq_quantize_i8 + spfq_matmul_i8
 * (bit-identical under every ISA) and, with the C ISA, spfq_matmul_f32 (bit-identical with the
 * oracle). 3x3 stride 2 pad 1, channel multiplier 2; a narrow plane (channels in lanes) and a
 * wide one (vectorised rows). */
/* spfq_dwconv against im2col + GEMM; spfq_dwconv_nhwc against spfq_dwconv transposed (C = 16,
 * mult = 1: full lane blocks read in place; C = 5, mult = 2: gathered blocks). */
static void check_dwconv(int layout, int bits, double sp, int with_lam, int C, int mult, const run_cfg *cfgs, int ncfg) {
    const int n = C * mult, B = 2, KH = 3, KW = 3, k = KH * KW;
    static const int widths[] = {11, 70};
    wcase c;
    make_case(&c, layout, bits, n, k, sp, with_lam, 1);
    spfq_weights_desc d = {c.layout, c.n, c.k, c.bits, c.wk, c.sign, c.mask, c.planes, c.scale, level_lam(&c), c.bias};
    spfq_dw_geom g = {C, mult, KH, KW, 2, 2, 1, 1, 1, 1, 1, 1};
    spfq_dw *dw = NULL;
    spfq_prepared *p = NULL;
    int rc = spfq_dw_prepare(&d, &g, &dw);
    report(rc == SPFQ_OK && dw, "spfq_dw_prepare(%s b=%d) = %d", layout_name(layout), bits, rc);
    rc = spfq_prepare(&d, &p);
    if (!dw || rc) { spfq_dw_free(dw); spfq_free(p); free_case(&c); return; }
    for (int wi = 0; wi < 2; wi++) {
        const int H = 9, W = widths[wi], OH = (H + 2 - 3) / 2 + 1, OW = (W + 2 - 3) / 2 + 1, P = OH * OW;
        float *x = xmalloc((size_t)B * C * H * W * 4), *rows = xmalloc((size_t)P * k * 4);
        float *xs = xmalloc((size_t)P * 4), *yg = xmalloc((size_t)P * n * 4);
        float *want = xmalloc((size_t)B * n * P * 4), *got = xmalloc((size_t)B * n * P * 4);
        float *xl = xmalloc((size_t)B * C * H * W * 4), *yl = xmalloc((size_t)B * n * P * 4);
        int8_t *xq = xmalloc((size_t)P * k);
        for (int i = 0; i < B * C * H * W; i++) x[i] = nrand();
        for (int i = 0; i < W; i++) x[i] = 0.0f; /* a zero row: patches with xscale 0 */
        for (int t = 0; t < ncfg; t++) {
            spfq_set_isa(cfgs[t].isa);
            for (int int8 = 0; int8 < 2; int8++) {
                if (!int8 && strcmp(cfgs[t].isa, "c")) continue; /* f32 is exact against the oracle only */
                for (int b = 0; b < B; b++)
                    for (int ch = 0; ch < C; ch++) { /* im2col of channel ch: rows (oh, ow), columns (kh, kw) */
                        const float *plane = x + ((size_t)b * C + ch) * H * W;
                        for (int oh = 0; oh < OH; oh++)
                            for (int ow = 0; ow < OW; ow++)
                                for (int kh = 0; kh < KH; kh++)
                                    for (int kw = 0; kw < KW; kw++) {
                                        const int ih = oh * 2 - 1 + kh, iw = ow * 2 - 1 + kw;
                                        rows[((size_t)oh * OW + ow) * k + kh * KW + kw] =
                                            (ih >= 0 && ih < H && iw >= 0 && iw < W) ? plane[ih * W + iw] : 0.0f;
                                    }
                        if (int8) {
                            spfq_quantize_i8(P, k, rows, xq, xs);
                            spfq_matmul_i8(p, P, xq, xs, yg, 1);
                        } else {
                            spfq_matmul_f32(p, P, rows, yg, 1);
                        }
                        for (int j = 0; j < mult; j++) /* outputs ch * mult + j read channel ch */
                            for (int q = 0; q < P; q++)
                                want[((size_t)b * n + ch * mult + j) * P + q] = yg[(size_t)q * n + ch * mult + j];
                    }
                rc = spfq_dwconv(dw, int8, B, H, W, x, got, cfgs[t].threads);
                size_t bad = 0;
                while (bad < (size_t)B * n * P && !memcmp(&got[bad], &want[bad], 4)) bad++;
                report(rc == SPFQ_OK && bad == (size_t)B * n * P, "[dwconv %s b=%d sp=%.2f lam=%d C=%d W=%d] %s t=%d %s rc=%d at %zu",
                       layout_name(layout), bits, sp, with_lam, C, W, cfgs[t].isa, cfgs[t].threads, int8 ? "i8" : "f32", rc, bad);
                for (int b = 0; b < B; b++) /* channels last: x -> xl (b, h, w, c), want -> yl (b, p, n) */
                    for (int ch = 0; ch < C; ch++)
                        for (int i = 0; i < H * W; i++) xl[((size_t)b * H * W + i) * C + ch] = x[((size_t)b * C + ch) * H * W + i];
                rc = spfq_dwconv_nhwc(dw, int8, B, H, W, xl, yl, cfgs[t].threads);
                bad = 0;
                for (int b = 0; b < B && !bad; b++)
                    for (int o = 0; o < n && !bad; o++)
                        for (int q = 0; q < P; q++)
                            if (memcmp(&yl[((size_t)b * P + q) * n + o], &got[((size_t)b * n + o) * P + q], 4)) {
                                bad = 1 + ((size_t)b * P + q) * n + o;
                                break;
                            }
                report(rc == SPFQ_OK && !bad, "[dwconv_nhwc %s b=%d sp=%.2f lam=%d C=%d W=%d] %s t=%d %s rc=%d at %zu",
                       layout_name(layout), bits, sp, with_lam, C, W, cfgs[t].isa, cfgs[t].threads, int8 ? "i8" : "f32", rc, bad);
            }
        }
        spfq_set_isa("auto");
        free(x); free(rows); free(xs); free(yg); free(want); free(got); free(xq); free(xl); free(yl);
    }
    spfq_dw_free(dw);
    spfq_free(p);
    free_case(&c);
}

/* ------------------------------------------------------------------ few-channel conv */

/* spfq_dconv (NCHW and channels last) against im2col + spfq_matmul_f32 of the C oracle:
 * bit-identical under every ISA (one micro-kernel source per vector width). C = 3 channels,
 * 3x3 stride 2 pad 1, n outputs (a partial vector at 20). */
static void check_dconv(int layout, int bits, double sp, int with_lam, int n, const run_cfg *cfgs, int ncfg) {
    const int C = 3, B = 2, KH = 3, KW = 3, k = C * KH * KW, H = 9, W = 13;
    const int OH = (H + 2 - 3) / 2 + 1, OW = (W + 2 - 3) / 2 + 1, P = OH * OW;
    wcase c;
    make_case(&c, layout, bits, n, k, sp, with_lam, 1);
    spfq_weights_desc d = {c.layout, c.n, c.k, c.bits, c.wk, c.sign, c.mask, c.planes, c.scale, level_lam(&c), c.bias};
    spfq_conv_geom g = {C, n, KH, KW, 2, 2, 1, 1, 1, 1, 1, 1};
    spfq_dc *dc = NULL;
    spfq_prepared *p = NULL;
    int rc = spfq_dc_prepare(&d, &g, &dc);
    report(rc == SPFQ_OK && dc, "spfq_dc_prepare(%s b=%d) = %d", layout_name(layout), bits, rc);
    rc = spfq_prepare(&d, &p);
    if (!dc || rc) { spfq_dc_free(dc); spfq_free(p); free_case(&c); return; }
    float *x = xmalloc((size_t)B * C * H * W * 4), *xl = xmalloc((size_t)B * C * H * W * 4);
    float *rows = xmalloc((size_t)P * k * 4), *yg = xmalloc((size_t)P * n * 4);
    float *want = xmalloc((size_t)B * n * P * 4), *got = xmalloc((size_t)B * n * P * 4);
    for (int i = 0; i < B * C * H * W; i++) x[i] = nrand();
    for (int b = 0; b < B; b++)
        for (int ch = 0; ch < C; ch++)
            for (int i = 0; i < H * W; i++) xl[((size_t)b * H * W + i) * C + ch] = x[((size_t)b * C + ch) * H * W + i];
    spfq_set_isa("c");
    for (int b = 0; b < B; b++) { /* im2col rows (oh, ow), columns (c, kh, kw), then the oracle GEMM */
        for (int q = 0; q < P; q++)
            for (int ch = 0; ch < C; ch++)
                for (int kh = 0; kh < KH; kh++)
                    for (int kw = 0; kw < KW; kw++) {
                        const int ih = q / OW * 2 - 1 + kh, iw = q % OW * 2 - 1 + kw;
                        rows[(size_t)q * k + (ch * KH + kh) * KW + kw] =
                            (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x[(((size_t)b * C + ch) * H + ih) * W + iw] : 0.0f;
                    }
        spfq_matmul_f32(p, P, rows, yg, 1);
        for (int o = 0; o < n; o++)
            for (int q = 0; q < P; q++) want[((size_t)b * n + o) * P + q] = yg[(size_t)q * n + o];
    }
    for (int t = 0; t < ncfg; t++) {
        spfq_set_isa(cfgs[t].isa);
        for (int nhwc = 0; nhwc < 2; nhwc++) {
            rc = spfq_dconv(dc, nhwc, B, H, W, nhwc ? xl : x, got, cfgs[t].threads);
            size_t bad = 0;
            for (int b = 0; b < B && !bad; b++)
                for (int o = 0; o < n && !bad; o++)
                    for (int q = 0; q < P; q++) {
                        const float *gv = nhwc ? &got[((size_t)b * P + q) * n + o] : &got[((size_t)b * n + o) * P + q];
                        if (memcmp(gv, &want[((size_t)b * n + o) * P + q], 4)) {
                            bad = 1 + ((size_t)b * n + o) * P + q;
                            break;
                        }
                    }
            report(rc == SPFQ_OK && !bad, "[dconv %s b=%d sp=%.2f lam=%d n=%d] %s t=%d %s rc=%d at %zu", layout_name(layout),
                   bits, sp, with_lam, n, cfgs[t].isa, cfgs[t].threads, nhwc ? "nhwc" : "nchw", rc, bad);
        }
    }
    spfq_set_isa("auto");
    free(x); free(xl); free(rows); free(yg); free(want); free(got);
    spfq_dc_free(dc);
    spfq_free(p);
    free_case(&c);
}

/* ------------------------------------------------------------------ activation quantisers */

static void check_quantisers(int m, int k) {
    const size_t len = (size_t)m * k;
    guarded g;
    float *x = galloc(&g, len * 4);
    for (size_t i = 0; i < len; i++) x[i] = nrand() * (float)(1 + (i % 7));
    if (m > 1) memset(x + k, 0, (size_t)k * 4); /* an all-zero row */
    int8_t *xq = xmalloc(len);
    float *xs = xmalloc((size_t)m * 4);
    int rc = spfq_quantize_i8(m, k, x, xq, xs);
    int ok = rc == SPFQ_OK;
    for (int r = 0; r < m && ok; r++) {
        const float *row = x + (size_t)r * k;
        float amax = 0.0f;
        for (int j = 0; j < k; j++) amax = fmaxf(amax, fabsf(row[j]));
        const int big = amax >= 0x1p-100f; /* rule 2 (quant.c): x * (127 / amax), to nearest even */
        const float s = big ? amax / 127.0f : 0.0f, rc = big ? 127.0f / amax : 0.0f;
        ok = xs[r] == s;
        for (int j = 0; j < k && ok; j++) {
            float q = rintf(row[j] * rc);
            int want = q > 127.0f ? 127 : q < -127.0f ? -127 : (int)q;
            ok = xq[(size_t)r * k + j] == want;
        }
    }
    report(ok, "spfq_quantize_i8 M=%d K=%d rc=%d", m, k, rc);

    const int W = (k + 63) / 64;
    uint64_t *xb = xmalloc((size_t)m * W * 8);
    memset(xb, 0xff, (size_t)m * W * 8);
    rc = spfq_binarize(m, k, x, xb, xs);
    ok = rc == SPFQ_OK;
    for (int r = 0; r < m && ok; r++) {
        const float *row = x + (size_t)r * k;
        double sum = 0.0;
        for (int j = 0; j < W * 64 && ok; j++) {
            int bit = (xb[(size_t)r * W + j / 64] >> (j % 64)) & 1;
            ok = bit == (j < k && row[j] < 0.0f);
            if (j < k) sum += fabsf(row[j]);
        }
        ok = ok && fabs(xs[r] - sum / k) <= 1e-6 * (sum / k) + 1e-30;
    }
    report(ok, "spfq_binarize M=%d K=%d rc=%d", m, k, rc);
    gfree(&g);
    free(xq); free(xs); free(xb);
}

/* spfq_quantize_i8 of one ISA against the portable C version, bit for bit: random rows over
 * many magnitudes, exact halves after the division (xscale = 2^e, x = (j + 0.5) 2^e) and their
 * float neighbours, +-0 and all-zero rows, denormals, huge values, NaN (quiet, signalling) and
 * +-inf; K around every vector width. Input and output buffers end at a PROT_NONE page. */
static float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static void check_quantise_isa(const char *isa) {
    static const int qks[] = {1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 47, 63, 64, 65, 100, 384, 1000, 4097};
    const float specials[] = {0.0f, -0.0f, bits_f32(1), bits_f32(0x80000001u), bits_f32(0x00400000u),
                              3.4028235e38f, -3.4028235e38f, INFINITY, -INFINITY, NAN, -NAN,
                              bits_f32(0x7fa00000u), bits_f32(0xffa00001u), 0.5f, -1.5f, 2.5f};
    const int m = 9;
    for (size_t a = 0; a < sizeof qks / sizeof qks[0]; a++) {
        const int k = qks[a];
        const size_t len = (size_t)m * k;
        guarded gx, gq;
        float *x = galloc(&gx, len * 4);
        int8_t *xq = galloc(&gq, len);
        int8_t *want = xmalloc(len);
        float xs[9], ws[9];
        for (int r = 0; r < m; r++) {
            float *row = x + (size_t)r * k;
            const float e = ldexpf(1.0f, (int)(rnd() % 60) - 30);
            for (int j = 0; j < k; j++) {
                switch (r) {
                case 0: row[j] = nrand() * ldexpf(1.0f, (int)(rnd() % 80) - 40); break;       /* random */
                case 1: case 2: {                                       /* halves of x * r (r = 1 / e) */
                    float v = ((float)(int)(rnd() % 254) - 127.0f + 0.5f) * e;
                    uint64_t u = rnd() % 8;
                    row[j] = u == 0 ? nextafterf(v, INFINITY) : u == 1 ? nextafterf(v, -INFINITY) : v;
                    if (j == (int)(rnd() % (uint64_t)k) || j == 0) row[j] = (r == 1 ? 127.0f : -127.0f) * e;
                    break;
                }
                case 3: row[j] = (rnd() & 1) ? -0.0f : 0.0f; break;                             /* +-0 */
                case 4: row[j] = bits_f32((uint32_t)(rnd() % 400) | ((rnd() & 1) << 31)); break; /* denormal */
                case 5: row[j] = (float)((double)nrand() * 1e38); break;                        /* huge */
                default: /* random with specials sprinkled in: row 6 +-inf but no NaN, rows 7, 8 NaNs too */
                    row[j] = rnd() % 5 ? nrand() : specials[rnd() % (r == 6 ? 9 : 16)];
                }
            }
        }
        spfq_set_isa("c");
        int rc0 = spfq_quantize_i8(m, k, x, want, ws);
        spfq_set_isa(isa);
        memset(xq, 0x55, len);
        int rc = spfq_quantize_i8(m, k, x, xq, xs);
        int bad = -1;
        for (size_t i = 0; i < len && bad < 0; i++)
            if (xq[i] != want[i]) bad = (int)i;
        int sbad = -1;
        for (int r = 0; r < m && sbad < 0; r++)
            if (memcmp(&xs[r], &ws[r], 4)) sbad = r;
        report(rc0 == SPFQ_OK && rc == SPFQ_OK && bad < 0 && sbad < 0,
               "spfq_quantize_i8 %s vs c K=%d rc=%d/%d: xq at %d (row %d) %d want %d, xscale row %d", isa, k, rc, rc0,
               bad, bad < 0 ? -1 : bad / k, bad < 0 ? 0 : xq[bad], bad < 0 ? 0 : want[bad], sbad);
        gfree(&gx);
        gfree(&gq);
        free(want);
    }
    spfq_set_isa("auto");
}

/* ------------------------------------------------------------------ argument checks */

static void check_rejects(void) {
    uint64_t words[4] = {0};
    float scale[2] = {1.0f, 1.0f};
    spfq_prepared *p = NULL;
    spfq_weights_desc d = {SPFQ_PLANES, 2, 64, 9, 0, NULL, NULL, words, scale, NULL, NULL};
    report(spfq_prepare(&d, &p) == SPFQ_EINVAL, "prepare accepted bits = 9");
    d.bits = 1;
    report(spfq_prepare(&d, &p) == SPFQ_EINVAL, "prepare accepted bits = 1 for PLANES");
    d.layout = 7; d.bits = 2;
    report(spfq_prepare(&d, &p) == SPFQ_EINVAL, "prepare accepted layout 7");
    d.layout = SPFQ_SIGN; d.sign = NULL;
    report(spfq_prepare(&d, &p) == SPFQ_EINVAL, "prepare accepted SIGN without sign bits");
    d.layout = SPFQ_SIGN_MASK; d.sign = words; d.mask = words + 2; /* bgemm needs SIGN */
    if (spfq_prepare(&d, &p) == SPFQ_OK) {
        int32_t dot[2];
        report(spfq_bgemm(p, 1, words, NULL, dot, NULL, NULL, 1) == SPFQ_EUNSUPPORTED, "bgemm accepted SIGN_MASK weights");
        spfq_free(p);
    } else report(0, "prepare rejected a valid SIGN_MASK desc");
    report(spfq_set_isa("no-such-isa") == SPFQ_EUNSUPPORTED, "spfq_set_isa accepted an unknown name");
    report(spfq_abi_version() == SPFQ_ABI_VERSION, "spfq_abi_version() = %d", spfq_abi_version());
}

/* ------------------------------------------------------------------ thread pool */

/* Workers started so far (pool.c, internal; -1 while a task runs). */
int32_t spfq_pool_workers(void);

typedef struct {
    spfq_prepared *p;
    int m, n, k, two;
    const int8_t *xq;
    const int64_t *rc, *rs; /* naive reference sums (M, N) */
} pool_case;

/* One spfq_matmul_i8_raw call at `threads`, compared with the reference; returns 1 if exact. */
static int pool_call(const pool_case *pc, int threads) {
    const size_t cells = (size_t)pc->m * pc->n;
    int32_t *ac = malloc(cells * 4), *as = malloc(cells * 4);
    if (!ac || !as) { free(ac); free(as); return 0; }
    memset(ac, 0x7f, cells * 4);
    memset(as, 0x7f, cells * 4);
    int ok = spfq_matmul_i8_raw(pc->p, pc->m, pc->xq, ac, as, threads) == SPFQ_OK;
    for (size_t i = 0; i < cells && ok; i++)
        ok = as[i] == pc->rs[i] && ac[i] == (pc->two ? pc->rc[i] : pc->rs[i]);
    free(ac); free(as);
    return ok;
}

typedef struct { const pool_case *pc; int seed, calls, bad; } host_arg;

static void *host_thread(void *arg) {
    host_arg *h = arg;
    static const int th[] = {2, 3, 1, 8, 2, 5};
    for (int i = 0; i < h->calls; i++)
        if (!pool_call(h->pc, th[(h->seed + i) % 6])) h->bad++;
    return NULL;
}

static void check_pool(const char *isa) {
    spfq_set_isa(isa);
    /* SPFQ_TEST_FORK_THREADS=0: the forked child stays single-threaded (run_arm64.sh sets it: in
     * qemu-aarch64 7.2 a child forked from a process with a live second thread aborts in
     * cpu_exec when it creates a thread, with or without this library) */
    const char *fe = getenv("SPFQ_TEST_FORK_THREADS");
    const int fork_threads = !(fe && *fe == '0');
    const int layouts[2] = {SPFQ_SIGN, SPFQ_PLANES};
    for (int li = 0; li < 2; li++) {
        wcase c;
        const int n = 9 * 64 + 5, k = 200, m = 3;
        make_case(&c, layouts[li], 4, n, k, 0.0, 0, 1);
        spfq_prepared *p = prepare(&c);
        if (!p) { free_case(&c); continue; }
        int8_t *xq = xmalloc((size_t)m * k);
        for (size_t i = 0; i < (size_t)m * k; i++) xq[i] = (int8_t)irand(-128, 127);
        int64_t *rc = xmalloc((size_t)m * n * 8), *rs = xmalloc((size_t)m * n * 8);
        for (int i = 0; i < m; i++)
            for (int r = 0; r < n; r++) {
                int64_t s4[4];
                row_sums_i8(c.codes + (size_t)r * k, xq + (size_t)i * k, k, s4);
                rc[(size_t)i * n + r] = s4[0];
                rs[(size_t)i * n + r] = s4[1];
            }
        pool_case pc = {p, m, n, k, layouts[li] == SPFQ_PLANES, xq, rc, rs};
        const char *ln = layout_name(layouts[li]);
        /* thread counts up and down (more threads than blocks / than SPFQ_POOL_MAX included) */
        static const int ths[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 64, 100, 2, 1, 3, 0, -1};
        for (size_t i = 0; i < sizeof ths / sizeof ths[0]; i++)
            report(pool_call(&pc, ths[i]), "pool %s %s: threads %d", isa, ln, ths[i]);
        const int workers = spfq_pool_workers();
        report(workers >= 1 && workers <= 63, "pool %s %s: %d workers after up to 100 threads", isa, ln, workers);
        /* four host threads at once */
        pthread_t tid[4];
        host_arg ha[4];
        int started = 0;
        for (int t = 0; t < 4; t++) {
            ha[t] = (host_arg){&pc, t, 25, 0};
            if (pthread_create(&tid[t], NULL, host_thread, &ha[t]) == 0) started++;
            else break;
        }
        int bad = 0;
        for (int t = 0; t < started; t++) {
            pthread_join(tid[t], NULL);
            bad += ha[t].bad;
        }
        report(started == 4 && bad == 0, "pool %s %s: 4 host threads: %d started, %d wrong results", isa, ln, started, bad);
        /* fork: the child has no workers and must build its own pool */
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) { /* the pool is forgotten (no workers) and rebuilt on demand */
            int ok = spfq_pool_workers() == 0 && pool_call(&pc, 1);
            if (fork_threads) ok = ok && pool_call(&pc, 3) && pool_call(&pc, 2) && spfq_pool_workers() >= 1;
            _exit(ok ? 0 : 1);
        }
        int status = 0;
        report(pid > 0 && waitpid(pid, &status, 0) == pid && WIFEXITED(status) && WEXITSTATUS(status) == 0,
               "pool %s %s: forked child (status %d)", isa, ln, status);
        report(pool_call(&pc, 3) && pool_call(&pc, 2), "pool %s %s: parent after fork", isa, ln);
        free(xq); free(rc); free(rs);
        spfq_free(p);
        free_case(&c);
    }
}

/* ------------------------------------------------------------------ main */

static const int KS[] = {1, 7, 63, 64, 65, 100, 257, 1000, 4096};
static const int NS[] = {1, 3, 64, 65};
static const int MS[] = {1, 2, 3, 16}; /* 3: a partial tile of the 4-row NEON / AVX2 kernels */
#define LEN(a) ((int)(sizeof(a) / sizeof((a)[0])))

/* ------------------------------------------------------------------ fused activations */

/* The activation of spfq_set_activation on a host value (double SiLU: the kernels' exp is a
 * polynomial, a few ulp off). */
static double host_act(int kind, double v, double slope) {
    if (kind == SPFQ_ACT_HARDSWISH) return (float)((float)v * fminf(fmaxf((float)v + 3.0f, 0.0f), 6.0f) / 6.0f);
    if (kind == SPFQ_ACT_SILU) return v < -88.0 ? 0.0 : v / (1.0 + exp(-v));
    return v > 0 ? v : (float)((float)slope * (float)v);
}

/* Every kernel path with an activation fused = its unfused output through host_act: GEMMs of
 * 1 / 5 / 40 rows (matmul_q8, f32: GEMV, small, tall fused / lane tables), depthwise NHWC
 * (row-major units) and the few-channel conv, after a clamp. */
static void check_act(const run_cfg *cfgs, int ncfg) {
    const int N = 48, K = 75, MS_[] = {1, 5, 40}, M = 40;
    wcase c;
    make_case(&c, SPFQ_PLANES, 4, N, K, 0.0, 0, 1);
    spfq_weights_desc d = {c.layout, c.n, c.k, c.bits, c.wk, c.sign, c.mask, c.planes, c.scale, NULL, c.bias};
    spfq_prepared *p = NULL;
    spfq_dw *dw = NULL;
    spfq_dc *dc = NULL;
    wcase cd;
    make_case(&cd, SPFQ_PLANES, 4, 16, 27, 0.0, 0, 1); /* 16 outputs over 3 x 3x3 taps */
    spfq_weights_desc dd = {cd.layout, cd.n, cd.k, cd.bits, cd.wk, cd.sign, cd.mask, cd.planes, cd.scale, NULL, cd.bias};
    wcase cw;
    make_case(&cw, SPFQ_PLANES, 4, 16, 9, 0.0, 0, 1);
    spfq_weights_desc dwd = {cw.layout, cw.n, cw.k, cw.bits, cw.wk, cw.sign, cw.mask, cw.planes, cw.scale, NULL, cw.bias};
    const spfq_dw_geom dg = {16, 1, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1};
    const spfq_conv_geom cg = {3, 16, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1};
    int rc = spfq_prepare(&d, &p) | spfq_dw_prepare(&dwd, &dg, &dw) | spfq_dc_prepare(&dd, &cg, &dc);
    report(rc == SPFQ_OK, "check_act: prepare = %d", rc);
    float slope[48], *x = xmalloc((size_t)M * K * 4), *y0 = xmalloc((size_t)M * N * 4), *y1 = xmalloc((size_t)M * N * 4);
    const int H = 7, W = 9, P = H * W, Pd = 4 * 5;
    float *xi = xmalloc((size_t)P * 16 * 4), *o0 = xmalloc((size_t)P * 16 * 4), *o1 = xmalloc((size_t)P * 16 * 4);
    for (int i = 0; i < N; i++) slope[i] = (float)(urand() - 0.5);
    for (int i = 0; i < M * K; i++) x[i] = 3.0f * nrand();
    for (int i = 0; i < P * 16; i++) xi[i] = 3.0f * nrand();
    for (int t = 0; t < ncfg && rc == SPFQ_OK; t++) {
        spfq_set_isa(cfgs[t].isa);
        for (int kind = SPFQ_ACT_HARDSWISH; kind <= SPFQ_ACT_PRELU; kind++) {
            const float *s = kind == SPFQ_ACT_PRELU ? slope : NULL;
            double worst = 0;
            int ok = 1;
            for (int mi = 0; mi < 3; mi++)
                for (int f32 = 0; f32 < 2; f32++) {
                    const int m = MS_[mi];
                    spfq_set_activation(p, SPFQ_ACT_NONE, NULL);
                    spfq_set_clamp(p, -5.0f, 5.0f);
                    ok &= (f32 ? spfq_matmul_f32(p, m, x, y0, cfgs[t].threads) : spfq_matmul_q8(p, m, x, y0, cfgs[t].threads)) == 0;
                    ok &= spfq_set_activation(p, kind, s) == SPFQ_OK;
                    ok &= (f32 ? spfq_matmul_f32(p, m, x, y1, cfgs[t].threads) : spfq_matmul_q8(p, m, x, y1, cfgs[t].threads)) == 0;
                    for (int i = 0; i < m * N; i++) {
                        const double want = host_act(kind, y0[i], slope[i % N]), e = fabs(y1[i] - want);
                        if (!(e <= 1e-6 * fabs(want) + 1e-7)) ok = 0;
                        worst = e > worst ? e : worst;
                    }
                }
            spfq_dw_set_activation(dw, SPFQ_ACT_NONE, NULL);
            ok &= spfq_dwconv_nhwc(dw, 1, 1, H, W, xi, o0, cfgs[t].threads) == 0;
            spfq_dw_set_activation(dw, kind, s);
            ok &= spfq_dwconv_nhwc(dw, 1, 1, H, W, xi, o1, cfgs[t].threads) == 0;
            for (int i = 0; i < P * 16; i++)
                if (!(fabs(o1[i] - host_act(kind, o0[i], slope[i % 16])) <= 1e-6 * fabs(o0[i]) + 1e-7)) ok = 0;
            spfq_dc_set_activation(dc, SPFQ_ACT_NONE, NULL);
            ok &= spfq_dconv(dc, 0, 1, H, W, xi, o0, cfgs[t].threads) == 0; /* NCHW: channel = i / Pd */
            spfq_dc_set_activation(dc, kind, s);
            ok &= spfq_dconv(dc, 0, 1, H, W, xi, o1, cfgs[t].threads) == 0;
            for (int i = 0; i < Pd * 16; i++)
                if (!(fabs(o1[i] - host_act(kind, o0[i], slope[i / Pd])) <= 1e-6 * fabs(o0[i]) + 1e-7)) ok = 0;
            report(ok, "[act %d] %s t=%d: fused activation differs from the unfused output through it (worst %.3g)", kind,
                   cfgs[t].isa, cfgs[t].threads, worst);
        }
    }
    report(spfq_set_activation(p, 7, NULL) == SPFQ_EINVAL && spfq_set_activation(p, SPFQ_ACT_PRELU, NULL) == SPFQ_EINVAL,
           "spfq_set_activation accepts a bad kind / a PReLU without slopes");
    spfq_set_isa("auto");
    spfq_free(p);
    spfq_dw_free(dw);
    spfq_dc_free(dc);
    free_case(&c);
    free_case(&cd);
    free_case(&cw);
    free(x); free(y0); free(y1); free(xi); free(o0); free(o1);
}

/* Group-wise scales (spfq_grouped_*): the int8 path equals the order written in spfq_kernels.h,
 * evaluated here from exact integer sums in float (ISO C: no contraction); the float path equals
 * the per-row f32 oracle (ISA c) on each group's columns summed in group order; both bit for bit
 * on every ISA and thread count, with bias and clamp after the sum. */
static void check_grouped(int layout, int bits, double sp, int with_lam, int n, int k, int G, int m, const run_cfg *cfgs,
                          int ncfg) {
    wcase c;
    make_case(&c, layout, bits, n, k, sp, with_lam, 1);
    const int ng = (k + G - 1) / G, two = multi_level(layout);
    float *gs = xmalloc((size_t)n * ng * 4), *gl = xmalloc((size_t)n * ng * 4);
    for (int i = 0; i < n * ng; i++) {
        gs[i] = (float)(0.01 + 0.1 * urand());
        gl[i] = gs[i] * (float)(1.3 + 0.6 * urand());
    }
    const float *lam = with_lam && two ? gl : NULL;
    spfq_weights_desc d = {layout, n, k, layout == SPFQ_SIGN ? 1 : layout == SPFQ_SIGN_MASK ? 2 : bits, c.wk,
                           c.sign, c.mask, c.planes, gs, with_lam ? gl : NULL, c.bias};
    spfq_grouped *gw = NULL;
    int rc = spfq_grouped_prepare(&d, G, &gw);
    snprintf(ctx, sizeof ctx, "grouped %s b=%d sp=%.2f lam=%d N=%d K=%d G=%d M=%d", layout_name(layout), bits, sp, with_lam,
             n, k, G, m);
    report(rc == SPFQ_OK && gw, "%s: prepare = %d", ctx, rc);
    float *x = xmalloc((size_t)m * k * 4), *xs = xmalloc((size_t)m * 4), *want = xmalloc((size_t)m * n * 4);
    float *y = xmalloc((size_t)m * n * 4), *xg = xmalloc((size_t)m * G * 4), *t = xmalloc((size_t)m * n * 4);
    int8_t *xq = xmalloc((size_t)m * k);
    for (int i = 0; i < m * k; i++) x[i] = nrand() * (float)(1 + i % 7);
    if (n >= 64) /* decoder shapes: one outlier column per row (the massive activations of a BOS token) */
        for (int i = 0; i < m; i++) x[(size_t)i * k + (i * 37) % k] = 3000.0f;
    spfq_quantize_i8(m, k, x, xq, xs);
    /* int8: t_g = xs * (s * acc_c + (lam - s) * acc_s) + 0.0f (forms of the layout), summed in order */
    for (int i = 0; i < m; i++)
        for (int r = 0; r < n; r++) {
            float s = 0.0f;
            for (int g = 0; g < ng; g++) {
                int64_t ac = 0, as = 0;
                for (int j = g * G; j < k && j < (g + 1) * G; j++) {
                    const int cv = c.codes[(size_t)r * k + j], q = xq[(size_t)i * k + j];
                    ac += (int64_t)q * cv;
                    as += (int64_t)q * (cv > 0) - (int64_t)q * (cv < 0);
                }
                const float sc = gs[(size_t)r * ng + g], fc = (float)ac, fs = (float)as;
                float inner;
                if (!two) inner = sc * fs;
                else if (lam) inner = sc * fc + (lam[(size_t)r * ng + g] - sc) * fs;
                else inner = sc * fc;
                const float tg = xs[i] * inner + 0.0f;
                s = g ? s + tg : tg;
            }
            want[(size_t)i * n + r] = s + c.bias[r];
        }
    for (int q = 0; q < ncfg && gw; q++) {
        spfq_set_isa(cfgs[q].isa);
        for (int i = 0; i < m * n; i++) y[i] = NAN;
        rc = spfq_grouped_matmul_i8(gw, m, xq, xs, y, cfgs[q].threads);
        report(rc == SPFQ_OK && !memcmp(y, want, (size_t)m * n * 4), "%s %s t=%d: grouped_matmul_i8 rc=%d", ctx, cfgs[q].isa,
               cfgs[q].threads, rc);
        rc = spfq_grouped_matmul_q8(gw, m, x, y, cfgs[q].threads);
        report(rc == SPFQ_OK && !memcmp(y, want, (size_t)m * n * 4), "%s %s t=%d: grouped_matmul_q8 rc=%d", ctx, cfgs[q].isa,
               cfgs[q].threads, rc);
    }
    /* float: the per-row oracle (ISA c) on each group's columns, in group order, then bias */
    spfq_set_isa("c");
    for (int g = 0; g < ng && gw; g++) {
        const int c0 = g * G, kg = k - c0 < G ? k - c0 : G;
        wcase part;
        make_case(&part, layout == SPFQ_SPARSE ? SPFQ_PLANES : layout, bits, n, kg, 0.0, 0, 0);
        /* overwrite the random part with group g's codes, re-encoded */
        for (int r = 0; r < n; r++) memcpy(part.codes + (size_t)r * kg, c.codes + (size_t)r * k + c0, (size_t)kg);
        const int W = part.w, L = part.layout;
        if (part.sign) memset(part.sign, 0, (size_t)n * W * 8);
        if (part.mask) memset(part.mask, 0, (size_t)n * W * 8);
        if (part.planes) memset(part.planes, 0, (size_t)bits * n * W * 8);
        for (int r = 0; r < n; r++)
            for (int j = 0; j < kg; j++) {
                const int v = part.codes[(size_t)r * kg + j];
                if (L == SPFQ_PLANES) {
                    const int u = v + (1 << (bits - 1));
                    for (int p = 0; p < bits; p++)
                        if ((u >> p) & 1) set_bit(part.planes + ((size_t)p * n + r) * W, j);
                } else {
                    if (v < 0) set_bit(part.sign + (size_t)r * W, j);
                    if (part.mask && v) set_bit(part.mask + (size_t)r * W, j);
                }
            }
        for (int r = 0; r < n; r++) {
            part.scale[r] = gs[(size_t)r * ng + g];
            if (lam) {
                if (!part.lam) part.lam = xmalloc((size_t)n * 4);
                part.lam[r] = lam[(size_t)r * ng + g];
            }
        }
        spfq_prepared *pp = prepare(&part);
        for (int i = 0; i < m; i++) memcpy(xg + (size_t)i * kg, x + (size_t)i * k + c0, (size_t)kg * 4);
        rc = pp ? spfq_matmul_f32(pp, m, xg, g ? t : want, 1) : SPFQ_EINVAL;
        report(rc == SPFQ_OK, "%s: per-row f32 of group %d = %d", ctx, g, rc);
        if (g)
            for (int i = 0; i < m * n; i++) want[i] = want[i] + t[i];
        spfq_free(pp);
        free_case(&part);
    }
    for (int i = 0; i < m; i++)
        for (int r = 0; r < n; r++) want[(size_t)i * n + r] = want[(size_t)i * n + r] + c.bias[r];
    for (int q = 0; q < ncfg && gw; q++) {
        spfq_set_isa(cfgs[q].isa);
        for (int i = 0; i < m * n; i++) y[i] = NAN;
        rc = spfq_grouped_matmul_f32(gw, m, x, y, cfgs[q].threads);
        report(rc == SPFQ_OK && !memcmp(y, want, (size_t)m * n * 4), "%s %s t=%d: grouped_matmul_f32 rc=%d", ctx, cfgs[q].isa,
               cfgs[q].threads, rc);
    }
    /* clamp after the sum */
    if (gw) {
        spfq_set_isa(cfgs[ncfg - 1].isa);
        rc = spfq_grouped_set_clamp(gw, 0.0f, 0.5f);
        int ok = rc == SPFQ_OK && spfq_grouped_matmul_f32(gw, m, x, y, 1) == SPFQ_OK;
        for (int i = 0; ok && i < m * n; i++) ok = y[i] == (want[i] < 0.0f ? 0.0f : want[i] > 0.5f ? 0.5f : want[i]);
        report(ok, "%s: clamp after the sum", ctx);
        report(spfq_grouped_set_clamp(gw, 1.0f, 0.0f) == SPFQ_EINVAL, "%s: clamp lo > hi refused", ctx);
    }
    spfq_set_isa("auto");
    spfq_grouped_free(gw);
    free(gs); free(gl); free(x); free(xs); free(want); free(y); free(xg); free(t); free(xq);
    free_case(&c);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int main(void) {
    setenv("SPFQ_PARALLEL_MIN_WORK", "0", 0); /* every call splits over the threads it is given */
    const double t0 = now();
    verbose = getenv("SPFQ_TEST_VERBOSE") && *getenv("SPFQ_TEST_VERBOSE") == '1';

    /* ISAs to test: SPFQ_TEST_ISAS or every one the library accepts here */
    run_cfg cfgs[32];
    int ncfg = 0;
    /* thread counts of the per-shape checks: SPFQ_TEST_THREADS (default 1,2) */
    int ths[8] = {1, 2}, nth = 2;
    const char *tenv = getenv("SPFQ_TEST_THREADS");
    if (tenv && *tenv) {
        nth = 0;
        for (const char *q = tenv; *q && nth < 8;) {
            char *end;
            long v = strtol(q, &end, 10);
            if (end == q) break;
            ths[nth++] = (int)v;
            q = *end == ',' ? end + 1 : end;
        }
        if (!nth) ths[nth++] = 1;
    }
    char isas[64] = "";
    const char *want = getenv("SPFQ_TEST_ISAS");
    static const char *all[] = {"c", "avx2", "avx512", "amx", "neon"};
    for (int i = 0; i < (int)(sizeof all / sizeof all[0]); i++) {
        if (want && *want) {
            char list[128];
            snprintf(list, sizeof list, ",%s,", want);
            char key[16];
            snprintf(key, sizeof key, ",%s,", all[i]);
            if (!strstr(list, key)) continue;
            report(spfq_set_isa(all[i]) == SPFQ_OK, "SPFQ_TEST_ISAS names %s, which this build / CPU lacks", all[i]);
        }
        if (spfq_set_isa(all[i]) != SPFQ_OK) continue;
        for (int t = 0; t < nth && ncfg < (int)(sizeof cfgs / sizeof cfgs[0]); t++) cfgs[ncfg++] = (run_cfg){all[i], ths[t]};
        snprintf(isas + strlen(isas), sizeof isas - strlen(isas), "%s%s", *isas ? "," : "", all[i]);
    }
#if defined(__aarch64__)
    report(spfq_set_isa("neon") == SPFQ_OK, "aarch64 build without the neon ISA");
#endif
    report(spfq_set_isa("auto") == SPFQ_OK, "spfq_set_isa(auto)");

    check_rejects();
    for (int t = 0; t < ncfg; t++)
        if (t == 0 || strcmp(cfgs[t].isa, cfgs[t - 1].isa)) check_pool(cfgs[t].isa);
    for (int a = 0; a < LEN(KS); a++)
        for (int b = 0; b < LEN(MS); b++) check_quantisers(MS[b], KS[a]);
    for (int t = 0; t < ncfg; t++)
        if (t == 0 || strcmp(cfgs[t].isa, cfgs[t - 1].isa)) check_quantise_isa(cfgs[t].isa);

    /* Weight variants: layout x bits x sparsity x lam. */
    typedef struct { int layout, bits; double sp; } variant;
    variant vs[64];
    int nv = 0;
    vs[nv++] = (variant){SPFQ_SIGN, 1, 0.0};
    static const double sps[] = {0.0, 0.5, 0.95, 1.0};
    for (int s = 0; s < 4; s++) vs[nv++] = (variant){SPFQ_SIGN_MASK, 2, sps[s]};
    for (int b = 2; b <= 8; b++) vs[nv++] = (variant){SPFQ_PLANES, b, 0.0};
    for (int b = 2; b <= 8; b++)
        for (int s = 0; s < 4; s++) vs[nv++] = (variant){SPFQ_SPARSE, b, sps[s]};

    /* Every variant (x lam) sees every K, with one (N, M) pair per K, rotating through the pairs
     * whose K*N*M stays under a cost cap (so K = 4096 gets N*M <= 32). Four variants, one per
     * layout family (b = 8 for the widest codes), see every shape under the cap plus the
     * largest, K = 4096 x N = 65 x M = 16 (unless SPFQ_TEST_QUICK=1). The cap keeps the run
     * short under qemu, where the bit-at-a-time portable C dominates. */
    const int quick = getenv("SPFQ_TEST_QUICK") && *getenv("SPFQ_TEST_QUICK") == '1';
    long cases = 0;
    for (int v = 0; v < nv; v++)
        for (int lam = 0; lam < 2; lam++) {
            const variant *x = &vs[v];
            const int full = !quick && ((x->layout == SPFQ_SIGN && !lam) ||
                                        (x->layout == SPFQ_SIGN_MASK && x->sp == 0.5 && lam) ||
                                        (x->layout == SPFQ_PLANES && x->bits == 8 && !lam) ||
                                        (x->layout == SPFQ_SPARSE && x->bits == 4 && x->sp == 0.5 && lam));
            for (int a = 0; a < LEN(KS); a++) {
                int ok[LEN(NS) * LEN(MS)], nok = 0;
                for (int nm = 0; nm < LEN(NS) * LEN(MS); nm++)
                    if ((long)KS[a] * NS[nm / LEN(MS)] * MS[nm % LEN(MS)] <= 131072 ||
                        (full && KS[a] == 4096 && nm == LEN(NS) * LEN(MS) - 1)) ok[nok++] = nm;
                const int pick = (v * 5 + lam * 7 + a) % nok;
                for (int i = 0; i < nok; i++) {
                    if (!full && i != pick) continue;
                    const int n = NS[ok[i] / LEN(MS)], m = MS[ok[i] % LEN(MS)];
                    run_case(x->layout, x->bits, x->sp, lam, n, KS[a], m, cfgs, ncfg);
                    cases++;
                }
            }
        }

    for (int v = 0; v < nv; v++) {
        check_dwconv(vs[v].layout, vs[v].bits, vs[v].sp, v % 2, 5, 2, cfgs, ncfg);
        check_dwconv(vs[v].layout, vs[v].bits, vs[v].sp, v % 2, 16, 1, cfgs, ncfg);
        check_dconv(vs[v].layout, vs[v].bits, vs[v].sp, v % 2, v % 3 ? 20 : 32, cfgs, ncfg);
    }

    check_act(cfgs, ncfg);

    /* group-wise scales: every layout family, K a multiple of G or not, of 64 or not; GEMV and tall */
    {
        spfq_weights_desc bad = {SPFQ_PLANES, 4, 64, 4, 0, NULL, NULL, NULL, NULL, NULL, NULL};
        spfq_grouped *none = NULL;
        report(spfq_grouped_prepare(&bad, 32, &none) == SPFQ_EINVAL && !none, "grouped_prepare without buffers refused");
        static const int GK[][2] = {{64, 200}, {32, 96}, {128, 100}, {64, 130}};
        for (int v = 0; v < nv; v++)
            for (int i = 0; i < LEN(GK); i++) {
                if ((v + i) % 3) continue; /* a rotating third of the pairs keeps qemu runs short */
                check_grouped(vs[v].layout, vs[v].bits, vs[v].sp, (v + i) % 2, 1 + 4 * i, GK[i][1], GK[i][0],
                              (v + i) % 4 == 0 ? 17 : 1 + i, cfgs, ncfg);
            }
        /* decoder shapes: whole 64-row tiles and a partial one, GEMV and a short prefill */
        check_grouped(SPFQ_PLANES, 4, 0.0, 0, 130, 576, 32, 1, cfgs, ncfg);
        check_grouped(SPFQ_PLANES, 4, 0.0, 0, 130, 576, 32, 4, cfgs, ncfg);
        check_grouped(SPFQ_PLANES, 8, 0.0, 0, 200, 96, 32, 4, cfgs, ncfg);
        check_grouped(SPFQ_PLANES, 8, 0.0, 0, 4100, 576, 32, 1, cfgs, ncfg);
    }

    char thl[64] = "";
    for (int t = 0; t < nth; t++) snprintf(thl + strlen(thl), sizeof thl - strlen(thl), "%s%d", t ? "," : "", ths[t]);
    printf("test_kernels: isa %s, threads %s (pool: 1..9, 64, 100, 4 host threads, fork), %ld weight cases, %.1f s\n",
           isas, thl, cases, now() - t0);
    printf("%ld passed, %ld failed\n", n_passed, n_failed);
    return n_failed ? 1 : 0;
}
