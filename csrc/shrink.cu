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
// Launch: a grid of (row blocks, splits) blocks of 256 threads, 128 rows each up to rank 32 and 64 above (RP = ra
// padded to 16, 32, 64 or 128: the specialisations for small ranks; loops stop at the real rank). A block walks its
// range of K in chunks of 64 columns (32 at RP = 128), staging drop(x)'s rows and A's rows in shared memory
// (16-byte loads where the rows allow them, element loads otherwise: odd K, unaligned data). fp16 / bf16
// (shrink_mma_kernel): both tiles stay in their storage type and S is computed on tensor cores (WMMA 16 x 16 x 16,
// fp32 accumulators kept in registers across the chunks; ranks padded to 16 only inside the fragments, rank and
// row blocks past ra and M skipped). fp32 (shrink_kernel): the tiles are staged as fp32 (x transposed) and each
// thread accumulates a 4-row x (RP / 8 or RP / 16)-rank piece of S in registers with exact FMA (no TF32), reading
// the tiles back with 128-bit shared loads. With one split (the rows give at least two blocks per SM) the rounded S
// tile stays in shared memory for U = S C, which reads C (tiny, cached) from global memory. Split-K (decode: few
// rows) cuts K into up to 64 ranges of at least two chunks, for about four blocks per SM; each block writes fp32
// partial sums (splits, M, ra), and a second small kernel adds them in split order (deterministic), rounds S and
// computes U.
// Task ids are never copied to the host: a row whose id is out of range gets U = NaN instead of an
// out-of-bounds read.
// Limits: 1 <= M, K <= 2^32 (hashed indices are uint32), 1 <= ra, rb <= 128.
// Checked by: tests/test_steps.py (the step, runner cuda-emulated) and tests/test_cuda_emulated.py (this kernel's
// own cases) against the float64 reference on the CPU (both kernels, one split and split-K, aligned and unaligned x
// and A, whose staging must give the same bits; the WMMA calls through host_emulation.h), tests/test_steps.py (runner
// cuda) and tests/test_cuda_backend.py on a GPU.
#include <limits.h>
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kTileRows = 4;               // rows of S per thread (one 128-bit shared load of x per step)
constexpr int kFinishRows = 32;            // rows per block of the finishing kernel
constexpr int64_t kMinChunksPerSplit = 2;  // a split walks at least two chunks of K
constexpr int64_t kMaxSplits = 64;
constexpr int kVecX = 1;  // bits of a kernel's `vec`: x's rows allow 16-byte loads
constexpr int kVecA = 2;  // A's rows allow 16-byte loads (the tensor-core kernel uses them)

// The shape of a block for the rank bucket RP: kRankGroups threads share a row group and own kTileRanks
// consecutive ranks each; a block covers kRows rows and walks K in chunks of kChunk columns.
template <int RP>
struct Shape {
  static constexpr int kRankGroups = RP <= 32 ? 8 : 16;
  static constexpr int kTileRanks = RP / kRankGroups;                  // 2, 4, 4, 8
  static constexpr int kRows = kThreads / kRankGroups * kTileRows;      // 128, 128, 64, 64
  static constexpr int kChunk = RP >= 128 ? 32 : 64;
  static constexpr int kPitch = kRows + 4;                              // xs row pitch: 16-byte aligned rows
  static constexpr int kXs = kChunk * kPitch;                           // xs[k][row], drop(x) transposed
  static constexpr int kAs = kChunk * RP;                               // as[k][j]
  static constexpr int kSs = kRows * (RP + 1);                          // ss[row][j], the rounded S tile
  static constexpr int kSmem = kXs + kAs > kSs ? kXs + kAs : kSs;
};

int64_t rows_per_block(int64_t ra) {
  switch (rank_pad(ra)) {
    case 16:
      return Shape<16>::kRows;
    case 32:
      return Shape<32>::kRows;
    case 64:
      return Shape<64>::kRows;
    default:
      return Shape<128>::kRows;
  }
}

int64_t chunk_of(int64_t ra) { return rank_pad(ra) >= 128 ? Shape<128>::kChunk : Shape<16>::kChunk; }

// Writes the block's rows of S from ss (the rounded S tile, [kRows][kLd], fp32) and, when C is given, U = S C
// (C per row by task_ids; a row whose id is out of range gets NaN). Called by every thread of the block.
template <typename T, int kLd, int kRows>
__device__ __forceinline__ void write_s_and_u(const float* ss, const T* __restrict__ C,
                                              const int64_t* __restrict__ task_ids, int64_t num_tasks,
                                              T* __restrict__ S, T* __restrict__ U, int64_t row0, int64_t M, int ra,
                                              int rb) {
  const int tid = threadIdx.x;
  for (int e = tid; e < kRows * ra; e += kThreads) {
    const int i = e / ra;
    const int j = e % ra;
    const int64_t row = row0 + i;
    if (row < M) S[row * ra + j] = from_float<T>(ss[i * kLd + j]);  // exact: ss holds rounded values
  }
  if (C == nullptr) return;
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
    for (int k = 0; k < ra; ++k) u = fmaf(ss[i * kLd + k], to_float(c[k * rb + j]), u);
    U[row * rb + j] = from_float<T>(u);
  }
}

// grid (row blocks, splits): the block of split s walks the columns [s * k_per_split, (s + 1) * k_per_split) of
// x. One split: it writes S and U. Several: it writes its fp32 partial sums, every element of
// partial[s][rows][ra], and shrink_finish_kernel adds the splits in order.
template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 2)
    shrink_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ C,
                  const int64_t* __restrict__ task_ids, int64_t num_tasks, T* __restrict__ S, T* __restrict__ U,
                  float* __restrict__ partial, int64_t k_per_split, int vec, int64_t M, int64_t K, int ra, int rb,
                  DropoutArgs drop) {
  using Sh = Shape<RP>;
  constexpr int kRows = Sh::kRows;
  constexpr int kChunk = Sh::kChunk;
  constexpr int kPitch = Sh::kPitch;
  constexpr int TC = Sh::kTileRanks;
  static_assert(Sh::kSmem * 4 + kRows * 4 <= 48 * 1024, "static shared memory above 48 KiB");
  __shared__ __align__(16) float smem[Sh::kSmem];
  __shared__ uint32_t row_hash[kRows];
  float* xs = smem;           // [kChunk][kPitch]
  float* as = smem + Sh::kXs;  // [kChunk][RP]

  const int tid = threadIdx.x;
  const int rank0 = (tid % Sh::kRankGroups) * TC;    // this thread's ranks: rank0 .. rank0 + TC - 1
  const int trow0 = (tid / Sh::kRankGroups) * kTileRows;  // this thread's rows: trow0 .. trow0 + 3
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
  const bool live = rank0 < ra;  // a thread whose ranks are all padding skips the products

  if (drop.enabled) {
    const uint64_t seed = load_seed(drop);
    for (int i = tid; i < kRows; i += kThreads) {
      row_hash[i] = dropout_row_hash(seed, static_cast<uint32_t>(row0 + i));
    }
  }

  float acc[kTileRows][TC];
#pragma unroll
  for (int w = 0; w < kTileRows; ++w)
#pragma unroll
    for (int q = 0; q < TC; ++q) acc[w][q] = 0.0f;

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
    __syncthreads();  // the previous step's tiles are consumed (and row_hash is visible)
    // drop(x) tile, transposed into xs[k][i]: consecutive threads take consecutive rows, so the shared stores do
    // not conflict; a warp's 16-byte loads of one column range cover whole sectors across the block's threads.
    if (vec & kVecX) {
      constexpr int V = vec_width<T>();
      for (int e = tid; e < kRows * (kChunk / V); e += kThreads) {
        const int i = e % kRows;
        const int k = (e / kRows) * V;
        const int64_t row = row0 + i;
        const int64_t kk = k0 + k;
        float v[V];
        if (row < M && kk < k_end) {
          load_vec(x + row * K + kk, v);  // K is a multiple of V: the whole vector is in range
          if (drop.enabled) {
#pragma unroll
            for (int t = 0; t < V; ++t) {
              v[t] = dropout_keep(row_hash[i], static_cast<uint32_t>(kk + t), drop.threshold)
                         ? round_trip<T>(v[t] * drop.scale)
                         : 0.0f;
            }
          }
        } else {
#pragma unroll
          for (int t = 0; t < V; ++t) v[t] = 0.0f;
        }
#pragma unroll
        for (int t = 0; t < V; ++t) xs[(k + t) * kPitch + i] = v[t];
      }
    } else {
      for (int e = tid; e < kRows * kChunk; e += kThreads) {
        const int k = e % kChunk;  // consecutive threads read consecutive columns of a row
        const int i = e / kChunk;
        const int64_t row = row0 + i;
        const int64_t kk = k0 + k;
        float v = 0.0f;
        if (row < M && kk < k_end) {
          v = to_float(x[row * K + kk]);
          if (drop.enabled) {
            v = dropout_keep(row_hash[i], static_cast<uint32_t>(kk), drop.threshold) ? round_trip<T>(v * drop.scale)
                                                                                     : 0.0f;
          }
        }
        xs[k * kPitch + i] = v;
      }
    }
    for (int e = tid; e < kChunk * RP; e += kThreads) {
      const int k = e / RP;
      const int j = e % RP;
      const int64_t kk = k0 + k;
      as[e] = (kk < k_end && j < ra) ? to_float(A[kk * ra + j]) : 0.0f;
    }
    __syncthreads();
    const int steps = k_end - k0 < kChunk ? static_cast<int>(k_end - k0) : kChunk;
    if (live) {
      for (int k = 0; k < steps; ++k) {
        float xv[kTileRows];
        float av[TC];
        load_shared<kTileRows>(xs + k * kPitch + trow0, xv);  // one 128-bit load
        load_shared<TC>(as + k * RP + rank0, av);             // 64- to 2 x 128-bit loads
#pragma unroll
        for (int w = 0; w < kTileRows; ++w)
#pragma unroll
          for (int q = 0; q < TC; ++q) acc[w][q] = fmaf(xv[w], av[q], acc[w][q]);
      }
    }
  }

  if (partial != nullptr) {
    float* out = partial + static_cast<int64_t>(blockIdx.y) * M * ra;
#pragma unroll
    for (int w = 0; w < kTileRows; ++w) {
      const int64_t row = row0 + trow0 + w;
#pragma unroll
      for (int q = 0; q < TC; ++q) {
        const int j = rank0 + q;
        if (row < M && j < ra) out[row * ra + j] = acc[w][q];
      }
    }
    return;
  }
  __syncthreads();  // xs / as are reused for the rounded S tile
  float* ss = smem;  // [kRows][RP + 1]
#pragma unroll
  for (int w = 0; w < kTileRows; ++w)
#pragma unroll
    for (int q = 0; q < TC; ++q) ss[(trow0 + w) * (RP + 1) + rank0 + q] = round_trip<T>(acc[w][q]);
  __syncthreads();
  write_s_and_u<T, RP + 1, kRows>(ss, C, task_ids, num_tasks, S, U, row0, M, ra, rb);
}

// The same step for fp16 / bf16 on tensor cores (WMMA 16 x 16 x 16, fp32 accumulation): the same grid, row
// blocks, K chunks, splits and outputs as shrink_kernel. Each chunk stages, in their storage type in shared memory,
// drop(x)'s rows (the mask applied and the value rounded to T as the tile is staged, as the reference rounds
// drop(x); 16-byte loads issued one chunk ahead into registers when x's rows allow them, element loads of only the
// 16-row blocks that hold rows below M otherwise) and A's rows (the real rank padded to 16; 16-byte loads when A's
// rows allow them). Warp w owns the 16-row block
// w / kWarpsPerRowBlock of the tile and kJPerWarp consecutive 16-rank blocks, whose fp32 accumulators stay in
// registers across the chunks; rank blocks at or above ra, row blocks at or after M and the 16-column steps past
// the end of K are skipped (warp-uniform). The accumulators then go through a shared fp32 stage (reusing the
// tiles' memory) to the partial sums, or to S (rounded) and U.
template <typename T, int RP>
__global__ void __launch_bounds__(kThreads, 3)
    shrink_mma_kernel(const T* __restrict__ x, const T* __restrict__ A, const T* __restrict__ C,
                      const int64_t* __restrict__ task_ids, int64_t num_tasks, T* __restrict__ S, T* __restrict__ U,
                      float* __restrict__ partial, int64_t k_per_split, int vec, int64_t M, int64_t K, int ra, int rb,
                      DropoutArgs drop) {
  static_assert(sizeof(T) == 2, "tensor-core path: fp16 / bf16");
  using Sh = Shape<RP>;
  constexpr int kRows = Sh::kRows;
  constexpr int kChunk = Sh::kChunk;
  constexpr int kWarps = kThreads / 32;
  constexpr int kLdX = kChunk + 8;  // T elements per row of xs (rows 16-byte aligned, banks staggered)
  constexpr int kLdA = RP + 8;      // T elements per row of as
  constexpr int kLdS = RP + 4;      // floats per row of the S stage
  constexpr int kRowBlocks = kRows / 16;
  constexpr int kWarpsPerRowBlock = kWarps / kRowBlocks;       // 1, 1, 2, 2
  constexpr int kJPerWarp = RP / 16 / kWarpsPerRowBlock;       // 1, 2, 2, 4
  static_assert(kWarps % kRowBlocks == 0 && (RP / 16) % kWarpsPerRowBlock == 0, "every warp owns whole blocks");
  constexpr int kTileBytes = (kRows * kLdX + kChunk * kLdA) * 2;
  constexpr int kStageBytes = kRows * kLdS * 4;
  constexpr int kSmem = kTileBytes > kStageBytes ? kTileBytes : kStageBytes;
  static_assert(kSmem + kRows * 4 <= 48 * 1024, "static shared memory above 48 KiB");
  static_assert((kRows * kLdX * 2) % 32 == 0, "as must start 32-byte aligned");
  constexpr int V = 8;  // T elements per 16 bytes
  __shared__ __align__(32) unsigned char smem[kSmem];
  __shared__ uint32_t row_hash[kRows];
  T* xs = reinterpret_cast<T*>(smem);              // [kRows][kLdX]: drop(x) tile
  T* as = xs + kRows * kLdX;                        // [kChunk][kLdA]: A tile
  float* stage = reinterpret_cast<float*>(smem);    // [kRows][kLdS]: S tile, after the chunks

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int ib = warp / kWarpsPerRowBlock;                 // this warp's 16-row block of the tile
  const int jb0 = (warp % kWarpsPerRowBlock) * kJPerWarp;  // and its first 16-rank block
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * k_per_split;
  const int64_t k_end = k_begin + k_per_split < K ? k_begin + k_per_split : K;
  const int rows = M - row0 < kRows ? static_cast<int>(M - row0) : kRows;  // rows of S in this block
  const int rows16 = (rows + 15) / 16 * 16;                                 // rows staged
  const int ra16 = (ra + 15) / 16 * 16;                                     // ranks staged
  const bool live = ib * 16 < rows && jb0 * 16 < ra;                        // warp-uniform
  const T zero = from_float<T>(0.0f);

  if (drop.enabled) {
    const uint64_t seed = load_seed(drop);
    for (int i = tid; i < kRows; i += kThreads) {
      row_hash[i] = dropout_row_hash(seed, static_cast<uint32_t>(row0 + i));
    }
  }

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kJPerWarp];
#pragma unroll
  for (int u = 0; u < kJPerWarp; ++u) wmma::fill_fragment(acc[u], 0.0f);

  // Vector path: the thread's 16-byte pieces of a chunk's x tile (consecutive threads take consecutive pieces of a
  // row) are loaded into registers one chunk ahead, so that their loads are in flight during the products of the
  // current chunk, then masked, scaled, rounded and stored to xs at the start of their chunk.
  constexpr int kXVecs = kRows * (kChunk / V) / kThreads;  // 4, 4, 2, 1
  static_assert(kXVecs * kThreads == kRows * (kChunk / V), "the x tile is whole 16-byte pieces per thread");
  const bool vec_x = (vec & kVecX) != 0;
  uint4 xr[kXVecs];
  auto load_x = [&](int64_t k0) {
#pragma unroll
    for (int u = 0; u < kXVecs; ++u) {
      const int e = tid + u * kThreads;
      const int64_t row = row0 + e / (kChunk / V);
      const int64_t kk = k0 + (e % (kChunk / V)) * V;
      // K is a multiple of V: a piece that starts in range is whole
      xr[u] = (row < M && kk < k_end) ? load_16b(x + row * K + kk) : uint4{0u, 0u, 0u, 0u};
    }
  };
  auto store_x = [&](int64_t k0) {
#pragma unroll
    for (int u = 0; u < kXVecs; ++u) {
      const int e = tid + u * kThreads;
      const int i = e / (kChunk / V);
      const int k = (e % (kChunk / V)) * V;
      uint4 v = xr[u];
      if (drop.enabled) {
        T t8[V];
        memcpy(t8, &v, 16);
#pragma unroll
        for (int t = 0; t < V; ++t) {
          t8[t] = dropout_keep(row_hash[i], static_cast<uint32_t>(k0 + k + t), drop.threshold)
                      ? from_float<T>(to_float(t8[t]) * drop.scale)
                      : zero;
        }
        memcpy(&v, t8, 16);
      }
      store_16b(xs + i * kLdX + k, v);
    }
  };
  if (vec_x && k_begin < k_end) load_x(k_begin);

  for (int64_t k0 = k_begin; k0 < k_end; k0 += kChunk) {
    __syncthreads();  // the previous step's tiles are consumed (and row_hash is visible)
    // drop(x) tile, row-major
    if (vec_x) {
      store_x(k0);
    } else {
      for (int e = tid; e < rows16 * kChunk; e += kThreads) {
        const int k = e % kChunk;
        const int i = e / kChunk;
        const int64_t row = row0 + i;
        const int64_t kk = k0 + k;
        T v = zero;
        if (row < M && kk < k_end) {
          v = x[row * K + kk];
          if (drop.enabled) {
            const bool keep = dropout_keep(row_hash[i], static_cast<uint32_t>(kk), drop.threshold);
            v = keep ? from_float<T>(to_float(v) * drop.scale) : zero;
          }
        }
        xs[i * kLdX + k] = v;
      }
    }
    // A tile: ranks up to ra16 (the rank blocks the fragments read), zero at and above ra and past k_end
    if (vec & kVecA) {
      const int per_row = ra16 / V;
#pragma unroll 1
      for (int e = tid; e < kChunk * per_row; e += kThreads) {
        const int k = e / per_row;
        const int j = (e % per_row) * V;
        const int64_t kk = k0 + k;
        T* dst = as + k * kLdA + j;
        if (kk < k_end && j < ra) {  // ra is a multiple of V: the whole vector is in range
          copy_16b(dst, A + kk * ra + j);
        } else {
#pragma unroll
          for (int t = 0; t < V; ++t) dst[t] = zero;
        }
      }
    } else {
      for (int e = tid; e < kChunk * ra16; e += kThreads) {
        const int k = e / ra16;
        const int j = e % ra16;
        const int64_t kk = k0 + k;
        as[k * kLdA + j] = (kk < k_end && j < ra) ? A[kk * ra + j] : zero;
      }
    }
    __syncthreads();
    if (vec_x && k0 + kChunk < k_end) load_x(k0 + kChunk);  // in flight during this chunk's products
    if (live) {
      const int steps = k_end - k0 < kChunk ? static_cast<int>(k_end - k0) : kChunk;
      for (int kb = 0; kb * 16 < steps; ++kb) {  // columns past k_end are zero in both tiles
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, xs + ib * 16 * kLdX + kb * 16, kLdX);
#pragma unroll
        for (int u = 0; u < kJPerWarp; ++u) {
          const int jb = jb0 + u;
          if (jb * 16 >= ra) break;  // warp-uniform: the real rank only
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
          wmma::load_matrix_sync(b, as + kb * 16 * kLdA + jb * 16, kLdA);
          wmma::mma_sync(acc[u], a, b, acc[u]);
        }
      }
    }
  }

  __syncthreads();  // the tiles are consumed: the stage reuses their memory
  if (live) {
#pragma unroll
    for (int u = 0; u < kJPerWarp; ++u) {
      const int jb = jb0 + u;
      if (jb * 16 >= ra) break;
      wmma::store_matrix_sync(stage + ib * 16 * kLdS + jb * 16, acc[u], kLdS, wmma::mem_row_major);
    }
  }
  __syncthreads();
  if (partial != nullptr) {  // every element of this split's rows below M and ranks below ra
    float* out = partial + (static_cast<int64_t>(blockIdx.y) * M + row0) * ra;
    for (int e = tid; e < rows * ra; e += kThreads) out[e] = stage[(e / ra) * kLdS + e % ra];
    return;
  }
  for (int e = tid; e < rows * ra; e += kThreads) {
    float* v = stage + (e / ra) * kLdS + e % ra;
    *v = round_trip<T>(*v);
  }
  __syncthreads();
  write_s_and_u<T, kLdS, kRows>(stage, C, task_ids, num_tasks, S, U, row0, M, ra, rb);
}

// fp32 stays on the exact FMA path (no TF32); fp16 / bf16 take the tensor cores.
template <typename T, int RP>
struct KernelFor {
  static auto get() { return shrink_mma_kernel<T, RP>; }
};
template <int RP>
struct KernelFor<float, RP> {
  static auto get() { return shrink_kernel<float, RP>; }
};

// S = round(sum over splits s = 0, 1, ... of partial[s]) and U = S C, for kFinishRows rows per block.
template <typename T, int RP>
__global__ void __launch_bounds__(kThreads)
    shrink_finish_kernel(const float* __restrict__ partial, int64_t splits, const T* __restrict__ C,
                         const int64_t* __restrict__ task_ids, int64_t num_tasks, T* __restrict__ S,
                         T* __restrict__ U, int64_t M, int ra, int rb) {
  __shared__ float ss[kFinishRows * (RP + 1)];
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kFinishRows;
  for (int e = threadIdx.x; e < kFinishRows * ra; e += kThreads) {
    const int i = e / ra;
    const int j = e % ra;
    const int64_t row = row0 + i;
    float v = 0.0f;
    if (row < M) {
      for (int64_t s = 0; s < splits; ++s) v += partial[(s * M + row) * ra + j];
    }
    ss[i * (RP + 1) + j] = round_trip<T>(v);
  }
  __syncthreads();
  write_s_and_u<T, RP + 1, kFinishRows>(ss, C, task_ids, num_tasks, S, U, row0, M, ra, rb);
}

struct Plan {
  int64_t splits, k_per_split;
};

// Split-K when the rows give fewer than two blocks per SM (decode, and M up to a few thousand at small ranks):
// about four blocks per SM, each at least kMinChunksPerSplit chunks of K. A function of (M, K, ra, SM count) only.
Plan plan(int64_t M, int64_t K, int64_t ra, int num_sms) {
  const int64_t sms = num_sms > 0 ? num_sms : 1;
  const int64_t row_blocks = ceil_div(M, rows_per_block(ra));
  const int64_t chunk = chunk_of(ra);
  const int64_t chunks = ceil_div(K, chunk);
  if (row_blocks >= 2 * sms) return Plan{1, chunks * chunk};
  int64_t want = ceil_div(4 * sms, row_blocks);
  const int64_t most = ceil_div(chunks, kMinChunksPerSplit);
  if (want > most) want = most;
  if (want > kMaxSplits) want = kMaxSplits;
  const int64_t per = ceil_div(chunks, want < 1 ? 1 : want);
  return Plan{ceil_div(chunks, per), per * chunk};
}

}  // namespace
}  // namespace ttkernels

extern "C" int64_t ttk_shrink_splits(int64_t M, int64_t K, int64_t ra, int num_sms) {
  using namespace ttkernels;
  if (M <= 0 || K <= 0 || ra < 1 || ra > kMaxRank) return 0;
  return plan(M, K, ra, num_sms).splits;
}

extern "C" cudaError_t ttk_shrink_launch(ttk_dtype dtype, const void* x, const void* A, const void* C,
                                         const int64_t* task_ids, int64_t num_tasks, void* S, void* U, float* partial,
                                         int num_sms, int64_t M, int64_t K, int64_t ra, int64_t rb, int dropout,
                                         const int64_t* seed, uint32_t threshold, float scale, cudaStream_t stream) {
  using namespace ttkernels;
  constexpr int64_t kMaxIndex = int64_t{1} << 32;
  if (M <= 0 || K <= 0 || M > kMaxIndex || K > kMaxIndex) return cudaErrorInvalidValue;
  if (ra < 1 || ra > kMaxRank || rb < 1 || rb > kMaxRank) return cudaErrorInvalidValue;
  if (dropout && seed == nullptr) return cudaErrorInvalidValue;
  if ((C == nullptr) != (U == nullptr) || (C == nullptr && task_ids != nullptr)) return cudaErrorInvalidValue;
  if (C == nullptr && ra != rb) return cudaErrorInvalidValue;
  if (ceil_div(M, rows_per_block(ra)) > INT_MAX) return cudaErrorInvalidValue;
  const Plan p = plan(M, K, ra, num_sms);
  if ((p.splits > 1) != (partial != nullptr)) return cudaErrorInvalidValue;
  const DropoutArgs drop = make_dropout(dropout, seed, threshold, scale);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, rows_per_block(ra))), static_cast<unsigned>(p.splits));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    const int vec = (can_vec<T>(x, K) ? kVecX : 0) | (can_vec<T>(A, ra) ? kVecA : 0);
    return dispatch_rank(ra, [&](auto rp) {
      constexpr int RP = decltype(rp)::value;
      auto* kernel = KernelFor<T, RP>::get();
      TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(x), static_cast<const T*>(A),
                 static_cast<const T*>(C), task_ids, num_tasks, static_cast<T*>(S), static_cast<T*>(U), partial,
                 p.k_per_split, vec, M, K, static_cast<int>(ra), static_cast<int>(rb), drop);
      cudaError_t err = TTK_LAST_ERROR();
      if (err != cudaSuccess || p.splits == 1) return err;
      auto* finish = shrink_finish_kernel<T, RP>;
      const dim3 finish_grid(static_cast<unsigned>(ceil_div(M, kFinishRows)));
      TTK_LAUNCH(finish, finish_grid, kThreads, stream, static_cast<const float*>(partial), p.splits,
                 static_cast<const T*>(C), task_ids, num_tasks, static_cast<T*>(S), static_cast<T*>(U), M,
                 static_cast<int>(ra), static_cast<int>(rb));
      return TTK_LAST_ERROR();
    });
  });
}
