/* intb_avx512.c — AVX-512 (F/BW/VL/VNNI/VBMI/VBMI2 + GFNI, BMI2) kernels for the int b-bit
 * layouts PLANES and SPARSE with int8 activations: identical int32 sums to the portable oracle
 * intb.c for any input (incl. xq = -128 and bit patterns the packer never writes). The float
 * kernels are not defined here: api.c falls back to the AVX2 versions for them.
 *
 * PLANES. The offset codes u = c + 2^(b-1) are rebuilt as 64 bytes per 64-column word, in column
 * order, so the activations are used as they are (no permutation, no scratch rows):
 *   GFNI path: 8 words of each plane are loaded as one vector; per word, one vpermt2b per plane
 *   pair gathers into qword q the plane bytes of columns 8q..8q+7 (plane p at byte 7 - p) and one
 *   gf2p8affineqb against bytes 1 << j transposes each 8x8 bit block, giving u of column 8q + j
 *   in byte j (4 vector ops per 64 weights for b = 4).
 *   Fallback (no GFNI, or SPFQ_AVX512_NO_GFNI set): one masked byte add per plane (kmovq +
 *   vpaddb{k}, u += 1 << p).
 * Then (vpdpbusd: u unsigned, x signed, the 4 products summed into int32 without intermediate
 * saturation, unlike vpmaddubsw):
 *   acc_c = sum dpbusd(u, x) - 2^(b-1) * sum(x)
 *   acc_s = sum dpbusd(s1, x) - sum(x),   s1 = sign(c) + 1 = min(subs_epu8(u, 2^(b-1) - 1), 2)
 * (acc_s is computed for b = 2 as well, so a u = 0 code gives the oracle's -1.) The last word's
 * activations are read with a byte-masked load, partial 8-word plane blocks with qword-masked
 * loads: nothing past K or past the buffers is read. sum(x) per activation row: once per call.
 * Weights are decoded once per output row per 4 activation rows (remainder rows one at a time);
 * single rows alternate two accumulator sets over words to hide the vpdpbusd latency; 4-row
 * chunks without sign sums take two output rows per pass (halves the activation loads).
 *
 * PLANES from the prepare-time repack (used whenever only acc_c is wanted, i.e. spfq_matmul_i8
 * without lam, and w->rp exists; acc_s requests take the plane-decoding path above). Method:
 * offset codes u interleaved across 16 rows (layout "RP" in internal.h, built once by
 * spfq_planes_repack): a 64-byte vector is 16 rows x 4 columns per field, one int32 lane per
 * output row, so one vpdpbusd against 4 broadcast activation bytes (vpbroadcastd from memory)
 * is 64 MACs and the accumulators need no horizontal reduction. Fields are not shifted out:
 * field f is isolated in place by one vpand (u << f*rp_cb, still a u8: <= 192 for b = 2, <= 240
 * for b = 3..4; b = 5..8 are whole bytes, no vpand), its sum is a multiple of 2^(f*rp_cb) and
 * is shifted back exactly (vpsrad) every 16384 columns, which also bounds the int32 partial
 * sums (|sum| <= 16384 * 255 * 128 < 2^31). So 2 ops (vpand + vpdpbusd) per 64 weights at
 * b = 2..4 instead of the ~4-6 decode ops of the plane path, and no per-call decoding: 4-bit
 * 4096 x 4096 M = 1 0.235 -> 0.10 ms, 2-bit 0.19 -> 0.058 ms (single thread, this machine).
 * Why not T-MAC-style lookup tables: with VNNI a table lookup (vpshufb / vpermb) plus its
 * accumulate costs at least as many ops per weight as vpand + vpdpbusd, and the tables must be
 * rebuilt per activation row; the repacked dot product is already near the memory roofline.
 * Tiles of 64 rows x MR (1..4) activation rows; with M = 1 all four 16-row groups run together
 * (8 / 16 independent accumulators at b = 4 / 2 hide the vpdpbusd latency, one weight stream);
 * activations are zero padded to whole steps per call (rows of K % kstep != 0 only).
 *
 * SPARSE. Per row and mask word mw (compact position pos = set mask bits of the row's earlier
 * words, cnt = popcount(mw)), the 64 fields from pos on are rebuilt as bytes and placed at their
 * columns by vpexpandb (VBMI2), which is what AVX2 lacked (it deposits each plane with pdep):
 *   GFNI path: the row's kept words are first transposed into kt[q] (qword lane p = plane p's
 *   word q, kt[Wk] = 0), so the fields at pos are vpshrdvq(kt[q], kt[q+1], pos & 63), one vpermb
 *   and one gf2p8affineqb away; a vpermt2b table (two for b = 8) maps each field to u = c + 128
 *   (c as the oracle's int8 code, so a b = 8 magnitude of 128 wraps to -128 as there), and
 *   vpexpandb merging 128 (c = 0) into the pruned columns places them; acc_c = sum dpbusd(u, x)
 *   - 128 * (sum of x over the processed words, precomputed per word), acc_s via s1 as above.
 *   Fallback: per plane a funnel-shifted scalar read + kmovq + vpaddb{k}, magnitudes and fields
 *   expanded, acc_c = dpbusd(mag on positive) - dpbusd(mag on negative), likewise acc_s.
 * The expand mask is pdep(valid, mw) with valid = min(cnt, Wk * 64 - pos): fields past the row's
 * kept words (a corrupt mask) count as 0 and are never read, as in the oracle. All-zero mask
 * words are skipped. Cost is per mask word (vpexpandb is the most expensive op on Zen 4), so
 * time falls only slowly with sparsity.
 *
 * Each kernel is instantiated per b (constant plane loops). Scratch (sum(x), kt, per-word x sums)
 * is on the stack or malloc'ed per call (no writable globals); if malloc fails the portable
 * kernel runs. Requires the dispatcher's avx512 subset plus VBMI2 and BMI2 (checked here at run
 * time; without them the portable kernels run); GFNI is optional (checked at run time).
 */
#if defined(__x86_64__)

#include <immintrin.h>
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define TGT                                                                                  \
    __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,avx512vbmi2,"    \
                          "avx512vpopcntdq,avx512bitalg,bmi2,popcnt,fma,gfni")))
#define INL static inline __attribute__((always_inline))

/* ------------------------------------------------------------------ decode helpers */

/* u bytes (column order) of one word from b plane words base[p * stride]. */
INL TGT __m512i planes_u(const uint64_t *base, size_t stride, int b)
{
    __m512i u = _mm512_setzero_si512();
    for (int p = 0; p < b; p++)
        u = _mm512_mask_add_epi8(u, _cvtu64_mask64(base[(size_t)p * stride]), u,
                                 _mm512_set1_epi8((char)(1 << p)));
    return u;
}

INL TGT __m512i sign1(__m512i u, int b)
{
    return _mm512_min_epu8(_mm512_subs_epu8(u, _mm512_set1_epi8((char)((1 << (b - 1)) - 1))),
                           _mm512_set1_epi8(2));
}

INL TGT int32_t hsum(__m512i a) { return _mm512_reduce_add_epi32(a); }

/* ------------------------------------------------------------------ PLANES */

/* Rows n0..n1, activation rows [m0, m1) in chunks of MB ((m1 - m0) % MB == 0). */
INL TGT void planes_rows(const spfq_job *job, int32_t n0, int32_t n1, int32_t m0, int32_t m1,
                         const int32_t *xsum, int b, int MB, int ws)
{
    const spfq_prepared *w = job->w;
    const int32_t N = w->d.n, K = w->d.k, W = w->words;
    const size_t stride = (size_t)N * (size_t)W;
    const __mmask64 tail = (K & 63) ? (__mmask64)((1ull << (K & 63)) - 1) : ~(__mmask64)0;
    const int32_t nfull = W - 1; /* words before the last (always full) */
    for (int32_t n = n0; n < n1; n++) {
        const uint64_t *base = w->d.planes + (size_t)n * (size_t)W;
        for (int32_t m = m0; m < m1; m += MB) {
            __m512i ac0[4], ac1[4], as0[4], as1[4];
            const int8_t *xr[4];
            for (int i = 0; i < MB; i++) {
                ac0[i] = ac1[i] = as0[i] = as1[i] = _mm512_setzero_si512();
                xr[i] = job->xq + (size_t)(m + i) * (size_t)K;
            }
            int32_t wd = 0;
            for (; wd + 2 <= nfull; wd += 2) {
                const __m512i u0 = planes_u(base + wd, stride, b);
                const __m512i u1 = planes_u(base + wd + 1, stride, b);
                const __m512i s0 = ws ? sign1(u0, b) : u0, s1 = ws ? sign1(u1, b) : u1;
                for (int i = 0; i < MB; i++) {
                    const __m512i x0 = _mm512_loadu_si512(xr[i] + (size_t)wd * 64);
                    const __m512i x1 = _mm512_loadu_si512(xr[i] + (size_t)wd * 64 + 64);
                    ac0[i] = _mm512_dpbusd_epi32(ac0[i], u0, x0);
                    ac1[i] = _mm512_dpbusd_epi32(ac1[i], u1, x1);
                    if (ws) {
                        as0[i] = _mm512_dpbusd_epi32(as0[i], s0, x0);
                        as1[i] = _mm512_dpbusd_epi32(as1[i], s1, x1);
                    }
                }
            }
            for (; wd < W; wd++) {
                const __m512i u = planes_u(base + wd, stride, b);
                const __m512i s = ws ? sign1(u, b) : u;
                const __mmask64 km = wd == W - 1 ? tail : ~(__mmask64)0;
                for (int i = 0; i < MB; i++) {
                    const __m512i x = _mm512_maskz_loadu_epi8(km, xr[i] + (size_t)wd * 64);
                    ac0[i] = _mm512_dpbusd_epi32(ac0[i], u, x);
                    if (ws) as0[i] = _mm512_dpbusd_epi32(as0[i], s, x);
                }
            }
            for (int i = 0; i < MB; i++) {
                const size_t o = (size_t)(m + i) * (size_t)N + (size_t)n;
                const uint32_t xs = (uint32_t)xsum[m + i];
                const uint32_t c = (uint32_t)hsum(_mm512_add_epi32(ac0[i], ac1[i])) -
                                   xs * (uint32_t)(1u << (b - 1));
                if (job->acc_c) job->acc_c[o] = (int32_t)c;
                if (ws)
                    job->acc_s[o] =
                        (int32_t)((uint32_t)hsum(_mm512_add_epi32(as0[i], as1[i])) - xs);
            }
        }
    }
}

/* GFNI decode (used when the CPU has GFNI): 8 words of each plane are loaded as one vector
 * Z_p; for word w, vpermt2b per plane pair gathers into qword q the plane bytes of columns
 * 64w + 8q .. +7 (plane i at byte 7 - i), and one gf2p8affineqb against bytes 1 << j transposes
 * each 8x8 bit block, so byte j of qword q = u of column 64w + 8q + j. For b = 4 that is 4 vector
 * ops per 64 weights instead of 8 (kmov + masked add per plane). */
typedef struct {
    __m512i idx[8][4]; /* vpermt2b indices per word and plane pair */
} gf_tables;

static void gf_tables_init(gf_tables *t)
{
    uint8_t v[64];
    for (int w = 0; w < 8; w++)
        for (int k = 0; k < 4; k++) {
            for (int q = 0; q < 8; q++) {
                for (int j = 0; j < 8; j++) v[8 * q + j] = 0;
                v[8 * q + 7 - 2 * k] = (uint8_t)(8 * w + q);
                v[8 * q + 6 - 2 * k] = (uint8_t)(64 + 8 * w + q);
            }
            memcpy(&t->idx[w][k], v, 64);
        }
}

INL TGT __m512i gf_u(const __m512i *Z, const gf_tables *t, int w, int b)
{
    __m512i T = _mm512_setzero_si512();
    for (int k = 0; k < (b + 1) / 2; k++) {
        const uint64_t byte = (1ull << (7 - 2 * k)) | (2 * k + 1 < b ? 1ull << (6 - 2 * k) : 0);
        const __mmask64 km = _cvtu64_mask64(byte * 0x0101010101010101ull);
        const __m512i P = _mm512_maskz_permutex2var_epi8(km, Z[2 * k], t->idx[w][k],
                                                         2 * k + 1 < b ? Z[2 * k + 1] : Z[2 * k]);
        T = k ? _mm512_or_si512(T, P) : P;
    }
    return _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64((long long)0x8040201008040201ull), T, 0);
}

INL TGT void planes_rows_gf(const spfq_job *job, int32_t n0, int32_t n1, int32_t m0, int32_t m1,
                            const int32_t *xsum, int b, int MB, int ws, const gf_tables *t)
{
    const spfq_prepared *w = job->w;
    const int32_t N = w->d.n, K = w->d.k, W = w->words;
    const size_t stride = (size_t)N * (size_t)W;
    const __mmask64 tail = (K & 63) ? (__mmask64)((1ull << (K & 63)) - 1) : ~(__mmask64)0;
    for (int32_t n = n0; n < n1; n++) {
        const uint64_t *base = w->d.planes + (size_t)n * (size_t)W;
        for (int32_t m = m0; m < m1; m += MB) {
            __m512i ac0[4], ac1[4], as0[4], as1[4];
            const int8_t *xr[4];
            for (int i = 0; i < MB; i++) {
                ac0[i] = ac1[i] = as0[i] = as1[i] = _mm512_setzero_si512();
                xr[i] = job->xq + (size_t)(m + i) * (size_t)K;
            }
            for (int32_t wd = 0; wd < W; wd += 8) {
                const int32_t nw = W - wd < 8 ? W - wd : 8;
                const __mmask8 lm = (__mmask8)((1u << nw) - 1);
                __m512i Z[8];
                for (int p = 0; p < b; p++)
                    Z[p] = nw == 8 ? _mm512_loadu_si512(base + (size_t)p * stride + wd)
                                   : _mm512_maskz_loadu_epi64(lm, base + (size_t)p * stride + wd);
                for (int v = 0; v < 8; v += 2) {
                    if (v >= nw) break;
                    const __m512i u0 = gf_u(Z, t, v, b);
                    const __m512i s0 = ws ? sign1(u0, b) : u0;
                    const int last0 = wd + v == W - 1;
                    for (int i = 0; i < MB; i++) {
                        const int8_t *xp = xr[i] + (size_t)(wd + v) * 64;
                        const __m512i x = last0 ? _mm512_maskz_loadu_epi8(tail, xp) : _mm512_loadu_si512(xp);
                        ac0[i] = _mm512_dpbusd_epi32(ac0[i], u0, x);
                        if (ws) as0[i] = _mm512_dpbusd_epi32(as0[i], s0, x);
                    }
                    if (v + 1 >= nw) break;
                    const __m512i u1 = gf_u(Z, t, v + 1, b);
                    const __m512i s1 = ws ? sign1(u1, b) : u1;
                    const int last1 = wd + v + 1 == W - 1;
                    for (int i = 0; i < MB; i++) {
                        const int8_t *xp = xr[i] + (size_t)(wd + v + 1) * 64;
                        const __m512i x = last1 ? _mm512_maskz_loadu_epi8(tail, xp) : _mm512_loadu_si512(xp);
                        ac1[i] = _mm512_dpbusd_epi32(ac1[i], u1, x);
                        if (ws) as1[i] = _mm512_dpbusd_epi32(as1[i], s1, x);
                    }
                }
            }
            for (int i = 0; i < MB; i++) {
                const size_t o = (size_t)(m + i) * (size_t)N + (size_t)n;
                const uint32_t xs = (uint32_t)xsum[m + i];
                const uint32_t c = (uint32_t)hsum(_mm512_add_epi32(ac0[i], ac1[i])) -
                                   xs * (uint32_t)(1u << (b - 1));
                if (job->acc_c) job->acc_c[o] = (int32_t)c;
                if (ws)
                    job->acc_s[o] =
                        (int32_t)((uint32_t)hsum(_mm512_add_epi32(as0[i], as1[i])) - xs);
            }
        }
    }
}

/* Two output rows x MB activation rows per pass, acc_c only: each activation load serves both
 * rows (the loads bound M >= 4). */
INL TGT void planes_rows_gf2(const spfq_job *job, int32_t n0, int32_t n1, int32_t m0, int32_t m1,
                             const int32_t *xsum, int b, int MB, const gf_tables *t)
{
    const spfq_prepared *w = job->w;
    const int32_t N = w->d.n, K = w->d.k, W = w->words;
    const size_t stride = (size_t)N * (size_t)W;
    const __mmask64 tail = (K & 63) ? (__mmask64)((1ull << (K & 63)) - 1) : ~(__mmask64)0;
    for (int32_t n = n0; n + 2 <= n1; n += 2) {
        const uint64_t *base[2] = {w->d.planes + (size_t)n * (size_t)W,
                                   w->d.planes + (size_t)(n + 1) * (size_t)W};
        for (int32_t m = m0; m < m1; m += MB) {
            __m512i ac[2][4];
            const int8_t *xr[4];
            for (int i = 0; i < MB; i++) {
                ac[0][i] = ac[1][i] = _mm512_setzero_si512();
                xr[i] = job->xq + (size_t)(m + i) * (size_t)K;
            }
            for (int32_t wd = 0; wd < W; wd += 8) {
                const int32_t nw = W - wd < 8 ? W - wd : 8;
                const __mmask8 lm = (__mmask8)((1u << nw) - 1);
                __m512i Z[2][8];
                for (int r = 0; r < 2; r++)
                    for (int p = 0; p < b; p++)
                        Z[r][p] = nw == 8 ? _mm512_loadu_si512(base[r] + (size_t)p * stride + wd)
                                          : _mm512_maskz_loadu_epi64(lm, base[r] + (size_t)p * stride + wd);
                for (int v = 0; v < 8; v++) {
                    if (v >= nw) break;
                    const __m512i u0 = gf_u(Z[0], t, v, b), u1 = gf_u(Z[1], t, v, b);
                    const int last = wd + v == W - 1;
                    for (int i = 0; i < MB; i++) {
                        const int8_t *xp = xr[i] + (size_t)(wd + v) * 64;
                        const __m512i x = last ? _mm512_maskz_loadu_epi8(tail, xp) : _mm512_loadu_si512(xp);
                        ac[0][i] = _mm512_dpbusd_epi32(ac[0][i], u0, x);
                        ac[1][i] = _mm512_dpbusd_epi32(ac[1][i], u1, x);
                    }
                }
            }
            for (int r = 0; r < 2; r++)
                for (int i = 0; i < MB; i++)
                    job->acc_c[(size_t)(m + i) * (size_t)N + (size_t)(n + r)] = (int32_t)(
                        (uint32_t)hsum(ac[r][i]) - (uint32_t)xsum[m + i] * (uint32_t)(1u << (b - 1)));
        }
    }
}

/* all rows. Pairs of output rows only for 4-row activation chunks without sign sums (halves the
 * activation loads, which bound M >= 4; with sign sums or M == 1 the extra registers spill and
 * single rows measured faster). */
INL TGT void planes_gf_all(const spfq_job *j, int32_t n0, int32_t n1, const int32_t *xs, int b,
                           int ws, const gf_tables *t)
{
    const int32_t M = j->m, M4 = M / 4 * 4;
    if (!ws && j->acc_c) {
        const int32_t n2 = n0 + (n1 - n0) / 2 * 2;
        planes_rows_gf2(j, n0, n2, 0, M4, xs, b, 4, t);
        planes_rows_gf(j, n2, n1, 0, M4, xs, b, 4, 0, t);
        planes_rows_gf(j, n0, n1, M4, M, xs, b, 1, 0, t);
    } else {
        planes_rows_gf(j, n0, n1, 0, M4, xs, b, 4, 1, t);
        planes_rows_gf(j, n0, n1, M4, M, xs, b, 1, 1, t);
    }
}

/* ------------------------------------------------------------------ SPARSE */

typedef struct {
    __m512i mp, mn; /* magnitudes of positive / negative codes (0 elsewhere) */
    __mmask64 kp, kn;
} sparse_word;

/* Decode mask word mw of row n (compact position *pos, advanced); returns 0 if it holds no
 * readable field (nothing to add). */
INL TGT int sparse_decode(const spfq_prepared *w, int32_t n, uint64_t mw, size_t *pos, int b,
                          sparse_word *o)
{
    const size_t Wk = (size_t)w->d.kept_words;
    const size_t lim = Wk * 64, p0 = *pos;
    const unsigned cnt = (unsigned)_mm_popcnt_u64(mw);
    *pos = p0 + cnt;
    if (p0 >= lim) return 0;
    const size_t valid = lim - p0 < cnt ? lim - p0 : cnt;
    const size_t q = p0 >> 6;
    const unsigned sh = (unsigned)(p0 & 63);
    /* the next kept word, where the row has one (branch-free funnel shift otherwise) */
    const int has_hi = q + 1 < Wk;
    const size_t kstride = (size_t)w->d.n * Wk;
    const uint64_t *kp = w->d.planes + (size_t)n * Wk + q;
    const uint64_t vmask = valid >= 64 ? ~0ull : (1ull << valid) - 1;
    __m512i f = _mm512_setzero_si512();
    for (int p = 0; p < b; p++) {
        const uint64_t *pp = kp + (size_t)p * kstride;
        const uint64_t hi = has_hi ? pp[1] : 0;
        const uint64_t bits = (pp[0] >> sh) | ((hi << 1) << (63 - sh));
        f = _mm512_mask_add_epi8(f, _cvtu64_mask64(bits & vmask), f,
                                 _mm512_set1_epi8((char)(1 << p)));
    }
    /* fields to their columns; the valid kept columns are pdep(vmask, mw) */
    const __mmask64 knz = _cvtu64_mask64(_pdep_u64(vmask, mw));
    f = _mm512_maskz_expand_epi8(_cvtu64_mask64(mw), f);
    /* magnitude (f >> 1) + 1 on the valid kept columns only */
    const __m512i mag = _mm512_maskz_add_epi8(
        knz, _mm512_and_si512(_mm512_srli_epi16(f, 1), _mm512_set1_epi8(0x7f)), _mm512_set1_epi8(1));
    __mmask64 kn = _mm512_mask_test_epi8_mask(knz, f, _mm512_set1_epi8(1));
    if (b == 8) /* magnitude 128: the oracle's int8 code wraps to -128 */
        kn = _kor_mask64(kn, _mm512_cmpeq_epi8_mask(mag, _mm512_set1_epi8((char)0x80)));
    const __mmask64 kpo = _kandn_mask64(kn, knz);
    o->kp = kpo;
    o->kn = kn;
    o->mp = _mm512_maskz_mov_epi8(kpo, mag);
    o->mn = _mm512_maskz_mov_epi8(kn, mag);
    return 1;
}

/* GFNI variant: the row's kept words are first transposed into kt[q] (qword lane p = plane p's
 * word q; kt[Wk] = 0), so the 64 fields at compact position pos are one funnel shift of two
 * vectors (vpshrdvq), one vpermb and one gf2p8affineqb away, with no scalar work per plane. */
INL TGT int sparse_decode_gf(const spfq_prepared *w, const __m512i *kt, uint64_t mw, size_t *pos,
                             int b, sparse_word *o)
{
    const size_t lim = (size_t)w->d.kept_words * 64, p0 = *pos;
    const unsigned cnt = (unsigned)_mm_popcnt_u64(mw);
    *pos = p0 + cnt;
    if (p0 >= lim) return 0;
    const size_t valid = lim - p0 < cnt ? lim - p0 : cnt;
    const size_t q = p0 >> 6;
    const uint64_t vmask = valid >= 64 ? ~0ull : (1ull << valid) - 1;
    const __m512i V = _mm512_shrdv_epi64(_mm512_load_si512(kt + q), _mm512_load_si512(kt + q + 1),
                                         _mm512_set1_epi64((long long)(p0 & 63)));
    /* qword g byte 7 - p = byte g of plane p's window */
    const __m512i idx = _mm512_set_epi64(
        0x070f171f272f373full, 0x060e161e262e363eull, 0x050d151d252d353dull, 0x040c141c242c343cull,
        0x030b131b232b333bull, 0x020a121a222a323aull, 0x0109111921293139ull, 0x0008101820283038ull);
    __m512i f = _mm512_gf2p8affine_epi64_epi8(_mm512_set1_epi64((long long)0x8040201008040201ull),
                                              _mm512_permutexvar_epi8(idx, V), 0);
    const __mmask64 knz = _cvtu64_mask64(_pdep_u64(vmask, mw));
    f = _mm512_maskz_expand_epi8(_cvtu64_mask64(mw), f);
    const __m512i mag = _mm512_maskz_add_epi8(
        knz, _mm512_and_si512(_mm512_srli_epi16(f, 1), _mm512_set1_epi8(0x7f)), _mm512_set1_epi8(1));
    __mmask64 kn = _mm512_mask_test_epi8_mask(knz, f, _mm512_set1_epi8(1));
    if (b == 8)
        kn = _kor_mask64(kn, _mm512_cmpeq_epi8_mask(mag, _mm512_set1_epi8((char)0x80)));
    const __mmask64 kpo = _kandn_mask64(kn, knz);
    o->kp = kpo;
    o->kn = kn;
    o->mp = _mm512_maskz_mov_epi8(kpo, mag);
    o->mn = _mm512_maskz_mov_epi8(kn, mag);
    return 1;
}

INL TGT void sparse_rows(const spfq_job *job, int32_t n0, int32_t n1, int32_t m0, int32_t m1,
                         int b, int MB, int ws, __m512i *kt)
{
    const spfq_prepared *w = job->w;
    const int32_t N = w->d.n, K = w->d.k, W = w->words;
    const __mmask64 tail = (K & 63) ? (__mmask64)((1ull << (K & 63)) - 1) : ~(__mmask64)0;
    const __m512i one = _mm512_set1_epi8(1);
    for (int32_t n = n0; n < n1; n++) {
        const uint64_t *mrow = w->d.mask + (size_t)n * (size_t)W;
        if (kt) {
            const size_t Wk = (size_t)w->d.kept_words, kstride = (size_t)N * Wk;
            for (size_t q = 0; q < Wk; q++) {
                uint64_t *lane = (uint64_t *)(kt + q);
                for (int p = 0; p < b; p++) lane[p] = w->d.planes[(size_t)p * kstride + (size_t)n * Wk + q];
            }
        }
        for (int32_t m = m0; m < m1; m += MB) {
            __m512i cp[4], cn[4], sp[4], sn[4];
            const int8_t *xr[4];
            for (int i = 0; i < MB; i++) {
                cp[i] = cn[i] = sp[i] = sn[i] = _mm512_setzero_si512();
                xr[i] = job->xq + (size_t)(m + i) * (size_t)K;
            }
            size_t pos = 0;
            for (int32_t wd = 0; wd < W; wd++) {
                const uint64_t mw = mrow[wd];
                if (!mw) continue;
                sparse_word d;
                if (kt ? !sparse_decode_gf(w, kt, mw, &pos, b, &d)
                       : !sparse_decode(w, n, mw, &pos, b, &d))
                    continue;
                const __mmask64 km = wd == W - 1 ? tail : ~(__mmask64)0;
                const __m512i s1p = ws ? _mm512_maskz_mov_epi8(d.kp, one) : one;
                const __m512i s1n = ws ? _mm512_maskz_mov_epi8(d.kn, one) : one;
                for (int i = 0; i < MB; i++) {
                    const __m512i x = _mm512_maskz_loadu_epi8(km, xr[i] + (size_t)wd * 64);
                    cp[i] = _mm512_dpbusd_epi32(cp[i], d.mp, x);
                    cn[i] = _mm512_dpbusd_epi32(cn[i], d.mn, x);
                    if (ws) {
                        sp[i] = _mm512_dpbusd_epi32(sp[i], s1p, x);
                        sn[i] = _mm512_dpbusd_epi32(sn[i], s1n, x);
                    }
                }
            }
            for (int i = 0; i < MB; i++) {
                const size_t o = (size_t)(m + i) * (size_t)N + (size_t)n;
                if (job->acc_c) job->acc_c[o] = hsum(_mm512_sub_epi32(cp[i], cn[i]));
                if (ws) job->acc_s[o] = hsum(_mm512_sub_epi32(sp[i], sn[i]));
            }
        }
    }
}

/* GFNI path: compact fields -> offset codes u = c + 128 by a vpermt2b table lookup (two for
 * b = 8), then vpexpandb merging 128 (c = 0) into the pruned columns, with the expand mask
 * pdep(valid, mw) (the row's first `valid` kept columns of this word). One vpdpbusd per row,
 * corrected by 128 * (sum of x over the processed words); sign sums from u as for PLANES. */
typedef struct {
    __m512i lut[4]; /* u = c + 128 for fields 0..255 */
    int32_t *xw;    /* (M, W) per-word sums of x */
} sparse_gf;

INL TGT void sparse_rows_gf(const spfq_job *job, int32_t n0, int32_t n1, int32_t m0, int32_t m1,
                            int b, int MB, int ws, __m512i *kt, const sparse_gf *g)
{
    const spfq_prepared *w = job->w;
    const int32_t N = w->d.n, K = w->d.k, W = w->words;
    const __mmask64 tail = (K & 63) ? (__mmask64)((1ull << (K & 63)) - 1) : ~(__mmask64)0;
    const size_t Wk = (size_t)w->d.kept_words, kstride = (size_t)N * Wk, lim = Wk * 64;
    const __m512i idx = _mm512_set_epi64(
        0x070f171f272f373full, 0x060e161e262e363eull, 0x050d151d252d353dull, 0x040c141c242c343cull,
        0x030b131b232b333bull, 0x020a121a222a323aull, 0x0109111921293139ull, 0x0008101820283038ull);
    const __m512i sel = _mm512_set1_epi64((long long)0x8040201008040201ull);
    const __m512i c128 = _mm512_set1_epi8((char)0x80);
    for (int32_t n = n0; n < n1; n++) {
        const uint64_t *mrow = w->d.mask + (size_t)n * (size_t)W;
        for (size_t q = 0; q < Wk; q++) {
            uint64_t *lane = (uint64_t *)(kt + q);
            for (int p = 0; p < b; p++) lane[p] = w->d.planes[(size_t)p * kstride + (size_t)n * Wk + q];
        }
        for (int32_t m = m0; m < m1; m += MB) {
            __m512i ac[4], as[4];
            const int8_t *xr[4];
            const int32_t *xw[4];
            uint32_t xsum[4];
            for (int i = 0; i < MB; i++) {
                ac[i] = as[i] = _mm512_setzero_si512();
                xr[i] = job->xq + (size_t)(m + i) * (size_t)K;
                xw[i] = g->xw + (size_t)(m + i) * (size_t)W;
                xsum[i] = 0;
            }
            size_t pos = 0;
            for (int32_t wd = 0; wd < W; wd++) {
                const uint64_t mw = mrow[wd];
                if (!mw) continue;
                const size_t p0 = pos;
                const unsigned cnt = (unsigned)_mm_popcnt_u64(mw);
                pos = p0 + cnt;
                if (p0 >= lim) continue;
                const size_t valid = lim - p0 < cnt ? lim - p0 : cnt;
                const uint64_t vmask = valid >= 64 ? ~0ull : (1ull << valid) - 1;
                const size_t q = p0 >> 6;
                const __m512i V = _mm512_shrdv_epi64(_mm512_load_si512(kt + q),
                                                     _mm512_load_si512(kt + q + 1),
                                                     _mm512_set1_epi64((long long)(p0 & 63)));
                const __m512i f = _mm512_gf2p8affine_epi64_epi8(sel, _mm512_permutexvar_epi8(idx, V), 0);
                __m512i uc = _mm512_permutex2var_epi8(g->lut[0], f, g->lut[1]);
                if (b == 8)
                    uc = _mm512_mask_blend_epi8(_mm512_movepi8_mask(f), uc,
                                                _mm512_permutex2var_epi8(g->lut[2], f, g->lut[3]));
                const __m512i u = _mm512_mask_expand_epi8(c128, _cvtu64_mask64(_pdep_u64(vmask, mw)), uc);
                const __m512i s1 = ws ? sign1(u, 8) : u;
                const __mmask64 km = wd == W - 1 ? tail : ~(__mmask64)0;
                for (int i = 0; i < MB; i++) {
                    const __m512i x = _mm512_maskz_loadu_epi8(km, xr[i] + (size_t)wd * 64);
                    ac[i] = _mm512_dpbusd_epi32(ac[i], u, x);
                    if (ws) as[i] = _mm512_dpbusd_epi32(as[i], s1, x);
                    xsum[i] += (uint32_t)xw[i][wd];
                }
            }
            for (int i = 0; i < MB; i++) {
                const size_t o = (size_t)(m + i) * (size_t)N + (size_t)n;
                if (job->acc_c) job->acc_c[o] = (int32_t)((uint32_t)hsum(ac[i]) - 128u * xsum[i]);
                if (ws) job->acc_s[o] = (int32_t)((uint32_t)hsum(as[i]) - xsum[i]);
            }
        }
    }
}

/* ------------------------------------------------------------------ per-b instances */

#define INTB512_INSTANCES(B)                                                                   \
    __attribute__((noinline)) TGT static void planes_b##B(const spfq_job *j, int32_t n0,       \
                                                          int32_t n1, const int32_t *xs,       \
                                                          const gf_tables *t)                  \
    {                                                                                          \
        const int32_t M = j->m, M4 = M / 4 * 4;                                                \
        if (t && j->acc_s) {                                                                   \
            planes_gf_all(j, n0, n1, xs, B, 1, t);                                             \
        } else if (t) {                                                                        \
            planes_gf_all(j, n0, n1, xs, B, 0, t);                                             \
        } else if (j->acc_s) {                                                                 \
            planes_rows(j, n0, n1, 0, M4, xs, B, 4, 1);                                        \
            planes_rows(j, n0, n1, M4, M, xs, B, 1, 1);                                        \
        } else {                                                                               \
            planes_rows(j, n0, n1, 0, M4, xs, B, 4, 0);                                        \
            planes_rows(j, n0, n1, M4, M, xs, B, 1, 0);                                        \
        }                                                                                      \
    }                                                                                          \
    __attribute__((noinline)) TGT static void sparse_b##B(const spfq_job *j, int32_t n0,       \
                                                          int32_t n1, __m512i *kt,             \
                                                          const sparse_gf *g)                  \
    {                                                                                          \
        const int32_t M = j->m, M4 = M / 4 * 4;                                                \
        if (g && j->acc_s) {                                                                   \
            sparse_rows_gf(j, n0, n1, 0, M4, B, 4, 1, kt, g);                                  \
            sparse_rows_gf(j, n0, n1, M4, M, B, 1, 1, kt, g);                                  \
        } else if (g) {                                                                        \
            sparse_rows_gf(j, n0, n1, 0, M4, B, 4, 0, kt, g);                                  \
            sparse_rows_gf(j, n0, n1, M4, M, B, 1, 0, kt, g);                                  \
        } else if (j->acc_s) {                                                                 \
            sparse_rows(j, n0, n1, 0, M4, B, 4, 1, kt);                                        \
            sparse_rows(j, n0, n1, M4, M, B, 1, 1, kt);                                        \
        } else {                                                                               \
            sparse_rows(j, n0, n1, 0, M4, B, 4, 0, kt);                                        \
            sparse_rows(j, n0, n1, M4, M, B, 1, 0, kt);                                        \
        }                                                                                      \
    }
INTB512_INSTANCES(2)
INTB512_INSTANCES(3)
INTB512_INSTANCES(4)
INTB512_INSTANCES(5)
INTB512_INSTANCES(6)
INTB512_INSTANCES(7)
INTB512_INSTANCES(8)

typedef void (*planes_kernel)(const spfq_job *, int32_t, int32_t, const int32_t *,
                              const gf_tables *);
typedef void (*sparse_kernel)(const spfq_job *, int32_t, int32_t, __m512i *,
                              const sparse_gf *);
static const planes_kernel PLANES[9] = {0, 0, planes_b2, planes_b3, planes_b4, planes_b5,
                                        planes_b6, planes_b7, planes_b8};
static const sparse_kernel SPARSE[9] = {0, 0, sparse_b2, sparse_b3, sparse_b4, sparse_b5,
                                        sparse_b6, sparse_b7, sparse_b8};

/* sum(xq) of each activation row (rows xstride bytes apart) */
TGT static void row_sums_strided(const int8_t *xq, int32_t M, int32_t K, size_t xstride, int32_t *out)
{
    const __m512i one = _mm512_set1_epi8(1);
    for (int32_t m = 0; m < M; m++) {
        const int8_t *x = xq + (size_t)m * xstride;
        __m512i a = _mm512_setzero_si512();
        int32_t k = 0;
        for (; k + 64 <= K; k += 64) a = _mm512_dpbusd_epi32(a, one, _mm512_loadu_si512(x + k));
        if (k < K)
            a = _mm512_dpbusd_epi32(
                a, one, _mm512_maskz_loadu_epi8((__mmask64)((1ull << (K - k)) - 1), x + k));
        out[m] = hsum(a);
    }
}

TGT static void row_sums(const int8_t *xq, int32_t M, int32_t K, int32_t *out)
{
    row_sums_strided(xq, M, K, (size_t)K, out);
}

/* Test hook: SPFQ_AVX512_NO_GFNI set (non-empty) forces the kmov (non-GFNI) decode paths. */
static int getenv_nogfni(void)
{
    const char *e = getenv("SPFQ_AVX512_NO_GFNI");
    return e && *e;
}

/* u = c + 128 per field (c as the oracle's int8 code) and the per-word activation sums */
TGT static void sparse_setup(const int8_t *xq, int32_t M, int32_t K, int32_t W, int b, sparse_gf *g)
{
    uint8_t t[256];
    for (int f = 0; f < 256; f++) {
        const int mag = ((f & ((1 << b) - 1)) >> 1) + 1;
        t[f] = (uint8_t)((int8_t)((f & 1) ? -mag : mag) + 128);
    }
    memcpy(g->lut, t, sizeof t);
    const __m512i one = _mm512_set1_epi8(1);
    for (int32_t m = 0; m < M; m++)
        for (int32_t wd = 0; wd < W; wd++) {
            const int32_t left = K - wd * 64;
            const __mmask64 km = left >= 64 ? ~(__mmask64)0 : (__mmask64)((1ull << left) - 1);
            const __m512i x = _mm512_maskz_loadu_epi8(km, xq + (size_t)m * (size_t)K + (size_t)wd * 64);
            g->xw[(size_t)m * (size_t)W + (size_t)wd] = hsum(_mm512_dpbusd_epi32(_mm512_setzero_si512(), one, x));
        }
}

static int cpu_ok(void)
{
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") &&
           __builtin_cpu_supports("avx512vbmi2") && __builtin_cpu_supports("bmi2") &&
           __builtin_cpu_supports("popcnt");
}

/* ------------------------------------------------------------------ repacked PLANES (RP) */

/* acc += vpdpbusd(u (u8), x (s8)) in place (inline asm: GCC 12 copies the accumulator of the
 * intrinsic on every call, as noted in binary_avx512.c). */
INL TGT __m512i rp_dp(__m512i acc, __m512i u, __m512i x)
{
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(x));
    return acc;
}

#define RP_CHUNK 16384 /* columns per int32 partial sum (overflow bound in the header) */

/* tot[a][g] (int32 lane = row (g0 + g) * 16 + lane of the tile) = sum_k u * x[a] over all steps.
 * Field f of a byte is kept in place (u << f*CB, by one vpand) and its partial sum, a multiple
 * of 2^(f*CB), is shifted back exactly at the end of each column chunk. */
INL TGT void rp_block(const uint8_t *wt, int32_t S, const int8_t *x, size_t xstride, int g0,
                      const int CB, const int MR, const int G, __m512i tot[4][4])
{
    const int F = 8 / CB, KSTEP = 4 * F;
    const int32_t SCH = RP_CHUNK / KSTEP;
    for (int a = 0; a < MR; a++)
        for (int g = 0; g < G; g++) tot[a][g] = _mm512_setzero_si512();
    for (int32_t s0 = 0; s0 < S; s0 += SCH) {
        const int32_t s1 = S - s0 < SCH ? S : s0 + SCH;
        __m512i acc[4][4][8]; /* [MR][G][F], F = 8 / CB <= 8 */
        for (int a = 0; a < MR; a++)
            for (int g = 0; g < G; g++)
                for (int f = 0; f < F; f++) acc[a][g][f] = _mm512_setzero_si512();
        for (int32_t s = s0; s < s1; s++) {
            __m512i wv[4];
            for (int g = 0; g < G; g++) wv[g] = _mm512_load_si512(wt + ((size_t)s * 4 + (size_t)(g0 + g)) * 64);
            for (int f = 0; f < F; f++) {
                __m512i xb[4];
                for (int a = 0; a < MR; a++) {
                    int32_t v;
                    memcpy(&v, x + (size_t)a * xstride + (size_t)s * KSTEP + 4 * f, 4);
                    xb[a] = _mm512_set1_epi32(v);
                }
                for (int g = 0; g < G; g++) {
                    const __m512i u = CB == 8 ? wv[g]
                                    : _mm512_and_si512(wv[g], _mm512_set1_epi8((char)(((1 << CB) - 1) << (f * CB))));
                    for (int a = 0; a < MR; a++) acc[a][g][f] = rp_dp(acc[a][g][f], u, xb[a]);
                }
            }
        }
        for (int a = 0; a < MR; a++)
            for (int g = 0; g < G; g++)
                for (int f = 0; f < F; f++)
                    tot[a][g] = _mm512_add_epi32(tot[a][g], _mm512_srai_epi32(acc[a][g][f], f * CB));
    }
}

/* groups of 16 rows per pass: at most 16 accumulators (MR * G * F), G in {1, 2, 4} */
#define RP_G(CB, MR) ((16 / ((MR) * (8 / (CB)))) >= 4 ? 4 : (16 / ((MR) * (8 / (CB)))) >= 2 ? 2 : 1)

/* One tile (64 rows from row t0) x MR activation rows: acc_c of rows [lo, hi). */
INL TGT void rp_tile(const spfq_job *j, const uint8_t *wt, const int8_t *x, size_t xstride,
                     const int32_t *xs, int32_t m, int32_t t0, int32_t lo, int32_t hi,
                     const int CB, const int MR)
{
    const int G = RP_G(CB, MR);
    const int32_t N = j->w->d.n, S = j->w->rp_steps, off = j->w->rp_off;
    for (int g0 = 0; g0 < 4; g0 += G) {
        const int32_t r0 = t0 + g0 * 16;
        if (r0 >= hi || r0 + G * 16 <= lo) continue;
        __m512i tot[4][4];
        rp_block(wt, S, x, xstride, g0, CB, MR, G, tot);
        for (int a = 0; a < MR; a++)
            for (int g = 0; g < G; g++) {
                const int32_t base = r0 + g * 16;
                uint32_t keep = 0;
                for (int l = 0; l < 16; l++) keep |= (uint32_t)(base + l >= lo && base + l < hi) << l;
                if (!keep) continue;
                const __m512i t = j->w->rp_mul == 2 ? _mm512_add_epi32(tot[a][g], tot[a][g]) : tot[a][g];
                const __m512i v = _mm512_sub_epi32(t, _mm512_set1_epi32(off * xs[m + a]));
                _mm512_mask_storeu_epi32(j->acc_c + (size_t)(m + a) * (size_t)N + base, (__mmask16)keep, v);
            }
    }
}

#define RP_TILE_FN(CB, MR)                                                                         \
    __attribute__((noinline)) TGT static void rp_tile_##CB##_##MR(                                \
        const spfq_job *j, const uint8_t *wt, const int8_t *x, size_t xs_, const int32_t *xs,      \
        int32_t m, int32_t t0, int32_t lo, int32_t hi)                                             \
    {                                                                                              \
        rp_tile(j, wt, x, xs_, xs, m, t0, lo, hi, CB, MR);                                         \
    }
RP_TILE_FN(1, 1) RP_TILE_FN(1, 2) /* 8 fields per byte: 16 accumulators at MR = 2 already */
RP_TILE_FN(2, 1) RP_TILE_FN(2, 2) RP_TILE_FN(2, 3) RP_TILE_FN(2, 4)
RP_TILE_FN(4, 1) RP_TILE_FN(4, 2) RP_TILE_FN(4, 3) RP_TILE_FN(4, 4)
RP_TILE_FN(8, 1) RP_TILE_FN(8, 2) RP_TILE_FN(8, 3) RP_TILE_FN(8, 4)

typedef void (*rp_tile_fn)(const spfq_job *, const uint8_t *, const int8_t *, size_t, const int32_t *,
                           int32_t, int32_t, int32_t, int32_t);
static const rp_tile_fn RP_TILES[4][4] = {
    {rp_tile_1_1, rp_tile_1_2, NULL, NULL},
    {rp_tile_2_1, rp_tile_2_2, rp_tile_2_3, rp_tile_2_4},
    {rp_tile_4_1, rp_tile_4_2, rp_tile_4_3, rp_tile_4_4},
    {rp_tile_8_1, rp_tile_8_2, rp_tile_8_3, rp_tile_8_4}};

/* acc_c only (job->acc_s == NULL) from the RP codes; returns 0 if scratch could not be had. */
TGT static int planes_rp(const spfq_job *j, int32_t n0, int32_t n1, const int32_t *xs)
{
    const spfq_prepared *w = j->w;
    const int CB = w->rp_cb, KSTEP = 4 * (8 / CB);
    const int32_t M = j->m, K = w->d.k, S = w->rp_steps;
    const size_t Kp = (size_t)S * (size_t)KSTEP;
    /* activations zero padded to whole steps (the broadcasts read 4 bytes at a time) */
    const int8_t *x = j->xq;
    int8_t *pad = NULL;
    if (Kp != (size_t)K) {
        pad = malloc((size_t)M * Kp);
        if (!pad) return 0;
        for (int32_t m = 0; m < M; m++) {
            memcpy(pad + (size_t)m * Kp, j->xq + (size_t)m * (size_t)K, (size_t)K);
            memset(pad + (size_t)m * Kp + K, 0, Kp - (size_t)K);
        }
        x = pad;
    }
    const rp_tile_fn *fns = RP_TILES[CB == 1 ? 0 : CB == 2 ? 1 : CB == 4 ? 2 : 3];
    const int32_t mr_max = CB == 1 ? 2 : 4;
    for (int32_t t = n0 / 64; t * 64 < n1; t++) {
        const uint8_t *wt = w->rp + (size_t)t * (size_t)S * 256;
        const int32_t lo = n0 > t * 64 ? n0 : t * 64, hi = n1 < t * 64 + 64 ? n1 : t * 64 + 64;
        for (int32_t m = 0; m < M;) {
            const int32_t mr = M - m >= mr_max ? mr_max : M - m;
            fns[mr - 1](j, wt, x + (size_t)m * Kp, Kp, xs, m, t * 64, lo, hi);
            m += mr;
        }
    }
    free(pad);
    return 1;
}

int spfq_rp_i8_avx512(const spfq_job *j, int32_t n0, int32_t n1, int32_t *acc)
{
    if (!j->w->rp || !acc || !cpu_ok()) return 0;
    if (n0 >= n1 || j->m <= 0) return 1;
    spfq_job k = *j;
    k.acc_c = acc;
    k.acc_s = NULL;
    int32_t stackbuf[64];
    int32_t *xs = j->m <= 64 ? stackbuf : malloc((size_t)j->m * sizeof(int32_t));
    if (!xs) return 0;
    row_sums(j->xq, j->m, j->w->d.k, xs);
    const int ok = planes_rp(&k, n0, n1, xs);
    if (xs != stackbuf) free(xs);
    return ok;
}

/* ------------------------------------------------------------------ fused RP (tall M) */

/* Tall calls (a conv's pixels x its output channels, api.c's row-block driver) with the epilogue
 * fused: each 16-row group x MR activation rows goes from the int32 sums in registers straight to
 * y = clamp(xscale * (scale * acc) + bias), the expression (and roundings) of api.c's i8_finish,
 * so no int32 (M, N) buffer is written and read back. The driver hands x zero padded to whole
 * RP steps (row stride j->xstride). */
INL TGT void rp_fused_rows(const spfq_job *j, const int32_t *xs, int32_t m, int32_t n0, int32_t n1,
                           const int CB, const int MR)
{
    const spfq_prepared *w = j->w;
    const int G = RP_G(CB, MR);
    const int32_t N = w->d.n, S = w->rp_steps, off = w->rp_off;
    const size_t xstride = (size_t)j->xstride;
    const int8_t *x = j->xq + (size_t)m * xstride;
    const __m512 vlo = _mm512_set1_ps(w->clamped ? w->clamp_lo : -INFINITY);
    const __m512 vhi = _mm512_set1_ps(w->clamped ? w->clamp_hi : INFINITY);
    for (int32_t t = n0 / 64; t * 64 < n1; t++) {
        const uint8_t *wt = w->rp + (size_t)t * (size_t)S * 256;
        for (int g0 = 0; g0 < 4; g0 += G) {
            const int32_t r0 = t * 64 + g0 * 16;
            if (r0 >= n1 || r0 + G * 16 <= n0) continue;
            __m512i tot[4][4];
            rp_block(wt, S, x, xstride, g0, CB, MR, G, tot);
            for (int g = 0; g < G; g++) {
                const int32_t base = r0 + g * 16;
                uint32_t keep = 0;
                for (int l = 0; l < 16; l++) keep |= (uint32_t)(base + l >= n0 && base + l < n1) << l;
                if (!keep) continue;
                const __mmask16 k = (__mmask16)keep;
                const __m512 sc = _mm512_maskz_loadu_ps(k, w->d.scale + base);
                const __m512 bi = w->d.bias ? _mm512_maskz_loadu_ps(k, w->d.bias + base) : _mm512_setzero_ps();
                for (int a = 0; a < MR; a++) {
                    const __m512i tt = w->rp_mul == 2 ? _mm512_add_epi32(tot[a][g], tot[a][g]) : tot[a][g];
                    const __m512i acc = _mm512_sub_epi32(tt, _mm512_set1_epi32(off * xs[m + a]));
                    __m512 v = _mm512_mul_ps(sc, _mm512_cvtepi32_ps(acc));
                    v = _mm512_add_ps(_mm512_mul_ps(_mm512_set1_ps(j->xscale[m + a]), v), bi);
                    v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v)); /* spfq_clamp: NaN v stays */
                    _mm512_mask_storeu_ps(j->y + (size_t)(m + a) * (size_t)N + base, k, v);
                }
            }
        }
    }
}

#define RP_FUSED_FN(CB, MR)                                                                          \
    __attribute__((noinline)) TGT static void rp_fused_##CB##_##MR(const spfq_job *j, const int32_t *xs, \
                                                                  int32_t m, int32_t n0, int32_t n1) \
    {                                                                                                \
        rp_fused_rows(j, xs, m, n0, n1, CB, MR);                                                     \
    }
RP_FUSED_FN(1, 1) RP_FUSED_FN(1, 2)
RP_FUSED_FN(2, 1) RP_FUSED_FN(2, 2) RP_FUSED_FN(2, 3) RP_FUSED_FN(2, 4)
RP_FUSED_FN(4, 1) RP_FUSED_FN(4, 2) RP_FUSED_FN(4, 3) RP_FUSED_FN(4, 4)
RP_FUSED_FN(8, 1) RP_FUSED_FN(8, 2) RP_FUSED_FN(8, 3) RP_FUSED_FN(8, 4)

int spfq_rp_i8_fused_ok_avx512(const spfq_prepared *w)
{
    return w->rp && !w->d.lam && cpu_ok();
}

/* A fused job's activation rows in chunks of MR (<= 2 at 1-bit fields, else <= 4), each through
 * the table entry [field width][MR - 1]; xs: the rows' sums (or NULL where the kernel makes its own). */
typedef void (*rp_rows_fn)(const spfq_job *, const int32_t *, int32_t, int32_t, int32_t);
static void rp_row_chunks(const spfq_job *j, const rp_rows_fn fns[4][4], const int32_t *xs, int32_t n0, int32_t n1)
{
    const int CB = j->w->rp_cb;
    const rp_rows_fn *f = fns[CB == 1 ? 0 : CB == 2 ? 1 : CB == 4 ? 2 : 3];
    const int32_t mr_max = CB == 1 ? 2 : 4;
    for (int32_t m = 0; m < j->m;) {
        const int32_t mr = j->m - m >= mr_max ? mr_max : j->m - m;
        f[mr - 1](j, xs, m, n0, n1);
        m += mr;
    }
}

void spfq_rp_i8_fused_avx512(const spfq_job *j, int32_t n0, int32_t n1)
{
    static const rp_rows_fn fns[4][4] = {{rp_fused_1_1, rp_fused_1_2, NULL, NULL},
                                         {rp_fused_2_1, rp_fused_2_2, rp_fused_2_3, rp_fused_2_4},
                                         {rp_fused_4_1, rp_fused_4_2, rp_fused_4_3, rp_fused_4_4},
                                         {rp_fused_8_1, rp_fused_8_2, rp_fused_8_3, rp_fused_8_4}};
    int32_t xs[SPFQ_TALL_ROWS];
    row_sums_strided(j->xq, j->m, j->w->d.k, (size_t)j->xstride, xs);
    rp_row_chunks(j, fns, xs, n0, n1);
}

/* ------------------------------------------------------------------ grouped fused RP */

/* Group-wise scales (w->gscale, grouped.c's fused route): per 16-row group, each column group's
 * exact int32 sum (rp_block over its gsteps RP steps) becomes t = xscale * (gscale * acc) and
 * is added to a float accumulator that starts at +0.0f, in ascending group order, y = clamp(s +
 * bias): the bits of spfq_kernels.h's order (t_0 + 0.0f + t_1 + ...: adding +0.0f first only
 * turns a -0 into +0, which the later additions would do anyway), in registers. Accumulators:
 * MR x G x F int32 for the group + MR x G float, so G is chosen for MR * G * F <= 8 (at b = 4,
 * M = 1: the whole 64-row tile in one pass). */
#define RPG_G(CB, MR) ((MR) * 4 * (8 / (CB)) <= 8 ? 4 : (MR) * 2 * (8 / (CB)) <= 8 ? 2 : 1)

INL TGT void rp_grouped_rows(const spfq_job *j, int32_t m, int32_t n0, int32_t n1, const int CB, const int MR)
{
    const spfq_prepared *w = j->w;
    const int G = RPG_G(CB, MR), KSTEP = 4 * (8 / CB);
    const int32_t N = w->d.n, S = w->rp_steps, off = w->rp_off, GS = w->gsteps, NG = w->ngroups;
    const size_t xstride = (size_t)j->xstride;
    const int8_t *x = j->xq + (size_t)m * xstride;
    int32_t xsg[4 * SPFQ_GROUPED_MAX_GROUPS];
    spfq_group_sums(x, xstride, MR, GS * KSTEP, NG, xsg);
    const __m512 vlo = _mm512_set1_ps(w->clamped ? w->clamp_lo : -INFINITY);
    const __m512 vhi = _mm512_set1_ps(w->clamped ? w->clamp_hi : INFINITY);
    __m512 vx[4];
    for (int a = 0; a < MR; a++) vx[a] = _mm512_set1_ps(j->xscale[m + a]);
    for (int32_t t = n0 / 64; t * 64 < n1; t++) {
        const uint8_t *wt = w->rp + (size_t)t * (size_t)S * 256;
        for (int g0 = 0; g0 < 4; g0 += G) {
            const int32_t r0 = t * 64 + g0 * 16;
            if (r0 >= n1 || r0 + G * 16 <= n0) continue;
            __m512 ys[4][4]; /* +0.0f + t_0 + t_1 ...: the same bits as t_0 + 0.0f + t_1 ... */
            for (int a = 0; a < MR; a++)
                for (int g = 0; g < G; g++) ys[a][g] = _mm512_setzero_ps();
            for (int32_t q = 0; q < NG; q++) {
                const int32_t s0 = q * GS, sq = S - s0 < GS ? S - s0 : GS;
                __m512i tot[4][4];
                rp_block(wt + (size_t)s0 * 256, sq, x + (size_t)s0 * KSTEP, xstride, g0, CB, MR, G, tot);
                for (int g = 0; g < G; g++) {
                    const __m512 sc = _mm512_cvtph_ps(
                        _mm256_loadu_si256((const __m256i *)(w->gscale + ((size_t)(r0 / 16 + g) * NG + q) * 16)));
                    for (int a = 0; a < MR; a++) {
                        const __m512i tt = w->rp_mul == 2 ? _mm512_add_epi32(tot[a][g], tot[a][g]) : tot[a][g];
                        const __m512i acc = _mm512_sub_epi32(tt, _mm512_set1_epi32(off * xsg[a * NG + q]));
                        ys[a][g] = _mm512_add_ps(ys[a][g], _mm512_mul_ps(vx[a], _mm512_mul_ps(sc, _mm512_cvtepi32_ps(acc))));
                    }
                }
            }
            for (int g = 0; g < G; g++) {
                const int32_t base = r0 + g * 16;
                uint32_t keep = 0;
                for (int l = 0; l < 16; l++) keep |= (uint32_t)(base + l >= n0 && base + l < n1) << l;
                if (!keep) continue;
                const __mmask16 k = (__mmask16)keep;
                const __m512 bi = w->d.bias ? _mm512_maskz_loadu_ps(k, w->d.bias + base) : _mm512_setzero_ps();
                for (int a = 0; a < MR; a++) {
                    __m512 v = _mm512_add_ps(ys[a][g], bi);
                    v = _mm512_min_ps(vhi, _mm512_max_ps(vlo, v)); /* spfq_clamp: NaN v stays */
                    _mm512_mask_storeu_ps(j->y + (size_t)(m + a) * (size_t)N + base, k, v);
                }
            }
        }
    }
}

#define RP_GROUPED_FN(CB, MR)                                                                       \
    __attribute__((noinline)) TGT static void rp_grouped_##CB##_##MR(const spfq_job *j, const int32_t *xs, \
                                                                     int32_t m, int32_t n0, int32_t n1) \
    {                                                                                               \
        (void)xs; /* group sums are made per chunk */                                               \
        rp_grouped_rows(j, m, n0, n1, CB, MR);                                                      \
    }
RP_GROUPED_FN(1, 1) RP_GROUPED_FN(1, 2)
RP_GROUPED_FN(2, 1) RP_GROUPED_FN(2, 2) RP_GROUPED_FN(2, 3) RP_GROUPED_FN(2, 4)
RP_GROUPED_FN(4, 1) RP_GROUPED_FN(4, 2) RP_GROUPED_FN(4, 3) RP_GROUPED_FN(4, 4)
RP_GROUPED_FN(8, 1) RP_GROUPED_FN(8, 2) RP_GROUPED_FN(8, 3) RP_GROUPED_FN(8, 4)

int spfq_rp_grouped_ok_avx512(const spfq_prepared *w)
{
    return w->rp && w->gscale && !w->d.lam && cpu_ok();
}

void spfq_rp_grouped_avx512(const spfq_job *j, int32_t n0, int32_t n1)
{
    static const rp_rows_fn fns[4][4] = {{rp_grouped_1_1, rp_grouped_1_2, NULL, NULL},
                                         {rp_grouped_2_1, rp_grouped_2_2, rp_grouped_2_3, rp_grouped_2_4},
                                         {rp_grouped_4_1, rp_grouped_4_2, rp_grouped_4_3, rp_grouped_4_4},
                                         {rp_grouped_8_1, rp_grouped_8_2, rp_grouped_8_3, rp_grouped_8_4}};
    rp_row_chunks(j, fns, NULL, n0, n1);
}

/* ------------------------------------------------------------------ range functions */

void spfq_planes_i8_avx512(const spfq_job *j, int32_t n0, int32_t n1)
{
    const int b = j->w->d.bits;
    if (n0 >= n1 || j->m <= 0) return;
    if (b < 2 || b > 8 || !cpu_ok()) {
        spfq_planes_i8_c(j, n0, n1);
        return;
    }
    if (!j->acc_s && j->acc_c && spfq_rp_i8_avx512(j, n0, n1, j->acc_c)) return;
    int32_t stackbuf[64];
    int32_t *xs = j->m <= 64 ? stackbuf : malloc((size_t)j->m * sizeof(int32_t));
    if (!xs) {
        spfq_planes_i8_c(j, n0, n1);
        return;
    }
    row_sums(j->xq, j->m, j->w->d.k, xs);
    gf_tables t;
    const int gf = __builtin_cpu_supports("gfni") && !getenv_nogfni();
    if (gf) gf_tables_init(&t);
    PLANES[b](j, n0, n1, xs, gf ? &t : NULL);
    if (xs != stackbuf) free(xs);
}

void spfq_sparse_i8_avx512(const spfq_job *j, int32_t n0, int32_t n1)
{
    const int b = j->w->d.bits;
    if (n0 >= n1 || j->m <= 0) return;
    if (b < 2 || b > 8 || !cpu_ok()) {
        spfq_sparse_i8_c(j, n0, n1);
        return;
    }
    if (!__builtin_cpu_supports("gfni") || getenv_nogfni()) {
        SPARSE[b](j, n0, n1, NULL, NULL);
        return;
    }
    /* transposed kept words of one row plus a zero entry past the end; per-word x sums */
    const int32_t M = j->m, K = j->w->d.k, W = j->w->words;
    const size_t bytes = ((size_t)j->w->d.kept_words + 1) * 64;
    __m512i *kt = aligned_alloc(64, bytes);
    sparse_gf g;
    g.xw = malloc((size_t)M * (size_t)W * sizeof(int32_t) + 1);
    if (!kt || !g.xw) {
        free(kt);
        free(g.xw);
        spfq_sparse_i8_c(j, n0, n1);
        return;
    }
    memset(kt, 0, bytes);
    sparse_setup(j->xq, M, K, W, b, &g);
    SPARSE[b](j, n0, n1, kt, &g);
    free(kt);
    free(g.xw);
}

#endif /* __x86_64__ */
