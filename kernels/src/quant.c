/* quant.c — the activation quantisers of spfq_kernels.h: spfq_quantize_i8 (per-row symmetric
 * int8) and spfq_binarize (sign bits + mean |x|).
 *
 * spfq_quantize_i8, per row: xscale = max|x| / 127.0f (float32), xq = round-half-away-from-zero
 * (x / xscale) with an IEEE float32 division (not a reciprocal multiply), clamped to
 * [-127, 127]; 0 where xscale == 0. A NaN quotient (x NaN, or x = +-inf with xscale = inf)
 * gives 0 (what the float -> int8 conversion of the earlier scalar code gave on x86-64 and
 * aarch64); max|x| is fmaxf's (glibc: a quiet NaN is ignored, a signalling one yields a NaN).
 *
 * quant_rows_c is the oracle; the SIMD versions are bit-exact with it for every input (the
 * division is the same correctly rounded IEEE operation, max is exact in any order, and the
 * rounding is done exactly; max|x| is an integer max of the |x| bit patterns, and a row holding
 * a NaN, whose max would depend on fmaxf's NaN rules, is done by the oracle):
 *   AVX2 / AVX-512 (x86-64 only, function-level target attributes): a = |v|, t = trunc(a),
 *     f = a - t (exact), q = t + (f >= 0.5), clamped to 127, zeroed where v is NaN, given v's
 *     sign back, converted and narrowed (vpackssdw/vpacksswb, or vpmovdb) to int8. K % width
 *     columns: masked loads / stores on AVX-512, the scalar oracle on AVX2.
 *   NEON (aarch64 only; baseline there): fcvtas is exactly round-half-away with NaN -> 0 and
 *     saturation, then a clamp to [-127, 127] and two saturating narrows.
 * The version follows the active ISA (spfq_set_isa / spfq_isa: "avx512", "avx2", "neon",
 * anything else the C one). Rows are short (a 128 x 384 block takes a few microseconds), so
 * there is no threading here.
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

/* One value of a row with scale s > 0 (the oracle's rounding; also the x86 tail). */
static inline int8_t quant_one(float v, float s) {
    float q = roundf(v / s); /* roundf: half away from zero */
    if (q != q) return 0;    /* NaN */
    return (int8_t)(q > 127.0f ? 127 : q < -127.0f ? -127 : (int)q);
}

/* |x| as its bit pattern (an int32 >= 0; above 0x7f800000 = +inf only for a NaN). */
static inline int32_t abs_bits(const float *p) {
    uint32_t u;
    memcpy(&u, p, 4);
    return (int32_t)(u & 0x7fffffffu);
}

static void quant_rows_c(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                         float *xscale) {
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        float amax = 0.0f;
        for (int32_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(row[i]));
        const float s = amax / 127.0f;
        xscale[r] = s;
        if (s > 0.0f)
            for (int32_t i = 0; i < k; i++) out[i] = quant_one(row[i], s);
        else
            memset(out, 0, (size_t)k);
    }
}

#if defined(__x86_64__)

#define SPFQ_AVX2 __attribute__((target("avx2")))
#define SPFQ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* 8 quotients v -> 8 int32 in [-127, 127] (0 for NaN), exact half-away rounding. */
SPFQ_AVX2 static inline __m256i quant8_avx2(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
    const __m256 one = _mm256_set1_ps(1.0f), top = _mm256_set1_ps(127.0f);
    const __m256 a = _mm256_andnot_ps(sign, v);
    const __m256 t = _mm256_round_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(a, t); /* exact, in [0, 1) */
    __m256 q = _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(f, half, _CMP_GE_OQ), one));
    q = _mm256_min_ps(q, top);                                  /* NaN -> 127 ... */
    q = _mm256_and_ps(q, _mm256_cmp_ps(v, v, _CMP_ORD_Q));      /* ... -> 0 */
    q = _mm256_or_ps(q, _mm256_and_ps(v, sign));                /* sign back (+-0 -> 0) */
    return _mm256_cvtps_epi32(q);                               /* integral: exact */
}

/* quant8_avx2 of x * r (r = 127 / amax, |x * r| < 128, no NaN); near |= lanes whose product lies
 * within 2^-13 of a half-integer (there the product may round unlike the quotient: the caller
 * redoes the row). Away from half-integers round-to-nearest-even
 * and half-away agree, so the lanes of a row without a near lane need no other rounding (the
 * rounding mode is explicit, not the caller's MXCSR). */
SPFQ_AVX2 static inline __m256i quant8_recip(const float *x, __m256 r, __m256 *near) {
    const __m256 v = _mm256_mul_ps(_mm256_loadu_ps(x), r);
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 d = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), _mm256_sub_ps(v, t)); /* exact */
    *near = _mm256_or_ps(*near, _mm256_cmp_ps(d, _mm256_set1_ps(0.5f - 0x1p-13f), _CMP_GT_OQ));
    return _mm256_cvttps_epi32(t); /* integral: exact */
}

SPFQ_AVX2 static void quant_rows_avx2(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                            float *xscale) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        /* max |x| as the integer max of the |x| bit patterns (the same order for non-NaN
         * floats); a pattern above +inf means a NaN: the row goes to the oracle */
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
        if (amax_bits > 0x7f800000) { quant_rows_c(1, k, row, 0, out, 0, xscale + r); continue; }
        float amax;
        memcpy(&amax, &amax_bits, 4);

        const float s = amax / 127.0f;
        xscale[r] = s;
        if (!(s > 0.0f)) { memset(out, 0, (size_t)k); continue; }
        const __m256 vs = _mm256_set1_ps(s);
        if (amax >= 0x1p-100f && amax_bits < 0x7f800000 && k >= 8) { /* finite: no NaN products */
            /* x * (127 / amax) instead of x / s: within 2^-15 of the quotient (|x / s| <= 128, three
             * roundings of 2^-24), so it rounds the same unless within 2^-15 of a half-integer; a
             * row with a product within 2^-13 of one is redone with the division below */
            const __m256 vr = _mm256_set1_ps(127.0f / amax);
            __m256 near = _mm256_setzero_ps();
            for (i = 0; i + 32 <= k; i += 32) {
                const __m256i q0 = quant8_recip(row + i, vr, &near), q1 = quant8_recip(row + i + 8, vr, &near), q2 = quant8_recip(row + i + 16, vr, &near), q3 = quant8_recip(row + i + 24, vr, &near);
                const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
                _mm256_storeu_si256((__m256i *)(out + i), _mm256_permutevar8x32_epi32(b, order));
            }
            for (; i + 8 <= k; i += 8) {
                const __m256i q = quant8_recip(row + i, vr, &near);
                const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(w, w));
            }
            if (i < k) { /* the last 8 again, overlapping: the same values rewritten */
                const __m256i q = quant8_recip(row + k - 8, vr, &near);
                const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
                _mm_storel_epi64((__m128i *)(out + k - 8), _mm_packs_epi16(w, w));
                i = k;
            }
            if (!_mm256_movemask_ps(near)) {
                for (; i < k; i++) out[i] = quant_one(row[i], s);
                continue;
            }
        }
        for (i = 0; i + 32 <= k; i += 32) {
            const __m256i q0 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(row + i), vs));
            const __m256i q1 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(row + i + 8), vs));
            const __m256i q2 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(row + i + 16), vs));
            const __m256i q3 = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(row + i + 24), vs));
            /* per 128-bit lane packs, then undo the lane interleave (4-byte groups) */
            const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3));
            _mm256_storeu_si256((__m256i *)(out + i), _mm256_permutevar8x32_epi32(b, order));
        }
        for (; i + 8 <= k; i += 8) {
            const __m256i q = quant8_avx2(_mm256_div_ps(_mm256_loadu_ps(row + i), vs));
            const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
            _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(w, w));
        }
        for (; i < k; i++) out[i] = quant_one(row[i], s);
    }
}

/* 16 quotients v -> 16 int32 in [-127, 127] (0 for NaN), exact half-away rounding. */
SPFQ_AVX512 static inline __m512i quant16_avx512(__m512 v) {
    const __m512i sign = _mm512_set1_epi32((int32_t)0x80000000u);
    const __m512 half = _mm512_set1_ps(0.5f), one = _mm512_set1_ps(1.0f), top = _mm512_set1_ps(127.0f);
    const __m512 a = _mm512_abs_ps(v);
    const __m512 t = _mm512_roundscale_ps(a, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(a, t); /* exact, in [0, 1) */
    __m512 q = _mm512_mask_add_ps(t, _mm512_cmp_ps_mask(f, half, _CMP_GE_OQ), t, one);
    q = _mm512_maskz_min_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), q, top); /* NaN -> 0 */
    const __m512i qs = _mm512_or_si512(_mm512_castps_si512(q), _mm512_and_si512(_mm512_castps_si512(v), sign));
    return _mm512_cvtps_epi32(_mm512_castsi512_ps(qs)); /* integral: exact */
}

/* quant16_avx512 of x * r (r = 127 / amax, |x * r| < 128, no NaN), as quant8_recip: near |= lanes
 * within 2^-13 of a half-integer (the caller then redoes the row with the division). */
SPFQ_AVX512 static inline __m512i quant16_recip(__m512 x, __m512 r, __mmask16 *near) {
    const __m512 v = _mm512_mul_ps(x, r);
    const __m512 t = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 d = _mm512_abs_ps(_mm512_sub_ps(v, t)); /* exact */
    *near |= _mm512_cmp_ps_mask(d, _mm512_set1_ps(0.5f - 0x1p-13f), _CMP_GT_OQ);
    return _mm512_cvttps_epi32(t); /* integral: exact */
}

SPFQ_AVX512 static void quant_rows_avx512(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                              float *xscale) {
    const __mmask16 tail = (__mmask16)((1u << (k % 16)) - 1u);
    const int32_t kv = k - k % 16;
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        /* max |x| as the integer max of the |x| bit patterns (the same order for non-NaN
         * floats; masked-off tail lanes load as 0); a pattern above +inf means a NaN: the row
         * goes to the oracle */
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
        if (amax_bits > 0x7f800000) { quant_rows_c(1, k, row, 0, out, 0, xscale + r); continue; }
        float amax;
        memcpy(&amax, &amax_bits, 4);

        const float s = amax / 127.0f;
        xscale[r] = s;
        if (!(s > 0.0f)) { memset(out, 0, (size_t)k); continue; }
        const __m512 vs = _mm512_set1_ps(s);
        if (amax >= 0x1p-100f && amax_bits < 0x7f800000) { /* finite: x * (127 / amax), as on AVX2; a
                                                                vector with a lane near a half-integer
                                                                is redone with the division */
            const __m512 vr = _mm512_set1_ps(127.0f / amax);
            for (i = 0; i < kv; i += 16) {
                __mmask16 near = 0;
                const __m512 x = _mm512_loadu_ps(row + i);
                __m512i q = quant16_recip(x, vr, &near);
                if (near) q = quant16_avx512(_mm512_div_ps(x, vs));
                _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(q));
            }
            if (tail) {
                __mmask16 near = 0;
                const __m512 x = _mm512_maskz_loadu_ps(tail, row + kv);
                __m512i q = quant16_recip(x, vr, &near);
                if (near) q = quant16_avx512(_mm512_div_ps(x, vs));
                _mm512_mask_cvtepi32_storeu_epi8(out + kv, tail, q);
            }
            continue;
        }
        for (i = 0; i + 32 <= kv; i += 32) {
            const __m512i q0 = quant16_avx512(_mm512_div_ps(_mm512_loadu_ps(row + i), vs));
            const __m512i q1 = quant16_avx512(_mm512_div_ps(_mm512_loadu_ps(row + i + 16), vs));
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(q0));
            _mm_storeu_si128((__m128i *)(out + i + 16), _mm512_cvtepi32_epi8(q1));
        }
        for (; i < kv; i += 16)
            _mm_storeu_si128((__m128i *)(out + i),
                             _mm512_cvtepi32_epi8(quant16_avx512(_mm512_div_ps(_mm512_loadu_ps(row + i), vs))));
        if (tail)
            _mm512_mask_cvtepi32_storeu_epi8(out + kv, tail,
                                             quant16_avx512(_mm512_div_ps(_mm512_maskz_loadu_ps(tail, row + kv), vs)));
    }
}

#endif /* __x86_64__ */

#if defined(__aarch64__)

/* 4 quotients -> 4 int32 in [-127, 127]: fcvtas rounds half away from zero, NaN -> 0. */
static inline int32x4_t quant4_neon(float32x4_t v) {
    return vmaxq_s32(vminq_s32(vcvtaq_s32_f32(v), vdupq_n_s32(127)), vdupq_n_s32(-127));
}

static void quant_rows_neon(int32_t m, int32_t k, const float *x, size_t ldx, int8_t *xq, size_t ldq,
                            float *xscale) {
    for (int32_t r = 0; r < m; r++) {
        const float *row = x + (size_t)r * ldx;
        int8_t *out = xq + (size_t)r * ldq;
        /* max |x| as the integer max of the |x| bit patterns (the same order for non-NaN
         * floats); a pattern above +inf means a NaN: the row goes to the oracle */
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
        if (amax_bits > 0x7f800000u) { quant_rows_c(1, k, row, 0, out, 0, xscale + r); continue; }
        float amax;
        memcpy(&amax, &amax_bits, 4);

        const float s = amax / 127.0f;
        xscale[r] = s;
        if (!(s > 0.0f)) { memset(out, 0, (size_t)k); continue; }
        const float32x4_t vs = vdupq_n_f32(s);
        for (i = 0; i + 16 <= k; i += 16) {
            const int32x4_t q0 = quant4_neon(vdivq_f32(vld1q_f32(row + i), vs));
            const int32x4_t q1 = quant4_neon(vdivq_f32(vld1q_f32(row + i + 4), vs));
            const int32x4_t q2 = quant4_neon(vdivq_f32(vld1q_f32(row + i + 8), vs));
            const int32x4_t q3 = quant4_neon(vdivq_f32(vld1q_f32(row + i + 12), vs));
            const int16x8_t w0 = vcombine_s16(vqmovn_s32(q0), vqmovn_s32(q1));
            const int16x8_t w1 = vcombine_s16(vqmovn_s32(q2), vqmovn_s32(q3));
            vst1q_s8(out + i, vcombine_s8(vqmovn_s16(w0), vqmovn_s16(w1)));
        }
        for (; i + 4 <= k; i += 4) {
            const int32x4_t q = quant4_neon(vdivq_f32(vld1q_f32(row + i), vs));
            const int8x8_t b = vqmovn_s16(vcombine_s16(vqmovn_s32(q), vdup_n_s16(0)));
            out[i] = vget_lane_s8(b, 0);
            out[i + 1] = vget_lane_s8(b, 1);
            out[i + 2] = vget_lane_s8(b, 2);
            out[i + 3] = vget_lane_s8(b, 3);
        }
        for (; i < k; i++) out[i] = quant_one(row[i], s);
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
