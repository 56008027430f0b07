import math

import pytest
import torch

import ttkernels as tk
from helpers import TOL, dense_ref, metatt_spec, randn, random_cores, ttlora_spec
from ttkernels import reference as ref

OPS = torch.ops.ttkernels


def _problem(M=5, tasks=3, dtype=torch.float64, requires_grad=True):
    spec = metatt_spec(9, 7, 2, 2, 3, tasks=tasks)
    cores = random_cores(spec)
    A, C, B = ref.factors(cores, spec, {"layer": 1, "matrix": 0})
    x = randn(M, 9, dtype=dtype, requires_grad=requires_grad)
    W, b = randn(7, 9, dtype=dtype), randn(7, dtype=dtype)
    A, C, B = (t.to(dtype).detach().requires_grad_(requires_grad) for t in (A, C, B))
    ids = torch.randint(0, tasks, (M,)) if tasks else None
    return x, W, b, A, C, B, ids


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("tasks", [None, 3])
def test_opcheck_fused_ops(tasks, dropout):
    x, W, b, A, C, B, ids = _problem(tasks=tasks)
    seed = torch.tensor(77) if dropout else None
    torch.library.opcheck(OPS.tt_adapter_fwd.default, (x, W, b, A, C, B, ids, 0.5, dropout, seed, "torch"))
    torch.library.opcheck(
        OPS.tt_adapter_fwd.default,
        (x, W, None, A, None, A.detach().t().contiguous()[:, :7].requires_grad_(), None, 1.0, dropout, seed, "auto"),
    )
    dy = randn(5, 7)
    S = x.detach() @ A.detach()
    torch.library.opcheck(
        OPS.tt_adapter_bwd.default,
        (dy, x.detach(), W, A.detach(), C.detach(), B.detach(), S, ids, 0.5, dropout, seed, "torch", True),
    )


def test_opcheck_step_ops():
    x, W, b, A, C, B, ids = (t.detach() if isinstance(t, torch.Tensor) else t for t in _problem())
    seed = torch.tensor(3)
    S, U = OPS.shrink(x, A, C, ids, 0.1, seed, "torch")
    dy = randn(5, 7)
    dU, dB = OPS.grad_dy(dy, U, B, 0.5, "torch")
    dS, dC = OPS.grad_mid(S, dU, C, ids, "torch")
    for op, args in [
        (OPS.shrink, (x, A, C, ids, 0.1, seed, "torch")),
        (OPS.shrink, (x, A, None, None, 0.0, None, "torch")),
        (OPS.expand, (x, W, b, U, B, 0.5, "torch")),
        (OPS.grad_dy, (dy, U, B, 0.5, "torch")),
        (OPS.grad_mid, (S, dU, C, ids, "torch")),
        (OPS.grad_mid, (S, dU, None, None, "torch")),
        (OPS.grad_x, (dy, W, dS, A, 0.1, seed, "torch")),
        (OPS.grad_a, (x, dS, 0.1, seed, "torch")),
    ]:
        torch.library.opcheck(op.default, args, test_utils=("test_schema", "test_faketensor"))


def test_step_ops_compose_to_the_fused_op():
    x, W, b, A, C, B, ids = _problem()
    seed = torch.tensor(11)
    y, S = OPS.tt_adapter_fwd(x, W, b, A, C, B, ids, 0.5, 0.2, seed, "torch")
    y.backward(dy := randn(*y.shape))
    with torch.no_grad():
        S2, U = OPS.shrink(x, A, C, ids, 0.2, seed, "torch")
        torch.testing.assert_close(OPS.expand(x, W, b, U, B, 0.5, "torch"), y)
        dU, dB = OPS.grad_dy(dy, U, B, 0.5, "torch")
        dS, dC = OPS.grad_mid(S2, dU, C, ids, "torch")
        torch.testing.assert_close(OPS.grad_x(dy, W, dS, A, 0.2, seed, "torch"), x.grad)
        torch.testing.assert_close(OPS.grad_a(x, dS, 0.2, seed, "torch"), A.grad)
        torch.testing.assert_close(dC, C.grad)
        torch.testing.assert_close(dB, B.grad)


# ------------------------------------------------------------------------------------ backends
def test_backend_dispatch_errors():
    x, W, b, A, C, B, ids = _problem(tasks=None, requires_grad=False)
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'triton', 'cuda'\)"):
        tk.tt_adapter(x, W, b, A, C, B, backend="tpu")
    # float64 problem: the Triton kernels (run by the interpreter here, see conftest.py) refuse it
    with pytest.raises(TypeError, match="backend='triton' computes in float32, bfloat16 or float16"):
        tk.tt_adapter(x, W, b, A, C, B, backend="triton")
    if not torch.cuda.is_available():
        with pytest.raises(
            tk.BackendUnavailableError,
            match="backend='cuda' runs on CUDA tensors, but x is on cpu; this machine has no CUDA GPU",
        ):
            tk.tt_adapter(x, W, b, A, C, B, backend="cuda")
    for name in ("auto", "torch"):
        assert tk.ops.resolve_backend(name, torch.device("cpu")).name == "torch"
    with pytest.raises(ValueError, match="backend name must be one of"):
        tk.ops.register_backend(tk.ops.Backend("auto", *([None] * 6)))


# ------------------------------------------------------------------------------------ bad input
def test_bad_inputs_name_the_argument():
    x, W, b, A, C, B, ids = _problem(requires_grad=False)
    call = lambda **kw: tk.tt_adapter(**{**dict(x=x, weight=W, bias=b, A=A, C=C, B=B, task_ids=ids), **kw})
    cases = [
        (dict(x=x[:, :8]), ValueError, "x has last dimension 8 but in_features is 9"),
        (dict(x=x.long()), TypeError, "x must be a floating-point tensor, got torch.int64"),
        (dict(x=torch.tensor(1.0, dtype=torch.float64)), ValueError, "x must have shape .* 0-d tensor"),
        (dict(x=[1.0] * 9), TypeError, "x must be a torch.Tensor"),
        (dict(weight=W[:, :8]), ValueError, "x has last dimension 9 but in_features is 8"),
        (dict(weight=W.float()), TypeError, "weight is torch.float32 but the layer computes in torch.float64"),
        (dict(bias=b[:3]), ValueError, r"bias has shape \(3,\) but must be \(7,\)"),
        (dict(A=A[:4]), ValueError, r"A has shape \(4, 3\) but must be \(in_features=9, r_a\)"),
        (dict(B=B[:, :3]), ValueError, r"B has shape \(3, 3\) but must be \(r_b, out_features=7\)"),
        (dict(C=C[:, :2]), ValueError, r"C has shape \(3, 2, 3\) but must be"),
        (dict(task_ids=None), ValueError, "C has a per-sample axis of 3 tasks: pass task_ids"),
        (dict(task_ids=ids.float()), TypeError, "task_ids must be an integer tensor, got torch.float32"),
        (dict(task_ids=ids[:3]), ValueError, r"task_ids has shape \(3,\); it must be x's leading shape \(5,\)"),
        (dict(task_ids=ids.clone().fill_(3)), IndexError, r"task_ids must lie in \[0, 3\), got values from 3 to 3"),
        (dict(task_ids=ids.clone().fill_(-1)), IndexError, r"task_ids must lie in \[0, 3\)"),
        (dict(C=C[0], task_ids=ids), ValueError, "task_ids was given but C has no per-sample"),
        (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\), got 1.0"),
        (dict(dropout=-0.1), ValueError, r"dropout must be a float in \[0, 1\)"),
        (dict(A=A.to("meta")), ValueError, "A is on meta but x is on cpu"),
        (dict(task_ids=ids.to("meta")), ValueError, "task_ids is on meta but x is on cpu"),
        (dict(seed=-3, dropout=0.1), ValueError, "seed must be in"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            call(**kwargs)


def test_nan_propagates():
    x, W, b, A, C, B, ids = _problem(requires_grad=False)
    x = x.clone()
    x[2, 4] = float("nan")
    y = tk.tt_adapter(x, W, b, A, C, B, task_ids=ids)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()


# ------------------------------------------------------------------------------------ shapes/dtypes
@pytest.mark.parametrize("lead", [(0,), (1,), (13,), (2, 0, 3), (3, 1, 7)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_forward_backward_vs_float64(lead, dtype):
    spec = ttlora_spec()
    cores64 = random_cores(spec)
    W64, b64 = randn(spec.out_features, spec.in_features, scale=0.3), randn(spec.out_features)
    # inputs rounded to dtype first: the float64 truth sees the same values the kernels see, so the tolerance
    # measures the computation, not the rounding of the inputs
    x64 = randn(*lead, spec.in_features).to(dtype).double()
    dy64 = randn(*lead, spec.out_features).to(dtype).double()
    W64, b64 = W64.to(dtype).double(), b64.to(dtype).double()
    # float64 ground truth, with autograd through the dense reference
    xr = x64.clone().requires_grad_()
    cr = [c.clone().requires_grad_() for c in cores64]
    yr = dense_ref(xr, W64, b64, cr, spec, 0.8)
    yr.backward(dy64)

    x = x64.to(dtype).requires_grad_()
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32  # float32 adapter beside low precision
    cores = [c.to(cdtype).requires_grad_() for c in cores64]
    y = tk.tt_linear(x, W64.to(dtype), b64.to(dtype), cores, spec, scaling=0.8)
    y.backward(dy64.to(dtype))
    assert y.dtype == dtype and y.shape == (*lead, spec.out_features)
    assert x.grad.dtype == dtype and all(c.grad.dtype == cdtype for c in cores)
    # y and dx are sums of products rounded to dtype on the way (the factors, S, dS): where terms cancel, the error
    # is relative to the magnitudes of the terms, i.e. to the same computation on absolute values
    xa = x64.detach().abs().requires_grad_()
    ya = dense_ref(xa, W64.abs(), b64.abs(), [c.detach().abs() for c in cores64], spec, 0.8)
    ya.backward(dy64.abs())
    _assert_sum_close(y, yr, ya.detach(), dtype)
    _assert_sum_close(x.grad, xr.grad, xa.grad, dtype)
    for c, c_ref in zip(cores, cr):
        atol, rtol = TOL[dtype]
        scale = max(1.0, math.prod(lead) ** 0.5)  # rounding errors of sums over the M tokens grow like sqrt(M)
        torch.testing.assert_close(c.grad.double(), c_ref.grad, atol=atol * scale * 4, rtol=rtol * 4)


def _assert_sum_close(actual, expected, terms, dtype):
    atol, rtol = TOL[dtype]
    err = (actual.double() - expected.double()).abs()
    bound = atol + rtol * terms.double()
    assert actual.shape == expected.shape
    assert bool((err <= bound).all()), f"max error / bound = {float((err / bound).max()):.3f} ({dtype})"


def test_non_contiguous_input():
    spec = ttlora_spec()
    cores = random_cores(spec)
    W, b = randn(spec.out_features, spec.in_features), randn(spec.out_features)
    base = randn(spec.in_features, 6, 2)
    x = base.permute(2, 1, 0)  # (2, 6, in) non-contiguous
    assert not x.is_contiguous()
    torch.testing.assert_close(tk.tt_linear(x, W, b, cores, spec, scaling=1.1), dense_ref(x, W, b, cores, spec, 1.1))


def test_per_sample_ids_prefix_shape():
    spec = metatt_spec(tasks=3)
    cores = random_cores(spec)
    W, b = randn(10, 12), randn(10)
    x = randn(4, 5, 12)
    ids = torch.randint(0, 3, (4,), dtype=torch.int32)
    y = tk.tt_linear(x, W, b, cores, spec, index={"layer": 1, "matrix": 2}, task_ids=ids, scaling=0.5)
    expected = dense_ref(x, W, b, cores, spec, 0.5, {"layer": 1, "matrix": 2}, ids[:, None].expand(4, 5))
    torch.testing.assert_close(y, expected)


# ------------------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_matches_eager(backend):
    torch._dynamo.reset()
    layer = tk.TTLinear(12, 10, in_modes=2, out_modes=2, ranks=3, dropout=0.2)
    for c in layer.cores:
        torch.nn.init.normal_(c, std=0.3)
    x = randn(3, 4, 12, dtype=torch.float32)
    seed = 1234
    torch.manual_seed(seed)
    y_eager = layer(x)
    y_eager.sum().backward()
    g_eager = [c.grad.clone() for c in layer.cores]
    layer.zero_grad()
    compiled = torch.compile(layer, backend=backend, fullgraph=True)
    torch.manual_seed(seed)
    # Inductor draws the dropout seed with its own RNG unless told to use eager's.
    with torch._inductor.config.patch(fallback_random=True):
        y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, ge in zip((c.grad for c in layer.cores), g_eager):
        torch.testing.assert_close(g, ge)


def test_step_ops_refuse_gradients_and_double_backward_is_refused():
    x, W, b, A, C, B, ids = _problem()
    with pytest.raises(
        RuntimeError, match=r"torch.ops.ttkernels.shrink is not differentiable; use ttkernels.tt_adapter"
    ):
        OPS.shrink(x, A, C, ids, 0.0, None, "torch")
    with torch.no_grad():
        S, U = OPS.shrink(x, A, C, ids, 0.0, None, "torch")  # fine without autograd
    assert S.shape == (5, 3)
    y = tk.tt_adapter(x, W, b, A, C, B, task_ids=ids)
    (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        g.sum().backward()
