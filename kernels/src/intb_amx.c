/* intb_amx.c — tall int8 GEMMs (a conv's pixels x its output channels, M >= 16) on Intel AMX
 * tiles (Sapphire Rapids and later), the epilogue fused: api.c's row-block driver calls it like
 * the AVX-512 / AVX2 fused RP kernels, for the "amx" ISA.
 *
 * Why: on a CPU with AMX, onnxruntime's own int8 model multiplies on the tiles (1024 int8 MACs
 * per instruction against 64 for vpdpbusd); conv-shaped GEMMs from the packed codes on VNNI were
 * 2-3x slower per layer than that model's. Here the codes of a layer are unpacked once (on its
 * first tall call) to signed int8 in the tile layout — the packed .spfq words stay what the GEMV
 * path (M < 16, decode) reads — and the activation rows, int8 already, are the A tiles as they lie:
 *   B tile (n block of 16 outputs, k block of 64): row r holds, for output n = 0..15, the codes of
 *     columns 4r .. 4r + 3 at bytes 4n .. 4n + 3 (tdpbssd's layout); zeros past N and K.
 *   A tiles: 16 activation rows x 64 columns of the driver's zero-padded rows (stride j->xstride).
 *   2 A x 2 B tiles -> 4 C tiles (32 rows x 32 outputs) per k block, tdpbssd (signed x signed:
 *   the codes need no offset), exact int32 sums; then y = clamp(xscale * (scale * acc) + bias),
 *   api.c's i8_finish expression and roundings (AVX-512, no fused multiply-add).
 * Weights without lam only (one sum per output, as the fused RP kernels). Linux asks the kernel
 * for the tile state once (arch_prctl ARCH_REQ_XCOMP_PERM); without it AMX is not offered.
 */
#define _GNU_SOURCE
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "internal.h"

#define TGT __attribute__((target("avx512f,avx512bw,avx512vl,amx-tile,amx-int8")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_permitted;
static pthread_once_t amx_once = PTHREAD_ONCE_INIT;
static void amx_init(void) {
    __builtin_cpu_init();
    amx_permitted = __builtin_cpu_supports("amx-tile") && __builtin_cpu_supports("amx-int8") &&
                    __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                    syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

int spfq_amx_available(void) {
    pthread_once(&amx_once, amx_init);
    return amx_permitted;
}

int spfq_rp_i8_fused_ok_amx(const spfq_prepared *w) {
    const int L = w->d.layout;
    return (L == SPFQ_SIGN || L == SPFQ_SIGN_MASK || L == SPFQ_PLANES) && !w->d.lam && spfq_amx_available();
}

/* ------------------------------------------------------------------ weights */

static pthread_mutex_t pack_mu = PTHREAD_MUTEX_INITIALIZER;

/* The codes in the B tile layout (built on the first call, kept with the weights). */
static const int8_t *amx_codes(const spfq_prepared *cw) {
    spfq_prepared *w = (spfq_prepared *)cw; /* the lazily built cache is not part of the weights' value */
    const int8_t *have = atomic_load_explicit((_Atomic(int8_t *) *)&w->amx, memory_order_acquire);
    if (have) return have;
    pthread_mutex_lock(&pack_mu);
    int8_t *t = w->amx;
    if (!t) {
        const int32_t N = w->d.n, K = w->d.k, NB = (N + 15) / 16, KB = (K + 63) / 64;
        int8_t *codes = malloc((size_t)K);
        t = aligned_alloc(64, (size_t)NB * KB * 1024);
        if (codes && t) {
            memset(t, 0, (size_t)NB * KB * 1024);
            for (int32_t n = 0; n < N; n++) {
                spfq_row_codes(w, n, codes);
                for (int32_t k = 0; k < K; k++)
                    t[(((size_t)(n / 16) * KB + (size_t)(k / 64)) * 16 + (size_t)(k % 64) / 4) * 64 + (size_t)(n % 16) * 4 +
                      (size_t)(k % 4)] = codes[k];
            }
            atomic_store_explicit((_Atomic(int8_t *) *)&w->amx, t, memory_order_release);
        } else {
            free(t);
            t = NULL;
        }
        free(codes);
    }
    pthread_mutex_unlock(&pack_mu);
    return t;
}

/* ------------------------------------------------------------------ kernel */

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

/* C tiles 0..3 (rows ra, ra, rb, rb), A tiles 4, 5 (ra, rb rows x 64 bytes), B tiles 6, 7. */
TGT static void configure(int ra, int rb) {
    tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    const int rows[8] = {ra, ra, rb, rb, ra, rb, 16, 16};
    for (int i = 0; i < 8; i++) {
        c.rows[i] = (uint8_t)(rows[i] ? rows[i] : 1);
        c.colsb[i] = 64;
    }
    _tile_loadconfig(&c);
}

/* y for rows [r0, r0 + rows) and outputs [c0, c0 + 16) from the int32 sums acc (rows x 16) */
TGT static void epilogue(const spfq_job *j, const int32_t *acc, int32_t r0, int32_t rows, int32_t c0, int32_t lo,
                         int32_t hi) {
    const spfq_prepared *w = j->w;
    const int32_t N = w->d.n;
    uint32_t keep = 0;
    for (int l = 0; l < 16; l++) keep |= (uint32_t)(c0 + l >= lo && c0 + l < hi) << l;
    if (!keep) return;
    const __mmask16 k = (__mmask16)keep;
    const __m512 sc = _mm512_maskz_loadu_ps(k, w->d.scale + c0);
    const __m512 bi = w->d.bias ? _mm512_maskz_loadu_ps(k, w->d.bias + c0) : _mm512_setzero_ps();
    const __m512 vlo = _mm512_set1_ps(w->clamped ? w->clamp_lo : -INFINITY);
    const __m512 vhi = _mm512_set1_ps(w->clamped ? w->clamp_hi : INFINITY);
    for (int32_t r = 0; r < rows; r++) {
        __m512 v = _mm512_mul_ps(sc, _mm512_cvtepi32_ps(_mm512_loadu_si512(acc + r * 16)));
        v = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(j->xscale[r0 + r]), v), bi);
        v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v)); /* spfq_clamp: NaN stays */
        _mm512_mask_storeu_ps(j->y + (size_t)(r0 + r) * (size_t)N + c0, k, v);
    }
}

TGT void spfq_rp_i8_fused_amx(const spfq_job *j, int32_t n0, int32_t n1) {
    const spfq_prepared *w = j->w;
    const int8_t *B = amx_codes(w);
    if (!B) { /* no memory for the tile codes: the AVX-512 kernel does the work */
        spfq_rp_i8_fused_avx512(j, n0, n1);
        return;
    }
    const int32_t K = w->d.k, KB = (K + 63) / 64, M = j->m;
    const size_t xs = (size_t)j->xstride;
    int32_t acc[4][256] __attribute__((aligned(64)));
    int cfg_a = -1, cfg_b = -1;
    for (int32_t m0 = 0; m0 < M; m0 += 32) {
        const int ra = M - m0 < 16 ? M - m0 : 16, rb = M - m0 - 16 <= 0 ? 0 : (M - m0 - 16 < 16 ? M - m0 - 16 : 16);
        if (ra != cfg_a || rb != cfg_b) {
            configure(ra, rb);
            cfg_a = ra;
            cfg_b = rb;
        }
        const int8_t *xa = j->xq + (size_t)m0 * xs, *xb = xa + 16 * xs;
        for (int32_t c0 = n0 / 16 * 16; c0 < n1; c0 += 32) {
            const int two = c0 + 16 < n1;
            const int8_t *b0 = B + (size_t)(c0 / 16) * KB * 1024, *b1 = b0 + (size_t)KB * 1024;
            _tile_zero(0);
            _tile_zero(1);
            if (rb) {
                _tile_zero(2);
                _tile_zero(3);
            }
            for (int32_t kb = 0; kb < KB; kb++) {
                _tile_loadd(4, xa + (size_t)kb * 64, (long)xs);
                _tile_loadd(6, b0 + (size_t)kb * 1024, 64);
                _tile_dpbssd(0, 4, 6);
                if (two) {
                    _tile_loadd(7, b1 + (size_t)kb * 1024, 64);
                    _tile_dpbssd(1, 4, 7);
                }
                if (rb) {
                    _tile_loadd(5, xb + (size_t)kb * 64, (long)xs);
                    _tile_dpbssd(2, 5, 6);
                    if (two) _tile_dpbssd(3, 5, 7);
                }
            }
            _tile_stored(0, acc[0], 64);
            if (two) _tile_stored(1, acc[1], 64);
            if (rb) {
                _tile_stored(2, acc[2], 64);
                if (two) _tile_stored(3, acc[3], 64);
            }
            epilogue(j, acc[0], m0, ra, c0, n0, n1);
            if (two) epilogue(j, acc[1], m0, ra, c0 + 16, n0, n1);
            if (rb) {
                epilogue(j, acc[2], m0 + 16, rb, c0, n0, n1);
                if (two) epilogue(j, acc[3], m0 + 16, rb, c0 + 16, n0, n1);
            }
        }
    }
    _tile_release();
}

#endif
