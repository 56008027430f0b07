"""The CUDA kernels of csrc/ on the CPU: the host-emulation build (csrc/host_emulation.h) and ``Emulated``, the ops
of csrc/bindings.cpp replayed on CPU tensors with the emulated launchers (outputs filled with NaN before the kernels
write them). Used by tests/test_cuda_emulated.py and the ``cuda-emulated`` runner of tests/test_steps.py.
"""

from __future__ import annotations

import ctypes
import glob
import hashlib
import os
import shutil
import struct
import subprocess

import pytest
import torch

from ttkernels import reference as ref

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

i64, u32, f32, cint, vp = (
    ctypes.c_int64,
    ctypes.c_uint32,
    ctypes.c_float,
    ctypes.c_int,
    ctypes.c_void_p,
)
SIGNATURES = {
    "ttk_shrink_splits": [i64, i64, i64, cint],
    "ttk_shrink_launch": [cint, vp, vp, vp, vp, i64, vp, vp, vp, cint, i64, i64, i64, i64, cint, vp, u32, f32, vp],
    "ttk_grad_dy_slices": [i64, i64, i64, cint],
    "ttk_grad_dy_splits": [i64, i64, i64, cint, cint],
    "ttk_grad_dy_launch": [cint, vp, vp, vp, vp, vp, vp, cint, cint, i64, i64, i64, f32, vp],
    "ttk_token_reduce_splits": [i64, i64, cint],
    "ttk_token_reduce_launch": [cint, vp, vp, vp, i64, vp, i64, cint, i64, i64, i64, cint, vp, u32, f32, vp],
    "ttk_accumulate_launch": [cint, vp, vp, vp, i64, i64, i64, i64, i64, f32, cint, vp, u32, f32, vp],
    "ttk_rowmix_launch": [cint, vp, vp, vp, i64, cint, vp, i64, i64, i64, vp],
    "ttk_finalize_launch": [cint, vp, i64, i64, f32, vp, vp],
    "ttk_dropout_launch": [cint, vp, vp, i64, i64, vp, u32, f32, vp],
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


def build_lib(tmp_path_factory):
    """The emulated kernels as a ctypes library (built once per session and source digest), or a skip."""
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
    if not os.path.exists(out):  # built once per session and source digest, whichever module asks first
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


def fp32(v: float) -> float:
    """v rounded to float32 (the binding's dropout_scale), without a tensor (no host read of one)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def seed_tensor(seed):
    """The seed as the binding takes it: a one-element int64 tensor (the kernels read its 64 bits as uint64)."""
    if isinstance(seed, torch.Tensor):
        assert seed.dtype == torch.int64 and seed.numel() == 1, (seed.dtype, seed.shape)
        return seed
    return torch.tensor(seed, dtype=torch.int64)


def poisoned(*shape, dtype):
    return torch.full(shape, float("nan"), dtype=dtype)


class Emulated:
    """The ops of csrc/bindings.cpp, on CPU tensors, launching the emulated kernels as the binding does."""

    def __init__(self, lib, deterministic=False):
        self.lib, self.det = lib, deterministic

    def _ok(self, err):
        assert err == 0, f"launcher returned cudaError {err}"

    def _drop(self, p, seed):
        """(dropout, seed pointer, threshold, scale) as the binding passes them: the seed as a one-element int64
        tensor (an int is copied into one), which the kernels read; kept alive on ``self`` until the next call."""
        if p == 0:
            return 0, None, 0, 1.0
        self._seed = seed_tensor(seed)
        return 1, ptr(self._seed), ref.dropout_threshold(p), fp32(1.0 / (1.0 - p))

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
                                                    B.shape[1], B.shape[0], scaling, 0, None, 0, 1.0, None))  # fmt: skip
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


class EmulatedBinding:
    """``torch.ops.ttkernels_cuda``'s step ops (the binding's signatures: the seed a one-element int64 tensor, or
    None without dropout) on the emulated kernels, for ``ttkernels._cuda_backend``'s Python layer on the CPU."""

    def __init__(self, emu: Emulated):
        self.emu = emu

    def shrink(self, x, A, C, task_ids, p, seed):
        assert (seed is None) == (p == 0), "the backend layer passes a seed exactly when there is dropout"
        S, U = self.emu.shrink(x, A, C, task_ids, p, seed)
        return S, (x.new_empty(0) if C is None else U)

    def mid(self, S, C, task_ids):
        return self.emu.mid(S, C, task_ids)

    def expand(self, x, weight, bias, U, B, scaling):
        return self.emu.expand(x, weight, bias, U, B, scaling)

    def grad_dy(self, dy, U, B, scaling):
        return self.emu.grad_dy(dy, U, B, scaling)

    def grad_mid(self, S, dU, C, task_ids):
        return self.emu.grad_mid(S, dU, C, task_ids)

    def grad_x(self, dy, weight, dS, A, p, seed):
        assert (seed is None) == (p == 0)
        return self.emu.grad_x(dy, weight, dS, A, p, seed)

    def grad_a(self, x, dS, p, seed):
        assert (seed is None) == (p == 0)
        return self.emu.grad_a(x, dS, p, seed)


def use_emulated_cuda_backend(monkeypatch, lib, deterministic=False):
    """``backend="cuda"`` on CPU tensors through the whole registry (``ttkernels.ops``, ``ttkernels._cuda_backend``)
    with the emulated kernels in place of the extension's ops."""
    from ttkernels import _cuda_backend as cb
    from ttkernels import ops

    binding = EmulatedBinding(Emulated(lib, deterministic))
    monkeypatch.setattr(cb, "_cuda_ops", lambda: binding)
    backend = ops.Backend.from_module("cuda", cb)
    monkeypatch.setattr(ops, "_cuda_backend", lambda device: backend)
    return backend
