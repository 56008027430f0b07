"""The lean eager path of ``TTLinear`` (torch backend) and the no-host-synchronization guarantee.

* The lean path (plain torch ops, cores checked once, factors kept per core version) against the float64
  reference, forward and backward, at awkward shapes (one token, primes, an empty batch, 3-D inputs), with index
  modes and per-sample tasks, and kept factors that follow every way cores change.
* In-then-out chains with more than one core on a side (one autograd.Function, ttkernels.lean): gradcheck and
  gradgradcheck in float64, every gradient (cores, x, weight, bias) against the float64 reference, plans kept
  per core version and rebuilt after steps, in-place changes refused, double backward, activation
  checkpointing, torch.func and forward AD, non-contiguous cores, and what still goes to the fused op.
* No host read of a tensor (``item``, ``bool``, ``int``, ``float``, ``tolist``, ``cpu``, ``numpy``) runs inside
  forward and backward of the torch backend and the Python layers: the reads are trapped while they run.
* A seed tensor gives the mask of its value, hashed where it lives.
* On a GPU (skipped here): ``TTLinear`` with dropout and task ids captured in a CUDA graph draws a fresh mask
  at each replay and gives eager's gradients for the same generator state; ``torch.compile(mode=
  "reduce-overhead")`` runs ``TTLinear`` and ``MetaTTModel``.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

import ttkernels as tk
from helpers import TOL, dense_ref, metatt_spec, random_cores
from ttkernels import MetaTTConfig, get_metatt_model, quantized

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
CUDA = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


def _layer(d_in, d_out, in_modes, out_modes, dtype, seed_cores=True):
    layer = tk.TTLinear(d_in, d_out, ranks=3, in_modes=in_modes, out_modes=out_modes, dtype=dtype)
    if seed_cores:
        with torch.no_grad():
            for c in layer.cores:
                c.normal_(0.0, 0.5)
    return layer


def _fwd_bwd_vs_reference(layer, x, task_ids=None):
    """Forward and backward of ``layer`` against the float64 dense reference (its own autograd)."""
    dtype = x.dtype
    x = x.clone().requires_grad_()
    kw = {} if task_ids is None else {"task_ids": task_ids}
    y = layer(x, **kw)
    y.backward(g := torch.randn_like(y))
    cores64 = [c.detach().double().requires_grad_() for c in layer.cores]
    x64 = x.detach().double().requires_grad_()
    ids = None
    if task_ids is not None:
        ids = task_ids.reshape(task_ids.shape + (1,) * (x.dim() - 1 - task_ids.dim())).expand(x.shape[:-1])
    w, b = layer.weight.double(), None if layer.bias is None else layer.bias.double()
    y64 = dense_ref(x64, w, b, cores64, layer.spec, layer.scaling, layer.index, ids).reshape(y.shape)
    y64.backward(g.double())
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y.double(), y64, atol=atol, rtol=rtol)
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=atol, rtol=rtol)
    for k, (c, c64) in enumerate(zip(layer.cores, cores64)):
        torch.testing.assert_close(c.grad.double(), c64.grad, atol=atol * 10, rtol=rtol * 10, msg=f"cores[{k}]")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "d_in,d_out,in_modes,out_modes",
    [(12, 10, None, None), (12, 12, 2, 2), (21, 30, (3, 7), (5, 2, 3)), (13, 7, None, None)],
)
@pytest.mark.parametrize("lead", [(1,), (7,), (0,), (2, 3)])
def test_lean_path_matches_the_reference(dtype, d_in, d_out, in_modes, out_modes, lead):
    layer = _layer(d_in, d_out, in_modes, out_modes, dtype)
    _fwd_bwd_vs_reference(layer, torch.randn(*lead, d_in, dtype=dtype))
    with torch.no_grad():  # the kept factors
        x = torch.randn(*lead, d_in, dtype=dtype)
        first, second = layer(x), layer(x)
        assert torch.equal(first, second)
        expected = dense_ref(x, layer.weight, layer.bias, list(layer.cores), layer.spec, layer.scaling)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(second.double(), expected.reshape(second.shape), atol=atol, rtol=rtol)


def test_lean_path_with_index_modes_and_tasks():
    spec = metatt_spec(12, 10, layers=2, matrices=2, r=3, tasks=4)
    cores = nn.ParameterList([nn.Parameter(c) for c in random_cores(spec)])
    layer = tk.TTLinear.from_cores(nn.Linear(12, 10, dtype=torch.float64), cores, spec, index={"layer": 1, "matrix": 0})
    _fwd_bwd_vs_reference(layer, torch.randn(3, 5, 12, dtype=torch.float64), torch.tensor([3, 0, 2]))
    spec = metatt_spec(12, 10, layers=2, matrices=2, r=3)
    cores = nn.ParameterList([nn.Parameter(c) for c in random_cores(spec)])
    layer = tk.TTLinear.from_cores(nn.Linear(12, 10, dtype=torch.float64), cores, spec, index={"layer": 0, "matrix": 1})
    _fwd_bwd_vs_reference(layer, torch.randn(1, 12, dtype=torch.float64))


@pytest.mark.parametrize("in_modes,out_modes", [(None, None), (2, 2)])
def test_kept_factors_follow_every_change_of_the_cores(in_modes, out_modes):
    layer = _layer(12, 12, in_modes, out_modes, torch.float64)
    x = torch.randn(4, 12, dtype=torch.float64)

    def expected():
        return dense_ref(x, layer.weight, layer.bias, list(layer.cores), layer.spec, layer.scaling)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected())
        torch.testing.assert_close(layer(x), expected())  # grad mode too

    check()
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer(x).square().sum().backward()
    opt.step()  # in place: versions change
    check()
    with torch.no_grad():
        layer.cores[0].mul_(-2.0)
    check()
    layer.cores[0].data = torch.randn_like(layer.cores[0])  # a storage swap, no version change
    check()
    layer.load_state_dict({k: torch.randn_like(v) for k, v in layer.state_dict().items()})
    check()
    layer.cores[-1] = nn.Parameter(torch.randn_like(layer.cores[-1]))  # a new Parameter
    check()
    layer.replace_cores([torch.randn(s, dtype=torch.float64) for s in layer.spec.core_shapes])
    check()
    other = copy.deepcopy(layer)
    with torch.no_grad():
        other.cores[0].add_(1.0)
        torch.testing.assert_close(layer(x), expected())
    with pytest.raises(ValueError, match=r"cores\[0\] has shape"):
        layer.cores[0] = nn.Parameter(torch.randn(1, 5, 3, dtype=torch.float64))
        layer(x)


def test_lean_path_refuses_what_the_op_refuses():
    layer = _layer(8, 8, None, None, torch.float32)
    with pytest.raises(TypeError, match=r"weight is torch\.float32 but the layer computes in torch\.float64"):
        layer(torch.randn(2, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="x has last dimension 7"):
        layer(torch.randn(2, 7))


# --------------------------------------------------------------------------- chains: one autograd node
# In-then-out chains run as one autograd node in grad mode (ttkernels.lean): the C++ node of ttkernels._lean
# where it is built, else the Python autograd.Function. Every chain test runs on both ("impl").
CHAINS = [((3, 4), (2, 5)), ((2, 2, 3), (10,)), ((12,), (2, 5)), ((3, 2, 2), (5, 2)), ((12,), (10,))]
LEAN_NODES = ("TTLinearLeanBackward", "LeanAdapterBackward")


@pytest.fixture(params=["native", "python"])
def impl(request, monkeypatch):
    """Which lean node the layers build: the C++ one (skipped where ttkernels._lean is not built: setup.py says
    why at install; with TTKERNELS_REQUIRE_HOST_EXT=1, as in CI, that fails) or the Python autograd.Function."""
    from ttkernels import lean

    if request.param == "native":
        if lean._load_native() is None:
            why = "ttkernels._lean is not built here (setup.py builds it where torch and a C++ compiler are)"
            if os.environ.get("TTKERNELS_REQUIRE_HOST_EXT") == "1":
                pytest.fail(f"TTKERNELS_REQUIRE_HOST_EXT=1 but {why}, or TTKERNELS_LEAN_NATIVE=0 is set")
            pytest.skip(why)
        monkeypatch.setattr(lean, "NATIVE", lean._load_native())
    else:
        monkeypatch.setattr(lean, "NATIVE", None)
    return request.param


def test_lean_native_0_asks_for_the_python_node(monkeypatch):
    from ttkernels import lean

    monkeypatch.setenv("TTKERNELS_LEAN_NATIVE", "0")
    assert lean._load_native() is None
    monkeypatch.setattr(lean, "NATIVE", None)
    layer = _chain_layer((3, 4), (2, 5))
    assert layer(torch.randn(2, 12, dtype=torch.float64)).grad_fn.name() == "LeanAdapterBackward"


def _lean_node(y) -> bool:
    """y came out of a lean node (either implementation)."""
    return y.grad_fn is not None and y.grad_fn.name() in LEAN_NODES


def _chain_layer(in_modes, out_modes, *, alpha=None, bias=True, dtype=torch.float64):
    layer = tk.TTLinear(12, 10, ranks=3, in_modes=in_modes, out_modes=out_modes, alpha=alpha, bias=bias, dtype=dtype)
    with torch.no_grad():
        for c in layer.cores:
            c.normal_(0.0, 0.5)
    return layer


def _lean_apply(last_in, scaling):
    """The lean node on fresh cores: the plan built from the values it is called with."""
    from ttkernels import lean

    def f(x, w, b, *cores):
        return lean.make_plan(cores, last_in, scaling).forward(x, w, b)

    return f


@pytest.mark.parametrize("in_modes,out_modes", CHAINS)
@pytest.mark.parametrize("lead", [(1,), (2, 3)])
def test_lean_adapter_gradcheck_and_gradgradcheck(in_modes, out_modes, lead, impl):
    layer = _chain_layer(in_modes, out_modes, alpha=5.0)
    assert layer.scaling != 1.0
    cores = [c.detach().clone().requires_grad_() for c in layer.cores]
    w = torch.randn(10, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(10, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*lead, 12, dtype=torch.float64, requires_grad=True)
    f = _lean_apply(layer.spec.last_in, layer.scaling)
    assert torch.autograd.gradcheck(f, (x, w, b, *cores))
    assert torch.autograd.gradgradcheck(f, (x, w, b, *cores))


@pytest.mark.parametrize("in_modes,out_modes", CHAINS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_chain_layer_gradients_of_everything_match_the_reference(in_modes, out_modes, dtype, impl):
    layer = _chain_layer(in_modes, out_modes, alpha=6.0, dtype=dtype)
    layer.weight.requires_grad_(True)
    layer.bias.requires_grad_(True)
    for lead in [(1,), (5,), (0,), (2, 3)]:
        layer.zero_grad()
        x = torch.randn(*lead, 12, dtype=dtype, requires_grad=True)
        y = layer(x)
        if impl == "native":
            assert y.grad_fn.name() == "TTLinearLeanBackward"
        else:  # the Python path leaves the LoRA-shaped chain to plain torch ops
            assert _lean_node(y) == (layer.spec.num_cores > 2)
        y.backward(g := torch.randn_like(y))
        cores64 = [c.detach().double().requires_grad_() for c in layer.cores]
        x64, w64, b64 = (t.detach().double().requires_grad_() for t in (x, layer.weight, layer.bias))
        y64 = dense_ref(x64, w64, b64, cores64, layer.spec, layer.scaling)
        y64.backward(g.double())
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(y.double(), y64, atol=atol, rtol=rtol)
        for got, want, name in [(x, x64, "x"), (layer.weight, w64, "weight"), (layer.bias, b64, "bias")]:
            torch.testing.assert_close(got.grad.double(), want.grad, atol=atol * 10, rtol=rtol * 10, msg=name)
        for k, (c, c64) in enumerate(zip(layer.cores, cores64)):
            torch.testing.assert_close(c.grad.double(), c64.grad, atol=atol * 10, rtol=rtol * 10, msg=f"cores[{k}]")


def test_chain_layer_with_frozen_cores_and_no_bias(impl):
    layer = _chain_layer((3, 4), (2, 5), bias=False)
    layer.cores[1].requires_grad_(False)
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.cores[1].grad is None and all(layer.cores[k].grad is not None for k in (0, 2, 3))
    expected = _reference_grads(layer, x.detach())
    for k in (0, 2, 3):
        torch.testing.assert_close(layer.cores[k].grad, expected[k])
    x.grad = None
    with torch.no_grad():
        y = layer(x)
    assert y.grad_fn is None


def test_chain_plan_built_under_inference_mode_serves_training(impl):
    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(3, 4, 12, dtype=torch.float64)
    with torch.inference_mode():
        first = layer(x)
    y = layer(x)
    torch.testing.assert_close(y, first)
    y.square().sum().backward()
    for g, e in zip([c.grad for c in layer.cores], _reference_grads(layer, x)):
        torch.testing.assert_close(g, e)


def test_chain_with_a_non_contiguous_core_builds_its_factors_with_torch_ops(impl):
    layer = _chain_layer((3, 4), (2, 5))
    shape = layer.cores[1].shape
    layer.cores[1] = nn.Parameter(torch.randn(shape[2], shape[1], shape[0], dtype=torch.float64).permute(2, 1, 0))
    assert not layer.cores[1].is_contiguous()
    x = torch.randn(3, 12, dtype=torch.float64)
    y = layer(x)
    assert not _lean_node(y)
    y.square().sum().backward()
    for g, e in zip([c.grad for c in layer.cores], _reference_grads(layer, x)):
        torch.testing.assert_close(g, e)


def _reference_grads(layer, x):
    cores64 = [c.detach().double().requires_grad_() for c in layer.cores]
    y = dense_ref(x, layer.weight, layer.bias, cores64, layer.spec, layer.scaling)
    return torch.autograd.grad(y.square().sum(), cores64)


def test_chain_plan_is_kept_per_version_and_rebuilt_after_a_step(monkeypatch, impl):
    from ttkernels import lean

    plans = []
    make_plan = lean.make_plan
    monkeypatch.setattr(lean, "make_plan", lambda *a: plans.append(1) or make_plan(*a))
    layer = _chain_layer((3, 4), (2, 5))
    opt = torch.optim.SGD(layer.parameters(), lr=1e-3)
    x = torch.randn(3, 12, dtype=torch.float64)
    for step in range(3):
        opt.zero_grad()
        for _ in range(2):  # two micro-batches on one version: one plan
            y = layer(x)
            assert _lean_node(y)
            y.square().sum().backward()
        assert len(plans) == step + 1
        grads = [c.grad.clone() for c in layer.cores]
        expected = _reference_grads(layer, x)
        for g, e in zip(grads, expected):
            torch.testing.assert_close(g, 2 * e)
        opt.step()
    layer.cores[0].data = torch.randn_like(layer.cores[0])  # a new storage, same version: a new plan
    layer.zero_grad()
    layer(x).square().sum().backward()
    assert len(plans) == 4
    for g, e in zip([c.grad for c in layer.cores], _reference_grads(layer, x)):
        torch.testing.assert_close(g, e)
    layer.alpha, layer.scaling = 6.0, 2.0  # a new scaling: a new plan
    with torch.no_grad():
        torch.testing.assert_close(layer(x), dense_ref(x, layer.weight, layer.bias, list(layer.cores), layer.spec, 2.0))
    assert len(plans) == 5
    layer.cores[3] = nn.Parameter(torch.randn_like(layer.cores[3]))  # a new Parameter: checked again, a new plan
    layer(x).square().sum().backward()
    assert len(plans) == 6
    torch.testing.assert_close(layer.cores[3].grad, _reference_grads(layer, x)[3])


def test_chain_backward_refuses_cores_or_weight_changed_in_place(impl):
    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        layer.cores[2].mul_(2.0)
    with pytest.raises(RuntimeError, match=r"modified by an inplace operation: cores\[2\]"):
        y.sum().backward()
    y = layer(x)
    with torch.no_grad():
        layer.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation: the base weight"):
        y.sum().backward()
    y = layer(x.detach())  # without dx the weight is not needed (as torch's linear)
    with torch.no_grad():
        layer.weight.add_(1.0)
    y.sum().backward()
    y = layer(x)
    with torch.no_grad():
        x.mul_(2.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


@pytest.mark.parametrize("in_modes,out_modes", CHAINS[:2])
def test_chain_double_backward_matches_the_reference(in_modes, out_modes, impl):
    layer = _chain_layer(in_modes, out_modes, alpha=4.0)
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    (gx,) = torch.autograd.grad(layer(x).square().sum(), x, create_graph=True)
    gx.square().sum().backward()
    cores64 = [c.detach().clone().requires_grad_() for c in layer.cores]
    x64 = x.detach().clone().requires_grad_()
    y64 = dense_ref(x64, layer.weight, layer.bias, cores64, layer.spec, layer.scaling)
    (gx64,) = torch.autograd.grad(y64.square().sum(), x64, create_graph=True)
    gx64.square().sum().backward()
    torch.testing.assert_close(gx.detach(), gx64.detach())
    torch.testing.assert_close(x.grad, x64.grad)
    for c, c64 in zip(layer.cores, cores64):
        torch.testing.assert_close(c.grad, c64.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_chain_under_activation_checkpointing(reentrant, impl):
    from torch.utils.checkpoint import checkpoint

    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    layer(torch.tanh(x)).square().sum().backward()
    plain = [x.grad.clone()] + [c.grad.clone() for c in layer.cores]
    x.grad = None
    layer.zero_grad()
    checkpoint(lambda t: layer(torch.tanh(t)), x, use_reentrant=reentrant).square().sum().backward()
    for a, b in zip([x.grad] + [c.grad for c in layer.cores], plain):
        torch.testing.assert_close(a, b)


def test_chain_under_torch_func_and_forward_ad_uses_torch_autograd(impl):
    from torch.autograd import forward_ad
    from torch.func import functional_call, grad

    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(4, 12, dtype=torch.float64)
    params = {k: v.detach() for k, v in layer.named_parameters()}
    keys = [k for k in params if k.startswith("cores")]
    g = grad(lambda p: functional_call(layer, {**params, **p}, (x,)).square().sum())({k: params[k] for k in keys})
    expected = _reference_grads(layer, x)
    for k, e in zip(keys, expected):
        torch.testing.assert_close(g[k], e)
    t = torch.randn_like(x)
    with forward_ad.dual_level():
        y = layer(forward_ad.make_dual(x, t))
        tangent = forward_ad.unpack_dual(y).tangent
    torch.testing.assert_close(tangent, layer.scaling * t @ layer.delta_weight(scaled=False).t() + t @ layer.weight.t())


@pytest.mark.parametrize("in_modes,out_modes", [((3, 4), (2, 5)), ((12,), (10,))])
def test_chain_node_grad_of_a_subset_retain_graph_and_a_second_backward(in_modes, out_modes, impl):
    """torch.autograd.grad of some inputs gives exactly those (the rest stay unset), retain_graph serves a second
    backward, and a second backward without it is refused as torch refuses it."""
    layer = _chain_layer(in_modes, out_modes, alpha=3.0)
    layer.weight.requires_grad_(True)
    x = torch.randn(2, 3, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert _lean_node(y) or (impl == "python" and layer.spec.num_cores == 2)
    g = torch.randn_like(y)
    gx, g0, gw = torch.autograd.grad(y, [x, layer.cores[0], layer.weight], g, retain_graph=True)
    assert layer.cores[0].grad is None and x.grad is None
    cores64 = [c.detach().requires_grad_() for c in layer.cores]
    x64, w64 = x.detach().requires_grad_(), layer.weight.detach().requires_grad_()
    y64 = dense_ref(x64, w64, layer.bias, cores64, layer.spec, layer.scaling)
    want = torch.autograd.grad(y64, [x64, cores64[0], w64], g)
    for got, exp in zip((gx, g0, gw), want):
        torch.testing.assert_close(got, exp)
    y.backward(g, retain_graph=True)
    y.backward(g)
    torch.testing.assert_close(
        layer.cores[-1].grad,
        2 * torch.autograd.grad(dense_ref(x64, w64, layer.bias, cores64, layer.spec, layer.scaling), cores64[-1], g)[0],
    )
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.backward(g)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (0,)])
def test_chain_node_on_a_transposed_base_weight(lead, impl):
    """A weight stored (in, out) (transformers' Conv1D) reaches the node as a transposed view: the output and
    every gradient, the stored weight's included, match the float64 reference."""
    from ttkernels import lean

    layer = _chain_layer((3, 4), (2, 5), alpha=2.0)
    stored = torch.randn(12, 10, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    x = torch.randn(*lead, 12, dtype=torch.float64, requires_grad=True)
    y = lean.make_plan(list(layer.cores), layer.spec.last_in, layer.scaling).forward(x, stored.t(), bias)
    assert _lean_node(y)
    y.backward(g := torch.randn_like(y))
    leaves = [x, stored, bias, *layer.cores]
    ref = [t.detach().clone().requires_grad_() for t in leaves]
    y64 = dense_ref(ref[0], ref[1].t(), ref[2], ref[3:], layer.spec, layer.scaling)
    y64.backward(g)
    torch.testing.assert_close(y, y64)
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("opt", ["adam-fused", "sgd-fused", "adamw-foreach"])
def test_kept_plans_and_factors_follow_an_optimizer_step_that_does_not_bump_versions(opt, impl):
    """torch.optim's fused kernels write the parameters without moving their version counters: every optimizer
    step still rebuilds what the layers keep (the chain's plan, the no-grad factors, a merged weight)."""
    make = {
        "adam-fused": lambda p: torch.optim.Adam(p, lr=0.1, fused=True),
        "sgd-fused": lambda p: torch.optim.SGD(p, lr=0.5, fused=True),
        "adamw-foreach": lambda p: torch.optim.AdamW(p, lr=0.1, foreach=True),
    }[opt]
    chain = _chain_layer((3, 4), (2, 5), alpha=2.0)
    metatt = get_metatt_model(_Two(), MetaTTConfig(["q"], rank=3, alpha=2.0)).double()
    with torch.no_grad():
        for c in metatt.parameters():
            if c.requires_grad:
                c.normal_(0.0, 0.5)
    x = torch.randn(3, 12, dtype=torch.float64)
    for model in (chain, metatt):
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make(params)
        model(x).square().sum().backward()
        with torch.no_grad():
            model(x)  # the no-grad factors kept
        before = [p._version for p in params]
        optimizer.step()
        moved = [p._version for p in params] != before
        assert moved == (opt == "adamw-foreach")  # what makes the step invisible to version keys
        want = _metatt_dense(metatt, x) if model is metatt else _dense(chain, x)
        torch.testing.assert_close(model(x), want)
        with torch.no_grad():
            torch.testing.assert_close(model(x), want)
        if model is chain:  # a step while merged: the merged weight follows the cores
            w0 = chain.weight.detach().clone()
            model.merge()
            torch.testing.assert_close(model(x), want)
            optimizer.step()  # the gradients of before
            with torch.no_grad():
                moved = dense_ref(x, w0, chain.bias, list(chain.cores), chain.spec, chain.scaling)
            assert not torch.allclose(moved, want)
            torch.testing.assert_close(model(x), moved)
            model.unmerge()
            torch.testing.assert_close(chain.weight, w0, atol=0, rtol=0)


class _Two(nn.Module):
    """Two layers with a q projection each (MetaTT places its targets by layer number)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.ModuleDict({"q": nn.Linear(12, 10)}) for _ in range(2)])

    def forward(self, x):
        return sum(block["q"](x) for block in self.layers)


def _metatt_dense(model, x):
    """The MetaTT model's output from its views' delta-W (float64, torch ops)."""
    with torch.no_grad():
        views = [block["q"] for block in model.model.layers]
        return sum(nn.functional.linear(x, m.weight + m.delta_weight(), m.bias) for m in views)


def _dense(layer, x):
    with torch.no_grad():
        return dense_ref(x, layer.weight, layer.bias, list(layer.cores), layer.spec, layer.scaling)


def test_chain_hooks_and_retain_grad_run_once_under_create_graph(impl, monkeypatch):
    """Double backward recomputes from aliases of the inputs: a hook on a core or on x, and x.retain_grad(), see
    one gradient each, as with plain torch ops."""
    layer = _chain_layer((3, 4), (2, 5), alpha=2.0)
    x0 = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)

    def run(model):
        calls = {"core": 0, "x": 0}
        x = x0 * 1.5
        x.retain_grad()
        core = model.cores[1]
        handles = [core.register_hook(lambda g: calls.__setitem__("core", calls["core"] + 1) or g * 2)]
        handles.append(x.register_hook(lambda g: calls.__setitem__("x", calls["x"] + 1) or g * 3))
        y = model(x)
        y.square().sum().backward(create_graph=True)
        grads = (core.grad.detach().clone(), x.grad.detach().clone(), x0.grad.detach().clone())
        for h in handles:
            h.remove()
        model.zero_grad()
        x0.grad = None
        return calls, grads, y

    calls, grads, y = run(layer)
    assert _lean_node(y)
    plain = copy.deepcopy(layer)
    monkeypatch.setattr(type(plain), "_lean_forward", lambda self, x, t: _torch_ops_forward(self, x))
    want_calls, want, _ = run(plain)
    assert calls == want_calls == {"core": 1, "x": 1}
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b)


def _torch_ops_forward(layer, x):
    from ttkernels import reference

    A, B = reference.build_sides(list(layer.cores), layer.spec.last_in, layer.spec.first_out)
    return nn.functional.linear(x, layer.weight, layer.bias) + layer.scaling * (x @ A) @ B


def test_a_kept_plan_does_not_keep_a_layer_in_a_reference_cycle_alive(impl):
    """The C++ plan holds its cores weakly: a cycle through a core (a hook closing over the layer, an attribute)
    is collected after forward calls, as without the plan."""
    import gc
    import weakref

    for tie in ("hook", "attribute"):
        layer = _chain_layer((3, 4), (2, 5))
        if tie == "hook":
            layer.cores[0].register_hook(lambda g, layer=layer: g)
        else:
            layer.cores[1].owner = layer
        x = torch.randn(2, 12, dtype=torch.float64)
        with torch.no_grad():
            layer(x)
        layer(x).sum().backward()
        ref = weakref.ref(layer)
        del layer
        gc.collect()
        assert ref() is None, tie


def test_chain_keeps_tensor_subclasses_and_torch_function_modes_in_view(impl):
    """x of a tensor subclass, or a TorchFunctionMode, sees the layer's torch ops: the layer records torch ops
    then (the C++ node would hide them), with the same values."""
    from torch.overrides import TorchFunctionMode

    class Logged(torch.Tensor):
        calls = 0

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.calls += 1
            return super().__torch_function__(func, types, args, kwargs or {})

    class Count(TorchFunctionMode):
        calls = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(2, 12, dtype=torch.float64)
    want = _dense(layer, x)
    y = layer(x.as_subclass(Logged))
    assert type(y) is Logged and Logged.calls > 0
    torch.testing.assert_close(y.as_subclass(torch.Tensor), want)
    with Count():
        y = layer(x)
    assert Count.calls > 1 and not _lean_node(y)
    torch.testing.assert_close(y, want)
    assert _lean_node(layer(x))


def test_chain_under_inference_mode_with_grad_enabled_records_nothing(impl):
    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(2, 12, dtype=torch.float64)
    with torch.inference_mode(), torch.enable_grad():
        y = layer(x)
    assert y.grad_fn is None and not y.requires_grad and y.is_inference()
    torch.testing.assert_close(y, _dense(layer, x))


def test_a_plan_of_non_leaf_cores_is_not_kept(impl):
    """torch.func.functional_call with cores computed by another module (a hypernetwork): the plan serves the
    call and is not kept, so the layer does not hold their graph afterwards."""
    import weakref

    from torch.func import functional_call

    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(2, 12, dtype=torch.float64)
    seed = torch.randn(layer.cores[0].shape, dtype=torch.float64, requires_grad=True)
    hidden = seed * 2.0  # an activation of the "hypernetwork", saved by the next op's graph
    core = hidden.square()
    y = functional_call(layer, {"cores.0": core}, (x,))
    y.sum().backward()
    assert seed.grad is not None
    gone = weakref.ref(hidden)
    del y, core, hidden
    assert gone() is None
    assert layer.__dict__["_lean"].plan is None


def test_compiled_autograd_turned_on_around_backward_only(impl):
    """Compiled autograd entered only around backward: the Python node traces; the C++ node refuses with an
    error that says what to do (turn it on before the forward, or use the Python node)."""
    from torch._dynamo import compiled_autograd

    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert _lean_node(y)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        if impl == "native":
            with pytest.raises(NotImplementedError, match="turn compiled autograd on before the forward"):
                y.square().sum().backward()
            return
        y.square().sum().backward()
    grads = [x.grad] + [c.grad for c in layer.cores]
    x.grad = None
    layer.zero_grad()
    layer(x).square().sum().backward()
    for a, b in zip(grads, [x.grad] + [c.grad for c in layer.cores]):
        torch.testing.assert_close(a, b)


def test_chain_under_compiled_autograd_matches_eager(impl):
    """Compiled autograd traces backward nodes: under it the layer records torch ops (the C++ node does not
    describe itself to it), and the gradients are eager's."""
    from torch._dynamo import compiled_autograd

    layer = _chain_layer((3, 4), (2, 5))
    x = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    with compiled_autograd._enable(torch.compile(backend="eager")):
        layer(x).square().sum().backward()
    traced = [x.grad] + [c.grad for c in layer.cores]
    x.grad = None
    layer.zero_grad()
    y = layer(x)
    assert _lean_node(y)
    y.square().sum().backward()
    for a, b in zip(traced, [x.grad] + [c.grad for c in layer.cores]):
        torch.testing.assert_close(a, b)


def test_chain_routes_dropout_autocast_and_mixed_dtypes_to_the_fused_op(monkeypatch, impl):
    from ttkernels import ops

    calls = []
    original = ops.tt_adapter
    monkeypatch.setattr(ops, "tt_adapter", lambda *a, **k: calls.append(k["dropout"]) or original(*a, **k))
    layer = tk.TTLinear(12, 10, ranks=3, in_modes=2, out_modes=2, dropout=0.25).train()
    x = torch.randn(3, 12, requires_grad=True)
    y = layer(x)
    assert calls == [0.25] and not _lean_node(y)
    y.sum().backward()
    layer.eval()
    assert _lean_node(layer(x)) and calls == [0.25]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    assert len(calls) == 2
    with pytest.raises(TypeError, match=r"weight is torch\.float32 but the layer computes in torch\.float64"):
        layer(x.double())  # mixed dtypes: the fused op's checks
    assert len(calls) == 3


# ------------------------------------------------------------------------------------------- no host reads
_READS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """Trap every host read of a tensor (on the Tensor class: Parameters too, every thread); the list of the
    reads seen while ``trap`` is on."""
    seen: list[str] = []
    state = {"on": False}

    def trap(name, original):
        def wrapper(self, *args, **kwargs):
            if state["on"]:
                seen.append(name)
            return original(self, *args, **kwargs)

        return wrapper

    for name in _READS:
        monkeypatch.setattr(torch.Tensor, name, trap(name, getattr(torch.Tensor, name)))

    class Reads:
        def __init__(self):
            self.seen = seen

        def __enter__(self):
            state["on"] = True
            return self

        def __exit__(self, *exc):
            state["on"] = False

    return Reads()


def _metatt(dropout):
    torch.manual_seed(0)
    base = nn.Sequential()
    base.layers = nn.ModuleList(nn.ModuleDict({"q": nn.Linear(8, 8), "v": nn.Linear(8, 6)}) for _ in range(2))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = base.layers

        def forward(self, x):
            return sum(block["v"](torch.tanh(block["q"](x))) for block in self.layers)

    cfg = MetaTTConfig(["q", "v"], rank=2, modes=("layer", "matrix", "task"), num_tasks=3, dropout=dropout)
    model = get_metatt_model(Net(), cfg)
    with torch.no_grad():
        for p in model.shared_parameters():
            p.normal_(0.0, 0.3)
    return model


def _cases():
    x = torch.randn(3, 8)
    ids = torch.tensor([2, 0, 1])
    spec = metatt_spec(8, 8, layers=2, matrices=2, r=3, tasks=3)
    cores = nn.ParameterList([nn.Parameter(c.float()) for c in random_cores(spec)])
    task_layer = tk.TTLinear.from_cores(nn.Linear(8, 8), cores, spec, index={"layer": 1, "matrix": 0}, dropout=0.2)
    W, b = torch.randn(8, 8), torch.randn(8)
    A, B = torch.randn(8, 3, requires_grad=True), torch.randn(3, 8, requires_grad=True)
    C = torch.randn(3, 3, 3, requires_grad=True)
    return {
        "TTLinear": lambda: tk.TTLinear(8, 8, ranks=3)(x),
        "TTLinear 2+2": lambda: tk.TTLinear(8, 8, ranks=3, in_modes=2, out_modes=2)(x),
        "TTLinear dropout": lambda: tk.TTLinear(8, 8, ranks=3, dropout=0.3).train()(x),
        "TTLinear tasks + dropout": lambda: task_layer.train()(x, task_ids=ids),
        "tt_adapter seed tensor": lambda: tk.tt_adapter(
            x, W, b, A, C, B, task_ids=ids, dropout=0.25, seed=torch.tensor(7), backend="torch"
        ),
        "tt_linear": lambda: tk.tt_linear(x, W, b, list(cores), spec, index={"layer": 0, "matrix": 1}, task_ids=ids),
        "MetaTTModel": lambda: _metatt(0.1).train()(x, task_ids=ids),
        # the adapter term a quantized base (bitsandbytes, torchao) adds to the base's own forward
        "quantized adapter term": lambda: quantized.adapter_term(
            x, list(cores), spec, index={"layer": 1, "matrix": 1}, task_ids=ids, dropout=0.3
        ),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_no_host_read_in_forward_and_backward(case, host_reads):
    run = _cases()[case]
    with host_reads:
        torch.Tensor.item(torch.zeros(()))  # the trap is live: this read is seen
    assert host_reads.seen == ["item"]
    host_reads.seen.clear()
    with host_reads:
        y = run()
        y.square().sum().backward()
    assert host_reads.seen == [], f"host reads in {case}: {host_reads.seen}"


def _kernel_cases(backend, device):
    """Forward and backward with dropout on a kernel backend: the seed drawn on the data's device or given as a
    tensor, loaded there by the kernels."""
    x, ids = torch.randn(3, 8, device=device), torch.tensor([2, 0, 1], device=device)
    spec = metatt_spec(8, 8, layers=2, matrices=2, r=3, tasks=3)
    cores = nn.ParameterList([nn.Parameter(c.float().to(device)) for c in random_cores(spec)])
    base = nn.Linear(8, 8, device=device)
    task_layer = tk.TTLinear.from_cores(
        base, cores, spec, index={"layer": 1, "matrix": 0}, dropout=0.2, backend=backend
    )
    W, b = torch.randn(8, 8, device=device), torch.randn(8, device=device)
    A, B = torch.randn(8, 3, device=device, requires_grad=True), torch.randn(3, 8, device=device, requires_grad=True)
    C = torch.randn(3, 3, 3, device=device, requires_grad=True)
    seed = torch.tensor(7, device=device)
    kw = dict(dropout=0.3, backend=backend, device=device)
    return {
        "TTLinear dropout": lambda: tk.TTLinear(8, 8, ranks=3, **kw).train()(x),
        "TTLinear 2+2 dropout": lambda: tk.TTLinear(8, 8, ranks=3, in_modes=2, out_modes=2, **kw).train()(x),
        "TTLinear tasks + dropout": lambda: task_layer.train()(x, task_ids=ids),
        "tt_adapter seed tensor": lambda: tk.tt_adapter(
            x, W, b, A, C, B, task_ids=ids, dropout=0.25, seed=seed, backend=backend
        ),
    }


@pytest.fixture(params=["triton", "cuda-emulated", pytest.param("cuda", marks=needs_gpu)])
def kernel_backend(request, monkeypatch, tmp_path_factory):
    """(backend name, device): the Triton kernels (in the interpreter without a GPU), the CUDA kernels' source in the
    host emulation (registry, backend layer and launchers on the CPU; without a GPU) or on a GPU."""
    if request.param == "triton":
        pytest.importorskip("ttkernels._triton_kernels.backend")
        return "triton", "cuda" if CUDA else "cpu"
    if request.param == "cuda-emulated":
        from cuda_emulation import build_lib, use_emulated_cuda_backend

        use_emulated_cuda_backend(monkeypatch, build_lib(tmp_path_factory))
        return "cuda", "cpu"
    try:
        tk.ops.resolve_backend("cuda", torch.device("cuda"))
    except tk.BackendUnavailableError as err:
        pytest.skip(str(err))
    return "cuda", "cuda"


@pytest.mark.parametrize("case", list(_kernel_cases("torch", "cpu")))
def test_no_host_read_in_the_kernels_forward_and_backward(case, kernel_backend, host_reads):
    backend, device = kernel_backend
    run = _kernel_cases(backend, device)[case]
    run().square().sum().backward()  # first call: imports, the extension or compiles out of the trap
    with host_reads:
        y = run()
        y.square().sum().backward()
    assert host_reads.seen == [], f"host reads in {case} on {backend}: {host_reads.seen}"


def test_the_trap_catches_a_host_read(monkeypatch):
    seen: list[str] = []
    original = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: seen.append("item") or original(self))
    torch.randn(1).item()
    assert seen == ["item"]


def test_bad_task_ids_still_raise_on_the_cpu():
    model = _metatt(0.0)
    with pytest.raises(IndexError, match=r"task_ids must lie in \[0, 3\), got values from 0 to 3"):
        model(torch.randn(2, 8), task_ids=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\), got -4"):
        tk.tt_adapter(
            torch.randn(2, 8), torch.randn(8, 8), None, torch.randn(8, 3), None, torch.randn(3, 8),
            dropout=0.2, seed=torch.tensor(-4),
        )  # fmt: skip


@pytest.mark.parametrize("seed", [0, 11, 2**40 + 3, 2**62 + 99])
def test_a_seed_tensor_gives_the_mask_of_its_value(seed):
    x, W = torch.randn(9, 8, dtype=torch.float64), torch.randn(5, 8, dtype=torch.float64)
    A, B = torch.randn(8, 3, dtype=torch.float64), torch.randn(3, 5, dtype=torch.float64)
    a = tk.tt_adapter(x, W, None, A, None, B, dropout=0.4, seed=seed)
    b = tk.tt_adapter(x, W, None, A, None, B, dropout=0.4, seed=torch.tensor(seed))
    assert torch.equal(a, b)
    assert not torch.equal(a, tk.tt_adapter(x, W, None, A, None, B, dropout=0.4, seed=seed + 1))


@pytest.mark.parametrize("seed", [0, 5, 2**62 + 7, 2**63 - 1])
def test_an_int_seed_is_written_on_the_device_by_a_fill(seed):
    """An int seed reaches the kernels' device by a fill kernel with the value as its argument: no host tensor is
    made and copied (on a GPU that copy, from pageable memory, makes the host wait for the stream)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    for make in (tk.ops.dropout_seed, tk.checks.device_seed):
        with Ops() as ops:
            t = make(seed, torch.device("cpu"))
        assert ops.seen == ["aten.full.default"], (make.__name__, ops.seen)
        assert t.dtype == torch.int64 and t.shape == () and int(t) == seed
    for bad in (-1, 2**63):
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            tk.ops.dropout_seed(bad, torch.device("cpu"))
        with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63\)"):
            tk.checks.device_seed(bad, "cpu")


# ------------------------------------------------------------------------------------------------- GPU
def _gpu_task_layer(dropout, backend="auto"):
    spec = metatt_spec(64, 48, layers=2, matrices=2, r=4, tasks=3)
    cores = nn.ParameterList([nn.Parameter(c.float().cuda()) for c in random_cores(spec)])
    base = nn.Linear(64, 48, device="cuda")
    return tk.TTLinear.from_cores(
        base, cores, spec, index={"layer": 1, "matrix": 0}, dropout=dropout, backend=backend
    ).train()


@needs_gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_cuda_graph_capture_draws_fresh_masks_and_matches_eager(backend):
    """Every backend takes the seed as a tensor on the GPU, drawn there with a Philox draw that a replay redraws:
    each replay has a fresh mask, the one eager draws from the same generator state (the Triton and CUDA kernels
    load the seed on the device, so the graph does not freeze the mask drawn at capture)."""
    try:
        tk.ops.resolve_backend(backend, torch.device("cuda"))
    except tk.BackendUnavailableError as err:
        pytest.skip(str(err))
    layer = _gpu_task_layer(0.5, backend)
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    ids = torch.randint(0, 3, (16,), device="cuda")
    grads = [p for p in layer.parameters() if p.requires_grad]

    def step():
        y = layer(x, task_ids=ids)
        return y, torch.autograd.grad(y.square().sum(), [x, *grads])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the graph
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, g_static = step()

    outs = []
    for _ in range(2):
        state = torch.cuda.get_rng_state()
        graph.replay()
        torch.cuda.synchronize()
        replayed = (y_static.clone(), [g.clone() for g in g_static])
        torch.cuda.set_rng_state(state)  # eager from the same generator state
        y_eager, g_eager = step()
        torch.testing.assert_close(replayed[0], y_eager)
        for a, b in zip(replayed[1], g_eager):
            torch.testing.assert_close(a, b)
        outs.append(replayed[0])
    assert not torch.equal(outs[0], outs[1]), "a replay reused the previous dropout mask"


@pytest.mark.parametrize("modes", [None, 2])
def test_a_captured_call_builds_its_factors_in_the_graph(modes, monkeypatch):
    """While a CUDA graph is captured, TTLinear takes the fused op's path (factors built inside the graph), not
    the lean path's kept factors, which a replay after an optimizer step would read stale."""
    from ttkernels import modules

    layer = tk.TTLinear(8, 6, ranks=3, in_modes=modes, out_modes=modes)
    with torch.no_grad():
        layer.cores[-1].normal_()
    x = torch.randn(4, 8)
    calls = []
    original = tk.ops.tt_linear
    monkeypatch.setattr(modules.ops, "tt_linear", lambda *a, **k: calls.append(1) or original(*a, **k))
    monkeypatch.setattr(modules, "_capturing", lambda x: False)
    eager = layer(x)
    assert calls == []  # the lean path
    monkeypatch.setattr(modules, "_capturing", lambda x: True)
    captured = layer(x)
    assert calls == [1]
    torch.testing.assert_close(captured, eager)


@needs_gpu
@pytest.mark.parametrize("modes", [None, 2])
def test_cuda_graph_replay_follows_in_place_core_updates(modes):
    """A graph captured around a TTLinear forward + backward replays the cores' current values: an in-place
    update between replays (an optimizer step) changes the replayed output and gradients as it changes eager's."""
    torch.manual_seed(0)
    layer = tk.TTLinear(64, 48, ranks=4, in_modes=modes, out_modes=modes, device="cuda")
    with torch.no_grad():
        layer.cores[-1].normal_()
    x = torch.randn(16, 64, device="cuda", requires_grad=True)
    grads = [p for p in layer.parameters() if p.requires_grad]

    def step():
        y = layer(x)
        return y, torch.autograd.grad(y.square().sum(), [x, *grads])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, g_static = step()
    for _ in range(2):
        with torch.no_grad():
            for c in layer.cores:
                c.add_(0.1 * torch.randn_like(c))  # what an optimizer step does
        graph.replay()
        torch.cuda.synchronize()
        y_eager, g_eager = step()
        torch.testing.assert_close(y_static, y_eager)
        for a, b in zip(g_static, g_eager):
            torch.testing.assert_close(a, b)


@needs_gpu
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda"])
def test_forward_and_backward_never_wait_for_the_gpu(backend):
    """torch's sync debug mode set to raise around warmed-up forward and backward calls (the first call of a
    layout may compile and copy its tables): dropout with the seed drawn on the device, given as a tensor there or
    as an int (a fill, not a host copy), task ids checked on the device."""
    try:
        tk.ops.resolve_backend(backend, torch.device("cuda"))
    except tk.BackendUnavailableError as err:
        pytest.skip(str(err))
    torch.manual_seed(0)
    layer = _gpu_task_layer(0.2, backend)
    chain = tk.TTLinear(64, 48, ranks=4, in_modes=2, out_modes=2, dropout=0.1, backend=backend, device="cuda")
    x, ids = torch.randn(5, 64, device="cuda"), torch.tensor([2, 0, 1, 1, 0], device="cuda")
    W = torch.randn(48, 64, device="cuda")
    A = torch.randn(64, 4, device="cuda", requires_grad=True)
    C = torch.randn(3, 4, 4, device="cuda", requires_grad=True)
    B = torch.randn(4, 48, device="cuda", requires_grad=True)
    seed = torch.tensor(9, device="cuda")
    calls = {
        "TTLinear tasks + dropout": lambda: layer(x, task_ids=ids),
        "TTLinear 2+2 dropout": lambda: chain.train()(x),
        "TTLinear 2+2 eval": lambda: chain.eval()(x),
        "tt_adapter int seed": lambda: tk.tt_adapter(
            x, W, None, A, C, B, task_ids=ids, dropout=0.25, seed=123, backend=backend
        ),
        "tt_adapter tensor seed": lambda: tk.tt_adapter(
            x, W, None, A, C, B, task_ids=ids, dropout=0.25, seed=seed, backend=backend
        ),
    }
    for name, call in calls.items():
        call().square().sum().backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call().square().sum().backward()
        except RuntimeError as err:
            raise AssertionError(f"{name} ({backend}) synchronized with the host: {err}") from err
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@needs_gpu
def test_compile_reduce_overhead_ttlinear():
    torch._dynamo.reset()
    layer = tk.TTLinear(64, 48, ranks=4, device="cuda")
    with torch.no_grad():
        layer.cores[-1].normal_()
    x = torch.randn(8, 64, device="cuda")
    compiled = torch.compile(layer, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.testing.assert_close(compiled(x), layer(x))


@needs_gpu
def test_compile_reduce_overhead_metatt_model():
    torch._dynamo.reset()
    model = _metatt(0.0).cuda()
    x, ids = torch.randn(4, 8, device="cuda"), torch.tensor([0, 2, 1, 1], device="cuda")
    compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):
        torch.testing.assert_close(compiled(x, task_ids=ids), model(x, task_ids=ids))


# ------------------------------------------------------------------------------------------ MetaTT sharing
def test_metatt_views_share_a_and_b_within_a_call(monkeypatch):
    from ttkernels import reference

    model = _metatt(0.0)
    x, ids = torch.randn(3, 8), torch.tensor([1, 0, 2])
    built = []
    original = reference.build_sides
    monkeypatch.setattr(reference, "build_sides", lambda *a: built.append(1) or original(*a))
    y = model(x, task_ids=ids)
    assert len(built) == 2  # two groups (q: 8 -> 8, v: 8 -> 6), four views
    y.square().sum().backward()
    grads = [p.grad.clone() for p in model.shared_parameters()]
    model.zero_grad()
    # the same step with every view building its own factors (under saved-tensor hooks nothing is shared)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        y2 = model(x, task_ids=ids)
    assert len(built) == 2
    y2.square().sum().backward()
    torch.testing.assert_close(y2, y)
    for g, p in zip(grads, model.shared_parameters()):
        torch.testing.assert_close(p.grad, g)
    # two calls, two separate backwards: no graph is shared between calls
    model.zero_grad()
    first, second = model(x, task_ids=ids), model(x, task_ids=ids)
    first.sum().backward()
    second.sum().backward()
    with torch.no_grad():  # outside a call nothing is kept
        assert model._routing.shared is None


def test_overhead_bench_writes_peft_rows_and_ratios(tmp_path):
    import json

    pytest.importorskip("peft")
    from bench import overhead

    threads = torch.get_num_threads()
    try:
        assert overhead.main(["--device", "cpu", "--reps", "2", "--rounds", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    row = json.loads((tmp_path / "overhead-cpu.jsonl").read_text().splitlines()[-1])
    ratios = row["ratio_to_peft_lora"]
    for spec in ("TTLinear 1+1 (LoRA-shaped)", "TTLinear 2+2"):
        for what in ("forward", "forward+backward", "step"):
            key = f"{spec} {what}"
            assert row["us_per_call"][key] > 0
            assert ratios[key] == pytest.approx(row["us_per_call"][key] / row["us_per_call"][f"PEFT LoRA {what}"])
    assert ratios["PEFT LoRA forward"] == 1.0
    assert row["threads"] == 1 and row["peft"] and "interleaved" in row["method"]
    from ttkernels import lean

    python_rows = [k for k in row["us_per_call"] if overhead.PYTHON_NODE in k]
    assert row["lean_node"].startswith("C++" if lean.NATIVE is not None else "Python")
    assert len(python_rows) == (6 if lean.NATIVE is not None else 0)


def test_shared_factors_block_for_views_onto_shared_cores(monkeypatch):
    from ttkernels import reference
    from ttkernels.modules import shared_factors

    spec = tk.TTSpec.build((3, 4), (2, 5), 3, index_modes=[tk.Mode.index("layer", 3)])
    cores = nn.ParameterList([nn.Parameter(c) for c in random_cores(spec)])
    views = [
        tk.TTLinear.from_cores(nn.Linear(12, 10, dtype=torch.float64), cores, spec, index={"layer": i})
        for i in range(3)
    ]
    x = torch.randn(5, 12, dtype=torch.float64)

    def run():
        h = sum(v(x) for v in views)
        h.square().sum().backward()
        grads = [c.grad.clone() for c in cores]
        cores.zero_grad()
        return h, grads

    built = []
    original = reference.build_sides
    monkeypatch.setattr(reference, "build_sides", lambda *a: built.append(1) or original(*a))
    y_alone, g_alone = run()
    assert built == []  # outside a block each view builds its own factors
    with shared_factors():
        y_shared, g_shared = run()
    assert built == [1]
    torch.testing.assert_close(y_shared, y_alone)
    for a, b in zip(g_shared, g_alone):
        torch.testing.assert_close(a, b)
    expected = sum(dense_ref(x, v.weight, v.bias, list(cores), spec, v.scaling, v.index) for v in views)
    torch.testing.assert_close(y_shared, expected)


def test_step_bench_writes_side_by_side_ratios(tmp_path):
    import json

    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from bench import step

    threads = torch.get_num_threads()
    try:
        argv = [
            "--device",
            "cpu",
            "--layers",
            "1",
            "--seq",
            "4",
            "--reps",
            "1",
            "--rounds",
            "1",
            "--out",
            str(tmp_path),
        ]
        assert step.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    row = json.loads((tmp_path / "step-cpu.jsonl").read_text().splitlines()[-1])
    assert set(row["us_per_step"]) == {"frozen", "peft-lora", "metatt", "metatt-factored"}
    assert row["ratio_to_peft_lora"]["peft-lora"] == 1.0
    for k, v in row["us_per_step"].items():
        assert v > 0
        assert row["ratio_to_peft_lora"][k] == pytest.approx(v / row["us_per_step"]["peft-lora"])
