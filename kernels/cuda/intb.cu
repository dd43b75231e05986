/* intb.cu — dense int8-activation GEMM for the SIGN, SIGN_MASK and PLANES layouts.
 *
 * Thread mapping: one warp per output row n (SPFQ_WARPS_PER_BLOCK = 4 rows per 128-thread
 * block, blockIdx.x), and per pass a tile of SPFQ_MTILE = 8 activation rows (blockIdx.y,
 * grid-strided when M/8 exceeds the grid limit). For M == 1 (GEMV) this is one warp per
 * output row. Inside the warp, the two half-warps take two consecutive 64-column words; lane
 * g = lane % 16 owns columns 4g..4g+3 of its word. Each lane decodes its 4 codes from the
 * packed words into an int8x4 (codes c, and signs sign(c) when needed) once, and applies it
 * to the tile's 8 activation rows with __dp4a (exact int32 products, 4 per instruction). The
 * 32 lane partials per row are summed with __shfl_xor_sync; lane 0 writes acc_c / acc_s, or
 * y through the CPU epilogue. Integer sums wrap modulo 2^32, like the CPU's int32 stores.
 *
 * Decode (bit j of the row = bit j%64 of word j/64):
 *   SIGN:      c = bit ? -1 : +1      (padding columns read x = 0, so their +1 is harmless)
 *   SIGN_MASK: c = mask ? (sign ? -1 : +1) : 0
 *   PLANES:    u = sum_p bit_p << p (bytewise, no carries), c = u - 2^(b-1) per byte (__vsub4);
 *              sign(c) from unsigned byte compares of u against 2^(b-1).
 *
 * Future work: a tensor-core path (mma.sync b1 XOR/AND-popc for SIGN, or s8/u8 mma on
 * repacked PLANES codes for M >= 16), shared-memory staging of activation tiles, and a
 * prepare-time repack of the planes into byte codes. */
#include "internal.cuh"

SPFQ_HD void decode_dense(const spfq_i8_job &j, int32_t n, int32_t word, int sh, int &c4, int &s4)
{
    const size_t W = (size_t)j.W, idx = (size_t)n * W + (size_t)word;
    switch (j.d.layout) {
    case SPFQ_SIGN: {
        const uint32_t neg = spfq_spread4((uint32_t)(j.d.sign[idx] >> sh) & 0xFu);
        c4 = s4 = (int)(0x01010101u | (neg * 0xFEu)); /* byte: 0x01 (+1) or 0xFF (-1) */
        break;
    }
    case SPFQ_SIGN_MASK: {
        const uint32_t mk = (uint32_t)(j.d.mask[idx] >> sh) & 0xFu;
        const uint32_t sg = (uint32_t)(j.d.sign[idx] >> sh) & mk;
        c4 = s4 = (int)(spfq_spread4(mk) | (spfq_spread4(sg) * 0xFEu));
        break;
    }
    default: { /* SPFQ_PLANES */
        const int b = j.d.bits;
        const size_t plane_stride = (size_t)j.d.n * W;
        uint32_t u4 = 0;
        for (int p = 0; p < b; p++)
            u4 |= spfq_spread4((uint32_t)(j.d.planes[(size_t)p * plane_stride + idx] >> sh) & 0xFu) << p;
        const uint32_t off4 = (1u << (b - 1)) * 0x01010101u;
        c4 = (int)spfq_vsub4(u4, off4);
        if (j.need_s)
            s4 = (int)((spfq_vcmpu4(u4, off4, 1) & 0x01010101u) | spfq_vcmpu4(u4, off4, 0));
        else
            s4 = 0;
        break;
    }
    }
}

/* One lane's share of output row n for the activation tile at m0. */
SPFQ_HD void dense_lane(const spfq_i8_job &j, int32_t n, int32_t m0, int lane, int acc_c[SPFQ_MTILE],
                        int acc_s[SPFQ_MTILE])
{
    const int half = lane >> 4, g = lane & 15;
    for (int32_t word = half; word < j.W; word += 2) {
        const int32_t col = word * 64 + 4 * g;
        if (col >= j.d.k) continue; /* padding group: x = 0 */
        int c4, s4;
        decode_dense(j, n, word, 4 * g, c4, s4);
        spfq_tile_dp4a(j, m0, col, c4, s4, acc_c, acc_s);
    }
}

#ifndef SPFQ_CUDA_EMULATE
SPFQ_GLOBAL spfq_dense_i8_kernel(const spfq_i8_job j)
{
    const int warp = threadIdx.x / SPFQ_WARP, lane = threadIdx.x % SPFQ_WARP;
    const int32_t n = (int32_t)blockIdx.x * SPFQ_WARPS_PER_BLOCK + warp;
    if (n >= j.d.n) return; /* whole warp leaves: the shuffles below stay full-warp */
    for (int32_t m0 = (int32_t)blockIdx.y * SPFQ_MTILE; m0 < j.m; m0 += (int32_t)gridDim.y * SPFQ_MTILE) {
        int acc_c[SPFQ_MTILE], acc_s[SPFQ_MTILE];
#pragma unroll
        for (int t = 0; t < SPFQ_MTILE; t++) acc_c[t] = acc_s[t] = 0;
        dense_lane(j, n, m0, lane, acc_c, acc_s);
        spfq_tile_store(j, n, m0, acc_c, acc_s);
    }
}
#endif

static int launch_dense(const spfq_i8_job &j, void *stream)
{
    if (j.m == 0) return SPFQ_OK;
#ifdef SPFQ_CUDA_EMULATE
    (void)stream;
    spfq_emulate_rows(j, j.d.n, j.m, dense_lane, spfq_i8_store);
    return SPFQ_OK;
#else
    const int64_t tiles = ((int64_t)j.m + SPFQ_MTILE - 1) / SPFQ_MTILE;
    dim3 grid((unsigned)((j.d.n + SPFQ_WARPS_PER_BLOCK - 1) / SPFQ_WARPS_PER_BLOCK),
              (unsigned)(tiles < SPFQ_MAX_GRID_Y ? tiles : SPFQ_MAX_GRID_Y));
    spfq_dense_i8_kernel<<<grid, SPFQ_WARPS_PER_BLOCK * SPFQ_WARP, 0, spfq_stream(stream)>>>(j);
    return spfq_cuda_check(cudaGetLastError(), "spfq_dense_i8_kernel launch");
#endif
}

extern "C" int spfq_cuda_matmul_i8_raw(const spfq_weights_desc *w, int32_t m, const int8_t *xq,
                                       int32_t *acc_c, int32_t *acc_s, void *stream)
{
    spfq_i8_job j;
    int rc = spfq_cuda_i8_setup(w, m, xq, acc_c, acc_s, NULL, NULL, 0, &j);
    return rc ? rc : launch_dense(j, stream);
}

extern "C" int spfq_cuda_matmul_i8(const spfq_weights_desc *w, int32_t m, const int8_t *xq,
                                   const float *xscale, float *y, void *stream)
{
    if (!y) return spfq_cuda_fail(SPFQ_EINVAL, "y is NULL");
    spfq_i8_job j;
    int rc = spfq_cuda_i8_setup(w, m, xq, NULL, NULL, xscale, y, 0, &j);
    return rc ? rc : launch_dense(j, stream);
}
