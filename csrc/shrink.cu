// shrink.cu: step 2 of the adapter, S = drop(x) A and U = S C, in one pass over x.
//
//   x: (M, K) contiguous, A: (K, ra) contiguous, S: (M, ra), all of one storage type T (fp32 / fp16 / bf16)
//   C: absent, (ra, rb), or (num_tasks, ra, rb) with task_ids (M,) int64 choosing each row's slice
//   U: (M, rb) when C is given
//
// Numerics follow the reference (ttkernels/reference.py): drop(x) is rounded to T before the product, the
// product accumulates in fp32, S is rounded to T, and U is computed from the rounded S (fp32 accumulation,
// one rounding). The dropout mask is the hash of dropout_hash.cuh, regenerated, never stored.
//
// Launch: one block of 256 threads per 32 rows. The block walks K in steps of 64: a 32 x 64 tile of drop(x)
// and a 64 x RP tile of A go to shared memory (fp32), and each thread accumulates a 2 x (RP / 16) piece of S in
// registers (RP = ra padded to 16, 32, 64 or 128: the specialisations for small ranks). Then the rounded S
// tile stays in shared memory for U = S C, which reads C (tiny, cached) from global memory.
// Task ids: the binding checks every id on the host before launch; when it cannot (a CUDA graph is being
// captured), a row whose id is out of range gets U = NaN instead of an out-of-bounds read.
// Limits: 1 <= M, K <= 2^32 (hashed indices are uint32), 1 <= ra, rb <= 128.
// Checked by: tests/test_cuda_backend.py against the float64 reference on a GPU; on a machine without a GPU
// it is compiled, not run.
#include <limits.h>
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kRows = 32;   // rows of x per block
constexpr int kChunk = 64;  // columns of x (rows of A) per step
constexpr int kRowGroups = kThreads / 16;
constexpr int kRowsPerThread = kRows / kRowGroups;

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads)
    shrink_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ C,
                  const int64_t* __restrict__ task_ids, int64_t num_tasks, T* __restrict__ S, T* __restrict__ U,
                  int64_t M, int64_t K, int ra, int rb, DropoutArgs drop) {
  constexpr int kXs = kRows * (kChunk + 1);
  constexpr int kAs = kChunk * RP;
  constexpr int kSs = kRows * (RP + 1);
  constexpr int kSmem = (kXs + kAs > kSs) ? kXs + kAs : kSs;
  static_assert(kSmem * 4 + kRows * 4 <= 48 * 1024, "static shared memory above 48 KiB");
  constexpr int kRanksPerThread = RP / 16;
  __shared__ float smem[kSmem];
  __shared__ uint32_t row_hash[kRows];
  float* xs = smem;        // [kRows][kChunk + 1]
  float* as = smem + kXs;  // [kChunk][RP]

  const int tid = threadIdx.x;
  const int col = tid % 16;        // this thread's ranks: col, col + 16, ...
  const int row_group = tid / 16;  // this thread's rows: row_group, row_group + 16
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  if (drop.enabled && tid < kRows) row_hash[tid] = dropout_row_hash(drop.seed, static_cast<uint32_t>(row0 + tid));

  float acc[kRowsPerThread][kRanksPerThread];
#pragma unroll
  for (int w = 0; w < kRowsPerThread; ++w)
#pragma unroll
    for (int q = 0; q < kRanksPerThread; ++q) acc[w][q] = 0.0f;

  for (int64_t k0 = 0; k0 < K; k0 += kChunk) {
    __syncthreads();  // the previous step's tiles are consumed (and row_hash is visible)
    for (int e = tid; e < kRows * kChunk; e += kThreads) {
      const int i = e / kChunk;
      const int k = e % kChunk;
      const int64_t row = row0 + i;
      const int64_t kk = k0 + k;
      float v = 0.0f;
      if (row < M && kk < K) {
        v = to_float(x[row * K + kk]);
        if (drop.enabled) {
          v = dropout_keep(row_hash[i], static_cast<uint32_t>(kk), drop.threshold) ? round_trip<T>(v * drop.scale)
                                                                                   : 0.0f;
        }
      }
      xs[i * (kChunk + 1) + k] = v;
    }
    for (int e = tid; e < kChunk * RP; e += kThreads) {
      const int k = e / RP;
      const int j = e % RP;
      const int64_t kk = k0 + k;
      as[e] = (kk < K && j < ra) ? to_float(A[kk * ra + j]) : 0.0f;
    }
    __syncthreads();
    const int steps = K - k0 < kChunk ? static_cast<int>(K - k0) : kChunk;
    for (int k = 0; k < steps; ++k) {
      float xv[kRowsPerThread];
#pragma unroll
      for (int w = 0; w < kRowsPerThread; ++w) xv[w] = xs[(row_group + kRowGroups * w) * (kChunk + 1) + k];
#pragma unroll
      for (int q = 0; q < kRanksPerThread; ++q) {
        const float av = as[k * RP + col + 16 * q];
#pragma unroll
        for (int w = 0; w < kRowsPerThread; ++w) acc[w][q] = fmaf(xv[w], av, acc[w][q]);
      }
    }
  }

  __syncthreads();  // xs / as are reused for the rounded S tile
  float* ss = smem;  // [kRows][RP + 1]
#pragma unroll
  for (int w = 0; w < kRowsPerThread; ++w) {
    const int i = row_group + kRowGroups * w;
    const int64_t row = row0 + i;
#pragma unroll
    for (int q = 0; q < kRanksPerThread; ++q) {
      const int j = col + 16 * q;
      const T s = from_float<T>(acc[w][q]);
      ss[i * (RP + 1) + j] = to_float(s);
      if (row < M && j < ra) S[row * ra + j] = s;
    }
  }
  if (C == nullptr) return;
  __syncthreads();
  for (int e = tid; e < kRows * rb; e += kThreads) {
    const int i = e / rb;
    const int j = e % rb;
    const int64_t row = row0 + i;
    if (row >= M) continue;
    const T* c = C;
    if (task_ids != nullptr) {
      const int64_t t = task_ids[row];
      if (t < 0 || t >= num_tasks) {
        U[row * rb + j] = from_float<T>(__int_as_float(0x7fc00000));  // NaN: never read out of bounds
        continue;
      }
      c = C + t * ra * rb;
    }
    float u = 0.0f;
    for (int k = 0; k < ra; ++k) u = fmaf(ss[i * (RP + 1) + k], to_float(c[k * rb + j]), u);
    U[row * rb + j] = from_float<T>(u);
  }
}

}  // namespace
}  // namespace ttkernels

extern "C" cudaError_t ttk_shrink_launch(ttk_dtype dtype, const void* x, const void* A, const void* C,
                                         const int64_t* task_ids, int64_t num_tasks, void* S, void* U, int64_t M,
                                         int64_t K, int64_t ra, int64_t rb, int dropout, uint64_t seed,
                                         uint32_t threshold, float scale, cudaStream_t stream) {
  using namespace ttkernels;
  constexpr int64_t kMaxIndex = int64_t{1} << 32;
  if (M <= 0 || K <= 0 || M > kMaxIndex || K > kMaxIndex) return cudaErrorInvalidValue;
  if (ra < 1 || ra > kMaxRank || rb < 1 || rb > kMaxRank) return cudaErrorInvalidValue;
  if ((C == nullptr) != (U == nullptr) || (C == nullptr && task_ids != nullptr)) return cudaErrorInvalidValue;
  if (C == nullptr && ra != rb) return cudaErrorInvalidValue;
  if (ceil_div(M, kRows) > INT_MAX) return cudaErrorInvalidValue;
  const DropoutArgs drop = make_dropout(dropout, seed, threshold, scale);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kRows)));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return dispatch_rank(ra, [&](auto rp) {
      constexpr int RP = decltype(rp)::value;
      auto* kernel = shrink_kernel<T, RP>;
      TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(x), static_cast<const T*>(A),
                 static_cast<const T*>(C), task_ids, num_tasks, static_cast<T*>(S), static_cast<T*>(U), M, K,
                 static_cast<int>(ra), static_cast<int>(rb), drop);
      return TTK_LAST_ERROR();
    });
  });
}
