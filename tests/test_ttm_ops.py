"""TT-matrix ops as registered torch.library ops (opcheck, fakes), TTMLinear under torch.compile(fullgraph=True),
the auto dispatch's failure reporting, and the clear errors of ttm_apply / TTMLinear on bad x.

The Kronecker-sum ops run here on the ``kron-torch`` kernels (the kernels' contract in torch, float64 capable);
tests/test_ttm_kernels.py runs the Triton kernels through the same ops (interpreter on the CPU).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from ttkernels import ttm
from ttkernels.spec import ChainSpec, TTSpec
from ttkernels.ttm import TTMLinear, TTMSpec, ttm_apply
from ttkernels.ttm import dispatch as ttm_dispatch_module

OPS = torch.ops.ttkernels


def _layout_inputs(spec: TTMSpec, m: int, dtype: torch.dtype):
    split = ttm.choose_split(spec)
    cores = [torch.randn(s, dtype=dtype) / math.sqrt(s[0] * s[2]) for s in spec.core_shapes]
    q, p = (t.contiguous() for t in ttm.kron_factors(cores, split))
    k = split.cut
    layout = (
        math.prod(spec.in_modes[:k]),
        math.prod(spec.in_modes[k:]),
        math.prod(spec.out_modes[:k]),
        math.prod(spec.out_modes[k:]),
        split.order,
    )
    x2 = torch.randn(m, spec.in_features, dtype=dtype)
    dy2 = torch.randn(m, spec.out_features, dtype=dtype)
    return x2, dy2, q, p, layout


SPECS = [TTMSpec((3, 4), (2, 5), (3,)), TTMSpec((2, 3, 2), (3, 2, 5), (2, 3))]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.describe())
@pytest.mark.parametrize("m", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_kron_ops_pass_opcheck_and_match_the_reference(spec, m, dtype):
    x2, dy2, q, p, (n_l, n_r, m_l, m_r, order) = _layout_inputs(spec, m, dtype)
    args = (x2, q, p, n_l, n_r, m_l, m_r, order, "kron-torch")
    torch.library.opcheck(OPS.ttm_kron_apply.default, args)
    grad_args = (dy2, x2, q, p, n_l, n_r, m_l, m_r, order, "kron-torch")
    torch.library.opcheck(OPS.ttm_kron_grad_q.default, grad_args)
    torch.library.opcheck(OPS.ttm_kron_grad_p.default, grad_args)
    # the ops against the float64 contract, through the views the kernels see
    x3 = ttm.kron_views(x2, n_l, n_r, order)
    dy3 = ttm.kron_views(dy2, m_l, m_r, order)
    y = OPS.ttm_kron_apply(*args)
    want = torch.empty_like(y)
    ttm.kron_views(want, m_l, m_r, order).copy_(ttm.kron_apply_ref(x3, q, p))
    torch.testing.assert_close(y, want)
    torch.testing.assert_close(OPS.ttm_kron_grad_q(*grad_args), ttm.kron_grad_q_ref(dy3, x3, p))
    torch.testing.assert_close(OPS.ttm_kron_grad_p(*grad_args), ttm.kron_grad_p_ref(dy3, x3, q))


def test_kron_ops_name_an_unknown_kernel_table():
    x2, _, q, p, (n_l, n_r, m_l, m_r, order) = _layout_inputs(SPECS[0], 3, torch.float32)
    with pytest.raises(ValueError, match="Kronecker-sum kernels are 'kron-torch', 'triton' or 'cuda'"):
        OPS.ttm_kron_apply(x2, q, p, n_l, n_r, m_l, m_r, order, "torch")


@pytest.mark.parametrize("backend", ["torch", "kron-torch", "dense"])
def test_ttmlinear_compiles_fullgraph_on_the_first_call(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = TTMLinear(12, 10, in_modes=(3, 4), out_modes=(2, 5), ranks=3, alpha=4.0, backend=backend)
    with torch.no_grad():
        for c in layer.cores:
            c.normal_(0.0, 0.3)
    x = torch.randn(2, 3, 12)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    y = compiled(x)  # no eager call before
    y.square().sum().backward()
    grads = [c.grad.clone() for c in layer.cores]
    layer.zero_grad()
    y_eager = layer(x)
    y_eager.square().sum().backward()
    torch.testing.assert_close(y, y_eager)
    for g, c in zip(grads, layer.cores):
        torch.testing.assert_close(g, c.grad)


def test_float64_gradcheck_through_the_registered_ops():
    spec = SPECS[1]
    x = torch.randn(3, spec.in_features, dtype=torch.float64, requires_grad=True)
    cores = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in spec.core_shapes]
    assert torch.autograd.gradcheck(lambda x, *c: ttm_apply(x, list(c), scaling=0.5, backend="kron-torch"), (x, *cores))


# ------------------------------------------------------------------------------------------------ dispatch
class _Event:
    def __init__(self, enable_timing=True):
        pass

    def record(self):
        pass

    def synchronize(self):
        pass

    def elapsed_time(self, other):
        return 3.0


def test_a_failing_candidate_is_reported_not_swallowed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "Event", _Event)
    spec = SPECS[0]

    def run(x, cores, name):
        if name == "triton":
            raise RuntimeError("kernel exploded")
        return ttm_apply(x, cores, backend="torch")

    with pytest.warns(RuntimeWarning, match="candidate 'triton' failed .* RuntimeError: kernel exploded"):
        best, failed = ttm_dispatch_module.measure(
            spec, 4, torch.float32, torch.device("cpu"), ["triton", "dense"], run
        )
    assert best == "dense" and failed == {"triton": "RuntimeError: kernel exploded"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match=r"every candidate failed.*kernel exploded"):
            ttm_dispatch_module.measure(spec, 4, torch.float32, torch.device("cpu"), ["triton"], run)


# ------------------------------------------------------------------------------------------------ bad input
BAD_X = [
    (torch.ones(2, 4, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
    (torch.ones(2, 4, dtype=torch.bool), TypeError, "x must be a floating-point tensor"),
    (torch.ones(2, 4, dtype=torch.complex64), TypeError, "x must be a floating-point tensor"),
    (torch.ones(2, 4).to(torch.float8_e4m3fn), TypeError, "x must be a floating-point tensor"),
    (torch.ones(2, 5), ValueError, "last dimension 5"),
    (torch.tensor(1.0), ValueError, "0-d tensor"),
    ([[1.0] * 4], TypeError, "x must be a torch.Tensor"),
]


@pytest.mark.parametrize("x,exc,match", BAD_X, ids=lambda v: str(getattr(v, "dtype", v))[:20])
def test_ttm_apply_and_ttmlinear_name_bad_x(x, exc, match):
    with pytest.raises(exc, match=match):
        ttm_apply(x, [torch.randn(1, 2, 2, 2), torch.randn(2, 2, 2, 1)])
    layer = TTMLinear(4, 4, in_modes=(2, 2), out_modes=(2, 2), ranks=2)
    with pytest.raises(exc, match=match if "last dimension" not in match else "x has last dimension 5"):
        layer(x)


def test_kernel_backends_refuse_float64_and_the_layer_a_dtype_mismatch():
    cores = [torch.randn(1, 2, 2, 2, dtype=torch.float64), torch.randn(2, 2, 2, 1, dtype=torch.float64)]
    for backend in ("triton", "cuda"):
        with pytest.raises(TypeError, match=f"backend='{backend}' computes in float32, bfloat16 or float16"):
            ttm_apply(torch.randn(3, 4, dtype=torch.float64), cores, backend=backend)
    layer = TTMLinear(4, 4, in_modes=(2, 2), out_modes=(2, 2), ranks=2, backend="triton")
    with pytest.raises(TypeError, match="computes in float32, bfloat16 or float16"):
        layer.double()(torch.randn(3, 4, dtype=torch.float64))
    layer = TTMLinear(4, 4, in_modes=(2, 2), out_modes=(2, 2), ranks=2)
    with pytest.raises(TypeError, match=r"x is torch\.float64 but the base weight is torch\.float32"):
        layer(torch.randn(3, 4, dtype=torch.float64))


@pytest.mark.parametrize("scaling", [torch.tensor(2.0), float("nan"), True, "2"])
def test_ttm_apply_refuses_a_bad_scaling(scaling):
    with pytest.raises(TypeError, match="scaling must be a finite real number"):
        ttm_apply(torch.randn(2, 4), [torch.randn(1, 2, 4, 1)], scaling=scaling)


def test_spec_constructors_mean_one_thing():
    assert TTMSpec.linear(24, 20, in_modes=(4, 6), out_modes=(5, 4), ranks=3) == TTMSpec.build((4, 6), (5, 4), 3)
    assert TTMSpec.build((4, 6), (5, 4), [2]).ranks == (2,)
    with pytest.warns(DeprecationWarning, match="TTMSpec.build\\(in_features, out_features, ...\\) is TTMSpec.linear"):
        old = TTMSpec.build(24, 20, in_modes=(4, 6), out_modes=(5, 4), ranks=3)
    assert old == TTMSpec.build((4, 6), (5, 4), 3)
    with pytest.raises(TypeError, match="out_modes must be a sequence of mode sizes"):
        TTMSpec.build((4, 6), 2)
    spec = TTMSpec.build((4, 6), (5, 4), 3)  # the chain facts come from the shared base
    assert spec.bond_ranks == (1, 3, 1) and spec.core_shapes == ((1, 5, 4, 3), (3, 4, 6, 1))
    assert spec.num_params == 5 * 4 * 3 + 3 * 4 * 6 and spec.max_rank == 3 and spec.num_cores == 2
    tt = TTSpec.linear(24, 20, in_modes=(4, 6), out_modes=(5, 4), ranks=3)  # the same names, the same meanings
    assert isinstance(spec, ChainSpec) and isinstance(tt, ChainSpec)
    assert tt == TTSpec.build((4, 6), (5, 4), 3) and tt.core_shapes == ((1, 4, 3), (3, 6, 3), (3, 5, 3), (3, 4, 1))
    assert tt.num_params == sum(math.prod(s) for s in tt.core_shapes) and tt.max_rank == 3


def test_ttmlinear_replace_cores_keeps_modes():
    layer = TTMLinear(24, 20, in_modes=(4, 6), out_modes=(5, 4), ranks=3)
    new = layer.replace_cores([torch.randn(1, 5, 4, 2), torch.randn(2, 4, 6, 1)])
    assert layer.spec.ranks == (2,) and list(layer.cores) == list(new)
    with pytest.raises(ValueError, match="only bond ranks may change"):
        layer.replace_cores([torch.randn(1, 4, 5, 2), torch.randn(2, 5, 4, 1)])
    assert isinstance(layer.cores, nn.ParameterList)
