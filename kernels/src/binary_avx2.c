/* binary_avx2.c — AVX2 range functions for SIGN / SIGN_MASK weights and XNOR/popcount bgemm.
 *
 * Same semantics as binary.c (the oracle): integer results bit-exact, f32 results equal up to
 * float summation order. Compiled on x86-64 only, with function-level target attributes (the
 * dispatcher calls these only when the CPU has AVX2). No global state: thread-safe.
 *
 * Methods. Times: single thread, Zen 3 EPYC (shared, noisy box: best of many runs), K = N = 4096.
 *
 * bgemm (binary x binary): vpxor + vpshufb nibble popcount. One activation load (256 bits)
 *   serves 4 weight rows; per-byte counts stay in 4 byte accumulators for up to 31 vectors, then
 *   vpsadbw + one 4-way horizontal add gives 4 outputs at once (reduce late). Tail words
 *   (W % 4) use scalar popcnt. ~8 vector ops per 256 binary MACs: M = 64 in ~2.5 ms
 *   (~420 G binary MAC/s; the C oracle ~25 ms).
 *
 * i8 GEMV / GEMM (int8 activations x SIGN bits) — "shift-expand + maddubs":
 *   sum_k x_k s_k = sum_k x_k - 2 * sum_{k: bit=1} x_k, so only the selected sum is needed.
 *   A 64-bit weight word is broadcast (vpbroadcastq from memory) and shifted with vpsrlvq by
 *   (0,1,2,3) / (4,5,6,7) per qword: byte b of qword q then holds bit 8b+q(+4) in its bit 0;
 *   vpand 0x01 gives 0/1 bytes (u8) and vpmaddubsw(w01, x) sums selected int8 activations into
 *   int16 (vpaddw; widened with vpmaddwd every 32 words, exact). The byte order this produces
 *   (position 8c+b <-> column 8b+c inside each 64-column block) is an 8x8 byte transpose, so
 *   the activations are transposed ONCE per call into a small stack buffer (K bytes per row)
 *   and reused by every weight row. Cost: 4 vector ops per 32 MACs (vpsrlvq, vpand,
 *   vpmaddubsw, vpaddw) and no per-weight table: GEMV M = 1 in ~0.157 ms, which is the
 *   ALU-throughput bound (4 vector ops/cycle). Measured against the classic expansion
 *   (vpshufb byte broadcast + vpand bit-select + vpminub -> 0/1, natural x order, 5 ops per
 *   32 MACs) in the same harness: ~0.20 ms, i.e. the shift-expand is ~25% faster. A T-MAC
 *   lookup table was not chosen: vpshufb shares one 16-entry table per 128-bit lane, so it
 *   needs a weight repack that interleaves 16 rows per group (not the .spfq row layout; a
 *   prepare-time repack would be api.c's business) plus int16 (split-byte) tables for sums
 *   of 4 int8 activations.
 *   M >= 3: one weight row x 4 activation rows per step, so the expansion (2 ops) is shared by
 *   4 rows: 2.5 ops per 32 MACs (M = 64 in ~6.8 ms). M <= 2: 4 weight rows x 1 activation row.
 *
 * SIGN_MASK i8: weights w in {-1,0,+1} bytes built as blendv(m01, -1, msb(sign & mask)) with
 *   the same shifts (vpsllvq puts the sign bit in each byte's MSB), then vpmaddubsw(xu, w)
 *   with xu = x + 128 (unsigned; the transposed buffer stores x ^ 0x80), corrected exactly by
 *   -128 * sum_k w_k = -128 * (popcount(mask) - 2 popcount(mask & sign)) (scalar popcnt
 *   inside the vector loop, where it runs on the otherwise idle integer pipes). ~6.5 vector
 *   ops per 32 MACs: GEMV M = 1 in ~0.27 ms. (GCC turns blendv with an all-ones operand
 *   into vpcmpgtb + vpor; an empty asm makes the constant opaque to keep the 1-uop blend.)
 *
 * f32 (weight-only, float accumulation): natural column order; a 32-bit weight dword is
 *   broadcast and vpsllvd puts bit 8t+i in the sign bit of lane i.
 *   M < 4: vblendvps picks x or -x (and, with a mask, x or 0); 4 weight rows share each
 *   activation load; per-row tree adds keep the dependency chain short (~3 ops per 8 MACs).
 *   M >= 4: 4 weight rows of a 512-column chunk are expanded once to +-1.0f / 0.0f in an 8 KiB
 *   stack buffer, then a 3 x 4 register tile of FMAs streams every activation row past them
 *   (K chunks outermost so the x chunk is reused from L2): about fp32-BLAS speed per MAC,
 *   with 32x less weight traffic.
 */
#if defined(__x86_64__)

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define AVX2_FN __attribute__((target("avx2,fma,popcnt")))
#define AVX2_INLINE static inline __attribute__((target("avx2,fma,popcnt"), always_inline))

/* ------------------------------------------------------------------------------ helpers */

/* 4 horizontal int32 sums (a, b, c, d) -> one __m128i. */
AVX2_INLINE __m128i hsum4_epi32(__m256i a, __m256i b, __m256i c, __m256i d) {
    __m256i ab = _mm256_hadd_epi32(a, b);
    __m256i cd = _mm256_hadd_epi32(c, d);
    __m256i abcd = _mm256_hadd_epi32(ab, cd);
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* 4 horizontal sums of int16 lanes, widened exactly to int32. */
AVX2_INLINE __m128i hsum4_epi16(__m256i a, __m256i b, __m256i c, __m256i d) {
    const __m256i one16 = _mm256_set1_epi16(1);
    return hsum4_epi32(_mm256_madd_epi16(a, one16), _mm256_madd_epi16(b, one16),
                       _mm256_madd_epi16(c, one16), _mm256_madd_epi16(d, one16));
}

AVX2_INLINE float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline int32_t imin(int32_t a, int32_t b) { return a < b ? a : b; }

/* ------------------------------------------------------------------------------ bgemm */

AVX2_INLINE __m256i popcnt_bytes(__m256i v, __m256i lut, __m256i low) {
    __m256i lo = _mm256_and_si256(v, low);
    __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    return _mm256_add_epi8(_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
}

/* popcount(x XOR w_r) over W words for 4 weight rows -> 4 int32 lanes. */
AVX2_INLINE __m128i xor_popcount_4(const uint64_t *x, const uint64_t *w0, const uint64_t *w1,
                                   const uint64_t *w2, const uint64_t *w3, int32_t W) {
    const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4,
                                         0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    __m128i total = _mm_setzero_si128();
    const int32_t nv = W / 4; /* full 256-bit vectors */
    for (int32_t v0 = 0; v0 < nv; v0 += 31) { /* 31 * 8 = 248: byte counters cannot overflow */
        const int32_t ve = imin(nv, v0 + 31);
        __m256i a0 = zero, a1 = zero, a2 = zero, a3 = zero;
        for (int32_t v = v0; v < ve; v++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + 4 * v));
            a0 = _mm256_add_epi8(a0, popcnt_bytes(_mm256_xor_si256(xv,
                     _mm256_loadu_si256((const __m256i *)(w0 + 4 * v))), lut, low));
            a1 = _mm256_add_epi8(a1, popcnt_bytes(_mm256_xor_si256(xv,
                     _mm256_loadu_si256((const __m256i *)(w1 + 4 * v))), lut, low));
            a2 = _mm256_add_epi8(a2, popcnt_bytes(_mm256_xor_si256(xv,
                     _mm256_loadu_si256((const __m256i *)(w2 + 4 * v))), lut, low));
            a3 = _mm256_add_epi8(a3, popcnt_bytes(_mm256_xor_si256(xv,
                     _mm256_loadu_si256((const __m256i *)(w3 + 4 * v))), lut, low));
        }
        total = _mm_add_epi32(total,
                              hsum4_epi32(_mm256_sad_epu8(a0, zero), _mm256_sad_epu8(a1, zero),
                                          _mm256_sad_epu8(a2, zero), _mm256_sad_epu8(a3, zero)));
    }
    int32_t t0 = 0, t1 = 0, t2 = 0, t3 = 0;
    for (int32_t i = 4 * nv; i < W; i++) {
        t0 += (int32_t)_mm_popcnt_u64(x[i] ^ w0[i]);
        t1 += (int32_t)_mm_popcnt_u64(x[i] ^ w1[i]);
        t2 += (int32_t)_mm_popcnt_u64(x[i] ^ w2[i]);
        t3 += (int32_t)_mm_popcnt_u64(x[i] ^ w3[i]);
    }
    return _mm_add_epi32(total, _mm_setr_epi32(t0, t1, t2, t3));
}

AVX2_FN void spfq_bgemm_avx2(const spfq_job *j, int32_t n0, int32_t n1) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words;
    const uint64_t *S = d->sign;
    for (int32_t n = n0; n < n1; n += 4) {
        const int32_t nr = imin(4, n1 - n); /* rows past the range repeat the last one */
        const uint64_t *w0 = S + (size_t)n * W;
        const uint64_t *w1 = S + (size_t)(n + imin(1, nr - 1)) * W;
        const uint64_t *w2 = S + (size_t)(n + imin(2, nr - 1)) * W;
        const uint64_t *w3 = S + (size_t)(n + imin(3, nr - 1)) * W;
        for (int32_t m = 0; m < j->m; m++) {
            __m128i pc = xor_popcount_4(j->xbits + (size_t)m * W, w0, w1, w2, w3, W);
            __m128i dot = _mm_sub_epi32(_mm_set1_epi32(K), _mm_add_epi32(pc, pc));
            int32_t *out = j->dot + (size_t)m * N + n;
            if (nr == 4) {
                _mm_storeu_si128((__m128i *)out, dot);
            } else {
                int32_t tmp[4];
                _mm_storeu_si128((__m128i *)tmp, dot);
                for (int32_t r = 0; r < nr; r++) out[r] = tmp[r];
            }
        }
    }
}

/* ------------------------------------------------------------------------------ int8 */

#define XCW 64  /* K words per activation chunk: 4096 columns, 4 rows x 4 KiB of stack */
#define XMT 4   /* activation rows per tile */
#define BLKW 32 /* words per int16 accumulation block (|partial| <= 32 * 1020 < 32767) */

/* Activation row chunk -> transposed bytes: dst[64 i + 8 c + b] = x[64 (w0 + i) + 8 b + c] ^ flip
 * (0 past K, i.e. flip for the x ^ 0x80 encoding). Returns the sum of the real x. */
static int32_t prep_x(const int8_t *x, int32_t K, int32_t w0, int32_t kw, int8_t *dst,
                      uint8_t flip) {
    int32_t sum = 0;
    for (int32_t i = 0; i < kw; i++) {
        const int32_t base = 64 * (w0 + i);
        int8_t *o = dst + 64 * i;
        if (base + 64 <= K) {
            const int8_t *xs = x + base;
            for (int32_t c = 0; c < 8; c++)
                for (int32_t b = 0; b < 8; b++) {
                    int8_t v = xs[8 * b + c];
                    sum += v;
                    o[8 * c + b] = (int8_t)((uint8_t)v ^ flip);
                }
        } else {
            for (int32_t c = 0; c < 8; c++)
                for (int32_t b = 0; b < 8; b++) {
                    int32_t k = base + 8 * b + c;
                    int8_t v = k < K ? x[k] : 0;
                    sum += v;
                    o[8 * c + b] = (int8_t)((uint8_t)v ^ flip);
                }
        }
    }
    return sum;
}

/* SIGN, 4 weight rows x 1 activation row: selected sums sum_{bit=1} x over kw words. */
AVX2_INLINE __m128i sel_n4m1(const uint64_t *w0, const uint64_t *w1, const uint64_t *w2,
                             const uint64_t *w3, const int8_t *xp, int32_t kw) {
    const __m256i sh0 = _mm256_setr_epi64x(0, 1, 2, 3), sh1 = _mm256_setr_epi64x(4, 5, 6, 7);
    const __m256i one8 = _mm256_set1_epi8(1);
    __m128i total = _mm_setzero_si128();
    for (int32_t j0 = 0; j0 < kw; j0 += BLKW) {
        const int32_t je = imin(kw, j0 + BLKW);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int32_t i = j0; i < je; i++) {
            const __m256i x0 = _mm256_load_si256((const __m256i *)(xp + 64 * i));
            const __m256i x1 = _mm256_load_si256((const __m256i *)(xp + 64 * i + 32));
#define SEL_ROW(a, w)                                                                          \
    do {                                                                                       \
        const __m256i bw = _mm256_set1_epi64x((long long)(w)[i]);                              \
        const __m256i e0 = _mm256_and_si256(_mm256_srlv_epi64(bw, sh0), one8);                 \
        const __m256i e1 = _mm256_and_si256(_mm256_srlv_epi64(bw, sh1), one8);                 \
        a = _mm256_add_epi16(a, _mm256_add_epi16(_mm256_maddubs_epi16(e0, x0),                 \
                                                 _mm256_maddubs_epi16(e1, x1)));               \
    } while (0)
            SEL_ROW(a0, w0);
            SEL_ROW(a1, w1);
            SEL_ROW(a2, w2);
            SEL_ROW(a3, w3);
#undef SEL_ROW
        }
        total = _mm_add_epi32(total, hsum4_epi16(a0, a1, a2, a3));
    }
    return total;
}

/* SIGN, 1 weight row x 4 activation rows. */
AVX2_INLINE __m128i sel_n1m4(const uint64_t *w, const int8_t *x0p, const int8_t *x1p,
                             const int8_t *x2p, const int8_t *x3p, int32_t kw) {
    const __m256i sh0 = _mm256_setr_epi64x(0, 1, 2, 3), sh1 = _mm256_setr_epi64x(4, 5, 6, 7);
    const __m256i one8 = _mm256_set1_epi8(1);
    __m128i total = _mm_setzero_si128();
    for (int32_t j0 = 0; j0 < kw; j0 += BLKW) {
        const int32_t je = imin(kw, j0 + BLKW);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int32_t i = j0; i < je; i++) {
            const __m256i bw = _mm256_set1_epi64x((long long)w[i]);
            const __m256i e0 = _mm256_and_si256(_mm256_srlv_epi64(bw, sh0), one8);
            const __m256i e1 = _mm256_and_si256(_mm256_srlv_epi64(bw, sh1), one8);
#define SEL_ACT(a, xp)                                                                         \
    a = _mm256_add_epi16(a, _mm256_add_epi16(                                                  \
            _mm256_maddubs_epi16(e0, _mm256_load_si256((const __m256i *)((xp) + 64 * i))),     \
            _mm256_maddubs_epi16(e1, _mm256_load_si256((const __m256i *)((xp) + 64 * i + 32)))))
            SEL_ACT(a0, x0p);
            SEL_ACT(a1, x1p);
            SEL_ACT(a2, x2p);
            SEL_ACT(a3, x3p);
#undef SEL_ACT
        }
        total = _mm_add_epi32(total, hsum4_epi16(a0, a1, a2, a3));
    }
    return total;
}

/* Ternary weight bytes in {-1, 0, +1} for the two halves of one 64-column block. */
#define TERN_EXPAND(bm, bms, t0, t1)                                                           \
    do {                                                                                       \
        const __m256i m0_ = _mm256_and_si256(_mm256_srlv_epi64(bm, sh0), one8);                \
        const __m256i m1_ = _mm256_and_si256(_mm256_srlv_epi64(bm, sh1), one8);                \
        t0 = _mm256_blendv_epi8(m0_, ones, _mm256_sllv_epi64(bms, sl0));                       \
        t1 = _mm256_blendv_epi8(m1_, ones, _mm256_sllv_epi64(bms, sl1));                       \
    } while (0)

/* SIGN_MASK, 4 weight rows x 1 activation row (xu = x ^ 0x80): sum xu * w per row, and
 * sumw[r] = sum_k w_k (scalar popcnt on the integer pipes, overlapping the vector work). */
AVX2_INLINE __m128i tern_n4m1(const uint64_t *const s[4], const uint64_t *const mk[4],
                              const int8_t *xp, int32_t kw, int32_t sumw[4]) {
    const __m256i sh0 = _mm256_setr_epi64x(0, 1, 2, 3), sh1 = _mm256_setr_epi64x(4, 5, 6, 7);
    const __m256i sl0 = _mm256_setr_epi64x(7, 6, 5, 4), sl1 = _mm256_setr_epi64x(3, 2, 1, 0);
    const __m256i one8 = _mm256_set1_epi8(1);
    __m256i ones = _mm256_set1_epi8(-1);
    __asm__("" : "+x"(ones)); /* opaque: keeps vpblendvb (1 uop on Zen 3), not vpcmpgtb + vpor */
    const uint64_t *s0 = s[0], *s1 = s[1], *s2 = s[2], *s3 = s[3];
    const uint64_t *k0 = mk[0], *k1 = mk[1], *k2 = mk[2], *k3 = mk[3];
    int32_t w0 = 0, w1 = 0, w2 = 0, w3 = 0;
    __m128i total = _mm_setzero_si128();
    for (int32_t j0 = 0; j0 < kw; j0 += BLKW) {
        const int32_t je = imin(kw, j0 + BLKW);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int32_t i = j0; i < je; i++) {
            const __m256i x0 = _mm256_load_si256((const __m256i *)(xp + 64 * i));
            const __m256i x1 = _mm256_load_si256((const __m256i *)(xp + 64 * i + 32));
#define TERN_ROW(a, cnt, sr, kr)                                                               \
    do {                                                                                       \
        const uint64_t mw = (kr)[i], msw = mw & (sr)[i];                                       \
        cnt += (int32_t)_mm_popcnt_u64(mw) - 2 * (int32_t)_mm_popcnt_u64(msw);                 \
        const __m256i bm = _mm256_set1_epi64x((long long)mw);                                  \
        const __m256i bms = _mm256_and_si256(bm, _mm256_set1_epi64x((long long)(sr)[i]));     \
        __m256i t0, t1;                                                                        \
        TERN_EXPAND(bm, bms, t0, t1);                                                          \
        a = _mm256_add_epi16(a, _mm256_add_epi16(_mm256_maddubs_epi16(x0, t0),                 \
                                                 _mm256_maddubs_epi16(x1, t1)));               \
    } while (0)
            TERN_ROW(a0, w0, s0, k0);
            TERN_ROW(a1, w1, s1, k1);
            TERN_ROW(a2, w2, s2, k2);
            TERN_ROW(a3, w3, s3, k3);
#undef TERN_ROW
        }
        total = _mm_add_epi32(total, hsum4_epi16(a0, a1, a2, a3));
    }
    sumw[0] = w0; sumw[1] = w1; sumw[2] = w2; sumw[3] = w3;
    return total;
}

/* SIGN_MASK, 1 weight row x 4 activation rows. */
AVX2_INLINE __m128i tern_n1m4(const uint64_t *s, const uint64_t *mk, const int8_t *x0p,
                              const int8_t *x1p, const int8_t *x2p, const int8_t *x3p,
                              int32_t kw, int32_t *sumw) {
    const __m256i sh0 = _mm256_setr_epi64x(0, 1, 2, 3), sh1 = _mm256_setr_epi64x(4, 5, 6, 7);
    const __m256i sl0 = _mm256_setr_epi64x(7, 6, 5, 4), sl1 = _mm256_setr_epi64x(3, 2, 1, 0);
    const __m256i one8 = _mm256_set1_epi8(1);
    __m256i ones = _mm256_set1_epi8(-1);
    __asm__("" : "+x"(ones)); /* as in tern_n4m1 */
    int32_t cnt = 0;
    __m128i total = _mm_setzero_si128();
    for (int32_t j0 = 0; j0 < kw; j0 += BLKW) {
        const int32_t je = imin(kw, j0 + BLKW);
        __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
        for (int32_t i = j0; i < je; i++) {
            cnt += (int32_t)_mm_popcnt_u64(mk[i]) - 2 * (int32_t)_mm_popcnt_u64(mk[i] & s[i]);
            const __m256i bm = _mm256_set1_epi64x((long long)mk[i]);
            const __m256i bms = _mm256_and_si256(bm, _mm256_set1_epi64x((long long)s[i]));
            __m256i t0, t1;
            TERN_EXPAND(bm, bms, t0, t1);
#define TERN_ACT(a, xp)                                                                        \
    a = _mm256_add_epi16(a, _mm256_add_epi16(                                                  \
            _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)((xp) + 64 * i)), t0),     \
            _mm256_maddubs_epi16(_mm256_load_si256((const __m256i *)((xp) + 64 * i + 32)), t1)))
            TERN_ACT(a0, x0p);
            TERN_ACT(a1, x1p);
            TERN_ACT(a2, x2p);
            TERN_ACT(a3, x3p);
#undef TERN_ACT
        }
        total = _mm_add_epi32(total, hsum4_epi16(a0, a1, a2, a3));
    }
    *sumw = cnt;
    return total;
}

/* Write one partial result (chunk kw0) of output (m, n): first chunk stores, later ones add;
 * the last chunk also copies into acc_c. */
static inline void emit(const spfq_job *j, size_t i, int32_t v, int first, int last) {
    int32_t r = first ? v : j->acc_s[i] + v;
    j->acc_s[i] = r;
    if (last && j->acc_c) j->acc_c[i] = r;
}

AVX2_FN static void i8_range_avx2(const spfq_job *j, int32_t n0, int32_t n1, int tern) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words, M = j->m;
    const uint64_t *S = d->sign, *MK = d->mask;
    if (W == 0) { /* K == 0: empty sums */
        for (int32_t m = 0; m < M; m++)
            for (int32_t n = n0; n < n1; n++) emit(j, (size_t)m * N + n, 0, 1, 1);
        return;
    }
    _Alignas(32) int8_t xb[XMT][XCW * 64];
    int32_t sumx[XMT];
    const uint8_t flip = tern ? 0x80 : 0x00;
    for (int32_t m0 = 0; m0 < M; m0 += XMT) {
        const int32_t mt = imin(XMT, M - m0);
        for (int32_t kw0 = 0; kw0 < W; kw0 += XCW) {
            const int32_t kw = imin(XCW, W - kw0);
            const int first = kw0 == 0, last = kw0 + kw == W;
            for (int32_t r = 0; r < mt; r++)
                sumx[r] = prep_x(j->xq + (size_t)(m0 + r) * K, K, kw0, kw, xb[r], flip);
            if (mt >= 3) { /* 1 weight row x 4 activation rows (the 4th repeats when mt == 3) */
                const int8_t *x3 = xb[imin(3, mt - 1)];
                for (int32_t n = n0; n < n1; n++) {
                    const size_t row = (size_t)n * W + kw0;
                    int32_t out[4];
                    int32_t sw = 0;
                    __m128i v = tern
                        ? tern_n1m4(S + row, MK + row, xb[0], xb[1], xb[2], x3, kw, &sw)
                        : sel_n1m4(S + row, xb[0], xb[1], xb[2], x3, kw);
                    _mm_storeu_si128((__m128i *)out, v);
                    for (int32_t r = 0; r < mt; r++) {
                        int32_t val = tern ? out[r] - 128 * sw : sumx[r] - 2 * out[r];
                        emit(j, (size_t)(m0 + r) * N + n, val, first, last);
                    }
                }
            } else { /* each activation row: 4 weight rows per step */
                for (int32_t r = 0; r < mt; r++) {
                    for (int32_t n = n0; n < n1; n += 4) {
                        const int32_t nr = imin(4, n1 - n);
                        const uint64_t *sp[4], *mp[4];
                        for (int32_t q = 0; q < 4; q++) {
                            const size_t row = (size_t)(n + imin(q, nr - 1)) * W + kw0;
                            sp[q] = S + row;
                            mp[q] = tern ? MK + row : NULL;
                        }
                        int32_t out[4], sw[4] = {0, 0, 0, 0};
                        __m128i v = tern ? tern_n4m1(sp, mp, xb[r], kw, sw)
                                         : sel_n4m1(sp[0], sp[1], sp[2], sp[3], xb[r], kw);
                        _mm_storeu_si128((__m128i *)out, v);
                        for (int32_t q = 0; q < nr; q++) {
                            int32_t val = tern ? out[q] - 128 * sw[q] : sumx[r] - 2 * out[q];
                            emit(j, (size_t)(m0 + r) * N + n + q, val, first, last);
                        }
                    }
                }
            }
        }
    }
}

AVX2_FN void spfq_sign_i8_avx2(const spfq_job *j, int32_t n0, int32_t n1) {
    i8_range_avx2(j, n0, n1, 0);
}

AVX2_FN void spfq_sign_mask_i8_avx2(const spfq_job *j, int32_t n0, int32_t n1) {
    if (spfq_rp_i8_avx2 && spfq_rp_i8_avx2(j, n0, n1, j->acc_s)) { /* AVX2: RP at every shape (internal.h) */
        spfq_mirror_acc(j, n0, n1);
        return;
    }
    i8_range_avx2(j, n0, n1, 1);
}

/* ------------------------------------------------------------------------------ f32 */

AVX2_INLINE uint32_t load_dword(const uint64_t *row, int32_t dw) {
    uint32_t v;
    memcpy(&v, (const unsigned char *)row + 4 * (size_t)dw, 4);
    return v;
}

/* y for 4 weight rows (sign s[r], optional mask mk[r]) x one activation row. */
AVX2_INLINE __m128 f32_n4(const uint64_t *const s[4], const uint64_t *const mk[4], const float *x,
                          int32_t K, int with_mask) {
    const __m256i cnt0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256i cnt1 = _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16);
    const __m256i cnt2 = _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8);
    const __m256i cnt3 = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256 sgn = _mm256_set1_ps(-0.0f), zero = _mm256_setzero_ps();
    __m256 acc[4] = {zero, zero, zero, zero};
    const int32_t nd = (K + 31) / 32, nfull = K / 32;
    _Alignas(32) float tail[32];
    for (int32_t dw = 0; dw < nd; dw++) {
        const float *xs = x + 32 * (size_t)dw;
        if (dw >= nfull) { /* last partial dword: zero-padded copy, never read past K */
            const int32_t rem = K - 32 * dw;
            for (int32_t i = 0; i < 32; i++) tail[i] = i < rem ? xs[i] : 0.0f;
            xs = tail;
        }
        const __m256 x0 = _mm256_loadu_ps(xs), x1 = _mm256_loadu_ps(xs + 8);
        const __m256 x2 = _mm256_loadu_ps(xs + 16), x3 = _mm256_loadu_ps(xs + 24);
        const __m256 n0 = _mm256_xor_ps(x0, sgn), n1 = _mm256_xor_ps(x1, sgn);
        const __m256 n2 = _mm256_xor_ps(x2, sgn), n3 = _mm256_xor_ps(x3, sgn);
        for (int r = 0; r < 4; r++) {
            const __m256i bs = _mm256_set1_epi32((int)load_dword(s[r], dw));
            __m256 v0 = _mm256_blendv_ps(x0, n0, _mm256_castsi256_ps(_mm256_sllv_epi32(bs, cnt0)));
            __m256 v1 = _mm256_blendv_ps(x1, n1, _mm256_castsi256_ps(_mm256_sllv_epi32(bs, cnt1)));
            __m256 v2 = _mm256_blendv_ps(x2, n2, _mm256_castsi256_ps(_mm256_sllv_epi32(bs, cnt2)));
            __m256 v3 = _mm256_blendv_ps(x3, n3, _mm256_castsi256_ps(_mm256_sllv_epi32(bs, cnt3)));
            if (with_mask) {
                const __m256i bm = _mm256_set1_epi32((int)load_dword(mk[r], dw));
                v0 = _mm256_blendv_ps(zero, v0, _mm256_castsi256_ps(_mm256_sllv_epi32(bm, cnt0)));
                v1 = _mm256_blendv_ps(zero, v1, _mm256_castsi256_ps(_mm256_sllv_epi32(bm, cnt1)));
                v2 = _mm256_blendv_ps(zero, v2, _mm256_castsi256_ps(_mm256_sllv_epi32(bm, cnt2)));
                v3 = _mm256_blendv_ps(zero, v3, _mm256_castsi256_ps(_mm256_sllv_epi32(bm, cnt3)));
            }
            const __m256 v = _mm256_add_ps(_mm256_add_ps(v0, v1), _mm256_add_ps(v2, v3));
            acc[r] = _mm256_add_ps(acc[r], v);
        }
    }
    return _mm_setr_ps(hsum_ps(acc[0]), hsum_ps(acc[1]), hsum_ps(acc[2]), hsum_ps(acc[3]));
}

#define FKC 512 /* columns per K chunk of the expanded-weight path (4 rows x 2 KiB of stack) */

/* Weight rows -> +-1.0f (0.0f where masked out) for columns [k0, k0 + len), len % 32 == 0 except
 * at the end of the row (columns past K read zero padding bits; the caller never uses them). */
AVX2_INLINE void expand_f32(const uint64_t *s, const uint64_t *mk, int32_t k0, int32_t len,
                            float *dst, int with_mask) {
    const __m256i cnt0 = _mm256_setr_epi32(31, 30, 29, 28, 27, 26, 25, 24);
    const __m256i cnt1 = _mm256_setr_epi32(23, 22, 21, 20, 19, 18, 17, 16);
    const __m256i cnt2 = _mm256_setr_epi32(15, 14, 13, 12, 11, 10, 9, 8);
    const __m256i cnt3 = _mm256_setr_epi32(7, 6, 5, 4, 3, 2, 1, 0);
    const __m256i sgn = _mm256_set1_epi32(INT32_MIN);
    const __m256i one = _mm256_castps_si256(_mm256_set1_ps(1.0f));
    for (int32_t i = 0; i < len; i += 32) {
        const int32_t dw = (k0 + i) / 32;
        const __m256i b = _mm256_set1_epi32((int)load_dword(s, dw));
#define EXPAND_ONE(t, cnt)                                                                     \
    do {                                                                                       \
        __m256i v = _mm256_xor_si256(one, _mm256_and_si256(_mm256_sllv_epi32(b, cnt), sgn));   \
        if (with_mask)                                                                         \
            v = _mm256_and_si256(v, _mm256_srai_epi32(_mm256_sllv_epi32(bm, cnt), 31));         \
        _mm256_store_ps(dst + i + 8 * (t), _mm256_castsi256_ps(v));                             \
    } while (0)
        const __m256i bm = with_mask ? _mm256_set1_epi32((int)load_dword(mk, dw)) : b;
        EXPAND_ONE(0, cnt0);
        EXPAND_ONE(1, cnt1);
        EXPAND_ONE(2, cnt2);
        EXPAND_ONE(3, cnt3);
#undef EXPAND_ONE
    }
}

AVX2_FN static void f32_range_avx2(const spfq_job *j, int32_t n0, int32_t n1, int with_mask) {
    const spfq_weights_desc *d = &j->w->d;
    const int32_t N = d->n, K = d->k, W = j->w->words, M = j->m;
    int32_t m = 0;
    if (M >= 4) {
        /* Expanded-weight path: 4 weight rows of a K chunk become +-1.0f once (L1, 8 KiB),
         * then every activation row streams past them: 3 activation rows x 4 weight rows of
         * FMAs per step (12 accumulators), so each x load feeds 4 FMAs. K chunks are the outer
         * loop so the x chunk (M x 2 KiB) is reused from L2 by every weight row. Raw sums go
         * to y (K chunks add up); the epilogue runs at the end. */
        _Alignas(32) float wx[4][FKC];
        for (int32_t k0 = 0; k0 < K; k0 += FKC) { /* K outer: x[:, chunk] stays in L2 */
            const int32_t len = imin(FKC, K - k0);
            const int32_t len8 = len & ~7; /* SIMD part; the rest (K % 8 at the end) scalar */
            for (int32_t n = n0; n < n1; n += 4) {
                const int32_t nr = imin(4, n1 - n); /* past the range: the last row again */
                for (int32_t q = 0; q < 4; q++) {
                    const size_t row = (size_t)(n + imin(q, nr - 1)) * W;
                    if (with_mask)
                        expand_f32(d->sign + row, d->mask + row, k0, len, wx[q], 1);
                    else
                        expand_f32(d->sign + row, NULL, k0, len, wx[q], 0);
                }
                const float *w0 = wx[0], *w1 = wx[1], *w2 = wx[2], *w3 = wx[3];
                int32_t mm = 0;
                for (; mm < M; mm += 3) {
                    const int32_t mr = imin(3, M - mm);
                    const float *xa = j->x + (size_t)mm * K + k0;
                    /* fewer than 3 rows left: the missing ones repeat row mm (unused) */
                    const float *xb2 = xa + (mr > 1 ? K : 0);
                    const float *xc = xa + (mr > 2 ? 2 * (size_t)K : 0);
                    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
                    __m256 b0 = a0, b1 = a0, b2 = a0, b3 = a0, c0 = a0, c1 = a0, c2 = a0, c3 = a0;
                    for (int32_t i = 0; i < len8; i += 8) {
                        const __m256 xv0 = _mm256_loadu_ps(xa + i), xv1 = _mm256_loadu_ps(xb2 + i);
                        const __m256 xv2 = _mm256_loadu_ps(xc + i);
                        __m256 wv = _mm256_load_ps(w0 + i);
                        a0 = _mm256_fmadd_ps(xv0, wv, a0);
                        b0 = _mm256_fmadd_ps(xv1, wv, b0);
                        c0 = _mm256_fmadd_ps(xv2, wv, c0);
                        wv = _mm256_load_ps(w1 + i);
                        a1 = _mm256_fmadd_ps(xv0, wv, a1);
                        b1 = _mm256_fmadd_ps(xv1, wv, b1);
                        c1 = _mm256_fmadd_ps(xv2, wv, c1);
                        wv = _mm256_load_ps(w2 + i);
                        a2 = _mm256_fmadd_ps(xv0, wv, a2);
                        b2 = _mm256_fmadd_ps(xv1, wv, b2);
                        c2 = _mm256_fmadd_ps(xv2, wv, c2);
                        wv = _mm256_load_ps(w3 + i);
                        a3 = _mm256_fmadd_ps(xv0, wv, a3);
                        b3 = _mm256_fmadd_ps(xv1, wv, b3);
                        c3 = _mm256_fmadd_ps(xv2, wv, c3);
                    }
                    float o[3][4] = {{hsum_ps(a0), hsum_ps(a1), hsum_ps(a2), hsum_ps(a3)},
                                     {hsum_ps(b0), hsum_ps(b1), hsum_ps(b2), hsum_ps(b3)},
                                     {hsum_ps(c0), hsum_ps(c1), hsum_ps(c2), hsum_ps(c3)}};
                    const float *xs[3] = {xa, xb2, xc};
                    for (int32_t r = 0; r < mr; r++) {
                        float *yr = j->y + (size_t)(mm + r) * N + n;
                        for (int32_t q = 0; q < nr; q++) {
                            float v = o[r][q];
                            for (int32_t i = len8; i < len; i++) v += xs[r][i] * wx[q][i];
                            yr[q] = k0 == 0 ? v : yr[q] + v;
                        }
                    }
                }
            }
        }
        for (int32_t mm = 0; mm < M; mm++) {
            float *yr = j->y + (size_t)mm * N;
            for (int32_t n = n0; n < n1; n++) {
                const float level = d->scale[n];
                yr[n] = level * yr[n] + (d->bias ? d->bias[n] : 0.0f);
            }
        }
        return;
    }
    /* M < 4: one activation row x 4 weight rows, weights expanded in registers per row */
    for (int32_t n = n0; n < n1; n += 4) {
        const int32_t nr = imin(4, n1 - n);
        const uint64_t *sp[4], *mp[4];
        for (int32_t q = 0; q < 4; q++) {
            const size_t row = (size_t)(n + imin(q, nr - 1)) * W;
            sp[q] = d->sign + row;
            mp[q] = with_mask ? d->mask + row : NULL;
        }
        for (int32_t mm = m; mm < M; mm++) {
            float out[4];
            _mm_storeu_ps(out, with_mask ? f32_n4(sp, mp, j->x + (size_t)mm * K, K, 1)
                                         : f32_n4(sp, mp, j->x + (size_t)mm * K, K, 0));
            for (int32_t q = 0; q < nr; q++) {
                const int32_t nn = n + q;
                const float level = d->scale[nn];
                j->y[(size_t)mm * N + nn] = level * out[q] + (d->bias ? d->bias[nn] : 0.0f);
            }
        }
    }
}

AVX2_FN void spfq_sign_f32_avx2(const spfq_job *j, int32_t n0, int32_t n1) {
    f32_range_avx2(j, n0, n1, 0);
}

AVX2_FN void spfq_sign_mask_f32_avx2(const spfq_job *j, int32_t n0, int32_t n1) {
    f32_range_avx2(j, n0, n1, 1);
}

#else
typedef int spfq_binary_avx2_empty_unit; /* ISO C: a translation unit is never empty */
#endif /* __x86_64__ */
