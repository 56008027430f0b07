"""The ``cuda`` backend (csrc/ kernels, torch.ops.ttkernels_cuda.*): bindings, registry, and results.

Without a GPU, what runs is what the binding layer promises before any launch: every op is registered with its
schema, every bad argument raises an error naming the op and the argument (CPU tensors reach the same checks,
and a CPU tensor that passes them all is refused as "must be a CUDA tensor"), the fake kernels give the shapes
torch.compile traces with, and the registry refuses ``backend="cuda"`` without a GPU or without the extension.

With a GPU, the fused op runs (every step: tests/test_steps.py, runner ``cuda``) against the float64 reference
(accuracy rule of tests/helpers.check_error_ratio) at awkward shapes (0, 1, prime token counts, per-bond ranks,
every rank bucket), every dtype, dropout on and off, atomic and deterministic reductions, with outputs poisoned
with NaN before the kernels write them; plus task-id checks, CUDA graph capture, torch.compile and opcheck.

When the extension is not built, the tests that need it skip; with TTKERNELS_REQUIRE_CUDA_EXT=1 (CI) they fail.
"""

from __future__ import annotations

import math
import os

import pytest
import torch

import helpers
import ttkernels as tk
from helpers import metatt_spec, random_cores
from ttkernels import _cuda_backend as cb
from ttkernels import _ext
from ttkernels import reference as ref

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(scope="module")
def ext():
    try:
        cb.load()
    except _ext.CUDAExtensionNotBuiltError as e:
        if os.environ.get("TTKERNELS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"TTKERNELS_REQUIRE_CUDA_EXT=1 but the CUDA extension does not load: {e}")
        pytest.skip(f"CUDA extension not built (set TTKERNELS_REQUIRE_CUDA_EXT=1 to fail instead): {e}")
    return torch.ops.ttkernels_cuda


# ---------------------------------------------------------------------------------------- registration
SCHEMAS = {
    "shrink": "ttkernels_cuda::shrink(Tensor x, Tensor A, Tensor? C, Tensor? task_ids, float p, Tensor? seed) "
    "-> (Tensor, Tensor)",
    "mid": "ttkernels_cuda::mid(Tensor S, Tensor C, Tensor? task_ids) -> Tensor",
    "expand": "ttkernels_cuda::expand(Tensor x, Tensor weight, Tensor? bias, Tensor U, Tensor B, float scaling) "
    "-> Tensor",
    "grad_dy": "ttkernels_cuda::grad_dy(Tensor dy, Tensor U, Tensor B, float scaling) -> (Tensor, Tensor)",
    "grad_mid": "ttkernels_cuda::grad_mid(Tensor S, Tensor dU, Tensor C, Tensor? task_ids) -> (Tensor, Tensor)",
    "grad_x": "ttkernels_cuda::grad_x(Tensor dy, Tensor weight, Tensor dS, Tensor A, float p, Tensor? seed) -> Tensor",
    "grad_a": "ttkernels_cuda::grad_a(Tensor x, Tensor dS, float p, Tensor? seed) -> Tensor",
    "kron_apply": "ttkernels_cuda::kron_apply(Tensor x, Tensor q, Tensor p) -> Tensor",
    "kron_grad_q": "ttkernels_cuda::kron_grad_q(Tensor dy, Tensor x, Tensor p) -> Tensor",
    "kron_grad_p": "ttkernels_cuda::kron_grad_p(Tensor dy, Tensor x, Tensor q) -> Tensor",
    "set_poison": "ttkernels_cuda::set_poison(bool on) -> bool",
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_ops_are_registered_with_their_schemas(ext, name):
    assert str(getattr(ext, name).default._schema) == SCHEMAS[name]


def test_set_poison_returns_the_previous_value(ext):
    old = ext.set_poison(True)
    try:
        assert ext.set_poison(True) is True
        assert ext.set_poison(False) is True
        assert ext.set_poison(False) is False
    finally:
        ext.set_poison(old)


# ---------------------------------------------------------------------------- argument checks (CPU too)
M, D_IN, D_OUT, RA, RB, T = 5, 7, 6, 3, 4, 2
KR, KNI, KNJ, KNA, KNC = 2, 3, 4, 5, 6  # the Kronecker-sum ops: x (M, NI, NJ), q (R, NA, NI), p (R, NJ, NC)


def _valid(device="cpu"):
    """Valid arguments of every op (float32), on ``device``; each case below changes one of them."""

    def r(*shape):
        return torch.randn(*shape, device=device)

    ids = torch.tensor([0, 1, 1, 0, 1], device=device)
    seed = torch.tensor(3, device=device)  # the dropout seed: a one-element int64 tensor on the data's device
    return {
        "shrink": [r(M, D_IN), r(D_IN, RA), r(T, RA, RB), ids, 0.1, seed],
        "mid": [r(M, RA), r(RA, RB), None],
        "expand": [r(M, D_IN), r(D_OUT, D_IN), r(D_OUT), r(M, RB), r(RB, D_OUT), 0.5],
        "grad_dy": [r(M, D_OUT), r(M, RB), r(RB, D_OUT), 0.5],
        "grad_mid": [r(M, RA), r(M, RB), r(T, RA, RB), ids],
        "grad_x": [r(M, D_OUT), r(D_OUT, D_IN), r(M, RA), r(D_IN, RA), 0.1, seed],
        "grad_a": [r(M, D_IN), r(M, RA), 0.1, seed],
        "kron_apply": [r(M, KNI, KNJ), r(KR, KNA, KNI), r(KR, KNJ, KNC)],
        "kron_grad_q": [r(M, KNA, KNC), r(M, KNI, KNJ), r(KR, KNJ, KNC)],
        "kron_grad_p": [r(M, KNA, KNC), r(M, KNI, KNJ), r(KR, KNA, KNI)],
    }


# (op, argument position, replacement, exception type, message)
BAD = [
    ("shrink", 0, lambda: torch.randn(M, D_IN, dtype=torch.float64), TypeError,
     r"shrink: x must have dtype float32, float16 or bfloat16, got Double"),
    ("shrink", 0, lambda: torch.randn(M, D_IN, 2), RuntimeError, r"shrink: x must be 2-D \(M, d_in\)"),
    ("shrink", 0, lambda: torch.randn(D_IN, M).t(), RuntimeError, r"shrink: x must be contiguous"),
    ("shrink", 0, lambda: torch.randn(M, 0), RuntimeError, r"shrink: d_in \(x.shape\[1\]\) must be >= 1"),
    ("shrink", 1, lambda: torch.randn(D_IN + 1, RA), RuntimeError,
     r"shrink: A has shape \[8, 3\] but its dimension 0 must be 7 \(d_in"),
    ("shrink", 1, lambda: torch.randn(D_IN, 0), RuntimeError, r"shrink: ra \(A.shape\[1\]\) must be in \[1, 128\], got 0"),
    ("shrink", 1, lambda: torch.randn(D_IN, 129), RuntimeError, r"ra \(A.shape\[1\]\) must be in \[1, 128\], got 129"),
    ("shrink", 1, lambda: torch.randn(D_IN, RA, dtype=torch.float16), TypeError,
     r"shrink: A has dtype Half but x has dtype Float; all must match"),
    ("shrink", 2, lambda: torch.randn(T, RA + 1, RB), RuntimeError, r"shrink: C has shape \[2, 4, 4\] but its dimension 1"),
    ("shrink", 2, lambda: torch.randn(T, RA, 129), RuntimeError, r"C's last dimension \(rb\) must be in \[1, 128\]"),
    ("shrink", 2, lambda: torch.randn(1, T, RA, RB), RuntimeError, r"shrink: C must be 2-D \(ra, rb\) or 3-D"),
    ("shrink", 2, lambda: torch.randn(RA, RB), RuntimeError, r"task_ids was given but C has no per-sample"),
    ("shrink", 2, lambda: None, RuntimeError, r"shrink: task_ids was given but C is None"),
    ("shrink", 2, lambda: torch.randn(T, RB, RA).transpose(1, 2), RuntimeError, r"shrink: C must be contiguous"),
    ("shrink", 3, lambda: None, RuntimeError, r"shrink: C has a per-sample axis of 2 tasks: pass task_ids"),
    ("shrink", 3, lambda: torch.zeros(M, dtype=torch.int32), TypeError, r"shrink: task_ids must have dtype int64"),
    ("shrink", 3, lambda: torch.zeros(M + 1, dtype=torch.int64), RuntimeError, r"task_ids must have shape \(5,\)"),
    ("shrink", 4, lambda: 1.0, RuntimeError, r"shrink: p must satisfy 0 <= p < 1, got p = 1"),
    ("shrink", 4, lambda: float("nan"), RuntimeError, r"shrink: p must satisfy 0 <= p < 1"),
    ("shrink", 5, lambda: None, RuntimeError, r"shrink: seed is required when p > 0 \(a one-element int64 tensor\)"),
    ("shrink", 5, lambda: torch.tensor(3, dtype=torch.int32), TypeError, r"shrink: seed must have dtype int64, got Int"),
    ("shrink", 5, lambda: torch.tensor([3, 4]), RuntimeError, r"shrink: seed must have one element, got shape \[2\]"),
    ("mid", 0, lambda: torch.ones(M, RA, dtype=torch.int64), TypeError, r"mid: S must have dtype float32"),
    ("mid", 1, lambda: torch.randn(RA + 2, RB), RuntimeError, r"mid: C has shape \[5, 4\] but its dimension 0 must be 3"),
    ("mid", 1, lambda: torch.randn(RA, RB, dtype=torch.bfloat16), TypeError, r"mid: C has dtype BFloat16 but S"),
    ("expand", 1, lambda: torch.randn(D_OUT, D_IN + 1), RuntimeError,
     r"expand: weight has shape \[6, 8\] but its dimension 1 must be 7"),
    ("expand", 1, lambda: torch.randn(D_OUT, D_IN, dtype=torch.float16), TypeError, r"expand: weight has dtype Half"),
    ("expand", 2, lambda: torch.randn(D_OUT + 1), RuntimeError, r"expand: bias has shape \[7\] but its dimension 0"),
    ("expand", 3, lambda: torch.randn(M + 1, RB), RuntimeError, r"expand: U has shape \[6, 4\] but its dimension 0 must be 5"),
    ("expand", 3, lambda: torch.randn(M, RB + 1), RuntimeError, r"expand: U has shape \[5, 5\] but its dimension 1 must be 4"),
    ("expand", 4, lambda: torch.randn(RB, D_OUT + 1), RuntimeError, r"expand: B has shape \[4, 7\] but its dimension 1"),
    ("expand", 4, lambda: torch.randn(D_OUT, RB).t(), RuntimeError, r"expand: B must be contiguous"),
    ("expand", 5, lambda: float("inf"), RuntimeError, r"expand: scaling must be finite, got inf"),
    ("grad_dy", 0, lambda: torch.randn(M * D_OUT), RuntimeError, r"grad_dy: dy must be 2-D \(M, d_out\)"),
    ("grad_dy", 1, lambda: torch.randn(M - 1, RB), RuntimeError, r"grad_dy: U has shape \[4, 4\] but its dimension 0"),
    ("grad_dy", 2, lambda: torch.randn(RB, D_OUT - 1), RuntimeError, r"grad_dy: B has shape \[4, 5\] but its dimension 1"),
    ("grad_dy", 2, lambda: torch.randn(200, D_OUT), RuntimeError, r"grad_dy: rb \(B.shape\[0\]\) must be in \[1, 128\]"),
    ("grad_mid", 0, lambda: torch.randn(M, RA, dtype=torch.float64), TypeError, r"grad_mid: S must have dtype"),
    ("grad_mid", 1, lambda: torch.randn(M, RB + 1), RuntimeError, r"grad_mid: dU has shape \[5, 5\] but its dimension 1"),
    ("grad_mid", 3, lambda: torch.zeros(M, dtype=torch.float32), TypeError, r"grad_mid: task_ids must have dtype int64"),
    ("grad_x", 1, lambda: torch.randn(D_OUT + 1, D_IN), RuntimeError,
     r"grad_x: weight has shape \[7, 7\] but its dimension 0 must be 6"),
    ("grad_x", 2, lambda: torch.randn(M, RA + 1), RuntimeError, r"grad_x: dS has shape \[5, 4\] but its dimension 1"),
    ("grad_x", 3, lambda: torch.randn(D_IN - 1, RA), RuntimeError, r"grad_x: A has shape \[6, 3\] but its dimension 0"),
    ("grad_x", 4, lambda: -0.5, RuntimeError, r"grad_x: p must satisfy 0 <= p < 1"),
    ("grad_x", 5, lambda: torch.tensor(3.0), TypeError, r"grad_x: seed must have dtype int64, got Float"),
    ("grad_x", 5, lambda: None, RuntimeError, r"grad_x: seed is required when p > 0"),
    ("grad_a", 0, lambda: torch.randn(M, D_IN).t().contiguous().t(), RuntimeError, r"grad_a: x must be contiguous"),
    ("grad_a", 1, lambda: torch.randn(M + 2, RA), RuntimeError, r"grad_a: dS has shape \[7, 3\] but its dimension 0"),
    ("grad_a", 1, lambda: torch.randn(M, 129), RuntimeError, r"grad_a: ra \(dS.shape\[1\]\) must be in \[1, 128\]"),
    ("grad_a", 3, lambda: torch.zeros(1, 1, dtype=torch.int64)[:, :0], RuntimeError, r"grad_a: seed must have one element"),
    ("grad_a", 3, lambda: None, RuntimeError, r"grad_a: seed is required when p > 0"),
    ("kron_apply", 0, lambda: torch.randn(M, KNI), RuntimeError, r"kron_apply: x must be 3-D \(M, NI, NJ\)"),
    ("kron_apply", 0, lambda: torch.randn(M, KNI, KNJ, dtype=torch.float64), TypeError,
     r"kron_apply: x must have dtype float32, float16 or bfloat16, got Double"),
    ("kron_apply", 0, lambda: torch.randn(M, 65, KNJ), RuntimeError,
     r"kron_apply: NI \(x.shape\[1\]\) must be in \[1, 64\] on the small-bond-rank CUDA path, got 65; "
     r"use backend='triton' or backend='torch'"),
    ("kron_apply", 0, lambda: torch.randn(M, KNI, 0), RuntimeError, r"kron_apply: NJ \(x.shape\[2\]\) must be >= 1"),
    ("kron_apply", 1, lambda: torch.randn(KNA, KNI), RuntimeError, r"kron_apply: q must be 3-D \(R, NA, NI\)"),
    ("kron_apply", 1, lambda: torch.randn(17, KNA, KNI), RuntimeError,
     r"kron_apply: R \(q.shape\[0\]\) must be in \[1, 16\] .*, got 17; use backend='triton' or backend='torch'"),
    ("kron_apply", 1, lambda: torch.randn(0, KNA, KNI), RuntimeError, r"kron_apply: R \(q.shape\[0\]\) must be in \[1, 16\]"),
    ("kron_apply", 1, lambda: torch.randn(KR, 65, KNI), RuntimeError, r"kron_apply: NA \(q.shape\[1\]\) must be in \[1, 64\]"),
    ("kron_apply", 1, lambda: torch.randn(KR, KNA, KNI + 1), RuntimeError,
     r"kron_apply: q has shape \[2, 5, 4\] but its dimension 2 must be 3 \(NI, x.shape\[1\]\)"),
    ("kron_apply", 1, lambda: torch.randn(KR, KNA, KNI, dtype=torch.float16), TypeError,
     r"kron_apply: q has dtype Half but x has dtype Float; all must match"),
    ("kron_apply", 1, lambda: torch.randn(KR, KNI, KNA).transpose(1, 2), RuntimeError, r"kron_apply: q must be contiguous"),
    ("kron_apply", 2, lambda: torch.randn(KR + 1, KNJ, KNC), RuntimeError,
     r"kron_apply: p has shape \[3, 4, 6\] but its dimension 0 must be 2 \(R, q.shape\[0\]\)"),
    ("kron_apply", 2, lambda: torch.randn(KR, KNJ + 1, KNC), RuntimeError,
     r"kron_apply: p has shape \[2, 5, 6\] but its dimension 1 must be 4 \(NJ, x.shape\[2\]\)"),
    ("kron_apply", 2, lambda: torch.randn(KR, KNJ, 0), RuntimeError, r"kron_apply: NC \(p.shape\[2\]\) must be >= 1"),
    ("kron_apply", 2, lambda: torch.randn(KR, KNC, KNJ).transpose(1, 2), RuntimeError, r"kron_apply: p must be contiguous"),
    ("kron_apply", 2, lambda: torch.randn(KR, KNJ, KNC, dtype=torch.bfloat16), TypeError,
     r"kron_apply: p has dtype BFloat16 but x has dtype Float"),
    ("kron_grad_q", 0, lambda: torch.randn(M, KNA, KNC, 1), RuntimeError, r"kron_grad_q: dy must be 3-D \(M, NA, NC\)"),
    ("kron_grad_q", 0, lambda: torch.randn(M, 65, KNC), RuntimeError, r"kron_grad_q: NA \(dy.shape\[1\]\) must be in \[1, 64\]"),
    ("kron_grad_q", 0, lambda: torch.ones(M, KNA, KNC, dtype=torch.int32), TypeError, r"kron_grad_q: dy must have dtype float32"),
    ("kron_grad_q", 1, lambda: torch.randn(M + 1, KNI, KNJ), RuntimeError,
     r"kron_grad_q: x has shape \[6, 3, 4\] but its dimension 0 must be 5 \(M, the tokens of dy\)"),
    ("kron_grad_q", 1, lambda: torch.randn(M, 65, KNJ), RuntimeError, r"kron_grad_q: NI \(x.shape\[1\]\) must be in \[1, 64\]"),
    ("kron_grad_q", 1, lambda: torch.randn(M, KNI, KNJ, dtype=torch.bfloat16), TypeError,
     r"kron_grad_q: x has dtype BFloat16 but dy has dtype Float"),
    ("kron_grad_q", 2, lambda: torch.randn(17, KNJ, KNC), RuntimeError,
     r"kron_grad_q: R \(p.shape\[0\]\) must be in \[1, 16\] .*use backend='triton' or backend='torch'"),
    ("kron_grad_q", 2, lambda: torch.randn(KR, KNJ + 1, KNC), RuntimeError,
     r"kron_grad_q: p has shape \[2, 5, 6\] but its dimension 1 must be 4 \(NJ, x.shape\[2\]\)"),
    ("kron_grad_q", 2, lambda: torch.randn(KR, KNJ, KNC + 1), RuntimeError,
     r"kron_grad_q: p has shape \[2, 4, 7\] but its dimension 2 must be 6 \(NC, dy.shape\[2\]\)"),
    ("kron_grad_q", 2, lambda: torch.randn(KR, KNC, KNJ).transpose(1, 2), RuntimeError, r"kron_grad_q: p must be contiguous"),
    ("kron_grad_p", 0, lambda: torch.randn(M, KNA, 0), RuntimeError, r"kron_grad_p: NC \(dy.shape\[2\]\) must be >= 1"),
    ("kron_grad_p", 0, lambda: torch.randn(M, KNA, KNC, dtype=torch.float64), TypeError, r"kron_grad_p: dy must have dtype"),
    ("kron_grad_p", 1, lambda: torch.randn(M - 1, KNI, KNJ), RuntimeError,
     r"kron_grad_p: x has shape \[4, 3, 4\] but its dimension 0 must be 5 \(M, the tokens of dy\)"),
    ("kron_grad_p", 1, lambda: torch.randn(M, 65, KNJ), RuntimeError, r"kron_grad_p: NI \(x.shape\[1\]\) must be in \[1, 64\]"),
    ("kron_grad_p", 1, lambda: torch.randn(M, KNI), RuntimeError, r"kron_grad_p: x must be 3-D \(M, NI, NJ\)"),
    ("kron_grad_p", 2, lambda: torch.randn(17, KNA, KNI), RuntimeError, r"kron_grad_p: R \(q.shape\[0\]\) must be in \[1, 16\]"),
    ("kron_grad_p", 2, lambda: torch.randn(KR, KNA + 1, KNI), RuntimeError,
     r"kron_grad_p: q has shape \[2, 6, 3\] but its dimension 1 must be 5 \(NA, dy.shape\[1\]\)"),
    ("kron_grad_p", 2, lambda: torch.randn(KR, KNA, KNI + 2), RuntimeError,
     r"kron_grad_p: q has shape \[2, 5, 5\] but its dimension 2 must be 3 \(NI, x.shape\[1\]\)"),
    ("kron_grad_p", 2, lambda: torch.randn(KR, KNA, KNI, dtype=torch.float16), TypeError,
     r"kron_grad_p: q has dtype Half but dy has dtype Float"),
    ("kron_grad_p", 2, lambda: torch.randn(KR, KNI, KNA).transpose(1, 2), RuntimeError, r"kron_grad_p: q must be contiguous"),
]  # fmt: skip


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("case", range(len(BAD)), ids=[f"{c[0]}-arg{c[1]}-{i}" for i, c in enumerate(BAD)])
def test_binding_names_the_bad_argument(ext, case, device):
    op, pos, make, exc, message = BAD[case]
    args = _valid(device)[op]
    bad = make()
    args[pos] = bad.to(device) if isinstance(bad, torch.Tensor) else bad
    with pytest.raises(exc, match=message):
        getattr(ext, op)(*args)
    if device == "cuda":
        torch.cuda.synchronize()  # nothing was launched, so nothing failed asynchronously


@pytest.mark.parametrize("op", sorted(_valid()))
def test_binding_refuses_cpu_tensors_after_every_other_check(ext, op):
    first = {"shrink": "x", "mid": "S", "expand": "x", "grad_dy": "dy", "grad_mid": "S", "grad_x": "dy", "grad_a": "x"}
    first.update(kron_apply="x", kron_grad_q="dy", kron_grad_p="dy")
    with pytest.raises(RuntimeError, match=rf"{op}: {first[op]} must be a CUDA tensor, got device cpu"):
        getattr(ext, op)(*_valid("cpu")[op])


@pytest.mark.parametrize("m", [0, M])
@pytest.mark.parametrize("op", ["kron_apply", "kron_grad_q", "kron_grad_p"])
def test_kron_binding_takes_strided_x_and_dy(ext, op, m):
    """Transposed and strided views of x and dy (and M = 0) pass every check: a CPU tensor is refused only as such."""
    args = _valid("cpu")[op]
    x = torch.randn(m, KNJ, KNI).transpose(1, 2)
    dy = torch.randn(m, KNA, 2 * KNC)[:, :, ::2]
    args[0:2] = [x, args[1]] if op == "kron_apply" else [dy, x]
    first = "x" if op == "kron_apply" else "dy"
    with pytest.raises(RuntimeError, match=rf"{op}: {first} must be a CUDA tensor, got device cpu"):
        getattr(ext, op)(*args)


@needs_cuda
@pytest.mark.parametrize("op", sorted(_valid()))
def test_binding_refuses_mixed_devices(ext, op):
    args = _valid("cuda")[op]
    pos = 1  # the second tensor of every op
    args[pos] = args[pos].cpu()
    with pytest.raises(RuntimeError, match=r"must be a CUDA tensor, got device cpu"):
        getattr(ext, op)(*args)


@needs_cuda
@pytest.mark.parametrize("op,pos", [("shrink", 5), ("grad_x", 5), ("grad_a", 3)])
def test_binding_refuses_a_seed_on_another_device(ext, op, pos):
    args = _valid("cuda")[op]
    args[pos] = args[pos].cpu()
    with pytest.raises(RuntimeError, match=rf"{op}: seed must be a CUDA tensor, got device cpu"):
        getattr(ext, op)(*args)


def test_backend_layer_takes_int_and_tensor_seeds_and_checks_ints_on_the_host(ext):
    """The step functions of the cuda backend pass the seed to the binding as a tensor on the data's device:
    an int is range-checked on the host first, a tensor is used where it lies (device, dtype and size checked)."""
    x, eye = torch.randn(3, 4), torch.eye(4)
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -1"):
        cb.shrink(x, eye, None, None, 0.4, -1)
    with pytest.raises(TypeError, match=r"seed must be a one-element integer tensor"):
        cb.grad_a(x, eye, 0.4, torch.tensor([1, 2]))
    assert cb._seed(0.0, 5, x.device) is None  # no dropout: no seed reaches the binding
    t = torch.tensor(2**63 - 1)
    assert cb._seed(0.4, t, x.device) is t  # used where it lies, never read
    assert torch.equal(cb._seed(0.4, 2**32 + 1, x.device), torch.tensor(2**32 + 1))
    assert cb._seed(0.4, torch.tensor(7, dtype=torch.int32), x.device).dtype == torch.int64


def test_fake_kernels_give_the_output_shapes(ext):
    v = {op: [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args] for op, args in _valid().items()}
    shapes = {
        "shrink": [(M, RA), (M, RB)],
        "mid": [(M, RB)],
        "expand": [(M, D_OUT)],
        "grad_dy": [(M, RB), (RB, D_OUT)],
        "grad_mid": [(M, RA), (T, RA, RB)],
        "grad_x": [(M, D_IN)],
        "grad_a": [(D_IN, RA)],
        "kron_apply": [(M, KNA, KNC)],
        "kron_grad_q": [(KR, KNA, KNI)],
        "kron_grad_p": [(KR, KNJ, KNC)],
    }
    for op, want in shapes.items():
        out = getattr(ext, op)(*v[op])
        out = list(out) if isinstance(out, (tuple, list)) else [out]
        assert [tuple(o.shape) for o in out] == want, op
        assert all(o.device.type == "meta" and o.dtype == torch.float32 for o in out), op
    S, U = ext.shrink(v["shrink"][0], v["shrink"][1], None, None, 0.0, None)
    assert tuple(S.shape) == (M, RA) and U.numel() == 0


# ------------------------------------------------------------------------------------------- registry
def test_registry_refuses_cuda_on_the_cpu():
    x = torch.randn(3, 8)
    with pytest.raises(tk.BackendUnavailableError, match="backend='cuda' runs on CUDA tensors, but x is on cpu") as e:
        tk.tt_adapter(x, torch.randn(6, 8), None, torch.randn(8, 2), None, torch.randn(2, 6), backend="cuda")
    if not CUDA:
        assert "this machine has no CUDA GPU" in str(e.value)
    layer = tk.TTLinear(8, 6, ranks=2, backend="cuda")
    with pytest.raises(tk.BackendUnavailableError, match="backend='cuda' runs on CUDA tensors"):
        layer(x)


def test_registry_says_how_to_build_a_missing_extension(monkeypatch):
    from ttkernels import ops

    monkeypatch.delitem(ops._IMPLEMENTED, "cuda", raising=False)
    monkeypatch.setattr(_ext, "_loaded_path", None)
    monkeypatch.setattr(_ext, "cuda_extension_path", lambda: None)
    with pytest.raises(tk.BackendUnavailableError, match=r"needs the CUDA extension ttkernels\._C") as e:
        ops.resolve_backend("cuda", torch.device("cuda", 0))
    assert _ext.BUILD_COMMAND in str(e.value)


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda: cb.shrink(torch.randn(3, 4, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64), None, None,
                           0.0, 0), TypeError, r"backend='cuda' computes in float32, bfloat16 or float16, not torch.float64"),
        (lambda: cb.grad_a(torch.randn(3, 4), torch.randn(3, 130), 0.0, 0), ValueError,
         r"backend='cuda' supports ranks up to 128, but r_a = 130; use backend='torch'"),
        (lambda: cb.kron_apply(torch.randn(2, 3, 4, dtype=torch.float64), torch.randn(1, 2, 3, dtype=torch.float64),
                               torch.randn(1, 4, 5, dtype=torch.float64)), TypeError,
         r"backend='cuda' computes in float32, bfloat16 or float16, not torch.float64; use backend='torch'"),
        (lambda: cb.kron_apply(torch.randn(2, 3, 4), torch.randn(17, 2, 3), torch.randn(17, 4, 5)), ValueError,
         r"Kronecker-sum kernels support the rank R up to 16, got 17; use backend='triton' or backend='torch'"),
        (lambda: cb.kron_grad_q(torch.randn(2, 65, 5), torch.randn(2, 3, 4), torch.randn(1, 4, 5)), ValueError,
         r"support NA up to 64, got 65; use backend='triton'"),
        (lambda: cb.kron_grad_p(torch.randn(2, 2, 5), torch.randn(2, 70, 4), torch.randn(1, 2, 70)), ValueError,
         r"support NI up to 64, got 70; use backend='triton'"),
    ],
)  # fmt: skip
def test_backend_layer_points_to_the_torch_backend(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


# ------------------------------------------------------------------------------------ results (GPU)
def rnd(*shape, **kw):
    return helpers.rnd(*shape, device="cuda", **kw)


def middle(kind, ra, rb, n_tasks, dtype, m):
    return helpers.random_middle(kind, ra, rb, n_tasks, dtype, m, device="cuda", run=3)


@pytest.fixture
def poison(ext):
    old = ext.set_poison(True)
    yield
    ext.set_poison(old)


@pytest.fixture(params=[False, True], ids=["atomic", "deterministic"])
def deterministic(request):
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(request.param, warn_only=True)
    yield request.param
    torch.use_deterministic_algorithms(old)


@needs_cuda
def test_dropout_mask_is_the_reference_hash(ext):
    """With A = identity, S = drop(x) exactly: the shrink kernel's mask and scale are the reference's."""
    x = rnd(37, 16)
    x = torch.where(x == 0, torch.ones_like(x), x)
    seed = int(torch.randint(2**32, 2**62, ()).item())
    S, _ = cb.shrink(x, torch.eye(16, device="cuda"), None, None, 0.4, seed)
    assert torch.equal(S.cpu(), ref.apply_dropout(x.cpu(), seed, 0.4))


@needs_cuda
def test_deterministic_mode_repeats_bit_for_bit():
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        first, again = helpers.reductions_twice(cb, rnd, middle, m=1031, d_in=129, d_out=67, r=16)
    finally:
        torch.use_deterministic_algorithms(old)
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@needs_cuda
def test_out_of_range_task_ids_give_nan_rows_without_a_host_sync(ext):
    """No op copies the ids to the host: a row with a bad id gets NaN in U, dS and the layer's output, and adds
    nothing to dC; the good rows keep the reference's values."""
    m, x, A, C = 6, rnd(6, 8), rnd(8, 2), rnd(3, 2, 2)
    for bad in ([0, 1, 2, 3, 0, 0], [0, -1, 0, 0, 0, 0]):
        ids = torch.tensor(bad, device="cuda")
        bad_rows = (ids < 0) | (ids >= 3)
        good = torch.where(bad_rows, torch.zeros_like(ids), ids)
        S, U = ext.shrink(x, A, C, ids, 0.0, 0)
        _, U_good = ext.shrink(x, A, C, good, 0.0, 0)
        assert torch.isnan(U[bad_rows]).all() and torch.equal(U[~bad_rows], U_good[~bad_rows])
        assert torch.isnan(ext.mid(S, C, ids)[bad_rows]).all()
        dS, dC = ext.grad_mid(S, rnd(m, 2), C, ids)
        assert torch.isnan(dS[bad_rows]).all() and torch.isfinite(dS[~bad_rows]).all() and torch.isfinite(dC).all()
        y = tk.tt_adapter(x, rnd(5, 8), None, A, C, rnd(2, 5), task_ids=ids, backend="cuda")
        assert torch.isnan(y[bad_rows]).all() and torch.isfinite(y[~bad_rows]).all()
    torch.cuda.synchronize()


@needs_cuda
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_ops_never_synchronize_with_the_host(ext, deterministic):
    """Every adapter op, task ids included, under torch's sync debug mode set to raise on a host sync."""
    m, d_in, d_out, ra, rb = 37, 96, 80, 16, 8
    x, A, C, B = rnd(m, d_in), rnd(d_in, ra), rnd(3, ra, rb), rnd(rb, d_out)
    ids, W, dy = torch.randint(0, 3, (m,), device="cuda"), rnd(d_out, d_in), rnd(m, d_out)
    old = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        S, U = ext.shrink(x, A, C, ids, 0.1, 3)
        ext.shrink(x[:1], A, None, None, 0.0, 3)  # split-K
        ext.mid(S, C, ids)
        ext.expand(x, W, None, U, B, 0.5)
        dU, _ = ext.grad_dy(dy, U, B, 0.5)
        dS, _ = ext.grad_mid(S, dU, C, ids)
        ext.grad_x(dy, W, dS, A, 0.1, 3)
        ext.grad_a(x, dS, 0.1, 3)
    finally:
        torch.cuda.set_sync_debug_mode(0)
        torch.use_deterministic_algorithms(old)
    torch.cuda.synchronize()


# -------------------------------------------------------------------------------- fused op, autograd
@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spec_name", sorted(helpers.FUSED_SPECS))
@pytest.mark.parametrize("m", [0, 1, 13, 97])
@pytest.mark.parametrize("dropout", [0.0, 0.25])
def test_tt_linear_forward_backward(poison, spec_name, m, dropout, dtype):
    make, index = helpers.FUSED_SPECS[spec_name]
    case = helpers.TTLinearCase(make(), index, m)
    kw = dict(scaling=0.5, dropout=dropout, seed=int(torch.randint(0, 2**62, ()).item()))
    got = case.run("cuda", dtype, "cuda", **kw)
    want64 = case.run("torch", torch.float64, "cpu", **kw)
    torch_lowp = case.run("torch", dtype, "cuda", **kw)
    helpers.check_case(case, got, want64, torch_lowp, dtype)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 64, 4099])
def test_real_shapes(m, dtype):
    torch.manual_seed(0)
    case = helpers.TTLinearCase(metatt_spec(4096, 4096, 4, 4, 16, tasks=3), {"layer": 1, "matrix": 2}, m, "cuda", 3)
    kw = dict(scaling=2.0, dropout=0.1, seed=7)
    got = case.run("cuda", dtype, "cuda", **kw)
    want64 = case.run("torch", torch.float64, "cuda", **kw)
    lowp = case.run("torch", dtype, "cuda", **kw)
    helpers.check_case(case, got, want64, lowp, dtype)


@needs_cuda
def test_saved_activations_are_x_plus_m_times_r():
    from test_memory import per_token_ratio

    d, r = 128, 16
    for kw in (dict(ranks=r), dict(in_modes=2, out_modes=2, ranks=r)):
        layer = tk.TTLinear(d, d, dropout=0.1, backend="cuda", **kw).cuda().train()
        ratio = per_token_ratio(layer, lambda n: torch.randn(n, d, device="cuda", requires_grad=True), 8, 40, d)
        assert 1.0 <= ratio <= 1 + r / d + 1e-9, ratio


@needs_cuda
def test_cuda_graph_capture_replays_the_eager_result():
    spec = metatt_spec(64, 48, 2, 3, 8, tasks=3)
    cores = [c.float().cuda().requires_grad_() for c in random_cores(spec)]
    W = torch.randn(48, 64, device="cuda") / 8
    x = torch.randn(33, 64, device="cuda")
    ids = torch.randint(0, 3, (33,), device="cuda")
    kw = dict(index={"layer": 1, "matrix": 2}, task_ids=ids, scaling=0.5, backend="cuda")

    def step():
        for c in cores:
            c.grad = None
        y = tk.tt_linear(x, W, None, cores, spec, **kw)
        y.square().sum().backward()
        return y

    y_eager = step().detach().clone()
    grads_eager = [c.grad.clone() for c in cores]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            step()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = step()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(y_static, y_eager)
    for c, g in zip(cores, grads_eager):
        torch.testing.assert_close(c.grad, g)


@needs_cuda
def test_compiles_fullgraph():
    layer = tk.TTLinear(64, 48, ranks=8, in_modes=2, out_modes=2, backend="cuda").cuda()
    for core in layer.cores:
        torch.nn.init.normal_(core, std=0.2)
    x = torch.randn(2, 9, 64, device="cuda")
    compiled = torch.compile(layer, fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x))


@needs_cuda
@pytest.mark.parametrize("op", sorted(_valid()))
def test_opcheck(ext, op):
    args = _valid("cuda")[op]
    torch.library.opcheck(getattr(ext, op), tuple(args), test_utils=("test_schema", "test_faketensor"))


@needs_cuda
def test_ttlinear_module_trains_with_cuda():
    torch.manual_seed(0)
    layer = tk.TTLinear(24, 20, ranks=4, in_modes=(4, 6), out_modes=(5, 4), dropout=0.1, backend="cuda")
    for core in layer.cores:
        torch.nn.init.normal_(core, std=0.3)
    twin = tk.TTLinear(24, 20, ranks=4, in_modes=(4, 6), out_modes=(5, 4), dropout=0.1, backend="torch")
    twin.load_state_dict(layer.state_dict())
    layer.cuda()
    twin.cuda()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    x = torch.randn(3, 5, 24, device="cuda")
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    y2 = twin(x)  # the same seed draw: the same dropout mask
    torch.testing.assert_close(y, y2, atol=1e-4, rtol=1e-4)
    losses = []
    for _ in range(5):
        loss = layer(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]


# ------------------------------------------------------------------ Kronecker-sum ops (ttm.cu), GPU results
# (M, R, NI, NJ, NA, NC): empty, one token, primes, NJ / NC over several tiles, the R = 16 / NI = NA = 64 edge,
# lopsided kept sizes, real sizes (d = 4096 as 64 x 64) with several token splits.
KRON_SHAPES = [
    (0, 3, 3, 7, 5, 11),
    (1, 1, 3, 7, 5, 11),
    (7, 3, 3, 7, 5, 11),
    (13, 3, 5, 70, 7, 130),
    (37, 16, 64, 9, 64, 17),
    (97, 2, 2, 130, 1, 70),
    (61, 4, 1, 33, 64, 5),
    (61, 4, 64, 3, 1, 20),
    (1031, 16, 64, 64, 64, 64),
    (4099, 4, 16, 256, 32, 131),
]


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("shape", KRON_SHAPES, ids=["x".join(map(str, s)) for s in KRON_SHAPES])
def test_kron_apply_and_grads(poison, shape, layout, dtype):
    x, dy, q, p = helpers.kron_case(shape, dtype, layout, device="cuda")
    helpers.check_kron_ops(cb, x, dy, q, p, dtype)


@needs_cuda
def test_kron_grads_repeat_bit_for_bit(ext):
    x, dy, q, p = helpers.kron_case((4099, 4, 16, 40, 32, 70), torch.float32, "transposed", device="cuda")
    first = (cb.kron_apply(x, q, p), cb.kron_grad_q(dy, x, p), cb.kron_grad_p(dy, x, q))
    again = (cb.kron_apply(x, q, p), cb.kron_grad_q(dy, x, p), cb.kron_grad_p(dy, x, q))
    for a, b in zip(first, again):
        assert torch.equal(a, b)
