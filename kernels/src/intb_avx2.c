/* intb_avx2.c — AVX2 kernels for the int b-bit layouts PLANES and SPARSE (same semantics as the
 * portable oracle intb.c: identical int32 sums, float sums up to summation order).
 *
 * PLANES, int8 activations. A row is processed in superblocks of 256 columns = 4 words per
 * plane, one 32-byte load per bit plane; byte i of a plane vector holds columns 8i..8i+7. The
 * offset codes u = c + 2^(b-1) are rebuilt as bytes with vpshufb lookup tables indexed by the
 * plane vectors' nibbles (no per-bit expand/compare):
 *   b = 2   : LUT_p[nibble] puts its 4 bits at bits p, p+2, p+4, p+6 (4 crumbs per byte);
 *   b = 3,4 : LUT_p,A / LUT_p,B put 2 of the 4 bits at bits p and p+4 (2 nibbles per byte);
 *   b = 5..8: LUT_p,t puts bit t at bit p (one u per byte).
 * OR-ing over planes and splitting crumbs/nibbles (shift + and) gives 8 vectors U_t whose byte i
 * is u of column 8i+t. The activations are permuted once per call into that order
 * (X_t byte i = x[8i+t]), so the weights are never transposed. Then
 *   acc_c = sum vpmaddubsw(U_t, X_t) - 2^(b-1) * sum(x)          (u unsigned, x signed)
 *   acc_s = sum vpmaddubsw(s1(U_t), X_t) - sum(x),  s1 = sign(c) + 1 in {0, 1, 2},
 * s1 by one more vpshufb (b <= 4) or min(subs_epu8(u, 2^(b-1) - 1), 2); for b = 2
 * sign(c) == c, so acc_s = acc_c. int16 products are summed over a superblock's 8 vectors only
 * where that provably cannot overflow (b <= 4: 8 * 2 * 15 * 128 = 30720), then widened with
 * vpmaddwd; b = 8 splits u into (u & 0x7f) and (u & 0x80) so each vpmaddubsw stays exact. All
 * bounds hold for xq in [-128, 127], so results equal the oracle's for any int8 input.
 * Why: measured 2.5x faster (0.54 vs 1.37 ms, 4-bit 4096x4096 M = 1) than expanding each plane's
 * bits to byte masks (broadcast, vpshufb, vpand, vpcmpeqb per plane per 32 weights) feeding the
 * same vpmaddubsw tail; about 1.6 decode ops per plane per 32 weights here against 5-6 there.
 * The sign sums cost ~30% of the time: with job->acc_s == NULL they are skipped (useful when
 * lam == NULL, where (lam - scale) * acc_s vanishes).
 * M == 1: decode and accumulate in registers, the weights are streamed once. M > 1: a row is
 * decoded once into a scratch row of U bytes, then dotted with 4 activation rows per pass.
 *
 * SPARSE. Per row, phase 1 scatters the compact bit planes back to their columns with BMI2 pdep:
 * one pdep per plane per 64-column mask word, the compact stream read at the running popcount
 * of the earlier mask words (unaligned 8-byte loads + shift). Phase 2 turns (mask M, sign plane
 * s, magnitude planes) into the PLANES offset code with a few bit-sliced ops per superblock
 * (masked: u = 2^(b-1), i.e. c = 0; negative: u = ~mag; positive: u = 2^(b-1) + 1 + mag, a
 * bit-sliced increment) and runs the PLANES dot on it. Superblocks whose 4 mask words are all
 * zero are skipped (nothing read, nothing computed) and the 2^(b-1) * sum(x) corrections count
 * only the processed ones; a zero word inside a non-zero superblock deposits zeros and consumes
 * no field without a data-dependent branch. Honest limit: the vector work is that of the dense
 * row plus the pdep work (~b pdeps and ~20 scalar instructions per mask word), so on AVX2 this
 * kernel is ~2.2x slower than PLANES at any density (no vpexpandb/vpcompressb before
 * AVX-512 VBMI2); see the report for the numbers.
 *
 * PLANES from the prepare-time repack (w->rp, rp_cb 2, 4 or 8), used when only acc_c is
 * wanted (spfq_matmul_i8 without lam): offset codes interleaved across 16 rows (layout "RP" in
 * internal.h), one int32 lane per output row, so each ymm half-vector holds 8 rows x 4 columns
 * per field and is dotted with 4 broadcast activation bytes: per field one shift (f > 0), one
 * vpand, one vpmaddubsw and one int16 add per 32 weights, widened with vpmaddwd only every 4-10
 * steps; no activation permutation and no per-call decoding of the planes. Why this and not the
 * plane LUTs above: those rebuild every code on every call (~1.6 ops per plane per 32 weights
 * plus the shuffles); a T-MAC-style table method would need per-activation-row tables and
 * vpshufb lookups that cost as much as the multiply-add here.
 *
 * f32: the same decode gives each row's codes once; they become float weights value(c) (computed
 * like CompressedLayer.dequantize) in a scratch row that is dotted with the identically permuted
 * float activations by FMA with 4 accumulators.
 *
 * Memory safety: partial last superblocks go through zero-padded copies (weights and
 * activations). The compact stream is read with 8-byte loads that run at most 8 bytes past a
 * row's Wk words, since each superblock checks its popcount against Wk * 64 before loading (a
 * corrupt row goes to the portable kernel); that is inside the next row of the buffer, except
 * for the buffer's last row, which is read from a copy padded with 2 zero words. Scratch memory
 * is malloc'ed per call (no global writable state); if that fails the portable version does the
 * work. Requires AVX2, FMA, POPCNT (the dispatcher's check) and BMI1/BMI2 (checked here at run
 * time; without them the portable kernels run).
 */
#if defined(__x86_64__)

#include <immintrin.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#include "internal.h"

#define TGT __attribute__((target("avx2,fma,popcnt,bmi,bmi2")))
#define TGT_F16C __attribute__((target("avx2,fma,popcnt,bmi,bmi2,f16c"))) /* the float16 group scales */
#define ENTRY __attribute__((target("avx2,fma,popcnt"))) /* runs before the BMI check */
#define INL static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ lookup tables */

typedef struct {
    __m256i t[32];  /* nibble LUTs, layout depends on b (see build_luts) */
    __m256i s1;     /* u -> sign(u - 2^(b-1)) + 1, for b <= 4 */
} luts;

TGT static void build_luts(int b, luts *L)
{
    uint8_t tmp[32];
    const int H = 1 << (b - 1);
    memset(L, 0, sizeof *L);
    if (b == 2) {
        for (int p = 0; p < 2; p++) {
            for (int n = 0; n < 16; n++) {
                int v = 0;
                for (int t = 0; t < 4; t++) v |= ((n >> t) & 1) << (2 * t + p);
                tmp[n] = tmp[n + 16] = (uint8_t)v;
            }
            L->t[p] = _mm256_loadu_si256((const __m256i *)tmp);
        }
    } else if (b <= 4) {
        for (int p = 0; p < b; p++) {
            for (int half = 0; half < 2; half++) {
                for (int n = 0; n < 16; n++) {
                    int v = ((n >> (2 * half)) & 1) << p | ((n >> (2 * half + 1)) & 1) << (p + 4);
                    tmp[n] = tmp[n + 16] = (uint8_t)v;
                }
                L->t[2 * p + half] = _mm256_loadu_si256((const __m256i *)tmp);
            }
        }
    } else {
        for (int p = 0; p < b; p++) {
            for (int t = 0; t < 4; t++) {
                for (int n = 0; n < 16; n++) tmp[n] = tmp[n + 16] = (uint8_t)(((n >> t) & 1) << p);
                L->t[4 * p + t] = _mm256_loadu_si256((const __m256i *)tmp);
            }
        }
    }
    if (b <= 4) {
        for (int u = 0; u < 16; u++) tmp[u] = tmp[u + 16] = (uint8_t)(u > H ? 2 : (u == H ? 1 : 0));
        L->s1 = _mm256_loadu_si256((const __m256i *)tmp);
    }
}

/* ------------------------------------------------------------------ superblock decode */

/* Y[p]: 32 bytes of plane p (256 columns). Out: U[t] byte i = u of column 8i + t. */
INL TGT void decode_sb(const __m256i *Y, const luts *L, int b, __m256i U[8])
{
    const __m256i m0f = _mm256_set1_epi8(0x0f);
    if (b == 2) {
        const __m256i m3 = _mm256_set1_epi8(3);
        __m256i lo0 = _mm256_and_si256(Y[0], m0f);
        __m256i hi0 = _mm256_and_si256(_mm256_srli_epi16(Y[0], 4), m0f);
        __m256i lo1 = _mm256_and_si256(Y[1], m0f);
        __m256i hi1 = _mm256_and_si256(_mm256_srli_epi16(Y[1], 4), m0f);
        __m256i ql = _mm256_or_si256(_mm256_shuffle_epi8(L->t[0], lo0),
                                     _mm256_shuffle_epi8(L->t[1], lo1));
        __m256i qh = _mm256_or_si256(_mm256_shuffle_epi8(L->t[0], hi0),
                                     _mm256_shuffle_epi8(L->t[1], hi1));
        U[0] = _mm256_and_si256(ql, m3);
        U[1] = _mm256_and_si256(_mm256_srli_epi16(ql, 2), m3);
        U[2] = _mm256_and_si256(_mm256_srli_epi16(ql, 4), m3);
        U[3] = _mm256_and_si256(_mm256_srli_epi16(ql, 6), m3);
        U[4] = _mm256_and_si256(qh, m3);
        U[5] = _mm256_and_si256(_mm256_srli_epi16(qh, 2), m3);
        U[6] = _mm256_and_si256(_mm256_srli_epi16(qh, 4), m3);
        U[7] = _mm256_and_si256(_mm256_srli_epi16(qh, 6), m3);
    } else if (b <= 4) {
        __m256i qla = _mm256_setzero_si256(), qlb = qla, qha = qla, qhb = qla;
        for (int p = 0; p < b; p++) {
            __m256i lo = _mm256_and_si256(Y[p], m0f);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(Y[p], 4), m0f);
            qla = _mm256_or_si256(qla, _mm256_shuffle_epi8(L->t[2 * p], lo));
            qlb = _mm256_or_si256(qlb, _mm256_shuffle_epi8(L->t[2 * p + 1], lo));
            qha = _mm256_or_si256(qha, _mm256_shuffle_epi8(L->t[2 * p], hi));
            qhb = _mm256_or_si256(qhb, _mm256_shuffle_epi8(L->t[2 * p + 1], hi));
        }
        U[0] = _mm256_and_si256(qla, m0f);
        U[1] = _mm256_and_si256(_mm256_srli_epi16(qla, 4), m0f);
        U[2] = _mm256_and_si256(qlb, m0f);
        U[3] = _mm256_and_si256(_mm256_srli_epi16(qlb, 4), m0f);
        U[4] = _mm256_and_si256(qha, m0f);
        U[5] = _mm256_and_si256(_mm256_srli_epi16(qha, 4), m0f);
        U[6] = _mm256_and_si256(qhb, m0f);
        U[7] = _mm256_and_si256(_mm256_srli_epi16(qhb, 4), m0f);
    } else {
        for (int t = 0; t < 8; t++) U[t] = _mm256_setzero_si256();
        for (int p = 0; p < b; p++) {
            __m256i lo = _mm256_and_si256(Y[p], m0f);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(Y[p], 4), m0f);
            for (int t = 0; t < 4; t++) {
                U[t] = _mm256_or_si256(U[t], _mm256_shuffle_epi8(L->t[4 * p + t], lo));
                U[t + 4] = _mm256_or_si256(U[t + 4], _mm256_shuffle_epi8(L->t[4 * p + t], hi));
            }
        }
    }
}

/* 32 bytes of int8 activations */
INL TGT __m256i ldx(const int8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }

/* Products of 4 U vectors (one half superblock) with their activations, b <= 4: int16 sums
 * (at most 4 * 2 * 15 * 128 = 15360 per lane for the u products, 4 * 512 for s1). */
INL TGT void dot4_small(__m256i u0, __m256i u1, __m256i u2, __m256i u3, const int8_t *xh,
                        const luts *L, int b, int ws, __m256i *pc, __m256i *ps)
{
    const __m256i x0 = ldx(xh), x1 = ldx(xh + 32), x2 = ldx(xh + 64), x3 = ldx(xh + 96);
    *pc = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(u0, x0), _mm256_maddubs_epi16(u1, x1)),
                           _mm256_add_epi16(_mm256_maddubs_epi16(u2, x2), _mm256_maddubs_epi16(u3, x3)));
    if (b > 2 && ws) {
        const __m256i s = L->s1;
        *ps = _mm256_add_epi16(
            _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi8(s, u0), x0),
                             _mm256_maddubs_epi16(_mm256_shuffle_epi8(s, u1), x1)),
            _mm256_add_epi16(_mm256_maddubs_epi16(_mm256_shuffle_epi8(s, u2), x2),
                             _mm256_maddubs_epi16(_mm256_shuffle_epi8(s, u3), x3)));
    }
}

/* One U vector (b >= 5) times its activations into the int32 accumulators; ps: int16 s1 sums
 * (8 * 512 at most). */
INL TGT void dot1_big(__m256i u, __m256i x, int b, int ws, __m256i *accu, __m256i *ps)
{
    const __m256i one16 = _mm256_set1_epi16(1);
    if (b < 8) {
        *accu = _mm256_add_epi32(*accu, _mm256_madd_epi16(_mm256_maddubs_epi16(u, x), one16));
    } else {
        __m256i a = _mm256_maddubs_epi16(_mm256_and_si256(u, _mm256_set1_epi8(0x7f)), x);
        __m256i c = _mm256_maddubs_epi16(_mm256_and_si256(u, _mm256_set1_epi8((char)0x80)), x);
        *accu = _mm256_add_epi32(*accu, _mm256_add_epi32(_mm256_madd_epi16(a, one16),
                                                         _mm256_madd_epi16(c, one16)));
    }
    if (ws) {
        __m256i s1 = _mm256_min_epu8(
            _mm256_subs_epu8(u, _mm256_set1_epi8((char)((1 << (b - 1)) - 1))), _mm256_set1_epi8(2));
        *ps = _mm256_add_epi16(*ps, _mm256_maddubs_epi16(s1, x));
    }
}

/* acc_u += sum u*x, acc_s1 += sum s1(u)*x over one superblock given its b plane vectors Y
 * (int32 lanes). Works half a superblock (the low or high nibbles of every plane) at a time so
 * that few vectors are live. */
INL TGT void dot_sb(const __m256i *Y, const int8_t *xp, const luts *L, int b, int ws,
                    __m256i *accu, __m256i *accs)
{
    const __m256i F = _mm256_set1_epi8(0x0f), one16 = _mm256_set1_epi16(1);
    __m256i pc = _mm256_setzero_si256(), ps = pc;
    for (int half = 0; half < 2; half++) {
        const int8_t *xh = xp + 128 * half;
        __m256i n[8];
        for (int p = 0; p < b; p++)
            n[p] = half ? _mm256_and_si256(_mm256_srli_epi16(Y[p], 4), F) : _mm256_and_si256(Y[p], F);
        if (b == 2) {
            const __m256i m3 = _mm256_set1_epi8(3);
            __m256i q = _mm256_or_si256(_mm256_shuffle_epi8(L->t[0], n[0]),
                                        _mm256_shuffle_epi8(L->t[1], n[1]));
            __m256i c, s;
            dot4_small(_mm256_and_si256(q, m3), _mm256_and_si256(_mm256_srli_epi16(q, 2), m3),
                       _mm256_and_si256(_mm256_srli_epi16(q, 4), m3),
                       _mm256_and_si256(_mm256_srli_epi16(q, 6), m3), xh, L, b, ws, &c, &s);
            pc = _mm256_add_epi16(pc, c);
        } else if (b <= 4) {
            __m256i qa = _mm256_shuffle_epi8(L->t[0], n[0]), qb = _mm256_shuffle_epi8(L->t[1], n[0]);
            for (int p = 1; p < b; p++) {
                qa = _mm256_or_si256(qa, _mm256_shuffle_epi8(L->t[2 * p], n[p]));
                qb = _mm256_or_si256(qb, _mm256_shuffle_epi8(L->t[2 * p + 1], n[p]));
            }
            __m256i c, s;
            dot4_small(_mm256_and_si256(qa, F), _mm256_and_si256(_mm256_srli_epi16(qa, 4), F),
                       _mm256_and_si256(qb, F), _mm256_and_si256(_mm256_srli_epi16(qb, 4), F), xh,
                       L, b, ws, &c, &s);
            pc = _mm256_add_epi16(pc, c);
            ps = _mm256_add_epi16(ps, s);
        } else {
            for (int t = 0; t < 4; t++) {
                __m256i u = _mm256_shuffle_epi8(L->t[t], n[0]);
                for (int p = 1; p < b; p++)
                    u = _mm256_or_si256(u, _mm256_shuffle_epi8(L->t[4 * p + t], n[p]));
                dot1_big(u, ldx(xh + 32 * t), b, ws, accu, &ps);
            }
        }
    }
    if (b <= 4) *accu = _mm256_add_epi32(*accu, _mm256_madd_epi16(pc, one16));
    if (b > 2 && ws) *accs = _mm256_add_epi32(*accs, _mm256_madd_epi16(ps, one16));
}

/* The same from already decoded U vectors (scratch paths). */
INL TGT void dot_sb_u(const uint8_t *ub, const int8_t *xp, const luts *L, int b, int ws,
                      __m256i *accu, __m256i *accs)
{
    const __m256i one16 = _mm256_set1_epi16(1);
    __m256i pc = _mm256_setzero_si256(), ps = pc;
    for (int half = 0; half < 2; half++) {
        const uint8_t *uh = ub + 128 * half;
        const int8_t *xh = xp + 128 * half;
        if (b <= 4) {
            __m256i c, s;
            dot4_small(_mm256_loadu_si256((const __m256i *)uh), _mm256_loadu_si256((const __m256i *)(uh + 32)),
                       _mm256_loadu_si256((const __m256i *)(uh + 64)), _mm256_loadu_si256((const __m256i *)(uh + 96)),
                       xh, L, b, ws, &c, &s);
            pc = _mm256_add_epi16(pc, c);
            if (b > 2 && ws) ps = _mm256_add_epi16(ps, s);
        } else {
            for (int t = 0; t < 4; t++)
                dot1_big(_mm256_loadu_si256((const __m256i *)(uh + 32 * t)), ldx(xh + 32 * t), b, ws, accu,
                         &ps);
        }
    }
    if (b <= 4) *accu = _mm256_add_epi32(*accu, _mm256_madd_epi16(pc, one16));
    if (b > 2 && ws) *accs = _mm256_add_epi32(*accs, _mm256_madd_epi16(ps, one16));
}

INL TGT int32_t hsum32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

INL TGT float hsumf(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ------------------------------------------------------------------ activations */

/* Permute x (M, K) into superblock order: out[m][sb*256 + 32t + i] = x[m][sb*256 + 8i + t],
 * zero past K. Also per-superblock sums (sbsum[m][sb], int32) and row sums. */
static void permute_i8(const int8_t *x, int32_t M, int32_t K, int32_t nsb, int8_t *out,
                       int32_t *sbsum, int32_t *rowsum)
{
    for (int32_t m = 0; m < M; m++) {
        const int8_t *xr = x + (size_t)m * (size_t)K;
        int8_t *o = out + (size_t)m * (size_t)nsb * 256;
        int32_t tot = 0;
        for (int32_t sb = 0; sb < nsb; sb++) {
            int32_t s = 0;
            for (int i = 0; i < 32; i++) {
                for (int t = 0; t < 8; t++) {
                    int32_t k = sb * 256 + 8 * i + t;
                    int8_t v = k < K ? xr[k] : 0;
                    o[(size_t)sb * 256 + 32 * t + i] = v;
                    s += v;
                }
            }
            if (sbsum) sbsum[(size_t)m * (size_t)nsb + (size_t)sb] = s;
            tot += s;
        }
        rowsum[m] = tot;
    }
}

static void permute_f32(const float *x, int32_t M, int32_t K, int32_t nsb, float *out)
{
    for (int32_t m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * (size_t)K;
        float *o = out + (size_t)m * (size_t)nsb * 256;
        for (int32_t sb = 0; sb < nsb; sb++)
            for (int i = 0; i < 32; i++)
                for (int t = 0; t < 8; t++) {
                    int32_t k = sb * 256 + 8 * i + t;
                    o[(size_t)sb * 256 + 32 * t + i] = k < K ? xr[k] : 0.0f;
                }
    }
}

/* ------------------------------------------------------------------ PLANES row decode */

/* Load the b plane vectors of superblock sb of a row (plane stride ps words, W words per row);
 * the partial last superblock goes through a zero-padded copy. */
INL TGT void load_planes(const uint64_t *base, size_t ps, int32_t W, int32_t sb, int b, __m256i *Y)
{
    for (int p = 0; p < b; p++)
        Y[p] = _mm256_loadu_si256((const __m256i *)(base + (size_t)p * ps + 4 * (size_t)sb));
    (void)W;
}

TGT static void load_planes_tail(const uint64_t *base, size_t ps, int32_t W, int32_t sb, int b,
                                 __m256i *Y)
{
    const int nw = W - 4 * sb;
    for (int p = 0; p < b; p++) {
        uint64_t tmp[4] = {0, 0, 0, 0};
        for (int i = 0; i < nw && i < 4; i++) tmp[i] = base[(size_t)p * ps + 4 * (size_t)sb + (size_t)i];
        Y[p] = _mm256_loadu_si256((const __m256i *)tmp);
    }
}

/* ------------------------------------------------------------------ SPARSE superblocks */

INL uint64_t load64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Kept planes of the current SPARSE row: plane p starts at kp0 + p * kstride bytes. The compact
 * stream is read with unaligned 8-byte loads that may run up to 8 bytes past the row's Wk words
 * (never more: the mask's popcount is checked against Wk * 64 first); for any row but the
 * buffer's last that is inside the next row, the last row is read from a copy padded with 2
 * zero words. */
typedef struct {
    const uint8_t *kp0;
    size_t kstride;
    uint64_t *lastrow; /* b * (Wk + 2) words */
    size_t limit;      /* Wk * 64: kept fields per row */
} kept_rows;

static int kept_rows_init(const spfq_prepared *w, kept_rows *kr)
{
    const int b = w->d.bits;
    const size_t Wk = (size_t)w->d.kept_words, N = (size_t)w->d.n;
    kr->limit = Wk * 64;
    kr->lastrow = calloc((size_t)b * (Wk + 2), 8);
    if (!kr->lastrow) return 0;
    for (int p = 0; p < b; p++)
        if (Wk)
            memcpy(kr->lastrow + (size_t)p * (Wk + 2), w->d.planes + ((size_t)p * N + N - 1) * Wk,
                   Wk * 8);
    return 1;
}

/* Point kr at row n. */
static void kept_rows_set(const spfq_prepared *w, kept_rows *kr, int32_t n)
{
    const size_t Wk = (size_t)w->d.kept_words, N = (size_t)w->d.n;
    if ((size_t)n == N - 1 || Wk == 0) { /* Wk == 0: planes may be NULL; nothing is read */
        kr->kp0 = (const uint8_t *)kr->lastrow;
        kr->kstride = (Wk + 2) * 8;
    } else {
        kr->kp0 = (const uint8_t *)(w->d.planes + (size_t)n * Wk);
        kr->kstride = N * Wk * 8;
    }
}

/* One superblock of a SPARSE row after phase 1: its 4 mask words and b dense field planes. */
typedef struct {
    uint64_t m[4];
    uint64_t d[8][4];
} sb_slot;

/* Phase 1 for one superblock of a SPARSE row, given its 4 mask words: scatter the row's next
 * compact fields to their columns with pdep (*pos: compact index of the superblock's first kept
 * code, advanced past it). A zero mask word consumes no field and deposits zeros (its load is
 * harmless and in bounds), so no data-dependent branch is taken for it. Returns 0, before any
 * load, if the fields would run past the row's Wk * 64 (a corrupt mask). */
INL TGT int sparse_expand4(const uint64_t *mw, const kept_rows *kr, int b, size_t *pos,
                           sb_slot *slot)
{
    const uint8_t *kp0 = kr->kp0;
    const size_t ks = kr->kstride;
    unsigned cnt[4];
    for (int i = 0; i < 4; i++) cnt[i] = (unsigned)_mm_popcnt_u64(mw[i]);
    size_t ps = *pos;
    if (ps + cnt[0] + cnt[1] + cnt[2] + cnt[3] > kr->limit) return 0;
    for (int i = 0; i < 4; i++) {
        const uint64_t m = mw[i];
        const uint8_t *src = kp0 + (ps >> 3);
        const unsigned sh = (unsigned)(ps & 7);
        slot->m[i] = m;
        if (sh + cnt[i] <= 64) {
            for (int p = 0; p < b; p++)
                slot->d[p][i] = _pdep_u64(load64(src + (size_t)p * ks) >> sh, m);
        } else {
            for (int p = 0; p < b; p++)
                slot->d[p][i] = _pdep_u64((load64(src + (size_t)p * ks) >> sh) |
                                              (load64(src + (size_t)p * ks + 8) << (64 - sh)), m);
        }
        ps += cnt[i];
    }
    *pos = ps;
    return 1;
}

/* Phase 1 for a whole SPARSE row n: slots[sb] and used[sb] (0: all 4 mask words zero, nothing
 * read or written for that superblock). Returns 0 on a corrupt row (more set mask bits than
 * kept fields); the caller then hands the row to the portable version. */
INL TGT int sparse_expand_row(const spfq_prepared *w, int32_t n, kept_rows *kr, int b,
                              sb_slot *slots, uint8_t *used)
{
    const int32_t W = w->words;
    const uint64_t *mrow = w->d.mask + (size_t)n * (size_t)W;
    size_t pos = 0;
    int32_t sb = 0;
    kept_rows_set(w, kr, n);
    for (; 4 * sb + 4 <= W; sb++) {
        const uint64_t *mw = mrow + 4 * (size_t)sb;
        used[sb] = (mw[0] | mw[1] | mw[2] | mw[3]) != 0;
        if (used[sb] && !sparse_expand4(mw, kr, b, &pos, &slots[sb])) return 0;
    }
    if (4 * sb < W) {
        uint64_t mw[4] = {0, 0, 0, 0};
        for (int i = 0; 4 * sb + i < W; i++) mw[i] = mrow[4 * sb + i];
        used[sb] = (mw[0] | mw[1] | mw[2] | mw[3]) != 0;
        if (used[sb] && !sparse_expand4(mw, kr, b, &pos, &slots[sb])) return 0;
    }
    return 1;
}

/* Phase 2: PLANES offset-code planes u = c + 2^(b-1) from the mask M, sign plane s and magnitude
 * planes m_j: masked columns u = 2^(b-1) (c = 0); negative u = ~mag; positive
 * u = 2^(b-1) + 1 + mag, the increment bit-sliced (inc_j = m_j ^ carry, carry &= m_j). */
INL TGT void sparse_uplanes(const sb_slot *slot, int b, __m256i *Y)
{
    const __m256i ones = _mm256_set1_epi32(-1);
    const __m256i Mv = _mm256_loadu_si256((const __m256i *)slot->m);
    const __m256i s = _mm256_loadu_si256((const __m256i *)slot->d[0]);
    __m256i carry = ones;
    for (int j = 0; j + 1 < b; j++) {
        __m256i mj = _mm256_loadu_si256((const __m256i *)slot->d[j + 1]);
        __m256i inc = _mm256_xor_si256(mj, carry);
        Y[j] = _mm256_and_si256(Mv, _mm256_xor_si256(inc, _mm256_andnot_si256(carry, s)));
        carry = _mm256_and_si256(mj, carry);
    }
    Y[b - 1] = _mm256_xor_si256(s, ones);
}

/* ------------------------------------------------------------------ per-call context */

typedef struct {
    luts L;
    const void *xp;       /* permuted activations: int8 or float, (M, nsb*256) */
    const int32_t *sbsum; /* int8: per-superblock activation sums (M, nsb) */
    const int32_t *xsum;  /* int8: row sums (M) */
    kept_rows kr;
    uint8_t *ubuf;        /* one decoded row: nsb * 256 U bytes */
    uint8_t *used;        /* nsb flags */
    float *wbuf;          /* f32: one row of weight values, nsb * 256 */
    sb_slot *slots;       /* SPARSE phase 1 output for one row: nsb slots */
} intb_ctx;

/* ------------------------------------------------------------------ row decode to scratch */

INL TGT void store_u(const __m256i *Y, const luts *L, int b, uint8_t *ub)
{
    __m256i U[8];
    decode_sb(Y, L, b, U);
    for (int t = 0; t < 8; t++) _mm256_storeu_si256((__m256i *)(ub + 32 * t), U[t]);
}

/* Decode row n into ctx->ubuf (superblock order) and ctx->used (0: all-zero SPARSE superblock,
 * not written). Returns 0 on a corrupt SPARSE row. */
INL TGT int decode_row(const spfq_prepared *w, int32_t n, int sparse, int b, intb_ctx *ctx)
{
    const int32_t W = w->words, nsb = (W + 3) / 4;
    __m256i Y[8];
    if (!sparse) {
        const uint64_t *base = w->d.planes + (size_t)n * (size_t)W;
        const size_t pstride = (size_t)w->d.n * (size_t)W;
        for (int32_t sb = 0; sb < nsb; sb++) {
            if (4 * sb + 4 <= W)
                load_planes(base, pstride, W, sb, b, Y);
            else
                load_planes_tail(base, pstride, W, sb, b, Y);
            store_u(Y, &ctx->L, b, ctx->ubuf + (size_t)sb * 256);
            ctx->used[sb] = 1;
        }
        return 1;
    }
    if (!sparse_expand_row(w, n, &ctx->kr, b, ctx->slots, ctx->used)) return 0;
    for (int32_t sb = 0; sb < nsb; sb++) {
        if (!ctx->used[sb]) continue;
        sparse_uplanes(&ctx->slots[sb], b, Y);
        store_u(Y, &ctx->L, b, ctx->ubuf + (size_t)sb * 256);
    }
    return 1;
}

/* ------------------------------------------------------------------ int8 kernels */

INL TGT void store_i8(const spfq_job *job, int32_t m, int32_t n, int b, int32_t su, int32_t ss,
                      int32_t xsum)
{
    const size_t o = (size_t)m * (size_t)job->w->d.n + (size_t)n;
    int32_t c = (int32_t)((uint32_t)su - (uint32_t)xsum * (uint32_t)(1 << (b - 1)));
    if (job->acc_c) job->acc_c[o] = c;
    if (job->acc_s) job->acc_s[o] = b == 2 ? c : (int32_t)((uint32_t)ss - (uint32_t)xsum);
}

/* M == 1: decode and accumulate in registers (weights streamed once, nothing stored). */
INL TGT void i8_m1(const spfq_job *job, int32_t n0, int32_t n1, int sparse, int b, int ws,
                   intb_ctx *ctx)
{
    const spfq_prepared *w = job->w;
    const int32_t W = w->words, nsb = (W + 3) / 4;
    const size_t pstride = (size_t)w->d.n * (size_t)W;
    const int8_t *xp = (const int8_t *)ctx->xp;
    const luts *L = &ctx->L;
    for (int32_t n = n0; n < n1; n++) {
        __m256i accu = _mm256_setzero_si256(), accs = accu, Y[8];
        int32_t used_sum = ctx->xsum[0];
        if (!sparse) {
            const uint64_t *base = w->d.planes + (size_t)n * (size_t)W;
            for (int32_t sb = 0; sb < W / 4; sb++) {
                load_planes(base, pstride, W, sb, b, Y);
                dot_sb(Y, xp + (size_t)sb * 256, L, b, ws, &accu, &accs);
            }
            if (W % 4) {
                load_planes_tail(base, pstride, W, W / 4, b, Y);
                dot_sb(Y, xp + (size_t)(W / 4) * 256, L, b, ws, &accu, &accs);
            }
        } else {
            if (!sparse_expand_row(w, n, &ctx->kr, b, ctx->slots, ctx->used)) {
                spfq_sparse_i8_c(job, n, n + 1);
                continue;
            }
            used_sum = 0;
            for (int32_t s = 0; s < nsb; s++) {
                if (!ctx->used[s]) continue;
                used_sum += ctx->sbsum[s];
                sparse_uplanes(&ctx->slots[s], b, Y);
                dot_sb(Y, xp + (size_t)s * 256, L, b, ws, &accu, &accs);
            }
        }
        store_i8(job, 0, n, b, hsum32(accu), hsum32(accs), used_sum);
    }
}

/* MB activation rows against one decoded superblock (b <= 4); int16 partial sums per row over
 * the superblock's 8 vectors (same bounds as dot_sb), widened into accu[i] / accs[i]. */
INL TGT void dot_sb_u_mb(const uint8_t *ub, const int8_t *const *xs, const luts *L, int b, int ws,
                         int MB, __m256i *accu, __m256i *accs)
{
    const __m256i one16 = _mm256_set1_epi16(1);
    const int wants = b > 2 && ws;
    __m256i pc[4], ps[4];
    for (int i = 0; i < MB; i++) pc[i] = ps[i] = _mm256_setzero_si256();
#pragma GCC unroll 1
    for (int t = 0; t < 8; t++) {
        const __m256i u = _mm256_loadu_si256((const __m256i *)(ub + 32 * t));
        const __m256i s = wants ? _mm256_shuffle_epi8(L->s1, u) : u;
        for (int i = 0; i < MB; i++) {
            const __m256i x = ldx(xs[i] + 32 * t);
            pc[i] = _mm256_add_epi16(pc[i], _mm256_maddubs_epi16(u, x));
            if (wants) ps[i] = _mm256_add_epi16(ps[i], _mm256_maddubs_epi16(s, x));
        }
    }
    for (int i = 0; i < MB; i++) {
        accu[i] = _mm256_add_epi32(accu[i], _mm256_madd_epi16(pc[i], one16));
        if (wants) accs[i] = _mm256_add_epi32(accs[i], _mm256_madd_epi16(ps[i], one16));
    }
}

/* M > 1: decode a row once into ubuf, then dot the activation rows with it, 4 at a time for
 * b <= 4 (each weight vector load and sign lookup serves 4 rows). */
INL TGT void i8_mm(const spfq_job *job, int32_t n0, int32_t n1, int sparse, int b, int ws,
                   intb_ctx *ctx)
{
    const spfq_prepared *w = job->w;
    const int32_t W = w->words, nsb = (W + 3) / 4, M = job->m;
    const size_t xrow = (size_t)nsb * 256;
    const int8_t *xp = (const int8_t *)ctx->xp;
    enum { MB = 4 };
    for (int32_t n = n0; n < n1; n++) {
        if (!decode_row(w, n, sparse, b, ctx)) {
            spfq_sparse_i8_c(job, n, n + 1);
            continue;
        }
        int32_t m = 0;
        if (b <= 4) {
            for (; m + MB <= M; m += MB) {
                __m256i accu[MB], accs[MB];
                int32_t used_sum[MB];
                const int8_t *xs[MB];
                for (int i = 0; i < MB; i++) {
                    accu[i] = accs[i] = _mm256_setzero_si256();
                    used_sum[i] = 0;
                }
                for (int32_t sb = 0; sb < nsb; sb++) {
                    if (!ctx->used[sb]) continue;
                    for (int i = 0; i < MB; i++) {
                        xs[i] = xp + (size_t)(m + i) * xrow + (size_t)sb * 256;
                        used_sum[i] += ctx->sbsum[(size_t)(m + i) * (size_t)nsb + (size_t)sb];
                    }
                    dot_sb_u_mb(ctx->ubuf + (size_t)sb * 256, xs, &ctx->L, b, ws, MB, accu, accs);
                }
                for (int i = 0; i < MB; i++)
                    store_i8(job, m + i, n, b, hsum32(accu[i]), hsum32(accs[i]),
                             sparse ? used_sum[i] : ctx->xsum[m + i]);
            }
        }
        for (; m < M; m++) {
            const int8_t *xm = xp + (size_t)m * xrow;
            const int32_t *sbs = ctx->sbsum + (size_t)m * (size_t)nsb;
            __m256i accu = _mm256_setzero_si256(), accs = accu;
            int32_t used_sum = 0;
            for (int32_t sb = 0; sb < nsb; sb++) {
                if (!ctx->used[sb]) continue;
                used_sum += sbs[sb];
                dot_sb_u(ctx->ubuf + (size_t)sb * 256, xm + (size_t)sb * 256, &ctx->L, b, ws, &accu,
                         &accs);
            }
            store_i8(job, m, n, b, hsum32(accu), hsum32(accs), sparse ? used_sum : ctx->xsum[m]);
        }
    }
}

/* ------------------------------------------------------------------ float kernels */

/* Turn one decoded superblock (U bytes) into float weights value(c), computed like
 * CompressedLayer.dequantize: c * scale, or sign(c) * (lam + (|c| - 1) * scale). */
INL TGT void values_sb(const uint8_t *u, float *out, int b, __m256 s, __m256 lamv, int has_lam)
{
    const __m256i H = _mm256_set1_epi8((char)(1 << (b - 1)));
    const __m256 onef = _mm256_set1_ps(1.0f), signbit = _mm256_set1_ps(-0.0f);
    for (int t = 0; t < 8; t++) {
        __m256i c = _mm256_sub_epi8(_mm256_loadu_si256((const __m256i *)(u + 32 * t)), H);
        __m128i h[2] = {_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1)};
        for (int q = 0; q < 4; q++) {
            __m128i src = (q & 1) ? _mm_srli_si128(h[q >> 1], 8) : h[q >> 1];
            __m256 cf = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(src));
            __m256 v;
            if (!has_lam) {
                v = _mm256_mul_ps(cf, s);
            } else {
                __m256 af = _mm256_andnot_ps(signbit, cf);
                v = _mm256_add_ps(lamv, _mm256_mul_ps(_mm256_sub_ps(af, onef), s));
                v = _mm256_xor_ps(v, _mm256_and_ps(cf, signbit));
                v = _mm256_and_ps(v, _mm256_cmp_ps(cf, _mm256_setzero_ps(), _CMP_NEQ_OQ));
            }
            _mm256_storeu_ps(out + 32 * t + 8 * q, v);
        }
    }
}

INL TGT void f32_rows(const spfq_job *job, int32_t n0, int32_t n1, int sparse, int b, intb_ctx *ctx)
{
    const spfq_prepared *w = job->w;
    const int32_t W = w->words, nsb = (W + 3) / 4, M = job->m, N = w->d.n;
    const float *xp = (const float *)ctx->xp;
    float *wbuf = ctx->wbuf;
    for (int32_t n = n0; n < n1; n++) {
        if (!decode_row(w, n, sparse, b, ctx)) {
            spfq_sparse_f32_c(job, n, n + 1);
            continue;
        }
        const float sc = w->d.scale[n];
        const float lam = w->d.lam ? w->d.lam[n] : sc;
        const __m256 s = _mm256_set1_ps(sc), lv = _mm256_set1_ps(lam);
        for (int32_t sb = 0; sb < nsb; sb++)
            if (ctx->used[sb])
                values_sb(ctx->ubuf + (size_t)sb * 256, wbuf + (size_t)sb * 256, b, s, lv,
                          w->d.lam != NULL);
        const float bias = w->d.bias ? w->d.bias[n] : 0.0f;
        for (int32_t m = 0; m < M; m++) {
            const float *xm = xp + (size_t)m * (size_t)nsb * 256;
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int32_t sb = 0; sb < nsb; sb++) {
                if (!ctx->used[sb]) continue;
                const float *xs = xm + (size_t)sb * 256, *ws = wbuf + (size_t)sb * 256;
                for (int j = 0; j < 256; j += 32) {
                    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + j), _mm256_loadu_ps(ws + j), a0);
                    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + j + 8), _mm256_loadu_ps(ws + j + 8), a1);
                    a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + j + 16), _mm256_loadu_ps(ws + j + 16), a2);
                    a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xs + j + 24), _mm256_loadu_ps(ws + j + 24), a3);
                }
            }
            float acc = hsumf(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            job->y[(size_t)m * (size_t)N + (size_t)n] = acc + bias;
        }
    }
}

/* ------------------------------------------------------------------ per-b instances */

/* Each kernel is compiled once per field width so every loop sees a constant b (fully unrolled
 * plane loops, no spills from a giant all-b function). */
#define INTB_INSTANCES(B)                                                                         \
    __attribute__((noinline)) TGT static void i8_m1_b##B(const spfq_job *j, int32_t n0,           \
                                                         int32_t n1, int sp, intb_ctx *c)         \
    {                                                                                             \
        if (j->acc_s)                                                                             \
            i8_m1(j, n0, n1, sp, B, 1, c);                                                        \
        else                                                                                      \
            i8_m1(j, n0, n1, sp, B, 0, c);                                                        \
    }                                                                                             \
    __attribute__((noinline)) TGT static void i8_mm_b##B(const spfq_job *j, int32_t n0,           \
                                                         int32_t n1, int sp, intb_ctx *c)         \
    {                                                                                             \
        if (j->acc_s)                                                                             \
            i8_mm(j, n0, n1, sp, B, 1, c);                                                        \
        else                                                                                      \
            i8_mm(j, n0, n1, sp, B, 0, c);                                                        \
    }                                                                                             \
    __attribute__((noinline)) TGT static void f32_b##B(const spfq_job *j, int32_t n0, int32_t n1, \
                                                       int sp, intb_ctx *c)                       \
    {                                                                                             \
        f32_rows(j, n0, n1, sp, B, c);                                                            \
    }
INTB_INSTANCES(2)
INTB_INSTANCES(3)
INTB_INSTANCES(4)
INTB_INSTANCES(5)
INTB_INSTANCES(6)
INTB_INSTANCES(7)
INTB_INSTANCES(8)

typedef void (*intb_kernel)(const spfq_job *, int32_t, int32_t, int, intb_ctx *);
static const intb_kernel I8_M1[9] = {0, 0, i8_m1_b2, i8_m1_b3, i8_m1_b4, i8_m1_b5, i8_m1_b6,
                                     i8_m1_b7, i8_m1_b8};
static const intb_kernel I8_MM[9] = {0, 0, i8_mm_b2, i8_mm_b3, i8_mm_b4, i8_mm_b5, i8_mm_b6,
                                     i8_mm_b7, i8_mm_b8};
static const intb_kernel F32[9] = {0, 0, f32_b2, f32_b3, f32_b4, f32_b5, f32_b6, f32_b7, f32_b8};

/* ------------------------------------------------------------------ repacked PLANES (RP) */

/* The RP layout of internal.h (rp_cb = 2, 4 or 8). A 64-byte vector is two ymm halves of 8 rows;
 * field f is shifted down and masked (u <= 15), vpmaddubsw against 4 broadcast activation bytes
 * gives int16 pair sums (|.| <= 2 * 15 * 128 = 3840), added in int16 over FLUSH steps
 * (<= 8 additions of 3840 at b <= 4, <= 40 of 768 at b = 2: no overflow), then widened into the
 * int32 row lanes with vpmaddwd(., 1). Byte fields (b = 5..8, u <= 255, whose vpmaddubsw pairs
 * could saturate) are split into their two nibbles, summed apart the same way and joined as
 * lo + 16 hi by vpmaddwd(., 1) + vpmaddwd(., 16): 8-bit 4096 x 576, M = 1 (a decoder's 8-bit
 * lm_head slice) 418 -> 56 us per-row, 4418 -> 63 us with group scales (G = 32; was the
 * per-group route). */
#define RP2_CB_INDEX(CB) ((CB) == 2 ? 0 : (CB) == 4 ? 1 : 2)
#define RP2_MR_MAX(CB) ((CB) == 8 ? 2 : 4)

INL TGT void rp2_block(const uint8_t *wt, int32_t S, const int8_t *x, size_t xstride, int g0,
                       const int CB, const int MR, const int G, int32_t tot[4][32], int add)
{
    /* tot lives in memory (L1): with it in registers next to the int16 sums, MR = 4 needs 16+
     * ymm and the compiler spilled inside the step loop (conv shapes 3136x24x144 ran at 15
     * GMAC/s). A flush every FLUSH steps is one load-add-store per sum vector. */
    const int F = 8 / CB, KSTEP = 4 * F, FLUSH = CB == 8 ? 8 : CB == 4 ? 4 : 10;
    const __m256i mask = _mm256_set1_epi8((char)(CB == 8 ? 15 : (1 << CB) - 1));
    if (CB == 8) { /* byte codes u <= 255: low and high nibble, sum = lo + 16 hi (G = 1, MR <= 2) */
        const __m256i ones = _mm256_set1_epi16(1), sixteen = _mm256_set1_epi16(16);
        for (int32_t s0 = 0; s0 < S; s0 += FLUSH) {
            const int32_t s1 = S - s0 < FLUSH ? S : s0 + FLUSH;
            __m256i lo[2][2], hi[2][2]; /* [MR][half] int16 sums */
            for (int a = 0; a < MR; a++)
                for (int h = 0; h < 2; h++) lo[a][h] = hi[a][h] = _mm256_setzero_si256();
            for (int32_t s = s0; s < s1; s++) {
                const uint8_t *p = wt + ((size_t)s * 4 + (size_t)g0) * 64;
                __m256i ul[2], uh[2];
                for (int h = 0; h < 2; h++) {
                    const __m256i v = _mm256_load_si256((const __m256i *)(p + h * 32));
                    ul[h] = _mm256_and_si256(v, mask);
                    uh[h] = _mm256_and_si256(_mm256_srli_epi16(v, 4), mask);
                }
                for (int a = 0; a < MR; a++) {
                    int32_t t;
                    memcpy(&t, x + (size_t)a * xstride + (size_t)s * KSTEP, 4);
                    const __m256i xb = _mm256_set1_epi32(t);
                    for (int h = 0; h < 2; h++) {
                        lo[a][h] = _mm256_add_epi16(lo[a][h], _mm256_maddubs_epi16(ul[h], xb));
                        hi[a][h] = _mm256_add_epi16(hi[a][h], _mm256_maddubs_epi16(uh[h], xb));
                    }
                }
            }
            for (int a = 0; a < MR; a++)
                for (int h = 0; h < 2; h++) {
                    __m256i *t = (__m256i *)(tot[a] + h * 8);
                    const __m256i w = _mm256_add_epi32(_mm256_madd_epi16(lo[a][h], ones), _mm256_madd_epi16(hi[a][h], sixteen));
                    _mm256_store_si256(t, s0 || add ? _mm256_add_epi32(_mm256_load_si256(t), w) : w);
                }
        }
        return;
    }
    for (int32_t s0 = 0; s0 < S; s0 += FLUSH) {
        const int32_t s1 = S - s0 < FLUSH ? S : s0 + FLUSH;
        __m256i acc[4][2][2];
        for (int a = 0; a < MR; a++)
            for (int g = 0; g < G; g++) acc[a][g][0] = acc[a][g][1] = _mm256_setzero_si256();
        for (int32_t s = s0; s < s1; s++) {
            const uint8_t *p = wt + ((size_t)s * 4 + (size_t)g0) * 64;
            for (int f = 0; f < F; f++) {
                __m256i u[2][2];
                for (int g = 0; g < G; g++)
                    for (int h = 0; h < 2; h++) {
                        const __m256i v = _mm256_load_si256((const __m256i *)(p + g * 64 + h * 32));
                        u[g][h] = _mm256_and_si256(f ? _mm256_srli_epi16(v, f * CB) : v, mask);
                    }
                for (int a = 0; a < MR; a++) {
                    int32_t t;
                    memcpy(&t, x + (size_t)a * xstride + (size_t)s * KSTEP + 4 * f, 4);
                    const __m256i xb = _mm256_set1_epi32(t);
                    for (int g = 0; g < G; g++)
                        for (int h = 0; h < 2; h++)
                            acc[a][g][h] = _mm256_add_epi16(acc[a][g][h], _mm256_maddubs_epi16(u[g][h], xb));
                }
            }
        }
        const __m256i ones = _mm256_set1_epi16(1);
        for (int a = 0; a < MR; a++)
            for (int g = 0; g < G; g++)
                for (int h = 0; h < 2; h++) {
                    __m256i *t = (__m256i *)(tot[a] + g * 16 + h * 8);
                    const __m256i w = _mm256_madd_epi16(acc[a][g][h], ones);
                    _mm256_store_si256(t, s0 || add ? _mm256_add_epi32(_mm256_load_si256(t), w) : w);
                }
    }
}

/* One 64-row tile from row t0 x MR (1..4) activation rows: acc_c of rows [lo, hi). */
INL TGT void rp2_tile(const spfq_job *j, const uint8_t *wt, const int8_t *x, size_t xstride,
                      const int32_t *xs, int32_t m, int32_t t0, int32_t lo, int32_t hi,
                      const int CB, const int MR)
{
    const int G = MR == 1 && CB != 8 ? 2 : 1;
    const int32_t N = j->w->d.n, S = j->w->rp_steps, off = j->w->rp_off;
    int32_t tot[4][32] __attribute__((aligned(32)));
    for (int g0 = 0; g0 < 4; g0 += G) {
        const int32_t r0 = t0 + g0 * 16;
        if (r0 >= hi || r0 + G * 16 <= lo) continue;
        if (S == 0) memset(tot, 0, sizeof tot);
        rp2_block(wt, S, x, xstride, g0, CB, MR, G, tot, 0);
        const int32_t a0 = r0 > lo ? r0 : lo, a1 = r0 + G * 16 < hi ? r0 + G * 16 : hi;
        for (int a = 0; a < MR; a++) {
            const __m256i c = _mm256_set1_epi32(off * xs[m + a]);
            int32_t *dst = j->acc_c + (size_t)(m + a) * (size_t)N;
            if (a0 == r0 && a1 == r0 + G * 16) { /* every row wanted: vector stores, no copy */
                for (int q = 0; q < 2 * G; q++)
                    _mm256_storeu_si256((__m256i *)(dst + r0 + 8 * q),
                                        _mm256_sub_epi32(_mm256_load_si256((const __m256i *)(tot[a] + 8 * q)), c));
                continue;
            }
            const int32_t cs = off * xs[m + a];
            for (int32_t r = a0; r < a1; r++) dst[r] = tot[a][r - r0] - cs;
        }
    }
}

#define RP2_TILE_FN(CB, MR)                                                                        \
    __attribute__((noinline)) TGT static void rp2_tile_##CB##_##MR(                               \
        const spfq_job *j, const uint8_t *wt, const int8_t *x, size_t xst, const int32_t *xs,      \
        int32_t m, int32_t t0, int32_t lo, int32_t hi)                                             \
    {                                                                                              \
        rp2_tile(j, wt, x, xst, xs, m, t0, lo, hi, CB, MR);                                        \
    }
RP2_TILE_FN(2, 1) RP2_TILE_FN(2, 2) RP2_TILE_FN(2, 3) RP2_TILE_FN(2, 4)
RP2_TILE_FN(4, 1) RP2_TILE_FN(4, 2) RP2_TILE_FN(4, 3) RP2_TILE_FN(4, 4)
RP2_TILE_FN(8, 1) RP2_TILE_FN(8, 2) /* byte fields: at most 2 activation rows per pass */

typedef void (*rp2_tile_fn)(const spfq_job *, const uint8_t *, const int8_t *, size_t, const int32_t *,
                            int32_t, int32_t, int32_t, int32_t);

/* Sum of each int8 row of x (M rows of K): sum(x) = sum(x ^ 0x80) - 128 K, the biased bytes
 * summed 8 at a time by vpsadbw. Exact, so the callers' results do not change. */
TGT static void row_sums_i8(const int8_t *x, int32_t M, int32_t K, int32_t *out)
{
    const __m256i bias = _mm256_set1_epi8((char)0x80), zero = _mm256_setzero_si256();
    for (int32_t m = 0; m < M; m++) {
        const int8_t *row = x + (size_t)m * (size_t)K;
        __m256i acc = zero;
        int32_t k = 0;
        for (; k + 32 <= K; k += 32)
            acc = _mm256_add_epi64(acc, _mm256_sad_epu8(_mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(row + k)), bias), zero));
        __m128i a = _mm_add_epi64(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
        if (k + 16 <= K) {
            a = _mm_add_epi64(a, _mm_sad_epu8(_mm_xor_si128(_mm_loadu_si128((const __m128i *)(row + k)),
                                                            _mm256_castsi256_si128(bias)), _mm_setzero_si128()));
            k += 16;
        }
        int32_t sum = (int32_t)(_mm_cvtsi128_si64(a) + _mm_extract_epi64(a, 1)) - 128 * k;
        for (; k < K; k++) sum += row[k];
        out[m] = sum;
    }
}

/* acc_c only, from the RP codes (rp_cb 2 / 4); returns 0 when it cannot run (then the plane
 * path does the work). */
TGT static int planes_rp2(const spfq_job *j, int32_t n0, int32_t n1)
{
    const spfq_prepared *w = j->w;
    if (!w->rp || (w->rp_cb != 2 && w->rp_cb != 4 && w->rp_cb != 8) || w->rp_mul != 1) return 0;
    const int CB = w->rp_cb, KSTEP = 4 * (8 / CB);
    const int32_t M = j->m, K = w->d.k, S = w->rp_steps;
    const size_t Kp = (size_t)S * (size_t)KSTEP;
    int32_t *xs = malloc((size_t)M * sizeof(int32_t));
    int8_t *pad = Kp != (size_t)K ? malloc((size_t)M * Kp) : NULL;
    if (!xs || (Kp != (size_t)K && !pad)) {
        free(xs);
        free(pad);
        return 0;
    }
    row_sums_i8(j->xq, M, K, xs);
    for (int32_t m = 0; pad && m < M; m++) {
        memcpy(pad + (size_t)m * Kp, j->xq + (size_t)m * (size_t)K, (size_t)K);
        memset(pad + (size_t)m * Kp + K, 0, Kp - (size_t)K);
    }
    const int8_t *x = pad ? pad : j->xq;
    static const rp2_tile_fn fns[3][4] = {{rp2_tile_2_1, rp2_tile_2_2, rp2_tile_2_3, rp2_tile_2_4},
                                          {rp2_tile_4_1, rp2_tile_4_2, rp2_tile_4_3, rp2_tile_4_4},
                                          {rp2_tile_8_1, rp2_tile_8_2, NULL, NULL}};
    const int32_t mr_max = RP2_MR_MAX(CB);
    for (int32_t t = n0 / 64; t * 64 < n1; t++) {
        const uint8_t *wt = w->rp + (size_t)t * (size_t)S * 256;
        const int32_t lo = n0 > t * 64 ? n0 : t * 64, hi = n1 < t * 64 + 64 ? n1 : t * 64 + 64;
        for (int32_t m = 0; m < M;) {
            const int32_t mr = M - m >= mr_max ? mr_max : M - m;
            fns[RP2_CB_INDEX(CB)][mr - 1](j, wt, x + (size_t)m * Kp, Kp, xs, m, t * 64, lo, hi);
            m += mr;
        }
    }
    free(xs);
    free(pad);
    return 1;
}

/* ------------------------------------------------------------------ fused RP (tall M) */

/* Tall calls (a conv's pixels x its output channels, api.c's row-block driver) with the epilogue
 * fused: each 16-row group x MR activation rows goes from int16/int32 sums in registers / L1
 * straight to y = clamp(xscale * (scale * acc) + bias), the same expression (and rounding) as
 * api.c's i8_finish, so no int32 (M, N) buffer is written and read back. The driver hands x zero
 * padded to whole RP steps (row stride j->xstride). */
/* tot is written before it is read (rp2_block's first flush stores unless add), which GCC 12
 * cannot see through the add flag */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
INL TGT void rp2_fused_rows(const spfq_job *j, const int32_t *xs, int32_t m, int32_t n0, int32_t n1,
                            const int CB, const int MR)
{
    const spfq_prepared *w = j->w;
    const int32_t N = w->d.n, S = w->rp_steps, off = w->rp_off;
    const float lo = w->clamped ? w->clamp_lo : -INFINITY, hi = w->clamped ? w->clamp_hi : INFINITY;
    const size_t xstride = (size_t)j->xstride;
    const int8_t *x = j->xq + (size_t)m * xstride;
    int32_t tot[4][32] __attribute__((aligned(32)));
    for (int32_t r0 = n0; r0 < n1; r0 += 16) {
        const uint8_t *wt = w->rp + (size_t)(r0 / 64) * (size_t)S * 256;
        const int g = (r0 % 64) / 16;
        if (S) rp2_block(wt, S, x, xstride, g, CB, MR, 1, tot, 0);
        else memset(tot, 0, sizeof tot);
        const int32_t rows = n1 - r0 < 16 ? n1 - r0 : 16;
        static const float zeros[16];
        float scp[16], bip[16]; /* a partial last group: the rows past N read zeros */
        const float *sc = w->d.scale + r0, *bi = w->d.bias ? w->d.bias + r0 : zeros;
        if (rows < 16) {
            memset(scp, 0, sizeof scp);
            memset(bip, 0, sizeof bip);
            memcpy(scp, sc, (size_t)rows * sizeof(float));
            if (w->d.bias) memcpy(bip, bi, (size_t)rows * sizeof(float));
            sc = scp;
            bi = bip;
        }
        const __m256 vlo = _mm256_set1_ps(lo), vhi = _mm256_set1_ps(hi);
        for (int a = 0; a < MR; a++) {
            const __m256i c = _mm256_set1_epi32(off * xs[m + a]);
            const __m256 vx = _mm256_set1_ps(j->xscale[m + a]);
            float out[16] __attribute__((aligned(32)));
            float *y = j->y + (size_t)(m + a) * (size_t)N + r0, *dst = rows == 16 ? y : out;
            for (int h = 0; h < 2; h++) {
                const __m256i acc = _mm256_sub_epi32(_mm256_load_si256((const __m256i *)(tot[a] + 8 * h)), c);
                __m256 v = _mm256_mul_ps(_mm256_loadu_ps(sc + 8 * h), _mm256_cvtepi32_ps(acc));
                v = _mm256_add_ps(_mm256_mul_ps(vx, v), _mm256_loadu_ps(bi + 8 * h));
                /* spfq_clamp: max(lo, v) / min(hi, v) return v when it is NaN */
                v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v));
                _mm256_storeu_ps(dst + 8 * h, v);
            }
            if (rows < 16) memcpy(y, out, (size_t)rows * sizeof(float));
        }
    }
}

#define RP2_FUSED_FN(CB, MR)                                                                        \
    __attribute__((noinline)) TGT static void rp2_fused_##CB##_##MR(const spfq_job *j, const int32_t *xs, \
                                                                   int32_t m, int32_t n0, int32_t n1) \
    {                                                                                               \
        rp2_fused_rows(j, xs, m, n0, n1, CB, MR);                                                   \
    }
RP2_FUSED_FN(2, 1) RP2_FUSED_FN(2, 2) RP2_FUSED_FN(2, 3) RP2_FUSED_FN(2, 4)
RP2_FUSED_FN(4, 1) RP2_FUSED_FN(4, 2) RP2_FUSED_FN(4, 3) RP2_FUSED_FN(4, 4)
RP2_FUSED_FN(8, 1) RP2_FUSED_FN(8, 2)
#pragma GCC diagnostic pop

ENTRY int spfq_rp_i8_fused_ok_avx2(const spfq_prepared *w)
{
    return w->rp && (w->rp_cb == 2 || w->rp_cb == 4 || w->rp_cb == 8) && w->rp_mul == 1 && !w->d.lam &&
           (w->d.layout == SPFQ_PLANES || w->d.layout == SPFQ_SIGN_MASK) &&
           __builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2");
}

/* A fused job's activation rows in chunks of MR (<= RP2_MR_MAX), each through the table entry
 * [field width][MR - 1]; xs: the rows' sums (or NULL where the kernel makes its own). */
typedef void (*rp2_rows_fn)(const spfq_job *, const int32_t *, int32_t, int32_t, int32_t);
static void rp2_row_chunks(const spfq_job *j, const rp2_rows_fn fns[3][4], const int32_t *xs, int32_t n0, int32_t n1)
{
    const int32_t mr_max = RP2_MR_MAX(j->w->rp_cb);
    for (int32_t m = 0; m < j->m;) {
        const int32_t mr = j->m - m >= mr_max ? mr_max : j->m - m;
        fns[RP2_CB_INDEX(j->w->rp_cb)][mr - 1](j, xs, m, n0, n1);
        m += mr;
    }
}

ENTRY void spfq_rp_i8_fused_avx2(const spfq_job *j, int32_t n0, int32_t n1)
{
    static const rp2_rows_fn fns[3][4] = {{rp2_fused_2_1, rp2_fused_2_2, rp2_fused_2_3, rp2_fused_2_4},
                                          {rp2_fused_4_1, rp2_fused_4_2, rp2_fused_4_3, rp2_fused_4_4},
                                          {rp2_fused_8_1, rp2_fused_8_2, NULL, NULL}};
    int32_t xs[SPFQ_TALL_ROWS];
    for (int32_t m = 0; m < j->m; m++) row_sums_i8(j->xq + (size_t)m * (size_t)j->xstride, 1, j->w->d.k, xs + m);
    rp2_row_chunks(j, fns, xs, n0, n1);
}

/* ------------------------------------------------------------------ grouped fused RP */

/* Group-wise scales (w->gscale, grouped.c's fused route), the AVX2 form of intb_avx512.c's
 * rp_grouped_rows: per 16-row group, each column group's exact sums (rp2_block over its gsteps
 * steps, tot in L1) become t = xscale * (gscale * acc), added in ascending group order in MR x 2
 * ymm float accumulators from +0.0f; y = clamp(s + bias). */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
INL TGT_F16C void rp2_grouped_rows(const spfq_job *j, int32_t m, int32_t n0, int32_t n1, const int CB, const int MR)
{
    const spfq_prepared *w = j->w;
    const int KSTEP = 4 * (8 / CB);
    const int32_t N = w->d.n, S = w->rp_steps, off = w->rp_off, GS = w->gsteps, NG = w->ngroups;
    const size_t xstride = (size_t)j->xstride;
    const int8_t *x = j->xq + (size_t)m * xstride;
    int32_t xsg[4 * SPFQ_GROUPED_MAX_GROUPS];
    spfq_group_sums(x, xstride, MR, GS * KSTEP, NG, xsg);
    const __m256 vlo = _mm256_set1_ps(w->clamped ? w->clamp_lo : -INFINITY);
    const __m256 vhi = _mm256_set1_ps(w->clamped ? w->clamp_hi : INFINITY);
    int32_t tot[4][32] __attribute__((aligned(32)));
    for (int32_t r0 = n0 / 16 * 16; r0 < n1; r0 += 16) {
        const uint8_t *wt = w->rp + (size_t)(r0 / 64) * (size_t)S * 256;
        const int g = (r0 % 64) / 16;
        __m256 ys[4][2]; /* from +0.0f, as intb_avx512.c's rp_grouped_rows */
        for (int a = 0; a < MR; a++) ys[a][0] = ys[a][1] = _mm256_setzero_ps();
        for (int32_t q = 0; q < NG; q++) {
            const int32_t s0 = q * GS, sq = S - s0 < GS ? S - s0 : GS;
            rp2_block(wt + (size_t)s0 * 256, sq, x + (size_t)s0 * KSTEP, xstride, g, CB, MR, 1, tot, 0);
            const uint16_t *sc = w->gscale + ((size_t)(r0 / 16) * NG + q) * 16;
            for (int a = 0; a < MR; a++) {
                const __m256i c = _mm256_set1_epi32(off * xsg[a * NG + q]);
                const __m256 vx = _mm256_set1_ps(j->xscale[m + a]);
                for (int h = 0; h < 2; h++) {
                    const __m256i acc = _mm256_sub_epi32(_mm256_load_si256((const __m256i *)(tot[a] + 8 * h)), c);
                    const __m256 scv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sc + 8 * h)));
                    ys[a][h] = _mm256_add_ps(ys[a][h], _mm256_mul_ps(vx, _mm256_mul_ps(scv, _mm256_cvtepi32_ps(acc))));
                }
            }
        }
        const int32_t lo = r0 > n0 ? r0 : n0, hi = r0 + 16 < n1 ? r0 + 16 : n1;
        static const float zeros[16];
        float bip[16];
        const float *bi = w->d.bias ? w->d.bias + r0 : zeros;
        if (w->d.bias && (lo > r0 || hi < r0 + 16)) { /* rows outside [n0, n1) (past N) read zeros */
            memset(bip, 0, sizeof bip);
            memcpy(bip + (lo - r0), w->d.bias + lo, (size_t)(hi - lo) * sizeof(float));
            bi = bip;
        }
        for (int a = 0; a < MR; a++) {
            float out[16] __attribute__((aligned(32)));
            for (int h = 0; h < 2; h++) {
                __m256 v = _mm256_add_ps(ys[a][h], _mm256_loadu_ps(bi + 8 * h));
                v = _mm256_min_ps(vhi, _mm256_max_ps(vlo, v)); /* spfq_clamp: NaN v stays */
                _mm256_store_ps(out + 8 * h, v);
            }
            memcpy(j->y + (size_t)(m + a) * (size_t)N + lo, out + (lo - r0), (size_t)(hi - lo) * sizeof(float));
        }
    }
}
#pragma GCC diagnostic pop

#define RP2_GROUPED_FN(CB, MR)                                                                        \
    __attribute__((noinline)) TGT_F16C static void rp2_grouped_##CB##_##MR(const spfq_job *j, const int32_t *xs, \
                                                                           int32_t m, int32_t n0, int32_t n1) \
    {                                                                                                \
        (void)xs; /* group sums are made per chunk */                                                \
        rp2_grouped_rows(j, m, n0, n1, CB, MR);                                                      \
    }
RP2_GROUPED_FN(2, 1) RP2_GROUPED_FN(2, 2) RP2_GROUPED_FN(2, 3) RP2_GROUPED_FN(2, 4)
RP2_GROUPED_FN(4, 1) RP2_GROUPED_FN(4, 2) RP2_GROUPED_FN(4, 3) RP2_GROUPED_FN(4, 4)
RP2_GROUPED_FN(8, 1) RP2_GROUPED_FN(8, 2)

ENTRY int spfq_rp_grouped_ok_avx2(const spfq_prepared *w)
{
    return w->gscale && spfq_rp_i8_fused_ok_avx2(w) && __builtin_cpu_supports("f16c");
}

ENTRY void spfq_rp_grouped_avx2(const spfq_job *j, int32_t n0, int32_t n1)
{
    static const rp2_rows_fn fns[3][4] = {{rp2_grouped_2_1, rp2_grouped_2_2, rp2_grouped_2_3, rp2_grouped_2_4},
                                          {rp2_grouped_4_1, rp2_grouped_4_2, rp2_grouped_4_3, rp2_grouped_4_4},
                                          {rp2_grouped_8_1, rp2_grouped_8_2, NULL, NULL}};
    rp2_row_chunks(j, fns, NULL, n0, n1);
}

ENTRY int spfq_rp_i8_avx2(const spfq_job *j, int32_t n0, int32_t n1, int32_t *acc)
{
    if (!acc || !__builtin_cpu_supports("bmi") || !__builtin_cpu_supports("bmi2")) return 0;
    if (n0 >= n1 || j->m <= 0) return 1;
    spfq_job k = *j;
    k.acc_c = acc;
    k.acc_s = NULL;
    return planes_rp2(&k, n0, n1);
}

/* ------------------------------------------------------------------ drivers */

static void ctx_free(intb_ctx *ctx)
{
    free((void *)ctx->xp);
    free((void *)ctx->sbsum);
    free(ctx->ubuf);
    free(ctx->used);
    free(ctx->wbuf);
    free(ctx->slots);
    free(ctx->kr.lastrow);
}

/* Scratch shared by both operations; returns 0 when an allocation fails. */
TGT static int ctx_init(const spfq_job *job, int sparse, int f32, intb_ctx *ctx)
{
    const spfq_prepared *w = job->w;
    const int32_t M = job->m, K = w->d.k, nsb = (w->words + 3) / 4;
    const size_t nx = (size_t)M * (size_t)nsb * 256;
    memset(ctx, 0, sizeof *ctx);
    build_luts(w->d.bits, &ctx->L);
    ctx->ubuf = malloc((size_t)nsb * 256 + 32);
    ctx->used = malloc((size_t)nsb + 1);
    ctx->slots = sparse ? malloc((size_t)nsb * sizeof(sb_slot) + 1) : NULL;
    int ok = ctx->ubuf && ctx->used && (!sparse || (ctx->slots && kept_rows_init(w, &ctx->kr)));
    if (f32) {
        float *xp = malloc(nx * sizeof(float) + 32);
        ctx->wbuf = malloc((size_t)nsb * 256 * sizeof(float) + 32);
        ctx->xp = xp;
        ok = ok && xp && ctx->wbuf;
        if (ok) permute_f32(job->x, M, K, nsb, xp);
    } else {
        int8_t *xp = malloc(nx + 32);
        int32_t *sums = malloc(((size_t)M * (size_t)nsb + (size_t)M + 1) * sizeof(int32_t));
        ctx->xp = xp;
        ctx->sbsum = sums;
        ok = ok && xp && sums;
        if (ok) {
            ctx->xsum = sums + (size_t)M * (size_t)nsb;
            permute_i8(job->xq, M, K, nsb, xp, sums, (int32_t *)ctx->xsum);
        }
    }
    return ok;
}

ENTRY static void intb_run(const spfq_job *job, int32_t n0, int32_t n1, int sparse, int f32)
{
    const int b = job->w->d.bits;
    const spfq_range_fn portable = f32 ? (sparse ? spfq_sparse_f32_c : spfq_planes_f32_c)
                                       : (sparse ? spfq_sparse_i8_c : spfq_planes_i8_c);
    if (n0 >= n1 || job->m <= 0) return;
    /* the file is compiled for BMI1/BMI2 as well (pdep, shrx): fall back where the CPU lacks them */
    if (b < 2 || b > 8 || !__builtin_cpu_supports("bmi") || !__builtin_cpu_supports("bmi2")) {
        portable(job, n0, n1);
        return;
    }
    if (!sparse && !f32 && !job->acc_s && job->acc_c && planes_rp2(job, n0, n1)) return;
    intb_ctx ctx;
    if (ctx_init(job, sparse, f32, &ctx)) {
        if (f32)
            F32[b](job, n0, n1, sparse, &ctx);
        else
            (job->m == 1 ? I8_M1 : I8_MM)[b](job, n0, n1, sparse, &ctx);
    } else {
        portable(job, n0, n1);
    }
    ctx_free(&ctx);
}

/* ------------------------------------------------------------------ range functions */

ENTRY void spfq_planes_f32_avx2(const spfq_job *j, int32_t n0, int32_t n1) { intb_run(j, n0, n1, 0, 1); }
ENTRY void spfq_planes_i8_avx2(const spfq_job *j, int32_t n0, int32_t n1) { intb_run(j, n0, n1, 0, 0); }
ENTRY void spfq_sparse_f32_avx2(const spfq_job *j, int32_t n0, int32_t n1) { intb_run(j, n0, n1, 1, 1); }
ENTRY void spfq_sparse_i8_avx2(const spfq_job *j, int32_t n0, int32_t n1) { intb_run(j, n0, n1, 1, 0); }

#endif /* __x86_64__ */
