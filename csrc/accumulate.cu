// accumulate.cu: the small kernel after the base GEMM of steps expand (3) and grad_x (6), one kernel for both.
//
// accumulate (expand and grad_x): out += drop'(scaling * U Bm), in place, one rounding.
//   out: (M, N) contiguous, U: (M, R) contiguous, Bm: (R, N) read through strides (bsk, bsn), so that
//   expand passes B (N, 1) and grad_x passes A^T (1, ra) without a copy; all of one storage type T.
//   The base product is already in out (torch's GEMM, cuBLAS); the low-rank term is added in fp32 to the
//   stored value and rounded once, as addmm with beta = 1 does. With dropout (grad_x), the added term is masked
//   and scaled with the forward's mask (the derivative of dropout).
//   Launch: blocks of 256 threads over 32 x 128 tiles of out (rows in grid.x); R is walked in steps of 32
//   through shared memory, stopping at the real rank. fp16 / bf16: tensor cores (WMMA 16 x 16 x 16, fp32
//   accumulation; accumulate_mma_kernel) and 16-byte updates of out when its rows allow them; fp32: exact
//   FMA (no TF32), each thread owning a 4 x 4 piece of the tile.
// Limits: M, N <= 2^32 with dropout (hashed indices are uint32); any R >= 1.
// Checked by: tests/test_steps.py (the step, runner cuda-emulated) and tests/test_cuda_emulated.py (this kernel's
// own cases) against the float64 reference on the CPU (the WMMA calls through
// host_emulation.h; aligned and unaligned rows of out), tests/test_steps.py (runner cuda) and tests/test_cuda_backend.py on a GPU.
#include <limits.h>
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kAccRows = 32;
constexpr int kAccCols = 128;
constexpr int kAccK = 32;
constexpr unsigned kMaxGridY = 65535;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    accumulate_kernel(T* __restrict__ out, const T* __restrict__ U, const T* __restrict__ Bm, int64_t bsk,
                      int64_t bsn, int64_t M, int64_t N, int R, float scaling, DropoutArgs drop) {
  constexpr int kWarps = kThreads / 32;
  constexpr int kRowsPerThread = kAccRows / kWarps;  // 4
  constexpr int kColsPerThread = kAccCols / 32;      // 4
  __shared__ float us[kAccRows * (kAccK + 1)];  // [i][k]
  __shared__ float bs[kAccK * (kAccCols + 1)];  // [k][n]

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kAccRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kAccCols;

  float acc[kRowsPerThread][kColsPerThread];
#pragma unroll
  for (int w = 0; w < kRowsPerThread; ++w)
#pragma unroll
    for (int q = 0; q < kColsPerThread; ++q) acc[w][q] = 0.0f;

  for (int k0 = 0; k0 < R; k0 += kAccK) {
    __syncthreads();
    for (int e = tid; e < kAccRows * kAccK; e += kThreads) {
      const int i = e / kAccK;
      const int k = e % kAccK;
      const int64_t row = row0 + i;
      us[i * (kAccK + 1) + k] = (row < M && k0 + k < R) ? to_float(U[row * R + k0 + k]) : 0.0f;
    }
    for (int e = tid; e < kAccK * kAccCols; e += kThreads) {
      // consecutive threads read consecutive addresses of Bm, whichever of its strides is 1
      int k, n;
      if (bsn == 1) {
        k = e / kAccCols;
        n = e % kAccCols;
      } else {
        n = e / kAccK;
        k = e % kAccK;
      }
      const int64_t col = col0 + n;
      bs[k * (kAccCols + 1) + n] = (k0 + k < R && col < N) ? to_float(Bm[(k0 + k) * bsk + col * bsn]) : 0.0f;
    }
    __syncthreads();
    const int ksteps = R - k0 < kAccK ? R - k0 : kAccK;  // the real rank only
    for (int k = 0; k < ksteps; ++k) {
      float uv[kRowsPerThread];
#pragma unroll
      for (int w = 0; w < kRowsPerThread; ++w) uv[w] = us[(warp + kWarps * w) * (kAccK + 1) + k];
#pragma unroll
      for (int q = 0; q < kColsPerThread; ++q) {
        const float bv = bs[k * (kAccCols + 1) + lane + 32 * q];
#pragma unroll
        for (int w = 0; w < kRowsPerThread; ++w) acc[w][q] = fmaf(uv[w], bv, acc[w][q]);
      }
    }
  }

  const uint64_t seed = load_seed(drop);
#pragma unroll
  for (int w = 0; w < kRowsPerThread; ++w) {
    const int64_t row = row0 + warp + kWarps * w;
    if (row >= M) continue;
    const uint32_t h = drop.enabled ? dropout_row_hash(seed, static_cast<uint32_t>(row)) : 0u;
#pragma unroll
    for (int q = 0; q < kColsPerThread; ++q) {
      const int64_t col = col0 + lane + 32 * q;
      if (col >= N) continue;
      float add = scaling * acc[w][q];
      if (drop.enabled) add = dropout_keep(h, static_cast<uint32_t>(col), drop.threshold) ? add * drop.scale : 0.0f;
      T* p = out + row * N + col;
      *p = from_float<T>(to_float(*p) + add);
    }
  }
}

// accumulate for fp16 / bf16 on tensor cores: the same 32 x 128 tiles; U's (32 x 32) and Bm's (32 x 128) chunks of
// the rank go to shared memory in their storage type, each warp keeps two 16 x 16 fp32 accumulators (rows 16 * (w % 2),
// columns 32 * (w / 2) and + 16), only the 16-rank steps below R run, and the tile is staged in shared memory (fp32)
// so that each thread updates 8 consecutive elements of out with one 16-byte load and store when the rows allow it.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    accumulate_mma_kernel(T* __restrict__ out, const T* __restrict__ U, const T* __restrict__ Bm, int64_t bsk,
                          int64_t bsn, int64_t M, int64_t N, int R, float scaling, DropoutArgs drop, int vec) {
  static_assert(sizeof(T) == 2, "tensor-core path: fp16 / bf16");
  constexpr int kLdU = kAccK + 8;     // T elements per row of us
  constexpr int kLdB = kAccCols + 8;  // T elements per row of bs
  constexpr int kLdS = kAccCols + 4;  // floats per row of the stage
  constexpr int V = 8;
  static_assert((kAccRows * kLdU + kAccK * kLdB) * 2 + kAccRows * kLdS * 4 <= 48 * 1024, "shared memory");
  __shared__ __align__(32) uint16_t us_raw[kAccRows * kLdU];  // [i][k]
  __shared__ __align__(32) uint16_t bs_raw[kAccK * kLdB];     // [k][n]
  __shared__ __align__(32) float stage[kAccRows * kLdS];      // [i][n]
  T* us = reinterpret_cast<T*>(us_raw);
  T* bs = reinterpret_cast<T*>(bs_raw);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int ib = warp % 2;       // this warp's 16 rows
  const int nb = (warp / 2) * 2;  // and its two 16-column tiles
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kAccRows;
  const int64_t col0 = static_cast<int64_t>(blockIdx.y) * kAccCols;
  const T zero = from_float<T>(0.0f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.0f);
  wmma::fill_fragment(acc[1], 0.0f);

  for (int k0 = 0; k0 < R; k0 += kAccK) {
    __syncthreads();
    for (int e = tid; e < kAccRows * kAccK; e += kThreads) {
      const int i = e / kAccK;
      const int k = e % kAccK;
      const int64_t row = row0 + i;
      us[i * kLdU + k] = (row < M && k0 + k < R) ? U[row * R + k0 + k] : zero;
    }
    for (int e = tid; e < kAccK * kAccCols; e += kThreads) {
      // consecutive threads read consecutive addresses of Bm, whichever of its strides is 1
      int k, n;
      if (bsn == 1) {
        k = e / kAccCols;
        n = e % kAccCols;
      } else {
        n = e / kAccK;
        k = e % kAccK;
      }
      const int64_t col = col0 + n;
      bs[k * kLdB + n] = (k0 + k < R && col < N) ? Bm[(k0 + k) * bsk + col * bsn] : zero;
    }
    __syncthreads();
    const int ksteps = R - k0 < kAccK ? static_cast<int>(ceil_div(R - k0, 16)) : kAccK / 16;  // real rank only
    for (int kb = 0; kb < ksteps; ++kb) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
      wmma::load_matrix_sync(a, us + ib * 16 * kLdU + kb * 16, kLdU);
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(b, bs + kb * 16 * kLdB + (nb + h) * 16, kLdB);
        wmma::mma_sync(acc[h], a, b, acc[h]);
      }
    }
  }
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    wmma::store_matrix_sync(stage + ib * 16 * kLdS + (nb + h) * 16, acc[h], kLdS, wmma::mem_row_major);
  }
  __syncthreads();

  // out += drop'(scaling * tile), V consecutive columns per thread
  const uint64_t seed = load_seed(drop);
  for (int e = tid; e < kAccRows * (kAccCols / V); e += kThreads) {
    const int i = e / (kAccCols / V);
    const int n = (e % (kAccCols / V)) * V;
    const int64_t row = row0 + i;
    const int64_t col = col0 + n;
    if (row >= M || col >= N) continue;
    const uint32_t h = drop.enabled ? dropout_row_hash(seed, static_cast<uint32_t>(row)) : 0u;
    T* p = out + row * N + col;
    float add[V];
#pragma unroll
    for (int t = 0; t < V; ++t) {
      add[t] = scaling * stage[i * kLdS + n + t];
      if (drop.enabled) {
        add[t] = dropout_keep(h, static_cast<uint32_t>(col + t), drop.threshold) ? add[t] * drop.scale : 0.0f;
      }
    }
    if (vec) {  // N is a multiple of V: the whole vector is in range
      float cur[V];
      load_vec<T, false>(p, cur);  // out is written here: not through the read-only cache
      T res[V];
#pragma unroll
      for (int t = 0; t < V; ++t) res[t] = from_float<T>(cur[t] + add[t]);
      store_vec(p, res);
    } else {
      for (int t = 0; t < V && col + t < N; ++t) p[t] = from_float<T>(to_float(p[t]) + add[t]);
    }
  }
}

// fp32 stays on the exact FMA path (no TF32); fp16 / bf16 take the tensor cores.
template <typename T>
struct AccumulateFor {
  static cudaError_t launch(dim3 grid, cudaStream_t stream, T* out, const T* U, const T* Bm, int64_t bsk, int64_t bsn,
                            int64_t M, int64_t N, int R, float scaling, DropoutArgs drop) {
    const int vec = can_vec<T>(out, N) ? 1 : 0;
    auto* kernel = accumulate_mma_kernel<T>;
    TTK_LAUNCH(kernel, grid, kThreads, stream, out, U, Bm, bsk, bsn, M, N, R, scaling, drop, vec);
    return TTK_LAST_ERROR();
  }
};
template <>
struct AccumulateFor<float> {
  static cudaError_t launch(dim3 grid, cudaStream_t stream, float* out, const float* U, const float* Bm, int64_t bsk,
                            int64_t bsn, int64_t M, int64_t N, int R, float scaling, DropoutArgs drop) {
    auto* kernel = accumulate_kernel<float>;
    TTK_LAUNCH(kernel, grid, kThreads, stream, out, U, Bm, bsk, bsn, M, N, R, scaling, drop);
    return TTK_LAST_ERROR();
  }
};

}  // namespace
}  // namespace ttkernels

extern "C" cudaError_t ttk_accumulate_launch(ttk_dtype dtype, void* out, const void* U, const void* Bm, int64_t bsk,
                                             int64_t bsn, int64_t M, int64_t N, int64_t R, float scaling, int dropout,
                                             const int64_t* seed, uint32_t threshold, float scale,
                                             cudaStream_t stream) {
  using namespace ttkernels;
  constexpr int64_t kMaxIndex = int64_t{1} << 32;
  if (M <= 0 || N <= 0 || R < 1 || R > INT_MAX) return cudaErrorInvalidValue;
  if (dropout && (M > kMaxIndex || N > kMaxIndex || seed == nullptr)) return cudaErrorInvalidValue;
  if (ceil_div(M, kAccRows) > INT_MAX || ceil_div(N, kAccCols) > kMaxGridY) return cudaErrorInvalidValue;
  const DropoutArgs drop = make_dropout(dropout, seed, threshold, scale);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, kAccRows)), static_cast<unsigned>(ceil_div(N, kAccCols)));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    return AccumulateFor<T>::launch(grid, stream, static_cast<T*>(out), static_cast<const T*>(U),
                                    static_cast<const T*>(Bm), bsk, bsn, M, N, static_cast<int>(R), scaling, drop);
  });
}
