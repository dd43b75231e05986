/* sparse.cu — int8-activation GEMM for the SPARSE layout (mask (N, W) + kept (b, N, Wk)).
 *
 * The i-th set mask bit of a row (column order) owns field i of the row's compact stream,
 * field = sum_p (bit i of kept[p, n]) << p, c = (field & 1 ? -1 : +1) * ((field >> 1) + 1).
 *
 * Thread mapping: as intb.cu — one warp per output row (4 per block, blockIdx.x), tiles of 8
 * activation rows (blockIdx.y), the two half-warps on two consecutive 64-column words, lane
 * g = lane % 16 on columns 4g..4g+3. The warp walks the row's mask words in pairs, keeping a
 * warp-uniform running count `pos` of set mask bits (= the compact index of the pair's first
 * kept field): the upper half-warp's word starts at pos + popc(mask of the lower word), a lane's
 * column j at that + popc(mask bits below j). A pair of all-zero mask words is skipped as a
 * whole (nothing read, pos unchanged; warp-uniform, so no divergence). Fields at index >= Wk*64
 * (a corrupt mask) are never read and count as 0, as in the CPU oracle. Codes are packed into
 * int8x4 and applied with __dp4a exactly as in intb.cu.
 *
 * Future work: decode each kept word once per warp (shared memory / shuffles) instead of per
 * column, and a prepare-time scatter into dense byte codes for large M. */
#include "internal.cuh"

/* Codes (and signs) of columns sh..sh+3 of mask word mw; base = compact index of the word's
 * first kept field. */
SPFQ_HD void decode_sparse(const spfq_i8_job &j, int32_t n, uint64_t mw, uint64_t base, int sh, int &c4, int &s4)
{
    const int b = j.d.bits;
    const size_t Wk = (size_t)j.d.kept_words, plane_stride = (size_t)j.d.n * Wk;
    const uint64_t limit = (uint64_t)Wk * 64u;
    const uint64_t *kept = j.d.planes + (size_t)n * Wk;
    uint32_t c = 0, s = 0;
    for (int i = 0; i < 4; i++) {
        const int col = sh + i;
        if (!((mw >> col) & 1u)) continue;
        const uint64_t below = col ? (mw & ((1ull << col) - 1ull)) : 0ull;
        const uint64_t idx = base + (uint64_t)spfq_popc64(below);
        if (idx >= limit) continue; /* corrupt mask: weight counts as 0 */
        uint32_t f = 0;
        for (int p = 0; p < b; p++)
            f |= (uint32_t)((kept[(size_t)p * plane_stride + (size_t)(idx / 64)] >> (idx % 64)) & 1u) << p;
        const int mag = (int)(f >> 1) + 1;
        const int code = (f & 1u) ? -mag : mag; /* b = 8 and a corrupt field: wraps like the CPU */
        c |= (uint32_t)(uint8_t)(int8_t)code << (8 * i);
        s |= (uint32_t)((f & 1u) ? 0xFFu : 0x01u) << (8 * i);
    }
    c4 = (int)c;
    s4 = (int)s;
}

/* One lane's share of output row n for the activation tile at m0: the walk over mask-word pairs
 * with the (warp-uniform) running count of kept fields. */
SPFQ_HD void sparse_lane(const spfq_i8_job &j, int32_t n, int32_t m0, int lane, int acc_c[SPFQ_MTILE],
                         int acc_s[SPFQ_MTILE])
{
    const int half = lane >> 4, g = lane & 15;
    const uint64_t *mrow = j.d.mask + (size_t)n * (size_t)j.W;
    uint64_t pos = 0; /* warp-uniform */
    for (int32_t w0 = 0; w0 < j.W; w0 += 2) {
        const uint64_t mlo = mrow[w0];
        const uint64_t mhi = (w0 + 1 < j.W) ? mrow[w0 + 1] : 0ull;
        if (!(mlo | mhi)) continue; /* all-zero blocks: skipped */
        const uint64_t mw = half ? mhi : mlo;
        const uint64_t base = pos + (half ? (uint64_t)spfq_popc64(mlo) : 0ull);
        pos += (uint64_t)spfq_popc64(mlo) + (uint64_t)spfq_popc64(mhi);
        const int32_t col = (w0 + half) * 64 + 4 * g;
        if (((mw >> (4 * g)) & 0xFull) == 0 || col >= j.d.k) continue; /* 4 zero weights */
        int c4, s4;
        decode_sparse(j, n, mw, base, 4 * g, c4, s4);
        spfq_tile_dp4a(j, m0, col, c4, s4, acc_c, acc_s);
    }
}

#ifndef SPFQ_CUDA_EMULATE
SPFQ_GLOBAL spfq_sparse_i8_kernel(const spfq_i8_job j)
{
    const int warp = threadIdx.x / SPFQ_WARP, lane = threadIdx.x % SPFQ_WARP;
    const int32_t n = (int32_t)blockIdx.x * SPFQ_WARPS_PER_BLOCK + warp;
    if (n >= j.d.n) return; /* whole warp leaves */
    for (int32_t m0 = (int32_t)blockIdx.y * SPFQ_MTILE; m0 < j.m; m0 += (int32_t)gridDim.y * SPFQ_MTILE) {
        int acc_c[SPFQ_MTILE], acc_s[SPFQ_MTILE];
#pragma unroll
        for (int t = 0; t < SPFQ_MTILE; t++) acc_c[t] = acc_s[t] = 0;
        sparse_lane(j, n, m0, lane, acc_c, acc_s);
        spfq_tile_store(j, n, m0, acc_c, acc_s);
    }
}
#endif

static int launch_sparse(const spfq_i8_job &j, void *stream)
{
#ifdef SPFQ_CUDA_EMULATE
    (void)stream;
    spfq_emulate_rows(j, j.d.n, j.m, sparse_lane, spfq_i8_store);
    return SPFQ_OK;
#else
    spfq_sparse_i8_kernel<<<spfq_tile_grid(j.d.n, j.m), SPFQ_WARPS_PER_BLOCK * SPFQ_WARP, 0, spfq_stream(stream)>>>(j);
    return spfq_cuda_check(cudaGetLastError(), "spfq_sparse_i8_kernel launch");
#endif
}

extern "C" int spfq_cuda_matmul_sparse_i8_raw(const spfq_weights_desc *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                                             int32_t *acc_s, void *stream)
{
    return spfq_cuda_i8_run(w, m, xq, acc_c, acc_s, NULL, NULL, 0, 1, launch_sparse, stream);
}

extern "C" int spfq_cuda_matmul_sparse_i8(const spfq_weights_desc *w, int32_t m, const int8_t *xq, const float *xscale,
                                         float *y, void *stream)
{
    return spfq_cuda_i8_run(w, m, xq, NULL, NULL, xscale, y, 1, 1, launch_sparse, stream);
}
