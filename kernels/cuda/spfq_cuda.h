/* spfq_cuda.h — plain C ABI of the CUDA packed-GEMM kernels (GitHub issue 7, part 1).
 *
 * Same value semantics and packed layouts as the CPU ABI (../include/spfq_kernels.h): 64-bit
 * little-endian words along K, bit j of a row in bit j%64 of word j/64, rows zero-padded to
 * W = ceil(K/64) words; SIGN / SIGN_MASK / PLANES / SPARSE as described there.
 *
 * Every array argument is a DEVICE pointer (cudaMalloc'd, or spfq_cuda_alloc'd), including the
 * ones inside spfq_weights_desc (sign, mask, planes/kept, scale, lam, bias); only the desc struct
 * itself is read on the host, at call time (nothing is retained). `stream` is a cudaStream_t
 * passed as void* (NULL = the default stream) so that the header needs no CUDA headers and the
 * library loads with ctypes. Launches are asynchronous on that stream; call
 * spfq_cuda_synchronize(stream) (or a copy helper, which synchronises) before reading results.
 *
 * Status codes are the CPU ABI's (SPFQ_OK / SPFQ_EINVAL / SPFQ_ENOMEM / SPFQ_EUNSUPPORTED) plus
 * SPFQ_ECUDA for a CUDA runtime error; spfq_cuda_last_error() describes the last failure of the
 * calling host thread (argument errors included).
 */
#ifndef SPFQ_CUDA_H
#define SPFQ_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../include/spfq_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define SPFQ_CUDA_ABI_VERSION 1
#define SPFQ_ECUDA 16 /* a CUDA runtime / launch error: see spfq_cuda_last_error() */

/* ---- runtime helpers (so that a ctypes caller needs nothing but this library) ---- */
int32_t spfq_cuda_abi_version(void);
/* "spfq_cuda abi 1, CUDA runtime 13.0 (static), kernels for sm_80 sm_90", or "..., host emulation
 * (no GPU)" for the SPFQ_CUDA_EMULATE test build (same ABI, host memory, kernels' lane code on the CPU). */
const char *spfq_cuda_library_info(void);
/* Number of CUDA devices; 0 when there is no driver, no device, or any runtime error. */
int32_t spfq_cuda_device_count(void);
/* Message of the calling thread's last failure ("" if none). Valid until the next call. */
const char *spfq_cuda_last_error(void);
/* "NVIDIA H100 80GB HBM3 (sm_90, 132 SMs, 79.1 GiB)" into buf (truncated to len - 1). */
int spfq_cuda_device_name(int32_t device, char *buf, size_t len);
int spfq_cuda_set_device(int32_t device);
int spfq_cuda_alloc(void **ptr, size_t bytes);               /* *ptr = NULL for bytes == 0 */
int spfq_cuda_free(void *ptr);                               /* NULL is a no-op */
int spfq_cuda_copy_h2d(void *dst_dev, const void *src_host, size_t bytes); /* synchronous */
int spfq_cuda_copy_d2h(void *dst_host, const void *src_dev, size_t bytes); /* synchronous */
int spfq_cuda_memset(void *dst_dev, int value, size_t bytes);
int spfq_cuda_synchronize(void *stream);                     /* NULL: the whole device */

/* ---- XNOR / popcount ----
 * w_sign (N, W) sign bits of SIGN weights, xbits (M, W) activation sign bits (bit 1 = negative,
 * padding bits zero on both sides): dot[m,n] = K - 2*popcount(xbits[m] XOR w_sign[n]) exactly.
 * y[m,n] = xscale[m] * scale[n] * dot + bias[n] (xscale NULL = 1, bias NULL = 0; the product is
 * evaluated left to right without FMA contraction). If ybits != NULL, bit n of row m (layout
 * (M, ceil(N/64)), must be zeroed or hold old bits: each bit is set / cleared atomically) =
 * (y < 0). dot, y, ybits may each be NULL (at least one is required); scale is required when
 * y or ybits is requested. */
int spfq_cuda_bgemm(int32_t m, int32_t n, int32_t k, const uint64_t *w_sign, const uint64_t *xbits,
                    const float *xscale, const float *scale, const float *bias, int32_t *dot,
                    float *y, uint64_t *ybits, void *stream);

/* ---- int8 activations, exact int32 sums ----
 * w: a desc of layout SIGN, SIGN_MASK or PLANES (SPARSE is routed to spfq_cuda_matmul_sparse_i8)
 * with device pointers; xq (M, K) int8 row-major.
 *   acc_c[m,n] = sum_k xq*c,  acc_s[m,n] = sum_k xq*sign(c)   (int32, two's complement wrap)
 * _raw: acc_c and/or acc_s (either may be NULL, not both; for SIGN / SIGN_MASK acc_c == acc_s).
 * spfq_cuda_matmul_i8: y (M, N) float = xscale[m] * v + bias[n] where, exactly as the CPU
 * epilogue: v = scale*acc_s (SIGN / SIGN_MASK; lam ignored), scale*acc_c (PLANES / SPARSE without
 * lam), scale*acc_c + (lam - scale)*acc_s (with lam); float ops in that order, no FMA. */
int spfq_cuda_matmul_i8_raw(const spfq_weights_desc *w, int32_t m, const int8_t *xq,
                            int32_t *acc_c, int32_t *acc_s, void *stream);
int spfq_cuda_matmul_i8(const spfq_weights_desc *w, int32_t m, const int8_t *xq,
                        const float *xscale, float *y, void *stream);

/* ---- SPARSE layout (mask (N,W) + kept (b,N,Wk) in desc->mask / desc->planes) ----
 * Same outputs as above; all-zero 64-column mask blocks are skipped (read nothing). Fields past
 * Wk*64 (a corrupt mask) are never read and count as 0, as on the CPU. */
int spfq_cuda_matmul_sparse_i8_raw(const spfq_weights_desc *w, int32_t m, const int8_t *xq,
                                   int32_t *acc_c, int32_t *acc_s, void *stream);
int spfq_cuda_matmul_sparse_i8(const spfq_weights_desc *w, int32_t m, const int8_t *xq,
                               const float *xscale, float *y, void *stream);

/* ---- activation quantiser (bit-exact with spfq_quantize_i8) ----
 * Per row: xscale = max|x| / 127.0f (IEEE division; quiet NaNs ignored by the max), xq =
 * round-half-away-from-zero(x / xscale) clamped to [-127, 127]; 0 where xscale == 0 or the
 * quotient is NaN. x (M, K) float, xq (M, K) int8, xscale (M) float, all device pointers. */
int spfq_cuda_quantize_i8(int32_t m, int32_t k, const float *x, int8_t *xq, float *xscale,
                          void *stream);

#ifdef __cplusplus
}
#endif
#endif /* SPFQ_CUDA_H */
