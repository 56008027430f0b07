"""The Triton backend against the float64 reference, fused, forward and backward (the steps one by one:
tests/test_steps.py, runner ``triton``).

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


def middle(kind, ra, rb, T, dtype, M):
    return helpers.random_middle(kind, ra, rb, T, dtype, M, device=DEVICE)


# ----------------------------------------------------------------------------------------- dropout hash
@pytest.mark.parametrize("seed", [0, 7, 2**32 + 5, 2**63 - 1])
@pytest.mark.parametrize("p", [0.1, 0.9])
def test_keep_mask_is_the_reference_hash_bit_for_bit(seed, p):
    for rows, cols, offset in [(1, 1, 0), (37, 29, 0), (19, 70, 1000), (5, 3, 2**31 + 3)]:
        mask = _common.keep_mask_tensor(seed, rows, cols, p, row_offset=offset, device=DEVICE).cpu()
        assert torch.equal(mask, ref.dropout_keep(seed, rows, cols, p, row_offset=offset))


# Seeds at the edges of both 32-bit words, a fresh one, and a negative seed tensor (its bits hashed as uint64, as
# the reference hashes a seed tensor: the kernels cannot refuse it; tt_adapter does, with torch._assert_async).
EDGE_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, "random", "negative tensor"]


@pytest.mark.parametrize("seed", EDGE_SEEDS)
def test_every_kernel_with_dropout_loads_the_seed_it_is_given(seed, monkeypatch):
    """Every Triton kernel with dropout (shrink, its split-K partials, the GEMM of grad_x in both plans, grad_a,
    the cublas plan's row kernels forward and backward) loads the seed tensor it is given and hashes it to
    ``reference.dropout_keep``'s mask, bit for bit; an int seed gives the mask of its value."""
    if seed == "random":
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
    elif seed == "negative tensor":
        seed = torch.tensor(-(2**33) - 5)
    m, n, p = 5, 70, 0.45  # 70 columns at 5 tokens: shrink splits K in the interpreter's tiles
    keep = ref.dropout_keep(seed, m, n, p).to(DEVICE)
    seed_t = (seed if isinstance(seed, torch.Tensor) else torch.tensor(seed)).to(DEVICE)
    x, eye = torch.ones(m, n, device=DEVICE), torch.eye(n, device=DEVICE)
    zeros = torch.zeros(n, n, device=DEVICE)
    from ttkernels._triton_kernels import shrink as shrink_mod

    for split in (1, 2):
        monkeypatch.setattr(shrink_mod, "split_k", lambda M, K, device, s=split: s)
        for given in (seed, seed_t):
            assert torch.equal(tb.shrink(x, eye, None, None, p, given)[0] != 0, keep), (split, given)
    for plan in ("fused", "cublas"):
        monkeypatch.setattr(tb, "BASE_GEMM", plan)
        dx = tb.grad_x(torch.zeros(m, n, device=DEVICE), zeros, x, eye, p, seed_t)
        assert torch.equal(dx != 0, keep), plan
    assert torch.equal(tb.grad_a(x, torch.eye(m, device=DEVICE), p, seed_t).t() != 0, keep)
    monkeypatch.setattr(tb, "BASE_GEMM", "cublas")
    y, S = tb.forward(x, zeros, None, eye, None, eye, None, 1.0, p, seed_t)
    assert torch.equal(S != 0, keep) and torch.equal(y != 0, keep)
    dx = tb.backward(x, x, zeros, eye, None, eye, S, None, 1.0, p, seed_t, True)[0]
    assert torch.equal(dx != 0, keep)


@pytest.mark.parametrize("p", [0.1, 0.7])
def test_keep_mask_keeps_one_minus_p(p):
    kept = _common.keep_mask_tensor(12345, 128, 160, p, device=DEVICE).float().mean().item()
    assert abs(kept - (1 - p)) < 0.02  # 20480 draws: 5 standard deviations


# -------------------------------------------------- deterministic reductions (each step: tests/test_steps.py)
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
    helpers.check_case(case, got, want64, torch_lowp, dtype)


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
