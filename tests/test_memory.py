"""Bytes saved for backward per token: x plus M x r, with and without dropout (no mask is stored).

Measured with torch.autograd.graph.saved_tensors_hooks, parameters excluded. PEFT's LoRA is measured the
same way as the anchor: 1.004x the bytes of x at 4096 x 4096, r = 16, and 2.004x with dropout 0.1 on the
CPU (where dropout keeps a float mask)."""

import pytest
import torch
from torch import nn

import ttkernels as tk


def saved_bytes(fn, params):
    ptrs = {p.data_ptr() for p in params}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in ptrs or t.numel() == 0:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def per_token_ratio(layer, make_x, M1, M2, d_in):
    """(bytes saved at M2 - at M1) / (bytes of x at M2 - at M1): token-independent tensors cancel."""
    params = list(layer.parameters())
    b1 = saved_bytes(lambda: layer(make_x(M1)), params)
    b2 = saved_bytes(lambda: layer(make_x(M2)), params)
    x_bytes = (M2 - M1) * d_in * make_x(1).element_size()
    return (b2 - b1) / x_bytes


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_ttkernels_saves_x_plus_m_times_r(dropout):
    d, r = 4096, 16
    for kw in (dict(ranks=r), dict(in_modes=3, out_modes=3, ranks=r)):
        layer = tk.TTLinear(d, d, dropout=dropout, **kw).train()
        ratio = per_token_ratio(layer, lambda M: torch.randn(M, d, requires_grad=True), 8, 40, d)
        assert ratio <= 1 + r / d + 1e-9, ratio
        assert ratio >= 1.0, ratio  # x itself is saved (dA needs it): the measure sees it


def test_saved_bytes_at_a_fixed_m_include_only_small_token_independent_extras():
    d, r, M = 512, 8, 64
    layer = tk.TTLinear(d, d, in_modes=2, out_modes=2, ranks=r, dropout=0.2).train()
    b = saved_bytes(lambda: layer(torch.randn(M, d, requires_grad=True)), list(layer.parameters()))
    x_plus_s = M * (d + r) * 4
    factors = 2 * (d * r) * 4 + 4 * sum(c.numel() for c in layer.cores)  # A, B and core products
    assert x_plus_s <= b <= x_plus_s + factors, (b, x_plus_s)


peft = pytest.importorskip("peft", reason="PEFT is a test dependency")


@pytest.mark.parametrize("dropout,anchor", [(0.0, 1.004), (0.1, 2.004)])
def test_peft_anchor_and_ttkernels_beside_it(dropout, anchor):
    d, r = 4096, 16
    net = nn.Sequential(nn.Linear(d, d))
    model = peft.get_peft_model(
        net, peft.LoraConfig(r=r, lora_alpha=r, target_modules=["0"], lora_dropout=dropout)
    ).train()
    # x requires grad, as inside a network: dropout then has to keep its mask for dx
    peft_ratio = per_token_ratio(model, lambda M: torch.randn(M, d, requires_grad=True), 8, 40, d)
    assert abs(peft_ratio - anchor) < 0.001, peft_ratio
    tt = tk.TTLinear(d, d, ranks=r, dropout=dropout).train()
    tt_ratio = per_token_ratio(tt, lambda M: torch.randn(M, d, requires_grad=True), 8, 40, d)
    assert tt_ratio <= 1 + r / d + 1e-9
    assert tt_ratio <= peft_ratio + 1e-9
