/* internal.cuh — helpers shared by the CUDA kernel files (not part of the ABI).
 * Device helpers are static inline so that every .cu compiles on its own (no -rdc). */
#ifndef SPFQ_CUDA_INTERNAL_CUH
#define SPFQ_CUDA_INTERNAL_CUH

#include <cuda_runtime.h>
#include <stdint.h>

#include "spfq_cuda.h"

/* ---- host side: error reporting (runtime.cu) ---- */
#define SPFQ_HIDDEN __attribute__((visibility("hidden")))
SPFQ_HIDDEN int spfq_cuda_fail(int status, const char *fmt, ...);  /* records the message, returns status */
SPFQ_HIDDEN int spfq_cuda_check(cudaError_t err, const char *what); /* SPFQ_OK or SPFQ_ECUDA (+ message) */
SPFQ_HIDDEN void spfq_cuda_clear_error(void);

#define SPFQ_WARP 32
#define SPFQ_WARPS_PER_BLOCK 4 /* output rows (warps) per block in the GEMM kernels */
#define SPFQ_MTILE 8           /* activation rows per warp per pass (registers: 2 x 8 accs) */
#define SPFQ_MAX_GRID_Y 65535

static inline cudaStream_t spfq_stream(void *s) { return (cudaStream_t)s; }

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

/* Shared host-side argument check and launch of the dense / sparse GEMMs. */
SPFQ_HIDDEN int spfq_cuda_i8_setup(const spfq_weights_desc *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                       int32_t *acc_s, const float *xscale, float *y, int sparse, spfq_i8_job *job);

/* ---- device side ---- */

/* 4 bits -> 4 bytes: bit i of nib becomes bit 0 of byte i. */
static __device__ __forceinline__ uint32_t spfq_spread4(uint32_t nib)
{
    return (nib & 1u) | ((nib & 2u) << 7) | ((nib & 4u) << 14) | ((nib & 8u) << 21);
}

/* 4 consecutive int8 activations of row `row` starting at column col (a multiple of 4), packed
 * little-endian into an int (byte i = column col+i); columns >= K read as 0. */
static __device__ __forceinline__ int spfq_load_x4(const int8_t *row, int32_t col, int32_t K,
                                                   int aligned)
{
    if (aligned && col + 3 < K) return *(const int *)(row + col);
    uint32_t v = 0;
    for (int i = 0; i < 4; i++)
        if (col + i < K) v |= (uint32_t)(uint8_t)row[col + i] << (8 * i);
    return (int)v;
}

static __device__ __forceinline__ int spfq_warp_sum(int v)
{
    for (int off = SPFQ_WARP / 2; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
    return v;
}

/* The CPU epilogue (api.c i8_finish), operation for operation, with no FMA contraction. */
static __device__ __forceinline__ float spfq_i8_epilogue(const spfq_weights_desc &d, int32_t n,
                                                         float xs, int32_t acc_c, int32_t acc_s)
{
    const int two = (d.layout == SPFQ_PLANES || d.layout == SPFQ_SPARSE);
    const float s = d.scale[n];
    float v;
    if (!two)
        v = __fmul_rn(s, (float)acc_s);
    else if (d.lam)
        v = __fadd_rn(__fmul_rn(s, (float)acc_c), __fmul_rn(__fsub_rn(d.lam[n], s), (float)acc_s));
    else
        v = __fmul_rn(s, (float)acc_c);
    return __fadd_rn(__fmul_rn(xs, v), d.bias ? d.bias[n] : 0.0f);
}

/* Accumulate one 4-column group (codes c4 / signs s4 as packed int8x4) into the MTILE row
 * accumulators of this warp's tile, then the tile reduction + store. Used by both GEMMs. */
static __device__ __forceinline__ void spfq_tile_dp4a(const spfq_i8_job &j, int32_t m0, int32_t col,
                                                      int c4, int s4, int acc_c[SPFQ_MTILE],
                                                      int acc_s[SPFQ_MTILE])
{
    const int32_t K = j.d.k;
#pragma unroll
    for (int t = 0; t < SPFQ_MTILE; t++) {
        if (m0 + t >= j.m) break;
        const int x4 = spfq_load_x4(j.xq + (size_t)(m0 + t) * (size_t)K, col, K, j.x_aligned);
        if (j.need_c) acc_c[t] = __dp4a(c4, x4, acc_c[t]);
        if (j.need_s) acc_s[t] = __dp4a(s4, x4, acc_s[t]);
    }
}

static __device__ __forceinline__ void spfq_tile_store(const spfq_i8_job &j, int32_t n, int32_t m0,
                                                       int acc_c[SPFQ_MTILE], int acc_s[SPFQ_MTILE])
{
    const int lane = threadIdx.x & (SPFQ_WARP - 1);
    const int32_t N = j.d.n;
#pragma unroll
    for (int t = 0; t < SPFQ_MTILE; t++) {
        /* all 32 lanes take part in the shuffles (m0 + t < m is warp-uniform) */
        if (m0 + t >= j.m) break;
        const int c = j.need_c ? spfq_warp_sum(acc_c[t]) : 0;
        const int s = j.need_s ? spfq_warp_sum(acc_s[t]) : 0;
        if (lane == 0) {
            const size_t i = (size_t)(m0 + t) * (size_t)N + (size_t)n;
            if (j.y) {
                /* SIGN / SIGN_MASK compute only acc_s (== acc_c) */
                j.y[i] = spfq_i8_epilogue(j.d, n, j.xscale[m0 + t], c, s);
            } else {
                const int two = (j.d.layout == SPFQ_PLANES || j.d.layout == SPFQ_SPARSE);
                if (j.acc_c) j.acc_c[i] = two ? c : s;
                if (j.acc_s) j.acc_s[i] = s;
            }
        }
    }
}

#endif /* SPFQ_CUDA_INTERNAL_CUH */
