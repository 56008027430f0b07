// tt_common.cuh: device helpers shared by the adapter kernels (no torch headers).
//
// * element conversions between the storage types (float, __half, __nv_bfloat16) and float, rounding to
//   nearest even like torch's .to(dtype);
// * RankPad: the rank buckets the kernels are specialised for (16, 32, 64, 128) and the dispatch from a
//   runtime rank to one of them;
// * TTK_LAUNCH / TTK_LAST_ERROR: a kernel launch and its status, which host_emulation.h replaces to run the
//   kernels on the CPU in tests (-DTTK_HOST_EMULATION);
// * DropoutArgs: the seed (a pointer to one int64 in device memory), threshold and scale of csrc/dropout_hash.cuh,
//   passed by value to kernels; load_seed reads the seed on the device;
// * wmma: nvcuda::wmma (tensor cores), or its emulation in host_emulation.h; copy_16b: a 16-byte copy from global
//   to shared memory, and its halves load_16b (global to registers) and store_16b (registers to shared memory);
// * load_shared: 64- / 128-bit loads of fp32 from shared memory into registers;
// * load_vec: one 16-byte global load (8 fp16 / bf16 or 4 fp32 elements) converted to float, and can_vec, the
//   launcher's test that a row-major operand allows it (base address 16-byte aligned, row length a multiple
//   of the vector width); the emulation checks the alignment of every vector load.
// Every index that is hashed is a uint32 (the bindings refuse more than 2^32 rows or columns).
#pragma once

#include <stdint.h>

#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dropout_hash.cuh"
#include "ttkernels_kernels.h"

#if defined(TTK_HOST_EMULATION) && !defined(__CUDACC__)
#include "host_emulation.h"
namespace ttkernels {
namespace wmma = emu::wmma;
}  // namespace ttkernels
#else
#include <mma.h>
namespace ttkernels {
namespace wmma = nvcuda::wmma;
}  // namespace ttkernels
// kernel is a plain name or a function pointer (a template-id's commas would split the macro's arguments).
#define TTK_LAUNCH(kernel, grid, block, stream, ...) kernel<<<(grid), (block), 0, (stream)>>>(__VA_ARGS__)
#define TTK_LAST_ERROR() cudaGetLastError()
#endif

namespace ttkernels {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// The value a storage element holds once rounded: what a kernel must compute with when the reference rounds
// an intermediate (S) to the activation dtype before using it again.
template <typename T>
__device__ __forceinline__ float round_trip(float v) { return to_float(from_float<T>(v)); }

struct DropoutArgs {
  const int64_t* seed;  // one int64 in device memory, read by the kernels (null when not enabled)
  uint32_t threshold;   // floor(p * 2^32); 0 means no dropout
  float scale;          // fp32(1 / (1 - p))
  int enabled;          // p > 0
};

inline DropoutArgs make_dropout(int enabled, const int64_t* seed, uint32_t threshold, float scale) {
  return DropoutArgs{seed, threshold, scale, enabled};
}

// The seed's 64 bits, read from device memory (0 when dropout is off: nothing is read). The host never reads the
// seed, so a kernel captured in a CUDA graph hashes the value the seed has at each replay. The bits are taken as
// uint64: a negative int64 gives the mask of value + 2^64 (the device cannot raise; the callers check the seed).
__device__ __forceinline__ uint64_t load_seed(const DropoutArgs& drop) {
  return drop.enabled ? static_cast<uint64_t>(*drop.seed) : 0u;
}

// The largest rank a kernel supports, and the padded ranks it is compiled for.
constexpr int kMaxRank = 128;

inline int rank_pad(int64_t r) {
  if (r <= 16) return 16;
  if (r <= 32) return 32;
  if (r <= 64) return 64;
  return 128;
}

// Calls f(std::integral_constant<int, RP>{}) for the bucket RP of r (the caller has checked
// 1 <= r <= kMaxRank); a generic lambda reads RP back as decltype(arg)::value (C++14: no template lambdas, so
// the files also build where torch's headers ask for C++17).
template <typename F>
cudaError_t dispatch_rank(int64_t r, F&& f) {
  switch (rank_pad(r)) {
    case 16:
      return f(std::integral_constant<int, 16>{});
    case 32:
      return f(std::integral_constant<int, 32>{});
    case 64:
      return f(std::integral_constant<int, 64>{});
    default:
      return f(std::integral_constant<int, 128>{});
  }
}

// Calls f(T{}) with the storage type of dtype; an unknown dtype gives cudaErrorInvalidValue.
template <typename F>
cudaError_t dispatch_dtype(ttk_dtype dtype, F&& f) {
  switch (dtype) {
    case TTK_DTYPE_FLOAT32:
      return f(float{});
    case TTK_DTYPE_FLOAT16:
      return f(__half{});
    case TTK_DTYPE_BFLOAT16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Elements of T in one 16-byte vector.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// out[i] = float(p[i]) for i < vec_width<T>(), in one 16-byte load; p must be 16-byte aligned. kReadOnly: through
// the read-only data cache (only for data no thread writes while the kernel runs).
template <typename T, bool kReadOnly = true>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, float* out) {
  constexpr int n = vec_width<T>();
#if defined(TTK_HOST_EMULATION) && !defined(__CUDACC__)
  T e[n];
  emu::load_16_bytes(e, p);
#else
  const uint4 raw = kReadOnly ? __ldg(reinterpret_cast<const uint4*>(p)) : *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#endif
#pragma unroll
  for (int i = 0; i < n; ++i) out[i] = to_float(e[i]);
}

// p[i] = v[i] for i < vec_width<T>(), in one 16-byte store; p must be 16-byte aligned.
template <typename T>
__device__ __forceinline__ void store_vec(T* p, const T* v) {
#if defined(TTK_HOST_EMULATION) && !defined(__CUDACC__)
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) {
    emu::misaligned = true;
    return;
  }
  std::memcpy(p, v, 16);
#else
  uint4 raw;
  memcpy(&raw, v, 16);
  *reinterpret_cast<uint4*>(p) = raw;
#endif
}

// 16 bytes from global memory (16-byte aligned) to shared memory (16-byte aligned), without conversion.
__device__ __forceinline__ void copy_16b(void* dst, const void* src) {
#if defined(TTK_HOST_EMULATION) && !defined(__CUDACC__)
  emu::load_aligned(dst, src, 16, 16);
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) emu::misaligned = true;
#else
  *reinterpret_cast<uint4*>(dst) = __ldg(reinterpret_cast<const uint4*>(src));
#endif
}

// 16 bytes from global memory (16-byte aligned) into registers, through the read-only data cache, and 16 bytes from
// registers to shared memory (16-byte aligned): copy_16b in two halves, so that a kernel can issue its loads early
// (a register-staged prefetch) and store them later.
__device__ __forceinline__ uint4 load_16b(const void* src) {
#if defined(TTK_HOST_EMULATION) && !defined(__CUDACC__)
  uint4 v;
  emu::load_16_bytes(&v, src);
  return v;
#else
  return __ldg(reinterpret_cast<const uint4*>(src));
#endif
}

__device__ __forceinline__ void store_16b(void* dst, uint4 v) {
#if defined(TTK_HOST_EMULATION) && !defined(__CUDACC__)
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0) {
    emu::misaligned = true;
    return;
  }
  std::memcpy(dst, &v, 16);
#else
  *reinterpret_cast<uint4*>(dst) = v;
#endif
}

// out[i] = p[i] for i < N (2, 4 or 8) from shared memory in one 64-bit, one 128-bit or two 128-bit loads; p must be
// aligned to 8 (N = 2) or 16 bytes.
template <int N>
struct SharedLoad;
template <>
struct SharedLoad<2> {
  __device__ __forceinline__ static void run(const float* p, float* out) {
    const float2 v = *reinterpret_cast<const float2*>(p);
    out[0] = v.x;
    out[1] = v.y;
  }
};
template <>
struct SharedLoad<4> {
  __device__ __forceinline__ static void run(const float* p, float* out) {
    const float4 v = *reinterpret_cast<const float4*>(p);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  }
};
template <>
struct SharedLoad<8> {
  __device__ __forceinline__ static void run(const float* p, float* out) {
    SharedLoad<4>::run(p, out);
    SharedLoad<4>::run(p + 4, out + 4);
  }
};

template <int N>
__device__ __forceinline__ void load_shared(const float* p, float* out) {
#if defined(TTK_HOST_EMULATION) && !defined(__CUDACC__)
  emu::load_aligned(out, p, N * sizeof(float), N == 2 ? 8 : 16);
#else
  SharedLoad<N>::run(p, out);
#endif
}

// Whether a row-major operand with rows of `row_len` elements starting at p can be read with load_vec at
// every column that is a multiple of the vector width.
template <typename T>
inline bool can_vec(const void* p, int64_t row_len) {
  return p != nullptr && reinterpret_cast<uintptr_t>(p) % 16 == 0 && row_len % vec_width<T>() == 0;
}

}  // namespace ttkernels
