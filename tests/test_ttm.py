"""TT-matrix (MPO) adapters: the reference sweep and its analytic backward against float64 ground truth."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from helpers import require
from ttkernels import ttm
from ttkernels.ops import BackendUnavailableError
from ttkernels.ttm import TTMLinear, TTMSpec, ttm_apply, ttm_dense, ttm_plan


def random_ttm(spec: TTMSpec, dtype=torch.float64, requires_grad=False):
    cores = [torch.randn(s, dtype=dtype) / math.sqrt(s[0] * s[2]) for s in spec.core_shapes]
    return [c.requires_grad_(requires_grad) for c in cores]


def dense_einsum(cores):
    """delta-W from the definition: dW[(o_1..o_K), (i_1..i_K)] = prod_k G_k[:, o_k, i_k, :] (an independent path)."""
    letters = "abcdefgh"
    terms, outs, ins = [], "", ""
    for k, _ in enumerate(cores):
        o, i = letters[k].upper(), letters[k]
        terms.append(f"{'xyzuvw'[k]}{o}{i}{'xyzuvw'[k + 1]}")
        outs, ins = outs + o, ins + i
    expr = ",".join(terms) + "->" + outs + ins
    t = torch.einsum(expr, *cores)
    m = math.prod(c.shape[1] for c in cores)
    return t.reshape(m, -1)


SPECS = [
    TTMSpec((3, 2), (2, 5), (2,)),
    TTMSpec((2, 3, 2), (3, 1, 4), (3, 2)),
    TTMSpec((5,), (7,), ()),
    TTMSpec((4, 4, 4), (4, 4, 4), (1, 1)),
]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dense_is_the_definition(spec):
    cores = random_ttm(spec)
    torch.testing.assert_close(ttm_dense(cores), dense_einsum(cores))


@pytest.mark.parametrize("spec", SPECS, ids=str)
@pytest.mark.parametrize("order", ["ltr", "rtl"])
@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_sweep_equals_the_dense_product(spec, order, tokens):
    cores = random_ttm(spec)
    x = torch.randn(tokens, spec.in_features, dtype=torch.float64)
    y = ttm_apply(x, cores, scaling=0.5, order=order)
    torch.testing.assert_close(y, 0.5 * x @ dense_einsum(cores).t())


@pytest.mark.parametrize("spec", SPECS[:3], ids=str)
@pytest.mark.parametrize("order", ["ltr", "rtl"])
def test_gradcheck_float64(spec, order):
    cores = random_ttm(spec, requires_grad=True)
    x = torch.randn(3, 2, spec.in_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *c: ttm_apply(x, c, scaling=0.7, order=order), (x, *cores))


def test_backward_matches_autograd_through_the_dense_matrix():
    spec = TTMSpec((2, 3, 2), (3, 2, 2), (3, 4))
    cores = random_ttm(spec, requires_grad=True)
    x = torch.randn(11, spec.in_features, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(11, spec.out_features, dtype=torch.float64)
    got = torch.autograd.grad(ttm_apply(x, cores, scaling=1.3), (x, *cores), dy)
    want = torch.autograd.grad(1.3 * x @ dense_einsum(cores).t(), (x, *cores), dy)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_bond_rank_one_two_cores_is_a_kronecker_adapter():
    A, B = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    cores = [A.reshape(1, 3, 4, 1), B.reshape(1, 5, 2, 1)]
    x = torch.randn(6, 8, dtype=torch.float64)
    torch.testing.assert_close(ttm_apply(x, cores), x @ torch.kron(A, B).t())


def test_plan_counts_and_picks_the_cheaper_order():
    spec = TTMSpec((16, 16, 16), (16, 16, 16), (8, 8))
    plan = ttm_plan(spec, 8192)
    assert plan["ltr"]["flops"] == plan["rtl"]["flops"]  # symmetric spec
    # asymmetric: a wide first core is cheaper absorbed last
    spec2 = TTMSpec((64, 2), (2, 64), (8,))
    p2 = ttm_plan(spec2, 100)
    ltr = 2 * 100 * (1 * 64 * 1 * 2 * 64 * 8 + 64 * 1 * 8 * 64 * 2 * 1)
    assert p2["ltr"]["flops"] == ltr
    assert p2["order"] == (
        "ltr" if (p2["ltr"]["flops"], p2["ltr"]["peak"]) <= (p2["rtl"]["flops"], p2["rtl"]["peak"]) else "rtl"
    )


def test_sweep_costs_against_opt_einsum():
    """The sweep's FLOPs beside the optimal contraction path opt_einsum finds for the same network."""
    oe = require("opt_einsum")
    for spec, tokens in [
        (TTMSpec((16, 16, 16), (16, 16, 16), (8, 8)), 8192),
        (TTMSpec((16, 16, 16), (16, 16, 16), (8, 8)), 1),
        (TTMSpec((8, 8), (8, 8), (4,)), 64),
    ]:
        letters = "abcdefghijklmnop"
        k = spec.num_cores
        ins, outs, bonds = letters[:k], letters[k : 2 * k], letters[2 * k : 3 * k - 1]
        terms = ["Z" + ins]
        for j in range(k):
            left = bonds[j - 1] if j else ""
            right = bonds[j] if j < k - 1 else ""
            terms.append(left + outs[j] + ins[j] + right)
        expr = ",".join(terms) + "->Z" + outs
        shapes = [(tokens, *spec.in_modes)]
        for j, s in enumerate(spec.core_shapes):
            shapes.append(tuple(([s[0]] if j else []) + [s[1], s[2]] + ([s[3]] if j < k - 1 else [])))
        _, info = oe.contract_path(expr, *shapes, shapes=True, optimize="optimal")
        plan = ttm_plan(spec, tokens)
        # for these specs the optimal path is a sweep: the same count (multiply-adds as 2 FLOPs in both)
        assert plan[plan["order"]]["flops"] == int(info.opt_cost), (spec, plan, info.opt_cost)


# ------------------------------------------------------------------------------------------- Kronecker-sum form
@pytest.mark.parametrize("spec", SPECS[:2] + [SPECS[3], TTMSpec((2, 3, 2, 2), (3, 2, 1, 2), (2, 3, 1))], ids=str)
def test_every_cut_is_the_same_matrix(spec):
    """Each cut and order of the Kronecker-sum form, applied through the kernels' contract in float64."""
    cores = random_ttm(spec)
    x = torch.randn(5, spec.in_features, dtype=torch.float64)
    want = x @ dense_einsum(cores).t()
    for split in ttm.kron_splits(spec):
        q, p = ttm.kron_factors(cores, split)
        k = split.cut
        n_l, n_r = math.prod(spec.in_modes[:k]), math.prod(spec.in_modes[k:])
        m_l, m_r = math.prod(spec.out_modes[:k]), math.prod(spec.out_modes[k:])
        assert q.shape == (split.rank, split.na, split.ni) and p.shape == (split.rank, split.nj, split.nc)
        y = torch.full((5, spec.out_features), float("nan"), dtype=torch.float64)
        ttm.kron_views(y, m_l, m_r, split.order).copy_(
            ttm.kron_apply_ref(ttm.kron_views(x, n_l, n_r, split.order), q, p)
        )
        torch.testing.assert_close(y, want)


@pytest.mark.parametrize("backend", ["kron-torch", "dense"])
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], TTMSpec((2, 2, 3), (3, 2, 2), (2, 3))], ids=str)
def test_gradcheck_float64_kron_and_dense(spec, backend):
    cores = random_ttm(spec, requires_grad=True)
    x = torch.randn(2, 3, spec.in_features, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *c: ttm_apply(x, c, scaling=0.7, backend=backend), (x, *cores))


def test_kron_reductions_against_autograd():
    """kron_grad_q / kron_grad_p are the gradients of kron_apply (float64, autograd through the reference)."""
    x3 = torch.randn(6, 3, 4, dtype=torch.float64)
    q = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    p = torch.randn(2, 4, 7, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(6, 5, 7, dtype=torch.float64)
    gq, gp = torch.autograd.grad(ttm.kron_apply_ref(x3, q, p), (q, p), dy)
    torch.testing.assert_close(ttm.kron_grad_q_ref(dy, x3, p), gq)
    torch.testing.assert_close(ttm.kron_grad_p_ref(dy, x3, q), gp)


def test_choose_split_fewest_flops_within_the_kept_limit():
    target = TTMSpec((16, 16, 16), (16, 16, 16), (8, 8))
    split = ttm.choose_split(target)
    assert (split.ni, split.na, split.rank) == (16, 16, 8) and {split.nj, split.nc} == {256}
    eligible = [s for s in ttm.kron_splits(target) if max(s.ni, s.na) <= 128]
    assert split.flops_per_token(16) == min(s.flops_per_token(16) for s in eligible)
    assert split.flops_per_token() == 2 * 8 * (16 * 256 * 256 + 16 * 16 * 256)
    assert ttm.choose_split(TTMSpec((5,), (7,), ())) is None  # one core: no bond to cut
    assert ttm.choose_split(TTMSpec((2, 130), (130, 2), (2,))) is None  # every cut keeps a side of 130
    wide = TTMSpec((300, 2), (300, 2), (3,))  # only the right factor (2 x 2) may be kept
    assert ttm.choose_split(wide).order == "right" and (ttm.choose_split(wide).ni, ttm.choose_split(wide).na) == (2, 2)


def test_kron_split_flops_beside_opt_einsum_and_the_sweep():
    """The fused kernels trade FLOPs for an intermediate that never leaves the chip: at the target shape the
    chosen cut costs 1.7x the sweep's (and opt_einsum's optimal path's) multiply-adds, 0.53x the dense GEMM's."""
    spec = TTMSpec((16, 16, 16), (16, 16, 16), (8, 8))
    sweep = ttm_plan(spec, 1)[ttm_plan(spec, 1)["order"]]["flops"]
    fused = ttm.choose_split(spec).flops_per_token()
    assert sweep == 2 * (16 * 16 * 8 * 256 + 16 * 8 * 16 * 16 * 8 * 16 + 256 * 8 * 16 * 16)
    assert 1.6 < fused / sweep < 1.8
    assert 0.5 < fused / (2 * 4096 * 4096) < 0.55


def test_dispatch_off_cuda_is_the_sweep_and_the_model_has_a_crossover():
    spec = TTMSpec((16, 16, 16), (16, 16, 16), (8, 8))
    assert ttm.ttm_dispatch(spec, 8192, torch.float32, torch.device("cpu")) == "torch"
    assert ttm.dispatch_model(spec, 8192) == "triton"
    # a wide two-core chain of high bond rank: the Kronecker sum costs more than the dense GEMM per token, but
    # at one token building dW dominates
    big = TTMSpec((64, 64), (64, 64), (64,))
    assert ttm.dispatch_model(big, 8192) == "dense"
    assert ttm.dispatch_model(big, 1) == "triton"
    assert ttm.dispatch_model(TTMSpec((2, 130), (130, 2), (2,)), 64) == "dense"  # no fused split


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_kernel_backends_refuse_cpu_tensors(monkeypatch):
    x, cores = torch.randn(2, 6), [torch.randn(1, 2, 2, 2), torch.randn(2, 3, 3, 1)]
    with pytest.raises(BackendUnavailableError, match="backend='cuda' runs on CUDA tensors"):
        ttm_apply(x, cores, backend="cuda")
    from ttkernels._triton_kernels import backend as tb

    monkeypatch.setattr(tb, "INTERPRET", False)
    with pytest.raises(BackendUnavailableError, match="backend='triton' runs on CUDA tensors"):
        ttm_apply(x, cores, backend="triton")


def test_dense_backend_matches_the_sweep():
    spec = TTMSpec((2, 3, 2), (3, 2, 2), (3, 4))
    cores = random_ttm(spec)
    x = torch.randn(9, spec.in_features, dtype=torch.float64)
    torch.testing.assert_close(ttm_apply(x, cores, backend="dense"), ttm_apply(x, cores, backend="torch"))


# ------------------------------------------------------------------------------------------- module
def test_ttmlinear_contract():
    torch.manual_seed(0)
    base = nn.Linear(24, 20, dtype=torch.float64)
    layer = TTMLinear.from_linear(base, in_modes=(4, 6), out_modes=(5, 4), ranks=3, alpha=6)
    assert layer.weight is base.weight and not base.weight.requires_grad
    assert layer.num_adapter_params == sum(math.prod(s) for s in layer.spec.core_shapes)
    # scaling rule 2: alpha / r * sqrt(d_out / (m_K n_K^2)), last core (3, 4, 6, 1) (ttkernels.init)
    scaling = 6 / 3 * math.sqrt(20 / (4 * 6 * 6))
    assert layer.scaling == pytest.approx(scaling)
    x = torch.randn(3, 7, 24, dtype=torch.float64)
    torch.testing.assert_close(layer(x), base(x))  # delta-W starts at zero
    with torch.no_grad():
        layer.cores[-1].normal_()
    y = layer(x)
    torch.testing.assert_close(y, base(x) + x @ layer.delta_weight().t())
    torch.testing.assert_close(layer.delta_weight(), scaling * ttm_dense(list(layer.cores)))
    w0 = base.weight.clone()
    layer.merge()
    torch.testing.assert_close(layer(x), y)
    torch.testing.assert_close(base.weight, w0 + layer.delta_weight())
    with layer.adapter_disabled():
        torch.testing.assert_close(layer(x), x @ w0.t() + base.bias)
    layer.unmerge()
    assert torch.equal(base.weight, w0)
    with layer.adapter_disabled():
        torch.testing.assert_close(layer(x), base(x))


def test_ttmlinear_trains():
    torch.manual_seed(0)
    layer = TTMLinear(16, 16, in_modes=2, ranks=4)
    target = torch.randn(16, 16) * 0.1
    x = torch.randn(64, 16)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = (layer(x) - (layer.weight @ x.t()).t() - layer.bias - x @ target.t()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == [f"cores.{k}" for k in range(2)]


def test_saved_activations_are_x_only():
    from test_memory import per_token_ratio

    d = 256
    layer = TTMLinear(d, d, in_modes=2, ranks=8)
    ratio = per_token_ratio(layer, lambda m: torch.randn(m, d, requires_grad=True), 8, 40, d)
    assert 1.0 <= ratio <= 1.1, ratio


@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda: TTMSpec((2, 2), (4,), ()), ValueError, "of the same length"),
        (lambda: TTMSpec((2, 2), (2, 2), ()), ValueError, "2 cores need 1 bond ranks"),
        (lambda: TTMSpec((2, 2), (2, 2), (0,)), ValueError, "ranks must be positive"),
        (lambda: TTMSpec((2, 0), (2, 2), (1,)), ValueError, "mode sizes must be positive"),
        (lambda: TTMSpec.linear(12, 10, in_modes=(5, 3)), ValueError, "multiply to 15"),
        (lambda: ttm_apply(torch.randn(2, 6), [torch.randn(1, 2, 2, 3), torch.randn(2, 3, 3, 1)]), ValueError, "has shape"),
        (lambda: ttm_apply(torch.randn(2, 5), [torch.randn(1, 2, 2, 2), torch.randn(2, 3, 3, 1)]), ValueError, "last dimension 5"),
        (lambda: ttm_apply(torch.randn(2, 6), [torch.randn(2, 3, 1)]), ValueError, "4-D tensors"),
        (lambda: ttm_apply(torch.ones(2, 4, dtype=torch.long), [torch.randn(1, 2, 4, 1)]), TypeError, "floating-point"),
        (lambda: ttm_apply(torch.randn(2, 4), [torch.randn(1, 2, 4, 1)], order="up"), ValueError, "order must be"),
        (lambda: TTMLinear.from_linear(nn.Conv1d(2, 2, 1)), TypeError, "must be an nn.Linear"),
        (lambda: TTMLinear(4, 4, backend="fast"), ValueError, "backend must be one of"),
        (lambda: ttm_apply(torch.randn(2, 4), [torch.randn(1, 2, 4, 1)], backend="fast"), ValueError, "backend must be one of"),
        (lambda: ttm_apply(torch.randn(2, 4), [torch.randn(1, 2, 4, 1, device="meta")]), ValueError, "cores\\[0\\] is on meta"),
        (lambda: ttm_apply(torch.randn(2, 4, dtype=torch.float64), [torch.randn(1, 2, 4, 1, dtype=torch.float64)], backend="triton"), TypeError, "float32, bfloat16 or float16"),
    ],
)  # fmt: skip
def test_bad_input(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


@pytest.mark.parametrize("in_modes, out_modes, rank", [((4, 6), (5, 4), 3), ((2, 3, 4), (3, 2, 5), (3, 4))])
def test_same_matrix_and_outputs_as_tensorly_torch_block_tt(in_modes, out_modes, rank):
    """tltorch's block-TT layer keeps its cores as (rank, out_k, in_k, rank), out before in, as here."""
    tltorch = require("tltorch")
    ranks = (1, rank, 1) if isinstance(rank, int) else (1, *rank, 1)
    layer = tltorch.FactorizedLinear(
        in_tensorized_features=in_modes,
        out_tensorized_features=out_modes,
        bias=True,
        factorization="blocktt",
        rank=ranks,
        implementation="factorized",
        dtype=torch.float64,
    )
    spec = TTMSpec(tuple(out_modes), tuple(in_modes), tuple(ranks[1:-1]))
    assert [tuple(f.shape) for f in layer.weight.factors] == list(spec.core_shapes)
    cores = random_ttm(spec)
    with torch.no_grad():
        for f, c in zip(layer.weight.factors, cores):
            f.copy_(c)
    torch.testing.assert_close(ttm_dense(cores), layer.weight.to_matrix())
    x = torch.randn(7, 3, spec.in_features, dtype=torch.float64)
    for backend in ("torch", "dense", "kron-torch"):
        torch.testing.assert_close(ttm_apply(x, cores, backend=backend) + layer.bias, layer(x))
