// token_reduce.cu: reductions over tokens, out[g] = sum over rows of group g of drop(X)[row]^T Y[row].
//
//   X: (M, I) contiguous, Y: (M, R) contiguous, one storage type T; drop is the hash dropout (optional)
//   groups: absent (one group) or (M,) int64 group ids in [0, G)
//   buf: fp32 (parts, G, I, R), zeroed by the caller; parts = 1 (atomic mode) or `splits` (deterministic mode:
//        split s adds only into buf[s], and csrc/lowrank.cu's finalize kernel sums the splits in order)
//
// Uses: step 7, dA = drop(x)^T dS (X = x, Y = dS, one group); step 5's dC = S^T dU (X = S, Y = dU), one group
// for a shared C, or grouped by task_ids for a per-sample C (ids of a sample are consecutive rows, so a block
// flushes its partial sums only when the id changes).
//
// Launch: grid (ceil(I / 64), splits); a block owns 64 columns of X and a contiguous range of rows; each of its
// 256 threads keeps RP / 4 sums in registers (one column of X, ranks r, r + 4, ...). Rows are staged 32 at a
// time through shared memory (fp32, drop(X) rounded to T as the reference rounds it). A row whose group id is
// out of range is skipped (the binding checks ids before launch when it can; see shrink.cu).
// Limits: 1 <= M, I <= 2^32, 1 <= R <= 128.
// Checked by: tests/test_cuda_backend.py against the float64 reference on a GPU; compiled, not run, without one.
#include <limits.h>
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kColsPerBlock = 64;
constexpr int kRowStep = 32;
constexpr int kMinRowsPerSplit = 256;

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads)
    token_reduce_kernel(const T* __restrict__ X, const T* __restrict__ Y, const int64_t* __restrict__ groups,
                        int64_t num_groups, float* __restrict__ buf, int deterministic, int64_t M, int64_t I, int R,
                        int64_t rows_per_split, DropoutArgs drop) {
  constexpr int kRankGroups = kThreads / kColsPerBlock;  // 4
  constexpr int kSums = RP / kRankGroups;
  __shared__ float xs[kRowStep * kColsPerBlock];  // [r][c]
  __shared__ float ys[kRowStep * RP];             // [r][j]
  __shared__ uint32_t hs[kRowStep];
  __shared__ int64_t gs[kRowStep];

  const int tid = threadIdx.x;
  const int c = tid % kColsPerBlock;
  const int jg = tid / kColsPerBlock;  // warp-uniform: ranks jg, jg + 4, ...
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kColsPerBlock;
  const int64_t i = col0 + c;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r_end = r_begin + rows_per_split < M ? r_begin + rows_per_split : M;
  float* out = buf + (deterministic ? static_cast<int64_t>(blockIdx.y) * num_groups * I * R : 0);

  float acc[kSums];
#pragma unroll
  for (int q = 0; q < kSums; ++q) acc[q] = 0.0f;
  int64_t cur = groups != nullptr ? -1 : 0;  // the group acc holds sums of

  auto flush = [&]() {
    if (cur >= 0 && cur < num_groups && i < I) {
      float* dst = out + (cur * I + i) * R;
#pragma unroll
      for (int q = 0; q < kSums; ++q) {
        const int j = jg + kRankGroups * q;
        if (j >= R) continue;
        if (deterministic) {
          dst[j] += acc[q];  // this (split, column, rank) belongs to this thread alone
        } else {
          atomicAdd(dst + j, acc[q]);
        }
      }
    }
#pragma unroll
    for (int q = 0; q < kSums; ++q) acc[q] = 0.0f;
  };

  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowStep) {
    __syncthreads();  // the previous rows are consumed
    if (tid < kRowStep) {
      const int64_t row = r0 + tid;
      if (drop.enabled) hs[tid] = dropout_row_hash(drop.seed, static_cast<uint32_t>(row));
      gs[tid] = (groups != nullptr && row < r_end) ? groups[row] : 0;
    }
    __syncthreads();
    for (int e = tid; e < kRowStep * kColsPerBlock; e += kThreads) {
      const int r = e / kColsPerBlock;
      const int cc = e % kColsPerBlock;
      const int64_t row = r0 + r;
      const int64_t col = col0 + cc;
      float v = 0.0f;
      if (row < r_end && col < I) {
        v = to_float(X[row * I + col]);
        if (drop.enabled) {
          v = dropout_keep(hs[r], static_cast<uint32_t>(col), drop.threshold) ? round_trip<T>(v * drop.scale) : 0.0f;
        }
      }
      xs[e] = v;
    }
    for (int e = tid; e < kRowStep * RP; e += kThreads) {
      const int r = e / RP;
      const int j = e % RP;
      const int64_t row = r0 + r;
      ys[e] = (row < r_end && j < R) ? to_float(Y[row * R + j]) : 0.0f;
    }
    __syncthreads();
    const int rows = r_end - r0 < kRowStep ? static_cast<int>(r_end - r0) : kRowStep;
    for (int r = 0; r < rows; ++r) {
      if (groups != nullptr && gs[r] != cur) {  // the same for every thread of the block
        flush();
        cur = gs[r];
      }
      const float xv = xs[r * kColsPerBlock + c];
#pragma unroll
      for (int q = 0; q < kSums; ++q) acc[q] = fmaf(xv, ys[r * RP + jg + kRankGroups * q], acc[q]);
    }
  }
  flush();
}

}  // namespace
}  // namespace ttkernels

// Row splits of a reduction over M rows and I columns: enough blocks for about two per SM, at least 256 rows
// each; a function of the shape and the SM count only, so the deterministic mode repeats bit for bit.
extern "C" int64_t ttk_token_reduce_splits(int64_t M, int64_t I, int num_sms) {
  using namespace ttkernels;
  const int64_t col_blocks = ceil_div(I, kColsPerBlock);
  int64_t splits = ceil_div(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), col_blocks);
  const int64_t most = ceil_div(M, kMinRowsPerSplit);
  if (splits > most) splits = most;
  if (splits > 65535) splits = 65535;
  return splits < 1 ? 1 : splits;
}

extern "C" cudaError_t ttk_token_reduce_launch(ttk_dtype dtype, const void* X, const void* Y, const int64_t* groups,
                                               int64_t num_groups, float* buf, int64_t splits, int deterministic,
                                               int64_t M, int64_t I, int64_t R, int dropout, uint64_t seed,
                                               uint32_t threshold, float scale, cudaStream_t stream) {
  using namespace ttkernels;
  constexpr int64_t kMaxIndex = int64_t{1} << 32;
  if (M <= 0 || I <= 0 || M > kMaxIndex || I > kMaxIndex || R < 1 || R > kMaxRank) return cudaErrorInvalidValue;
  if (num_groups < 1 || splits < 1 || splits > 65535 || ceil_div(I, kColsPerBlock) > INT_MAX) {
    return cudaErrorInvalidValue;
  }
  // rows per split: a multiple of the row step, so that splits never share a row
  const int64_t rows_per_split = ceil_div(ceil_div(M, splits), kRowStep) * kRowStep;
  const DropoutArgs drop = make_dropout(dropout, seed, threshold, scale);
  const dim3 grid(static_cast<unsigned>(ceil_div(I, kColsPerBlock)), static_cast<unsigned>(splits));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_rank(R, [&](auto rp) {
      constexpr int RP = decltype(rp)::value;
      auto* kernel = token_reduce_kernel<T, RP>;
      TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(X), static_cast<const T*>(Y), groups,
                 num_groups, buf, deterministic, M, I, static_cast<int>(R), rows_per_split, drop);
      return TTK_LAST_ERROR();
    });
  });
}
