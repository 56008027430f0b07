"""The Triton backend against the float64 reference, step by step and fused, forward and backward.

On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1 before they are imported); there, fp16 stands in for bf16, whose tl.dot the interpreter
gets wrong. On a GPU the same tests run compiled kernels on CUDA tensors, bf16 included, plus a few real
shapes. Every kernel output is filled with NaN before the kernels write it (``_common.POISON``).

Accuracy rule (per dtype): a kernel's largest error against float64 may be at most 4x that of the torch
backend computing the same thing in the same dtype, plus a small absolute slack for near-exact results.
"""

from __future__ import annotations

import pytest
import torch

import helpers
import ttkernels as tk
from helpers import check_error_ratio as check
from helpers import metatt_spec, random_cores
from ttkernels import reference as ref

tb = pytest.importorskip("ttkernels._triton_kernels.backend")
from ttkernels._triton_kernels import _common  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])

# conftest.py turns the interpreter on where there is no GPU, so these tests never skip.
assert CUDA or _common.INTERPRET, "Triton kernels need a CUDA GPU or TRITON_INTERPRET=1"


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


@pytest.fixture(params=["fused", "cublas"])
def plan(request, monkeypatch):
    monkeypatch.setattr(tb, "BASE_GEMM", request.param)
    return request.param


def rnd(*shape, **kw):
    return helpers.rnd(*shape, device=DEVICE, **kw)


def both(fn_name, *args):
    return helpers.against_reference(tb, fn_name, *args)


def middle(kind, ra, rb, T, dtype, M):
    return helpers.random_middle(kind, ra, rb, T, dtype, M, device=DEVICE)


SHAPES = [(0, 13, 11, 3, 3), (1, 13, 11, 1, 1), (7, 29, 31, 5, 3), (37, 23, 17, 16, 19)]


# ----------------------------------------------------------------------------------------- dropout hash
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
@pytest.mark.parametrize("p", [0.1, 0.9])
def test_keep_mask_is_the_reference_hash_bit_for_bit(seed, p):
    for rows, cols, offset in [(1, 1, 0), (37, 29, 0), (19, 70, 1000), (5, 3, 2**31 + 3)]:
        mask = _common.keep_mask_tensor(seed, rows, cols, p, row_offset=offset, device=DEVICE).cpu()
        assert torch.equal(mask, ref.dropout_keep(seed, rows, cols, p, row_offset=offset))


@pytest.mark.parametrize("p", [0.1, 0.7])
def test_keep_mask_keeps_one_minus_p(p):
    kept = _common.keep_mask_tensor(12345, 128, 160, p, device=DEVICE).float().mean().item()
    assert abs(kept - (1 - p)) < 0.02  # 20480 draws: 5 standard deviations


# ------------------------------------------------------------------------------------------ each step
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "shared", "task"])
@pytest.mark.parametrize("M,d_in,d_out,ra,rb", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_and_mid(M, d_in, d_out, ra, rb, kind, p, dtype):
    rb = ra if kind == "none" else rb
    x, A = rnd(M, d_in, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5)
    C, ids = middle(kind, ra, rb, 4, dtype, M)
    (S, U), (S64, U64), (St, Ut) = both("shrink", x, A, C, ids, p, 1234)
    check("S", S, S64, St, dtype)
    check("U", U, U64, Ut, dtype)
    U2, U64b, Utb = both("mid", S, C, ids)
    check("mid", U2, U64b, Utb, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,d_in,d_out,ra,rb", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_expand(M, d_in, d_out, ra, rb, bias, dtype, plan):
    x, W = rnd(M, d_in, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    b = rnd(d_out, dtype=dtype) if bias else None
    U, B = rnd(M, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    y, y64, yt = both("expand", x, W, b, U, B, 0.75)
    check("y", y, y64, yt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,d_in,d_out,ra,rb", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_dy(M, d_in, d_out, ra, rb, dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_common, "deterministic", lambda: deterministic)
    dy, U, B = rnd(M, d_out, dtype=dtype), rnd(M, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    (dU, dB), (dU64, dB64), (dUt, dBt) = both("grad_dy", dy, U, B, 0.5)
    check("dU", dU, dU64, dUt, dtype)
    check("dB", dB, dB64, dBt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "shared", "task"])
@pytest.mark.parametrize("M,d_in,d_out,ra,rb", SHAPES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_mid(M, d_in, d_out, ra, rb, kind, dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_common, "deterministic", lambda: deterministic)
    rb = ra if kind == "none" else rb
    C, ids = middle(kind, ra, rb, 5, dtype, M)
    S, dU = rnd(M, ra, dtype=dtype), rnd(M, rb, dtype=dtype)
    (dS, dC), (dS64, dC64), (dSt, dCt) = both("grad_mid", S, dU, C, ids)
    check("dS", dS, dS64, dSt, dtype)
    check("dC", dC, dC64, dCt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,d_in,d_out,ra,rb", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_grad_x(M, d_in, d_out, ra, rb, p, dtype, plan):
    dy, W = rnd(M, d_out, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_out**-0.5)
    dS, A = rnd(M, ra, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=ra**-0.5)
    dx, dx64, dxt = both("grad_x", dy, W, dS, A, p, 99)
    check("dx", dx, dx64, dxt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,d_in,d_out,ra,rb", SHAPES + [(97, 21, 5, 4, 4)])
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("deterministic", [False, True])
def test_grad_a(M, d_in, d_out, ra, rb, p, dtype, deterministic, monkeypatch):
    monkeypatch.setattr(_common, "deterministic", lambda: deterministic)
    x, dS = rnd(M, d_in, dtype=dtype), rnd(M, ra, dtype=dtype)
    dA, dA64, dAt = both("grad_a", x, dS, p, 99)
    check("dA", dA, dA64, dAt, dtype)


def test_deterministic_mode_repeats_bit_for_bit():
    torch.use_deterministic_algorithms(True)
    try:
        first, again = helpers.reductions_twice(tb, rnd, middle)
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


# -------------------------------------------------------------------------------- fused op, autograd
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec_name", sorted(helpers.FUSED_SPECS))
@pytest.mark.parametrize("M", [0, 1, 13])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_tt_linear_forward_backward(spec_name, M, dropout, dtype, plan):
    make, index = helpers.FUSED_SPECS[spec_name]
    case = helpers.TTLinearCase(make(), index, M)
    kw = dict(scaling=0.5, dropout=dropout, seed=4321)
    got = case.run("triton", dtype, DEVICE, **kw)
    want64 = case.run("torch", torch.float64, "cpu", **kw)
    torch_lowp = case.run("torch", dtype, DEVICE, **kw)
    for name, g, w, t in zip(case.names(), got, want64, torch_lowp):
        check(name, g, w, t, dtype)


def test_ttlinear_module_trains_with_triton():
    torch.manual_seed(0)
    layer = tk.TTLinear(24, 20, ranks=4, in_modes=(4, 6), out_modes=(5, 4), dropout=0.1, backend="triton")
    for core in layer.cores:
        torch.nn.init.normal_(core, std=0.3)  # a non-zero delta-W
    twin = tk.TTLinear(24, 20, ranks=4, in_modes=(4, 6), out_modes=(5, 4), dropout=0.1, backend="torch")
    twin.load_state_dict(layer.state_dict())
    layer.to(DEVICE)
    twin.to(DEVICE)
    x = torch.randn(3, 5, 24, device=DEVICE)
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    y2 = twin(x)  # the same seed draw: the same dropout mask
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    y.square().mean().backward()
    y2.square().mean().backward()
    for a, b in zip(layer.cores, twin.cores):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_saved_activations_are_x_plus_m_times_r(dropout):
    from test_memory import per_token_ratio

    d, r = 128, 16
    for kw in (dict(ranks=r), dict(in_modes=2, out_modes=2, ranks=r)):
        layer = tk.TTLinear(d, d, dropout=dropout, backend="triton", **kw).to(DEVICE).train()
        ratio = per_token_ratio(layer, lambda M: torch.randn(M, d, device=DEVICE, requires_grad=True), 8, 40, d)
        assert 1.0 <= ratio <= 1 + r / d + 1e-9, ratio


# ---------------------------------------------------------------------------------------- bad input
def test_triton_backend_refuses_what_it_cannot_run(monkeypatch):
    x, W = rnd(3, 8), rnd(6, 8)
    A, B = rnd(8, 129), rnd(129, 6)
    with pytest.raises(ValueError, match="backend='triton' supports ranks up to 128, but r_a = 129"):
        tk.tt_adapter(x, W, None, A, None, B, backend="triton")
    with pytest.raises(
        TypeError, match=r"backend=.triton. computes in float32, bfloat16 or float16, not torch\.float64"
    ):
        tk.tt_adapter(x.double(), W.double(), None, A[:, :4].double(), None, B[:4].double(), backend="triton")
    monkeypatch.setattr(tb, "BASE_GEMM", "magic")
    with pytest.raises(ValueError, match="TTKERNELS_TRITON_BASE_GEMM must be 'fused' or 'cublas', got 'magic'"):
        tk.tt_adapter(x, W, None, A[:, :4], None, B[:4], backend="triton")


def test_triton_on_cpu_without_the_interpreter_is_refused(monkeypatch):
    monkeypatch.setattr(tb, "INTERPRET", False)
    x = torch.randn(3, 8)
    with pytest.raises(tk.BackendUnavailableError, match="backend='triton' runs on CUDA tensors, but x is on cpu"):
        tk.tt_adapter(x, torch.randn(6, 8), None, torch.randn(8, 2), None, torch.randn(2, 6), backend="triton")


# ----------------------------------------------------------------------------------- GPU, real shapes
@pytest.mark.skipif(not CUDA, reason="real shapes need a GPU (the interpreter is far too slow for them)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [1, 64, 4099])
def test_real_shapes_on_gpu(M, dtype, plan, monkeypatch):
    monkeypatch.setattr(_common, "AUTOTUNE", True)
    spec = metatt_spec(4096, 4096, 4, 4, 16, tasks=3)
    torch.manual_seed(0)
    cores64 = [c.cuda() for c in random_cores(spec)]
    x = torch.randn(M, 4096, device="cuda", dtype=torch.float64)
    W = torch.randn(4096, 4096, device="cuda", dtype=torch.float64) / 64
    ids = torch.randint(0, 3, (M,), device="cuda")
    dy = torch.randn(M, 4096, device="cuda", dtype=torch.float64)
    kw = dict(index={"layer": 1, "matrix": 2}, task_ids=ids, scaling=2.0, dropout=0.1, seed=7)

    def run(backend, dt):
        xx = x.to(dt).clone().requires_grad_()
        cores = [c.to(dt).clone().requires_grad_() for c in cores64]
        y = tk.tt_linear(xx, W.to(dt), None, cores, spec, backend=backend, **kw)
        y.backward(dy.to(dt))
        return [y, xx.grad, *[c.grad for c in cores]]

    for name, g, w, t in zip(
        ["y", "dx", "d0", "d1", "d2", "d3", "d4"],
        run("triton", dtype),
        run("torch", torch.float64),
        run("torch", dtype),
    ):
        check(name, g, w, t, dtype)
