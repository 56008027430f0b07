// grad_dy.cu: step 4 of the adapter, one pass over dY giving dU = scaling * dY B^T and the pieces of
// dB = scaling * U^T dY.
//
//   dy: (M, N) contiguous, U: (M, rb), B: (rb, N), dU: (M, rb), all of one storage type T
//   dB_buf: fp32. Atomic mode: (rb, N), zeroed by the caller, every block adds its rows' U^T dY into it.
//           Deterministic mode: (blocks, rb, N), block b writes U_b^T dY_b (every element, no zeroing
//           needed) and csrc/lowrank.cu's finalize kernel sums the blocks in order.
//   The caller applies scaling to dB (the finalize kernel does) and rounds it to T.
//
// Launch: one block of 256 threads per ROWS rows of dY (64, or 32 for ranks above 64, to stay within 48 KiB of
// shared memory). U's rows stay in shared memory; the block walks N in steps of 32 columns: the 32-column tile
// of dY and of B^T go to shared memory (fp32), each thread adds to its (ROWS / 16) x (RP / 16) piece of dU
// (registers, kept across the whole pass) and computes RP / 8 elements of this tile's U^T dY.
// Limits: 1 <= M, 1 <= N, 1 <= rb <= 128.
// Checked by: tests/test_cuda_backend.py against the float64 reference on a GPU (both modes, and bitwise
// repeatability of the deterministic one); on a machine without a GPU it is compiled, not run.
#include <limits.h>
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 32;  // columns of dY per step

template <int RP>
constexpr int rows_per_block() {
  return RP >= 128 ? 32 : 64;
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads)
    grad_dy_kernel(const T* __restrict__ dy, const T* __restrict__ U, const T* __restrict__ B, T* __restrict__ dU,
                   float* __restrict__ dB_buf, int deterministic, int64_t M, int64_t N, int rb, float scaling) {
  constexpr int kRows = rows_per_block<RP>();
  constexpr int kRowGroups = kThreads / 16;
  constexpr int kRowsPerThread = kRows / kRowGroups;
  constexpr int kRanksPerThread = RP / 16;
  constexpr int kWarps = kThreads / 32;
  constexpr int kDbPerThread = RP / kWarps;
  static_assert(kCols == 32, "the dB mapping gives each lane one column of the tile");
  static_assert((kRows * (kCols + 1) + kCols * (RP + 1) + kRows * RP) * 4 <= 48 * 1024, "shared memory");
  __shared__ float dys[kRows * (kCols + 1)];  // [i][n]
  __shared__ float bs[kCols * (RP + 1)];      // [n][j] = B[j][n0 + n]
  __shared__ float us[kRows * RP];            // [i][j]

  const int tid = threadIdx.x;
  const int col = tid % 16;
  const int row_group = tid / 16;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  for (int e = tid; e < kRows * RP; e += kThreads) {
    const int i = e / RP;
    const int j = e % RP;
    const int64_t row = row0 + i;
    us[e] = (row < M && j < rb) ? to_float(U[row * rb + j]) : 0.0f;
  }

  float acc[kRowsPerThread][kRanksPerThread];
#pragma unroll
  for (int w = 0; w < kRowsPerThread; ++w)
#pragma unroll
    for (int q = 0; q < kRanksPerThread; ++q) acc[w][q] = 0.0f;

  float* out = deterministic ? dB_buf + static_cast<int64_t>(blockIdx.x) * rb * N : dB_buf;
  for (int64_t n0 = 0; n0 < N; n0 += kCols) {
    __syncthreads();  // the previous tiles are consumed (and us is visible on the first step)
    for (int e = tid; e < kRows * kCols; e += kThreads) {
      const int i = e / kCols;
      const int n = e % kCols;
      const int64_t row = row0 + i;
      dys[i * (kCols + 1) + n] = (row < M && n0 + n < N) ? to_float(dy[row * N + n0 + n]) : 0.0f;
    }
    for (int e = tid; e < RP * kCols; e += kThreads) {
      const int j = e / kCols;  // consecutive threads read consecutive columns of B's row j
      const int n = e % kCols;
      bs[n * (RP + 1) + j] = (j < rb && n0 + n < N) ? to_float(B[j * N + n0 + n]) : 0.0f;
    }
    __syncthreads();

    // dU += dY_tile B_tile^T
    for (int n = 0; n < kCols; ++n) {
      float dv[kRowsPerThread];
#pragma unroll
      for (int w = 0; w < kRowsPerThread; ++w) dv[w] = dys[(row_group + kRowGroups * w) * (kCols + 1) + n];
#pragma unroll
      for (int q = 0; q < kRanksPerThread; ++q) {
        const float bv = bs[n * (RP + 1) + col + 16 * q];
#pragma unroll
        for (int w = 0; w < kRowsPerThread; ++w) acc[w][q] = fmaf(dv[w], bv, acc[w][q]);
      }
    }

    // this tile's U^T dY: lane = column n, ranks warp, warp + kWarps, ...
    float db[kDbPerThread];
#pragma unroll
    for (int q = 0; q < kDbPerThread; ++q) db[q] = 0.0f;
    for (int i = 0; i < kRows; ++i) {
      const float dv = dys[i * (kCols + 1) + lane];
#pragma unroll
      for (int q = 0; q < kDbPerThread; ++q) db[q] = fmaf(us[i * RP + warp + kWarps * q], dv, db[q]);
    }
    const int64_t n = n0 + lane;
    if (n < N) {
#pragma unroll
      for (int q = 0; q < kDbPerThread; ++q) {
        const int j = warp + kWarps * q;
        if (j >= rb) continue;
        if (deterministic) {
          out[j * N + n] = db[q];
        } else {
          atomicAdd(out + j * N + n, db[q]);
        }
      }
    }
  }

#pragma unroll
  for (int w = 0; w < kRowsPerThread; ++w) {
    const int64_t row = row0 + row_group + kRowGroups * w;
    if (row >= M) continue;
#pragma unroll
    for (int q = 0; q < kRanksPerThread; ++q) {
      const int j = col + 16 * q;
      if (j < rb) dU[row * rb + j] = from_float<T>(scaling * acc[w][q]);
    }
  }
}

template <int RP>
int64_t blocks_for(int64_t M) {
  return ceil_div(M, rows_per_block<RP>());
}

}  // namespace
}  // namespace ttkernels

extern "C" int64_t ttk_grad_dy_blocks(int64_t M, int64_t rb) {
  using namespace ttkernels;
  int64_t blocks = 0;
  dispatch_rank(rb, [&](auto rp) {
    blocks = blocks_for<decltype(rp)::value>(M);
    return cudaSuccess;
  });
  return blocks;
}

extern "C" cudaError_t ttk_grad_dy_launch(ttk_dtype dtype, const void* dy, const void* U, const void* B, void* dU,
                                          float* dB_buf, int deterministic, int64_t M, int64_t N, int64_t rb,
                                          float scaling, cudaStream_t stream) {
  using namespace ttkernels;
  if (M <= 0 || N <= 0 || rb < 1 || rb > kMaxRank) return cudaErrorInvalidValue;
  if (ttk_grad_dy_blocks(M, rb) > INT_MAX) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_rank(rb, [&](auto rp) {
      constexpr int RP = decltype(rp)::value;
      const dim3 grid(static_cast<unsigned>(blocks_for<RP>(M)));
      auto* kernel = grad_dy_kernel<T, RP>;
      TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(dy), static_cast<const T*>(U),
                 static_cast<const T*>(B), static_cast<T*>(dU), dB_buf, deterministic, M, N, static_cast<int>(rb),
                 scaling);
      return TTK_LAST_ERROR();
    });
  });
}
