/* runtime.cu — error reporting, device helpers (alloc / copies) and the shared argument checks
 * of the CUDA kernel library (or their host-memory twins in the SPFQ_CUDA_EMULATE build). Host code
 * only. */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.cuh"

#ifndef SPFQ_CUDA_ARCH_LIST /* the build passes e.g. -DSPFQ_CUDA_ARCH_LIST=" sm_80 sm_90" */
#define SPFQ_CUDA_ARCH_LIST " (unrecorded)"
#endif

static thread_local char g_err[512];

/* internal helpers (C++ linkage, hidden) */
int spfq_cuda_fail(int status, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(g_err, sizeof g_err, fmt, ap);
    va_end(ap);
    return status;
}

void spfq_cuda_clear_error(void) { g_err[0] = '\0'; }

#ifndef SPFQ_CUDA_EMULATE
int spfq_cuda_check(cudaError_t err, const char *what)
{
    if (err == cudaSuccess) return SPFQ_OK;
    return spfq_cuda_fail(err == cudaErrorMemoryAllocation ? SPFQ_ENOMEM : SPFQ_ECUDA, "%s: %s (%s)",
                          what, cudaGetErrorString(err), cudaGetErrorName(err));
}
#endif

extern "C" {

int32_t spfq_cuda_abi_version(void) { return SPFQ_CUDA_ABI_VERSION; }

const char *spfq_cuda_last_error(void) { return g_err; }

#ifndef SPFQ_CUDA_EMULATE
const char *spfq_cuda_library_info(void)
{
    static char info[160];
    int rt = 0;
    cudaRuntimeGetVersion(&rt);
    snprintf(info, sizeof info, "spfq_cuda abi %d, CUDA runtime %d.%d (static), kernels for%s", SPFQ_CUDA_ABI_VERSION,
             rt / 1000, (rt % 1000) / 10, SPFQ_CUDA_ARCH_LIST);
    return info;
}

int32_t spfq_cuda_device_count(void)
{
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        spfq_cuda_check(err, "cudaGetDeviceCount");
        (void)cudaGetLastError(); /* clear the sticky-free error state */
        return 0;
    }
    return n;
}

int spfq_cuda_device_name(int32_t device, char *buf, size_t len)
{
    if (!buf || !len) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_device_name: no buffer");
    cudaDeviceProp prop;
    int rc = spfq_cuda_check(cudaGetDeviceProperties(&prop, device), "cudaGetDeviceProperties");
    if (rc) return rc;
    snprintf(buf, len, "%s (sm_%d%d, %d SMs, %.1f GiB)", prop.name, prop.major, prop.minor, prop.multiProcessorCount,
             (double)prop.totalGlobalMem / (1024.0 * 1024.0 * 1024.0));
    return SPFQ_OK;
}

int spfq_cuda_set_device(int32_t device) { return spfq_cuda_check(cudaSetDevice(device), "cudaSetDevice"); }

int spfq_cuda_alloc(void **ptr, size_t bytes)
{
    if (!ptr) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_alloc: ptr is NULL");
    *ptr = NULL;
    if (!bytes) return SPFQ_OK;
    return spfq_cuda_check(cudaMalloc(ptr, bytes), "cudaMalloc");
}

int spfq_cuda_free(void *ptr) { return ptr ? spfq_cuda_check(cudaFree(ptr), "cudaFree") : SPFQ_OK; }

int spfq_cuda_copy_h2d(void *dst, const void *src, size_t bytes)
{
    if (!bytes) return SPFQ_OK;
    if (!dst || !src) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_copy_h2d: NULL pointer");
    return spfq_cuda_check(cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice), "cudaMemcpy H2D");
}

int spfq_cuda_copy_d2h(void *dst, const void *src, size_t bytes)
{
    if (!bytes) return SPFQ_OK;
    if (!dst || !src) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_copy_d2h: NULL pointer");
    return spfq_cuda_check(cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
}

int spfq_cuda_memset(void *dst, int value, size_t bytes)
{
    if (!bytes) return SPFQ_OK;
    if (!dst) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_memset: NULL pointer");
    return spfq_cuda_check(cudaMemset(dst, value, bytes), "cudaMemset");
}

int spfq_cuda_synchronize(void *stream)
{
    if (stream) return spfq_cuda_check(cudaStreamSynchronize(spfq_stream(stream)), "cudaStreamSynchronize");
    return spfq_cuda_check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}
#else  /* SPFQ_CUDA_EMULATE: one "device" whose memory is host memory; launches run synchronously */
const char *spfq_cuda_library_info(void)
{
    static char info[96];
    snprintf(info, sizeof info, "spfq_cuda abi %d, host emulation (no GPU)", SPFQ_CUDA_ABI_VERSION);
    return info;
}

int32_t spfq_cuda_device_count(void) { return 1; }

int spfq_cuda_device_name(int32_t device, char *buf, size_t len)
{
    if (!buf || !len) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_device_name: no buffer");
    if (device != 0) return spfq_cuda_fail(SPFQ_ECUDA, "no device %d (host emulation has device 0 only)", device);
    snprintf(buf, len, "host emulation (no GPU: the kernels' per-lane code run on the CPU)");
    return SPFQ_OK;
}

int spfq_cuda_set_device(int32_t device)
{
    return device == 0 ? SPFQ_OK : spfq_cuda_fail(SPFQ_ECUDA, "no device %d (host emulation has device 0 only)", device);
}

int spfq_cuda_alloc(void **ptr, size_t bytes)
{
    if (!ptr) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_alloc: ptr is NULL");
    *ptr = NULL;
    if (!bytes) return SPFQ_OK;
    *ptr = aligned_alloc(256, (bytes + 255) / 256 * 256); /* cudaMalloc's alignment */
    return *ptr ? SPFQ_OK : spfq_cuda_fail(SPFQ_ENOMEM, "out of host memory (%zu bytes)", bytes);
}

int spfq_cuda_free(void *ptr)
{
    free(ptr);
    return SPFQ_OK;
}

static int emu_copy(void *dst, const void *src, size_t bytes, const char *what)
{
    if (!bytes) return SPFQ_OK;
    if (!dst || !src) return spfq_cuda_fail(SPFQ_EINVAL, "%s: NULL pointer", what);
    memcpy(dst, src, bytes);
    return SPFQ_OK;
}

int spfq_cuda_copy_h2d(void *dst, const void *src, size_t bytes) { return emu_copy(dst, src, bytes, "spfq_cuda_copy_h2d"); }

int spfq_cuda_copy_d2h(void *dst, const void *src, size_t bytes) { return emu_copy(dst, src, bytes, "spfq_cuda_copy_d2h"); }

int spfq_cuda_memset(void *dst, int value, size_t bytes)
{
    if (!bytes) return SPFQ_OK;
    if (!dst) return spfq_cuda_fail(SPFQ_EINVAL, "spfq_cuda_memset: NULL pointer");
    memset(dst, value, bytes);
    return SPFQ_OK;
}

int spfq_cuda_synchronize(void *stream)
{
    (void)stream;
    return SPFQ_OK;
}
#endif

} /* extern "C" */

/* Argument checks shared by the dense and sparse int8 GEMMs (the CPU spfq_prepare rules plus
 * the call's). Fills *job; the caller launches when job->m > 0. */
int spfq_cuda_i8_setup(const spfq_weights_desc *w, int32_t m, const int8_t *xq, int32_t *acc_c,
                       int32_t *acc_s, const float *xscale, float *y, int sparse, spfq_i8_job *job)
{
    spfq_cuda_clear_error();
    if (!w) return spfq_cuda_fail(SPFQ_EINVAL, "weights desc is NULL");
    if (w->n <= 0 || w->k <= 0) return spfq_cuda_fail(SPFQ_EINVAL, "bad shape n=%d k=%d", w->n, w->k);
    if (m < 0) return spfq_cuda_fail(SPFQ_EINVAL, "m = %d < 0", m);
    if (!xq) return spfq_cuda_fail(SPFQ_EINVAL, "xq is NULL");
    const int L = w->layout;
    switch (L) {
    case SPFQ_SIGN:
        if (!w->sign) return spfq_cuda_fail(SPFQ_EINVAL, "SIGN weights need sign");
        break;
    case SPFQ_SIGN_MASK:
        if (!w->sign || !w->mask) return spfq_cuda_fail(SPFQ_EINVAL, "SIGN_MASK weights need sign and mask");
        break;
    case SPFQ_PLANES:
        if (!w->planes || w->bits < 2 || w->bits > 8)
            return spfq_cuda_fail(SPFQ_EINVAL, "PLANES weights need planes and bits in 2..8 (bits=%d)", w->bits);
        break;
    case SPFQ_SPARSE:
        if (!w->mask || w->bits < 2 || w->bits > 8 || w->kept_words < 0 || (w->kept_words > 0 && !w->planes))
            return spfq_cuda_fail(SPFQ_EINVAL, "SPARSE weights need mask, kept (planes) and bits in 2..8");
        break;
    default:
        return spfq_cuda_fail(SPFQ_EINVAL, "unknown layout %d", L);
    }
    if (sparse != (L == SPFQ_SPARSE))
        return spfq_cuda_fail(SPFQ_EUNSUPPORTED, sparse ? "spfq_cuda_matmul_sparse_i8 takes SPARSE weights only"
                                                        : "SPARSE weights go to spfq_cuda_matmul_sparse_i8");
    const int two = (L == SPFQ_PLANES || L == SPFQ_SPARSE);
    spfq_i8_job j = {};
    j.d = *w;
    j.m = m;
    j.W = spfq_words(w->k);
    j.xq = xq;
    j.x_aligned = ((uintptr_t)xq % 4 == 0) && (w->k % 4 == 0);
    if (y) { /* epilogue form */
        if (!xscale) return spfq_cuda_fail(SPFQ_EINVAL, "xscale is NULL");
        if (!w->scale) return spfq_cuda_fail(SPFQ_EINVAL, "scale is NULL");
        j.xscale = xscale;
        j.y = y;
        j.need_c = two;
        j.need_s = !two || w->lam != NULL; /* int layouts without lam need acc_c only */
    } else {
        if (!acc_c && !acc_s) return spfq_cuda_fail(SPFQ_EINVAL, "acc_c and acc_s are both NULL");
        j.acc_c = acc_c;
        j.acc_s = acc_s;
        j.need_c = two && acc_c;
        j.need_s = !two || acc_s; /* SIGN / SIGN_MASK: acc_c is a copy of acc_s */
    }
    *job = j;
    return SPFQ_OK;
}

int spfq_cuda_i8_run(const spfq_weights_desc *w, int32_t m, const int8_t *xq, int32_t *acc_c, int32_t *acc_s,
                     const float *xscale, float *y, int want_y, int sparse, spfq_i8_launch launch, void *stream)
{
    if (want_y && !y) return spfq_cuda_fail(SPFQ_EINVAL, "y is NULL");
    spfq_i8_job j;
    const int rc = spfq_cuda_i8_setup(w, m, xq, acc_c, acc_s, xscale, y, sparse, &j);
    if (rc) return rc;
    return j.m ? launch(j, stream) : SPFQ_OK;
}
