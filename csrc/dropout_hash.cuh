// dropout_hash.cuh: the counter-based dropout hash shared by every ttkernels backend.
//
// Computes, for a seed and an element (row, col) of a 2-D activation, a 32-bit value u; the element is kept
// when u >= threshold(p). All arithmetic is on uint32 with wraparound:
//
//   mix32(h)            = h ^= h >> 16; h *= 0x7feb352d; h ^= h >> 15; h *= 0x846ca68b; h ^= h >> 16
//   seed_lo, seed_hi    = low and high 32 bits of the seed (an int64 in [0, 2^63); the kernels read it from
//                         device memory and take its 64 bits as uint64, so a negative one hashes as value + 2^64)
//   row_hash(seed, row) = mix32(seed_lo ^ mix32(uint32(row) ^ mix32(seed_hi)))
//   u(seed, row, col)   = mix32(row_hash(seed, row) ^ uint32(col))
//   threshold(p)        = floor(p * 2^32) as uint32, p in [0, 1), computed in double
//   scale(p)            = 1 / (1 - p) computed in double, rounded once to fp32
//   drop(x)[row, col]   = u >= threshold ? x * scale : 0       (product in fp32, rounded to x's dtype)
//
// The pure-torch reference implements the same function, so the CUDA and Triton kernels can be compared with
// it bit for bit (same keep mask, same rounding). Row and column indices must each be < 2^32: the hash takes
// them as uint32, and larger indices would silently repeat masks.
//
// Plain CUDA/C++ (no torch headers): the functions are __host__ __device__ under nvcc and ordinary inline
// functions under a host compiler, so host code (tests, launch setup) can use the same definitions.
// Checked by: tests/test_cuda_extension.py compares the kernel's keep mask with a pure-torch copy of this hash
// on a GPU; on a machine without a GPU the file is compiled, not run.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define TTK_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define TTK_HOST_DEVICE inline
#endif

namespace ttkernels {

// A 32-bit integer finaliser (xorshift-multiply, constants from the "lowbias32" search); bijective on uint32.
TTK_HOST_DEVICE uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7feb352dU;
  h ^= h >> 15;
  h *= 0x846ca68bU;
  h ^= h >> 16;
  return h;
}

// Per-row part of the hash: a kernel computes it once per row and reuses it for every column.
TTK_HOST_DEVICE uint32_t dropout_row_hash(uint64_t seed, uint32_t row) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed & 0xFFFFFFFFULL);
  const uint32_t seed_hi = static_cast<uint32_t>(seed >> 32);
  return mix32(seed_lo ^ mix32(row ^ mix32(seed_hi)));
}

TTK_HOST_DEVICE uint32_t dropout_uniform(uint32_t row_hash, uint32_t col) {
  return mix32(row_hash ^ col);
}

TTK_HOST_DEVICE bool dropout_keep(uint32_t row_hash, uint32_t col, uint32_t threshold) {
  return dropout_uniform(row_hash, col) >= threshold;
}

// Host-side helpers: p is a double in [0, 1) (the caller checks the range). floor(p * 2^32) < 2^32 for every
// double p < 1, so the cast cannot overflow.
inline uint32_t dropout_threshold(double p) {
  return static_cast<uint32_t>(p * 4294967296.0);
}

inline float dropout_scale(double p) {
  return static_cast<float>(1.0 / (1.0 - p));
}

}  // namespace ttkernels
