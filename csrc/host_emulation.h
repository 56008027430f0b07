// host_emulation.h: runs the kernels of csrc/*.cu on the CPU, for tests on machines without a GPU.
//
// Compiled only with -DTTK_HOST_EMULATION by a host compiler (never by nvcc, never into the extension):
//
//   g++ -std=c++20 -O1 -x c++ -DTTK_HOST_EMULATION -Icsrc -I$CUDA_HOME/include -shared -fPIC -pthread \
//       csrc/shrink.cu csrc/grad_dy.cu csrc/token_reduce.cu csrc/accumulate.cu csrc/rowmix.cu csrc/finalize.cu \
//       csrc/dropout.cu csrc/ttm.cu -o libttk_emu.so
//
// (tests/test_cuda_emulated.py does it.) A launch runs the grid's blocks one after another; a block runs as
// blockDim threads (std::thread) that meet at __syncthreads() on a std::barrier, so shared memory is a plain
// `static` array (one block at a time uses it), atomicAdd is an atomic fetch-add, and the kernel code is the
// same source the GPU runs: indexing, masking, tiling, synchronisation and reductions are exercised as
// written. Vector loads (tt_common.cuh's load_vec from global memory, load_shared from shared memory) check
// that their address is aligned as the GPU requires: a misaligned one makes the launch return
// cudaErrorMisalignedAddress. Warp-level matrix operations (the WMMA subset below) run whole in every lane.
// What it cannot show: speed, the GPU's memory model beyond __syncthreads, how a fragment is spread over the
// lanes, and anything the compiler does differently for sm_80 / sm_90.
#pragma once

#if !defined(TTK_HOST_EMULATION) || defined(__CUDACC__)
#error "host_emulation.h is for host builds with -DTTK_HOST_EMULATION only"
#endif

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

// The CUDA qualifiers as a host compiler should see them.
#undef __global__
#define __global__
#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

namespace ttkernels {
namespace emu {

inline thread_local uint3 thread_idx;
inline thread_local uint3 block_idx;
inline thread_local dim3 grid_dim;
inline thread_local dim3 block_dim;
inline thread_local std::barrier<>* block_barrier = nullptr;
inline std::atomic<bool> misaligned{false};  // a vector load saw an address that is not 16-byte aligned

inline void load_16_bytes(void* dst, const void* src) {
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) {
    misaligned = true;
    std::memset(dst, 0xff, 16);  // NaN-like garbage instead of the data
    return;
  }
  std::memcpy(dst, src, 16);
}

// A vector load of `bytes` that the GPU requires to be `align`-byte aligned (shared-memory float2 / float4).
inline void load_aligned(void* dst, const void* src, size_t bytes, size_t align) {
  if (reinterpret_cast<uintptr_t>(src) % align != 0) {
    misaligned = true;
    std::memset(dst, 0xff, bytes);
    return;
  }
  std::memcpy(dst, src, bytes);
}

// The status of the last launch: what the GPU would report for a misaligned vector load.
inline cudaError_t last_error() { return misaligned.exchange(false) ? cudaErrorMisalignedAddress : cudaSuccess; }

// Runs body() once per thread of every block of the grid, blocks in order.
inline void launch(dim3 grid, dim3 block, const std::function<void()>& body) {
  const unsigned threads = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::barrier<> sync(static_cast<std::ptrdiff_t>(threads));
        std::vector<std::thread> pool;
        pool.reserve(threads);
        for (unsigned t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            thread_idx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
            block_idx = uint3{bx, by, bz};
            grid_dim = grid;
            block_dim = block;
            block_barrier = &sync;
            body();
            sync.arrive_and_drop();  // a finished thread no longer holds the others at a barrier
          });
        }
        for (auto& th : pool) th.join();
      }
}

// The subset of nvcuda::wmma (mma.h) the kernels use, for 16 x 16 x 16 tiles of fp16 / bf16 with fp32
// accumulators: fill_fragment, load_matrix_sync, mma_sync, store_matrix_sync. A warp's fragment is distributed
// over its 32 lanes on the GPU; here every lane holds the whole tile and computes the whole product (the
// result of a warp-wide operation is the same in every lane, which is what the kernels may rely on). The
// products are exact in fp32 and summed in k order; the GPU's tensor cores sum in an unspecified order. The
// GPU's requirements are checked as the GPU would fail them: a pointer not 32-byte aligned, or a leading
// dimension not a multiple of 16 bytes, makes the launch fail with cudaErrorMisalignedAddress.
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int m, int n, int k>
struct frag_shape;
template <int m, int n, int k>
struct frag_shape<matrix_a, m, n, k> {
  static constexpr int rows = m, cols = k;
};
template <int m, int n, int k>
struct frag_shape<matrix_b, m, n, k> {
  static constexpr int rows = k, cols = n;
};
template <int m, int n, int k>
struct frag_shape<accumulator, m, n, k> {
  static constexpr int rows = m, cols = n;
};

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = frag_shape<Use, m, n, k>::rows;
  static constexpr int cols = frag_shape<Use, m, n, k>::cols;
  float v[rows][cols];
};

inline float value_of(float x) { return x; }
inline float value_of(__half x) { return __half2float(x); }
inline float value_of(__nv_bfloat16 x) { return __bfloat162float(x); }

inline bool bad_operand(const void* p, unsigned ldm, size_t elem) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || (ldm * elem) % 16 != 0) {
    misaligned = true;
    return true;
  }
  return false;
}

template <typename F>
inline void fill_fragment(F& f, float value) {
  for (auto& row : f.v)
    for (auto& e : row) e = value;
}

// element (r, c) of the tile at p[r * ldm + c] (row_major) or p[c * ldm + r] (col_major)
template <typename Use, int m, int n, int k, typename T, typename Layout>
inline void load_matrix_sync(fragment<Use, m, n, k, T, Layout>& f, const T* p, unsigned ldm) {
  using F = fragment<Use, m, n, k, T, Layout>;
  if (bad_operand(p, ldm, sizeof(T))) return fill_fragment(f, std::numeric_limits<float>::quiet_NaN());
  for (int r = 0; r < F::rows; ++r)
    for (int c = 0; c < F::cols; ++c) {
      f.v[r][c] = value_of(std::is_same<Layout, row_major>::value ? p[r * ldm + c] : p[c * ldm + r]);
    }
}

template <int m, int n, int k, typename TA, typename LA, typename TB, typename LB>
inline void mma_sync(fragment<accumulator, m, n, k, float>& d, const fragment<matrix_a, m, n, k, TA, LA>& a,
                     const fragment<matrix_b, m, n, k, TB, LB>& b, const fragment<accumulator, m, n, k, float>& c) {
  fragment<accumulator, m, n, k, float> out;
  for (int i = 0; i < m; ++i)
    for (int j = 0; j < n; ++j) {
      float s = c.v[i][j];
      for (int t = 0; t < k; ++t) s += a.v[i][t] * b.v[t][j];
      out.v[i][j] = s;
    }
  d = out;
}

// Every lane stores the same values (relaxed atomic stores: concurrent, identical, and not a data race).
template <int m, int n, int k>
inline void store_matrix_sync(float* p, const fragment<accumulator, m, n, k, float>& f, unsigned ldm,
                              layout_t layout) {
  if (bad_operand(p, ldm, sizeof(float))) return;
  for (int r = 0; r < m; ++r)
    for (int c = 0; c < n; ++c) {
      float* dst = layout == mem_row_major ? p + r * ldm + c : p + c * ldm + r;
      std::atomic_ref<float>(*dst).store(f.v[r][c], std::memory_order_relaxed);
    }
}

}  // namespace wmma

}  // namespace emu
}  // namespace ttkernels

#define threadIdx (::ttkernels::emu::thread_idx)
#define blockIdx (::ttkernels::emu::block_idx)
#define gridDim (::ttkernels::emu::grid_dim)
#define blockDim (::ttkernels::emu::block_dim)

inline void __syncthreads() { ::ttkernels::emu::block_barrier->arrive_and_wait(); }

inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }

inline float __int_as_float(int bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

using std::fmaf;

#define TTK_LAUNCH(kernel, grid, block, stream, ...) \
  ((void)(stream), ::ttkernels::emu::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); }))
#define TTK_LAST_ERROR() ::ttkernels::emu::last_error()
