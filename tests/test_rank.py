"""Rank tools against float64 ground truth: TT-SVD, rounding, sweeps, LoRA <-> TT, compression in training."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import ttkernels as tk
from helpers import metatt_spec, random_cores, require
from ttkernels import rank as rk
from ttkernels import reference as ref


def random_tt(sizes, ranks, dtype=torch.float64):
    """A TT of exactly these ranks (generic random cores have them almost surely)."""
    bonds = [1, *ranks, 1]
    return [torch.randn(bonds[k], n, bonds[k + 1], dtype=dtype) for k, n in enumerate(sizes)]


def full(cores):
    return rk.tt_full(cores)


def rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def ranks_of(cores):
    return [c.shape[2] for c in cores[:-1]]


# ------------------------------------------------------------------------------------------- TT-SVD
@pytest.mark.parametrize("sizes, ranks", [([4, 5, 6], [2, 3]), ([3, 7, 2, 5], [3, 4, 2]), ([11, 13], [5])])
def test_tt_svd_recovers_exact_ranks(sizes, ranks):
    t = full(random_tt(sizes, ranks))
    cores = rk.tt_svd(t)
    assert ranks_of(cores) == ranks
    assert rel(full(cores), t) <= 1e-10


@pytest.mark.parametrize("rel_eps", [0.3, 0.1, 0.01])
def test_tt_svd_error_bound_and_max_rank(rel_eps):
    t = torch.randn(6, 5, 7, 4, dtype=torch.float64)
    cores = rk.tt_svd(t, rel_eps=rel_eps)
    assert rel(full(cores), t) <= rel_eps
    capped = rk.tt_svd(t, max_rank=3, rel_eps=rel_eps)
    assert max(ranks_of(capped)) <= 3
    assert max(ranks_of(rk.tt_svd(t, max_rank=2))) <= 2


def test_tt_svd_of_a_matrix_with_modes_is_the_adapter_layout():
    spec = tk.TTSpec.build((4, 3), (2, 5), [3, 4, 2])
    cores = random_cores(spec)
    dWt = ref.dense_delta(cores, spec)  # (12, 10)
    got = rk.tt_svd(dWt, in_modes=(4, 3), out_modes=(2, 5))
    assert ranks_of(got) == [3, 4, 2]
    torch.testing.assert_close(ref.dense_delta(got, spec), dWt, atol=1e-10, rtol=1e-10)


# ------------------------------------------------------------------------------------------- rounding
def test_rounding_an_overparameterized_tt_is_exact():
    cores = random_tt([5, 4, 6, 3], [2, 3, 2])
    # the same tensor with every bond padded by redundant directions
    padded = []
    for k, c in enumerate(cores):
        r0, n, r1 = c.shape
        p0 = r0 if k == 0 else r0 + 3
        p1 = r1 if k == len(cores) - 1 else r1 + 3
        big = torch.zeros(p0, n, p1, dtype=torch.float64)
        big[:r0, :, :r1] = c
        padded.append(big)
    mixer = [torch.linalg.qr(torch.randn(c.shape[2], c.shape[2], dtype=torch.float64))[0] for c in padded[:-1]]
    mixed = [padded[0]]
    for k in range(1, len(padded)):  # G_{k-1} Q, Q^T G_k: the same tensor, no zero blocks left
        q = mixer[k - 1]
        mixed[k - 1] = torch.einsum("anb,bc->anc", mixed[k - 1], q)
        mixed.append(torch.einsum("cb,bnd->cnd", q.t(), padded[k]))
    assert rel(full(mixed), full(cores)) <= 1e-12
    rounded = rk.tt_round(mixed)
    assert ranks_of(rounded) == [2, 3, 2]
    assert rel(full(rounded), full(cores)) <= 1e-10


@pytest.mark.parametrize("rel_eps", [0.5, 0.2, 0.05])
@pytest.mark.parametrize("max_rank", [None, 2, 4])
def test_rounding_and_sweep_bounds(rel_eps, max_rank):
    cores = random_tt([6, 5, 4, 7], [5, 6, 5])
    t = full(cores)
    for fn in (rk.tt_round, rk.sweep):
        out = fn(cores, max_rank=max_rank, rel_eps=rel_eps)
        if max_rank is not None:
            assert max(ranks_of(out)) <= max_rank
        else:
            assert rel(full(out), t) <= rel_eps
        # the error measured without forming the tensors is the true one
        assert math.isclose(rk.relative_error(cores, out), rel(full(out), t), rel_tol=1e-6, abs_tol=1e-12)


def test_sweep_keeps_the_norm_in_the_first_core():
    cores = random_tt([4, 5, 6], [3, 3])
    out = rk.sweep(cores, rel_eps=0.01)
    for c in out[1:]:  # right-orthonormal
        m = c.reshape(c.shape[0], -1)
        torch.testing.assert_close(m @ m.t(), torch.eye(m.shape[0], dtype=m.dtype), atol=1e-10, rtol=0)
    assert math.isclose(float(out[0].norm()), float(full(cores).norm()), rel_tol=0.011)
    assert math.isclose(float(rk.tt_norm(cores)), float(full(cores).norm()), rel_tol=1e-10)


def test_rounding_keeps_float32_and_computes_in_it():
    cores = [c.float() for c in random_tt([5, 6, 4], [3, 3])]
    out = rk.tt_round(cores, max_rank=2)
    assert all(c.dtype == torch.float32 for c in out)


# ---------------------------------------------------------------------------------------- LoRA <-> TT
@pytest.mark.parametrize("in_modes, out_modes", [((24,), (20,)), ((4, 6), (5, 4)), ((2, 3, 4), (20,))])
def test_from_lora_then_to_lora_reproduces_the_lora_product(in_modes, out_modes):
    r = 3
    A, B = torch.randn(r, 24, dtype=torch.float64), torch.randn(20, r, dtype=torch.float64)
    cores, spec = rk.from_lora(A, B, in_modes, out_modes)
    assert max(spec.ranks) <= max(r * 4, r)  # bounded by the mode sizes and r
    torch.testing.assert_close(ref.dense_delta(cores, spec), (B @ A).t(), atol=1e-10, rtol=1e-10)
    lora_A, lora_B = rk.to_lora(cores, spec)
    assert lora_A.shape[1] == 24 and lora_B.shape[0] == 20 and lora_A.shape[0] == lora_B.shape[1]
    torch.testing.assert_close(lora_B @ lora_A, B @ A, atol=1e-10, rtol=1e-10)


def test_from_lora_truncates_within_the_bound_and_scales():
    A, B = torch.randn(8, 64, dtype=torch.float64), torch.randn(48, 8, dtype=torch.float64)
    cores, spec = rk.from_lora(A, B, (8, 8), (6, 8), rel_eps=0.3, max_rank=None, scaling=0.5)
    want = 0.5 * (B @ A).t()
    assert rel(ref.dense_delta(cores, spec), want) <= 0.3
    capped, spec2 = rk.from_lora(A, B, (8, 8), (6, 8), max_rank=2)
    assert max(spec2.ranks) <= 2


def test_from_lora_does_not_form_the_dense_product(monkeypatch):
    A, B = torch.randn(4, 4096, dtype=torch.float64), torch.randn(4096, 4, dtype=torch.float64)
    seen = []
    real_svd = torch.linalg.svd

    def svd(m, *a, **k):
        seen.append(m.numel())
        return real_svd(m, *a, **k)

    monkeypatch.setattr(torch.linalg, "svd", svd)
    cores, spec = rk.from_lora(A, B, (64, 64), (64, 64))
    assert max(seen) <= 4096 * 4 * 16  # O(d r n): never 4096 x 4096
    x = torch.randn(3, 4096, dtype=torch.float64)
    torch.testing.assert_close(x @ ref.dense_delta(cores, spec), x @ (B @ A).t(), atol=1e-9, rtol=1e-9)


def test_to_lora_of_a_metatt_slice_is_exact():
    spec = metatt_spec(12, 10, 3, 4, 3, tasks=2)
    cores = random_cores(spec)
    index = {"layer": 2, "matrix": 1}
    lora_A, lora_B = rk.to_lora(cores, spec, index, task=1)
    torch.testing.assert_close(lora_B @ lora_A, ref.dense_delta(cores, spec, index, task=1).t())
    with pytest.raises(ValueError, match="needs task="):
        rk.to_lora(cores, spec, index)


# ------------------------------------------------------------------------------------------- training
def _toy(seed=0):
    torch.manual_seed(seed)
    layer = tk.TTLinear(24, 20, in_modes=2, out_modes=2, ranks=6, dtype=torch.float64)
    target = tk.TTLinear(24, 20, in_modes=2, out_modes=2, ranks=2, dtype=torch.float64)
    target.weight.data.copy_(layer.weight)
    target.bias.data.copy_(layer.bias)
    with torch.no_grad():
        for c in target.cores:
            c.normal_(0, 0.5)
    return layer, target


def test_compress_a_trained_ttlinear_keeps_outputs_and_training_goes_on():
    layer, target = _toy()
    x = torch.randn(64, 24, dtype=torch.float64)
    y = target(x).detach()
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2)
    for _ in range(40):  # part way: the loss still has room to fall
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    before_params = layer.num_adapter_params
    before = layer(x).detach()
    dW = layer.delta_weight().detach()
    ranks = rk.compress_(layer, rel_eps=0.05, optimizer=opt)
    assert layer.num_adapter_params < before_params and ranks[""] == layer.spec.ranks
    assert rel(layer.delta_weight(), dW) <= 0.05
    # |x (dW' - dW)^T| <= |x| |dW' - dW| <= 0.05 |x| |dW|
    assert float((layer(x) - before).detach().norm()) <= 0.05 * float(x.norm() * dW.norm()) + 1e-12
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in layer.cores)
    loss0 = (layer(x) - y).square().mean().item()
    for _ in range(30):
        loss = (layer(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < loss0


def test_compress_metatt_and_the_rank_schedule():
    transformers = require("transformers")
    from helpers import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    w = tk.get_metatt_model(model, tk.MetaTTConfig(["q_proj", "v_proj", "down_proj"], rank=6))
    with torch.no_grad():
        for p in w.shared_parameters():
            p.normal_(0, 0.2)
    ids = torch.randint(1, 64, (2, 5))
    target = torch.randn(2, 5, 64)
    opt = torch.optim.AdamW(w.shared_parameters(), lr=1e-2)
    sched = rk.RankSchedule(w, opt, every=3, final_rank=2, stages=2)
    assert sched.final_rank == 2 and sched.start_rank == 6
    losses, events = [], {}
    for step in range(1, 13):
        loss = (w(ids).logits - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        out = sched.step(step)
        if out is not None:
            events[step] = out
    assert sorted(events) == [3, 6]
    assert all(max(r) <= 4 for r in events[3].values()) and all(max(r) <= 2 for r in events[6].values())
    assert all(max(g.spec.ranks) <= 2 for g in w.groups.values())
    assert losses[-1] < losses[6]  # training goes on after the last compression
    budget = rk.RankSchedule(w, opt, every=1, max_params=400)
    total = sum(
        tk.TTSpec(g.spec.modes, tuple(min(x, budget.final_rank) for x in g.spec.ranks)).num_params
        for g in w.groups.values()
    )
    assert total <= 400


def test_sweep_on_the_pretrained_minilm_metatt():
    from helpers import load_minilm

    tok, model = load_minilm()
    batch = tok(
        ["A man is eating food.", "A dog runs in the park.", "The market fell."], padding=True, return_tensors="pt"
    )
    w = tk.get_metatt_model(model, tk.MetaTTConfig(["query", "key", "value", "attention.output.dense"], rank=8))
    target = torch.randn(3, 384)
    opt = torch.optim.AdamW(w.shared_parameters(), lr=5e-3)

    def loss_fn():
        return (w(**batch).last_hidden_state[:, 0] - target).square().mean()

    for _ in range(6):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    old = [c.detach().clone() for c in w.shared_parameters()]
    params = w.num_trainable_parameters()
    rk.compress_(w, rel_eps=0.3, optimizer=opt)
    assert w.num_trainable_parameters() < params
    assert rk.relative_error(old, w.shared_parameters()) <= 0.3  # the whole TT: every layer and matrix
    after = loss_fn().item()
    for _ in range(6):
        loss = loss_fn()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss_fn().item() < after


def test_a_compressed_metatt_adapter_saves_and_loads(tmp_path):
    transformers = require("transformers")
    from helpers import tiny_llama_config

    def make():
        torch.manual_seed(0)
        return transformers.LlamaForCausalLM(tiny_llama_config()).eval()

    w = tk.get_metatt_model(make(), tk.MetaTTConfig(["q_proj", "v_proj"], rank=6))
    with torch.no_grad():
        for p in w.shared_parameters():
            p.normal_(0, 0.2)
    rk.compress_(w, max_rank=3)
    ids = torch.randint(1, 64, (2, 5))
    want = w(ids).logits.detach()
    w.save_pretrained(tmp_path)
    loaded = tk.MetaTTModel.from_pretrained(make(), tmp_path)
    assert {g: s.spec.ranks for g, s in loaded.groups.items()} == {g: s.spec.ranks for g, s in w.groups.items()}
    torch.testing.assert_close(loaded(ids).logits, want, atol=1e-6, rtol=1e-6)  # CPU BLAS may round differently


def test_compress_refuses_views_and_bad_limits():
    spec = tk.TTSpec.build((8,), (6,), 2, index_modes=[tk.Mode.index("layer", 2)])
    cores = tk.modules.new_cores(spec)
    view = tk.TTLinear.from_cores(nn.Linear(8, 6), cores, spec, index={"layer": 0})
    with pytest.raises(ValueError, match="view onto shared cores"):
        rk.compress_(view, max_rank=1)
    layer = tk.TTLinear(8, 6, ranks=2)
    with pytest.raises(ValueError, match="give max_rank, rel_eps or both"):
        rk.compress_(layer)
    with pytest.raises(
        TypeError,
        match="takes a TTLinear, a MetaTTModel, a TT-LoRA layer or a model holding TT-LoRA layers, got Linear",
    ):
        rk.compress_(nn.Linear(2, 2), max_rank=1)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "call, exc, message",
    [
        (lambda: rk.tt_svd(torch.randn(3, 4), max_rank=0), ValueError, "max_rank must be a positive int"),
        (lambda: rk.tt_svd(torch.randn(3, 4), max_rank=-2), ValueError, "max_rank must be a positive int"),
        (lambda: rk.tt_svd(torch.randn(3, 4), rel_eps=0.0), ValueError, r"rel_eps must be in \(0, 1\)"),
        (lambda: rk.tt_svd(torch.randn(3, 4), rel_eps=1.0), ValueError, r"rel_eps must be in \(0, 1\)"),
        (lambda: rk.tt_svd(torch.randn(3, 4), rel_eps=-0.1), ValueError, r"rel_eps must be in \(0, 1\)"),
        (lambda: rk.tt_svd(torch.ones(3, 4, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: rk.tt_svd(torch.randn(12, 10), in_modes=(4, 3)), ValueError, "both in_modes and out_modes"),
        (lambda: rk.tt_svd(torch.randn(12, 10), in_modes=(5, 3), out_modes=(10,)), ValueError, "multiply to 15"),
        (lambda: rk.tt_round([torch.randn(1, 3, 2), torch.randn(3, 4, 1)]), ValueError, "do not chain: bond 2 != 3"),
        (lambda: rk.tt_round([torch.randn(2, 3, 2), torch.randn(2, 4, 1)]), ValueError, "start with a bond of 1"),
        (lambda: rk.tt_round([torch.randn(3, 2)]), ValueError, r"must be 3-D"),
        (lambda: rk.tt_round([]), ValueError, "cores is empty"),
        (lambda: rk.sweep([torch.randn(1, 3, 2), torch.randn(2, 4, 1)], rel_eps=2.0), ValueError, "rel_eps"),
        (lambda: rk.from_lora(torch.randn(3, 8), torch.randn(6, 4), (8,), (6,)), ValueError, "their ranks differ"),
        (lambda: rk.from_lora(torch.randn(3, 8), torch.randn(6, 3), (4, 3), (6,)), ValueError, "multiply to 12"),
        (lambda: rk.relative_error([torch.randn(1, 3, 1)], [torch.randn(1, 4, 1)]), ValueError, "different mode sizes"),
        (lambda: rk.RankSchedule(tk.TTLinear(4, 4), None, every=0, final_rank=1), ValueError, "every must be"),
        (lambda: rk.RankSchedule(tk.TTLinear(4, 4), None, every=1), ValueError, "exactly one of final_rank"),
        (lambda: rk.RankSchedule(tk.TTLinear(4, 4), None, every=1, final_rank=0), ValueError, "max_rank must be"),
        (lambda: rk.RankSchedule(tk.TTLinear(4, 4), None, every=1, max_params=3), ValueError, "no rank fits"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_by_name(call, exc, message):
    with pytest.raises(exc, match=message):
        call()


def test_a_trained_peft_lora_layer_becomes_a_tt_adapter_and_back():
    peft = require("peft")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 20, dtype=torch.float64)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Net(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    lora = model.base_model.model.proj
    with torch.no_grad():  # a "trained" adapter: both factors non-zero
        lora.lora_A["default"].weight.normal_(0, 0.3)
        lora.lora_B["default"].weight.normal_(0, 0.3)
    x = torch.randn(5, 24, dtype=torch.float64)
    want = model(x).detach()
    A, B, scaling = lora.lora_A["default"].weight, lora.lora_B["default"].weight, lora.scaling["default"]
    cores, spec = rk.from_lora(A.detach(), B.detach(), (4, 6), (5, 4), scaling=scaling)
    base = nn.Linear(24, 20, dtype=torch.float64)
    base.load_state_dict(lora.base_layer.state_dict())
    tt = tk.TTLinear.from_cores(base, nn.ParameterList(cores), spec)  # alpha=None: scaling 1 under every rule
    assert tt.scaling == 1.0
    torch.testing.assert_close(tt(x), want, atol=1e-10, rtol=1e-10)
    # keeping LoRA's alpha (to train on at its hyperparameters): fold LoRA's scaling over the TT's into the cores
    for rule in (1, 2):
        tt_scaling = tk.init.adapter_scaling(8, spec, rule=rule)
        kept, _ = rk.from_lora(A.detach(), B.detach(), (4, 6), (5, 4), scaling=scaling / tt_scaling)
        tt8 = tk.TTLinear.from_cores(base, nn.ParameterList(kept), spec, alpha=8)  # computes rule 2's scaling
        assert (
            tt8.scaling == pytest.approx(tk.init.adapter_scaling(8, spec)) != tk.init.adapter_scaling(8, spec, rule=1)
        )
        tt8.scaling = tt_scaling  # a module scaled by rule 1 (as loaded from an old adapter)
        torch.testing.assert_close(tt8(x), want, atol=1e-10, rtol=1e-10)
        a8, b8 = rk.to_lora(list(tt8.cores), tt8.spec)  # unscaled: LoRA with scaling tt8.scaling is exact
        torch.testing.assert_close(tt8.scaling * b8 @ a8, scaling * B.detach() @ A.detach(), atol=1e-10, rtol=1e-10)
    lora_A, lora_B = rk.to_lora(list(tt.cores), tt.spec)
    fresh = peft.get_peft_model(
        Net(), peft.LoraConfig(r=lora_A.shape[0], lora_alpha=lora_A.shape[0], target_modules=["proj"])
    )
    layer = fresh.base_model.model.proj
    with torch.no_grad():
        layer.base_layer.load_state_dict(lora.base_layer.state_dict())
        layer.lora_A["default"].weight.copy_(lora_A)
        layer.lora_B["default"].weight.copy_(lora_B)
    torch.testing.assert_close(fresh(x), want, atol=1e-10, rtol=1e-10)
