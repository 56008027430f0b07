// rowmix.cu: out[row] = in[row] Cm(row), Cm = C or C^T, per row slice C[task_ids[row]]; one kernel for step mid
// (U = S C from the saved S, in backward) and for grad_mid's (5) dS = dU C^T.
//
//   in: (M, r_in), out: (M, r_out), C: (r_in, r_out) or (T, r_in, r_out); transposed: (r_out, r_in) slices.
//   One thread per output element (r_in <= 128 products, the rows come from the L1 cache). A row whose task id
//   is out of range gets NaN (see shrink.cu).
// Limits: 1 <= r_in, r_out <= 128.
// Checked by: tests/test_steps.py against the float64 reference (runners cuda-emulated, on the CPU, and cuda,
// on a GPU).
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads)
    rowmix_kernel(const T* __restrict__ in, const T* __restrict__ C, const int64_t* __restrict__ task_ids,
                  int64_t num_tasks, int transposed, T* __restrict__ out, int64_t M, int r_in, int r_out) {
  const int64_t total = M * r_out;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * kThreads) {
    const int64_t row = e / r_out;
    const int j = static_cast<int>(e % r_out);
    const T* c = C;
    if (task_ids != nullptr) {
      const int64_t t = task_ids[row];
      if (t < 0 || t >= num_tasks) {
        out[e] = from_float<T>(__int_as_float(0x7fc00000));
        continue;
      }
      c = C + t * r_in * r_out;
    }
    const T* x = in + row * r_in;
    float acc = 0.0f;
    if (transposed) {
      for (int k = 0; k < r_in; ++k) acc = fmaf(to_float(x[k]), to_float(c[j * r_in + k]), acc);
    } else {
      for (int k = 0; k < r_in; ++k) acc = fmaf(to_float(x[k]), to_float(c[k * r_out + j]), acc);
    }
    out[e] = from_float<T>(acc);
  }
}

unsigned grid_1d(int64_t n) {
  const int64_t blocks = ceil_div(n, kThreads);
  return static_cast<unsigned>(blocks < (int64_t{1} << 20) ? blocks : (int64_t{1} << 20));
}

}  // namespace
}  // namespace ttkernels

extern "C" cudaError_t ttk_rowmix_launch(ttk_dtype dtype, const void* in, const void* C, const int64_t* task_ids,
                                         int64_t num_tasks, int transposed, void* out, int64_t M, int64_t r_in,
                                         int64_t r_out, cudaStream_t stream) {
  using namespace ttkernels;
  if (M <= 0 || r_in < 1 || r_in > kMaxRank || r_out < 1 || r_out > kMaxRank) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = rowmix_kernel<T>;
    TTK_LAUNCH(kernel, grid_1d(M * r_out), kThreads, stream, static_cast<const T*>(in), static_cast<const T*>(C),
               task_ids, num_tasks, transposed, static_cast<T*>(out), M, static_cast<int>(r_in),
               static_cast<int>(r_out));
    return TTK_LAST_ERROR();
  });
}
