// ttm.cu: the "Kronecker-sum apply" of TT-matrix adapters for small bond ranks, and its two weight gradients
// (the contract of ttkernels/ttm.py: kron_apply_ref, kron_grad_q_ref, kron_grad_p_ref).
//
//   apply:  y[b, a, c]  = sum_r sum_i q[r, a, i] T_r[b, i, c],  T_r[b, i, c] = sum_j x[b, i, j] p[r, j, c]
//   grad_q: dq[r, a, i] = sum_b sum_c dy[b, a, c] T_r[b, i, c]
//   grad_p: dp[r, j, c] = sum_b sum_a W_r[b, a, j] dy[b, a, c],  W_r[b, a, j] = sum_i q[r, a, i] x[b, i, j]
//   (dx is apply on dy with q and p transposed: the caller does that, no kernel here.)
//
//   x: (M, NI, NJ) and dy: (M, NA, NC) read through arbitrary non-negative element strides (callers pass
//   transposed views); q: (R, NA, NI), p: (R, NJ, NC) contiguous; one storage type T for all of them; y (M, NA, NC)
//   contiguous, of type T; dq and dp are fp32. Every product and sum is fp32, the stage-A intermediate T_r (and W_r)
//   included: nothing is rounded to T before y's one rounding.
//
// Launch shapes (256 threads per block, shared memory static and below 48 KiB, no opt-in):
// * apply: grid (ceil(M / BM), column tiles of 16 c). BM = the largest power of two <= min(64, 256 / max(NI, NA)),
//   so a block's (i, b) rows and (a, b) rows number at most 256. Per r: stage A streams x in chunks of 16 j through
//   shared memory ([j][i * BM + b], with the p chunk [j][c]) and each thread keeps a 4 x 4 piece (4 rows, 4 columns)
//   of T_r in registers; then T_r goes to shared memory (over the x chunk) beside q[r], and stage B adds
//   sum_i q[r, a, i] T_r[i, b, c] into the thread's 4 x 4 piece of y (4 values of a for one b), kept in registers
//   across r. Shared memory: x chunk / T_r 4160 floats + p chunk 256 + q[r] 4096 = 34048 bytes.
// * grad_q: grid (token splits, R). A block recomputes T_r for its tokens, tile by tile (BM tokens, 16 columns, as
//   apply's stage A), stages the matching dy tile, and adds dy^T T_r into its whole (NA, NI) piece of dq (each thread
//   4 a x 4 i in registers). Shared memory: x chunk / T_r 4160 + p chunk 256 + dy tile 4160 floats = 34304 bytes.
// * grad_p: grid (tiles of 16 j x 64 c, R, token splits). Per tile of BMP = floor(64 / max(NI, NA)) tokens: the x
//   tile (NI, BMP, 16 j) and the dy tile (NA, BMP, 64 c) go to shared memory, W_r = q[r] x for the tile's 16 j
//   (recomputed per column tile), then each thread adds W^T dy into its 4 elements of the (16, 64) dp tile.
//   Shared memory: x tile 1024 + q[r] 4096 + W 1088 + dy tile 4096 floats = 41216 bytes.
// * The gradients are deterministic: split s writes all of its fp32 piece buf[s] (zeros where it has no tokens),
//   no atomics, and the caller sums the pieces in order (csrc/finalize.cu's kernel) or, with one split,
//   passes the output itself as buf. The splits are a function of the shape and the SM count only.
// Limits: 1 <= R <= 16, 1 <= NI <= 64, 1 <= NA <= 64 (q[r] and a token tile's kept modes stay whole in a block),
// NJ >= 1, NC >= 1, M >= 1 (the binding returns early for M = 0).
// Checked by: tests/test_cuda_emulated.py (this source on the CPU under csrc/host_emulation.h, against the float64
// reference, fp32 / fp16 / bf16, transposed x and dy, outputs NaN-poisoned) and tests/test_cuda_backend.py on a GPU;
// compiled, not run on a GPU yet.
#include <limits.h>
#include <stdint.h>

#include "tt_common.cuh"

namespace ttkernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxR = 16;
constexpr int kMaxKept = 64;
constexpr int kRows = 256;                          // (i, b) and (a, b) rows of an apply / grad_q tile, at most
constexpr int kBJ = 16;                             // j per chunk of stage A
constexpr int kBC = 16;                             // c per column tile of apply and grad_q
constexpr int kStage = kBJ * kRows + kMaxKept;      // the x chunk, or T_r with its row stride BM * kBC + 1
constexpr int kPRows = 64;                          // (i, b) and (a, b) rows of a grad_p token tile, at most
constexpr int kPJ = 16;                             // j per grad_p tile
constexpr int kPC = 64;                             // c per grad_p tile
constexpr int64_t kMinTokensPerSplit = 64;
constexpr unsigned kMaxGridYZ = 65535;

static_assert(kThreads == kRows, "stage A maps 4 rows x 4 columns to each thread: rows tid / 4 + 64 k");
static_assert((kStage + kBJ * kBC + kMaxKept * kMaxKept) * 4 <= 48 * 1024, "apply's shared memory");
static_assert((2 * kStage + kBJ * kBC) * 4 <= 48 * 1024, "grad_q's shared memory");
static_assert((kPRows * kPJ + kMaxKept * kMaxKept + kPRows * (kPJ + 1) + kPRows * kPC) * 4 <= 48 * 1024,
              "grad_p's shared memory");

// Element strides of a 3-D operand (x: b, i, j; dy: b, a, c).
struct Strides3 {
  int64_t s0, s1, s2;
};

// Tokens per block tile of apply and grad_q: a power of two (so it divides 64, and a thread's rows tid / 4 + 64 k
// share one token), with BM * max(NI, NA) <= 256.
inline int tile_tokens(int64_t NI, int64_t NA) {
  const int64_t kept = NI > NA ? NI : NA;
  int bm = 64;
  while (bm > 1 && bm * kept > kRows) bm /= 2;
  return bm;
}

// Tokens per grad_p tile: BMP * max(NI, NA) <= 64.
inline int tile_tokens_p(int64_t NI, int64_t NA) {
  const int64_t kept = NI > NA ? NI : NA;
  return static_cast<int>(kPRows / kept);
}

// Copies t[b0 + b, k, col0 + c] (k < K, b < bm, c < width; t 3-D with element strides s) to
// dst[k * ld_k + b * ld_b + c * ld_c] as float, zero past token t_end or column cols. Consecutive threads take
// consecutive addresses of t along its unit-stride dimension (the last when s.s2 == 1, else k).
template <typename T>
__device__ __forceinline__ void stage_tile(float* __restrict__ dst, int ld_k, int ld_b, int ld_c,
                                           const T* __restrict__ t, Strides3 s, int64_t b0, int64_t t_end, int K,
                                           int bm, int64_t col0, int64_t cols, int width) {
  const int n = K * bm * width;
  for (int e = threadIdx.x; e < n; e += kThreads) {
    int k, b, c;
    if (s.s2 == 1) {
      c = e % width;
      const int rest = e / width;
      b = rest % bm;
      k = rest / bm;
    } else {
      k = e % K;
      const int rest = e / K;
      b = rest % bm;
      c = rest / bm;
    }
    const int64_t tok = b0 + b;
    dst[k * ld_k + b * ld_b + c * ld_c] =
        (tok < t_end && col0 + c < cols) ? to_float(t[tok * s.s0 + k * s.s1 + (col0 + c) * s.s2]) : 0.0f;
  }
}

// Stage A of one (token tile b0 .. b0 + bm, column tile c0 .. c0 + 16, r): acc[k][cc] = T_r[b, i, c0 + cq + cc]
// for the thread's rows row = tid / 4 + 64 k = i * bm + b (row < bm * NI) and cq = 4 (tid % 4). Starts with a
// barrier, so the caller may still be reading `stage` (which holds the x chunk here) when it calls this.
template <typename T>
__device__ __forceinline__ void stage_a(const T* __restrict__ x, Strides3 sx, int64_t b0, int64_t M, int NI, int NJ,
                                        int bm, const T* __restrict__ pr, int64_t NC, int64_t c0, float* stage,
                                        float* ps, float (&acc)[4][4]) {
  const int tid = threadIdx.x;
  const int rq = tid / 4;
  const int cq = (tid % 4) * 4;
  const int rows = bm * NI;
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) acc[k][cc] = 0.0f;

  for (int j0 = 0; j0 < NJ; j0 += kBJ) {
    const int jn = NJ - j0 < kBJ ? NJ - j0 : kBJ;
    __syncthreads();  // the previous chunk, or the caller's use of `stage` and `ps`, is done
    stage_tile(stage, bm, 1, kRows, x, sx, b0, M, NI, bm, j0, NJ, jn);  // [j][i * bm + b]
    {
      const int j = tid / kBC;
      const int c = tid % kBC;
      ps[tid] = (j < jn && c0 + c < NC) ? to_float(pr[static_cast<int64_t>(j0 + j) * NC + c0 + c]) : 0.0f;
    }
    __syncthreads();
    for (int j = 0; j < jn; ++j) {
      float pv[4];
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) pv[cc] = ps[j * kBC + cq + cc];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int row = rq + 64 * k;
        if (row >= rows) continue;
        const float xv = stage[j * kRows + row];
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) acc[k][cc] = fmaf(xv, pv[cc], acc[k][cc]);
      }
    }
  }
}

// T_r from the threads' registers into `stage`, [i][b * 16 + c] with row stride ldt (the caller has passed a
// barrier after stage_a, so nobody reads the x chunk any more).
__device__ __forceinline__ void store_t(const float (&acc)[4][4], int bm, int NI, int ldt, float* stage) {
  const int tid = threadIdx.x;
  const int rq = tid / 4;
  const int cq = (tid % 4) * 4;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int row = rq + 64 * k;
    if (row >= bm * NI) continue;
    const int i = row / bm;
    const int b = row % bm;
#pragma unroll
    for (int cc = 0; cc < 4; ++cc) stage[i * ldt + b * kBC + cq + cc] = acc[k][cc];
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_apply_kernel(const T* __restrict__ x, Strides3 sx, const T* __restrict__ q, const T* __restrict__ p,
                      T* __restrict__ y, int64_t M, int R, int NI, int NJ, int NA, int64_t NC, int bm) {
  __shared__ float stage[kStage];                // x chunk [j][i * bm + b]; then T_r [i][b * 16 + c], stride ldt
  __shared__ float ps[kBJ * kBC];                // p[r] chunk [j][c]
  __shared__ float qs[kMaxKept * kMaxKept];      // q[r] [a][i]

  const int tid = threadIdx.x;
  const int rq = tid / 4;
  const int cq = (tid % 4) * 4;
  const int b = rq % bm;  // the thread's token in stage B, the same for its 4 rows (bm divides 64)
  const int ldt = bm * kBC + 1;
  const int64_t b0 = static_cast<int64_t>(blockIdx.x) * bm;
  const int64_t col_tiles = (NC + kBC - 1) / kBC;  // (ceil_div is host-only)

  for (int64_t ct = blockIdx.y; ct < col_tiles; ct += gridDim.y) {  // the same trip count for the whole block
    const int64_t c0 = ct * kBC;
    float yacc[4][4];
#pragma unroll
    for (int k = 0; k < 4; ++k)
#pragma unroll
      for (int cc = 0; cc < 4; ++cc) yacc[k][cc] = 0.0f;

    for (int r = 0; r < R; ++r) {
      float tacc[4][4];
      stage_a(x, sx, b0, M, NI, NJ, bm, p + static_cast<int64_t>(r) * NJ * NC, NC, c0, stage, ps, tacc);
      __syncthreads();  // every thread is done with the last x chunk
      store_t(tacc, bm, NI, ldt, stage);
      const T* qr = q + static_cast<int64_t>(r) * NA * NI;
      for (int e = tid; e < NA * NI; e += kThreads) qs[e] = to_float(qr[e]);
      __syncthreads();
      for (int i = 0; i < NI; ++i) {
        float tv[4];
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) tv[cc] = stage[i * ldt + b * kBC + cq + cc];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int a = (rq + 64 * k) / bm;
          if (a >= NA) continue;
          const float qv = qs[a * NI + i];
#pragma unroll
          for (int cc = 0; cc < 4; ++cc) yacc[k][cc] = fmaf(qv, tv[cc], yacc[k][cc]);
        }
      }
      // the next stage_a (or column tile) starts with a barrier before it overwrites `stage`, `ps` or `qs`
    }

    const int64_t tok = b0 + b;
    if (tok < M) {
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int a = (rq + 64 * k) / bm;
        if (a >= NA) continue;
        T* out = y + (tok * NA + a) * NC;
#pragma unroll
        for (int cc = 0; cc < 4; ++cc) {
          const int64_t c = c0 + cq + cc;
          if (c < NC) out[c] = from_float<T>(yacc[k][cc]);
        }
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_grad_q_kernel(const T* __restrict__ dy, Strides3 sd, const T* __restrict__ x, Strides3 sx,
                       const T* __restrict__ p, float* __restrict__ buf, int64_t M, int R, int NI, int NJ, int NA,
                       int64_t NC, int bm, int64_t tokens_per_split) {
  __shared__ float stage[kStage];  // x chunk, then T_r [i][b * 16 + c] with row stride ldt
  __shared__ float ps[kBJ * kBC];  // p[r] chunk [j][c]
  __shared__ float dys[kStage];    // dy tile [a][b * 16 + c] with row stride ldt

  const int tid = threadIdx.x;
  const int r = blockIdx.y;
  const int64_t split = blockIdx.x;
  const int ldt = bm * kBC + 1;  // odd: the 16 values of i a warp reads lie in 16 banks
  const int nbc = bm * kBC;
  const int64_t t_begin = split * tokens_per_split;
  const int64_t t_end = t_begin + tokens_per_split < M ? t_begin + tokens_per_split : M;
  const T* pr = p + static_cast<int64_t>(r) * NJ * NC;

  // the thread's piece of dq[r]: a = tid / 16 + 16 k, i = tid % 16 + 16 m; rows past NA / NI read row 0 and are
  // dropped at the end
  int arow[4], irow[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int a = tid / 16 + 16 * k;
    const int i = tid % 16 + 16 * k;
    arow[k] = a < NA ? a : 0;
    irow[k] = i < NI ? i : 0;
  }
  float acc[4][4];
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int m = 0; m < 4; ++m) acc[k][m] = 0.0f;

  for (int64_t b0 = t_begin; b0 < t_end; b0 += bm) {
    for (int64_t c0 = 0; c0 < NC; c0 += kBC) {
      float tacc[4][4];
      stage_a(x, sx, b0, M, NI, NJ, bm, pr, NC, c0, stage, ps, tacc);
      __syncthreads();  // every thread is done with the last x chunk
      store_t(tacc, bm, NI, ldt, stage);
      stage_tile(dys, ldt, kBC, 1, dy, sd, b0, t_end, NA, bm, c0, NC, kBC);  // [a][b * 16 + c]
      __syncthreads();
      for (int bc = 0; bc < nbc; ++bc) {
        float dv[4], tv[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) dv[k] = dys[arow[k] * ldt + bc];
#pragma unroll
        for (int m = 0; m < 4; ++m) tv[m] = stage[irow[m] * ldt + bc];
#pragma unroll
        for (int k = 0; k < 4; ++k)
#pragma unroll
          for (int m = 0; m < 4; ++m) acc[k][m] = fmaf(dv[k], tv[m], acc[k][m]);
      }
      // the next stage_a starts with a barrier before `stage` is overwritten; `dys` only after its second one
    }
  }

  float* out = buf + (split * R + r) * NA * NI;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int a = tid / 16 + 16 * k;
    if (a >= NA) continue;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int i = tid % 16 + 16 * m;
      if (i < NI) out[a * NI + i] = acc[k][m];
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    kron_grad_p_kernel(const T* __restrict__ dy, Strides3 sd, const T* __restrict__ x, Strides3 sx,
                       const T* __restrict__ q, float* __restrict__ buf, int64_t M, int R, int NI, int NJ, int NA,
                       int64_t NC, int bm, int64_t tokens_per_split) {
  __shared__ float xs[kPRows * kPJ];            // x tile [i * bm + b][j]
  __shared__ float qs[kMaxKept * kMaxKept];     // q[r] [a][i]
  __shared__ float ws[kPRows * (kPJ + 1)];      // W_r [a * bm + b][j]
  __shared__ float dys[kPRows * kPC];           // dy tile [a * bm + b][c]

  const int tid = threadIdx.x;
  const int64_t j_tiles = (NJ + kPJ - 1) / kPJ;
  const int64_t tile = blockIdx.x;
  const int j0 = static_cast<int>(tile % j_tiles) * kPJ;
  const int64_t c0 = (tile / j_tiles) * kPC;
  const int r = blockIdx.y;
  const int64_t split = blockIdx.z;
  const int64_t t_begin = split * tokens_per_split;
  const int64_t t_end = t_begin + tokens_per_split < M ? t_begin + tokens_per_split : M;
  const int rows_w = bm * NA;
  const int jn = NJ - j0 < kPJ ? NJ - j0 : kPJ;

  const T* qr = q + static_cast<int64_t>(r) * NA * NI;
  for (int e = tid; e < NA * NI; e += kThreads) qs[e] = to_float(qr[e]);

  const int jw = tid % kPJ;  // W: the thread's column j, rows tid / 16 + 16 k
  const int jd = tid / 16;   // dp: the thread's row j, columns tid % 16 + 16 m
  const int cd = tid % 16;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};

  for (int64_t b0 = t_begin; b0 < t_end; b0 += bm) {
    __syncthreads();  // the previous tile is consumed
    stage_tile(xs, bm * kPJ, kPJ, 1, x, sx, b0, t_end, NI, bm, j0, NJ, kPJ);  // [i * bm + b][j]
    stage_tile(dys, bm * kPC, kPC, 1, dy, sd, b0, t_end, NA, bm, c0, NC, kPC);  // [a * bm + b][c]
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int row = tid / kPJ + 16 * k;
      if (row >= rows_w) continue;
      const int a = row / bm;
      const int b = row % bm;
      float w = 0.0f;
      for (int i = 0; i < NI; ++i) w = fmaf(qs[a * NI + i], xs[(i * bm + b) * kPJ + jw], w);
      ws[row * (kPJ + 1) + jw] = w;
    }
    __syncthreads();
    for (int row = 0; row < rows_w; ++row) {
      const float wv = ws[row * (kPJ + 1) + jd];
#pragma unroll
      for (int m = 0; m < 4; ++m) acc[m] = fmaf(wv, dys[row * kPC + cd + 16 * m], acc[m]);
    }
  }

  if (jd < jn) {
    float* out = buf + ((split * R + r) * NJ + j0 + jd) * NC;
#pragma unroll
    for (int m = 0; m < 4; ++m) {
      const int64_t c = c0 + cd + 16 * m;
      if (c < NC) out[c] = acc[m];
    }
  }
}

bool kron_sizes_ok(int64_t M, int64_t R, int64_t NI, int64_t NJ, int64_t NA, int64_t NC) {
  return M >= 1 && R >= 1 && R <= kMaxR && NI >= 1 && NI <= kMaxKept && NA >= 1 && NA <= kMaxKept && NJ >= 1 &&
         NJ <= INT_MAX && NC >= 1;
}

bool strides_ok(const Strides3& s) { return s.s0 >= 0 && s.s1 >= 0 && s.s2 >= 0; }

int64_t splits_for(int64_t M, int64_t blocks_per_split, int num_sms) {
  int64_t splits = ceil_div(2 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), blocks_per_split);
  const int64_t most = ceil_div(M, kMinTokensPerSplit);
  if (splits > most) splits = most;
  if (splits > kMaxGridYZ) splits = kMaxGridYZ;
  return splits < 1 ? 1 : splits;
}

}  // namespace
}  // namespace ttkernels

extern "C" cudaError_t ttk_kron_apply_launch(ttk_dtype dtype, const void* x, int64_t sxb, int64_t sxi, int64_t sxj,
                                             const void* q, const void* p, void* y, int64_t M, int64_t R, int64_t NI,
                                             int64_t NJ, int64_t NA, int64_t NC, cudaStream_t stream) {
  using namespace ttkernels;
  const Strides3 sx{sxb, sxi, sxj};
  if (!kron_sizes_ok(M, R, NI, NJ, NA, NC) || !strides_ok(sx)) return cudaErrorInvalidValue;
  const int bm = tile_tokens(NI, NA);
  if (ceil_div(M, bm) > INT_MAX) return cudaErrorInvalidValue;
  const int64_t col_tiles = ceil_div(NC, kBC);
  const dim3 grid(static_cast<unsigned>(ceil_div(M, bm)),
                  static_cast<unsigned>(col_tiles < kMaxGridYZ ? col_tiles : kMaxGridYZ));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = kron_apply_kernel<T>;
    TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(x), sx, static_cast<const T*>(q),
               static_cast<const T*>(p), static_cast<T*>(y), M, static_cast<int>(R), static_cast<int>(NI),
               static_cast<int>(NJ), static_cast<int>(NA), NC, bm);
    return TTK_LAST_ERROR();
  });
}

// Token splits of grad_q: about two blocks per SM over the R ranks, at least 64 tokens each.
extern "C" int64_t ttk_kron_grad_q_splits(int64_t M, int64_t R, int num_sms) {
  return ttkernels::splits_for(M, R > 0 ? R : 1, num_sms);
}

extern "C" cudaError_t ttk_kron_grad_q_launch(ttk_dtype dtype, const void* dy, int64_t sdb, int64_t sda, int64_t sdc,
                                              const void* x, int64_t sxb, int64_t sxi, int64_t sxj, const void* p,
                                              float* dq_buf, int64_t splits, int64_t M, int64_t R, int64_t NI,
                                              int64_t NJ, int64_t NA, int64_t NC, cudaStream_t stream) {
  using namespace ttkernels;
  const Strides3 sd{sdb, sda, sdc}, sx{sxb, sxi, sxj};
  if (!kron_sizes_ok(M, R, NI, NJ, NA, NC) || !strides_ok(sd) || !strides_ok(sx)) return cudaErrorInvalidValue;
  if (splits < 1 || splits > INT_MAX) return cudaErrorInvalidValue;
  const int bm = tile_tokens(NI, NA);
  // tokens per split: a multiple of the tile, so that splits never share a tile
  const int64_t tokens_per_split = ceil_div(ceil_div(M, splits), bm) * bm;
  const dim3 grid(static_cast<unsigned>(splits), static_cast<unsigned>(R));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = kron_grad_q_kernel<T>;
    TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(dy), sd, static_cast<const T*>(x), sx,
               static_cast<const T*>(p), dq_buf, M, static_cast<int>(R), static_cast<int>(NI), static_cast<int>(NJ),
               static_cast<int>(NA), NC, bm, tokens_per_split);
    return TTK_LAST_ERROR();
  });
}

// Token splits of grad_p: about two blocks per SM over the R x (16 j x 64 c) tiles, at least 64 tokens each.
extern "C" int64_t ttk_kron_grad_p_splits(int64_t M, int64_t R, int64_t NJ, int64_t NC, int num_sms) {
  using namespace ttkernels;
  const int64_t tiles = ceil_div(NJ > 0 ? NJ : 1, kPJ) * ceil_div(NC > 0 ? NC : 1, kPC) * (R > 0 ? R : 1);
  return splits_for(M, tiles, num_sms);
}

extern "C" cudaError_t ttk_kron_grad_p_launch(ttk_dtype dtype, const void* dy, int64_t sdb, int64_t sda, int64_t sdc,
                                              const void* x, int64_t sxb, int64_t sxi, int64_t sxj, const void* q,
                                              float* dp_buf, int64_t splits, int64_t M, int64_t R, int64_t NI,
                                              int64_t NJ, int64_t NA, int64_t NC, cudaStream_t stream) {
  using namespace ttkernels;
  const Strides3 sd{sdb, sda, sdc}, sx{sxb, sxi, sxj};
  if (!kron_sizes_ok(M, R, NI, NJ, NA, NC) || !strides_ok(sd) || !strides_ok(sx)) return cudaErrorInvalidValue;
  if (splits < 1 || splits > kMaxGridYZ) return cudaErrorInvalidValue;
  const int64_t tiles = ceil_div(NJ, kPJ) * ceil_div(NC, kPC);
  if (tiles > INT_MAX) return cudaErrorInvalidValue;
  const int bm = tile_tokens_p(NI, NA);
  const int64_t tokens_per_split = ceil_div(ceil_div(M, splits), bm) * bm;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(R), static_cast<unsigned>(splits));
  return dispatch_dtype(dtype, [&](auto tag) {
    using T = decltype(tag);
    auto* kernel = kron_grad_p_kernel<T>;
    TTK_LAUNCH(kernel, grid, kThreads, stream, static_cast<const T*>(dy), sd, static_cast<const T*>(x), sx,
               static_cast<const T*>(q), dp_buf, M, static_cast<int>(R), static_cast<int>(NI), static_cast<int>(NJ),
               static_cast<int>(NA), NC, bm, tokens_per_split);
    return TTK_LAST_ERROR();
  });
}
