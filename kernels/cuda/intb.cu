/* intb.cu — dense int8-activation GEMM for the SIGN, SIGN_MASK and PLANES layouts.
 *
 * Two kernels share one decode (decode4) and one epilogue (spfq_i8_store):
 *
 * Tiled kernel (m > SPFQ_GEMV_MAX_M): one warp per output row n (SPFQ_WARPS_PER_BLOCK = 4 rows
 * per 128-thread block, blockIdx.x), and per pass a tile of SPFQ_MTILE = 8 activation rows
 * (blockIdx.y, grid-strided when M/8 exceeds the grid limit). Inside the warp, the two
 * half-warps take two consecutive 64-column words; lane g = lane % 16 owns columns 4g..4g+3 of
 * its word. Each lane decodes its 4 codes once into an int8x4 (codes c, and signs sign(c) when
 * needed) and applies it to the tile's 8 activation rows with __dp4a (exact int32 products, 4
 * per instruction).
 *
 * GEMV kernel (m <= SPFQ_GEMV_MAX_M = 4, batch-1 decoding): the tiled kernel is poor there — a
 * lane extracts 4 bits of a broadcast word per iteration, so a 4096-column row is 32 dependent
 * iterations of tiny work, its weight loads 8-byte broadcasts. Instead each lane owns a
 * contiguous chunk of 128 columns per pass: two consecutive 64-bit words, ONE 16-byte load per
 * plane, coalesced (the warp reads 32 x 16 = 512 contiguous bytes of a plane row = 4096 columns,
 * so a 4096-column SIGN row is one pass). Its 128 activations of each of the m rows come as
 * 8 x 16-byte loads, and each (output row, activation row) takes 32 dp4a. A warp owns R output
 * rows (4 warps x R rows per block, blockIdx.x): the activation chunk is loaded once per pass and
 * reused for all R rows, so activation traffic (L1 / L2: every warp reads the same m x K bytes)
 * is 1/R of one row per warp, while the weights (the DRAM stream) are read once. R = 4 for SIGN /
 * SIGN_MASK (words: 4 rows x 1-2 arrays x 2 = 8-16 64-bit registers); R = 2 for PLANES (2 rows x
 * up to 8 planes x 2 = 32), to stay spill-free at a useful occupancy. A 4096 x 4096 SIGN GEMV is
 * 1024 warps, 8 per SM of an H100: one wave, every weight load in flight at once.
 * Chunks inside K with 16-byte aligned activation rows take the unrolled FAST body (128-bit
 * loads, constant shifts); the K tail and unaligned xq take the same arithmetic with the
 * sub-chunk loop rolled and checked loads (32-bit where 4-byte aligned, else bytes; columns >= K
 * read as 0). Words >= W are never read; a weight row's 16-byte load falls back to two 8-byte
 * ones where the row is not 16-byte aligned (odd W). Layout and MT (1 for m = 1, else 4, m
 * checked at run time) are template parameters: no layout switch, register arrays sized per
 * layout, and the m = 1 code free of row guards; bits stays a run-time value.
 *
 * Both: the 32 lane partials per (row, activation row) are summed with __shfl_xor_sync; lane 0
 * writes acc_c / acc_s, or y through the CPU epilogue. Integer sums wrap modulo 2^32, like the
 * CPU's int32 stores (the split of the sum over lanes does not change the result mod 2^32).
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

/* Which word a decode asks its accessor for: word(DW_SIGN, 0), word(DW_MASK, 0), word(DW_PLANE, p). */
enum { DW_SIGN = 0, DW_MASK = 1, DW_PLANE = 2 };

/* Codes c4 (and signs s4 when need_s; SIGN / SIGN_MASK always set s4 = c4) of the 4 columns at
 * bits sh..sh+3 of the packed words, as int8x4 (byte i = column sh + i). word(kind, p) returns
 * the 64-bit word holding them; the tiled kernel's accessor loads it from global memory, the
 * GEMV kernel's reads it from a register array (REGS: the planes loop is unrolled to
 * SPFQ_MAX_BITS guarded steps, so that every index is a constant and the array stays in
 * registers). */
template <bool REGS, class Word>
SPFQ_HD void decode4(int layout, int bits, int need_s, const Word &word, int sh, int &c4, int &s4)
{
    switch (layout) {
    case SPFQ_SIGN: {
        const uint32_t neg = spfq_spread4(spfq_nib(word(DW_SIGN, 0), sh));
        c4 = s4 = (int)(0x01010101u + neg * 0xFEu); /* byte: 0x01 (+1) or 0xFF (-1); no carries: one IMAD */
        break;
    }
    case SPFQ_SIGN_MASK: {
        const uint32_t mk = spfq_nib(word(DW_MASK, 0), sh);
        const uint32_t sg = spfq_nib(word(DW_SIGN, 0), sh) & mk;
        c4 = s4 = (int)(spfq_spread4(mk) + spfq_spread4(sg) * 0xFEu); /* 0x00, 0x01, or 0x01 + 0xFE */
        break;
    }
    default: { /* SPFQ_PLANES */
        uint32_t u4 = 0;
        auto add = [&](int p) { u4 |= spfq_spread4(spfq_nib(word(DW_PLANE, p), sh)) << p; };
        if (REGS) {
#pragma unroll
            for (int p = 0; p < SPFQ_MAX_BITS; p++) /* constant plane indices */
                if (p < bits) add(p);
        } else {
            for (int p = 0; p < bits; p++) add(p);
        }
        const uint32_t off4 = (1u << (bits - 1)) * 0x01010101u;
        c4 = (int)spfq_vsub4(u4, off4);
        if (need_s)
            s4 = (int)((spfq_vcmpu4(u4, off4, 1) & 0x01010101u) | spfq_vcmpu4(u4, off4, 0));
        else
            s4 = 0;
        break;
    }
    }
}

/* ---- tiled kernel ---- */

/* One lane's share of output row n for the activation tile at m0. */
SPFQ_HD void dense_lane(const spfq_i8_job &j, int32_t n, int32_t m0, int lane, int acc_c[SPFQ_MTILE],
                        int acc_s[SPFQ_MTILE])
{
    const int half = lane >> 4, g = lane & 15;
    const size_t W = (size_t)j.W, plane_stride = (size_t)j.d.n * W;
    for (int32_t word = half; word < j.W; word += 2) {
        const int32_t col = word * 64 + 4 * g;
        if (col >= j.d.k) continue; /* padding group: x = 0 */
        const size_t idx = (size_t)n * W + (size_t)word;
        auto load = [&](int kind, int p) -> uint64_t {
            return kind == DW_SIGN ? j.d.sign[idx] : kind == DW_MASK ? j.d.mask[idx]
                                                                     : j.d.planes[(size_t)p * plane_stride + idx];
        };
        int c4, s4;
        decode4<false>(j.d.layout, j.d.bits, j.need_s, load, 4 * g, c4, s4);
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

/* ---- GEMV kernel (m <= SPFQ_GEMV_MAX_M) ---- */

template <int L> struct gemv_cfg {
    static constexpr int R = L == SPFQ_PLANES ? 2 : 4; /* output rows per warp (see the header) */
    static constexpr int P = L == SPFQ_SIGN ? 1 : L == SPFQ_SIGN_MASK ? 2 : SPFQ_MAX_BITS; /* words per column */
};

/* Row n of the packed array that holds word slot q (SIGN: sign; SIGN_MASK: sign, mask; PLANES: plane q). */
template <int L>
SPFQ_HD const uint64_t *gemv_row(const spfq_i8_job &j, int q, int32_t n)
{
    const size_t W = (size_t)j.W;
    if (L == SPFQ_PLANES) return j.d.planes + ((size_t)q * (size_t)j.d.n + (size_t)n) * W;
    return (q == 0 ? j.d.sign : j.d.mask) + (size_t)n * W;
}

/* One lane's 128-column chunk (columns col0..col0+127 = words wd[r][slot][0..1] of each row)
 * against the m activation rows, word by word, 16 columns (one 16-byte load per activation row)
 * at a time. FAST: the chunk lies inside K and every activation row is 16-byte aligned; a word's 4
 * sub-chunks are unrolled (constant shifts) and use 128-bit loads. Otherwise (the K tail, or
 * unaligned xq): the same arithmetic with the sub-chunk loop rolled, to keep the code small, and
 * spfq_load_x16's checked loads (columns >= K read as 0). MT: the most activation rows (1, or
 * SPFQ_GEMV_MAX_M with m <= MT at run time). */
template <int L, int MT, bool FAST>
SPFQ_HD void gemv_chunk(const spfq_i8_job &j, int32_t col0,
                        const uint64_t (&wd)[gemv_cfg<L>::R][gemv_cfg<L>::P][2], int acc_c[][SPFQ_GEMV_MAX_M],
                        int acc_s[][SPFQ_GEMV_MAX_M])
{
    constexpr int R = gemv_cfg<L>::R, P = gemv_cfg<L>::P;
    const int32_t K = j.d.k, m = MT == 1 ? 1 : j.m;
    /* SIGN / SIGN_MASK: acc_c == acc_s, only acc_s is kept (spfq_cuda_i8_setup: need_c 0, need_s 1) */
    const int need_c = L == SPFQ_PLANES && j.need_c, need_s = L != SPFQ_PLANES || j.need_s;
#pragma unroll 1
    for (int h = 0; h < 2; h++) { /* word w0 + h: columns col0 + 64h .. + 63 */
        if (!FAST && col0 + 64 * h >= K) break; /* padding */
        uint64_t cur[R][P]; /* this word of every row and slot (selects, not an indexed array) */
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int q = 0; q < P; q++) cur[r][q] = h ? wd[r][q][1] : wd[r][q][0];
#pragma unroll(FAST ? 4 : 1)
        for (int s = 0; s < 4; s++) { /* sub-chunk: bits 16s .. 16s + 15 of the word */
            const int32_t col = col0 + 64 * h + 16 * s;
            if (!FAST && col >= K) break; /* padding */
            int xv[MT][4];
#pragma unroll
            for (int t = 0; t < MT; t++) {
                if (t >= m) break;
                const int8_t *row = j.xq + (size_t)t * (size_t)K;
                if (FAST)
                    spfq_ld16(row + col, (uint32_t *)xv[t]);
                else
                    spfq_load_x16(row, col, K, xv[t]);
            }
#pragma unroll
            for (int g = 0; g < 4; g++) {
#pragma unroll
                for (int r = 0; r < R; r++) { /* rows >= N have zero words; not stored */
                    auto word = [&](int kind, int p) -> uint64_t {
                        const int q = kind == DW_PLANE ? p : kind == DW_MASK ? 1 : 0;
                        return cur[r][q < P ? q : P - 1]; /* (the clamp only tames dead branches) */
                    };
                    int c4, s4;
                    decode4<true>(L, j.d.bits, need_s, word, 16 * s + 4 * g, c4, s4);
#pragma unroll
                    for (int t = 0; t < MT; t++) {
                        if (t >= m) break;
                        if (need_c) acc_c[r][t] = spfq_dp4a(c4, xv[t][g], acc_c[r][t]);
                        if (need_s) acc_s[r][t] = spfq_dp4a(s4, xv[t][g], acc_s[r][t]);
                    }
                }
            }
        }
    }
}

/* One lane's share of output rows n0..n0+R-1 (those < N) for the m activation rows: per pass,
 * words w0 = 2*lane + 64*pass and w0 + 1 of every row and plane (one 16-byte load each where
 * aligned; words >= W are never read), then gemv_chunk. */
template <int L, int MT>
SPFQ_HD void gemv_lane(const spfq_i8_job &j, int32_t n0, int lane, int acc_c[][SPFQ_GEMV_MAX_M],
                       int acc_s[][SPFQ_GEMV_MAX_M])
{
    constexpr int R = gemv_cfg<L>::R, P = gemv_cfg<L>::P;
    const int32_t K = j.d.k, W = j.W, N = j.d.n;
    const int nw = L == SPFQ_PLANES ? j.d.bits : P; /* word slots in use */
    /* every activation row starts 16-byte aligned (MT == 1: m == 1) */
    const int x16 = ((uintptr_t)j.xq & 15u) == 0 && (MT == 1 || (K & 15) == 0);
    for (int32_t w0 = 2 * lane; w0 < W; w0 += 2 * SPFQ_WARP) {
        uint64_t wd[R][P][2]; /* [row][slot][word] */
#pragma unroll
        for (int r = 0; r < R; r++)
#pragma unroll
            for (int q = 0; q < P; q++) {
                wd[r][q][0] = wd[r][q][1] = 0;
                if (n0 + r < N && q < nw) spfq_load_words2(gemv_row<L>(j, q, n0 + r), w0, W, wd[r][q]);
            }
        const int32_t col0 = w0 * 64;
        if (x16 && (int64_t)col0 + 128 <= (int64_t)K)
            gemv_chunk<L, MT, true>(j, col0, wd, acc_c, acc_s);
        else
            gemv_chunk<L, MT, false>(j, col0, wd, acc_c, acc_s);
    }
}

#ifndef SPFQ_CUDA_EMULATE
/* Launch bounds = a register budget: ptxas fills whatever it is allowed with hoisted loads of the
 * unrolled bodies. SIGN / SIGN_MASK: >= 5 blocks (20 warps) per SM, <= 102 registers; PLANES (the
 * words of 2 rows x 8 planes x 2 words = 64 registers alone): >= 3 blocks, <= 170. No variant
 * spills at these (sm_80, sm_90); with the plain bound ptxas spilled SIGN_MASK m <= 4 at 96.
 * (A 4096-row SIGN GEMV needs 8 warps per SM of an H100 for one wave.) */
template <int L>
struct gemv_min_blocks {
    static constexpr int value = L == SPFQ_PLANES ? 3 : 5;
};
template <int L, int MT>
__global__ void __launch_bounds__(SPFQ_WARPS_PER_BLOCK * SPFQ_WARP, gemv_min_blocks<L>::value)
spfq_gemv_i8_kernel(const spfq_i8_job j)
{
    constexpr int R = gemv_cfg<L>::R;
    const int warp = threadIdx.x / SPFQ_WARP, lane = threadIdx.x % SPFQ_WARP;
    const int64_t n0l = ((int64_t)blockIdx.x * SPFQ_WARPS_PER_BLOCK + warp) * R;
    if (n0l >= j.d.n) return; /* whole warp leaves: the shuffles below stay full-warp */
    const int32_t n0 = (int32_t)n0l;
    int acc_c[R][SPFQ_GEMV_MAX_M], acc_s[R][SPFQ_GEMV_MAX_M];
#pragma unroll
    for (int r = 0; r < R; r++)
#pragma unroll
        for (int t = 0; t < SPFQ_GEMV_MAX_M; t++) acc_c[r][t] = acc_s[r][t] = 0;
    gemv_lane<L, MT>(j, n0, lane, acc_c, acc_s);
#pragma unroll
    for (int r = 0; r < R; r++) {
        if (n0 + r >= j.d.n) break; /* warp-uniform */
#pragma unroll
        for (int t = 0; t < MT; t++) {
            if (t >= j.m) break; /* warp-uniform */
            const int c = (L == SPFQ_PLANES && j.need_c) ? spfq_warp_sum(acc_c[r][t]) : 0;
            const int s = (L != SPFQ_PLANES || j.need_s) ? spfq_warp_sum(acc_s[r][t]) : 0;
            if (lane == 0) spfq_i8_store(j, n0 + r, t, c, s);
        }
    }
}
#endif

/* MT = 1 for m = 1 (batch-1 decoding: no run-time row guards, the smallest code), else
 * SPFQ_GEMV_MAX_M with m checked at run time (two instantiations per layout, not four: build time). */
template <int L>
static int launch_gemv(const spfq_i8_job &j, void *stream)
{
    constexpr int R = gemv_cfg<L>::R;
#ifdef SPFQ_CUDA_EMULATE
    (void)stream;
    if (j.m == 1)
        spfq_emulate_warps<R>(j, j.d.n, j.m, gemv_lane<L, 1>, spfq_i8_store);
    else
        spfq_emulate_warps<R>(j, j.d.n, j.m, gemv_lane<L, SPFQ_GEMV_MAX_M>, spfq_i8_store);
    return SPFQ_OK;
#else
    const int64_t rows_per_block = (int64_t)SPFQ_WARPS_PER_BLOCK * R;
    const dim3 grid((unsigned)(((int64_t)j.d.n + rows_per_block - 1) / rows_per_block));
    if (j.m == 1)
        spfq_gemv_i8_kernel<L, 1><<<grid, SPFQ_WARPS_PER_BLOCK * SPFQ_WARP, 0, spfq_stream(stream)>>>(j);
    else
        spfq_gemv_i8_kernel<L, SPFQ_GEMV_MAX_M><<<grid, SPFQ_WARPS_PER_BLOCK * SPFQ_WARP, 0, spfq_stream(stream)>>>(j);
    return spfq_cuda_check(cudaGetLastError(), "spfq_gemv_i8_kernel launch");
#endif
}

static int launch_dense(const spfq_i8_job &j, void *stream)
{
    if (j.m <= SPFQ_GEMV_MAX_M) {
        switch (j.d.layout) {
        case SPFQ_SIGN: return launch_gemv<SPFQ_SIGN>(j, stream);
        case SPFQ_SIGN_MASK: return launch_gemv<SPFQ_SIGN_MASK>(j, stream);
        default: return launch_gemv<SPFQ_PLANES>(j, stream);
        }
    }
#ifdef SPFQ_CUDA_EMULATE
    (void)stream;
    spfq_emulate_rows(j, j.d.n, j.m, dense_lane, spfq_i8_store);
    return SPFQ_OK;
#else
    spfq_dense_i8_kernel<<<spfq_tile_grid(j.d.n, j.m), SPFQ_WARPS_PER_BLOCK * SPFQ_WARP, 0, spfq_stream(stream)>>>(j);
    return spfq_cuda_check(cudaGetLastError(), "spfq_dense_i8_kernel launch");
#endif
}

extern "C" int spfq_cuda_matmul_i8_raw(const spfq_weights_desc *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                                      int32_t *acc_s, void *stream)
{
    return spfq_cuda_i8_run(w, m, xq, acc_c, acc_s, NULL, NULL, 0, 0, launch_dense, stream);
}

extern "C" int spfq_cuda_matmul_i8(const spfq_weights_desc *w, int32_t m, const int8_t *xq, const float *xscale,
                                  float *y, void *stream)
{
    return spfq_cuda_i8_run(w, m, xq, NULL, NULL, xscale, y, 1, 0, launch_dense, stream);
}
