"""The adapter-layer base: alpha and scaling rules, and the merge guarantees (README, "Guarantees"), for every layer
built on it: TTLinear, TTMLinear, a MetaTT view (on an nn.Linear and on a GPT-2 Conv1D), the PEFT TT layer.

Each merge test starts from random cores and weights, changes the adapter while merged through one public call,
and checks that ``unmerge()`` gives the base weight back bit for bit (``torch.equal``), or that the call is refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ttkernels as tk
from ttkernels import layer as L
from ttkernels import rank as rk
from ttkernels.metatt import MetaTTConfig, get_metatt_model
from ttkernels.ttm import TTMLinear

D_IN, D_OUT = 12, 10


def _randomize(module: nn.Module, std: float = 0.3) -> nn.Module:
    with torch.no_grad():
        for core in module.cores:
            core.normal_(0.0, std)
    return module


def _ttlinear(dtype):
    return _randomize(tk.TTLinear(D_IN, D_OUT, in_modes=2, ranks=3, alpha=5.0, dtype=dtype))


def _ttmlinear(dtype):
    return _randomize(TTMLinear(D_IN, D_OUT, in_modes=(3, 4), out_modes=(2, 5), ranks=3, alpha=5.0, dtype=dtype))


class _Block(nn.Module):
    def __init__(self, dtype, conv1d: bool):
        super().__init__()
        if conv1d:
            from transformers.pytorch_utils import Conv1D

            self.q = Conv1D(D_OUT, D_IN).to(dtype)
            with torch.no_grad():
                self.q.weight.normal_()
                self.q.bias.normal_()
        else:
            self.q = nn.Linear(D_IN, D_OUT, dtype=dtype)


class _Net(nn.Module):
    def __init__(self, dtype, conv1d: bool):
        super().__init__()
        self.layers = nn.ModuleList([_Block(dtype, conv1d) for _ in range(2)])

    def forward(self, x):
        return self.layers[0].q(x) + self.layers[1].q(x)


def _metatt_view(dtype, conv1d=False):
    wrapper = get_metatt_model(_Net(dtype, conv1d), MetaTTConfig(["q"], rank=3, alpha=5.0))
    view = wrapper.model.layers[1].q
    _randomize(view)
    view.__dict__["_test_wrapper"] = wrapper  # keep the owner alive
    return view


LAYERS = {
    "ttlinear": _ttlinear,
    "ttmlinear": _ttmlinear,
    "metatt-view": _metatt_view,
    "metatt-conv1d": lambda dtype: _metatt_view(dtype, conv1d=True),
}
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _x(layer, dtype=None, m=5):
    return torch.randn(m, layer.in_features, dtype=dtype or layer.weight.dtype)


def _changed_cores(layer):
    return [torch.randn_like(c) * 0.3 for c in layer.cores]


# ------------------------------------------------------------------------------------------------ alpha, scaling
@pytest.mark.parametrize("alpha", [True, False, float("nan"), float("inf"), -1.0, "2", torch.tensor(2.0)])
def test_alpha_is_checked_the_same_everywhere(alpha):
    makers = [
        lambda: tk.TTLinear(8, 4, alpha=alpha),
        lambda: TTMLinear(8, 4, in_modes=(2, 4), out_modes=(2, 2), alpha=alpha),
        lambda: MetaTTConfig(["q"], alpha=alpha),
    ]
    for make in makers:
        with pytest.raises(ValueError, match="alpha must be a finite number >= 0 or None"):
            make()


def test_a_refused_wrap_leaves_the_base_as_it_was():
    lin = nn.Linear(8, 4)
    for kwargs in (dict(alpha=True), dict(dropout=2.0), dict(backend="npu")):
        with pytest.raises(ValueError):
            tk.TTLinear.from_linear(lin, **kwargs)
        if "dropout" not in kwargs:  # TTMLinear has no dropout
            with pytest.raises(ValueError):
                TTMLinear.from_linear(lin, in_modes=(2, 4), out_modes=(2, 2), **kwargs)
    assert lin.weight.requires_grad and lin.bias.requires_grad


def test_scaling_has_one_formula():
    assert L.adapter_scaling(6, 3) == 2.0 and L.adapter_scaling(6, 4, rslora=True) == 3.0
    assert L.adapter_scaling(6, 3, gain=0.5) == 1.0 and L.adapter_scaling(None, 3, gain=7.0) == 1.0
    assert tk.TTLinear(8, 4, ranks=[2], alpha=6).scaling == L.adapter_scaling(6, 2)  # LoRA-shaped: gain 1
    # the scaling rule's gain sqrt(F) (ttkernels.init) goes through the same formula
    tt = tk.TTLinear(8, 4, in_modes=2, out_modes=(2, 2), ranks=3, alpha=6)
    assert (
        tt.scaling == L.adapter_scaling(6, 3, gain=tk.init.scaling_gain(tt.spec)) == tk.init.adapter_scaling(6, tt.spec)
    )
    assert tk.init.scaling_gain(tt.spec) == pytest.approx(2**0.5)  # F = d_out / s_K = 4 / 2
    ttm = TTMLinear(8, 4, in_modes=(2, 4), out_modes=(2, 2), ranks=4, alpha=6)
    assert ttm.scaling == L.adapter_scaling(6, 4, gain=tk.init.scaling_gain(ttm.spec))
    assert tk.init.scaling_gain(ttm.spec) == pytest.approx((4 / (2 * 4 * 4)) ** 0.5)  # F = d_out / (m_K n_K^2)
    assert tk.TTLinear(8, 4, ranks=4, alpha=0).scaling == 0.0


def test_the_base_is_shared_frozen_and_its_orientation_explicit():
    view = _metatt_view(torch.float64, conv1d=True)
    assert view.weight_transposed and view.weight is view.base_module.weight and not view.weight.requires_grad
    assert view.base_weight.shape == (D_OUT, D_IN)
    assert not _ttlinear(torch.float64).weight_transposed


# ------------------------------------------------------------------------------------------------ merge
@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_unmerge_is_exact_in_every_dtype(name, dtype):
    layer = LAYERS[name](dtype)
    w0 = layer.weight.detach().clone()
    x = _x(layer)
    with torch.no_grad():
        y0 = layer(x)
        layer.merge()
        assert layer.merged
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        want = (w0.to(acc) + layer._stored(layer.delta_weight()).to(acc)).to(dtype)  # rounded once
        assert torch.equal(layer.weight, want)
        if dtype in (torch.float64, torch.float32):
            torch.testing.assert_close(layer(x), y0)
        layer.unmerge()
    assert torch.equal(layer.weight, w0) and not layer.merged


def _sgd_step(layer):
    opt = torch.optim.SGD(layer.cores.parameters(), lr=0.5)
    layer(_x(layer)).square().sum().backward()  # gradients from before the merge
    return opt


def _in_place(layer):
    with torch.no_grad():
        for c in layer.cores:
            c.mul_(3.0)


CHANGES = {
    "optimizer-step": lambda layer, opt: opt.step(),
    "reset": lambda layer, opt: layer.reset_adapter_parameters(),
    "replace_cores": lambda layer, opt: layer.replace_cores(_changed_cores(layer), optimizer=opt),
    "load_state_dict": lambda layer, opt: layer.load_state_dict(
        {f"cores.{k}": c for k, c in enumerate(_changed_cores(layer))}, strict=False
    ),
    "in-place": lambda layer, opt: _in_place(layer),
}


@pytest.mark.parametrize("name", ["ttlinear", "ttmlinear"])
@pytest.mark.parametrize("change", CHANGES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_cores_changed_while_merged(name, change, dtype):
    layer = LAYERS[name](dtype)
    opt = _sgd_step(layer)
    w0 = layer.weight.detach().clone()
    x = _x(layer)
    layer.merge()
    CHANGES[change](layer, opt)
    assert layer.merged
    with torch.no_grad():
        merged_out = layer(x)  # the merged weight follows the new cores
        want = F.linear(x.double(), w0.double() + layer.delta_weight().double(), layer.bias.double())
    # float64: exact to rounding; bfloat16: a few units of its rounding of the largest output
    atol = 1e-10 if dtype == torch.float64 else 2**-6 * float(want.abs().max())
    torch.testing.assert_close(merged_out.double(), want, atol=atol, rtol=1e-10 if dtype == torch.float64 else 2e-2)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    with torch.no_grad():
        unmerged = layer(x)
    torch.testing.assert_close(unmerged.double(), want, atol=atol, rtol=1e-10 if dtype == torch.float64 else 2e-2)


def test_compress_while_merged_then_unmerge():
    layer = _ttlinear(torch.float64)
    opt = _sgd_step(layer)
    w0 = layer.weight.detach().clone()
    layer.merge()
    rk.compress_(layer, max_rank=1, optimizer=opt)
    assert max(layer.spec.ranks) == 1 and layer.merged
    x = _x(layer)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, w0 + layer.delta_weight(), layer.bias))
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("name", LAYERS)
def test_disabled_while_merged_is_the_base_exactly(name):
    layer = LAYERS[name](torch.float32)
    w0 = layer.weight.detach().clone()
    x = _x(layer)
    base = F.linear(x, w0.t() if layer.weight_transposed else w0, layer.bias)
    layer.merge()
    with layer.adapter_disabled():
        assert torch.equal(layer(x), base)
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("name", LAYERS)
def test_training_while_merged_is_refused(name):
    layer = LAYERS[name](torch.float64)
    w0 = layer.weight.detach().clone()
    layer.merge()
    y = layer(_x(layer))  # a forward (inference) is fine
    with pytest.raises(RuntimeError, match="unmerge\\(\\) before training"):
        y.sum().backward()
    assert all(c.grad is None for c in layer.cores)
    with torch.no_grad():
        layer(_x(layer))
    layer.unmerge()
    assert torch.equal(layer.weight, w0)
    layer(_x(layer)).sum().backward()  # unmerged: trains
    assert all(c.grad is not None for c in layer.cores)


@pytest.mark.parametrize("name", LAYERS)
def test_non_finite_cores(name):
    layer = LAYERS[name](torch.float32)
    w0 = layer.weight.detach().clone()
    with torch.no_grad():
        layer.cores[0][0].fill_(float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert not layer.merged and torch.equal(layer.weight, w0)
    layer.merge()  # unsafe: the weight is poisoned while merged, and comes back
    assert not torch.isfinite(layer.weight).all()
    layer.unmerge()
    assert torch.equal(layer.weight, w0)


@pytest.mark.parametrize("name", ["ttlinear", "ttmlinear"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_state_dict_of_a_merged_layer(name, dtype):
    a = LAYERS[name](dtype)
    w0 = a.weight.detach().clone()
    a.merge()
    state = a.state_dict()
    assert torch.equal(state[L.BEFORE_MERGE_KEY], w0) and torch.equal(state["weight"], a.weight)
    b = LAYERS[name](dtype)
    b.load_state_dict(state)  # strict: the extra key is understood
    assert b.merged and torch.equal(b.weight, a.weight)
    x = _x(a)
    with torch.no_grad():
        assert torch.equal(b(x), a(x))
    b.unmerge()
    assert torch.equal(b.weight, w0)
    # an unmerged state dict into a merged layer: the layer unmerges first, nothing is applied twice
    a.load_state_dict(b.state_dict())
    assert not a.merged and torch.equal(a.weight, w0)
    # a state dict without the weight (the cores only) keeps a merged layer merged, with the new cores
    a.merge()
    a.load_state_dict({k: v for k, v in b.state_dict().items() if k.startswith("cores.")}, strict=False)
    assert a.merged
    a.unmerge()
    assert torch.equal(a.weight, w0)
    unmerged_keys = set(tk.TTLinear(4, 4).state_dict()) if name == "ttlinear" else None
    assert unmerged_keys is None or L.BEFORE_MERGE_KEY not in unmerged_keys


def test_a_bad_kept_weight_in_a_state_dict_is_refused():
    a = _ttlinear(torch.float32)
    a.merge()
    state = a.state_dict()
    state[L.BEFORE_MERGE_KEY] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="weight_before_merge must be a tensor of the base weight's shape"):
        _ttlinear(torch.float32).load_state_dict(state)


def test_merge_and_unload_keeps_no_copy():
    layer = _ttlinear(torch.float32)
    x = _x(layer)
    with torch.no_grad():
        y = layer(x)
    base = layer.merge_and_unload()
    assert isinstance(base, nn.Linear) and base.weight is layer.weight
    assert layer.__dict__["_merge_guard"].original is None
    torch.testing.assert_close(base(x), y, atol=1e-5, rtol=1e-5)


def test_replace_cores_refuses_bad_cores_and_changes_nothing():
    layer = _ttlinear(torch.float64)
    old = list(layer.cores)
    opt = torch.optim.SGD(layer.cores.parameters(), lr=0.1)
    bad = _changed_cores(layer)
    bad[1] = bad[1][:2]
    with pytest.raises(ValueError, match="do not chain"):
        layer.replace_cores(bad, optimizer=opt)
    with pytest.raises(ValueError, match="the optimizer does not hold"):
        layer.replace_cores(_changed_cores(layer), optimizer=torch.optim.SGD([nn.Parameter(torch.ones(1))]))
    ids = [id(p) for p in old]
    assert [id(p) for p in layer.cores] == ids and [id(p) for p in opt.param_groups[0]["params"]] == ids


# ------------------------------------------------------------------------------------------------ MetaTT
def test_metatt_views_merge_exactly_and_survive_a_step():
    wrapper = get_metatt_model(_Net(torch.float32, conv1d=False), MetaTTConfig(["q"], rank=3))
    for core in wrapper.metatt_cores.parameters():
        torch.nn.init.normal_(core, std=0.3)
    opt = torch.optim.SGD(wrapper.shared_parameters(), lr=0.5)
    x = torch.randn(4, D_IN)
    wrapper(x).square().sum().backward()
    weights = {n: v.weight.detach().clone() for n, v in wrapper.views()}
    for _, view in wrapper.views():
        view.merge()
    opt.step()
    rk.compress_(wrapper, max_rank=2)
    for name, view in wrapper.views():
        view.unmerge()
        assert torch.equal(view.weight, weights[name])


# ------------------------------------------------------------------------------------------------ PEFT
def _peft_layer():
    peft = pytest.importorskip("peft")
    from ttkernels import peft as tkpeft

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(D_IN, D_OUT)

        def forward(self, x):
            return self.lin(x)

    model = peft.get_peft_model(Net(), tkpeft.tt_lora_config(r=3, lora_alpha=5, target_modules=["lin"], in_modes=2))
    layer = model.base_model.model.lin
    assert isinstance(layer, tkpeft.TTLoraLinear)
    with torch.no_grad():
        for core in layer.lora_tt_cores["default"]:
            core.normal_(0.0, 0.3)
    return model, layer


def test_peft_layer_merge_is_exact_after_a_step_and_round_trips():
    model, layer = _peft_layer()
    cores = list(layer.lora_tt_cores["default"])
    opt = torch.optim.SGD(cores, lr=0.5)
    x = torch.randn(4, D_IN)
    model(x).square().sum().backward()
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    opt.step()
    with torch.no_grad():
        merged = model(x)  # the changed cores are merged again
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight, w0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), merged, atol=1e-5, rtol=1e-5)
    layer.merge()
    with pytest.raises(RuntimeError, match="before training"):
        model(x).sum().backward()
    state = model.state_dict()
    fresh_model, fresh = _peft_layer()
    fresh_model.load_state_dict(state)
    assert fresh.merged_adapters == ["default"] and torch.equal(fresh.base_layer.weight, layer.base_layer.weight)
    fresh.unmerge()
    assert torch.equal(fresh.base_layer.weight, w0)
    with torch.no_grad():
        cores[0].fill_(float("inf"))
    layer.unmerge()
    with pytest.raises(ValueError, match="non-finite"):
        layer.merge(safe_merge=True)
    assert torch.equal(layer.base_layer.weight, w0) and not layer.merged


@pytest.mark.parametrize("alpha", [True, float("nan"), -2.0])
def test_peft_layer_checks_lora_alpha(alpha):
    peft = pytest.importorskip("peft")
    from ttkernels import peft as tkpeft

    with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
        peft.get_peft_model(
            nn.Sequential(nn.Linear(4, 4)), tkpeft.tt_lora_config(r=2, lora_alpha=alpha, target_modules=["0"])
        )


def test_metatt_state_dict_of_merged_views_round_trips():
    torch.manual_seed(0)
    a = get_metatt_model(_Net(torch.float32, conv1d=True), MetaTTConfig(["q"], rank=3))
    for core in a.metatt_cores.parameters():
        torch.nn.init.normal_(core, std=0.3)
    weights = {n: v.weight.detach().clone() for n, v in a.views()}
    for _, view in a.views():
        view.merge()
    x = torch.randn(4, D_IN)
    torch.manual_seed(0)
    b = get_metatt_model(_Net(torch.float32, conv1d=True), MetaTTConfig(["q"], rank=3))
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        assert torch.equal(b(x), a(x))
    for name, view in b.views():
        assert view.merged
        view.unmerge()
        assert torch.equal(view.weight, weights[name])


# ------------------------------------------------------------------------------------------------ per-task merge
def _task_model(dtype, conv1d):
    torch.manual_seed(0)
    w = get_metatt_model(
        _Net(dtype, conv1d), MetaTTConfig(["q"], rank=3, alpha=5.0, modes=("layer", "task", "matrix"), num_tasks=3)
    )
    for core in w.metatt_cores.parameters():
        torch.nn.init.normal_(core, std=0.3)
    return w


@pytest.mark.parametrize("conv1d", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_per_task_merge_goes_through_the_merge_guard(dtype, conv1d):
    a = _task_model(dtype, conv1d)
    weights = {n: v.weight.detach().clone() for n, v in a.views()}
    x = torch.randn(4, D_IN, dtype=dtype)
    with torch.no_grad():
        task1 = a(x, task_ids=torch.full((4,), 1))
    a.merge(task=1)
    assert all(v.merged and v.merged_task == 1 for _, v in a.views())
    with torch.no_grad():
        torch.testing.assert_close(a(x), task1, **({} if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)))
    with pytest.raises(RuntimeError, match="backward through a merged"):
        a(x).sum().backward()
    # the state dict records the merged task; loading it gives the same merged model
    state = a.state_dict()
    for name, _ in a.views():
        assert torch.equal(state[f"model.{name}.{L.BEFORE_MERGE_KEY}"], weights[name])
        assert f"model.{name}.merged.task1" in state
    b = _task_model(dtype, conv1d)
    b.load_state_dict(state)
    assert all(v.merged and v.merged_task == 1 for _, v in b.views())
    with torch.no_grad():
        assert torch.equal(b(x), a(x))
    b.unmerge()
    assert all(torch.equal(v.weight, weights[n]) for n, v in b.views())
    # cores changed while merged: the next forward merges task 1 of the new cores from the kept weight
    with torch.no_grad():
        for core in a.metatt_cores.parameters():
            core.mul_(1.5)
        merged = a(x)
    a.unmerge()
    assert all(torch.equal(v.weight, weights[n]) for n, v in a.views())
    with torch.no_grad():
        unmerged = a(x, task_ids=torch.full((4,), 1))
    torch.testing.assert_close(merged, unmerged, **({} if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)))
    assert not torch.allclose(unmerged.float(), task1.float(), atol=1e-3)


def test_per_task_merge_refusals_change_nothing():
    a = _task_model(torch.float32, False)
    weights = {n: v.weight.detach().clone() for n, v in a.views()}
    with torch.no_grad():
        a.metatt_cores[next(iter(a.groups))][2].view(-1)[0] = float("nan")  # the task core
    with pytest.raises(ValueError, match="safe_merge=True"):
        a.merge(task=0, safe_merge=True)
    assert not any(v.merged for _, v in a.views())
    assert all(torch.equal(v.weight, weights[n]) for n, v in a.views())
    view = next(v for _, v in a.views())
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 3\), got True"):
        view.merge(task=True)
    with pytest.raises(ValueError, match="no per-sample"):
        tk.TTLinear(4, 4).merge(task=0)
    # a state dict naming a task this adapter does not have is refused
    b = _task_model(torch.float32, False)
    with torch.no_grad():
        b.metatt_cores[next(iter(b.groups))][2].normal_()
    b.merge(task=2)
    state = {k.replace("merged.task2", "merged.task7"): v for k, v in b.state_dict().items()}
    with pytest.raises(ValueError, match=r"names merged \['task7'\]"):
        _task_model(torch.float32, False).load_state_dict(state)


def test_per_task_merge_and_unload_keeps_no_copy():
    a = _task_model(torch.float64, True)
    x = torch.randn(4, D_IN, dtype=torch.float64)
    with torch.no_grad():
        want = a(x, task_ids=torch.full((4,), 2))
    views = [v for _, v in a.views()]
    model = a.merge_and_unload(task=2)
    assert all(v.__dict__["_merge_guard"].original is None for v in views)
    torch.testing.assert_close(model(x), want, atol=1e-12, rtol=1e-12)
