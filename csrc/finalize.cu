// finalize.cu: out[e] = round(scale * sum over parts p of buf[p][e]), summed in order p = 0, 1, ...: the fp32
// buffers of grad_dy.cu, token_reduce.cu (grad_mid's dC, grad_a) and ttm.cu to T, one kernel for all of them.
// Launch: one thread per element, blocks of 256 threads striding over n.
// Checked by: tests/test_steps.py against the float64 reference (runners cuda-emulated, on the CPU, and cuda,
// on a GPU).
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const float* __restrict__ buf, int64_t parts, int64_t n, float scale, T* __restrict__ out) {
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    float s = 0.0f;
    for (int64_t p = 0; p < parts; ++p) s += buf[p * n + e];
    out[e] = from_float<T>(scale * s);
  }
}

unsigned grid_1d(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

}  // namespace
}  // namespace ttkernels

extern "C" cudaError_t ttk_finalize_launch(ttk_dtype dtype, const float* buf, int64_t parts, int64_t n, float scale,
                                           void* out, cudaStream_t stream) {
  using namespace ttkernels;
  if (n <= 0 || parts < 1) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = finalize_kernel<T>;
    TTK_LAUNCH(kernel, grid_1d(n), kThreads, stream, buf, parts, n, scale, static_cast<T*>(out));
    return TTK_LAST_ERROR();
  });
}
