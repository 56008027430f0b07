"""The CUDA kernels of csrc/ run on the CPU (csrc/host_emulation.h) against the float64 reference.

The kernel sources are compiled by the host C++ compiler with -DTTK_HOST_EMULATION into a small shared library
(no torch, no CUDA runtime: only the toolkit's headers for the fp16/bf16 types) and called through ctypes with
CPU tensors. Each block runs as 256 threads meeting at __syncthreads(), so the kernels' indexing, masking, tiling,
shared-memory staging, atomics and deterministic reductions are checked as written, bf16 included. This does not
make them "run on a GPU": speed, the GPU memory model and code generation are only checked on a GPU
(tests/test_cuda_backend.py).

``Emulated`` replays the plan of csrc/bindings.cpp for each op (outputs, fp32 buffers, launch order) so the
launchers are called as the binding calls them; outputs are filled with NaN before the kernels write them.

Needs a C++20 compiler and the CUDA headers (CUDA_HOME, /usr/local/cuda, or the nvidia-cuda-runtime wheel);
without them the tests skip, and with TTKERNELS_REQUIRE_CUDA_EXT=1 (CI) they fail. On a machine with a GPU they
skip: there tests/test_cuda_backend.py runs the kernels themselves.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import subprocess

import pytest
import torch

import helpers
from helpers import check_error_ratio as check
from ttkernels import reference as ref
from ttkernels import ttm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
SOURCES = [
    "shrink.cu",
    "grad_dy.cu",
    "token_reduce.cu",
    "accumulate.cu",
    "rowmix.cu",
    "finalize.cu",
    "dropout.cu",
    "ttm.cu",
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
NUM_SMS = 3  # a small "device": several row splits even for small M

i64, u64, u32, f32, cint, vp = (
    ctypes.c_int64,
    ctypes.c_uint64,
    ctypes.c_uint32,
    ctypes.c_float,
    ctypes.c_int,
    ctypes.c_void_p,
)
SIGNATURES = {
    "ttk_shrink_splits": [i64, i64, i64, cint],
    "ttk_shrink_launch": [cint, vp, vp, vp, vp, i64, vp, vp, vp, cint, i64, i64, i64, i64, cint, u64, u32, f32, vp],
    "ttk_grad_dy_slices": [i64, i64, i64, cint],
    "ttk_grad_dy_splits": [i64, i64, i64, cint, cint],
    "ttk_grad_dy_launch": [cint, vp, vp, vp, vp, vp, vp, cint, cint, i64, i64, i64, f32, vp],
    "ttk_token_reduce_splits": [i64, i64, cint],
    "ttk_token_reduce_launch": [cint, vp, vp, vp, i64, vp, i64, cint, i64, i64, i64, cint, u64, u32, f32, vp],
    "ttk_accumulate_launch": [cint, vp, vp, vp, i64, i64, i64, i64, i64, f32, cint, u64, u32, f32, vp],
    "ttk_rowmix_launch": [cint, vp, vp, vp, i64, cint, vp, i64, i64, i64, vp],
    "ttk_finalize_launch": [cint, vp, i64, i64, f32, vp, vp],
    "ttk_dropout_launch": [cint, vp, vp, i64, i64, u64, u32, f32, vp],
    "ttk_kron_apply_launch": [cint, vp, i64, i64, i64, vp, vp, vp, i64, i64, i64, i64, i64, i64, vp],
    "ttk_kron_grad_q_splits": [i64, i64, cint],
    "ttk_kron_grad_q_launch": [cint, vp, i64, i64, i64, vp, i64, i64, i64, vp, vp, i64, *[i64] * 6, vp],
    "ttk_kron_grad_p_splits": [i64, i64, i64, i64, cint],
    "ttk_kron_grad_p_launch": [cint, vp, i64, i64, i64, vp, i64, i64, i64, vp, vp, i64, *[i64] * 6, vp],
}


def _cuda_include() -> str | None:
    candidates = [os.path.join(os.environ.get("CUDA_HOME", ""), "include"), "/usr/local/cuda/include"]
    try:
        import nvidia

        candidates += [os.path.join(p, "cu13", "include") for p in nvidia.__path__]
        candidates += sorted(glob.glob(os.path.join(nvidia.__path__[0], "*", "include")))
    except ImportError:
        pass
    for inc in candidates:
        if (
            inc
            and os.path.isfile(os.path.join(inc, "cuda_fp16.h"))
            and os.path.isfile(os.path.join(inc, "cuda_runtime.h"))
        ):
            return inc
    return None


def _unavailable(why: str):
    if os.environ.get("TTKERNELS_REQUIRE_CUDA_EXT") == "1":
        pytest.fail(f"TTKERNELS_REQUIRE_CUDA_EXT=1 but the emulated kernels cannot be built: {why}")
    pytest.skip(why)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("a GPU runs the kernels themselves (tests/test_cuda_backend.py); the emulation is for CPU machines")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    inc = _cuda_include()
    if cxx is None or inc is None:
        _unavailable(f"needs a C++ compiler (found {cxx}) and the CUDA headers (found {inc})")
    files = [os.path.join(CSRC, f) for f in SOURCES] + sorted(glob.glob(os.path.join(CSRC, "*.h*")))
    digest = hashlib.sha256(b"".join(open(f, "rb").read() for f in files)).hexdigest()[:16]
    out = os.path.join(str(tmp_path_factory.getbasetemp()), f"libttk_emu_{digest}.so")
    cmd = [cxx, "-std=c++20", "-O1", "-x", "c++", "-DTTK_HOST_EMULATION", f"-I{CSRC}", f"-I{inc}", "-shared",
           "-fPIC", "-pthread", *[os.path.join(CSRC, f) for f in SOURCES], "-o", out]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"the emulated kernels do not compile:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    handle = ctypes.CDLL(out)
    for name, args in SIGNATURES.items():
        fn = getattr(handle, name)
        fn.argtypes = args
        fn.restype = ctypes.c_int64 if name.endswith(("_slices", "_splits")) else ctypes.c_int
    return handle


def ptr(t):
    return None if t is None else t.data_ptr()


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


class Emulated:
    """The ops of csrc/bindings.cpp, on CPU tensors, launching the emulated kernels as the binding does."""

    def __init__(self, lib, deterministic=False):
        self.lib, self.det = lib, deterministic

    def _ok(self, err):
        assert err == 0, f"launcher returned cudaError {err}"

    def _drop(self, p, seed):
        return (int(p > 0), seed, ref.dropout_threshold(p), float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32)))

    def _finalize(self, buf, parts, out, scale):
        self._ok(self.lib.ttk_finalize_launch(CODE[out.dtype], ptr(buf), parts, out.numel(), scale, ptr(out), None))

    def _reduce(self, X, Y, groups, num_groups, p, seed, out):
        m, i_cols, r = X.shape[0], X.shape[1], Y.shape[1]
        splits = self.lib.ttk_token_reduce_splits(m, i_cols, NUM_SMS)
        parts = splits if self.det else 1
        buf = torch.zeros(parts * num_groups * i_cols * r, dtype=torch.float32)
        self._ok(self.lib.ttk_token_reduce_launch(CODE[X.dtype], ptr(X), ptr(Y), ptr(groups), num_groups, ptr(buf),
                                                  splits, int(self.det), m, i_cols, r, *self._drop(p, seed), None))  # fmt: skip
        self._finalize(buf, parts, out, 1.0)
        return out

    def shrink(self, x, A, C, task_ids, p, seed):
        m, ra = x.shape[0], A.shape[1]
        rb = ra if C is None else C.shape[-1]
        S, U = poisoned(m, ra, dtype=x.dtype), (None if C is None else poisoned(m, rb, dtype=x.dtype))
        if m:
            T = C.shape[0] if C is not None and C.dim() == 3 else 0
            splits = self.lib.ttk_shrink_splits(m, x.shape[1], ra, NUM_SMS)
            partial = poisoned(splits * m * ra, dtype=torch.float32) if splits > 1 else None
            self._ok(self.lib.ttk_shrink_launch(CODE[x.dtype], ptr(x), ptr(A), ptr(C), ptr(task_ids), T, ptr(S),
                                                ptr(U), ptr(partial), NUM_SMS, m, x.shape[1], ra, rb,
                                                *self._drop(p, seed), None))  # fmt: skip
        return S, (S if C is None else U)

    def mid(self, S, C, task_ids):
        if C is None:
            return S
        U = poisoned(S.shape[0], C.shape[-1], dtype=S.dtype)
        if S.shape[0]:
            T = C.shape[0] if C.dim() == 3 else 0
            self._ok(self.lib.ttk_rowmix_launch(CODE[S.dtype], ptr(S), ptr(C), ptr(task_ids), T, 0, ptr(U),
                                                S.shape[0], S.shape[1], C.shape[-1], None))  # fmt: skip
        return U

    def expand(self, x, weight, bias, U, B, scaling):
        y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
        if x.shape[0]:
            self._ok(self.lib.ttk_accumulate_launch(CODE[x.dtype], ptr(y), ptr(U), ptr(B), B.shape[1], 1, x.shape[0],
                                                    B.shape[1], B.shape[0], scaling, 0, 0, 0, 1.0, None))  # fmt: skip
        return y

    def grad_dy(self, dy, U, B, scaling):
        m, n, rb = dy.shape[0], dy.shape[1], B.shape[0]
        dU = poisoned(m, rb, dtype=dy.dtype)
        if m == 0:
            return dU, torch.zeros(rb, n, dtype=dy.dtype)
        slices = self.lib.ttk_grad_dy_slices(m, n, rb, NUM_SMS)
        splits = self.lib.ttk_grad_dy_splits(m, n, rb, int(self.det), NUM_SMS)
        parts = splits if self.det else 1
        dU_buf = poisoned(slices * m * rb, dtype=torch.float32) if slices > 1 else None
        buf = poisoned(parts * rb * n, dtype=torch.float32) if self.det else torch.zeros(rb * n)
        self._ok(self.lib.ttk_grad_dy_launch(CODE[dy.dtype], ptr(dy), ptr(U), ptr(B), ptr(dU), ptr(dU_buf), ptr(buf),
                                             int(self.det), NUM_SMS, m, n, rb, scaling, None))  # fmt: skip
        if slices > 1:
            self._finalize(dU_buf, slices, dU, scaling)
        dB = poisoned(rb, n, dtype=dy.dtype)
        self._finalize(buf, parts, dB, scaling)
        return dU, dB

    def grad_mid(self, S, dU, C, task_ids):
        if C is None:
            return dU, None
        m, ra, rb = S.shape[0], S.shape[1], C.shape[-1]
        dS = poisoned(m, ra, dtype=S.dtype)
        if m == 0:
            return dS, torch.zeros_like(C)
        T = C.shape[0] if C.dim() == 3 else 0
        self._ok(self.lib.ttk_rowmix_launch(CODE[S.dtype], ptr(dU), ptr(C), ptr(task_ids), T, 1, ptr(dS), m, rb, ra,
                                            None))  # fmt: skip
        dC = self._reduce(S, dU, task_ids, max(T, 1), 0.0, 0, poisoned(*C.shape, dtype=C.dtype))
        return dS, dC

    def grad_x(self, dy, weight, dS, A, p, seed):
        dx = dy @ weight
        if dy.shape[0]:
            self._ok(self.lib.ttk_accumulate_launch(CODE[dy.dtype], ptr(dx), ptr(dS), ptr(A), 1, A.shape[1],
                                                    dy.shape[0], A.shape[0], A.shape[1], 1.0, *self._drop(p, seed),
                                                    None))  # fmt: skip
        return dx

    def grad_a(self, x, dS, p, seed):
        if x.shape[0] == 0:
            return torch.zeros(x.shape[1], dS.shape[1], dtype=x.dtype)
        return self._reduce(x, dS, None, 1, p, seed, poisoned(x.shape[1], dS.shape[1], dtype=x.dtype))

    # The Kronecker-sum ops (ttm.cu); x and dy keep their strides, q and p are contiguous (the binding checks it).
    def kron_apply(self, x, q, p):
        (m, ni, nj), (r, na, _), nc = x.shape, q.shape, p.shape[2]
        y = poisoned(m, na, nc, dtype=x.dtype)
        if m:
            self._ok(self.lib.ttk_kron_apply_launch(CODE[x.dtype], ptr(x), *x.stride(), ptr(q), ptr(p), ptr(y), m, r,
                                                    ni, nj, na, nc, None))  # fmt: skip
        return y

    def _kron_reduce(self, dy, x, factor, grad_q):
        (m, ni, nj), (_, na, nc), r = x.shape, dy.shape, factor.shape[0]
        sizes = (r, na, ni) if grad_q else (r, nj, nc)
        if m == 0:
            return torch.zeros(sizes)
        out = poisoned(*sizes, dtype=torch.float32)
        if grad_q:
            parts, launch = self.lib.ttk_kron_grad_q_splits(m, r, NUM_SMS), self.lib.ttk_kron_grad_q_launch
        else:
            parts, launch = self.lib.ttk_kron_grad_p_splits(m, r, nj, nc, NUM_SMS), self.lib.ttk_kron_grad_p_launch
        buf = out if parts == 1 else poisoned(parts * out.numel(), dtype=torch.float32)
        self._ok(launch(CODE[x.dtype], ptr(dy), *dy.stride(), ptr(x), *x.stride(), ptr(factor), ptr(buf), parts, m, r,
                        ni, nj, na, nc, None))  # fmt: skip
        if parts > 1:
            self._ok(self.lib.ttk_finalize_launch(CODE[torch.float32], ptr(buf), parts, out.numel(), 1.0, ptr(out),
                                                  None))  # fmt: skip
        return out

    def kron_grad_q(self, dy, x, p):
        return self._kron_reduce(dy, x, p, True)

    def kron_grad_p(self, dy, x, q):
        return self._kron_reduce(dy, x, q, False)


rnd = helpers.rnd


def both(emu, fn_name, *args):
    return helpers.against_reference(emu, fn_name, *args)


def middle(kind, ra, rb, n_tasks, dtype, m):
    return helpers.random_middle(kind, ra, rb, n_tasks, dtype, m, run=3)


def seed():
    return int(torch.randint(0, 2**62, ()).item())


# (dtype, aligned) of the vector-load tests: every dtype with rows whose addresses allow 16-byte loads, bf16 with
# rows that do not (the scalar fallback); the other dtypes' unaligned runs are slow (the full run has them).
VEC_CASES = [(d, True) for d in DTYPES] + [(torch.bfloat16, False)]
VEC_CASES += [pytest.param(d, False, marks=pytest.mark.slow) for d in (torch.float32, torch.float16)]
VEC_IDS = ["fp32", "fp16", "bf16", "bf16-offset", "fp32-offset", "fp16-offset"]


# (M, d_in, d_out, ra, rb): empty, one token, primes, per-bond ranks, the rank buckets, several row blocks
SHAPES = [(0, 13, 11, 3, 3), (1, 13, 11, 1, 1), (7, 29, 31, 5, 3), (37, 67, 131, 16, 19), (71, 37, 41, 33, 64),
          (13, 23, 19, 128, 100), (97, 70, 45, 8, 8)]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "shared", "task"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_and_mid(lib, shape, kind, p, dtype):
    m, d_in, _, ra, rb = shape
    rb = ra if kind == "none" else rb
    emu = Emulated(lib)
    x, A = rnd(m, d_in, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5)
    C, ids = middle(kind, ra, rb, 4, dtype, m)
    (S, U), (S64, U64), (St, Ut) = both(emu, "shrink", x, A, C, ids, p, seed())
    check("S", S, S64, St, dtype)
    check("U", U, U64, Ut, dtype)
    U2, U64b, Utb = both(emu, "mid", S, C, ids)
    check("mid", U2, U64b, Utb, dtype)


# (M, d_in, ra, rb): split-K at decode (1 and 5 tokens over 1000 / 1031 columns: several K ranges, the last one
# short), rows that allow 16-byte loads (d_in a multiple of 8) and rows that do not, every rank bucket
SHRINK_SPLIT_K = [(1, 1000, 16, 16), (5, 1031, 33, 7), (3, 512, 128, 100), (40, 264, 3, 70)]


@pytest.mark.parametrize("dtype, aligned", VEC_CASES, ids=VEC_IDS)
@pytest.mark.parametrize("kind", ["none", "task"])
@pytest.mark.parametrize("shape", SHRINK_SPLIT_K)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_split_k_and_vector_loads(lib, shape, kind, p, aligned, dtype):
    m, d_in, ra, rb = shape
    assert lib.ttk_shrink_splits(m, d_in, ra, NUM_SMS) > 1
    rb = ra if kind == "none" else rb
    x, A = rnd(m, d_in, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5)
    if not aligned:  # the launcher must fall back to scalar loads (a misaligned vector load fails the launch)
        x = offset_copy(x)
    C, ids = middle(kind, ra, rb, 4, dtype, m)
    (S, U), (S64, U64), (St, Ut) = both(Emulated(lib), "shrink", x, A, C, ids, p, seed())
    check("S", S, S64, St, dtype)
    check("U", U, U64, Ut, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_expand(lib, shape, bias, dtype):
    m, d_in, d_out, _, rb = shape
    x, W = rnd(m, d_in, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    b = rnd(d_out, dtype=dtype) if bias else None
    U, B = rnd(m, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    y, y64, yt = both(Emulated(lib), "expand", x, W, b, U, B, 0.75)
    check("y", y, y64, yt, dtype)


# (M, d_in, d_out, ra, rb): rows that allow 16-byte updates of out (d_out, d_in multiples of 8), ranks over more than
# one 32-rank chunk and not multiples of 16, tiles cut by M and N
ACCUMULATE_ROWS = [(37, 24, 136, 40, 40), (5, 64, 16, 3, 3), (70, 128, 264, 16, 16), (33, 8, 8, 100, 77)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACCUMULATE_ROWS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_accumulate_vector_rows(lib, shape, p, dtype):
    m, d_in, d_out, ra, rb = shape
    emu = Emulated(lib)
    x, W = rnd(m, d_in, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    U, B = rnd(m, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    y, y64, yt = both(emu, "expand", x, W, None, U, B, 0.75)
    check("y", y, y64, yt, dtype)
    dy, dS, A = rnd(m, d_out, dtype=dtype), rnd(m, ra, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=ra**-0.5)
    Wt = rnd(d_out, d_in, dtype=dtype, scale=d_out**-0.5)
    s = seed()
    dx, dx64, dxt = both(emu, "grad_x", dy, Wt, dS, A, p, s)
    check("dx", dx, dx64, dxt, dtype)
    # the same update on an out whose rows are not 16-byte aligned (scalar updates) gives the same bits
    base = dy @ Wt
    moved = offset_copy(base)
    drop = emu._drop(p, s)
    assert (
        lib.ttk_accumulate_launch(CODE[dtype], ptr(moved), ptr(dS), ptr(A), 1, ra, m, d_in, ra, 1.0, *drop, None) == 0
    )
    assert torch.equal(moved, dx)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_grad_dy(lib, shape, det, dtype):
    m, _, d_out, _, rb = shape
    dy, U, B = rnd(m, d_out, dtype=dtype), rnd(m, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    (dU, dB), (dU64, dB64), (dUt, dBt) = both(Emulated(lib, det), "grad_dy", dy, U, B, 0.5)
    check("dU", dU, dU64, dUt, dtype)
    check("dB", dB, dB64, dBt, dtype)


def offset_copy(t, by=1):
    """t's values in a contiguous tensor whose data starts `by` elements into its storage (not 16-byte aligned)."""
    flat = torch.empty(t.numel() + by, dtype=t.dtype)
    out = flat[by:].view(t.shape)
    out.copy_(t)
    return out


# (M, d_out, rb): row lengths that allow 16-byte loads, several column slices (few row tiles on NUM_SMS = 3), several
# row tiles per split (many rows), ranks in every bucket
GRAD_DY_GRID = [(70, 160, 24), (3000, 96, 16), (33, 64, 128), (5, 1000, 3), (300, 40, 70)]


@pytest.mark.parametrize("dtype, aligned", VEC_CASES, ids=VEC_IDS)
@pytest.mark.parametrize("shape", GRAD_DY_GRID)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_grad_dy_slices_splits_and_vector_loads(lib, shape, det, aligned, dtype):
    m, d_out, rb = shape
    dy, U, B = rnd(m, d_out, dtype=dtype), rnd(m, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    if not aligned:  # the launcher must fall back to scalar loads (a misaligned vector load fails the launch)
        dy, B = offset_copy(dy), offset_copy(B)
    (dU, dB), (dU64, dB64), (dUt, dBt) = both(Emulated(lib, det), "grad_dy", dy, U, B, 0.5)
    check("dU", dU, dU64, dUt, dtype)
    check("dB", dB, dB64, dBt, dtype)


def test_grad_dy_plan_and_bounded_buffers(lib):
    """More than one column slice when the rows are few, more than one row tile per split when they are many, and a
    deterministic dB buffer that does not grow with M."""
    assert lib.ttk_grad_dy_slices(70, 160, 24, NUM_SMS) > 1
    assert lib.ttk_grad_dy_splits(3000, 96, 16, 1, NUM_SMS) < 3000 // 128
    sms, n, rb = 132, 4096, 128
    sizes = [lib.ttk_grad_dy_splits(m, n, rb, 1, sms) * rb * n * 4 for m in (8192, 65536, 2**20)]
    assert max(sizes) <= 64 * 2**20 and sizes[-1] <= sizes[0] * 1.01
    # the dU buffer (slices > 1 only when the rows are few) stays within a few MiB at the decode and training shapes
    for m in (1, 32, 8192, 65536):
        assert lib.ttk_grad_dy_slices(m, n, rb, sms) * m * rb * 4 <= 64 * 2**20


KINDS = ["none", "shared", "task"]


def _grad_mid_fast(det, shape, kind, dtype):
    """The fast suite: every case below rank 33; at ranks 33 and 128 (seconds each), each kind and reduction
    once in one of the dtypes, so every dtype still meets the large ranks."""
    return max(shape[3:]) < 33 or dtype == DTYPES[(KINDS.index(kind) + det) % len(DTYPES)]


@helpers.matrix("det,shape,kind,dtype", [False, True], SHAPES, KINDS, DTYPES, fast=_grad_mid_fast)
def test_grad_mid(lib, shape, kind, det, dtype):
    m, _, _, ra, rb = shape
    rb = ra if kind == "none" else rb
    C, ids = middle(kind, ra, rb, 5, dtype, m)
    S, dU = rnd(m, ra, dtype=dtype), rnd(m, rb, dtype=dtype)
    (dS, dC), (dS64, dC64), (dSt, dCt) = both(Emulated(lib, det), "grad_mid", S, dU, C, ids)
    check("dS", dS, dS64, dSt, dtype)
    check("dC", dC, dC64, dCt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grad_x(lib, shape, p, dtype):
    m, d_in, d_out, ra, _ = shape
    dy, W = rnd(m, d_out, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_out**-0.5)
    dS, A = rnd(m, ra, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=ra**-0.5)
    dx, dx64, dxt = both(Emulated(lib), "grad_x", dy, W, dS, A, p, seed())
    check("dx", dx, dx64, dxt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(1100, 20, 5, 4, 4)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_grad_a(lib, shape, p, det, dtype):
    m, d_in, _, ra, _ = shape
    x, dS = rnd(m, d_in, dtype=dtype), rnd(m, ra, dtype=dtype)
    dA, dA64, dAt = both(Emulated(lib, det), "grad_a", x, dS, p, seed())
    check("dA", dA, dA64, dAt, dtype)


# (M, d_in, ra): rows of x that allow 16-byte loads, several column blocks and row splits, ranks in every bucket
GRAD_A_ROWS = [(300, 136, 16), (45, 64, 33), (700, 24, 100), (1, 8, 1)]


@pytest.mark.parametrize("dtype, aligned", VEC_CASES, ids=VEC_IDS)
@pytest.mark.parametrize("shape", GRAD_A_ROWS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_grad_a_vector_rows(lib, shape, p, det, aligned, dtype):
    m, d_in, ra = shape
    x, dS = rnd(m, d_in, dtype=dtype), rnd(m, ra, dtype=dtype)
    if not aligned:  # the launcher must fall back to scalar loads (a misaligned vector load fails the launch)
        x = offset_copy(x)
    dA, dA64, dAt = both(Emulated(lib, det), "grad_a", x, dS, p, seed())
    check("dA", dA, dA64, dAt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_masks_are_the_reference_hash_bit_for_bit(lib, dtype):
    """S = drop(x) I, the dropout op, and drop'(dS I^T) added to zero all equal the reference's drop(x)."""
    x = rnd(37, 16, dtype=dtype)
    x = torch.where(x == 0, torch.ones_like(x), x)
    s, p = int(torch.randint(2**32, 2**62, ()).item()), 0.4
    want = ref.apply_dropout(x, s, p)
    eye = torch.eye(16, dtype=dtype)
    emu = Emulated(lib)
    assert torch.equal(emu.shrink(x, eye, None, None, p, s)[0], want)
    y = poisoned(37, 16, dtype=dtype)
    thr, scale = ref.dropout_threshold(p), float(torch.tensor(1 / (1 - p), dtype=torch.float32))
    assert lib.ttk_dropout_launch(CODE[dtype], ptr(x), ptr(y), 37, 16, s, thr, scale, None) == 0
    assert torch.equal(y, want)
    dx = emu.grad_x(torch.zeros(37, 3, dtype=dtype), torch.zeros(3, 16, dtype=dtype), x, eye, p, s)
    assert torch.equal(dx, want)


def test_deterministic_reductions_repeat_bit_for_bit(lib):
    first, again = helpers.reductions_twice(
        Emulated(lib, deterministic=True), rnd, middle, m=700, d_in=70, d_out=40, r=16
    )
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_out_of_range_task_ids_give_nan_rows_not_out_of_bounds_reads(lib):
    """What the kernels do when the binding could not check the ids (CUDA graph capture)."""
    m, ra, rb = 6, 3, 2
    x, A, C = rnd(m, 8), rnd(8, ra), rnd(3, ra, rb)
    ids = torch.tensor([0, 3, 1, -1, 2, 7])
    emu = Emulated(lib)
    _, U = emu.shrink(x, A, C, ids, 0.0, 0)
    bad = torch.tensor([False, True, False, True, False, True])
    assert torch.isnan(U[bad]).all() and torch.isfinite(U[~bad]).all()
    assert torch.isnan(emu.mid(rnd(m, ra), C, ids)[bad]).all()
    dS, dC = emu.grad_mid(rnd(m, ra), rnd(m, rb), C, ids)
    assert torch.isnan(dS[bad]).all() and torch.isfinite(dC).all()


# ------------------------------------------------------------------------------ Kronecker-sum ops (ttm.cu)
# (M, R, NI, NJ, NA, NC): empty, one token, primes at R = 1 and 3, NJ and NC over several tiles (16 j per chunk,
# 16 c per apply / grad_q tile, 64 c per grad_p tile), the R = 16 / NI = NA = 64 edge, lopsided kept sizes (the
# token tile follows the larger), and enough tokens for several grad_q / grad_p splits.
KRON_SHAPES = [(0, 3, 3, 7, 5, 11), (1, 1, 3, 7, 5, 11), (7, 3, 3, 7, 5, 11), (13, 3, 5, 70, 7, 130),
               (5, 16, 64, 9, 64, 17), (37, 2, 2, 130, 1, 70), (9, 4, 1, 33, 64, 5), (9, 4, 64, 3, 1, 20),
               (150, 1, 4, 5, 3, 6)]  # fmt: skip


LAYOUTS = ["contiguous", "transposed", "strided"]


def _kron_fast(shape, layout, dtype):
    """The fast suite: every small case; a shape with a side of 64 or more (about a second a case) in every
    layout, each layout in another dtype."""
    heavy = max(shape[1:]) >= 64
    return not heavy or dtype == DTYPES[(KRON_SHAPES.index(shape) + LAYOUTS.index(layout)) % len(DTYPES)]


@helpers.matrix("shape,layout,dtype", KRON_SHAPES, LAYOUTS, DTYPES, fast=_kron_fast)
def test_kron_apply_and_grads(lib, shape, layout, dtype):
    x, dy, q, p = helpers.kron_case(shape, dtype, layout)
    helpers.check_kron_ops(Emulated(lib), x, dy, q, p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "spec",
    [
        ttm.TTMSpec((3, 4), (2, 5), (3,)),
        ttm.TTMSpec((2, 3, 2), (3, 2, 5), (2, 3)),
        ttm.TTMSpec((70, 2), (66, 2), (2,)),  # only the right factor fits the kernels' 64 per side
    ],
    ids=lambda s: s.describe(),
)
def test_ttm_apply_on_the_emulated_cuda_kernels(lib, spec, dtype, monkeypatch):
    """ttm_apply(backend="cuda") end to end (the cut, the views, the autograd function, dx through transposed
    factors) with the op calls answered by the emulated kernels, against the float64 sweep."""
    emulated = ttm.ops.CudaKronKernels.__new__(ttm.ops.CudaKronKernels)
    emulated.k = Emulated(lib)
    monkeypatch.setattr(ttm.ops, "kron_kernels", lambda name, device: emulated)
    m = 9
    x = rnd(m, spec.in_features, dtype=dtype)
    cores = [rnd(*s, scale=(s[0] * s[2]) ** -0.5) for s in spec.core_shapes]
    dy = rnd(m, spec.out_features, dtype=dtype)

    def run(x, cores, dy, backend):
        x = x.detach().requires_grad_()
        cores = [c.detach().requires_grad_() for c in cores]
        y = ttm.ttm_apply(x, cores, scaling=0.5, backend=backend)
        return (y, *torch.autograd.grad(y, (x, *cores), dy))

    got = run(x, cores, dy, "cuda")
    want = run(x.double(), [c.double() for c in cores], dy.double(), "torch")
    base = run(x, cores, dy, "torch")
    for name, g, w, b in zip(["y", "dx"] + [f"dG{k}" for k in range(len(cores))], got, want, base):
        check(name, g, w, b, g.dtype)
    # a chain with no cut inside the limits is refused, not computed another way
    wide = ttm.TTMSpec((70, 2), (2, 66), (2,))
    with pytest.raises(ValueError, match="bond rank <= 16 and sides <= 64"):
        ttm.ttm_apply(rnd(2, wide.in_features, dtype=dtype), [rnd(*s) for s in wide.core_shapes], backend="cuda")


def test_kron_grads_split_and_repeat_bit_for_bit(lib):
    """Several token splits (summed in order by finalize); two runs give the same bits."""
    shape = (400, 1, 5, 13, 7, 50)
    m, r, _, nj, _, nc = shape
    assert lib.ttk_kron_grad_q_splits(m, r, NUM_SMS) > 1 and lib.ttk_kron_grad_p_splits(m, r, nj, nc, NUM_SMS) > 1
    x, dy, q, p = helpers.kron_case(shape, torch.float32, "transposed")
    emu = Emulated(lib)
    first = helpers.check_kron_ops(emu, x, dy, q, p, torch.float32)
    again = (emu.kron_apply(x, q, p), emu.kron_grad_q(dy, x, p), emu.kron_grad_p(dy, x, q))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name, args",
    [
        ("ttk_shrink_launch", [0, None, None, None, None, 0, None, None, None, 3, 0, 4, 2, 2, 0, 0, 0, 1.0, None]),
        ("ttk_shrink_launch", [0, None, None, None, None, 0, None, None, None, 3, 4, 4, 129, 129, 0, 0, 0, 1.0, None]),
        ("ttk_shrink_launch", [7, None, None, None, None, 0, None, None, None, 3, 4, 4, 2, 2, 0, 0, 0, 1.0, None]),
        ("ttk_shrink_launch", [0, None, None, None, None, 0, None, None, None, 3, 4, 4096, 2, 2, 0, 0, 0, 1.0, None]),
        ("ttk_grad_dy_launch", [0, None, None, None, None, None, None, 0, 3, 4, 4, 0, 1.0, None]),
        ("ttk_grad_dy_launch", [0, None, None, None, None, None, None, 0, 3, 4, 4096, 4, 1.0, None]),
        ("ttk_token_reduce_launch", [0, None, None, None, 1, None, 0, 0, 4, 4, 2, 0, 0, 0, 1.0, None]),
        ("ttk_accumulate_launch", [0, None, None, None, 1, 1, 4, 0, 2, 1.0, 0, 0, 0, 1.0, None]),
        ("ttk_rowmix_launch", [0, None, None, None, 0, 0, None, 4, 0, 2, None]),
        ("ttk_finalize_launch", [0, None, 0, 4, 1.0, None, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, 1, None, None, None, 0, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, 1, None, None, None, 4, 17, 1, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, 1, None, None, None, 4, 1, 65, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, -1, None, None, None, 4, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [7, None, 1, 1, 1, None, None, None, 4, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_grad_q_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 0, 4, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_grad_q_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 1, 4, 1, 1, 1, 65, 1, None]),
        ("ttk_kron_grad_p_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 1, 4, 1, 1, 0, 1, 1, None]),
        ("ttk_kron_grad_p_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 1, 4, 1, 1, 1, 1, 0, None]),
    ],
)  # fmt: skip
def test_launchers_refuse_out_of_range_sizes(lib, name, args):
    assert getattr(lib, name)(*args) == 1  # cudaErrorInvalidValue, before touching any pointer
