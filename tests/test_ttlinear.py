import math

import pytest
import torch
from torch import nn

import ttkernels as tk
from helpers import TOL, dense_ref, einsum_delta, metatt_spec, randn, random_cores


def _randomize(layer, scale=0.3):
    with torch.no_grad():
        for c in layer.cores:
            c.normal_(0.0, scale)
    return layer


SPECS = {
    "lora": dict(in_features=11, out_features=7, in_modes=None, out_modes=None, ranks=4),
    "ttlora": dict(in_features=21, out_features=30, in_modes=(3, 7), out_modes=(5, 2, 3), ranks=(2, 4, 3, 2)),
    "ttlora-auto": dict(in_features=60, out_features=13, in_modes=3, out_modes=1, ranks=3),
}


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("bias", [True, False])
def test_equals_dense_formula(name, bias):
    kw = SPECS[name]
    layer = _randomize(
        tk.TTLinear(
            kw["in_features"],
            kw["out_features"],
            bias,
            in_modes=kw["in_modes"],
            out_modes=kw["out_modes"],
            ranks=kw["ranks"],
            alpha=5.0,
            dtype=torch.float64,
        )
    )
    last = layer.spec.modes[-1]  # scaling rule 2: alpha / r * sqrt(d_out / s_K) (ttkernels.init)
    assert layer.scaling == pytest.approx(5.0 / max(layer.spec.ranks) * math.sqrt(kw["out_features"] / last.size))
    x = randn(2, 3, kw["in_features"])
    dW = layer.delta_weight(scaled=False)
    assert dW.shape == (kw["out_features"], kw["in_features"])
    torch.testing.assert_close(dW, einsum_delta(list(layer.cores), layer.spec).t())
    torch.testing.assert_close(layer.delta_weight(), layer.scaling * dW)
    expected = x @ layer.weight.t() + layer.scaling * x @ dW.t()
    if bias:
        expected = expected + layer.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight + layer.delta_weight(), layer.bias))
    torch.testing.assert_close(
        layer(x), dense_ref(x, layer.weight, layer.bias, list(layer.cores), layer.spec, layer.scaling)
    )


def test_core_layout_and_public_attributes():
    layer = tk.TTLinear(21, 30, in_modes=(3, 7), out_modes=(5, 6), ranks=(2, 4, 3))
    assert [tuple(c.shape) for c in layer.cores] == [(1, 3, 2), (2, 7, 4), (4, 5, 3), (3, 6, 1)]
    assert all(isinstance(c, nn.Parameter) and c.requires_grad for c in layer.cores)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.weight.shape == (30, 21) and layer.bias.shape == (30,)
    assert layer.scaling == 1.0  # alpha=None: scaling 1, whatever the modes
    assert layer.num_adapter_params == 3 * 2 + 2 * 7 * 4 + 4 * 5 * 3 + 3 * 6
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {f"cores.{k}" for k in range(4)}
    r = repr(layer)
    for piece in ("modes=(in:3, in:7, out:5, out:6)", "ranks=(2, 4, 3)", "params=140", "in_features=21"):
        assert piece in r


def test_init_zero_delta_and_training_moves():
    layer = tk.TTLinear(16, 12, in_modes=2, out_modes=2, ranks=4)
    assert torch.count_nonzero(layer.delta_weight()) == 0
    assert all(torch.count_nonzero(c) > 0 for c in list(layer.cores)[:-1])
    x = torch.randn(8, 16)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    layer(x).pow(2).sum().backward()
    assert layer.cores[-1].grad.abs().sum() > 0  # the zero core gets a gradient at once
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    opt.step()
    assert torch.count_nonzero(layer.delta_weight()) > 0


def test_from_linear_shares_the_weight():
    lin = nn.Linear(20, 6)
    w_ptr = lin.weight.data_ptr()
    layer = tk.TTLinear.from_linear(lin, in_modes=2, ranks=3, alpha=6, dropout=0.1)
    assert layer.weight is lin.weight and layer.bias is lin.bias and layer.weight.data_ptr() == w_ptr
    assert not lin.weight.requires_grad
    assert layer.spec.in_sizes == (5, 4) and layer.scaling == 2.0 and layer.dropout == 0.1
    with pytest.raises(TypeError, match=r"linear must be an nn.Linear"):
        tk.TTLinear.from_linear(nn.Conv1d(3, 3, 1))


def test_merge_unmerge_round_trip_and_idempotence():
    for dtype in (torch.float32, torch.bfloat16):
        layer = _randomize(tk.TTLinear(24, 10, in_modes=2, ranks=3, dtype=dtype))
        x = torch.randn(5, 24, dtype=dtype)
        w0 = layer.weight.detach().clone()
        y0 = layer(x)
        layer.merge()
        layer.merge()  # no-op
        assert layer.merged and "merged=True" in repr(layer)
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(layer(x).double(), y0.double(), atol=atol * 4, rtol=rtol * 4)
        expected_w = (w0.float() + layer.delta_weight().float()).to(dtype)
        torch.testing.assert_close(layer.weight, expected_w)
        layer.unmerge()
        layer.unmerge()  # no-op
        assert not layer.merged
        assert torch.equal(layer.weight, w0)  # the kept weight comes back, bit for bit


def test_adapter_disabled_block():
    layer = _randomize(tk.TTLinear(12, 9, in_modes=2, ranks=2, dtype=torch.float64))
    x = randn(4, 12)
    base = nn.functional.linear(x, layer.weight, layer.bias)
    y = layer(x)
    assert not torch.allclose(y, base)
    with layer.adapter_disabled():
        torch.testing.assert_close(layer(x), base)
    torch.testing.assert_close(layer(x), y)
    layer.merge()
    with layer.adapter_disabled():  # merged and disabled: the kept base weight, exactly
        assert torch.equal(layer(x), base)
    torch.testing.assert_close(layer(x), y)


def test_dropout_train_eval_and_seeded_mask():
    layer = _randomize(tk.TTLinear(30, 8, ranks=4, dropout=0.5, dtype=torch.float64))
    x = randn(6, 30)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval, dense_ref(x, layer.weight, layer.bias, list(layer.cores), layer.spec, 1.0))
    layer.train()
    torch.manual_seed(3)
    y1 = layer(x)
    torch.manual_seed(3)
    y2 = layer(x)
    torch.testing.assert_close(y1, y2)  # the seed comes from torch's generator
    assert not torch.allclose(y1, y_eval)
    # equals the functional form with the mask of that seed
    torch.manual_seed(3)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
    x_drop = x * tk.reference.dropout_keep(seed, 6, 30, 0.5) / 0.5
    expected = x @ layer.weight.t() + layer.bias + x_drop @ layer.delta_weight().t()
    torch.testing.assert_close(y1, expected)


def test_views_share_cores_and_accumulate_gradients():
    spec = metatt_spec(12, 10, layers=3, matrices=2, r=3)
    cores = nn.ParameterList([nn.Parameter(c) for c in random_cores(spec, dtype=torch.float32)])
    views = [
        tk.TTLinear.from_cores(nn.Linear(12, 10), cores, spec, index={"layer": l, "matrix": m}, alpha=6.0)
        for l, m in [(0, 1), (2, 0)]
    ]
    assert views[0].cores is views[1].cores is cores
    model = nn.ModuleList(views)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == spec.num_params  # shared, counted once
    x = torch.randn(4, 12)
    for v in views:
        torch.testing.assert_close(
            v(x), dense_ref(x, v.weight, v.bias, list(cores), spec, 2.0, v.index).float(), atol=1e-5, rtol=1e-5
        )
    (views[0](x).sum() + views[1](x).sum()).backward()
    grads = [c.grad.clone() for c in cores]
    cores.zero_grad()
    views[0](x).sum().backward()
    g0 = [c.grad.clone() for c in cores]
    cores.zero_grad()
    views[1](x).sum().backward()
    for g, a, b in zip(grads, g0, (c.grad for c in cores)):
        torch.testing.assert_close(g, a + b)
    with pytest.raises(RuntimeError, match="view onto shared cores"):
        views[0].reset_adapter_parameters()
    with pytest.raises(ValueError, match="index is missing values"):
        tk.TTLinear.from_cores(nn.Linear(12, 10), cores, spec, index={"layer": 0})
    with pytest.raises(ValueError, match="spec maps 12 -> 10 features but linear is 12 -> 9"):
        tk.TTLinear.from_cores(nn.Linear(12, 9), cores, spec, index={"layer": 0, "matrix": 0})
    bad = nn.ParameterList([nn.Parameter(torch.randn(1, 12, 2))] + list(cores)[1:])
    with pytest.raises(ValueError, match=r"cores\[0\] has shape \(1, 12, 2\)"):
        tk.TTLinear.from_cores(nn.Linear(12, 10), bad, spec, index={"layer": 0, "matrix": 0})


def test_per_sample_task_view():
    spec = metatt_spec(12, 10, layers=2, matrices=2, r=3, tasks=4)
    cores = nn.ParameterList([nn.Parameter(c) for c in random_cores(spec)])
    layer = tk.TTLinear.from_cores(nn.Linear(12, 10, dtype=torch.float64), cores, spec, index={"layer": 1, "matrix": 0})
    x = randn(3, 5, 12)
    ids = torch.tensor([3, 0, 2])
    expected = dense_ref(x, layer.weight, layer.bias, list(cores), spec, 1.0, layer.index, ids[:, None].expand(3, 5))
    torch.testing.assert_close(layer(x, task_ids=ids), expected)
    with pytest.raises(ValueError, match="pass task_ids"):
        layer(x)
    with pytest.raises(IndexError, match=r"task_ids must lie in \[0, 4\), got values from 0 to 4"):
        layer(x, task_ids=torch.tensor([4, 0, 1]))
    with pytest.raises(TypeError, match="task_ids must be an integer tensor"):
        layer(x, task_ids=ids.float())
    with pytest.raises(ValueError, match=r"per-sample \(task\) mode: merge\(task=t\) with t in \[0, 4\)"):
        layer.merge()
    weight = layer.weight.detach().clone()
    layer.merge(task=2)  # one task's delta-W in the weight: no task_ids needed until unmerge
    task2 = dense_ref(x, weight, layer.bias, list(cores), spec, 1.0, layer.index, torch.full((3, 5), 2))
    torch.testing.assert_close(layer(x), task2)
    with layer.adapter_disabled():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, weight, layer.bias))
    layer.unmerge()
    torch.testing.assert_close(layer.weight, weight, atol=1e-14, rtol=0)
    with layer.adapter_disabled():
        torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    plain = tk.TTLinear(12, 10)
    with pytest.raises(ValueError, match="no per-sample"):
        plain(torch.randn(2, 12), task_ids=torch.tensor([0, 1]))


@pytest.mark.parametrize("base_dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_float32_adapter(base_dtype):
    layer = _randomize(tk.TTLinear(32, 16, in_modes=2, ranks=4, dtype=base_dtype))
    assert all(c.dtype == torch.float32 for c in layer.cores)
    x = torch.randn(7, 32, dtype=base_dtype, requires_grad=True)
    y = layer(x)
    assert y.dtype == base_dtype
    y.float().sum().backward()
    assert x.grad.dtype == base_dtype and all(c.grad.dtype == torch.float32 for c in layer.cores)
    expected = dense_ref(x.detach(), layer.weight, layer.bias, list(layer.cores), layer.spec, layer.scaling)
    atol, rtol = TOL[base_dtype]
    torch.testing.assert_close(y.double(), expected, atol=atol * 2, rtol=rtol * 2)


def test_autocast_behaves_like_nn_linear():
    layer = _randomize(tk.TTLinear(32, 16, in_modes=2, ranks=4))  # float32 base and adapter
    lin = nn.Linear(32, 16)
    x = torch.randn(5, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        assert y.dtype == lin(x).dtype == torch.bfloat16
    y.float().sum().backward()
    assert all(c.grad is not None and c.grad.dtype == torch.float32 for c in layer.cores)
    expected = dense_ref(x, layer.weight, layer.bias, list(layer.cores), layer.spec, layer.scaling)
    torch.testing.assert_close(y.double(), expected, atol=5e-2, rtol=5e-2)
    # bf16 base and bf16 input under autocast: stays bf16
    layer_bf = _randomize(tk.TTLinear(32, 16, ranks=4, dtype=torch.bfloat16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer_bf(x.bfloat16()).dtype == torch.bfloat16


def test_dtype_mismatch_without_autocast_is_refused():
    layer = tk.TTLinear(8, 4, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match=r"weight is torch.bfloat16 but the layer computes in torch.float32"):
        layer(torch.randn(2, 8))


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(dropout=1.0), ValueError, r"dropout must be a float in \[0, 1\)"),
        (dict(dropout=-0.5), ValueError, r"dropout must be a float in \[0, 1\)"),
        (dict(backend="npu"), ValueError, "backend must be one of"),
        (dict(ranks=0), ValueError, "ranks = 0"),
        (dict(in_modes=(3, 3)), ValueError, "multiply to 9 but in_features is 8"),
        (dict(alpha=float("nan")), ValueError, "alpha must be a finite number"),
    ],
)
def test_constructor_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        tk.TTLinear(8, 4, **kwargs)


def test_forward_bad_inputs():
    layer = tk.TTLinear(8, 4)
    with pytest.raises(ValueError, match="x has last dimension 7 but in_features is 8"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        layer(torch.ones(3, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="0-d tensor"):
        layer(torch.tensor(1.0))
    layer.cores[1] = nn.Parameter(torch.randn(8, 4, 2))
    with pytest.raises(ValueError, match=r"cores\[1\] has shape \(8, 4, 2\) but"):
        layer(torch.randn(3, 8))


def test_cuda_backend_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal is for machines without one")
    layer = tk.TTLinear(8, 4, backend="cuda")
    with pytest.raises(tk.BackendUnavailableError, match="backend='cuda' runs on CUDA tensors, but x is on cpu"):
        layer(torch.randn(2, 8))


def test_state_dict_round_trip():
    a = _randomize(tk.TTLinear(12, 6, in_modes=2, ranks=3))
    b = tk.TTLinear(12, 6, in_modes=2, ranks=3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(3, 12)
    torch.testing.assert_close(a(x), b(x))
