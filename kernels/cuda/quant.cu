/* quant.cu — per-row symmetric int8 activation quantiser, bit-exact with the CPU oracle
 * (kernels/src/quant.c quant_rows_c, rule 2): amax = max|x|; below 2^-100 xscale = 0 and
 * xq = 0; else xscale = amax / 127, r = 127 / amax (IEEE divisions: this file must not be built
 * with --use_fast_math / -prec-div=false) and xq = x * r (a rounded multiply, never contracted)
 * rounded to nearest even (rintf), clamped to [-127, 127], 0 for NaN. fmaxf ignores quiet NaNs
 * like glibc's (signalling NaNs are not distinguished on the GPU).
 *
 * Thread mapping: one 256-thread block per activation row (blockIdx.x, grid-strided); the
 * threads stride over the row for max|x| (exact in any order), reduce with warp shuffles and a
 * shared array of 8 warp maxima, then stride again to write xq. */
#include "internal.cuh"

#define QTHREADS 256

/* max|x| accumulation step (fmaxf ignores a quiet NaN operand, as glibc's) */
SPFQ_HD float quant_absmax(float acc, float x) { return fmaxf(acc, fabsf(x)); }

/* the row's scale and multiplier from its max |x| (0 and 0 below 2^-100) */
SPFQ_HD float quant_scale(float amax) { return amax >= 0x1p-100f ? spfq_div(amax, 127.0f) : 0.0f; }
SPFQ_HD float quant_recip(float amax) { return amax >= 0x1p-100f ? spfq_div(127.0f, amax) : 0.0f; }

/* one activation: x * r to nearest even, clamp to +-127, 0 for NaN */
SPFQ_HD int8_t quant_value(float x, float r)
{
    const float v = rintf(spfq_mul(x, r));
    return (v != v) ? (int8_t)0 : (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : (int)v);
}

#ifndef SPFQ_CUDA_EMULATE
__global__ void __launch_bounds__(QTHREADS)
spfq_quantize_i8_kernel(int32_t m, int32_t k, const float *x, int8_t *xq, float *xscale)
{
    __shared__ float wmax[QTHREADS / SPFQ_WARP];
    __shared__ float row_recip;
    for (int32_t r = (int32_t)blockIdx.x; r < m; r += (int32_t)gridDim.x) {
        const float *row = x + (size_t)r * (size_t)k;
        int8_t *out = xq + (size_t)r * (size_t)k;
        float amax = 0.0f;
        for (int32_t i = threadIdx.x; i < k; i += QTHREADS) amax = quant_absmax(amax, row[i]);
        for (int off = SPFQ_WARP / 2; off > 0; off >>= 1)
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
        if ((threadIdx.x % SPFQ_WARP) == 0) wmax[threadIdx.x / SPFQ_WARP] = amax;
        __syncthreads();
        if (threadIdx.x == 0) {
            float a = 0.0f;
            for (int w = 0; w < QTHREADS / SPFQ_WARP; w++) a = fmaxf(a, wmax[w]);
            row_recip = quant_recip(a);
            xscale[r] = quant_scale(a);
        }
        __syncthreads();
        const float rc = row_recip;
        for (int32_t i = threadIdx.x; i < k; i += QTHREADS) out[i] = quant_value(row[i], rc);
        __syncthreads(); /* wmax / row_recip are reused by the next row */
    }
}
#endif

extern "C" int spfq_cuda_quantize_i8(int32_t m, int32_t k, const float *x, int8_t *xq, float *xscale,
                                     void *stream)
{
    spfq_cuda_clear_error();
    if (m < 0 || k <= 0) return spfq_cuda_fail(SPFQ_EINVAL, "bad shape m=%d k=%d", m, k);
    if (!x || !xq || !xscale) return spfq_cuda_fail(SPFQ_EINVAL, "x / xq / xscale is NULL");
    if (m == 0) return SPFQ_OK;
#ifdef SPFQ_CUDA_EMULATE
    (void)stream;
    for (int32_t r = 0; r < m; r++) { /* max is exact in any order: one pass, then the row */
        const float *row = x + (size_t)r * (size_t)k;
        float amax = 0.0f;
        for (int32_t i = 0; i < k; i++) amax = quant_absmax(amax, row[i]);
        xscale[r] = quant_scale(amax);
        const float rc = quant_recip(amax);
        for (int32_t i = 0; i < k; i++) xq[(size_t)r * (size_t)k + i] = quant_value(row[i], rc);
    }
    return SPFQ_OK;
#else
    const unsigned blocks = (unsigned)(m < 65535 * 16 ? m : 65535 * 16);
    spfq_quantize_i8_kernel<<<blocks, QTHREADS, 0, spfq_stream(stream)>>>(m, k, x, xq, xscale);
    return spfq_cuda_check(cudaGetLastError(), "spfq_quantize_i8_kernel launch");
#endif
}
