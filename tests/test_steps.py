"""Each step of docs/design.md section 2 (shrink and mid, expand, grad_dy, grad_mid, grad_x, grad_a) against the
float64 reference, on every runner of the kernels:

* ``triton``: the Triton backend; on a machine without a GPU in Triton's interpreter (tests/conftest.py sets
  TRITON_INTERPRET=1), where fp16 stands in for bf16 (whose tl.dot the interpreter gets wrong). Outputs are
  poisoned with NaN (``_common.POISON``); expand and grad_x run under both base-GEMM plans.
* ``cuda-emulated``: the CUDA kernels of csrc/ compiled for the CPU (csrc/host_emulation.h, tests/cuda_emulation.py),
  launched as csrc/bindings.cpp launches them, outputs poisoned; skipped on a machine with a GPU.
* ``cuda``: the extension's ops on a GPU (``backend="cuda"``), outputs poisoned by the binding; skipped without one.

Each runner keeps its own shapes (awkward ones everywhere: no token, one token, primes, per-bond ranks, every rank
bucket of the runner), dtypes, dropout seeds and reductions (atomic and deterministic, torch's deterministic mode).
Accuracy rule (per dtype, tests/helpers.check_error_ratio): a kernel's largest error against float64 may be at
most 4x that of the torch backend computing the same thing in the same dtype, plus a small absolute slack.
The emulated grad_mid matrix keeps its fast/slow split (``make test`` runs the reduced one).
"""

from __future__ import annotations

import importlib
import itertools
import os

import pytest
import torch

import helpers
from cuda_emulation import Emulated, build_lib
from helpers import check_error_ratio as check

CUDA = torch.cuda.is_available()
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
KINDS = ["none", "shared", "task"]
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

# (M, d_in, d_out, ra, rb) per runner. Triton (the interpreter is slow): empty, one token, primes, per-bond ranks.
# Emulated: also the rank buckets and several row blocks. GPU: also every rank bucket and a long K loop.
SHAPES = {
    "triton": [(0, 13, 11, 3, 3), (1, 13, 11, 1, 1), (7, 29, 31, 5, 3), (37, 23, 17, 16, 19)],
    "cuda-emulated": [(0, 13, 11, 3, 3), (1, 13, 11, 1, 1), (7, 29, 31, 5, 3), (37, 67, 131, 16, 19),
                      (71, 37, 41, 33, 64), (13, 23, 19, 128, 100), (97, 70, 45, 8, 8)],
    "cuda": [(0, 13, 11, 3, 3), (1, 13, 11, 1, 1), (7, 29, 31, 5, 3), (37, 67, 131, 16, 19), (97, 131, 67, 33, 64),
             (61, 257, 263, 128, 100), (1031, 509, 521, 8, 8)],
}  # fmt: skip
# shrink's extra shapes (M, d_in, ra, rb) on the CUDA runners, for the tensor-core tiles (fp16 / bf16) and the FMA tiles
# (fp32): one token, primes, d_in a multiple of 8 but not of 16 (16-byte loads of x, a half-empty 16-column step) or
# odd, ranks 1, 3, 16, 17, 64 and 128 (rows of A that allow 16-byte loads and rows that do not), several row blocks,
# split-K at decode and with a short last K range.
SHRINK_EXTRA = [(1, 40, 17, 3), (131, 72, 64, 17), (29, 136, 128, 64), (17, 61, 3, 1), (5, 16, 16, 16),
                (257, 24, 1, 5), (1, 1000, 17, 3), (7, 264, 64, 128)]  # fmt: skip
SHRINK_SHAPES = {"triton": [], "cuda-emulated": SHRINK_EXTRA, "cuda": SHRINK_EXTRA}
# grad_a's extra shapes: many token ranges (several row splits); on Triton also 4 row blocks (the interpreter's 16
# rows) in 3 ranges of 2 blocks, the last one empty (its program sums nothing and must add or write zeros)
GRAD_A_EXTRA = {
    "triton": [(97, 21, 5, 4, 4), (53, 21, 5, 4, 4)],
    "cuda-emulated": [(1100, 20, 5, 4, 4)],
    "cuda": [(4099, 64, 64, 16, 16)],
}
DTYPES = {"triton": TRITON_DTYPES, "cuda-emulated": ALL_DTYPES, "cuda": ALL_DTYPES}
RUNNERS = list(SHAPES)
PLANS = {"triton": ["fused", "cublas"], "cuda-emulated": [None], "cuda": [None]}


def _emulated_grad_mid_fast(det, shape, kind, dtype):
    """The fast suite: every case below rank 33; at ranks 33 and 128 (seconds each), each kind and reduction
    once in one of the dtypes, so every dtype still meets the large ranks."""
    return max(shape[3:]) < 33 or dtype == ALL_DTYPES[(KINDS.index(kind) + det) % len(ALL_DTYPES)]


def cases(names: str, axes, fast=None):
    """``parametrize("runner," + names)`` over each runner's own axes (``axes(runner)`` -> list of value lists);
    a case for which ``fast(runner, *values)`` is false is marked slow."""
    params = []
    for runner in RUNNERS:
        for values in itertools.product(*axes(runner)):
            slow = fast is not None and not fast(runner, *values)
            params.append(pytest.param(runner, *values, marks=pytest.mark.slow if slow else ()))
    return pytest.mark.parametrize("runner," + names, params, ids=helpers.case_id)


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_lib(tmp_path_factory)


class Run:
    """One runner set up for one test: the step functions, where inputs live, how they are drawn."""

    def __init__(self, runner: str, request, monkeypatch, deterministic: bool = False, plan=None):
        self.runner, self.device, self.run = runner, "cpu", 1
        if runner == "triton":
            self.ops = _triton(monkeypatch, plan)
            self.device = "cuda" if CUDA else "cpu"
        elif runner == "cuda-emulated":
            self.ops = Emulated(request.getfixturevalue("lib"), deterministic)
            self.run = 3
        else:
            self.ops = _cuda(request)
            self.device, self.run = "cuda", 3
        if runner != "cuda-emulated":  # the kernels read torch's deterministic mode
            old = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(deterministic, warn_only=True)
            request.addfinalizer(lambda: torch.use_deterministic_algorithms(old))

    def rnd(self, *shape, **kw):
        return helpers.rnd(*shape, device=self.device, **kw)

    def middle(self, kind, ra, rb, n_tasks, dtype, m):
        return helpers.random_middle(kind, ra, rb, n_tasks, dtype, m, device=self.device, run=self.run)

    def seed(self, fixed: int) -> int:
        """Triton's tests keep fixed seeds; the CUDA kernels get a new one each run (replayable: conftest.py)."""
        return fixed if self.runner == "triton" else int(torch.randint(0, 2**62, ()).item())

    def both(self, fn_name, *args):
        """(runner's result, float64 reference on the CPU, torch backend in the inputs' dtype)."""
        return helpers.against_reference(self.ops, fn_name, *args)


def _triton(monkeypatch, plan):
    try:
        tb = importlib.import_module("ttkernels._triton_kernels.backend")
        _common = importlib.import_module("ttkernels._triton_kernels._common")
    except ImportError as err:
        pytest.skip(f"triton does not import: {err}")
    # conftest.py turns the interpreter on where there is no GPU, so these tests never skip.
    assert CUDA or _common.INTERPRET, "Triton kernels need a CUDA GPU or TRITON_INTERPRET=1"
    monkeypatch.setattr(_common, "POISON", True)
    if plan is not None:
        monkeypatch.setattr(tb, "BASE_GEMM", plan)
    return tb


def _cuda(request):
    if not CUDA:
        pytest.skip("needs a CUDA GPU")
    from ttkernels import _cuda_backend as cb
    from ttkernels import _ext

    try:
        cb.load()
    except _ext.CUDAExtensionNotBuiltError as e:
        if os.environ.get("TTKERNELS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"TTKERNELS_REQUIRE_CUDA_EXT=1 but the CUDA extension does not load: {e}")
        pytest.skip(f"CUDA extension not built (set TTKERNELS_REQUIRE_CUDA_EXT=1 to fail instead): {e}")
    ext = torch.ops.ttkernels_cuda
    old = ext.set_poison(True)
    request.addfinalizer(lambda: ext.set_poison(old))
    return cb


def _check_shrink(run, m, d_in, ra, rb, kind, p, dtype, tasks, seed):
    rb = ra if kind == "none" else rb
    x, A = run.rnd(m, d_in, dtype=dtype), run.rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5)
    C, ids = run.middle(kind, ra, rb, tasks, dtype, m)
    (S, U), (S64, U64), (St, Ut) = run.both("shrink", x, A, C, ids, p, run.seed(seed))
    check("S", S, S64, St, dtype)
    check("U", U, U64, Ut, dtype)
    return S, C, ids


@cases("shape,kind,p,dtype", lambda r: [SHAPES[r], KINDS, [0.0, 0.3], DTYPES[r]])
def test_shrink_and_mid(runner, shape, kind, p, dtype, request, monkeypatch):
    run = Run(runner, request, monkeypatch)
    m, d_in, _, ra, rb = shape
    S, C, ids = _check_shrink(run, m, d_in, ra, rb, kind, p, dtype, 4, 1234)
    U2, U64b, Utb = run.both("mid", S, C, ids)
    check("mid", U2, U64b, Utb, dtype)


@cases("shape,kind,p,dtype", lambda r: [SHRINK_SHAPES[r], KINDS, [0.0, 0.3], DTYPES[r]])
def test_shrink_tiles(runner, shape, kind, p, dtype, request, monkeypatch):
    _check_shrink(Run(runner, request, monkeypatch), *shape, kind, p, dtype, 3, 4321)


@cases("shape,bias,dtype,plan", lambda r: [SHAPES[r], [True, False], DTYPES[r], PLANS[r]])
def test_expand(runner, shape, bias, dtype, plan, request, monkeypatch):
    run = Run(runner, request, monkeypatch, plan=plan)
    m, d_in, d_out, _, rb = shape
    x, W = run.rnd(m, d_in, dtype=dtype), run.rnd(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    b = run.rnd(d_out, dtype=dtype) if bias else None
    U, B = run.rnd(m, rb, dtype=dtype), run.rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    y, y64, yt = run.both("expand", x, W, b, U, B, 0.75)
    check("y", y, y64, yt, dtype)


@cases("shape,det,dtype", lambda r: [SHAPES[r], [False, True], DTYPES[r]])
def test_grad_dy(runner, shape, det, dtype, request, monkeypatch):
    run = Run(runner, request, monkeypatch, deterministic=det)
    m, _, d_out, _, rb = shape
    dy, U = run.rnd(m, d_out, dtype=dtype), run.rnd(m, rb, dtype=dtype)
    B = run.rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    (dU, dB), (dU64, dB64), (dUt, dBt) = run.both("grad_dy", dy, U, B, 0.5)
    check("dU", dU, dU64, dUt, dtype)
    check("dB", dB, dB64, dBt, dtype)


@cases(
    "det,shape,kind,dtype",
    lambda r: [[False, True], SHAPES[r], KINDS, DTYPES[r]],
    fast=lambda r, *v: r != "cuda-emulated" or _emulated_grad_mid_fast(*v),
)
def test_grad_mid(runner, shape, kind, det, dtype, request, monkeypatch):
    run = Run(runner, request, monkeypatch, deterministic=det)
    m, _, _, ra, rb = shape
    rb = ra if kind == "none" else rb
    C, ids = run.middle(kind, ra, rb, 5, dtype, m)
    S, dU = run.rnd(m, ra, dtype=dtype), run.rnd(m, rb, dtype=dtype)
    (dS, dC), (dS64, dC64), (dSt, dCt) = run.both("grad_mid", S, dU, C, ids)
    check("dS", dS, dS64, dSt, dtype)
    check("dC", dC, dC64, dCt, dtype)


@cases("shape,p,dtype,plan", lambda r: [SHAPES[r], [0.0, 0.3], DTYPES[r], PLANS[r]])
def test_grad_x(runner, shape, p, dtype, plan, request, monkeypatch):
    run = Run(runner, request, monkeypatch, plan=plan)
    m, d_in, d_out, ra, _ = shape
    dy, W = run.rnd(m, d_out, dtype=dtype), run.rnd(d_out, d_in, dtype=dtype, scale=d_out**-0.5)
    dS, A = run.rnd(m, ra, dtype=dtype), run.rnd(d_in, ra, dtype=dtype, scale=ra**-0.5)
    dx, dx64, dxt = run.both("grad_x", dy, W, dS, A, p, run.seed(99))
    check("dx", dx, dx64, dxt, dtype)


@cases("shape,p,det,dtype", lambda r: [[*SHAPES[r], *GRAD_A_EXTRA[r]], [0.0, 0.3], [False, True], DTYPES[r]])
def test_grad_a(runner, shape, p, det, dtype, request, monkeypatch):
    run = Run(runner, request, monkeypatch, deterministic=det)
    m, d_in, _, ra, _ = shape
    x, dS = run.rnd(m, d_in, dtype=dtype), run.rnd(m, ra, dtype=dtype)
    dA, dA64, dAt = run.both("grad_a", x, dS, p, run.seed(99))
    check("dA", dA, dA64, dAt, dtype)
