// dropout.cu: dropout of a contiguous 2-D tensor from a seed, with the counter-based hash of dropout_hash.cuh.
//
//   y[row, col] = keep(seed, row, col) ? x[row, col] * scale : 0,   x, y: (rows, cols), fp32 / fp16 / bf16
//
// No mask is stored or read: the mask is a pure function of (seed, row, col), so a backward pass or another
// kernel (a fused shrink GEMM) can regenerate it. The product is computed in fp32 and rounded to nearest
// (even) in the output dtype, which is what x.float() * scale followed by .to(dtype) does in torch; a dropped
// element is +0 whatever x holds (NaN and inf included).
//
// Launch shape: a block is (tx, ty) threads with tx * ty = 256, tx the power of two in [32, 256] that fits the
// row length, so short rows still fill a block; blocks stride over rows (grid.x) and over column chunks
// (grid.y), each thread hashes its row once and reuses it for about 8 columns. Scalar loads: the op is
// memory-bound and this kernel is the minimal reference point, not the tuned path.
// Limits: 0 < rows <= 2^32, 0 < cols <= 2^32 (the hash takes each index as uint32); x and y must not overlap.
// Checked by: tests/test_cuda_extension.py on a GPU (bit-exact keep mask and values against a pure-torch
// copy of the hash, fp32/fp16/bf16, empty/1x1/prime shapes). On the build machine it is compiled, not run.
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreadsPerBlock = 256;
constexpr int kColsPerThread = 8;     // columns a thread handles per row, before striding to the next chunk
constexpr unsigned kMaxGridY = 65535;  // hardware limit of gridDim.y
constexpr unsigned kMaxGridX = 0x7fffffffU;

template <typename T>
__global__ void __launch_bounds__(kThreadsPerBlock)
    dropout_kernel(const T* __restrict__ x, T* __restrict__ y, int64_t rows, int64_t cols,
                   const int64_t* __restrict__ seed_ptr, uint32_t threshold, float scale) {
  const uint64_t seed = static_cast<uint64_t>(*seed_ptr);  // read on the device (bits as uint64)
  const int64_t row_stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  const int64_t col_stride = static_cast<int64_t>(gridDim.y) * blockDim.x;
  const int64_t col_start = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < rows; row += row_stride) {
    const uint32_t h = dropout_row_hash(seed, static_cast<uint32_t>(row));
    const T* x_row = x + row * cols;
    T* y_row = y + row * cols;
    for (int64_t col = col_start; col < cols; col += col_stride) {
      const float v = to_float(x_row[col]);
      const bool keep = dropout_keep(h, static_cast<uint32_t>(col), threshold);
      y_row[col] = from_float<T>(keep ? v * scale : 0.0f);
    }
  }
}

template <typename T>
cudaError_t launch(const void* x, void* y, int64_t rows, int64_t cols, const int64_t* seed, uint32_t threshold,
                   float scale, cudaStream_t stream) {
  int tx = 32;
  while (tx < kThreadsPerBlock && tx < cols) tx *= 2;
  const int ty = kThreadsPerBlock / tx;
  const int64_t row_blocks = (rows + ty - 1) / ty;
  const int64_t cols_per_block = static_cast<int64_t>(tx) * kColsPerThread;
  const int64_t col_blocks = (cols + cols_per_block - 1) / cols_per_block;
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  const dim3 grid(static_cast<unsigned>(row_blocks < kMaxGridX ? row_blocks : kMaxGridX),
                  static_cast<unsigned>(col_blocks < kMaxGridY ? col_blocks : kMaxGridY));
  auto* kernel = dropout_kernel<T>;
  TTK_LAUNCH(kernel, grid, block, stream, static_cast<const T*>(x), static_cast<T*>(y), rows, cols, seed, threshold,
             scale);
  return TTK_LAST_ERROR();
}

}  // namespace
}  // namespace ttkernels

extern "C" cudaError_t ttk_dropout_launch(ttk_dtype dtype, const void* x, void* y, int64_t rows, int64_t cols,
                                          const int64_t* seed, uint32_t threshold, float scale, cudaStream_t stream) {
  constexpr int64_t kMaxIndex = int64_t{1} << 32;
  if (rows <= 0 || cols <= 0 || rows > kMaxIndex || cols > kMaxIndex || seed == nullptr) return cudaErrorInvalidValue;
  switch (dtype) {
    case TTK_DTYPE_FLOAT32:
      return ttkernels::launch<float>(x, y, rows, cols, seed, threshold, scale, stream);
    case TTK_DTYPE_FLOAT16:
      return ttkernels::launch<__half>(x, y, rows, cols, seed, threshold, scale, stream);
    case TTK_DTYPE_BFLOAT16:
      return ttkernels::launch<__nv_bfloat16>(x, y, rows, cols, seed, threshold, scale, stream);
  }
  return cudaErrorInvalidValue;
}
