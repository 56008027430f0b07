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
// Requires 0 < rows <= 2^32 and 0 < cols <= 2^32 (every index fits in uint32; the binding returns early on
// empty tensors); x and y must not overlap.
// Returns cudaErrorInvalidValue for an unknown dtype or out-of-range sizes, otherwise the launch status.
cudaError_t ttk_dropout_launch(ttk_dtype dtype, const void* x, void* y, int64_t rows, int64_t cols, uint64_t seed,
                               uint32_t threshold, float scale, cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
