// grad_dy.cu: step 4 of the adapter, one pass over dY giving dU = scaling * dY B^T and the pieces of
// dB = scaling * U^T dY.
//
//   dy: (M, N) contiguous, U: (M, rb), B: (rb, N), dU: (M, rb), all of one storage type T
//   dU_buf: fp32 (slices, M, rb) when the columns are cut into slices > 1: the block of slice c writes every
//           element of dU_buf[c] (its columns' share of dY B^T) and csrc/finalize.cu's kernel sums the
//           slices in order into dU. With one slice the kernel writes dU itself (scaled, rounded once).
//   dB_buf: fp32. Atomic mode: (rb, N), zeroed by the caller; blocks add their rows' U^T dY into it.
//           Deterministic mode: (splits, rb, N), no zeroing needed: the blocks of row split s own dB_buf[s]
//           (each element belongs to one thread), store their first row tile's U^T dY and add the next ones
//           in row order; finalize sums the splits in order. `splits` is a function of (M, N, rb, SM count)
//           whose buffer stays under kDetBufBytes whatever M is.
//   The caller applies scaling to dB (the finalize kernel does) and rounds it to T.
//
// Launch: a 2-D grid (slices, splits) of 256-thread blocks, so that there are about four blocks per SM when
// the rows alone give fewer (a column slice is a multiple of 32 columns; at most kMaxSlices). A block walks the
// row tiles of its split (128 rows up to rank 16, 64 up to 64, 32 above, within 48 KiB of shared memory): U's tile goes
// to shared memory, then the tile's 32-column chunks of its slice, starting at a chunk that rotates with the
// row tile (so the blocks that add into the same dB columns do not do it in lockstep): the chunk of dY and of
// B^T go to shared memory (fp32; 16-byte vector loads when the rows allow it), each thread adds to its
// (rows / 16) x (RP / 16) piece of dU (registers) and computes RP / 8 elements of the chunk's U^T dY, which it
// adds to dB_buf at once. Loops over ranks stop at the real rank. That is the fp32 path (exact fp32 FMA; no
// TF32). fp16 / bf16 take grad_dy_mma_kernel: the same plan with both products on tensor cores (WMMA 16 x 16 x 16,
// fp32 accumulation; operands kept in their storage type in shared memory).
// Limits: 1 <= M, 1 <= N, 1 <= rb <= 128.
// Checked by: tests/test_steps.py (the step, runner cuda-emulated) and tests/test_cuda_emulated.py (this kernel's
// own cases) against the float64 reference on the CPU (both paths, both modes, several
// slices and splits, aligned and unaligned rows, bitwise repeatability of the deterministic mode; the WMMA calls
// run through host_emulation.h's emulation), tests/test_steps.py (runner cuda) and tests/test_cuda_backend.py on a GPU.
#include <limits.h>
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kCols = 32;  // columns of dY per chunk
constexpr int64_t kMaxSlices = 8;
constexpr int64_t kBlocksPerSm = 4;
constexpr int64_t kDetBufBytes = int64_t{64} << 20;  // the deterministic dB buffer stays under this

// Rows per tile: dB takes one fp32 addition per (rank, column) per tile, so taller tiles mean fewer of them;
// shared memory and registers (no spills) limit the tiles of the larger ranks.
template <int RP>
constexpr int rows_per_block() {
  return RP <= 16 ? 128 : (RP >= 128 ? 32 : 64);
}

int64_t rows_per_tile(int64_t rb) {
  const int rp = rank_pad(rb);
  return rp <= 16 ? 128 : (rp >= 128 ? 32 : 64);
}

// Stages a kRows x 32 chunk of the row-major (rows, ld) matrix p (rows >= row_end or columns >= col_end read as
// zero) into dst[i * pitch + n] as fp32, with 16-byte loads when vec.
template <typename T, int kRows>
__device__ __forceinline__ void stage_chunk(const T* __restrict__ p, int64_t ld, int64_t row0, int64_t row_end,
                                            int64_t n0, int64_t col_end, bool vec, float* dst, int pitch) {
  const int tid = threadIdx.x;
  if (vec) {
    constexpr int V = vec_width<T>();
    constexpr int kPerRow = kCols / V;
    for (int e = tid; e < kRows * kPerRow; e += kThreads) {
      const int i = e / kPerRow;
      const int n = (e % kPerRow) * V;
      const int64_t row = row0 + i;
      float v[V];
      if (row < row_end && n0 + n < col_end) {
        load_vec(p + row * ld + n0 + n, v);  // col_end is a multiple of V: the whole vector is in range
      } else {
#pragma unroll
        for (int t = 0; t < V; ++t) v[t] = 0.0f;
      }
#pragma unroll
      for (int t = 0; t < V; ++t) dst[i * pitch + n + t] = v[t];
    }
  } else {
    for (int e = tid; e < kRows * kCols; e += kThreads) {
      const int i = e / kCols;
      const int n = e % kCols;
      const int64_t row = row0 + i;
      dst[i * pitch + n] = (row < row_end && n0 + n < col_end) ? to_float(p[row * ld + n0 + n]) : 0.0f;
    }
  }
}

template <typename T, int RP>
__global__ void __launch_bounds__(kThreads)
    grad_dy_kernel(const T* __restrict__ dy, const T* __restrict__ U, const T* __restrict__ B, T* __restrict__ dU,
                   float* __restrict__ dU_buf, float* __restrict__ dB_buf, int deterministic, int64_t slice_cols,
                   int64_t tiles_per_split, int vec, int64_t M, int64_t N, int rb, float scaling) {
  constexpr int kRows = rows_per_block<RP>();
  constexpr int kRowGroups = kThreads / 16;
  constexpr int kRowsPerThread = kRows / kRowGroups;
  constexpr int kRanksPerThread = RP / 16;
  constexpr int kWarps = kThreads / 32;
  constexpr int kDbPerThread = RP / kWarps;
  static_assert(kCols == 32, "the dB mapping gives each lane one column of the chunk");
  static_assert((kRows * (kCols + 1) + kCols * (RP + 1) + kRows * RP) * 4 <= 48 * 1024, "shared memory");
  __shared__ float dys[kRows * (kCols + 1)];  // [i][n]
  __shared__ float bst[RP * (kCols + 1)];     // [j][n] = B[j][n0 + n]
  __shared__ float us[kRows * RP];            // [i][j]

  const int tid = threadIdx.x;
  const int col = tid % 16;
  const int row_group = tid / 16;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int64_t slice = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t col_begin = slice * slice_cols;
  const int64_t col_end = col_begin + slice_cols < N ? col_begin + slice_cols : N;
  const int chunks = static_cast<int>(ceil_div(col_end - col_begin, kCols));
  const int64_t tile_begin = split * tiles_per_split;
  const int64_t tiles = ceil_div(M, kRows);
  const int64_t tile_end = tile_begin + tiles_per_split < tiles ? tile_begin + tiles_per_split : tiles;
  float* out = deterministic ? dB_buf + split * rb * N : dB_buf;

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t row0 = tile * kRows;
    __syncthreads();  // the previous tile's U is consumed
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

    const int start = static_cast<int>(tile % chunks);
    for (int cc = 0; cc < chunks; ++cc) {
      const int chunk = cc + start < chunks ? cc + start : cc + start - chunks;
      const int64_t n0 = col_begin + static_cast<int64_t>(chunk) * kCols;
      __syncthreads();  // the previous chunk is consumed (and us is visible on the first one)
      stage_chunk<T, kRows>(dy, N, row0, M, n0, col_end, vec != 0, dys, kCols + 1);
      stage_chunk<T, RP>(B, N, 0, rb, n0, col_end, vec != 0, bst, kCols + 1);
      __syncthreads();

      // dU += dY_chunk B_chunk^T; ranks at or above rb are zero in bst and never stored
      for (int n = 0; n < kCols; ++n) {
        float dv[kRowsPerThread];
#pragma unroll
        for (int w = 0; w < kRowsPerThread; ++w) dv[w] = dys[(row_group + kRowGroups * w) * (kCols + 1) + n];
#pragma unroll
        for (int q = 0; q < kRanksPerThread; ++q) {
          if (col + 16 * q >= rb) break;  // warp-divergent only in the last rank group
          const float bv = bst[(col + 16 * q) * (kCols + 1) + n];
#pragma unroll
          for (int w = 0; w < kRowsPerThread; ++w) acc[w][q] = fmaf(dv[w], bv, acc[w][q]);
        }
      }

      // this chunk's U^T dY: lane = column n, ranks warp, warp + kWarps, ... below rb
      const int64_t n = n0 + lane;
      const int rows = M - row0 < kRows ? static_cast<int>(M - row0) : kRows;
#pragma unroll
      for (int q = 0; q < kDbPerThread; ++q) {
        const int j = warp + kWarps * q;
        if (j >= rb) break;  // warp-uniform
        float db = 0.0f;
        for (int i = 0; i < rows; ++i) db = fmaf(us[i * RP + j], dys[i * (kCols + 1) + lane], db);
        if (n < col_end) {
          float* dst = out + j * N + n;
          if (!deterministic) {
            atomicAdd(dst, db);
          } else if (tile == tile_begin) {
            *dst = db;  // this (split, rank, column) belongs to this thread alone
          } else {
            *dst += db;
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
        if (j >= rb) continue;
        if (dU_buf != nullptr) {
          dU_buf[(slice * M + row) * rb + j] = acc[w][q];
        } else {
          dU[row * rb + j] = from_float<T>(scaling * acc[w][q]);
        }
      }
    }
  }
}

// The same step for fp16 / bf16 on tensor cores (WMMA, 16 x 16 x 16 tiles, fp32 accumulators): the same grid,
// row tiles, chunks, rotation and outputs as grad_dy_kernel. The U tile, the dY chunk and the B chunk stay in
// their storage type in shared memory (16-byte copies when the rows allow them). dU: warp w keeps the
// accumulators of the 16 x 16 tiles w, w + 8, ... of the row tile's dU across the chunks; dB: the chunk's
// (RP x 32) U^T dY is one set of 16 x 16 tiles spread over the warps, staged in shared memory (fp32) and added to
// dB_buf by all threads as in grad_dy_kernel.
template <typename T, int RP>
__global__ void __launch_bounds__(kThreads)
    grad_dy_mma_kernel(const T* __restrict__ dy, const T* __restrict__ U, const T* __restrict__ B,
                       T* __restrict__ dU, float* __restrict__ dU_buf, float* __restrict__ dB_buf, int deterministic,
                       int64_t slice_cols, int64_t tiles_per_split, int vec, int64_t M, int64_t N, int rb,
                       float scaling) {
  static_assert(sizeof(T) == 2, "tensor-core path: fp16 / bf16");
  constexpr int kRows = rows_per_block<RP>();
  constexpr int kWarps = kThreads / 32;
  constexpr int kLdU = RP + 8;      // T elements per row of us (rows 16-byte aligned, banks staggered)
  constexpr int kLdC = kCols + 8;   // T elements per row of dys and bs
  constexpr int kLdSu = RP + 4;     // floats per row of the dU stage
  constexpr int kLdSb = kCols + 4;  // floats per row of the dB stage
  constexpr int kStage = kRows * kLdSu > RP * kLdSb ? kRows * kLdSu : RP * kLdSb;
  constexpr int kFragU = (kRows / 16) * (RP / 16);
  constexpr int kUPerWarp = (kFragU + kWarps - 1) / kWarps;
  constexpr int kFragB = (RP / 16) * (kCols / 16);
  constexpr int V = 8;  // T elements per 16 bytes
  static_assert((kRows * kLdU + kRows * kLdC + RP * kLdC) * 2 + kStage * 4 <= 48 * 1024, "shared memory");
  __shared__ __align__(32) uint16_t us_raw[kRows * kLdU];  // U tile [i][j]
  __shared__ __align__(32) uint16_t dys_raw[kRows * kLdC];  // dY chunk [i][n]
  __shared__ __align__(32) uint16_t bs_raw[RP * kLdC];      // B chunk [j][n]
  __shared__ __align__(32) float stage[kStage];
  T* us = reinterpret_cast<T*>(us_raw);
  T* dys = reinterpret_cast<T*>(dys_raw);
  T* bs = reinterpret_cast<T*>(bs_raw);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int64_t slice = blockIdx.x;
  const int64_t split = blockIdx.y;
  const int64_t col_begin = slice * slice_cols;
  const int64_t col_end = col_begin + slice_cols < N ? col_begin + slice_cols : N;
  const int chunks = static_cast<int>(ceil_div(col_end - col_begin, kCols));
  const int64_t tile_begin = split * tiles_per_split;
  const int64_t tiles = ceil_div(M, kRows);
  const int64_t tile_end = tile_begin + tiles_per_split < tiles ? tile_begin + tiles_per_split : tiles;
  float* out = deterministic ? dB_buf + split * rb * N : dB_buf;
  const T zero = from_float<T>(0.0f);

  // rows x 32 columns of the row-major (rows, N) matrix p into dst[i * kLdC + n], zero outside the ranges
  auto stage_chunk = [&](const T* __restrict__ p, int64_t r0, int64_t r_end, int rows, int64_t n0, T* dst) {
    if (vec) {
#pragma unroll 1
      for (int e = tid; e < rows * (kCols / V); e += kThreads) {
        const int i = e / (kCols / V);
        const int n = (e % (kCols / V)) * V;
        const int64_t row = r0 + i;
        if (row < r_end && n0 + n < col_end) {
          copy_16b(dst + i * kLdC + n, p + row * N + n0 + n);  // col_end is a multiple of V
        } else {
#pragma unroll
          for (int t = 0; t < V; ++t) dst[i * kLdC + n + t] = zero;
        }
      }
    } else {
      for (int e = tid; e < rows * kCols; e += kThreads) {
        const int i = e / kCols;
        const int n = e % kCols;
        const int64_t row = r0 + i;
        dst[i * kLdC + n] = (row < r_end && n0 + n < col_end) ? p[row * N + n0 + n] : zero;
      }
    }
  };

  for (int64_t tile = tile_begin; tile < tile_end; ++tile) {
    const int64_t row0 = tile * kRows;
    __syncthreads();  // the previous tile's U and dU stage are consumed
#pragma unroll 1
    for (int e = tid; e < kRows * RP; e += kThreads) {
      const int i = e / RP;
      const int j = e % RP;
      const int64_t row = row0 + i;
      us[i * kLdU + j] = (row < M && j < rb) ? U[row * rb + j] : zero;
    }

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> du[kUPerWarp];
#pragma unroll
    for (int u = 0; u < kUPerWarp; ++u) wmma::fill_fragment(du[u], 0.0f);

    const int start = static_cast<int>(tile % chunks);
    for (int cc = 0; cc < chunks; ++cc) {
      const int chunk = cc + start < chunks ? cc + start : cc + start - chunks;
      const int64_t n0 = col_begin + static_cast<int64_t>(chunk) * kCols;
      __syncthreads();  // the previous chunk and its dB stage are consumed (and us is visible)
      stage_chunk(dy, row0, M, kRows, n0, dys);
      stage_chunk(B, 0, rb, RP, n0, bs);
      __syncthreads();

      // dU tiles += dY chunk (row_major) x B chunk^T (B's rows are the columns of a col_major operand)
#pragma unroll
      for (int u = 0; u < kUPerWarp; ++u) {
        const int f = warp + kWarps * u;
        if (f >= kFragU) break;  // warp-uniform
        const int ib = f / (RP / 16);
        const int jb = f % (RP / 16);
#pragma unroll
        for (int kb = 0; kb < kCols / 16; ++kb) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(a, dys + ib * 16 * kLdC + kb * 16, kLdC);
          wmma::load_matrix_sync(b, bs + jb * 16 * kLdC + kb * 16, kLdC);
          wmma::mma_sync(du[u], a, b, du[u]);
        }
      }
      // the chunk's U^T dY tiles: U^T is U's tile read as a col_major operand
      for (int g = (warp - kFragU % kWarps + kWarps) % kWarps; g < kFragB; g += kWarps) {
        const int jb = g / (kCols / 16);
        const int nb = g % (kCols / 16);
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> db;
        wmma::fill_fragment(db, 0.0f);
        for (int ib = 0; ib < kRows / 16; ++ib) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(a, us + ib * 16 * kLdU + jb * 16, kLdU);
          wmma::load_matrix_sync(b, dys + ib * 16 * kLdC + nb * 16, kLdC);
          wmma::mma_sync(db, a, b, db);
        }
        wmma::store_matrix_sync(stage + jb * 16 * kLdSb + nb * 16, db, kLdSb, wmma::mem_row_major);
      }
      __syncthreads();
      for (int e = tid; e < rb * kCols; e += kThreads) {
        const int j = e / kCols;
        const int n = e % kCols;
        if (n0 + n >= col_end) continue;
        const float v = stage[j * kLdSb + n];
        float* dst = out + j * N + n0 + n;
        if (!deterministic) {
          atomicAdd(dst, v);
        } else if (tile == tile_begin) {
          *dst = v;  // this (split, rank, column) belongs to this thread alone
        } else {
          *dst += v;
        }
      }
    }

    __syncthreads();  // the last chunk's dB stage is consumed
#pragma unroll
    for (int u = 0; u < kUPerWarp; ++u) {
      const int f = warp + kWarps * u;
      if (f >= kFragU) break;
      const int ib = f / (RP / 16);
      const int jb = f % (RP / 16);
      wmma::store_matrix_sync(stage + ib * 16 * kLdSu + jb * 16, du[u], kLdSu, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = tid; e < kRows * rb; e += kThreads) {
      const int i = e / rb;
      const int j = e % rb;
      const int64_t row = row0 + i;
      if (row >= M) continue;
      const float v = stage[i * kLdSu + j];
      if (dU_buf != nullptr) {
        dU_buf[(slice * M + row) * rb + j] = v;
      } else {
        dU[row * rb + j] = from_float<T>(scaling * v);
      }
    }
  }
}

// fp32 stays on the exact FMA path (no TF32); fp16 / bf16 take the tensor cores.
template <typename T, int RP>
struct KernelFor {
  static auto get() { return grad_dy_mma_kernel<T, RP>; }
};
template <int RP>
struct KernelFor<float, RP> {
  static auto get() { return grad_dy_kernel<float, RP>; }
};

// Column slices and rows tiles per split of the grid (see the file header).
struct Plan {
  int64_t slices, slice_cols, splits, tiles_per_split;
};

Plan plan(int64_t M, int64_t N, int64_t rb, int deterministic, int num_sms) {
  const int64_t target = kBlocksPerSm * (num_sms > 0 ? num_sms : 1);
  const int64_t tiles = ceil_div(M, rows_per_tile(rb));
  const int64_t chunks = ceil_div(N, kCols);
  int64_t slices = ceil_div(target, tiles);
  if (slices > kMaxSlices) slices = kMaxSlices;
  if (slices > chunks) slices = chunks;
  const int64_t slice_cols = ceil_div(chunks, slices) * kCols;
  slices = ceil_div(N, slice_cols);
  int64_t per_split = tiles * slices / target;
  if (per_split < 1) per_split = 1;
  if (deterministic) {
    const int64_t most = kDetBufBytes / (rb * N * 4);
    const int64_t at_least = ceil_div(tiles, most > 1 ? most : 1);
    if (per_split < at_least) per_split = at_least;
  }
  return Plan{slices, slice_cols, ceil_div(tiles, per_split), per_split};
}

}  // namespace
}  // namespace ttkernels

extern "C" int64_t ttk_grad_dy_slices(int64_t M, int64_t N, int64_t rb, int num_sms) {
  using namespace ttkernels;
  if (M <= 0 || N <= 0 || rb < 1 || rb > kMaxRank) return 0;
  return plan(M, N, rb, 0, num_sms).slices;
}

extern "C" int64_t ttk_grad_dy_splits(int64_t M, int64_t N, int64_t rb, int deterministic, int num_sms) {
  using namespace ttkernels;
  if (M <= 0 || N <= 0 || rb < 1 || rb > kMaxRank) return 0;
  return plan(M, N, rb, deterministic, num_sms).splits;
}

extern "C" cudaError_t ttk_grad_dy_launch(ttk_dtype dtype, const void* dy, const void* U, const void* B, void* dU,
                                          float* dU_buf, float* dB_buf, int deterministic, int num_sms, int64_t M,
                                          int64_t N, int64_t rb, float scaling, cudaStream_t stream) {
  using namespace ttkernels;
  if (M <= 0 || N <= 0 || rb < 1 || rb > kMaxRank) return cudaErrorInvalidValue;
  const Plan p = plan(M, N, rb, deterministic, num_sms);
  if ((p.slices > 1) != (dU_buf != nullptr) || p.splits > 65535) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = can_vec<T>(dy, N) && can_vec<T>(B, N) ? 1 : 0;
    return dispatch_rank(rb, [&](auto rp) {
      constexpr int RP = decltype(rp)::value;
      const dim3 grid(static_cast<unsigned>(p.slices), static_cast<unsigned>(p.splits));
      auto* kernel = KernelFor<T, RP>::get();
      TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(dy), static_cast<const T*>(U),
                 static_cast<const T*>(B), static_cast<T*>(dU), dU_buf, dB_buf, deterministic, p.slice_cols,
                 p.tiles_per_split, vec, M, N, static_cast<int>(rb), scaling);
      return TTK_LAST_ERROR();
    });
  });
}
