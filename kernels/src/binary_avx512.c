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

AVX512_FN void spfq_sign_i8_avx512(const spfq_job *j, int32_t n0, int32_t n1) {
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

#else
typedef int spfq_binary_avx512_empty_unit; /* ISO C: a translation unit is never empty */
#endif /* __x86_64__ */
