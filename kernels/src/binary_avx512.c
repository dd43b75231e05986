/* binary_avx512.c — AVX-512 range functions for SIGN / SIGN_MASK int8 weights and XNOR/popcount
 * bgemm.
 *
 * Same semantics as binary.c (the oracle): every result here is an exact integer and equals the
 * C version bit for bit. Compiled on x86-64 only, with function-level target attributes (the
 * dispatcher calls these only when the CPU has AVX-512 F/BW/VL/VNNI/VPOPCNTDQ/BITALG). No
 * global or static state: thread-safe. Functions not defined here (the f32 kernels) fall back
 * to the AVX2 versions in api.c.
 *
 * Shared structure: output rows [n0, n1) are walked in blocks of 64 weight rows (at K = 4096 a
 * SIGN block is 32 KiB, so it stays in L1/L2 while every activation row streams past it); inside
 * a block, register tiles of MR activation rows x NR weight rows (4 x 4, 2 x 4, 1 x 8) keep
 * MR * NR vector accumulators that are reduced only once per output ("reduce late"). K tails
 * use masked loads (no read past the row ends).
 *
 * bgemm: vpxorq + vpopcntq + vpaddq on 8 words (512 binary MACs) per zmm; each activation load
 *   is shared by NR weight rows and each weight load by MR activation rows. dot = K - 2 pc over
 *   all W words (padding bits included, exactly like the C oracle).
 *
 * sign_i8: sum_k x_k s_k = sum_k x_k - 2 * sum_{k: sign bit set} x_k. A 64-bit sign word is
 *   loaded straight into a mask register (kmovq), vmovdqu8{z} turns it into 0/1 bytes and
 *   vpdpbusd(acc, w01 (u8), x (s8)) adds the selected activations into int32 lanes: 2 vector
 *   ops per 64 MACs, the 0/1 bytes shared by MR activation rows. sum_k x_k is computed once per
 *   activation row and weight block (vpdpbusd with ones).
 *
 * sign_mask_i8: signed weight bytes w in {-1, 0, +1} = mask ? (sign ? -1 : +1) : 0 are built
 *   with 2 vector ops from the two mask registers (vpblendmb{ksign}(+1, -1), then
 *   vmovdqu8{kmask}{z}; no kandq), and
 *   vpdpbusd(acc, x ^ 0x80 (u8 = x + 128), w (s8)) gives sum (x + 128) w; the exact correction
 *   128 * sum_k w_k = 128 * (popcount(mask) - 2 popcount(mask & sign)) is computed per weight row
 *   once per block with vpopcntq. Bits at k >= K are masked off (the oracle ignores them).
 *
 * i8 at prefill M (use_vnni: M >= 16 at K <= 1024, M >= 24 at K <= 2048): sign_i8_vnni, see
 *   its section at the end (weights expanded to bytes once per call, outputs in vector lanes).
 *
 * Times (single thread, AMD EPYC Zen 4 class, K = N = 4096, range function called from C, best
 * of many runs; avx2 = binary_avx2.c through the same API):
 *   bgemm         M = 1: 0.022 ms   M = 64: 0.63 ms   (avx2 ~0.045 / 2.7 ms)
 *   sign_i8       M = 1: 0.073 ms   M = 64: 2.6 ms    (avx2 ~0.155 / 6.8 ms)
 *   sign_mask_i8  M = 1: 0.159 ms   M = 64: 3.0 ms    (avx2 ~0.26 / 9.4 ms)
 */
#if defined(__x86_64__)

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define AVX512_TARGET "avx512f,avx512bw,avx512vl,avx512vnni,avx512vpopcntdq,avx512bitalg,bmi2,popcnt,fma"
#define AVX512_FN __attribute__((target(AVX512_TARGET)))
#define AVX512_INLINE static inline __attribute__((target(AVX512_TARGET), always_inline))

#define NBLOCK 64 /* weight rows per block */

static inline int32_t imin512(int32_t a, int32_t b) { return a < b ? a : b; }

/* acc += vpdpbusd(a (u8), b (s8)), accumulating in place. Inline asm because GCC 12 treats the
 * intrinsic as non-destructive and copies every accumulator each iteration (2 extra vmovdqa per
 * vpdpbusd in the hot loops; the asm form made the K = 4096 GEMV ~25% faster). */
AVX512_INLINE __m512i dpbusd(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

/* ------------------------------------------------------------------------------ bgemm */

/* MR activation rows (xbits rows m.., stride W) x NR weight rows (stride W). */
AVX512_INLINE void bgemm_tile(const uint64_t *x, const uint64_t *w, int32_t W, int32_t K,
                              int32_t *dot, int32_t N, const int MR, const int NR) {
    __m512i acc[4][8];
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) acc[a][b] = _mm512_setzero_si512();
    const int32_t full = W / 8;
    for (int32_t i = 0; i < full; i++) {
        __m512i xv[4];
        for (int a = 0; a < MR; a++) xv[a] = _mm512_loadu_si512(x + (size_t)a * W + 8 * i);
        for (int b = 0; b < NR; b++) {
            __m512i wv = _mm512_loadu_si512(w + (size_t)b * W + 8 * i);
            for (int a = 0; a < MR; a++)
                acc[a][b] = _mm512_add_epi64(acc[a][b],
                                             _mm512_popcnt_epi64(_mm512_xor_si512(xv[a], wv)));
        }
    }
    if (W & 7) {
        const __mmask8 t = (__mmask8)((1u << (W & 7)) - 1u);
        __m512i xv[4];
        for (int a = 0; a < MR; a++) xv[a] = _mm512_maskz_loadu_epi64(t, x + (size_t)a * W + 8 * full);
        for (int b = 0; b < NR; b++) {
            __m512i wv = _mm512_maskz_loadu_epi64(t, w + (size_t)b * W + 8 * full);
            for (int a = 0; a < MR; a++)
                acc[a][b] = _mm512_add_epi64(acc[a][b],
                                             _mm512_popcnt_epi64(_mm512_xor_si512(xv[a], wv)));
        }
    }
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++)
            dot[(size_t)a * N + b] = K - 2 * (int32_t)_mm512_reduce_add_epi64(acc[a][b]);
}

#define BGEMM_CASE(MR_, NR_)                                                            \
    case (MR_) * 16 + (NR_):                                                           \
        bgemm_tile(x, w, W, K, dot, N, MR_, NR_);                                      \
        break;

AVX512_FN void spfq_bgemm_avx512(const spfq_job *j, int32_t n0, int32_t n1) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words, M = j->m;
    for (int32_t nb = n0; nb < n1; nb += NBLOCK) {
        const int32_t ne = imin512(nb + NBLOCK, n1);
        for (int32_t m = 0; m < M;) {
            const int MR = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            const int NR = MR == 1 ? 8 : 4;
            const uint64_t *x = j->xbits + (size_t)m * W;
            for (int32_t n = nb; n < ne; n += NR) {
                const int nr = imin512(NR, ne - n);
                const uint64_t *w = d->sign + (size_t)n * W;
                int32_t *dot = j->dot + (size_t)m * N + n;
                switch (MR * 16 + nr) {
                    BGEMM_CASE(4, 1) BGEMM_CASE(4, 2) BGEMM_CASE(4, 3) BGEMM_CASE(4, 4)
                    BGEMM_CASE(2, 1) BGEMM_CASE(2, 2) BGEMM_CASE(2, 3) BGEMM_CASE(2, 4)
                    BGEMM_CASE(1, 1) BGEMM_CASE(1, 2) BGEMM_CASE(1, 3) BGEMM_CASE(1, 4)
                    BGEMM_CASE(1, 5) BGEMM_CASE(1, 6) BGEMM_CASE(1, 7) BGEMM_CASE(1, 8)
                    default: break;
                }
            }
            m += MR;
        }
    }
}

/* ------------------------------------------------------------------------------ i8 */

/* Tail mask of the last 64-column chunk (all ones when K % 64 == 0). */
static inline uint64_t tail_bits(int32_t K) {
    return (K & 63) ? ((1ull << (K & 63)) - 1ull) : ~0ull;
}

/* sum_k x_k over one int8 row (exact). */
AVX512_INLINE int32_t row_sum_i8(const int8_t *x, int32_t K) {
    const __m512i one = _mm512_set1_epi8(1);
    __m512i s0 = _mm512_setzero_si512(), s1 = _mm512_setzero_si512();
    int32_t k = 0;
    for (; k + 128 <= K; k += 128) {
        s0 = dpbusd(s0, one, _mm512_loadu_si512(x + k));
        s1 = dpbusd(s1, one, _mm512_loadu_si512(x + k + 64));
    }
    for (; k < K; k += 64) {
        const int32_t r = K - k;
        const __mmask64 t = r >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << r) - 1);
        s0 = dpbusd(s0, one, _mm512_maskz_loadu_epi8(t, x + k));
    }
    return _mm512_reduce_add_epi32(_mm512_add_epi32(s0, s1));
}

/* One 64-column chunk of the SIGN tile: xv are the activations (zero past K), kt the tail mask. */
#define SIGN_CHUNK(LOADX, I)                                                             \
    do {                                                                                 \
        __m512i xv[4];                                                                   \
        for (int a = 0; a < MR; a++) xv[a] = LOADX(x + (size_t)a * K + 64 * (size_t)(I)); \
        for (int b = 0; b < NR; b++) {                                                   \
            __m512i w01 = _mm512_maskz_mov_epi8(_cvtu64_mask64(w[(size_t)b * W + (I)]), one); \
            for (int a = 0; a < MR; a++) acc[a][b] = dpbusd(acc[a][b], w01, xv[a]);      \
        }                                                                                \
    } while (0)

AVX512_INLINE void sign_tile(const int8_t *x, const uint64_t *w, int32_t W, int32_t K,
                             const int32_t *sumx, int32_t *acc_s, int32_t *acc_c, int32_t N,
                             const int MR, const int NR) {
    const __m512i one = _mm512_set1_epi8(1);
    __m512i acc[4][8];
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) acc[a][b] = _mm512_setzero_si512();
    const int32_t full = K / 64;
#define LOAD_FULL(p) _mm512_loadu_si512(p)
    for (int32_t i = 0; i < full; i++) SIGN_CHUNK(LOAD_FULL, i);
    if (K & 63) { /* activations past K load as 0, so weight bits there cannot contribute */
        const __mmask64 t = _cvtu64_mask64(tail_bits(K));
#define LOAD_TAIL(p) _mm512_maskz_loadu_epi8(t, p)
        SIGN_CHUNK(LOAD_TAIL, full);
#undef LOAD_TAIL
    }
#undef LOAD_FULL
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) {
            const int32_t v = sumx[a] - 2 * _mm512_reduce_add_epi32(acc[a][b]);
            acc_s[(size_t)a * N + b] = v;
            if (acc_c) acc_c[(size_t)a * N + b] = v;
        }
}

#define SIGN_CASE(MR_, NR_)                                                     \
    case (MR_) * 16 + (NR_):                                                    \
        sign_tile(x, w, W, K, sumx, as, ac, N, MR_, NR_);                       \
        break;

static int sign_i8_vnni(const spfq_job *j, int32_t n0, int32_t n1, int ternary);

/* The expanded-weight path below for M activation rows at reduction length K: it wins from
 * M = 16 at K <= 1024 (MiniLM M = 128: ~2x), from M ~ 24 at K <= 2048; at K = 4096 the
 * per-call expansion makes it no faster than these tiles up to M = 128 (measured on the Zen 5
 * class machine of the times above, 1 thread). */
static inline int use_vnni(int32_t M, int32_t K) {
    return (M >= 16 && K <= 1024) || (M >= 24 && K <= 2048);
}

AVX512_FN void spfq_sign_i8_avx512(const spfq_job *j, int32_t n0, int32_t n1) {
    if (spfq_binary_use_rp(j->m, j->w->d.k) && spfq_rp_i8_avx512 && spfq_rp_i8_avx512(j, n0, n1, j->acc_s)) {
        spfq_mirror_acc(j, n0, n1);
        return;
    }
    if (use_vnni(j->m, j->w->d.k) && sign_i8_vnni(j, n0, n1, 0) == 0) return;
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words, M = j->m;
    for (int32_t nb = n0; nb < n1; nb += NBLOCK) {
        const int32_t ne = imin512(nb + NBLOCK, n1);
        for (int32_t m = 0; m < M;) {
            const int MR = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            const int NR = MR == 1 ? 8 : 4;
            const int8_t *x = j->xq + (size_t)m * K;
            int32_t sumx[4];
            for (int a = 0; a < MR; a++) sumx[a] = row_sum_i8(x + (size_t)a * K, K);
            for (int32_t n = nb; n < ne; n += NR) {
                const int nr = imin512(NR, ne - n);
                const uint64_t *w = d->sign + (size_t)n * W;
                int32_t *as = j->acc_s + (size_t)m * N + n;
                int32_t *ac = j->acc_c ? j->acc_c + (size_t)m * N + n : NULL;
                switch (MR * 16 + nr) {
                    SIGN_CASE(4, 1) SIGN_CASE(4, 2) SIGN_CASE(4, 3) SIGN_CASE(4, 4)
                    SIGN_CASE(2, 1) SIGN_CASE(2, 2) SIGN_CASE(2, 3) SIGN_CASE(2, 4)
                    SIGN_CASE(1, 1) SIGN_CASE(1, 2) SIGN_CASE(1, 3) SIGN_CASE(1, 4)
                    SIGN_CASE(1, 5) SIGN_CASE(1, 6) SIGN_CASE(1, 7) SIGN_CASE(1, 8)
                    default: break;
                }
            }
            m += MR;
        }
    }
}

/* 128 * sum_k w_k for one SIGN_MASK row: 128 * (popcount(mask) - 2 popcount(mask & sign)),
 * bits at k >= K ignored. */
AVX512_INLINE int32_t mask_corr(const uint64_t *srow, const uint64_t *mrow, int32_t W, int32_t K) {
    __m512i pm = _mm512_setzero_si512(), pn = _mm512_setzero_si512();
    int32_t i = 0;
    for (; i + 8 <= W - 1; i += 8) {
        __m512i mv = _mm512_loadu_si512(mrow + i), sv = _mm512_loadu_si512(srow + i);
        pm = _mm512_add_epi64(pm, _mm512_popcnt_epi64(mv));
        pn = _mm512_add_epi64(pn, _mm512_popcnt_epi64(_mm512_and_si512(mv, sv)));
    }
    int64_t cm = _mm512_reduce_add_epi64(pm), cn = _mm512_reduce_add_epi64(pn);
    for (; i < W; i++) {
        uint64_t mw = mrow[i];
        if (i == W - 1) mw &= tail_bits(K);
        cm += __builtin_popcountll(mw);
        cn += __builtin_popcountll(mw & srow[i]);
    }
    return (int32_t)(128 * (cm - 2 * cn));
}

#define MASK_CHUNK(LOADX, I, KM)                                                         \
    do {                                                                                 \
        __m512i xv[4];                                                                   \
        for (int a = 0; a < MR; a++)                                                     \
            xv[a] = _mm512_xor_si512(LOADX(x + (size_t)a * K + 64 * (size_t)(I)), bias); \
        for (int b = 0; b < NR; b++) {                                                   \
            __mmask64 km = KM(_cvtu64_mask64(mk[(size_t)b * W + (I)]));                  \
            __mmask64 ks = _cvtu64_mask64(w[(size_t)b * W + (I)]);                       \
            __m512i wv = _mm512_maskz_mov_epi8(km, _mm512_mask_blend_epi8(ks, one, neg1)); \
            for (int a = 0; a < MR; a++) acc[a][b] = dpbusd(acc[a][b], xv[a], wv);       \
        }                                                                                \
    } while (0)

AVX512_INLINE void mask_tile(const int8_t *x, const uint64_t *w, const uint64_t *mk, int32_t W,
                             int32_t K, const int32_t *corr, int32_t *acc_s, int32_t *acc_c,
                             int32_t N, const int MR, const int NR) {
    const __m512i one = _mm512_set1_epi8(1), neg1 = _mm512_set1_epi8(-1);
    const __m512i bias = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][8];
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) acc[a][b] = _mm512_setzero_si512();
    const int32_t full = K / 64;
#define LOAD_FULL(p) _mm512_loadu_si512(p)
#define KM_FULL(k) (k)
    for (int32_t i = 0; i < full; i++) MASK_CHUNK(LOAD_FULL, i, KM_FULL);
    if (K & 63) { /* x ^ 0x80 is 0x80 past K: those weights must be 0 */
        const __mmask64 t = _cvtu64_mask64(tail_bits(K));
#define LOAD_TAIL(p) _mm512_maskz_loadu_epi8(t, p)
#define KM_TAIL(k) _kand_mask64((k), t)
        MASK_CHUNK(LOAD_TAIL, full, KM_TAIL);
#undef KM_TAIL
#undef LOAD_TAIL
    }
#undef KM_FULL
#undef LOAD_FULL
    for (int a = 0; a < MR; a++)
        for (int b = 0; b < NR; b++) {
            const int32_t v = _mm512_reduce_add_epi32(acc[a][b]) - corr[b];
            acc_s[(size_t)a * N + b] = v;
            if (acc_c) acc_c[(size_t)a * N + b] = v;
        }
}

#define MASK_CASE(MR_, NR_)                                                     \
    case (MR_) * 16 + (NR_):                                                    \
        mask_tile(x, w, mk, W, K, cr, as, ac, N, MR_, NR_);                     \
        break;

AVX512_FN void spfq_sign_mask_i8_avx512(const spfq_job *j, int32_t n0, int32_t n1) {
    if (spfq_ternary_use_rp(j->m, j->w->d.k) && spfq_rp_i8_avx512 && spfq_rp_i8_avx512(j, n0, n1, j->acc_s)) {
        spfq_mirror_acc(j, n0, n1);
        return;
    }
    if (use_vnni(j->m, j->w->d.k) && sign_i8_vnni(j, n0, n1, 1) == 0) return;
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words, M = j->m;
    int32_t corr[NBLOCK];
    for (int32_t nb = n0; nb < n1; nb += NBLOCK) {
        const int32_t ne = imin512(nb + NBLOCK, n1);
        for (int32_t n = nb; n < ne; n++)
            corr[n - nb] = mask_corr(d->sign + (size_t)n * W, d->mask + (size_t)n * W, W, K);
        for (int32_t m = 0; m < M;) {
            const int MR = M - m >= 4 ? 4 : M - m >= 2 ? 2 : 1;
            const int NR = MR == 1 ? 8 : 4;
            const int8_t *x = j->xq + (size_t)m * K;
            for (int32_t n = nb; n < ne; n += NR) {
                const int nr = imin512(NR, ne - n);
                const uint64_t *w = d->sign + (size_t)n * W;
                const uint64_t *mk = d->mask + (size_t)n * W;
                const int32_t *cr = corr + (n - nb);
                int32_t *as = j->acc_s + (size_t)m * N + n;
                int32_t *ac = j->acc_c ? j->acc_c + (size_t)m * N + n : NULL;
                switch (MR * 16 + nr) {
                    MASK_CASE(4, 1) MASK_CASE(4, 2) MASK_CASE(4, 3) MASK_CASE(4, 4)
                    MASK_CASE(2, 1) MASK_CASE(2, 2) MASK_CASE(2, 3) MASK_CASE(2, 4)
                    MASK_CASE(1, 1) MASK_CASE(1, 2) MASK_CASE(1, 3) MASK_CASE(1, 4)
                    MASK_CASE(1, 5) MASK_CASE(1, 6) MASK_CASE(1, 7) MASK_CASE(1, 8)
                    default: break;
                }
            }
            m += MR;
        }
    }
}

/* ------------------------------------------------------------------------------ i8, prefill M (use_vnni)
 *
 * Prefill-sized M: the weight rows of one 64-row block are expanded once per call into bytes in
 * the layout vpdpbusd wants with outputs in lanes ("vertical"): for column step s (4 columns)
 * and group g of 16 weight rows, 64 bytes at buf[(s * ng + g) * 64], int32 lane r = row
 * 16 g + r, its byte i = column 4 s + i, holding the unsigned weight byte
 *   SIGN:      u = sign bit (0 / 1)           sum_k x_k s_k = sum_k x_k - 2 sum_k x_k u_k
 *   SIGN_MASK: u = w + 1 in {0, 1, 2}         sum_k x_k w_k = sum_k x_k u_k - sum_k x_k
 * A register tile of MR activation rows x ng * 16 outputs then needs, per step, ng weight
 * loads, MR 4-byte activation broadcasts (the signed operand) and MR * ng vpdpbusd, with no
 * horizontal reductions (the per-output reductions dominated the tile kernels above at K = 384).
 * Each expanded block (ng * 16 * 64 W bytes, L2-resident) is reused by all M activation rows,
 * in K blocks of VNNI_KC columns (raw partial sums parked in acc_s between K blocks).
 * Columns k >= K: the activation bytes of the last partial step are loaded masked (0), so
 * whatever the expanded weights hold there contributes nothing; steps past ceil(K / 4) are
 * never read. Exact integers, equal to the C oracle bit for bit (int32 lanes, as above). */

#define VNNI_MR 4 /* activation rows per register tile (4 x 4 zmm = 16 accumulators) */
#ifndef VNNI_KC
#define VNNI_KC 1024 /* columns per K block (multiple of 4; 64 KiB of expanded weights) */
#endif

/* Expand rows [0, rows) (rows <= 64) of a block, ng = ceil(rows / 16) groups, whole 64-bit
 * words (16 W steps). Lanes of rows past `rows` hold u = 0 (SIGN) or 1 (SIGN_MASK); their
 * outputs are never stored. */
AVX512_INLINE void vnni_expand(const uint64_t *sign, const uint64_t *mask, int32_t W, int32_t rows,
                               int ng, uint8_t *buf, const int ternary) {
    const __m512i one = _mm512_set1_epi8(1), two = _mm512_set1_epi8(2), zero = _mm512_setzero_si512();
    const __m512i pat_lo = _mm512_set1_epi32(0x08040201), pat_hi = _mm512_set1_epi32((int)0x80402010u);
    const __m512i lo_idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i hi_idx = _mm512_add_epi32(lo_idx, _mm512_set1_epi32(1));
    const long long w8 = (long long)W;
    const __m512i vidx = _mm512_setr_epi64(0, w8, 2 * w8, 3 * w8, 4 * w8, 5 * w8, 6 * w8, 7 * w8);
    __m512i sel[4]; /* byte b of each dword replicated into its 4 bytes (in-lane vpshufb) */
    for (int b = 0; b < 4; b++)
        sel[b] = _mm512_add_epi8(_mm512_set4_epi32(0x0c0c0c0c, 0x08080808, 0x04040404, 0x00000000),
                                 _mm512_set1_epi8((char)b));
    for (int g = 0; g < ng; g++) {
        const int32_t r0 = 16 * g, nr = imin512(16, rows - r0);
        const __mmask8 mlo = (__mmask8)(nr >= 8 ? 0xff : (1u << nr) - 1u);
        const __mmask8 mhi = (__mmask8)(nr >= 16 ? 0xff : nr > 8 ? (1u << (nr - 8)) - 1u : 0u);
        const uint64_t *s0 = sign + (size_t)r0 * W, *s1 = mhi ? s0 + (size_t)8 * W : s0;
        const uint64_t *m0 = ternary ? mask + (size_t)r0 * W : NULL, *m1 = ternary && mhi ? m0 + (size_t)8 * W : m0;
        for (int32_t j = 0; j < W; j++) {
            /* dword lane r of d[0] / d[1] = bits 0..31 / 32..63 of word j of row r0 + r */
            __m512i a = _mm512_mask_i64gather_epi64(zero, mlo, vidx, s0 + j, 8);
            __m512i b = mhi ? _mm512_mask_i64gather_epi64(zero, mhi, vidx, s1 + j, 8) : zero;
            __m512i d[2] = {_mm512_permutex2var_epi32(a, lo_idx, b), _mm512_permutex2var_epi32(a, hi_idx, b)};
            __m512i e[2] = {zero, zero};
            if (ternary) { /* d = mask, e = mask & sign */
                __m512i ma = _mm512_mask_i64gather_epi64(zero, mlo, vidx, m0 + j, 8);
                __m512i mb = mhi ? _mm512_mask_i64gather_epi64(zero, mhi, vidx, m1 + j, 8) : zero;
                __m512i ml = _mm512_permutex2var_epi32(ma, lo_idx, mb), mh = _mm512_permutex2var_epi32(ma, hi_idx, mb);
                e[0] = _mm512_and_si512(ml, d[0]);
                e[1] = _mm512_and_si512(mh, d[1]);
                d[0] = ml;
                d[1] = mh;
            }
            uint8_t *out = buf + ((size_t)j * 16 * ng + g) * 64;
            const size_t step = (size_t)ng * 64;
            for (int h = 0; h < 2; h++)
                for (int bb = 0; bb < 4; bb++) {
                    const __m512i p = _mm512_shuffle_epi8(d[h], sel[bb]);
                    const __mmask64 k0 = _mm512_test_epi8_mask(p, pat_lo), k1 = _mm512_test_epi8_mask(p, pat_hi);
                    __m512i v0, v1;
                    if (ternary) {
                        const __m512i q = _mm512_shuffle_epi8(e[h], sel[bb]);
                        const __mmask64 n0 = _mm512_test_epi8_mask(q, pat_lo), n1 = _mm512_test_epi8_mask(q, pat_hi);
                        v0 = _mm512_mask_mov_epi8(_mm512_mask_mov_epi8(one, k0, two), n0, zero);
                        v1 = _mm512_mask_mov_epi8(_mm512_mask_mov_epi8(one, k1, two), n1, zero);
                    } else {
                        v0 = _mm512_maskz_mov_epi8(k0, one);
                        v1 = _mm512_maskz_mov_epi8(k1, one);
                    }
                    _mm512_store_si512(out + (size_t)(8 * h + 2 * bb) * step, v0);
                    _mm512_store_si512(out + (size_t)(8 * h + 2 * bb + 1) * step, v1);
                }
        }
    }
}

AVX512_INLINE int32_t load_i32(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* MR activation rows (x, stride K) x NG groups of 16 expanded rows; `valid` = rows of the
 * block that exist (outputs past it are not stored). */
AVX512_INLINE void vnni_tile(const uint8_t *buf, const int8_t *x, int32_t K, int32_t k0, int32_t k1,
                             const int32_t *sumx, int32_t *acc_s, int32_t *acc_c, int32_t N,
                             int32_t valid, const int ternary, const int MR, const int NG) {
    __m512i acc[VNNI_MR][4];
    for (int a = 0; a < MR; a++)
        for (int g = 0; g < NG; g++) {
            const int32_t left = valid - 16 * g;
            const __mmask16 km = (__mmask16)(left >= 16 ? 0xffffu : (1u << left) - 1u);
            acc[a][g] = k0 ? _mm512_maskz_loadu_epi32(km, acc_s + (size_t)a * N + 16 * g) : _mm512_setzero_si512();
        }
    const int32_t full = k1 / 4;
    const uint8_t *wp = buf + (size_t)(k0 / 4) * NG * 64;
    x += k0;
    for (int32_t s = k0 / 4; s < full; s++, x += 4, wp += NG * 64) {
        __m512i wv[4];
        for (int g = 0; g < NG; g++) wv[g] = _mm512_load_si512(wp + 64 * g);
        for (int a = 0; a < MR; a++) {
            const __m512i xb = _mm512_set1_epi32(load_i32(x + (size_t)a * K));
            for (int g = 0; g < NG; g++) acc[a][g] = dpbusd(acc[a][g], wv[g], xb);
        }
    }
    if (k1 & 3) { /* (k1 = K) activation bytes past K load as 0 */
        const __mmask16 t = (__mmask16)((1u << (k1 & 3)) - 1u);
        __m512i wv[4];
        for (int g = 0; g < NG; g++) wv[g] = _mm512_load_si512(wp + 64 * g);
        for (int a = 0; a < MR; a++) {
            const __m512i xb = _mm512_broadcastd_epi32(_mm_maskz_loadu_epi8(t, x + (size_t)a * K));
            for (int g = 0; g < NG; g++) acc[a][g] = dpbusd(acc[a][g], wv[g], xb);
        }
    }
    const int last = k1 == K;
    for (int a = 0; a < MR; a++) {
        const __m512i sx = _mm512_set1_epi32(sumx[a]);
        for (int g = 0; g < NG; g++) {
            const int32_t left = valid - 16 * g;
            const __mmask16 km = (__mmask16)(left >= 16 ? 0xffffu : (1u << left) - 1u);
            if (!last) { /* raw partial sums, picked up by the next K block */
                _mm512_mask_storeu_epi32(acc_s + (size_t)a * N + 16 * g, km, acc[a][g]);
                continue;
            }
            const __m512i v = ternary ? _mm512_sub_epi32(acc[a][g], sx)
                                      : _mm512_sub_epi32(sx, _mm512_add_epi32(acc[a][g], acc[a][g]));
            _mm512_mask_storeu_epi32(acc_s + (size_t)a * N + 16 * g, km, v);
            if (acc_c) _mm512_mask_storeu_epi32(acc_c + (size_t)a * N + 16 * g, km, v);
        }
    }
}

#define VNNI_CASE(MR_, NG_)                                                                    \
    case (MR_) * 8 + (NG_):                                                                    \
        if (ternary) vnni_tile(buf, x, K, k0, k1, sx, as, ac, N, valid, 1, MR_, NG_);                  \
        else vnni_tile(buf, x, K, k0, k1, sx, as, ac, N, valid, 0, MR_, NG_);                          \
        break;
#define VNNI_CASES(MR_) VNNI_CASE(MR_, 1) VNNI_CASE(MR_, 2) VNNI_CASE(MR_, 3) VNNI_CASE(MR_, 4)

/* Returns 0, or -1 when the scratch allocation failed (the caller then runs the tile path). */
AVX512_FN static int sign_i8_vnni(const spfq_job *j, int32_t n0, int32_t n1, int ternary) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words, M = j->m;
    uint8_t *buf = aligned_alloc(64, (size_t)W * 16 * 4 * 64);
    int32_t *sumx = malloc((size_t)M * sizeof(int32_t));
    if (!buf || !sumx) {
        free(buf);
        free(sumx);
        return -1;
    }
    for (int32_t m = 0; m < M; m++) sumx[m] = row_sum_i8(j->xq + (size_t)m * K, K);
    for (int32_t nb = n0; nb < n1; nb += NBLOCK) {
        const int32_t valid = imin512(NBLOCK, n1 - nb), ng = (valid + 15) / 16;
        if (ternary) vnni_expand(d->sign + (size_t)nb * W, d->mask + (size_t)nb * W, W, valid, ng, buf, 1);
        else vnni_expand(d->sign + (size_t)nb * W, NULL, W, valid, ng, buf, 0);
        for (int32_t k0 = 0; k0 < K; k0 += VNNI_KC)
        for (int32_t m = 0; m < M; m += VNNI_MR) {
            const int32_t k1 = imin512(k0 + VNNI_KC, K);
            const int mr = imin512(VNNI_MR, M - m);
            const int8_t *x = j->xq + (size_t)m * K;
            const int32_t *sx = sumx + m;
            int32_t *as = j->acc_s + (size_t)m * N + nb;
            int32_t *ac = j->acc_c ? j->acc_c + (size_t)m * N + nb : NULL;
            switch (mr * 8 + ng) {
                VNNI_CASES(1) VNNI_CASES(2) VNNI_CASES(3) VNNI_CASES(4)
                default: break;
            }
        }
    }
    free(buf);
    free(sumx);
    return 0;
}

#else
typedef int spfq_binary_avx512_empty_unit; /* ISO C: a translation unit is never empty */
#endif /* __x86_64__ */
