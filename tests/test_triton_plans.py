"""The Triton backend's base-GEMM plans as wholes: the ``cublas`` plan's row-owner kernels (forward and backward
passes) against the float64 reference, their launch count, decode splits, deterministic mode, and the launch
arguments that must never make Triton compile new variants (dropout seeds).

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py), fp16 standing in for bf16; every
kernel output is filled with NaN before the kernels write it. Accuracy rule as in tests/test_triton.py: the
kernel's error against float64 at most 4x the torch backend's in the same dtype.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import helpers
from helpers import check_error_ratio as check
from ttkernels import checks as tk_checks
from ttkernels import reference as ref

tb = pytest.importorskip("ttkernels._triton_kernels.backend")
from ttkernels._triton_kernels import _common, rows, shrink  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


def rnd(*shape, **kw):
    return helpers.rnd(*shape, device=DEVICE, **kw)


def _reference(x, W, b, A, C, B, ids, dy, S, scaling, p, seed, need_dx):
    """Forward and backward from the reference's steps, given the S the backward uses."""
    S_ref, U = ref.shrink(x, A, C, ids, p, seed)
    y = ref.expand(x, W, b, U, B, scaling)
    U = ref.mid(S, C, ids)
    dU, dB = ref.grad_dy(dy, U, B, scaling)
    dS, dC = ref.grad_mid(S, dU, C, ids)
    dx = ref.grad_x(dy, W, dS, A, p, seed) if need_dx else None
    return [y, S_ref, dx, ref.grad_a(x, dS, p, seed), dC, dB]


CASES = [  # M, d_in, d_out, r_a, r_b
    (1, 13, 11, 3, 5),
    (7, 29, 31, 5, 3),
    (37, 23, 17, 16, 19),
    (97, 40, 33, 4, 4),
    (5, 200, 33, 4, 6),  # with many SMs: drop(x) A split over K (decode)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "shared", "task"])
@pytest.mark.parametrize("M,d_in,d_out,ra,rb", CASES)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("split", [False, True])
def test_rows_plan_against_float64(M, d_in, d_out, ra, rb, kind, p, dtype, deterministic, split, monkeypatch):
    monkeypatch.setattr(_common, "deterministic", lambda: deterministic)
    monkeypatch.setattr(rows, "deterministic", lambda: deterministic)
    # split: pretend the device has many SMs, so the row blocks are split over columns (decode)
    monkeypatch.setattr(rows, "num_sms", lambda device: 64 if split else 1)
    monkeypatch.setattr(shrink, "num_sms", lambda device: 64 if split else 1)
    _check_plan_against_float64(rows.forward, rows.backward, M, d_in, d_out, ra, rb, kind, p, dtype)


def _check_plan_against_float64(forward, backward, M, d_in, d_out, ra, rb, kind, p, dtype):
    """A plan's forward + backward (dx wanted or not) against the float64 reference, every output."""
    rb = ra if kind == "none" else rb
    x, W, b = rnd(M, d_in, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_in**-0.5), rnd(d_out, dtype=dtype)
    A, B = rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    C, ids = helpers.random_middle(kind, ra, rb, 4, dtype, M, device=DEVICE, run=3)
    dy = rnd(M, d_out, dtype=dtype)
    scaling, seed = 0.75, 2**32 + 1  # the seed's low word is 1
    y, S = forward(x, W, b, A, C, B, ids, scaling, p, seed)
    for need_dx in (True, False):
        dx, dA, dC, dB = backward(dy, x, W, A, C, B, S, ids, scaling, p, seed, need_dx)
        got = [y, S, dx if need_dx else None, dA, dC, dB]
        args = (x, W, b, A, C, B, ids, dy, S, scaling, p, seed, need_dx)
        want = _reference(
            *[helpers.d64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        )
        lowp = _reference(*args)
        for name, g, w, t in zip(["y", "S", "dx", "dA", "dC", "dB"], got, want, lowp):
            check(name, g, w, t, dtype, relative_slack=name in ("dA", "dB", "dC"))
        assert (dA.dtype, dB.dtype) == (A.dtype, B.dtype)
        if not need_dx:
            assert dx.numel() == 0


FUSED_CASES = CASES[:4] + [(1, 16, 16, 16, 16), (70, 48, 80, 16, 16)]  # last two: 16-divisible, several tiles


def _fused_fast(case, kind, p, dtype, deterministic):
    # `make test`: one token and the several-tile shape, every format and dropout, fp32 or fp16 with
    # deterministic mode on in one and off in the other; `make test-slow` the rest
    return case[0] in (1, 70) and (dtype == torch.float16) != deterministic


@helpers.matrix(
    "case,kind,p,dtype,deterministic",
    FUSED_CASES, ["none", "shared", "task"], [0.0, 0.3], DTYPES, [False, True],
    fast=_fused_fast,
)  # fmt: skip
def test_fused_plan_against_float64(case, kind, p, dtype, deterministic, monkeypatch):
    # the fused plan: shrink, the forward GEMM; grad_dy (dU only), grad_mid, one GEMM for dx, dA and dB
    from ttkernels._triton_kernels import gemm_grad, grad_mid

    M, d_in, d_out, ra, rb = case

    for mod in (_common, gemm_grad, grad_mid):
        monkeypatch.setattr(mod, "deterministic", lambda: deterministic)
    monkeypatch.setattr(tb, "BASE_GEMM", "fused")
    _check_plan_against_float64(tb.forward, tb.backward, M, d_in, d_out, ra, rb, kind, p, dtype)


def test_fused_plan_with_no_tokens(monkeypatch):
    monkeypatch.setattr(tb, "BASE_GEMM", "fused")
    x, W, A, B = rnd(0, 8), rnd(6, 8), rnd(8, 3), rnd(3, 6)
    y, S = tb.forward(x, W, None, A, None, B, None, 1.0, 0.0, 0)
    assert y.shape == (0, 6) and S.shape == (0, 3)
    for need_dx in (True, False):
        dx, dA, dC, dB = tb.backward(rnd(0, 6), x, W, A, None, B, S, None, 1.0, 0.0, 0, need_dx)
        assert dx.shape == ((0, 8) if need_dx else (0,)) and dC is None
        assert torch.equal(dA, torch.zeros_like(A)) and torch.equal(dB, torch.zeros_like(B))


def test_fused_plan_deterministic_repeats_bit_for_bit(monkeypatch):
    from ttkernels._triton_kernels import gemm_grad, grad_mid

    for mod in (_common, gemm_grad, grad_mid):
        monkeypatch.setattr(mod, "deterministic", lambda: True)
    monkeypatch.setattr(tb, "BASE_GEMM", "fused")
    M, d_in, d_out, r = 97, 40, 33, 4
    x, W, A, B, dy = rnd(M, d_in), rnd(d_out, d_in), rnd(d_in, r), rnd(r, d_out), rnd(M, d_out)
    C, ids = helpers.random_middle("task", r, r, 3, torch.float32, M, device=DEVICE)
    S = tb.forward(x, W, None, A, C, B, ids, 0.5, 0.2, 5)[1]
    first = tb.backward(dy, x, W, A, C, B, S, ids, 0.5, 0.2, 5, True)
    again = tb.backward(dy, x, W, A, C, B, S, ids, 0.5, 0.2, 5, True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_rows_plan_with_no_tokens():
    x, W, A, B = rnd(0, 8), rnd(6, 8), rnd(8, 3), rnd(3, 6)
    y, S = rows.forward(x, W, None, A, None, B, None, 1.0, 0.0, 0)
    assert y.shape == (0, 6) and S.shape == (0, 3)
    dx, dA, dC, dB = rows.backward(rnd(0, 6), x, W, A, None, B, S, None, 1.0, 0.0, 0, True)
    assert dx.shape == (0, 8) and dC is None
    assert torch.equal(dA, torch.zeros_like(A)) and torch.equal(dB, torch.zeros_like(B))


def test_rows_plan_deterministic_repeats_bit_for_bit(monkeypatch):
    monkeypatch.setattr(rows, "deterministic", lambda: True)
    M, d_in, d_out, r = 97, 40, 33, 4
    x, W, A, B, dy = rnd(M, d_in), rnd(d_out, d_in), rnd(d_in, r), rnd(r, d_out), rnd(M, d_out)
    C, ids = helpers.random_middle("task", r, r, 3, torch.float32, M, device=DEVICE)
    S = rows.forward(x, W, None, A, C, B, ids, 0.5, 0.2, 5)[1]
    first = rows.backward(dy, x, W, A, C, B, S, ids, 0.5, 0.2, 5, True)
    again = rows.backward(dy, x, W, A, C, B, S, ids, 0.5, 0.2, 5, True)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------- launch count
class _Launches(TorchDispatchMode):
    """Records every torch op that would launch a kernel (not views or allocations), and the Triton launches."""

    FREE = frozenset(
        "empty empty_strided new_empty view _unsafe_view t transpose expand slice select detach alias as_strided "
        "unsqueeze squeeze permute _reshape_alias split lift_fresh is_same_size".split()
    )

    def __init__(self):
        super().__init__()
        self.names: list[str] = []
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if not self.paused and name not in self.FREE:
            self.names.append(name)
        return out

    def run(self, kernel, grid, *args, **kwargs):
        self.names.append(kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__)
        self.paused = True  # the interpreter's own tensor traffic is not a launch
        try:
            kernel[grid](*args, **kwargs)
        finally:
            self.paused = False


LARGE = {"_rows_fwd_kernel", "_rows_bwd_kernel", "addmm_"}


def _plan_launches(plan, kind, p, monkeypatch):
    """The names of the launches of one forward and one backward under ``plan`` (odd sizes, rank 4)."""
    monkeypatch.setattr(_common, "POISON", False)
    monkeypatch.setattr(tb, "BASE_GEMM", plan)
    M, d_in, d_out, r = 37, 40, 33, 4
    x, W, b, A, B, dy = rnd(M, d_in), rnd(d_out, d_in), rnd(d_out), rnd(d_in, r), rnd(r, d_out), rnd(M, d_out)
    C, ids = helpers.random_middle(kind, r, r, 3, torch.float32, M, device=DEVICE)
    seed = tk_checks.device_seed(11, DEVICE)  # as ttkernels.ops hands it over: already on the data's device
    mode = _Launches()
    monkeypatch.setattr(_common, "run", mode.run)
    with mode:
        _, S = tb.forward(x, W, b, A, C, B, ids, 0.5, p, seed)
        forward = list(mode.names)
        tb.backward(dy, x, W, A, C, B, S, ids, 0.5, p, seed, True)
    return forward, mode.names[len(forward) :]


@pytest.mark.parametrize("kind", ["none", "shared", "task"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_cublas_plan_launches_four_large_and_at_most_three_small_kernels(kind, p, monkeypatch):
    forward, backward = _plan_launches("cublas", kind, p, monkeypatch)
    assert forward == ["_rows_fwd_kernel", "addmm_"], forward
    large = [n for n in backward if n in LARGE]
    small = [n for n in backward if n not in LARGE]
    assert large == ["_rows_bwd_kernel", "addmm_"], backward
    assert len(small) <= 3 and small == ["zeros" if "zeros" in small else "zero_", "_finalize_kernel"], backward


@pytest.mark.parametrize("kind", ["none", "shared", "task"])
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_fused_plan_backward_is_grad_dy_and_one_gemm(kind, p, monkeypatch):
    forward, backward = _plan_launches("fused", kind, p, monkeypatch)
    assert [n for n in forward if n.endswith("_kernel") and "task" not in n] == [
        "_shrink_kernel",
        "_gemm_lowrank_kernel",
    ]
    large = [n for n in backward if n in ("_grad_dy_kernel", "_gemm_grad_kernel", "_grad_a_kernel", "addmm_")]
    assert large == ["_grad_dy_kernel", "_gemm_grad_kernel"], backward
    assert backward[-1] == "_finalize_kernel", backward


def test_the_fused_ops_run_the_plan_passes(monkeypatch):
    import ttkernels as tk

    calls = []
    monkeypatch.setattr(rows, "forward", lambda *a: calls.append("forward") or _orig_forward(*a))
    monkeypatch.setattr(rows, "backward", lambda *a: calls.append("backward") or _orig_backward(*a))
    monkeypatch.setattr(tb, "BASE_GEMM", "cublas")
    x = rnd(5, 8).requires_grad_()
    A, B = rnd(8, 2).requires_grad_(), rnd(2, 6).requires_grad_()
    tk.tt_adapter(x, rnd(6, 8), None, A, None, B, backend="triton").sum().backward()
    assert calls == ["forward", "backward"]


_orig_forward, _orig_backward = rows.forward, rows.backward


def test_cublas_is_the_default_plan():
    import importlib
    import os

    if "TTKERNELS_TRITON_BASE_GEMM" not in os.environ:
        assert importlib.reload(tb).BASE_GEMM == "cublas"


# ------------------------------------------------------------------------------ arguments and buckets
@pytest.mark.parametrize("seed", [1, 2**32 + 1, 2**31, 2**32 - 1, 2**63 - 1, 16, 0])
@pytest.mark.parametrize("p", [0.1, 0.999])
def test_dropout_arguments_are_a_seed_tensor_and_an_int32_and_the_mask_is_the_reference(seed, p):
    # the seed: one int64 on the data's device, which the kernels load (an int is copied there, a tensor used as it
    # is); the threshold: an int32 (never i64); neither specialized: one compiled variant for every seed
    like = torch.empty(3, device=DEVICE)
    SEED, thr, _ = _common.dropout_args(p, seed, like)
    assert SEED.dtype == torch.int64 and SEED.numel() == 1 and SEED.device == like.device
    assert -(2**31) <= thr < 2**31
    given = torch.tensor(seed, device=DEVICE)
    assert _common.dropout_args(p, given, like)[0] is given
    assert _common.dropout_args(0.0, given, like)[0] is like  # no dropout: nothing is read, nothing allocated
    mask = _common.keep_mask_tensor(seed, 5, 37, p, device=DEVICE).cpu()
    assert torch.equal(mask, ref.dropout_keep(seed, 5, 37, p))
    assert torch.equal(_common.keep_mask_tensor(given, 5, 37, p, device=DEVICE).cpu(), mask)


def test_dropout_arguments_refuse_bad_seeds():
    like = torch.empty(3, device=DEVICE)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        _common.dropout_args(0.1, -1, like)
    with pytest.raises(TypeError, match=r"seed must be a one-element integer tensor, got torch.float32"):
        _common.dropout_args(0.1, torch.tensor(1.0, device=DEVICE), like)
    with pytest.raises(TypeError, match=r"seed must be a one-element integer tensor, got torch.int64 \(2,\)"):
        _common.dropout_args(0.1, torch.tensor([1, 2], device=DEVICE), like)
    with pytest.raises(ValueError, match=r"seed is on meta but the data is on"):
        _common.dropout_args(0.1, torch.tensor(1, device="meta"), like)
    assert _common.dropout_args(0.1, torch.tensor(7, dtype=torch.int32, device=DEVICE), like)[0].dtype == torch.int64


def test_every_kernel_with_dropout_arguments_never_specializes_them():
    import inspect

    from ttkernels._triton_kernels import gemm, grad_a, grad_dy, grad_mid, mid, shrink

    seen = 0
    for mod in (gemm, grad_a, grad_dy, grad_mid, mid, shrink, rows, _common):
        src = inspect.getsource(mod)
        for block in src.split("@triton.jit")[1:]:
            head = block[: block.index(":\n")] if ":\n" in block else block
            signature = block.split("):", 1)[0]
            if "_kernel(" in signature and "SEED" in signature:
                assert head.startswith("(do_not_specialize=DROPOUT_ARGS)"), (mod.__name__, head[:80])
                seen += 1
    assert seen == 7  # shrink, shrink partial, gemm, grad_a, rows forward, rows backward, keep mask
    assert _common.DROPOUT_ARGS == ["SEED", "threshold"]


def test_autotune_keys_hold_every_flag():
    from ttkernels._triton_kernels import gemm, grad_a, grad_dy, shrink

    for tuned, flags in [
        (gemm.GEMM, {"DROPOUT", "HAS_BIAS", "BASE", "PRECISION"}),
        (shrink.SHRINK, {"DROPOUT", "HAS_C", "PER_SAMPLE"}),
        (grad_dy.GRAD_DY, {"DETERMINISTIC"}),
        (grad_a.GRAD_A, {"DETERMINISTIC", "DROPOUT"}),
        (rows.ROWS_FWD, {"DROPOUT", "HAS_BIAS", "HAS_C", "PER_SAMPLE"}),
        (rows.ROWS_BWD, {"DROPOUT", "DETERMINISTIC", "NEED_DX", "HAS_C", "PER_SAMPLE"}),
    ]:
        for hopper in (False, True):
            key = tuned.full_key(hopper)
            assert flags <= set(key), (tuned.kernel, key)
            assert not {"BLOCK_M", "BLOCK_N", "BLOCK_K"} & set(key)


def test_two_token_buckets_below_64():
    assert {_common.m_bucket(m) for m in range(1, 65)} == {16, 64}
    assert [_common.m_bucket(m) for m in (65, 128, 129, 8192, 100000)] == [128, 128, 256, 8192, 8192]


def test_decode_splits_rows_over_columns_and_k(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(rows, "num_sms", lambda device: 132)
    monkeypatch.setattr(shrink, "num_sms", lambda device: 132)
    assert rows.split_for(1, 16, 4096, 128, cpu) == 8  # at most one program per 512 columns
    assert rows.split_for(8192, 64, 4096, 128, cpu) == 1
    assert shrink.split_k(1, 4096, cpu) == 64  # one K range per four 16-wide interpreter tiles
    assert shrink.split_k(8192, 4096, cpu) == 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["none", "shared", "task"])
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_split_over_k_against_float64(kind, p, dtype, monkeypatch):
    monkeypatch.setattr(shrink, "num_sms", lambda device: 132)
    M, d_in, ra, rb = 3, 263, 5, 7
    rb = ra if kind == "none" else rb
    assert shrink.split_k(M, d_in, DEVICE) > 1
    x, A = rnd(M, d_in, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5)
    C, ids = helpers.random_middle(kind, ra, rb, 4, dtype, M, device=DEVICE)
    (S, U), (S64, U64), (St, Ut) = helpers.against_reference(tb, "shrink", x, A, C, ids, p, 2**32 + 1)
    check("S", S, S64, St, dtype)
    check("U", U, U64, Ut, dtype)


@helpers.matrix("M,p,bias,dtype", [1, 3, 6], [0.0, 0.3], [False, True], DTYPES, fast=lambda M, p, b, d: M == 3)
def test_fused_gemm_split_over_k_at_decode_against_float64(M, p, bias, dtype, monkeypatch):
    # decode: with many SMs the fused GEMM splits K over programs (float32 partials summed in order)
    from ttkernels._triton_kernels import gemm

    monkeypatch.setattr(gemm, "num_sms", lambda device: 64)
    monkeypatch.setattr(tb, "BASE_GEMM", "fused")
    d_in, d_out, r = 523, 45, 5
    meta = gemm.GEMM_UNALIGNED.fixed_meta(DEVICE)
    assert gemm.split_k(M, d_out, d_in, dtype.itemsize, meta, DEVICE) > 1
    x, W = rnd(M, d_in, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    b = rnd(d_out, dtype=dtype) if bias else None
    U, B = rnd(M, r, dtype=dtype), rnd(r, d_out, dtype=dtype, scale=r**-0.5)
    y, y64, yt = helpers.against_reference(tb, "expand", x, W, b, U, B, 0.75)
    check("y", y, y64, yt, dtype)
    # grad_x with K = d_out = 523: dx = dY W + drop'(dS A^T)
    dy, dS, A = rnd(M, d_in, dtype=dtype), rnd(M, r, dtype=dtype), rnd(d_out, r, dtype=dtype, scale=d_out**-0.5)
    W2 = rnd(d_in, d_out, dtype=dtype, scale=d_in**-0.5)
    dx, dx64, dxt = helpers.against_reference(tb, "grad_x", dy, W2, dS, A, p, 2**32 + 1)
    check("dx", dx, dx64, dxt, dtype)
    # the whole plan at decode, with the split forward GEMM
    A1, B1 = rnd(d_in, r, dtype=dtype, scale=d_in**-0.5), rnd(r, d_out, dtype=dtype, scale=r**-0.5)
    y2, S = tb.forward(x, W, b, A1, None, B1, None, 0.75, p, 7)
    want = _reference(*[helpers.d64(a) if isinstance(a, torch.Tensor) else a for a in (x, W, b, A1, None, B1, None,
                        rnd(M, d_out, dtype=dtype), S, 0.75, p, 7, False)])  # fmt: skip
    lowp = _reference(x, W, b, A1, None, B1, None, rnd(M, d_out, dtype=dtype), S, 0.75, p, 7, False)
    check("y", y2, want[0], lowp[0], dtype)


def test_fused_gemm_split_can_be_turned_off(monkeypatch):
    from ttkernels._triton_kernels import gemm

    monkeypatch.setattr(gemm, "num_sms", lambda device: 64)
    meta = gemm.GEMM.fixed_meta(DEVICE)
    assert gemm.split_k(1, 64, 4096, 2, meta, DEVICE) > 1
    assert gemm.split_k(65, 64, 4096, 2, meta, DEVICE) == 1  # above decode
    monkeypatch.setattr(gemm, "SPLIT_K", False)
    assert gemm.split_k(1, 64, 4096, 2, meta, DEVICE) == 1


def test_fused_backward_gemm_refuses_rank_zero():
    # Its kernel assumes a rank of at least 1 (the rank loop then has no zero-trip path: no wgmma serialization).
    from ttkernels._triton_kernels import gemm_grad

    x, dy, W = torch.randn(5, 8), torch.randn(5, 6), torch.randn(6, 8)
    dS, A, U = torch.randn(5, 0), torch.randn(8, 0), torch.randn(5, 3)
    with pytest.raises(ValueError, match="dS"):
        gemm_grad.gemm_grad(dy, W, dS, A, x, U, torch.float32, 1.0, 0.0, 0, True)
