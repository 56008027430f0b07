// token_reduce.cu: reductions over tokens, out[g] = sum over rows of group g of drop(X)[row]^T Y[row].
//
//   X: (M, I) contiguous, Y: (M, R) contiguous, one storage type T; drop is the hash dropout (optional)
//   groups: absent (one group) or (M,) int64 group ids in [0, G)
//   buf: fp32 (parts, G, I, R), zeroed by the caller; parts = 1 (atomic mode) or `splits` (deterministic mode:
//        split s adds only into buf[s], and csrc/finalize.cu's kernel sums the splits in order)
//
// Uses: step 7, dA = drop(x)^T dS (X = x, Y = dS, one group); step 5's dC = S^T dU (X = S, Y = dU), one group
// for a shared C, or grouped by task_ids for a per-sample C (ids of a sample are consecutive rows, so a block
// flushes its partial sums only when the id changes).
//
// Launch: grid (ceil(I / 64), splits); a block owns 64 columns of X and a contiguous range of rows. fp32 and the
// grouped reduction (token_reduce_kernel): each of the 256 threads keeps RP / 4 sums in registers (one column of
// X, ranks r, r + 4, ...); rows are staged 32 at a time through shared memory (fp32, drop(X) rounded to T as the
// reference rounds it). fp16 / bf16 ungrouped (grad_a, a shared C's dC; token_reduce_mma_kernel): tensor cores
// (WMMA 16 x 16 x 16, fp32 accumulation), 16-byte loads of X when its rows allow them, only the rank tiles below
// R. A row whose group id is out of range is skipped (ids are never copied to the host; see shrink.cu).
// Limits: 1 <= M, I <= 2^32, 1 <= R <= 128.
// Checked by: tests/test_steps.py (the step, runner cuda-emulated) and tests/test_cuda_emulated.py (this kernel's
// own cases) against the float64 reference on the CPU (both kernels, both modes,
// aligned and unaligned rows; the WMMA calls through host_emulation.h), tests/test_steps.py (runner cuda) and tests/test_cuda_backend.py on a GPU.
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
  const uint64_t seed = load_seed(drop);

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
      if (drop.enabled) hs[tid] = dropout_row_hash(seed, static_cast<uint32_t>(row));
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

// The ungrouped reduction (grad_a's dA, a shared C's dC) for fp16 / bf16 on tensor cores: the same grid, row
// ranges and outputs as token_reduce_kernel. Each step stages 32 rows of drop(X)'s 64 columns (rounded to T, as
// the reference rounds drop(x); 16-byte loads when the rows allow them) and of Y in shared memory in their storage
// type; out (64 x RP) = X^T Y is a set of 16 x 16 fp32 accumulators spread over the warps (only those below R),
// kept across the split's rows, then staged in shared memory and flushed as in token_reduce_kernel.
template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 2)  // without the 2, ptxas spills <__nv_bfloat16, 32> at 32 registers
    token_reduce_mma_kernel(const T* __restrict__ X, const T* __restrict__ Y, const int64_t* __restrict__ groups,
                            int64_t num_groups, float* __restrict__ buf, int deterministic, int64_t M, int64_t I,
                            int R, int64_t rows_per_split, DropoutArgs drop, int vec) {
  static_assert(sizeof(T) == 2, "tensor-core path: fp16 / bf16");
  (void)groups;
  (void)num_groups;
  constexpr int kWarps = kThreads / 32;
  constexpr int kLdX = kColsPerBlock + 8;  // T elements per row of xs
  constexpr int kLdY = RP + 8;             // T elements per row of ys
  constexpr int kLdS = RP + 4;             // floats per row of the stage
  constexpr int kFrags = (kColsPerBlock / 16) * (RP / 16);
  constexpr int kPerWarp = (kFrags + kWarps - 1) / kWarps;
  constexpr int V = 8;
  static_assert((kRowStep * kLdX + kRowStep * kLdY) * 2 + kColsPerBlock * kLdS * 4 + kRowStep * 4 <= 48 * 1024,
                "shared memory");
  __shared__ __align__(32) uint16_t xs_raw[kRowStep * kLdX];  // drop(X) rows [r][c]
  __shared__ __align__(32) uint16_t ys_raw[kRowStep * kLdY];  // Y rows [r][j]
  __shared__ __align__(32) float stage[kColsPerBlock * kLdS];  // out tile [c][j]
  __shared__ uint32_t hs[kRowStep];
  T* xs = reinterpret_cast<T*>(xs_raw);
  T* ys = reinterpret_cast<T*>(ys_raw);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t col0 = static_cast<int64_t>(blockIdx.x) * kColsPerBlock;
  const int64_t r_begin = static_cast<int64_t>(blockIdx.y) * rows_per_split;
  const int64_t r_end = r_begin + rows_per_split < M ? r_begin + rows_per_split : M;
  float* out = buf + (deterministic ? static_cast<int64_t>(blockIdx.y) * I * R : 0);
  const T zero = from_float<T>(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kPerWarp];
#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) wmma::fill_fragment(acc[u], 0.0f);

  const uint64_t seed = load_seed(drop);
  for (int64_t r0 = r_begin; r0 < r_end; r0 += kRowStep) {
    __syncthreads();  // the previous rows are consumed
    if (drop.enabled && tid < kRowStep) hs[tid] = dropout_row_hash(seed, static_cast<uint32_t>(r0 + tid));
    __syncthreads();
    if (vec) {
      for (int e = tid; e < kRowStep * (kColsPerBlock / V); e += kThreads) {
        const int r = e / (kColsPerBlock / V);
        const int c = (e % (kColsPerBlock / V)) * V;
        const int64_t row = r0 + r;
        const int64_t col = col0 + c;
        T* dst = xs + r * kLdX + c;
        if (row < r_end && col < I) {  // I is a multiple of V: the whole vector is in range
          if (drop.enabled) {
            float v[V];
            load_vec(X + row * I + col, v);
#pragma unroll
            for (int t = 0; t < V; ++t) {
              dst[t] = dropout_keep(hs[r], static_cast<uint32_t>(col + t), drop.threshold)
                           ? from_float<T>(v[t] * drop.scale)
                           : zero;
            }
          } else {
            copy_16b(dst, X + row * I + col);
          }
        } else {
#pragma unroll
          for (int t = 0; t < V; ++t) dst[t] = zero;
        }
      }
    } else {
      for (int e = tid; e < kRowStep * kColsPerBlock; e += kThreads) {
        const int r = e / kColsPerBlock;
        const int c = e % kColsPerBlock;
        const int64_t row = r0 + r;
        const int64_t col = col0 + c;
        T v = zero;
        if (row < r_end && col < I) {
          v = X[row * I + col];
          if (drop.enabled) {
            const bool keep = dropout_keep(hs[r], static_cast<uint32_t>(col), drop.threshold);
            v = keep ? from_float<T>(to_float(v) * drop.scale) : zero;
          }
        }
        xs[r * kLdX + c] = v;
      }
    }
    for (int e = tid; e < kRowStep * RP; e += kThreads) {
      const int r = e / RP;
      const int j = e % RP;
      const int64_t row = r0 + r;
      ys[r * kLdY + j] = (row < r_end && j < R) ? Y[row * R + j] : zero;
    }
    __syncthreads();
    // out tiles += X^T Y: X's rows read as a col_major operand
#pragma unroll
    for (int u = 0; u < kPerWarp; ++u) {
      const int f = warp + kWarps * u;
      if (f >= kFrags) break;  // warp-uniform
      const int cb = f / (RP / 16);
      const int jb = f % (RP / 16);
      if (jb * 16 >= R) continue;  // ranks above R: only padding
#pragma unroll
      for (int kb = 0; kb < kRowStep / 16; ++kb) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, xs + kb * 16 * kLdX + cb * 16, kLdX);
        wmma::load_matrix_sync(b, ys + kb * 16 * kLdY + jb * 16, kLdY);
        wmma::mma_sync(acc[u], a, b, acc[u]);
      }
    }
  }

#pragma unroll
  for (int u = 0; u < kPerWarp; ++u) {
    const int f = warp + kWarps * u;
    if (f >= kFrags) break;
    const int cb = f / (RP / 16);
    const int jb = f % (RP / 16);
    wmma::store_matrix_sync(stage + cb * 16 * kLdS + jb * 16, acc[u], kLdS, wmma::mem_row_major);
  }
  __syncthreads();
  for (int e = tid; e < kColsPerBlock * R; e += kThreads) {
    const int c = e / R;
    const int j = e % R;
    const int64_t i = col0 + c;
    if (i >= I) continue;
    float* dst = out + i * R + j;
    const float v = stage[c * kLdS + j];
    if (deterministic) {
      *dst += v;  // this (split, column, rank) belongs to this thread alone
    } else {
      atomicAdd(dst, v);
    }
  }
}

// fp32 and the grouped reduction take token_reduce_kernel; fp16 / bf16 ungrouped the tensor cores.
template <typename T, int RP>
struct ReduceFor {
  static cudaError_t launch(dim3 grid, cudaStream_t stream, const T* X, const T* Y, const int64_t* groups,
                            int64_t num_groups, float* buf, int deterministic, int64_t M, int64_t I, int R,
                            int64_t rows_per_split, DropoutArgs drop) {
    if (groups == nullptr) {
      const int vec = can_vec<T>(X, I) ? 1 : 0;
      auto* kernel = token_reduce_mma_kernel<T, RP>;
      TTK_LAUNCH(kernel, grid, kThreads, stream, X, Y, groups, num_groups, buf, deterministic, M, I, R,
                 rows_per_split, drop, vec);
    } else {
      auto* kernel = token_reduce_kernel<T, RP>;
      TTK_LAUNCH(kernel, grid, kThreads, stream, X, Y, groups, num_groups, buf, deterministic, M, I, R,
                 rows_per_split, drop);
    }
    return TTK_LAST_ERROR();
  }
};
template <int RP>
struct ReduceFor<float, RP> {
  static cudaError_t launch(dim3 grid, cudaStream_t stream, const float* X, const float* Y, const int64_t* groups,
                            int64_t num_groups, float* buf, int deterministic, int64_t M, int64_t I, int R,
                            int64_t rows_per_split, DropoutArgs drop) {
    auto* kernel = token_reduce_kernel<float, RP>;
    TTK_LAUNCH(kernel, grid, kThreads, stream, X, Y, groups, num_groups, buf, deterministic, M, I, R,
               rows_per_split, drop);
    return TTK_LAST_ERROR();
  }
};

}  // namespace
}  // namespace ttkernels

// Row splits of a reduction over M rows and I columns: enough blocks for about four per SM, at least 256 rows
// each; a function of the shape and the SM count only, so the deterministic mode repeats bit for bit.
extern "C" int64_t ttk_token_reduce_splits(int64_t M, int64_t I, int num_sms) {
  using namespace ttkernels;
  const int64_t col_blocks = ceil_div(I, kColsPerBlock);
  int64_t splits = ceil_div(4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), col_blocks);
  const int64_t most = ceil_div(M, kMinRowsPerSplit);
  if (splits > most) splits = most;
  if (splits > 65535) splits = 65535;
  return splits < 1 ? 1 : splits;
}

extern "C" cudaError_t ttk_token_reduce_launch(ttk_dtype dtype, const void* X, const void* Y, const int64_t* groups,
                                               int64_t num_groups, float* buf, int64_t splits, int deterministic,
                                               int64_t M, int64_t I, int64_t R, int dropout, const int64_t* seed,
                                               uint32_t threshold, float scale, cudaStream_t stream) {
  using namespace ttkernels;
  constexpr int64_t kMaxIndex = int64_t{1} << 32;
  if (M <= 0 || I <= 0 || M > kMaxIndex || I > kMaxIndex || R < 1 || R > kMaxRank) return cudaErrorInvalidValue;
  if (dropout && seed == nullptr) return cudaErrorInvalidValue;
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
      return ReduceFor<T, RP>::launch(grid, stream, static_cast<const T*>(X), static_cast<const T*>(Y), groups,
                                      num_groups, buf, deterministic, M, I, static_cast<int>(R), rows_per_split,
                                      drop);
    });
  });
}
