"""Step 1 and step 8 in Triton: the factors A, B from the cores and the cores' gradients, one launch per side.

``ttkernels.ops.factors(..., backend="triton")`` compared with ``ttkernels.reference.factors`` in float64
(through torch autograd) for chains of 2 to 4 cores with awkward sizes, per-bond ranks and fixed index cores
inside a side; poisoned outputs; deterministic mode; the fallbacks; opcheck and torch.compile. Runs in
Triton's interpreter without a GPU (see conftest.py), on CUDA tensors with one.
"""

from __future__ import annotations

import pytest
import torch

import ttkernels as tk
from helpers import lora_spec, metatt_spec, random_cores, ttlora_spec
from ttkernels import reference as ref
from ttkernels.spec import Mode, TTSpec

pytest.importorskip("triton")
from ttkernels._triton_kernels import _common


def tfactors(cores, spec, index=None, dtype=None):
    return tk.ops.factors(cores, spec, index, dtype=dtype, backend="triton")


DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

SPECS = {
    "lora": (lambda: lora_spec(13, 11, 4), None),
    "ttlora": (ttlora_spec, None),
    "ttlora_3x2": (lambda: TTSpec.linear(60, 24, in_modes=3, out_modes=2, ranks=(3, 5, 4, 2)), None),
    "ttlora_4x4": (lambda: TTSpec.linear(81, 16, in_modes=4, out_modes=4, ranks=17), None),
    "metatt_tasks": (lambda: metatt_spec(12, 10, 3, 4, 3, tasks=4), {"layer": 2, "matrix": 1}),
    "index_in_sides": (
        lambda: TTSpec(
            (Mode.index("layer", 3), Mode(4, "in", "i0"), Mode(5, "in", "i1"),
             Mode(3, "out", "o0"), Mode.index("head", 2), Mode(2, "out", "o1")),
            (2, 3, 4, 3, 2),
        ),
        {"layer": 2, "head": 1},
    ),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setattr(_common, "POISON", True)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_factors_and_core_gradients_match_the_reference(name, dtype):
    make, index = SPECS[name]
    spec = make()
    cores64 = random_cores(spec)
    cores = [c.float().to(DEVICE).requires_grad_() for c in cores64]
    A, C, B = tfactors(cores, spec, index, dtype=dtype)
    ref64 = [c.clone().requires_grad_() for c in cores64]
    A64, C64, B64 = ref.factors(ref64, spec, index)
    assert A.dtype == dtype and B.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(A.double().cpu(), A64, atol=tol, rtol=tol)
    torch.testing.assert_close(B.double().cpu(), B64, atol=tol, rtol=tol)
    if C64 is None:
        assert C is None
    else:
        torch.testing.assert_close(C.double().cpu(), C64, atol=1e-5, rtol=1e-5)
    wA, wB = torch.randn_like(A64), torch.randn_like(B64)
    loss = (A.float() * wA.float().to(DEVICE)).sum() + (B.float() * wB.float().to(DEVICE)).sum()
    loss64 = (A64 * wA).sum() + (B64 * wB).sum()
    if C64 is not None:
        wC = torch.randn_like(C64)
        loss = loss + (C * wC.float().to(DEVICE)).sum()
        loss64 = loss64 + (C64 * wC).sum()
    loss.backward()
    loss64.backward()
    gtol = 1e-4 if dtype == torch.float32 else 2e-2
    for k, (c, c64) in enumerate(zip(cores, ref64)):
        assert c.grad is not None and torch.isfinite(c.grad).all(), f"core {k}"
        torch.testing.assert_close(c.grad.double().cpu(), c64.grad, atol=gtol, rtol=gtol, msg=f"core {k}")


def test_one_launch_per_side(monkeypatch):
    spec = TTSpec.linear(81, 16, in_modes=4, out_modes=4, ranks=5)
    cores = [c.float().to(DEVICE).requires_grad_() for c in random_cores(spec)]
    launches = []
    real = _common.run
    monkeypatch.setattr(_common, "run", lambda k, *a, **kw: (launches.append(k.__name__), real(k, *a, **kw)))
    A, C, B = tfactors(cores, spec)
    assert launches == ["_side_fwd_kernel", "_side_fwd_kernel"]
    (A.sum() + B.sum()).backward()
    assert launches[2:] == ["_side_bwd_kernel", "_side_bwd_kernel"]


def test_deterministic_mode_repeats_bit_for_bit():
    spec = TTSpec.linear(81, 16, in_modes=4, out_modes=2, ranks=5)
    cores64 = random_cores(spec)
    runs = []
    torch.use_deterministic_algorithms(True)
    try:
        for _ in range(2):
            cores = [c.float().to(DEVICE).requires_grad_() for c in cores64]
            A, C, B = tfactors(cores, spec)
            (A.square().sum() + B.sum()).backward()
            runs.append([A.detach(), B.detach(), *[c.grad for c in cores]])
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    ref64 = [c.clone().requires_grad_() for c in cores64]
    A64, _, B64 = ref.factors(ref64, spec)
    (A64.square().sum() + B64.sum()).backward()
    for g, c64 in zip(runs[0][2:], ref64):
        torch.testing.assert_close(g.double().cpu(), c64.grad, atol=1e-4, rtol=1e-4)


def test_fallbacks_use_the_reference(monkeypatch):
    launches = []
    monkeypatch.setattr(_common, "run", lambda k, *a, **kw: launches.append(k.__name__))
    spec = ttlora_spec()
    cores = [c.to(DEVICE) for c in random_cores(spec)]  # float64: no Triton kernel
    A, C, B = tfactors(cores, spec)
    A64, _, B64 = ref.factors([c.cpu() for c in cores], spec)
    torch.testing.assert_close(A.cpu(), A64)
    long = TTSpec.linear(2**9, 6, in_modes=9, out_modes=1, ranks=2)  # 9 cores on the A side
    A, _, _ = tfactors([c.float().to(DEVICE) for c in random_cores(long)], long)
    assert A.shape == (2**9, 2)
    assert launches == []
    with pytest.raises(ValueError, match="cores has 4 tensors but the spec has 5 modes"):
        tfactors([c.float() for c in cores[:4]], spec)


def test_opcheck_factor_ops():
    spec = TTSpec.linear(60, 24, in_modes=3, out_modes=2, ranks=(3, 5, 4, 2))
    cores = [c.float().to(DEVICE) for c in random_cores(spec)]
    plans = tk.ops.side_plans(spec, {})
    for order, divisors, fixed, transposed, rows, r_out in plans:
        chain = [cores[k].requires_grad_() for k in order]
        args = (chain, divisors, fixed, transposed, rows, r_out, torch.float32)
        torch.library.opcheck(torch.ops.ttkernels.tt_factor_side.default, args)
        dout = torch.randn(*((r_out, rows) if transposed else (rows, r_out)), device=DEVICE)
        bargs = (dout, [c.detach() for c in chain], divisors, fixed, transposed, rows, r_out)
        torch.library.opcheck(
            torch.ops.ttkernels.tt_factor_side_bwd.default, bargs, test_utils=("test_schema", "test_faketensor")
        )


def test_ttlinear_with_triton_compiles_fullgraph():
    layer = tk.TTLinear(24, 20, ranks=4, in_modes=(4, 6), out_modes=(5, 2, 2), backend="triton").to(DEVICE)
    for core in layer.cores:
        torch.nn.init.normal_(core, std=0.3)
    x = torch.randn(5, 24, device=DEVICE, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    want = [y.detach(), x.grad.clone(), *[c.grad.clone() for c in layer.cores]]
    x.grad = None
    layer.zero_grad()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y2 = compiled(x)
    y2.square().sum().backward()
    got = [y2.detach(), x.grad, *[c.grad for c in layer.cores]]
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
