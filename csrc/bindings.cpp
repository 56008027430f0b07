// bindings.cpp: torch binding of the ttkernels CUDA kernels (the only csrc file that includes torch headers).
//
// Registers the operator namespace `ttkernels_cuda` (the Python package owns `ttkernels`):
//   ttkernels_cuda::dropout(Tensor x, int seed, float p) -> Tensor
//     x: (rows, cols), contiguous, CUDA, float32 / float16 / bfloat16; 0 <= p < 1; 0 <= seed < 2^63.
//     Returns drop(x) in x's dtype, a new tensor; the hash, threshold and scale are defined in dropout_hash.cuh.
//
// Every argument is checked, with a message that names it, before anything touches the GPU. The same kernel
// function is registered for the CPU dispatch key only so that a CPU tensor gets that named error ("x must be a
// CUDA tensor") instead of the dispatcher's generic "could not run ... with arguments from the 'CPU' backend";
// it never computes on CPU. No autograd and no Meta/fake kernel here: the Python side adds those.
// The library has no PyInit: load it with torch.ops.load_library(path) (ttkernels/_ext.py does).
// Checked by: tests/test_cuda_extension.py (argument checks on CPU; results on a GPU when one is present).
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dropout_hash.cuh"
#include "ttkernels_kernels.h"

namespace ttkernels {
namespace {

constexpr int64_t kMaxHashIndexRange = int64_t{1} << 32;  // row and column indices are hashed as uint32

ttk_dtype kernel_dtype(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float:
      return TTK_DTYPE_FLOAT32;
    case c10::ScalarType::Half:
      return TTK_DTYPE_FLOAT16;
    case c10::ScalarType::BFloat16:
      return TTK_DTYPE_BFLOAT16;
    default:
      TORCH_CHECK(false, "ttkernels_cuda::dropout: x must have dtype float32, float16 or bfloat16, got ", t);
  }
}

at::Tensor dropout(const at::Tensor& x, int64_t seed, double p) {
  // Device-independent checks first, so that all of them can be exercised without a GPU.
  TORCH_CHECK(p >= 0.0 && p < 1.0, "ttkernels_cuda::dropout: p must satisfy 0 <= p < 1, got p = ", p);
  TORCH_CHECK(seed >= 0, "ttkernels_cuda::dropout: seed must be >= 0 (an int64 in [0, 2^63)), got seed = ", seed);
  TORCH_CHECK(x.dim() == 2, "ttkernels_cuda::dropout: x must be 2-D (rows, cols), got x.dim() = ", x.dim(),
              " with shape ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), "ttkernels_cuda::dropout: x must be contiguous, got shape ", x.sizes(),
              " and strides ", x.strides());
  const ttk_dtype dtype = kernel_dtype(x.scalar_type());
  TORCH_CHECK(x.size(0) <= kMaxHashIndexRange && x.size(1) <= kMaxHashIndexRange,
              "ttkernels_cuda::dropout: x must have at most 2^32 rows and 2^32 cols, got shape ", x.sizes());
  TORCH_CHECK(x.is_cuda(), "ttkernels_cuda::dropout: x must be a CUDA tensor, got device ", x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = at::empty_like(x);
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  if (rows == 0 || cols == 0) return y;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const cudaError_t err = ttk_dropout_launch(dtype, x.const_data_ptr(), y.mutable_data_ptr(), rows, cols,
                                             static_cast<uint64_t>(seed), dropout_threshold(p), dropout_scale(p),
                                             stream);
  TORCH_CHECK(err == cudaSuccess, "ttkernels_cuda::dropout: kernel launch failed: ", cudaGetErrorString(err));
  return y;
}

}  // namespace
}  // namespace ttkernels

TORCH_LIBRARY(ttkernels_cuda, m) {
  m.def("dropout(Tensor x, int seed, float p) -> Tensor");
}

TORCH_LIBRARY_IMPL(ttkernels_cuda, CUDA, m) {
  m.impl("dropout", &ttkernels::dropout);
}

TORCH_LIBRARY_IMPL(ttkernels_cuda, CPU, m) {
  m.impl("dropout", &ttkernels::dropout);
}
