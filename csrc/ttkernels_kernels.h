// ttkernels_kernels.h: plain C launch interface of the ttkernels CUDA kernels.
//
// The kernels (csrc/*.cu) include no torch headers and the torch binding (csrc/bindings.cpp) includes no
// kernel code; this header is the only thing they share. Every launcher takes raw device pointers, sizes and
// a stream, launches asynchronously on that stream, and returns the launch status (cudaGetLastError()); it
// does no argument checking beyond what it needs to pick a kernel: the binding checks shapes, dtypes and
// devices before it calls a launcher.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Element types a launcher accepts. The values are part of no ABI outside this library.
typedef enum {
  TTK_DTYPE_FLOAT32 = 0,
  TTK_DTYPE_FLOAT16 = 1,
  TTK_DTYPE_BFLOAT16 = 2,
} ttk_dtype;

// y[row, col] = keep(seed, row, col) ? x[row, col] * scale : 0, for a contiguous (rows, cols) x and y of the
// same dtype (see dropout_hash.cuh for keep). threshold is floor(p * 2^32), scale is fp32(1 / (1 - p)).
// `seed` points to one int64 in device memory, read by the kernel on the device (never by the host: a captured
// CUDA graph hashes the value it holds at each replay); its 64 bits are hashed as uint64, so a negative value
// gives the mask of value + 2^64 (the kernels cannot raise: callers check the range).
// Requires 0 < rows <= 2^32 and 0 < cols <= 2^32 (every index fits in uint32; the binding returns early on
// empty tensors); x and y must not overlap.
// Returns cudaErrorInvalidValue for an unknown dtype, out-of-range sizes or a null seed, otherwise the launch
// status.
cudaError_t ttk_dropout_launch(ttk_dtype dtype, const void* x, void* y, int64_t rows, int64_t cols,
                               const int64_t* seed, uint32_t threshold, float scale, cudaStream_t stream);

// ---------------------------------------------------------------------------------------- adapter ops
// The steps of docs/design.md section 2 (see each .cu file's header for shapes, numerics and launch shape). All
// tensors are contiguous and of the one storage type `dtype`, except task_ids / groups (int64) and the fp32
// reduction buffers. `dropout` != 0 turns the hash dropout on with (seed, threshold, scale) as in
// ttk_dropout_launch (the seed pointer must then be non-null; without dropout it is not read and may be null).
// Sizes: M rows (tokens) >= 1 (the binding returns early for M = 0); ranks 1..128.
// Each returns cudaErrorInvalidValue for arguments out of these ranges, otherwise the launch status.

// Step 2 (shrink.cu): S = drop(x) A, and U = S C when C is given (shared, or per row by task_ids). When
// ttk_shrink_splits(M, K, ra, num_sms) > 1 (few rows: split-K), `partial` is an fp32 (splits, M, ra) workspace
// (every element written, no zeroing); otherwise it must be null.
int64_t ttk_shrink_splits(int64_t M, int64_t K, int64_t ra, int num_sms);
cudaError_t ttk_shrink_launch(ttk_dtype dtype, const void* x, const void* A, const void* C, const int64_t* task_ids,
                              int64_t num_tasks, void* S, void* U, float* partial, int num_sms, int64_t M, int64_t K,
                              int64_t ra, int64_t rb, int dropout, const int64_t* seed, uint32_t threshold, float scale,
                              cudaStream_t stream);

// Step 4 (grad_dy.cu): dU = scaling * dY B^T and the fp32 pieces of U^T dY, on a grid of `slices` column slices
// x `splits` row splits, both functions of (M, N, rb, deterministic, num_sms) only. dU_buf: fp32
// (slices, M, rb) when slices > 1 (every element written; summed in order into dU by the caller), else null and
// the kernel writes dU. dB_buf: fp32 (rb, N), zeroed, with atomics; or, deterministic, (splits, rb, N), every
// element written, summed in order by the caller; its size does not grow with M.
int64_t ttk_grad_dy_slices(int64_t M, int64_t N, int64_t rb, int num_sms);
int64_t ttk_grad_dy_splits(int64_t M, int64_t N, int64_t rb, int deterministic, int num_sms);
cudaError_t ttk_grad_dy_launch(ttk_dtype dtype, const void* dy, const void* U, const void* B, void* dU,
                               float* dU_buf, float* dB_buf, int deterministic, int num_sms, int64_t M, int64_t N,
                               int64_t rb, float scaling, cudaStream_t stream);

// Steps 5 and 7 (token_reduce.cu): buf[g] += drop(X)^T Y over the rows of group g, split over `splits` row
// ranges; buf is (deterministic ? splits : 1, num_groups, I, R) fp32, zeroed by the caller.
int64_t ttk_token_reduce_splits(int64_t M, int64_t I, int num_sms);
cudaError_t ttk_token_reduce_launch(ttk_dtype dtype, const void* X, const void* Y, const int64_t* groups,
                                    int64_t num_groups, float* buf, int64_t splits, int deterministic, int64_t M,
                                    int64_t I, int64_t R, int dropout, const int64_t* seed, uint32_t threshold,
                                    float scale, cudaStream_t stream);

// Steps 3 and 6, expand and grad_x (accumulate.cu): out += drop'(scaling * U Bm) in place, Bm (R, N) read with
// strides (bsk, bsn).
cudaError_t ttk_accumulate_launch(ttk_dtype dtype, void* out, const void* U, const void* Bm, int64_t bsk,
                                  int64_t bsn, int64_t M, int64_t N, int64_t R, float scaling, int dropout,
                                  const int64_t* seed, uint32_t threshold, float scale, cudaStream_t stream);

// Step mid's U = S C and step 5's (grad_mid) dS = dU C^T (rowmix.cu): out[row] = in[row] C(row) (or C(row)^T
// when transposed).
cudaError_t ttk_rowmix_launch(ttk_dtype dtype, const void* in, const void* C, const int64_t* task_ids,
                              int64_t num_tasks, int transposed, void* out, int64_t M, int64_t r_in, int64_t r_out,
                              cudaStream_t stream);

// out[e] = round(scale * sum_p buf[p * n + e]) for e < n, p = 0 .. parts - 1 in order (finalize.cu).
cudaError_t ttk_finalize_launch(ttk_dtype dtype, const float* buf, int64_t parts, int64_t n, float scale, void* out,
                                cudaStream_t stream);

// ------------------------------------------------------------------------- TT-matrix Kronecker-sum apply
// ttm.cu, the small-bond-rank path (1 <= R <= 16, 1 <= NI, NA <= 64, NJ, NC >= 1, M >= 1): x (M, NI, NJ) and dy
// (M, NA, NC) read through element strides (sx*, sd*; any values >= 0), q (R, NA, NI) and p (R, NJ, NC) contiguous,
// all of storage type `dtype`, fp32 accumulation.
// y (M, NA, NC) contiguous = sum_r q[r] (x p[r]) per token.
cudaError_t ttk_kron_apply_launch(ttk_dtype dtype, const void* x, int64_t sxb, int64_t sxi, int64_t sxj, const void* q,
                                  const void* p, void* y, int64_t M, int64_t R, int64_t NI, int64_t NJ, int64_t NA,
                                  int64_t NC, cudaStream_t stream);
// dq = sum over tokens of dy^T (x p[r]): split s writes all of dq_buf[s] (R, NA, NI) fp32 (no zeroing needed);
// the caller sums the `splits` pieces in order (ttk_finalize_launch), or passes dq itself when splits == 1.
int64_t ttk_kron_grad_q_splits(int64_t M, int64_t R, int num_sms);
cudaError_t ttk_kron_grad_q_launch(ttk_dtype dtype, const void* dy, int64_t sdb, int64_t sda, int64_t sdc,
                                   const void* x, int64_t sxb, int64_t sxi, int64_t sxj, const void* p, float* dq_buf,
                                   int64_t splits, int64_t M, int64_t R, int64_t NI, int64_t NJ, int64_t NA,
                                   int64_t NC, cudaStream_t stream);
// dp = sum over tokens of (q[r] x)^T dy: split s writes all of dp_buf[s] (R, NJ, NC) fp32, as for dq.
int64_t ttk_kron_grad_p_splits(int64_t M, int64_t R, int64_t NJ, int64_t NC, int num_sms);
cudaError_t ttk_kron_grad_p_launch(ttk_dtype dtype, const void* dy, int64_t sdb, int64_t sda, int64_t sdc,
                                   const void* x, int64_t sxb, int64_t sxi, int64_t sxj, const void* q, float* dp_buf,
                                   int64_t splits, int64_t M, int64_t R, int64_t NI, int64_t NJ, int64_t NA,
                                   int64_t NC, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
