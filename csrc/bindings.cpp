// bindings.cpp: torch binding of the ttkernels CUDA kernels (the only csrc file that includes torch headers).
//
// Registers the operator namespace `ttkernels_cuda` (the Python package owns `ttkernels`). Shapes: M tokens,
// x (M, d_in), weight (d_out, d_in), A (d_in, ra), C (ra, rb) or (T, ra, rb), B (rb, d_out), S (M, ra),
// U (M, rb); one storage dtype (float32, float16 or bfloat16) for all of them; ranks 1..128.
//
//   dropout(Tensor x, Tensor seed, float p) -> Tensor              drop(x), the hash of dropout_hash.cuh
//   shrink(x, A, C?, task_ids?, float p, Tensor? seed) -> (S, U)   step 2; U is empty (0 elements) without C
//   mid(S, C, task_ids?) -> U                                      U = S C, per row slice with task_ids
//   expand(x, weight, bias?, U, B, float scaling) -> y             step 3: torch's addmm / mm (cuBLAS), then
//                                                                   y += scaling * U B in place
//   grad_dy(dy, U, B, float scaling) -> (dU, dB)                   step 4, one pass over dY
//   grad_mid(S, dU, C, task_ids?) -> (dS, dC)                      step 5 (dC shaped like C)
//   grad_x(dy, weight, dS, A, float p, Tensor? seed) -> dx         step 6: torch's mm, then dx += drop'(dS A^T)
//   grad_a(x, dS, float p, Tensor? seed) -> dA                     step 7, a reduction over tokens
//   kron_apply(x, q, p) -> y                                       TT-matrix Kronecker-sum apply (ttm.cu), small
//                                                                   bond ranks: y[b] = sum_r q[r] x[b] p[r]
//   kron_grad_q(dy, x, p) -> dq (fp32)                             its gradients for q and for p, deterministic
//   kron_grad_p(dy, x, q) -> dp (fp32)                             (fixed-order sums of per-split pieces)
//   set_poison(bool on) -> bool                                    tests: fill new outputs with NaN before the
//                                                                   kernels write them; returns the old value
//
// The dropout seed is a one-element int64 tensor on the data's GPU (required when p > 0, ignored otherwise): the
// kernels read it on the device, never the host, so an op captured in a CUDA graph hashes the value the seed holds
// at each replay. Its dtype, size and device are checked here; its value cannot be (that would be a host read),
// and its 64 bits are hashed as uint64: a negative value gives the mask of value + 2^64 (ttkernels.tt_adapter
// checks a caller's seed tensor with torch._assert_async; the Python layer checks an int seed on the host).
//
// The kron ops: x (M, NI, NJ) and dy (M, NA, NC) with any strides, q (R, NA, NI) and p (R, NJ, NC) contiguous, one
// dtype; R <= 16 and NI, NA <= 64 (beyond: an error pointing to backend='triton' or 'torch').
//
// Every argument is checked before anything touches the GPU, with a message that names the op and the argument:
// first what does not depend on the device (dims, shapes, dtypes, contiguity, ranks, p, seed), then devices, so
// all of it can be exercised on a machine without a GPU. The CPU dispatch key is registered with the same
// functions so that a CPU tensor gets "x must be a CUDA tensor" instead of the dispatcher's generic message;
// nothing computes on the CPU. No op synchronizes with the host: task ids are checked for dtype and shape here,
// and their values on the device: a row whose id is out of range gets NaN in U (shrink, mid) and in dS
// (grad_mid) and adds nothing to dC, instead of reading out of bounds (the NaN reaches the layer's output and the
// loss, so a bad id cannot pass silently). The reductions (dB, dC, dA) use fp32 atomics, or, under
// torch.use_deterministic_algorithms(True), fixed-split fp32 buffers summed in a fixed order.
// No autograd and no fake kernels here: ttkernels/_cuda_backend.py adds the fakes, ttkernels/ops.py the autograd.
// The library has no PyInit: load it with torch.ops.load_library(path) (ttkernels/_ext.py does).
// Checked by: tests/test_cuda_extension.py and tests/test_cuda_backend.py (argument checks on the CPU; results
// on a GPU when one is present).
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "dropout_hash.cuh"
#include "ttkernels_kernels.h"

namespace ttkernels {
namespace {

using OptTensor = std::optional<at::Tensor>;

constexpr int64_t kMaxHashIndexRange = int64_t{1} << 32;  // row and column indices are hashed as uint32
constexpr int64_t kMaxRank = 128;

std::atomic<bool> g_poison{false};

#define TTK_CHECK(cond, ...) TORCH_CHECK(cond, "ttkernels_cuda::", op, ": ", __VA_ARGS__)

ttk_dtype kernel_dtype(const char* op, const char* name, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case c10::ScalarType::Float:
      return TTK_DTYPE_FLOAT32;
    case c10::ScalarType::Half:
      return TTK_DTYPE_FLOAT16;
    case c10::ScalarType::BFloat16:
      return TTK_DTYPE_BFLOAT16;
    default:
      TORCH_CHECK_TYPE(false, "ttkernels_cuda::", op, ": ", name, " must have dtype float32, float16 or bfloat16, got ",
                       t.scalar_type());
  }
  return TTK_DTYPE_FLOAT32;  // not reached
}

void check_dim(const char* op, const char* name, const at::Tensor& t, int64_t dim, const char* layout) {
  TTK_CHECK(t.dim() == dim, name, " must be ", dim, "-D ", layout, ", got shape ", t.sizes());
}

void check_size(const char* op, const char* name, const at::Tensor& t, int64_t d, int64_t want, const char* what) {
  TTK_CHECK(t.size(d) == want, name, " has shape ", t.sizes(), " but its dimension ", d, " must be ", want, " (",
            what, ")");
}

void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TTK_CHECK(t.is_contiguous(), name, " must be contiguous, got shape ", t.sizes(), " and strides ", t.strides());
}

void check_same_dtype(const char* op, const char* name, const at::Tensor& t, const char* ref_name,
                      const at::Tensor& ref) {
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "ttkernels_cuda::", op, ": ", name, " has dtype ",
                   t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type(), "; all must match");
}

void check_rank(const char* op, const char* name, int64_t r) {
  TTK_CHECK(r >= 1 && r <= kMaxRank, name, " must be in [1, ", kMaxRank, "], got ", r);
}

void check_features(const char* op, const char* name, int64_t n) {
  TTK_CHECK(n >= 1, name, " must be >= 1, got ", n);
}

void check_rows(const char* op, const char* name, const at::Tensor& t) {
  TTK_CHECK(t.size(0) <= kMaxHashIndexRange && t.size(1) <= kMaxHashIndexRange, name,
            " must have at most 2^32 rows and 2^32 columns (hashed indices are uint32), got shape ", t.sizes());
}

// p in [0, 1); the seed (when given, and it must be when p > 0): an int64 tensor of one element. Its device is
// checked with the other tensors' devices (check_cuda), its value never (see the header).
void check_dropout_args(const char* op, double p, const OptTensor& seed) {
  TTK_CHECK(p >= 0.0 && p < 1.0, "p must satisfy 0 <= p < 1, got p = ", p);
  TTK_CHECK(seed.has_value() || p == 0.0, "seed is required when p > 0 (a one-element int64 tensor), got None");
  if (!seed.has_value()) return;
  TORCH_CHECK_TYPE(seed->scalar_type() == c10::ScalarType::Long, "ttkernels_cuda::", op,
                   ": seed must have dtype int64, got ", seed->scalar_type());
  TTK_CHECK(seed->numel() == 1, "seed must have one element, got shape ", seed->sizes());
}

void check_scaling(const char* op, double scaling) {
  TTK_CHECK(std::isfinite(scaling), "scaling must be finite, got ", scaling);
}

// task_ids: int64, (M,), contiguous. Their values are the kernels' business (NaN rows; see the header).
void check_task_ids(const char* op, const at::Tensor& ids, int64_t M) {
  TORCH_CHECK_TYPE(ids.scalar_type() == c10::ScalarType::Long, "ttkernels_cuda::", op,
                   ": task_ids must have dtype int64, got ", ids.scalar_type());
  TTK_CHECK(ids.dim() == 1 && ids.size(0) == M, "task_ids must have shape (", M, ",) (one id per row), got ",
            ids.sizes());
  check_contiguous(op, "task_ids", ids);
}

// C: (ra, rb) or (T, ra, rb); returns T (0 for a shared C). task_ids must be given exactly for a 3-D C.
int64_t check_c(const char* op, const at::Tensor& C, const OptTensor& task_ids, int64_t ra, int64_t M) {
  TTK_CHECK(C.dim() == 2 || C.dim() == 3, "C must be 2-D (ra, rb) or 3-D (num_tasks, ra, rb), got shape ",
            C.sizes());
  const int64_t lead = C.dim() - 2;
  check_size(op, "C", C, lead, ra, "ra, the columns of A (or of S)");
  check_rank(op, "C's last dimension (rb)", C.size(lead + 1));
  check_contiguous(op, "C", C);
  if (C.dim() == 3) {
    TTK_CHECK(C.size(0) >= 1, "C has no tasks (shape ", C.sizes(), ")");
    TTK_CHECK(task_ids.has_value(), "C has a per-sample axis of ", C.size(0), " tasks: pass task_ids");
    check_task_ids(op, *task_ids, M);
    return C.size(0);
  }
  TTK_CHECK(!task_ids.has_value(), "task_ids was given but C has no per-sample (task) axis (shape ", C.sizes(), ")");
  return 0;
}

void check_cuda(const char* op, const char* name, const at::Tensor& t, const c10::Device& device) {
  TTK_CHECK(t.is_cuda(), name, " must be a CUDA tensor, got device ", t.device());
  TTK_CHECK(t.device() == device, name, " is on ", t.device(), " but the first argument is on ", device);
}

void check_launch(const char* op, cudaError_t err) {
  TTK_CHECK(err == cudaSuccess, "kernel launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

int num_sms(const at::Tensor& t) {
  int n = 0;
  if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, t.device().index()) != cudaSuccess) {
    (void)cudaGetLastError();
    n = 1;
  }
  return n;
}

// A new output; NaN-filled when poisoning is on, so a test sees any element a kernel fails to write.
at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
  if (g_poison.load() && t.numel() > 0) t.fill_(std::numeric_limits<double>::quiet_NaN());
  return t;
}

const void* ptr_or_null(const OptTensor& t) { return t.has_value() ? t->const_data_ptr() : nullptr; }

const int64_t* ids_or_null(const OptTensor& t) {
  return t.has_value() ? t->const_data_ptr<int64_t>() : nullptr;
}

struct Dropout {
  int enabled;
  const int64_t* seed;  // device memory; null without dropout
  uint32_t threshold;
  float scale;
};

Dropout dropout_of(double p, const OptTensor& seed) {
  const bool on = p > 0.0;
  return Dropout{on ? 1 : 0, on ? seed->const_data_ptr<int64_t>() : nullptr, dropout_threshold(p), dropout_scale(p)};
}

// The reductions' fp32 buffer summed into `out` (dtype of out) with `scale`.
void finalize(const char* op, const at::Tensor& buf, int64_t parts, const at::Tensor& out, float scale) {
  check_launch(op, ttk_finalize_launch(kernel_dtype(op, "out", out), buf.const_data_ptr<float>(), parts, out.numel(),
                                       scale, out.mutable_data_ptr(), stream_of(out)));
}

// out (G, I, R) or (I, R) = sum over rows of drop(X)^T Y, grouped by `groups` when given.
void token_reduce(const char* op, const at::Tensor& X, const at::Tensor& Y, const OptTensor& groups,
                  int64_t num_groups, const Dropout& d, const at::Tensor& out) {
  const int64_t M = X.size(0), I = X.size(1), R = Y.size(1);
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int64_t splits = ttk_token_reduce_splits(M, I, num_sms(X));
  const int64_t parts = deterministic ? splits : 1;
  at::Tensor buf = at::zeros({parts * num_groups * I * R}, X.options().dtype(at::kFloat));
  check_launch(op, ttk_token_reduce_launch(kernel_dtype(op, "X", X), X.const_data_ptr(), Y.const_data_ptr(),
                                           ids_or_null(groups), num_groups, buf.mutable_data_ptr<float>(), splits,
                                           deterministic ? 1 : 0, M, I, R, d.enabled, d.seed, d.threshold, d.scale,
                                           stream_of(X)));
  finalize(op, buf, parts, out, 1.0f);
}

// ---------------------------------------------------------------------------------- kron (ttm.cu)
constexpr int64_t kKronMaxRank = 16;
constexpr int64_t kKronMaxKept = 64;

void check_kron_limit(const char* op, const char* name, int64_t n, int64_t most) {
  TTK_CHECK(n >= 1 && n <= most, name, " must be in [1, ", most, "] on the small-bond-rank CUDA path, got ", n,
            "; use backend='triton' or backend='torch'");
}

void check_kron_size(const char* op, const char* name, int64_t n) {
  TTK_CHECK(n >= 1, name, " must be >= 1, got ", n);
  TTK_CHECK(n <= std::numeric_limits<int32_t>::max(), name, " must be < 2^31, got ", n);
}

// dq (R, NA, NI) when grad_q, else dp (R, NJ, NC), fp32, from the per-split pieces summed in order (deterministic:
// no atomics). `factor` is p for dq, q for dp. M == 0: the sums over tokens are zero.
at::Tensor kron_reduce(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& factor,
                       bool grad_q) {
  const int64_t M = x.size(0), NI = x.size(1), NJ = x.size(2), R = factor.size(0), NA = dy.size(1),
                NC = dy.size(2);
  const at::TensorOptions f32 = x.options().dtype(at::kFloat);
  const std::vector<int64_t> sizes = grad_q ? std::vector<int64_t>{R, NA, NI} : std::vector<int64_t>{R, NJ, NC};
  if (M == 0) return at::zeros(sizes, f32);
  at::Tensor out = new_output(sizes, f32);
  const int sms = num_sms(x);
  const int64_t parts = grad_q ? ttk_kron_grad_q_splits(M, R, sms) : ttk_kron_grad_p_splits(M, R, NJ, NC, sms);
  // Every split writes its whole piece: no zeroing. One split writes the output itself.
  at::Tensor buf = parts == 1 ? out : at::empty({parts * out.numel()}, f32);
  const auto launch = grad_q ? ttk_kron_grad_q_launch : ttk_kron_grad_p_launch;
  check_launch(op, launch(kernel_dtype(op, "x", x), dy.const_data_ptr(), dy.stride(0), dy.stride(1), dy.stride(2),
                          x.const_data_ptr(), x.stride(0), x.stride(1), x.stride(2), factor.const_data_ptr(),
                          buf.mutable_data_ptr<float>(), parts, M, R, NI, NJ, NA, NC, stream_of(x)));
  if (parts > 1) {
    check_launch(op, ttk_finalize_launch(TTK_DTYPE_FLOAT32, buf.const_data_ptr<float>(), parts, out.numel(), 1.0f,
                                         out.mutable_data_ptr(), stream_of(x)));
  }
  return out;
}

// ------------------------------------------------------------------------------------------------ ops
at::Tensor dropout(const at::Tensor& x, const at::Tensor& seed, double p) {
  const char* op = "dropout";
  check_dropout_args(op, p, seed);
  check_dim(op, "x", x, 2, "(rows, cols)");
  check_contiguous(op, "x", x);
  const ttk_dtype dtype = kernel_dtype(op, "x", x);
  check_rows(op, "x", x);
  check_cuda(op, "x", x, x.device());
  check_cuda(op, "seed", seed, x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = new_output(x.sizes(), x.options());
  const int64_t rows = x.size(0);
  const int64_t cols = x.size(1);
  if (rows == 0 || cols == 0) return y;
  check_launch(op, ttk_dropout_launch(dtype, x.const_data_ptr(), y.mutable_data_ptr(), rows, cols,
                                      seed.const_data_ptr<int64_t>(), dropout_threshold(p), dropout_scale(p),
                                      stream_of(x)));
  return y;
}

std::tuple<at::Tensor, at::Tensor> shrink(const at::Tensor& x, const at::Tensor& A, const OptTensor& C,
                                          const OptTensor& task_ids, double p, const OptTensor& seed) {
  const char* op = "shrink";
  check_dropout_args(op, p, seed);
  check_dim(op, "x", x, 2, "(M, d_in)");
  check_dim(op, "A", A, 2, "(d_in, ra)");
  const int64_t M = x.size(0), d_in = x.size(1), ra = A.size(1);
  check_features(op, "d_in (x.shape[1])", d_in);
  check_size(op, "A", A, 0, d_in, "d_in, the columns of x");
  check_rank(op, "ra (A.shape[1])", ra);
  const ttk_dtype dtype = kernel_dtype(op, "x", x);
  check_same_dtype(op, "A", A, "x", x);
  check_contiguous(op, "x", x);
  check_contiguous(op, "A", A);
  check_rows(op, "x", x);
  int64_t num_tasks = 0, rb = ra;
  if (C.has_value()) {
    check_same_dtype(op, "C", *C, "x", x);
    num_tasks = check_c(op, *C, task_ids, ra, M);
    rb = C->size(C->dim() - 1);
  } else {
    TTK_CHECK(!task_ids.has_value(), "task_ids was given but C is None");
  }
  check_cuda(op, "x", x, x.device());
  check_cuda(op, "A", A, x.device());
  if (C.has_value()) check_cuda(op, "C", *C, x.device());
  if (task_ids.has_value()) check_cuda(op, "task_ids", *task_ids, x.device());
  if (seed.has_value()) check_cuda(op, "seed", *seed, x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor S = new_output({M, ra}, x.options());
  at::Tensor U = C.has_value() ? new_output({M, rb}, x.options()) : at::empty({0}, x.options());
  if (M == 0) return {S, U};
  const Dropout d = dropout_of(p, seed);
  const int sms = num_sms(x);
  const int64_t splits = ttk_shrink_splits(M, d_in, ra, sms);
  // split-K (few rows): fp32 partial sums, every element written; bounded (a few MiB) since the rows are few
  at::Tensor partial = splits > 1 ? at::empty({splits * M * ra}, x.options().dtype(at::kFloat)) : at::Tensor();
  check_launch(op, ttk_shrink_launch(dtype, x.const_data_ptr(), A.const_data_ptr(), ptr_or_null(C),
                                     ids_or_null(task_ids), num_tasks, S.mutable_data_ptr(),
                                     C.has_value() ? U.mutable_data_ptr() : nullptr,
                                     splits > 1 ? partial.mutable_data_ptr<float>() : nullptr, sms, M, d_in, ra, rb,
                                     d.enabled, d.seed, d.threshold, d.scale, stream_of(x)));
  return {S, U};
}

at::Tensor mid(const at::Tensor& S, const at::Tensor& C, const OptTensor& task_ids) {
  const char* op = "mid";
  check_dim(op, "S", S, 2, "(M, ra)");
  const int64_t M = S.size(0), ra = S.size(1);
  check_rank(op, "ra (S.shape[1])", ra);
  const ttk_dtype dtype = kernel_dtype(op, "S", S);
  check_same_dtype(op, "C", C, "S", S);
  check_contiguous(op, "S", S);
  const int64_t num_tasks = check_c(op, C, task_ids, ra, M);
  const int64_t rb = C.size(C.dim() - 1);
  check_cuda(op, "S", S, S.device());
  check_cuda(op, "C", C, S.device());
  if (task_ids.has_value()) check_cuda(op, "task_ids", *task_ids, S.device());

  const c10::cuda::CUDAGuard device_guard(S.device());
  at::Tensor U = new_output({M, rb}, S.options());
  if (M == 0) return U;
  check_launch(op, ttk_rowmix_launch(dtype, S.const_data_ptr(), C.const_data_ptr(), ids_or_null(task_ids), num_tasks,
                                     0, U.mutable_data_ptr(), M, ra, rb, stream_of(S)));
  return U;
}

at::Tensor expand(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias, const at::Tensor& U,
                  const at::Tensor& B, double scaling) {
  const char* op = "expand";
  check_scaling(op, scaling);
  check_dim(op, "x", x, 2, "(M, d_in)");
  check_dim(op, "weight", weight, 2, "(d_out, d_in)");
  check_dim(op, "U", U, 2, "(M, rb)");
  check_dim(op, "B", B, 2, "(rb, d_out)");
  const int64_t M = x.size(0), d_in = x.size(1), d_out = weight.size(0), rb = B.size(0);
  check_features(op, "d_in (x.shape[1])", d_in);
  check_features(op, "d_out (weight.shape[0])", d_out);
  check_size(op, "weight", weight, 1, d_in, "d_in, the columns of x");
  if (bias.has_value()) {
    check_dim(op, "bias", *bias, 1, "(d_out,)");
    check_size(op, "bias", *bias, 0, d_out, "d_out, the rows of weight");
  }
  check_rank(op, "rb (B.shape[0])", rb);
  check_size(op, "B", B, 1, d_out, "d_out, the rows of weight");
  check_size(op, "U", U, 0, M, "M, the rows of x");
  check_size(op, "U", U, 1, rb, "rb, the rows of B");
  const ttk_dtype dtype = kernel_dtype(op, "x", x);
  check_same_dtype(op, "weight", weight, "x", x);
  if (bias.has_value()) check_same_dtype(op, "bias", *bias, "x", x);
  check_same_dtype(op, "U", U, "x", x);
  check_same_dtype(op, "B", B, "x", x);
  check_contiguous(op, "U", U);
  check_contiguous(op, "B", B);
  check_cuda(op, "x", x, x.device());
  check_cuda(op, "weight", weight, x.device());
  if (bias.has_value()) check_cuda(op, "bias", *bias, x.device());
  check_cuda(op, "U", U, x.device());
  check_cuda(op, "B", B, x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  // The base product through torch (cuBLAS); the low-rank term is then added in place (beta = 1).
  at::Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  if (M == 0) return y;
  TTK_CHECK(y.is_contiguous(), "internal error: the base GEMM returned a non-contiguous output");
  check_launch(op, ttk_accumulate_launch(dtype, y.mutable_data_ptr(), U.const_data_ptr(), B.const_data_ptr(), d_out, 1,
                                         M, d_out, rb, static_cast<float>(scaling), 0, nullptr, 0, 1.0f, stream_of(x)));
  return y;
}

std::tuple<at::Tensor, at::Tensor> grad_dy(const at::Tensor& dy, const at::Tensor& U, const at::Tensor& B,
                                           double scaling) {
  const char* op = "grad_dy";
  check_scaling(op, scaling);
  check_dim(op, "dy", dy, 2, "(M, d_out)");
  check_dim(op, "U", U, 2, "(M, rb)");
  check_dim(op, "B", B, 2, "(rb, d_out)");
  const int64_t M = dy.size(0), d_out = dy.size(1), rb = B.size(0);
  check_features(op, "d_out (dy.shape[1])", d_out);
  check_rank(op, "rb (B.shape[0])", rb);
  check_size(op, "B", B, 1, d_out, "d_out, the columns of dy");
  check_size(op, "U", U, 0, M, "M, the rows of dy");
  check_size(op, "U", U, 1, rb, "rb, the rows of B");
  const ttk_dtype dtype = kernel_dtype(op, "dy", dy);
  check_same_dtype(op, "U", U, "dy", dy);
  check_same_dtype(op, "B", B, "dy", dy);
  check_contiguous(op, "dy", dy);
  check_contiguous(op, "U", U);
  check_contiguous(op, "B", B);
  check_cuda(op, "dy", dy, dy.device());
  check_cuda(op, "U", U, dy.device());
  check_cuda(op, "B", B, dy.device());

  const c10::cuda::CUDAGuard device_guard(dy.device());
  at::Tensor dU = new_output({M, rb}, dy.options());
  if (M == 0) return {dU, at::zeros({rb, d_out}, dy.options())};
  at::Tensor dB = new_output({rb, d_out}, dy.options());
  const bool deterministic = at::globalContext().deterministicAlgorithms();
  const int sms = num_sms(dy);
  const int64_t slices = ttk_grad_dy_slices(M, d_out, rb, sms);
  const int64_t splits = ttk_grad_dy_splits(M, d_out, rb, deterministic ? 1 : 0, sms);
  const int64_t parts = deterministic ? splits : 1;
  const auto f32 = dy.options().dtype(at::kFloat);
  // Every slice writes its whole piece of dU_buf, and in deterministic mode every split its whole piece of the
  // dB buffer: no zeroing. Neither buffer grows with M beyond the size of dU itself (see grad_dy.cu).
  at::Tensor dU_buf = slices > 1 ? at::empty({slices * M * rb}, f32) : at::Tensor();
  at::Tensor buf = deterministic ? at::empty({parts * rb * d_out}, f32) : at::zeros({rb * d_out}, f32);
  check_launch(op, ttk_grad_dy_launch(dtype, dy.const_data_ptr(), U.const_data_ptr(), B.const_data_ptr(),
                                      dU.mutable_data_ptr(), slices > 1 ? dU_buf.mutable_data_ptr<float>() : nullptr,
                                      buf.mutable_data_ptr<float>(), deterministic ? 1 : 0, sms, M, d_out, rb,
                                      static_cast<float>(scaling), stream_of(dy)));
  if (slices > 1) finalize(op, dU_buf, slices, dU, static_cast<float>(scaling));
  finalize(op, buf, parts, dB, static_cast<float>(scaling));
  return {dU, dB};
}

std::tuple<at::Tensor, at::Tensor> grad_mid(const at::Tensor& S, const at::Tensor& dU, const at::Tensor& C,
                                            const OptTensor& task_ids) {
  const char* op = "grad_mid";
  check_dim(op, "S", S, 2, "(M, ra)");
  check_dim(op, "dU", dU, 2, "(M, rb)");
  const int64_t M = S.size(0), ra = S.size(1);
  check_rank(op, "ra (S.shape[1])", ra);
  const ttk_dtype dtype = kernel_dtype(op, "S", S);
  check_same_dtype(op, "dU", dU, "S", S);
  check_same_dtype(op, "C", C, "S", S);
  check_contiguous(op, "S", S);
  check_contiguous(op, "dU", dU);
  const int64_t num_tasks = check_c(op, C, task_ids, ra, M);
  const int64_t rb = C.size(C.dim() - 1);
  check_size(op, "dU", dU, 0, M, "M, the rows of S");
  check_size(op, "dU", dU, 1, rb, "rb, the last dimension of C");
  check_cuda(op, "S", S, S.device());
  check_cuda(op, "dU", dU, S.device());
  check_cuda(op, "C", C, S.device());
  if (task_ids.has_value()) check_cuda(op, "task_ids", *task_ids, S.device());

  const c10::cuda::CUDAGuard device_guard(S.device());
  at::Tensor dS = new_output({M, ra}, S.options());
  if (M == 0) return {dS, at::zeros(C.sizes(), C.options())};
  check_launch(op, ttk_rowmix_launch(dtype, dU.const_data_ptr(), C.const_data_ptr(), ids_or_null(task_ids), num_tasks,
                                     1, dS.mutable_data_ptr(), M, rb, ra, stream_of(S)));
  at::Tensor dC = new_output(C.sizes(), C.options());
  token_reduce(op, S, dU, task_ids, num_tasks > 0 ? num_tasks : 1, Dropout{0, nullptr, 0, 1.0f}, dC);
  return {dS, dC};
}

at::Tensor grad_x(const at::Tensor& dy, const at::Tensor& weight, const at::Tensor& dS, const at::Tensor& A, double p,
                  const OptTensor& seed) {
  const char* op = "grad_x";
  check_dropout_args(op, p, seed);
  check_dim(op, "dy", dy, 2, "(M, d_out)");
  check_dim(op, "weight", weight, 2, "(d_out, d_in)");
  check_dim(op, "dS", dS, 2, "(M, ra)");
  check_dim(op, "A", A, 2, "(d_in, ra)");
  const int64_t M = dy.size(0), d_out = dy.size(1), d_in = weight.size(1), ra = A.size(1);
  check_features(op, "d_out (dy.shape[1])", d_out);
  check_features(op, "d_in (weight.shape[1])", d_in);
  check_size(op, "weight", weight, 0, d_out, "d_out, the columns of dy");
  check_size(op, "A", A, 0, d_in, "d_in, the columns of weight");
  check_rank(op, "ra (A.shape[1])", ra);
  check_size(op, "dS", dS, 0, M, "M, the rows of dy");
  check_size(op, "dS", dS, 1, ra, "ra, the columns of A");
  const ttk_dtype dtype = kernel_dtype(op, "dy", dy);
  check_same_dtype(op, "weight", weight, "dy", dy);
  check_same_dtype(op, "dS", dS, "dy", dy);
  check_same_dtype(op, "A", A, "dy", dy);
  check_contiguous(op, "dS", dS);
  check_contiguous(op, "A", A);
  if (p > 0.0) {
    TTK_CHECK(M <= kMaxHashIndexRange && d_in <= kMaxHashIndexRange,
              "with dropout, dx must have at most 2^32 rows and 2^32 columns, got (", M, ", ", d_in, ")");
  }
  check_cuda(op, "dy", dy, dy.device());
  check_cuda(op, "weight", weight, dy.device());
  check_cuda(op, "dS", dS, dy.device());
  check_cuda(op, "A", A, dy.device());
  if (seed.has_value()) check_cuda(op, "seed", *seed, dy.device());

  const c10::cuda::CUDAGuard device_guard(dy.device());
  at::Tensor dx = at::mm(dy, weight);
  if (M == 0) return dx;
  TTK_CHECK(dx.is_contiguous(), "internal error: the base GEMM returned a non-contiguous output");
  const Dropout d = dropout_of(p, seed);
  // dS A^T with A read transposed in place: Bm[k][n] = A[n][k], strides (1, ra).
  check_launch(op, ttk_accumulate_launch(dtype, dx.mutable_data_ptr(), dS.const_data_ptr(), A.const_data_ptr(), 1, ra,
                                         M, d_in, ra, 1.0f, d.enabled, d.seed, d.threshold, d.scale, stream_of(dy)));
  return dx;
}

at::Tensor grad_a(const at::Tensor& x, const at::Tensor& dS, double p, const OptTensor& seed) {
  const char* op = "grad_a";
  check_dropout_args(op, p, seed);
  check_dim(op, "x", x, 2, "(M, d_in)");
  check_dim(op, "dS", dS, 2, "(M, ra)");
  const int64_t M = x.size(0), d_in = x.size(1), ra = dS.size(1);
  check_features(op, "d_in (x.shape[1])", d_in);
  check_rank(op, "ra (dS.shape[1])", ra);
  check_size(op, "dS", dS, 0, M, "M, the rows of x");
  kernel_dtype(op, "x", x);
  check_same_dtype(op, "dS", dS, "x", x);
  check_contiguous(op, "x", x);
  check_contiguous(op, "dS", dS);
  check_rows(op, "x", x);
  check_cuda(op, "x", x, x.device());
  check_cuda(op, "dS", dS, x.device());
  if (seed.has_value()) check_cuda(op, "seed", *seed, x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  if (M == 0) return at::zeros({d_in, ra}, x.options());
  at::Tensor dA = new_output({d_in, ra}, x.options());
  token_reduce(op, x, dS, std::nullopt, 1, dropout_of(p, seed), dA);
  return dA;
}

at::Tensor kron_apply(const at::Tensor& x, const at::Tensor& q, const at::Tensor& p) {
  const char* op = "kron_apply";
  check_dim(op, "x", x, 3, "(M, NI, NJ)");
  check_dim(op, "q", q, 3, "(R, NA, NI)");
  check_dim(op, "p", p, 3, "(R, NJ, NC)");
  const int64_t M = x.size(0), NI = x.size(1), NJ = x.size(2), R = q.size(0), NA = q.size(1), NC = p.size(2);
  check_kron_limit(op, "R (q.shape[0])", R, kKronMaxRank);
  check_kron_limit(op, "NA (q.shape[1])", NA, kKronMaxKept);
  check_kron_limit(op, "NI (x.shape[1])", NI, kKronMaxKept);
  check_kron_size(op, "NJ (x.shape[2])", NJ);
  check_kron_size(op, "NC (p.shape[2])", NC);
  check_size(op, "q", q, 2, NI, "NI, x.shape[1]");
  check_size(op, "p", p, 0, R, "R, q.shape[0]");
  check_size(op, "p", p, 1, NJ, "NJ, x.shape[2]");
  const ttk_dtype dtype = kernel_dtype(op, "x", x);
  check_same_dtype(op, "q", q, "x", x);
  check_same_dtype(op, "p", p, "x", x);
  check_contiguous(op, "q", q);
  check_contiguous(op, "p", p);
  check_cuda(op, "x", x, x.device());
  check_cuda(op, "q", q, x.device());
  check_cuda(op, "p", p, x.device());

  const c10::cuda::CUDAGuard device_guard(x.device());
  at::Tensor y = new_output({M, NA, NC}, x.options());
  if (M == 0) return y;
  check_launch(op, ttk_kron_apply_launch(dtype, x.const_data_ptr(), x.stride(0), x.stride(1), x.stride(2),
                                         q.const_data_ptr(), p.const_data_ptr(), y.mutable_data_ptr(), M, R, NI, NJ,
                                         NA, NC, stream_of(x)));
  return y;
}

// kron_grad_q (factor p, (R, NJ, NC)) and kron_grad_p (factor q, (R, NA, NI)): the same checks, then the reduction.
at::Tensor kron_grad(const char* op, const at::Tensor& dy, const at::Tensor& x, const at::Tensor& factor, bool grad_q) {
  const char* name = grad_q ? "p" : "q";
  check_dim(op, "dy", dy, 3, "(M, NA, NC)");
  check_dim(op, "x", x, 3, "(M, NI, NJ)");
  check_dim(op, name, factor, 3, grad_q ? "(R, NJ, NC)" : "(R, NA, NI)");
  const int64_t M = dy.size(0), NA = dy.size(1), NC = dy.size(2), NI = x.size(1), NJ = x.size(2),
                R = factor.size(0);
  check_kron_limit(op, grad_q ? "R (p.shape[0])" : "R (q.shape[0])", R, kKronMaxRank);
  check_kron_limit(op, "NA (dy.shape[1])", NA, kKronMaxKept);
  check_kron_limit(op, "NI (x.shape[1])", NI, kKronMaxKept);
  check_kron_size(op, "NC (dy.shape[2])", NC);
  check_kron_size(op, "NJ (x.shape[2])", NJ);
  check_size(op, "x", x, 0, M, "M, the tokens of dy");
  if (grad_q) {
    check_size(op, name, factor, 1, NJ, "NJ, x.shape[2]");
    check_size(op, name, factor, 2, NC, "NC, dy.shape[2]");
  } else {
    check_size(op, name, factor, 1, NA, "NA, dy.shape[1]");
    check_size(op, name, factor, 2, NI, "NI, x.shape[1]");
  }
  kernel_dtype(op, "dy", dy);
  check_same_dtype(op, "x", x, "dy", dy);
  check_same_dtype(op, name, factor, "dy", dy);
  check_contiguous(op, name, factor);
  check_cuda(op, "dy", dy, dy.device());
  check_cuda(op, "x", x, dy.device());
  check_cuda(op, name, factor, dy.device());

  const c10::cuda::CUDAGuard device_guard(dy.device());
  return kron_reduce(op, dy, x, factor, grad_q);
}

at::Tensor kron_grad_q(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& p) {
  return kron_grad("kron_grad_q", dy, x, p, true);
}

at::Tensor kron_grad_p(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& q) {
  return kron_grad("kron_grad_p", dy, x, q, false);
}

bool set_poison(bool on) { return g_poison.exchange(on); }

#undef TTK_CHECK

}  // namespace
}  // namespace ttkernels

TORCH_LIBRARY(ttkernels_cuda, m) {
  m.def("dropout(Tensor x, Tensor seed, float p) -> Tensor");
  m.def("shrink(Tensor x, Tensor A, Tensor? C, Tensor? task_ids, float p, Tensor? seed) -> (Tensor, Tensor)");
  m.def("mid(Tensor S, Tensor C, Tensor? task_ids) -> Tensor");
  m.def("expand(Tensor x, Tensor weight, Tensor? bias, Tensor U, Tensor B, float scaling) -> Tensor");
  m.def("grad_dy(Tensor dy, Tensor U, Tensor B, float scaling) -> (Tensor, Tensor)");
  m.def("grad_mid(Tensor S, Tensor dU, Tensor C, Tensor? task_ids) -> (Tensor, Tensor)");
  m.def("grad_x(Tensor dy, Tensor weight, Tensor dS, Tensor A, float p, Tensor? seed) -> Tensor");
  m.def("grad_a(Tensor x, Tensor dS, float p, Tensor? seed) -> Tensor");
  m.def("kron_apply(Tensor x, Tensor q, Tensor p) -> Tensor");
  m.def("kron_grad_q(Tensor dy, Tensor x, Tensor p) -> Tensor");
  m.def("kron_grad_p(Tensor dy, Tensor x, Tensor q) -> Tensor");
  m.def("set_poison(bool on) -> bool", &ttkernels::set_poison);
}

// The same functions for CUDA and CPU: on the CPU they only ever raise (see the header).
#define TTK_IMPLS(m)                                 \
  m.impl("dropout", &ttkernels::dropout);         \
  m.impl("shrink", &ttkernels::shrink);           \
  m.impl("mid", &ttkernels::mid);                 \
  m.impl("expand", &ttkernels::expand);           \
  m.impl("grad_dy", &ttkernels::grad_dy);         \
  m.impl("grad_mid", &ttkernels::grad_mid);       \
  m.impl("grad_x", &ttkernels::grad_x);           \
  m.impl("grad_a", &ttkernels::grad_a);           \
  m.impl("kron_apply", &ttkernels::kron_apply);   \
  m.impl("kron_grad_q", &ttkernels::kron_grad_q); \
  m.impl("kron_grad_p", &ttkernels::kron_grad_p)

TORCH_LIBRARY_IMPL(ttkernels_cuda, CUDA, m) { TTK_IMPLS(m); }

TORCH_LIBRARY_IMPL(ttkernels_cuda, CPU, m) { TTK_IMPLS(m); }
