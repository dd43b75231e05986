/* quant.c — the activation quantisers of spfq_kernels.h: spfq_quantize_i8 (per-row symmetric
 * int8) and spfq_binarize (sign bits + mean |x|).
 *
 * spfq_quantize_i8, per row (rule 2 of the int8 activation quantiser; manifests record it):
 *   amax = max |x| (fmaxf's: a quiet NaN is ignored); rows with amax < 2^-100 (all zero, or too
 *   small for 127 / amax to be finite) get xscale = 0 and xq = 0; otherwise
 *   xscale = amax / 127 and r = 127 / amax (IEEE float32 divisions), and
 *   xq = x * r (float32 product) rounded to the nearest integer, ties to even, clamped to
 *   [-127, 127]; a NaN product (x NaN, or x infinite with amax infinite: r = 0) gives 0.
 * One multiply and one rounding conversion per value, which every ISA has in one instruction
 * each (vcvtps2dq with embedded rounding on AVX-512, vroundps + vcvttps2dq on AVX2, fcvtns on
 * NEON); rule 1 (x / xscale rounded half away from zero) needed a division or an exactness
 * check per value and cost 2-3x as much on conv-shaped rows.
 *
 * quant_rows_c is the oracle; the SIMD versions are bit-exact with it for every input (the
 * product and its rounding are the same IEEE operations; max|x| is an integer max of the |x| bit
 * patterns, and a row holding a NaN or an infinity, whose max would depend on fmaxf's NaN rules
 * or whose products may be NaN, is done by the oracle). The library assumes the default floating-point environment (round to nearest).
 * The version follows the active ISA (spfq_set_isa / spfq_isa). No threading here: callers
 * quantise blocks of rows on their own threads (api.c's row-block driver).
 *
 * spfq_binarize stays scalar: its xscale is a double sum of |x| in column order, which a
 * vector sum would not reproduce bit for bit. */
#define _GNU_SOURCE
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "internal.h"

#if defined(__x86_64__)
#include <immintrin.h>
#endif
#if defined(__aarch64__)
#include <arm_neon.h>
#endif

typedef void (*quant_rows_fn)(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                              float *xscale);

#define QUANT_TINY_BITS 0x0d800000 /* 2^-100: smaller row maxima quantise to 0 */

/* One value: x * r rounded to nearest even, clamped, 0 for NaN (the oracle; also SIMD tails). */
static inline int8_t quant_one(float x, float r) {
    const float t = nearbyintf(x * r);
    if (t != t) return 0;
    return (int8_t)(t > 127.0f ? 127 : t < -127.0f ? -127 : (int)t);
}

/* |x| as its bit pattern (an int32 >= 0; above 0x7f800000 = +inf only for a NaN). */
static inline int32_t abs_bits(const float *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return (int32_t)(u & 0x7fffffffu);
}

/* xscale and r of a row from max |x| (its bit pattern); 0 when the row quantises to zero. */
static inline int row_scales(int32_t amax_bits, float *xscale, float *r) {
    float amax;
    memcpy(&amax, &amax_bits, 4);
    if (amax_bits < QUANT_TINY_BITS) {
        *xscale = *r = 0.0f;
        return 0;
    }
    *xscale = amax / 127.0f;
    *r = 127.0f / amax;
    return 1;
}

static void quant_rows_c(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                         float *xscale) {
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        float amax = 0.0f, rc;
        for (int32_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(row[i]));
        int32_t bits;
        memcpy(&bits, &amax, 4);
        if (row_scales(bits, &xscale[r], &rc))
            for (int32_t i = 0; i < k; i++) out[i] = quant_one(row[i], rc);
        else
            memset(out, 0, (size_t)k);
    }
}

#if defined(__x86_64__)

#define SPFQ_AVX2 __attribute__((target("avx2")))
#define SPFQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* 8 values x * r -> 8 int32 (|x * r| <= 127.5 in a finite row: no clamp needed after rounding) */
SPFQ_AVX2 static inline __m256i quant8_avx2(const float *x, __m256 r) {
    const __m256 t = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), r), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm256_cvttps_epi32(t); /* integral: exact */
}

SPFQ_AVX2 static void quant_rows_avx2(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                                      float *xscale) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        /* max |x| as the integer max of the |x| bit patterns; an infinity or a NaN (a pattern from
         * +inf up): the row goes to the oracle */
        __m256i m0 = _mm256_setzero_si256(), m1 = m0, m2 = m0, m3 = m0;
        const __m256i abs = _mm256_set1_epi32(0x7fffffff);
        int32_t i = 0;
        for (; i + 32 <= k; i += 32) {
            m0 = _mm256_max_epi32(m0, _mm256_and_si256(abs, _mm256_loadu_si256((const __m256i *)(row + i))));
            m1 = _mm256_max_epi32(m1, _mm256_and_si256(abs, _mm256_loadu_si256((const __m256i *)(row + i + 8))));
            m2 = _mm256_max_epi32(m2, _mm256_and_si256(abs, _mm256_loadu_si256((const __m256i *)(row + i + 16))));
            m3 = _mm256_max_epi32(m3, _mm256_and_si256(abs, _mm256_loadu_si256((const __m256i *)(row + i + 24))));
        }
        for (; i + 8 <= k; i += 8)
            m0 = _mm256_max_epi32(m0, _mm256_and_si256(abs, _mm256_loadu_si256((const __m256i *)(row + i))));
        if (i < k && k >= 8) { /* the last 8, overlapping the ones done (max is idempotent) */
            m1 = _mm256_max_epi32(m1, _mm256_and_si256(abs, _mm256_loadu_si256((const __m256i *)(row + k - 8))));
            i = k;
        }
        m0 = _mm256_max_epi32(_mm256_max_epi32(m0, m1), _mm256_max_epi32(m2, m3));
        __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m0), _mm256_extracti128_si256(m0, 1));
        h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4e));
        h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0xb1));
        int32_t amax_bits = _mm_cvtsi128_si32(h);
        for (; i < k; i++) amax_bits = amax_bits > abs_bits(row + i) ? amax_bits : abs_bits(row + i);
        if (amax_bits >= 0x7f800000) { quant_rows_c(1, k, row, 0, out, 0, xscale + r); continue; }
        float rc;
        if (!row_scales(amax_bits, &xscale[r], &rc)) { memset(out, 0, (size_t)k); continue; }
        const __m256 vr = _mm256_set1_ps(rc);
        for (i = 0; i + 32 <= k; i += 32) {
            const __m256i q0 = quant8_avx2(row + i, vr), q1 = quant8_avx2(row + i + 8, vr);
            const __m256i q2 = quant8_avx2(row + i + 16, vr), q3 = quant8_avx2(row + i + 24, vr);
            /* per 128-bit lane packs, then undo the lane interleave (4-byte groups) */
            const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            _mm256_storeu_si256((__m256i *)(out + i), _mm256_permutevar8x32_epi32(b, order));
        }
        for (; i + 8 <= k; i += 8) {
            const __m256i q = quant8_avx2(row + i, vr);
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(w, w));
        }
        for (; i < k; i++) out[i] = quant_one(row[i], rc);
    }
}

SPFQ_AVX512 static void quant_rows_avx512(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                                          float *xscale) {
    const __mmask16 tail = (__mmask16)((1u << (k % 16)) - 1u);
    const int32_t kv = k - k % 16;
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        /* max |x| as the integer max of the |x| bit patterns (masked-off tail lanes load as 0); an
         * infinity or a NaN (a pattern from +inf up): the row goes to the oracle */
        const __m512i abs = _mm512_set1_epi32(0x7fffffff);
        __m512i m0 = _mm512_setzero_si512(), m1 = m0, m2 = m0, m3 = m0;
        int32_t i = 0;
        for (; i + 64 <= kv; i += 64) {
            m0 = _mm512_max_epi32(m0, _mm512_and_si512(abs, _mm512_loadu_si512(row + i)));
            m1 = _mm512_max_epi32(m1, _mm512_and_si512(abs, _mm512_loadu_si512(row + i + 16)));
            m2 = _mm512_max_epi32(m2, _mm512_and_si512(abs, _mm512_loadu_si512(row + i + 32)));
            m3 = _mm512_max_epi32(m3, _mm512_and_si512(abs, _mm512_loadu_si512(row + i + 48)));
        }
        for (; i < kv; i += 16) m0 = _mm512_max_epi32(m0, _mm512_and_si512(abs, _mm512_loadu_si512(row + i)));
        if (tail) m1 = _mm512_max_epi32(m1, _mm512_maskz_and_epi32(tail, abs, _mm512_maskz_loadu_epi32(tail, row + kv)));
        m0 = _mm512_max_epi32(_mm512_max_epi32(m0, m1), _mm512_max_epi32(m2, m3));
        const int32_t amax_bits = _mm512_reduce_max_epi32(m0);
        if (amax_bits >= 0x7f800000) { quant_rows_c(1, k, row, 0, out, 0, xscale + r); continue; }
        float rc;
        if (!row_scales(amax_bits, &xscale[r], &rc)) { memset(out, 0, (size_t)k); continue; }
        const __m512 vr = _mm512_set1_ps(rc);
#define Q16(v) _mm512_cvt_roundps_epi32(_mm512_mul_ps((v), vr), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
        for (i = 0; i < kv; i += 16) _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtsepi32_epi8(Q16(_mm512_loadu_ps(row + i))));
        if (tail) _mm512_mask_cvtsepi32_storeu_epi8(out + kv, tail, Q16(_mm512_maskz_loadu_ps(tail, row + kv)));
#undef Q16
    }
}

#endif /* __x86_64__ */

#if defined(__aarch64__)

static void quant_rows_neon(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                            float *xscale) {
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        /* max |x| as the integer max of the |x| bit patterns; an infinity or a NaN (a pattern from
         * +inf up): the row goes to the oracle */
        const uint32x4_t abs = vdupq_n_u32(0x7fffffffu);
        uint32x4_t m0 = vdupq_n_u32(0), m1 = m0, m2 = m0, m3 = m0;
        int32_t i = 0;
        for (; i + 16 <= k; i += 16) {
            m0 = vmaxq_u32(m0, vandq_u32(abs, vreinterpretq_u32_f32(vld1q_f32(row + i))));
            m1 = vmaxq_u32(m1, vandq_u32(abs, vreinterpretq_u32_f32(vld1q_f32(row + i + 4))));
            m2 = vmaxq_u32(m2, vandq_u32(abs, vreinterpretq_u32_f32(vld1q_f32(row + i + 8))));
            m3 = vmaxq_u32(m3, vandq_u32(abs, vreinterpretq_u32_f32(vld1q_f32(row + i + 12))));
        }
        for (; i + 4 <= k; i += 4) m0 = vmaxq_u32(m0, vandq_u32(abs, vreinterpretq_u32_f32(vld1q_f32(row + i))));
        uint32_t amax_bits = vmaxvq_u32(vmaxq_u32(vmaxq_u32(m0, m1), vmaxq_u32(m2, m3)));
        for (; i < k; i++) amax_bits = amax_bits > (uint32_t)abs_bits(row + i) ? amax_bits : (uint32_t)abs_bits(row + i);
        if (amax_bits >= 0x7f800000u) { quant_rows_c(1, k, row, 0, out, 0, xscale + r); continue; }
        float rc;
        if (!row_scales((int32_t)amax_bits, &xscale[r], &rc)) { memset(out, 0, (size_t)k); continue; }
        const float32x4_t vr = vdupq_n_f32(rc);
        /* fcvtns: round to nearest, ties to even; |x * r| <= 127.5: the narrows do not saturate */
#define Q4(p) vcvtnq_s32_f32(vmulq_f32(vld1q_f32(p), vr))
        for (i = 0; i + 16 <= k; i += 16) {
            const int16x8_t w0 = vcombine_s16(vqmovn_s32(Q4(row + i)), vqmovn_s32(Q4(row + i + 4)));
            const int16x8_t w1 = vcombine_s16(vqmovn_s32(Q4(row + i + 8)), vqmovn_s32(Q4(row + i + 12)));
            vst1q_s8(out + i, vcombine_s8(vqmovn_s16(w0), vqmovn_s16(w1)));
        }
        for (; i + 4 <= k; i += 4) {
            const int8x8_t b = vqmovn_s16(vcombine_s16(vqmovn_s32(Q4(row + i)), vdup_n_s16(0)));
            out[i] = vget_lane_s8(b, 0);
            out[i + 1] = vget_lane_s8(b, 1);
            out[i + 2] = vget_lane_s8(b, 2);
            out[i + 3] = vget_lane_s8(b, 3);
        }
#undef Q4
        for (; i < k; i++) out[i] = quant_one(row[i], rc);
    }
}

#endif /* __aarch64__ */

/* The version for the active ISA (the C one where the build has no SIMD version). */
static quant_rows_fn quant_rows(void) {
    const char *isa = spfq_isa();
#if defined(__x86_64__)
    if (spfq_isa_avx512()) return quant_rows_avx512;
    if (!strcmp(isa, "avx2")) return quant_rows_avx2;
#endif
#if defined(__aarch64__)
    if (!strcmp(isa, "neon")) return quant_rows_neon;
#endif
    (void)isa;
    return quant_rows_c;
}

int spfq_quantize_i8(int32_t m, int32_t k, const float *x, int8_t *xq, float *xscale) {
    if (m < 0 || k <= 0 || !x || !xq || !xscale) return SPFQ_EINVAL;
    if (m) quant_rows()(m, k, x, (size_t)k, xq, (size_t)k, xscale);
    return SPFQ_OK;
}

void spfq_quant_rows(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq, float *xscale) {
    if (m > 0) quant_rows()(m, k, x, ldx, xq, ldq, xscale);
}

int spfq_binarize(int32_t m, int32_t k, const float *x, uint64_t *xbits, float *xscale) {
    if (m < 0 || k <= 0 || !x || !xbits) return SPFQ_EINVAL;
    int32_t W = SPFQ_WORDS(k);
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * k;
        uint64_t *out = xbits + (size_t)r * W;
        memset(out, 0, (size_t)W * 8);
        double sum = 0.0;
        for (int32_t i = 0; i < k; i++) {
            sum += fabsf(row[i]);
            if (row[i] < 0.0f) out[i / 64] |= 1ull << (i % 64);
        }
        if (xscale) xscale[r] = (float)(sum / k);
    }
    return SPFQ_OK;
}
