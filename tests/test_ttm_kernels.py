"""The fused TT-matrix (Kronecker-sum) kernels of the Triton backend against the float64 reference.

Without a GPU the kernels run in Triton's interpreter (conftest.py), where fp16 stands in for bf16; on a GPU
the same tests run compiled kernels, bf16 included, plus the real shape of the benchmark target. Every kernel
output is filled with NaN before the kernels write it. Accuracy rule as in tests/test_triton.py: at most 4x
the error of torch computing the same thing in the same dtype (plus a small slack).
"""

from __future__ import annotations

import math

import pytest
import torch

import helpers
from helpers import check_error_ratio as check
from ttkernels import ttm
from ttkernels.ttm import TTMLinear, TTMSpec, ttm_apply

pytest.importorskip("ttkernels._triton_kernels.backend")
from ttkernels._triton_kernels import _common
from ttkernels._triton_kernels import ttm as K

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
assert CUDA or _common.INTERPRET, "Triton kernels need a CUDA GPU or TRITON_INTERPRET=1"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def rnd(*shape, dtype=torch.float32):
    return helpers.rnd(*shape, dtype=dtype, device=DEVICE)


def d64(t):
    return t.double().cpu()


# (M, NI, NJ, NA, NC, R): empty batch, one token, primes, several token splits (M = 150: 3 splits of 64 rows on
# the interpreter's 4 "SMs"), the largest kept side (128), and c / j wider than one tile.
KRON_SHAPES = [
    (0, 3, 7, 5, 11, 2),
    (1, 16, 20, 16, 33, 1),
    (7, 5, 13, 3, 37, 3),
    (150, 3, 5, 2, 7, 2),
    (3, 2, 3, 128, 5, 1),
    (2, 128, 3, 2, 4, 1),
]


@helpers.matrix(
    "transposed,dtype,shape",
    [False, True],
    DTYPES,
    KRON_SHAPES,
    # the fast suite: the 150-token shape (seconds a case in the interpreter) once, x contiguous, float32
    fast=lambda transposed, dtype, shape: shape[0] < 100 or (not transposed and dtype == torch.float32),
    ids=lambda v: {False: "x", True: "xT"}.get(v) if isinstance(v, bool) else helpers.case_id(v),
)
def test_kron_kernels_against_float64(shape, dtype, transposed):
    M, NI, NJ, NA, NC, R = shape
    x3 = rnd(M, NJ, NI, dtype=dtype).transpose(1, 2) if transposed else rnd(M, NI, NJ, dtype=dtype)
    q, p, dy3 = rnd(R, NA, NI, dtype=dtype), rnd(R, NJ, NC, dtype=dtype), rnd(M, NA, NC, dtype=dtype)
    x64, q64, p64, dy64 = d64(x3), d64(q), d64(p), d64(dy3)
    xc, qc, pc, dyc = x3.cpu(), q.cpu(), p.cpu(), dy3.cpu()  # torch in the same dtype: the error baseline

    check("y", K.kron_apply(x3, q, p), ttm.kron_apply_ref(x64, q64, p64), ttm.kron_apply_ref(xc, qc, pc), dtype)
    # dx is the forward with both factors transposed
    qt, pt = q.transpose(1, 2).contiguous(), p.transpose(1, 2).contiguous()
    dx = K.kron_apply(dy3, qt, pt)
    check("dx", dx, ttm.kron_apply_ref(dy64, d64(qt), d64(pt)), ttm.kron_apply_ref(dyc, qt.cpu(), pt.cpu()), dtype)
    dq, dp = K.kron_grad_q(dy3, x3, p, q), K.kron_grad_p(dy3, x3, p, q)
    check("dq", dq, ttm.kron_grad_q_ref(dy64, x64, p64), ttm.kron_grad_q_ref(dyc, xc, pc).float(), torch.float32)
    check("dp", dp, ttm.kron_grad_p_ref(dy64, x64, q64), ttm.kron_grad_p_ref(dyc, xc, qc).float(), torch.float32)
    if M == 0:
        assert not dq.any() and not dp.any()


def test_output_view_is_written_through_its_strides():
    x3, q, p = rnd(5, 3, 4), rnd(2, 6, 3), rnd(2, 4, 7)
    out = torch.full((5, 7 * 6), float("nan"), device=DEVICE)
    view = out.view(5, 7, 6).transpose(1, 2)  # (M, NA, NC) with NA fastest
    K.kron_apply(x3, q, p, view)
    torch.testing.assert_close(d64(view), ttm.kron_apply_ref(d64(x3), d64(q), d64(p)), rtol=1e-5, atol=1e-5)


def test_reductions_repeat_bit_for_bit():
    x3, q, p, dy = rnd(150, 5, 6), rnd(2, 3, 5), rnd(2, 6, 4), rnd(150, 3, 4)
    assert torch.equal(K.kron_grad_q(dy, x3, p, q), K.kron_grad_q(dy, x3, p, q))
    assert torch.equal(K.kron_grad_p(dy, x3, p, q), K.kron_grad_p(dy, x3, p, q))


def test_kernel_arguments_are_checked():
    x3, q, p = rnd(2, 3, 4), rnd(1, 5, 3), rnd(1, 4, 6)
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        K.kron_apply(x3.double(), q.double(), p.double())
    with pytest.raises(TypeError, match="q has dtype"):
        K.kron_apply(x3, q.half(), p)
    with pytest.raises(ValueError, match="p must be contiguous"):
        K.kron_apply(x3, q, rnd(1, 6, 4).transpose(1, 2))
    with pytest.raises(ValueError, match="at most 128"):
        K.kron_apply(rnd(2, 129, 4), rnd(1, 5, 129), p)


# ------------------------------------------------------------------------------------------------ ttm_apply
SPECS = [
    TTMSpec((3, 4), (2, 5), (3,)),  # two cores: the Kronecker sum itself
    TTMSpec((2, 3, 2), (3, 2, 5), (2, 3)),  # three cores, primes
    TTMSpec((2, 2, 3, 2), (2, 3, 2, 2), (2, 1, 3)),  # four cores, a bond of rank 1
]


def _inputs(spec, M, dtype):
    x = rnd(M, spec.in_features, dtype=dtype)
    cores = [rnd(*s) / math.sqrt(s[0] * s[2]) for s in spec.core_shapes]
    return x, cores


def _grads(x, cores, backend, dy, scaling=0.7):
    x = x.detach().requires_grad_()
    cores = [c.detach().requires_grad_() for c in cores]
    y = ttm_apply(x, cores, scaling=scaling, backend=backend)
    return (y, *torch.autograd.grad(y, (x, *cores), dy))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("M", [0, 1, 11])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ttm_apply_triton_forward_backward(spec, M, dtype):
    x, cores = _inputs(spec, M, dtype)
    dy = rnd(M, spec.out_features, dtype=dtype)
    got = _grads(x, cores, "triton", dy)
    want = _grads(d64(x), [d64(c) for c in cores], "torch", d64(dy))
    base = _grads(x.cpu(), [c.cpu() for c in cores], "torch", dy.cpu())
    for name, g, w, b in zip(["y", "dx"] + [f"dG{k}" for k in range(len(cores))], got, want, base):
        check(name, g, w, b, g.dtype)


def test_kronecker_adapter_on_triton():
    """Two cores of bond rank 1 are a Kronecker-product adapter: y = x (A kron B)^T."""
    A, B = rnd(3, 4), rnd(5, 2)
    x = rnd(6, 8)
    y = ttm_apply(x, [A.reshape(1, 3, 4, 1), B.reshape(1, 5, 2, 1)], backend="triton")
    torch.testing.assert_close(d64(y), d64(x) @ torch.kron(d64(A), d64(B)).t(), rtol=1e-5, atol=1e-5)


def test_staged_plan_where_no_cut_fits():
    """No cut keeps the second factor within 128 per side: backend='triton' runs the staged sweep, same result."""
    spec = TTMSpec((2, 130), (130, 2), (2,))
    assert ttm.choose_split(spec) is None
    x, cores = _inputs(spec, 3, torch.float32)
    torch.testing.assert_close(ttm_apply(x, cores, backend="triton"), ttm_apply(x, cores, backend="torch"))


def test_saved_activations_are_x_only():
    spec = TTMSpec((4, 4, 4), (4, 4, 4), (3, 3))
    x, cores = _inputs(spec, 32, torch.float32)
    x.requires_grad_()
    cores = [c.requires_grad_() for c in cores]
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ttm_apply(x, cores, backend="triton")
    per_token = sum(t.numel() * t.element_size() for t in saved if t.dim() >= 2 and t.shape[0] == 32)
    token_independent = sum(t.numel() * t.element_size() for t in saved if not (t.dim() >= 2 and t.shape[0] == 32))
    assert per_token <= 1.1 * x.numel() * x.element_size()
    q, p = ttm.kron_factors(cores, ttm.choose_split(spec))
    assert token_independent <= 4 * (q.numel() + p.numel() + sum(c.numel() for c in cores))  # factors, merges


# 30 steps take about 30 s in the interpreter: the fast suite takes the first few (a fixed seed, so the
# same losses every run)
@pytest.mark.parametrize("steps", [4, pytest.param(30, marks=pytest.mark.slow)])
def test_ttmlinear_trains_on_triton(steps):
    torch.manual_seed(0)
    layer = TTMLinear(12, 12, in_modes=(3, 4), out_modes=(4, 3), ranks=3, backend="triton").to(DEVICE)
    target = torch.nn.Linear(12, 12).to(DEVICE)
    opt = torch.optim.Adam(layer.cores.parameters(), lr=0.05)
    x = rnd(64, 12)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(layer(x), target(x).detach())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


@pytest.mark.skipif(not CUDA, reason="the target shape needs a GPU (the interpreter is far too slow for it)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_target_shape_on_gpu(dtype, monkeypatch):
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    spec = TTMSpec.linear(4096, 4096, in_modes=3, ranks=8)
    x, cores = _inputs(spec, 512, dtype)
    dy = rnd(512, spec.out_features, dtype=dtype)
    got = _grads(x, cores, "triton", dy)
    want = _grads(d64(x), [d64(c) for c in cores], "torch", d64(dy))
    base = _grads(x, cores, "torch", dy)
    for name, g, w, b in zip(["y", "dx", "dG0", "dG1", "dG2"], got, want, base):
        check(name, g, w, b, g.dtype)


@pytest.mark.skipif(not CUDA, reason="the measured dispatch times kernels on a GPU")
def test_auto_dispatch_measures_once_and_matches(monkeypatch):
    monkeypatch.setattr(ttm.dispatch, "cache", {})
    spec = TTMSpec.linear(256, 256, in_modes=2, ranks=4)
    x, cores = _inputs(spec, 64, torch.bfloat16)
    choice = ttm.ttm_dispatch(spec, 64, torch.bfloat16, DEVICE)
    assert choice in ("triton", "cuda", "dense") and len(ttm.dispatch.cache) == 1
    assert ttm.ttm_dispatch(spec, 60, torch.bfloat16, DEVICE) == choice  # same bucket, cached
    check("y", ttm_apply(x, cores, backend="auto"), d64(ttm_apply(d64(x), [d64(c) for c in cores])),
          ttm_apply(x, cores, backend="torch"), torch.bfloat16)  # fmt: skip


def test_same_outputs_as_tensorly_torch_block_tt():
    helpers.require("tltorch")
    from bench.ttm import tltorch_layer

    spec = TTMSpec((5, 4), (4, 6), (3,))
    x, cores = _inputs(spec, 7, torch.float32)
    with torch.no_grad():
        want = tltorch_layer(spec, cores, DEVICE)(x)
    torch.testing.assert_close(ttm_apply(x, cores, backend="triton"), want, rtol=1e-4, atol=1e-4)
