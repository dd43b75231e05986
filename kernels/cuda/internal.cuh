/* internal.cuh — helpers shared by the CUDA kernel files (not part of the ABI).
 * Device helpers are static inline so that every .cu compiles on its own (no -rdc).
 *
 * Host emulation (-DSPFQ_CUDA_EMULATE): the same sources build a library with the same ABI whose
 * "device" is host memory and whose launches run each kernel's per-lane body on the CPU, lane by
 * lane, the warp reduction being a host sum (spfq_emulate_rows). It exists so that the kernels'
 * arithmetic and indexing (decode, dp4a, sparse field walk, epilogue, quantiser) are tested bit
 * for bit where there is no GPU (make test); launch geometry, shuffles and atomics are exercised
 * only on a real GPU. Per-lane bodies are SPFQ_HD functions; each intrinsic they use has a
 * portable twin below (spfq_dp4a, spfq_vsub4, ...), chosen by __CUDA_ARCH__. The load twins
 * (spfq_ld16 / ld8 / ld4) abort on an address the GPU load could not take. */
#ifndef SPFQ_CUDA_INTERNAL_CUH
#define SPFQ_CUDA_INTERNAL_CUH

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef SPFQ_CUDA_EMULATE
#include <cuda_runtime.h>
#endif

#include "spfq_cuda.h"

#define SPFQ_HD static __host__ __device__ __forceinline__

/* ---- host side: error reporting (runtime.cu) ---- */
#define SPFQ_HIDDEN __attribute__((visibility("hidden")))
SPFQ_HIDDEN int spfq_cuda_fail(int status, const char *fmt, ...); /* records the message, returns status */
SPFQ_HIDDEN void spfq_cuda_clear_error(void);
#ifndef SPFQ_CUDA_EMULATE
SPFQ_HIDDEN int spfq_cuda_check(cudaError_t err, const char *what); /* SPFQ_OK or SPFQ_ECUDA (+ message) */
static inline cudaStream_t spfq_stream(void *s) { return (cudaStream_t)s; }
#endif

#define SPFQ_WARP 32
#define SPFQ_WARPS_PER_BLOCK 4 /* output rows (warps) per block in the GEMM kernels */
#define SPFQ_MTILE 8           /* activation rows per warp per pass (registers: 2 x 8 accs) */
#define SPFQ_MAX_GRID_Y 65535
#define SPFQ_GEMV_MAX_M 4      /* m <= this: the dense int8 GEMM takes the GEMV kernel (intb.cu) */
#define SPFQ_MAX_BITS 8        /* most PLANES planes */

/* Words per row. */
static inline int32_t spfq_words(int32_t k) { return (int32_t)(((int64_t)k + 63) / 64); }

/* What the integer GEMM kernels are asked to produce (passed by value to the kernels). */
typedef struct {
    spfq_weights_desc d; /* device pointers inside */
    int32_t m, W;
    int x_aligned;       /* xq base 4-byte aligned and K % 4 == 0: 32-bit activation loads */
    int need_c, need_s;  /* which sums the kernel computes */
    const int8_t *xq;
    int32_t *acc_c, *acc_s; /* raw outputs (either may be NULL) */
    const float *xscale;    /* != NULL: epilogue y (instead of raw outputs) */
    float *y;
} spfq_i8_job;

/* Shared host-side argument check of the dense / sparse GEMMs. */
SPFQ_HIDDEN int spfq_cuda_i8_setup(const spfq_weights_desc *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                                   int32_t *acc_s, const float *xscale, float *y, int sparse, spfq_i8_job *job);

/* The four int8 entry points (raw / y, dense / sparse): checks, then launch(job, stream) when
 * m > 0. want_y: the y form (y must be given). */
typedef int (*spfq_i8_launch)(const spfq_i8_job &job, void *stream);
SPFQ_HIDDEN int spfq_cuda_i8_run(const spfq_weights_desc *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                                 int32_t *acc_s, const float *xscale, float *y, int want_y, int sparse,
                                 spfq_i8_launch launch, void *stream);

#ifndef SPFQ_CUDA_EMULATE
/* Grid of the tiled GEMMs: SPFQ_WARPS_PER_BLOCK output rows per block on x, tiles of SPFQ_MTILE
 * activation rows on y (the kernels grid-stride past SPFQ_MAX_GRID_Y). */
static inline dim3 spfq_tile_grid(int32_t n, int32_t m)
{
    const int64_t tiles = ((int64_t)m + SPFQ_MTILE - 1) / SPFQ_MTILE;
    return dim3((unsigned)((n + SPFQ_WARPS_PER_BLOCK - 1) / SPFQ_WARPS_PER_BLOCK),
                (unsigned)(tiles < SPFQ_MAX_GRID_Y ? tiles : SPFQ_MAX_GRID_Y));
}
#endif

/* ---- intrinsics and their portable twins (the host emulation; identical results) ---- */

/* sum of the 4 signed byte products + c, wrapping modulo 2^32 like __dp4a */
SPFQ_HD int spfq_dp4a(int a, int b, int c)
{
#ifdef __CUDA_ARCH__
    return __dp4a(a, b, c);
#else
    uint32_t s = (uint32_t)c;
    for (int i = 0; i < 4; i++)
        s += (uint32_t)((int32_t)(int8_t)((uint32_t)a >> (8 * i)) * (int32_t)(int8_t)((uint32_t)b >> (8 * i)));
    return (int)s;
#endif
}

/* bytewise a - b modulo 256 */
SPFQ_HD uint32_t spfq_vsub4(uint32_t a, uint32_t b)
{
#ifdef __CUDA_ARCH__
    return __vsub4(a, b);
#else
    uint32_t r = 0;
    for (int i = 0; i < 4; i++) r |= (((a >> (8 * i)) - (b >> (8 * i))) & 0xFFu) << (8 * i);
    return r;
#endif
}

/* bytewise unsigned a > b (gt = 1) or a < b (gt = 0): 0xFF where true, 0 elsewhere */
SPFQ_HD uint32_t spfq_vcmpu4(uint32_t a, uint32_t b, int gt)
{
#ifdef __CUDA_ARCH__
    return gt ? __vcmpgtu4(a, b) : __vcmpltu4(a, b);
#else
    uint32_t r = 0;
    for (int i = 0; i < 4; i++) {
        const uint32_t x = (a >> (8 * i)) & 0xFFu, y = (b >> (8 * i)) & 0xFFu;
        if (gt ? x > y : x < y) r |= 0xFFu << (8 * i);
    }
    return r;
#endif
}

SPFQ_HD int spfq_popc64(uint64_t v)
{
#ifdef __CUDA_ARCH__
    return __popcll(v);
#else
    return __builtin_popcountll(v);
#endif
}

/* IEEE-rounded float ops, never contracted to FMA (the CPU epilogue's order) */
SPFQ_HD float spfq_mul(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    volatile float r = a * b; /* volatile: no contraction with a neighbouring add */
    return r;
#endif
}

SPFQ_HD float spfq_add(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    volatile float r = a + b;
    return r;
#endif
}

SPFQ_HD float spfq_div(float a, float b)
{
#ifdef __CUDA_ARCH__
    return __fdiv_rn(a, b);
#else
    volatile float r = a / b;
    return r;
#endif
}

/* ---- per-lane helpers shared by the GEMM bodies ---- */

/* 4 bits -> 4 bytes: bit i of nib (< 16) becomes bit 0 of byte i. The multiply puts copies of
 * nib at bits 0, 7, 14, 21 (no two copies' bits overlap, so no carries); bit i of the copy at 7i
 * lands on bit 8i, and the mask keeps exactly those (one IMAD + one LOP). */
SPFQ_HD uint32_t spfq_spread4(uint32_t nib) { return (nib * 0x00204081u) & 0x01010101u; }

/* The 4 bits of word w at bits sh..sh+3 (sh a multiple of 4, < 64). */
SPFQ_HD uint32_t spfq_nib(uint64_t w, int sh) { return (uint32_t)(w >> sh) & 0xFu; }

/* Read-only loads (activations and weights are never written by a GEMM): 16 bytes from a 16-byte
 * aligned address (one 128-bit load on the GPU), 8 bytes from an 8-byte aligned one, 4 bytes
 * from a 4-byte aligned one. The host twins memcpy, after checking the alignment the GPU load
 * needs: a misaligned address, which faults on a GPU (cudaErrorMisalignedAddress), aborts the
 * emulation instead of passing silently. */
#ifndef __CUDA_ARCH__
static inline void spfq_emu_aligned(const void *p, unsigned bytes)
{
    if ((uintptr_t)p % bytes) {
        fprintf(stderr, "spfq_cuda host emulation: misaligned %u-byte load at %p (a GPU faults)\n", bytes, p);
        abort();
    }
}
#endif

SPFQ_HD void spfq_ld16(const void *p, uint32_t v[4])
{
#ifdef __CUDA_ARCH__
    const uint4 q = __ldg((const uint4 *)p);
    v[0] = q.x;
    v[1] = q.y;
    v[2] = q.z;
    v[3] = q.w;
#else
    spfq_emu_aligned(p, 16);
    memcpy(v, p, 16);
#endif
}

SPFQ_HD uint64_t spfq_ld8(const uint64_t *p)
{
#ifdef __CUDA_ARCH__
    return (uint64_t)__ldg((const unsigned long long *)p);
#else
    spfq_emu_aligned(p, 8);
    return *p;
#endif
}

SPFQ_HD int spfq_ld4(const void *p)
{
#ifdef __CUDA_ARCH__
    return __ldg((const int *)p);
#else
    spfq_emu_aligned(p, 4);
    int v;
    memcpy(&v, p, 4);
    return v;
#endif
}

/* 4 consecutive int8 activations of row `row` starting at column col (a multiple of 4), packed
 * little-endian into an int (byte i = column col+i); columns >= K read as 0. */
SPFQ_HD int spfq_load_x4(const int8_t *row, int32_t col, int32_t K, int aligned)
{
    if (aligned && col + 3 < K) return spfq_ld4(row + col); /* one 32-bit load */
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        if (col + i < K) v |= (uint32_t)(uint8_t)row[col + i] << (8 * i);
    return (int)v;
}

/* 16 consecutive activations of a row from column col (a multiple of 16) as 4 int8x4 (v[i] =
 * columns col+4i..col+4i+3); columns >= K read as 0 and are never loaded. One 128-bit load when
 * the address is 16-byte aligned and the 16 columns are inside the row, else 32-bit loads where
 * 4-byte aligned (spfq_load_x4), else bytes. */
SPFQ_HD void spfq_load_x16(const int8_t *row, int32_t col, int32_t K, int v[4])
{
    const int8_t *p = row + col;
    if (col + 15 < K && ((uintptr_t)p & 15u) == 0) {
        spfq_ld16(p, (uint32_t *)v);
        return;
    }
    const int a4 = ((uintptr_t)p & 3u) == 0;
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = spfq_load_x4(row, col + 4 * i, K, a4);
}

/* Words w0 and w0 + 1 (w0 even) of a packed row of W words into out[0], out[1]; a word >= W is
 * never read (0). One 128-bit load when both exist and the address is 16-byte aligned (rows of
 * an odd W alternate between aligned and not), else 64-bit loads. */
SPFQ_HD void spfq_load_words2(const uint64_t *row, int32_t w0, int32_t W, uint64_t out[2])
{
    const uint64_t *p = row + w0;
    if (w0 + 1 < W && ((uintptr_t)p & 15u) == 0) {
        uint32_t v[4];
        spfq_ld16(p, v);
        out[0] = (uint64_t)v[0] | ((uint64_t)v[1] << 32);
        out[1] = (uint64_t)v[2] | ((uint64_t)v[3] << 32);
        return;
    }
    out[0] = spfq_ld8(p);
    out[1] = (w0 + 1 < W) ? spfq_ld8(p + 1) : 0ull;
}

/* The CPU epilogue (api.c i8_finish), operation for operation, with no FMA contraction. */
SPFQ_HD float spfq_i8_epilogue(const spfq_weights_desc &d, int32_t n, float xs, int32_t acc_c, int32_t acc_s)
{
    const int two = (d.layout == SPFQ_PLANES || d.layout == SPFQ_SPARSE);
    const float s = d.scale[n];
    float v;
    if (!two)
        v = spfq_mul(s, (float)acc_s);
    else if (d.lam)
        v = spfq_add(spfq_mul(s, (float)acc_c), spfq_mul(d.lam[n] - s, (float)acc_s));
    else
        v = spfq_mul(s, (float)acc_c);
    return spfq_add(spfq_mul(xs, v), d.bias ? d.bias[n] : 0.0f);
}

/* Accumulate one 4-column group (codes c4 / signs s4 as packed int8x4) into the MTILE row
 * accumulators of this lane, for the tile of activation rows starting at m0. */
SPFQ_HD void spfq_tile_dp4a(const spfq_i8_job &j, int32_t m0, int32_t col, int c4, int s4,
                            int acc_c[SPFQ_MTILE], int acc_s[SPFQ_MTILE])
{
    const int32_t K = j.d.k;
#pragma unroll
    for (int t = 0; t < SPFQ_MTILE; t++) {
        if (m0 + t >= j.m) break;
        const int x4 = spfq_load_x4(j.xq + (size_t)(m0 + t) * (size_t)K, col, K, j.x_aligned);
        if (j.need_c) acc_c[t] = spfq_dp4a(c4, x4, acc_c[t]);
        if (j.need_s) acc_s[t] = spfq_dp4a(s4, x4, acc_s[t]);
    }
}

/* Store the warp-reduced sums c, s of output (row m, column n): raw sums or the epilogue. */
SPFQ_HD void spfq_i8_store(const spfq_i8_job &j, int32_t n, int32_t m, int c, int s)
{
    const size_t i = (size_t)m * (size_t)j.d.n + (size_t)n;
    if (j.y) {
        /* SIGN / SIGN_MASK compute only acc_s (== acc_c) */
        j.y[i] = spfq_i8_epilogue(j.d, n, j.xscale[m], c, s);
    } else {
        const int two = (j.d.layout == SPFQ_PLANES || j.d.layout == SPFQ_SPARSE);
        if (j.acc_c) j.acc_c[i] = two ? c : s;
        if (j.acc_s) j.acc_s[i] = s;
    }
}

/* ---- device side: warp reduction ---- */
#ifndef SPFQ_CUDA_EMULATE
static __device__ __forceinline__ int spfq_warp_sum(int v)
{
    for (int off = SPFQ_WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* Reduce the tile's per-lane sums over the warp; lane 0 stores. */
static __device__ __forceinline__ void spfq_tile_store(const spfq_i8_job &j, int32_t n, int32_t m0,
                                                       int acc_c[SPFQ_MTILE], int acc_s[SPFQ_MTILE])
{
    const int lane = threadIdx.x & (SPFQ_WARP - 1);
#pragma unroll
    for (int t = 0; t < SPFQ_MTILE; t++) {
        /* all 32 lanes take part in the shuffles (m0 + t < m is warp-uniform) */
        if (m0 + t >= j.m) break;
        const int c = j.need_c ? spfq_warp_sum(acc_c[t]) : 0;
        const int s = j.need_s ? spfq_warp_sum(acc_s[t]) : 0;
        if (lane == 0) spfq_i8_store(j, n, m0 + t, c, s);
    }
}
#define SPFQ_GLOBAL __global__ void __launch_bounds__(SPFQ_WARPS_PER_BLOCK * SPFQ_WARP)
#else
/* ---- host emulation: run a lane body for every (row n, tile m0, lane), sum lanes, store ----
 * body(j, n, m0, lane, acc_c, acc_s) adds this lane's partial sums into acc_c / acc_s. */
template <class Job, class Body, class Store>
static void spfq_emulate_rows(const Job &j, int32_t n_rows, int32_t m, Body body, Store store)
{
    for (int32_t n = 0; n < n_rows; n++)
        for (int32_t m0 = 0; m0 < m; m0 += SPFQ_MTILE) {
            uint32_t tot_c[SPFQ_MTILE] = {0}, tot_s[SPFQ_MTILE] = {0};
            for (int lane = 0; lane < SPFQ_WARP; lane++) {
                int acc_c[SPFQ_MTILE] = {0}, acc_s[SPFQ_MTILE] = {0};
                body(j, n, m0, lane, acc_c, acc_s);
                for (int t = 0; t < SPFQ_MTILE; t++) { /* int32 wrap, as the shuffles */
                    tot_c[t] += (uint32_t)acc_c[t];
                    tot_s[t] += (uint32_t)acc_s[t];
                }
            }
            for (int t = 0; t < SPFQ_MTILE && m0 + t < m; t++) store(j, n, m0 + t, (int)tot_c[t], (int)tot_s[t]);
        }
}

/* The same for a kernel whose warp owns R output rows n0..n0+R-1 and all m <= SPFQ_GEMV_MAX_M
 * activation rows (the GEMV kernel): body(j, n0, lane, acc_c[R][MAX_M], acc_s[R][MAX_M]). */
template <int R, class Job, class Body, class Store>
static void spfq_emulate_warps(const Job &j, int32_t n_rows, int32_t m, Body body, Store store)
{
    for (int32_t n0 = 0; n0 < n_rows; n0 += R) {
        uint32_t tot_c[R][SPFQ_GEMV_MAX_M] = {}, tot_s[R][SPFQ_GEMV_MAX_M] = {};
        for (int lane = 0; lane < SPFQ_WARP; lane++) {
            int acc_c[R][SPFQ_GEMV_MAX_M] = {}, acc_s[R][SPFQ_GEMV_MAX_M] = {};
            body(j, n0, lane, acc_c, acc_s);
            for (int r = 0; r < R; r++)
                for (int t = 0; t < SPFQ_GEMV_MAX_M; t++) {
                    tot_c[r][t] += (uint32_t)acc_c[r][t];
                    tot_s[r][t] += (uint32_t)acc_s[r][t];
                }
        }
        for (int r = 0; r < R && n0 + r < n_rows; r++)
            for (int t = 0; t < m && t < SPFQ_GEMV_MAX_M; t++) store(j, n0 + r, t, (int)tot_c[r][t], (int)tot_s[r][t]);
    }
}
#endif

#endif /* SPFQ_CUDA_INTERNAL_CUH */
