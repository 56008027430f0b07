"""A two-core TTLinear is LoRA: same forward and same gradients as PEFT's LoRA Linear."""

import pytest
import torch
from torch import nn

import ttkernels as tk

peft = pytest.importorskip("peft", reason="PEFT is a test dependency: pip install -e '.[test]'")


class _Net(nn.Module):
    def __init__(self, d_in, d_out, dtype):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out, dtype=dtype)

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("d_in,d_out,r,alpha", [(16, 12, 4, 8), (37, 5, 3, 3), (8, 23, 1, 2)])
def test_two_core_ttlinear_equals_peft_lora(d_in, d_out, r, alpha):
    dtype = torch.float64
    net = _Net(d_in, d_out, dtype)
    cfg = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"], lora_dropout=0.0)
    model = peft.get_peft_model(net, cfg)
    lora = model.base_model.model.proj
    with torch.no_grad():  # PEFT starts B at zero: give both factors random values
        lora.lora_A["default"].weight.normal_(0, 0.5)
        lora.lora_B["default"].weight.normal_(0, 0.5)
    A = lora.lora_A["default"].weight  # (r, d_in)
    B = lora.lora_B["default"].weight  # (d_out, r)

    tt = tk.TTLinear.from_linear(nn.Linear(d_in, d_out, dtype=dtype), ranks=r, alpha=alpha)
    with torch.no_grad():
        tt.weight.copy_(lora.base_layer.weight)
        tt.bias.copy_(lora.base_layer.bias)
        tt.cores[0].copy_(A.t().reshape(1, d_in, r))
        tt.cores[1].copy_(B.t().reshape(r, d_out, 1))
    assert tt.scaling == lora.scaling["default"]
    assert tt.num_adapter_params == A.numel() + B.numel()

    x = torch.randn(3, 5, d_in, dtype=dtype)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_tt = model(x1), tt(x2)
    torch.testing.assert_close(y_tt, y_peft)
    dy = torch.randn_like(y_peft)
    y_peft.backward(dy)
    y_tt.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(tt.cores[0].grad.reshape(d_in, r), A.grad.t())
    torch.testing.assert_close(tt.cores[1].grad.reshape(r, d_out), B.grad.t())
    torch.testing.assert_close(tt.delta_weight(), lora.get_delta_weight("default"))
