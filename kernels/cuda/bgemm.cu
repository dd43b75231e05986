/* bgemm.cu — XNOR / popcount GEMM: SIGN weights (N, W) x binary activations (M, W).
 *
 * dot[m,n] = K - 2 * popcount(x[m] XOR w[n]) (padding bits are zero on both sides, so they
 * never differ). Thread mapping: one warp per output row n (4 per 128-thread block,
 * blockIdx.x) and a tile of SPFQ_MTILE = 8 activation rows per pass (blockIdx.y,
 * grid-strided); lane l takes words l, l+32, ... of the row, loads the weight word once and
 * XOR-popcounts it (__popcll) against the tile's 8 activation words; the 32 lane partials are
 * summed with __shfl_xor_sync and lane 0 writes dot / y / ybits. ybits bits are set or cleared
 * with 64-bit atomicOr / atomicAnd (several warps share one output word).
 *
 * Future work: the tensor-core b1 path (mma.sync m16n8k256 .b1 with XOR/AND + popc, sm_80+)
 * for M >= 16, and lanes on 128-bit loads for long rows. */
#include "internal.cuh"

typedef struct {
    int32_t m, n, k, W;
    const uint64_t *w, *x;
    const float *xscale, *scale, *bias;
    int32_t *dot;
    float *y;
    uint64_t *ybits;
} bgemm_job;

/* One lane's popcounts for output row n and the activation tile at m0 (pop[t] += ...; the
 * second accumulator array is unused: the shape spfq_emulate_rows expects). */
SPFQ_HD void bgemm_lane(const bgemm_job &j, int32_t n, int32_t m0, int lane, int pop[SPFQ_MTILE],
                        int unused[SPFQ_MTILE])
{
    (void)unused;
    const uint64_t *wrow = j.w + (size_t)n * (size_t)j.W;
    for (int32_t word = lane; word < j.W; word += SPFQ_WARP) {
        const uint64_t ww = wrow[word];
#pragma unroll
        for (int t = 0; t < SPFQ_MTILE; t++) {
            if (m0 + t >= j.m) break;
            pop[t] += spfq_popc64(ww ^ j.x[(size_t)(m0 + t) * (size_t)j.W + (size_t)word]);
        }
    }
}

/* Set (y < 0) or clear bit n of row m of ybits; several warps share one word on the GPU. */
SPFQ_HD void bgemm_ybit(const bgemm_job &j, int32_t m, int32_t n, int negative)
{
    unsigned long long *wd = (unsigned long long *)(j.ybits + (size_t)m * (size_t)((j.n + 63) / 64) + n / 64);
    const unsigned long long bit = 1ull << (n % 64);
#ifdef __CUDA_ARCH__
    if (negative) atomicOr(wd, bit);
    else atomicAnd(wd, ~bit);
#else
    if (negative) *wd |= bit;
    else *wd &= ~bit;
#endif
}

/* Output (m, n) from the warp's popcount p. */
SPFQ_HD void bgemm_store(const bgemm_job &j, int32_t n, int32_t m, int p, int unused)
{
    (void)unused;
    const int32_t d = j.k - 2 * p;
    const size_t i = (size_t)m * (size_t)j.n + (size_t)n;
    if (j.dot) j.dot[i] = d;
    if (j.y || j.ybits) {
        const float xs = j.xscale ? j.xscale[m] : 1.0f;
        /* CPU order: xs * scale * dot + bias, no FMA */
        const float v = spfq_add(spfq_mul(spfq_mul(xs, j.scale[n]), (float)d), j.bias ? j.bias[n] : 0.0f);
        if (j.y) j.y[i] = v;
        if (j.ybits) bgemm_ybit(j, m, n, v < 0.0f);
    }
}

#ifndef SPFQ_CUDA_EMULATE
SPFQ_GLOBAL spfq_bgemm_kernel(const bgemm_job j)
{
    const int warp = threadIdx.x / SPFQ_WARP, lane = threadIdx.x % SPFQ_WARP;
    const int32_t n = (int32_t)blockIdx.x * SPFQ_WARPS_PER_BLOCK + warp;
    if (n >= j.n) return; /* whole warp leaves */
    for (int32_t m0 = (int32_t)blockIdx.y * SPFQ_MTILE; m0 < j.m; m0 += (int32_t)gridDim.y * SPFQ_MTILE) {
        int pop[SPFQ_MTILE];
#pragma unroll
        for (int t = 0; t < SPFQ_MTILE; t++) pop[t] = 0;
        bgemm_lane(j, n, m0, lane, pop, pop);
#pragma unroll
        for (int t = 0; t < SPFQ_MTILE; t++) {
            if (m0 + t >= j.m) break; /* warp-uniform */
            const int p = spfq_warp_sum(pop[t]);
            if (lane == 0) bgemm_store(j, n, m0 + t, p, 0);
        }
    }
}
#endif

extern "C" int spfq_cuda_bgemm(int32_t m, int32_t n, int32_t k, const uint64_t *w_sign, const uint64_t *xbits,
                               const float *xscale, const float *scale, const float *bias, int32_t *dot,
                               float *y, uint64_t *ybits, void *stream)
{
    spfq_cuda_clear_error();
    if (m < 0 || n <= 0 || k <= 0) return spfq_cuda_fail(SPFQ_EINVAL, "bad shape m=%d n=%d k=%d", m, n, k);
    if (!w_sign || !xbits) return spfq_cuda_fail(SPFQ_EINVAL, "w_sign / xbits is NULL");
    if (!dot && !y && !ybits) return spfq_cuda_fail(SPFQ_EINVAL, "dot, y and ybits are all NULL");
    if ((y || ybits) && !scale) return spfq_cuda_fail(SPFQ_EINVAL, "scale is NULL");
    if (m == 0) return SPFQ_OK;
    bgemm_job j = {m, n, k, spfq_words(k), w_sign, xbits, xscale, scale, bias, dot, y, ybits};
#ifdef SPFQ_CUDA_EMULATE
    (void)stream;
    spfq_emulate_rows(j, n, m, bgemm_lane, bgemm_store);
    return SPFQ_OK;
#else
    spfq_bgemm_kernel<<<spfq_tile_grid(n, m), SPFQ_WARPS_PER_BLOCK * SPFQ_WARP, 0, spfq_stream(stream)>>>(j);
    return spfq_cuda_check(cudaGetLastError(), "spfq_bgemm_kernel launch");
#endif
}
