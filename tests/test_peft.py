"""A two-core TTLinear is LoRA: same forward and same gradients as PEFT's LoRA Linear."""

import pytest
import torch
from torch import nn

import helpers
import ttkernels as tk
from helpers import require

peft = require("peft")


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
    assert tt.num_adapter_params == A.numel() + B.numel()
    helpers.assert_two_core_tt_equals_lora(model, lora, tt, torch.randn(3, 5, d_in, dtype=dtype))


# ------------------------------------------------------------------ TT adapters through PEFT's custom-module route
from ttkernels import peft as tkpeft  # noqa: E402
from ttkernels.metatt import MetaTTConfig, MetaTTModel  # noqa: E402


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _tiny(seed=0):
    torch.manual_seed(seed)
    return _Tiny()


@pytest.mark.parametrize("modes", [dict(), dict(in_modes=2, out_modes=2)])
def test_tt_lora_trains_saves_reloads_and_merges_through_peft(tmp_path, modes):
    x, target = torch.randn(6, 16), torch.randn(6, 8)
    base_out = _tiny()(x).detach()
    cfg = tkpeft.tt_lora_config(r=3, lora_alpha=6, target_modules=["lin0", "lin1"], **modes)
    model = peft.get_peft_model(_tiny(), cfg)
    layers = [m for m in model.modules() if isinstance(m, tkpeft.TTLoraLinear)]
    assert len(layers) == 2
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_tt_cores." in n for n in trainable)
    specs = [layer.tt_spec["default"] for layer in layers]
    assert sum(p.numel() for p in trainable.values()) == sum(s.num_params for s in specs)
    torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)  # delta-W starts at zero
    opt = torch.optim.AdamW(trainable.values(), lr=2e-2)
    losses = []
    for _ in range(10):
        loss = (model(x) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    tuned = model(x).detach()
    # the fused op computes x W^T + b + x delta-W^T
    lin0 = layers[0]
    h = torch.relu(lin0.base_layer(x) + x @ lin0.get_delta_weight("default").t())
    torch.testing.assert_close(layers[1](h), tuned, atol=1e-5, rtol=1e-5)
    with model.disable_adapter():
        torch.testing.assert_close(model(x), base_out, atol=0, rtol=0)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all(".lora_tt_cores." in k for k in saved)  # the cores only, no base weights
    loaded = tkpeft.load_tt_lora(_tiny(), str(tmp_path), **modes)
    torch.testing.assert_close(loaded(x), tuned, atol=0, rtol=0)
    merged = loaded.merge_and_unload()
    assert isinstance(merged.lin0, nn.Linear) and not isinstance(merged.lin0, tkpeft.TTLoraLinear)
    torch.testing.assert_close(merged(x), tuned, atol=1e-5, rtol=1e-5)


def test_tt_lora_on_a_transformers_model():
    transformers = require("transformers")
    from helpers import tiny_llama_config

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config()).eval()
    ids = torch.randint(0, 64, (2, 5))
    base = model(ids).logits.detach()
    pm = peft.get_peft_model(model, tkpeft.tt_lora_config(r=4, target_modules=["q_proj", "v_proj"], in_modes=2))
    torch.testing.assert_close(pm(ids).logits, base, atol=0, rtol=0)
    pm(ids).logits.square().mean().backward()
    grads = [p.grad for n, p in pm.named_parameters() if p.requires_grad]
    assert len(grads) == 2 * 2 * 3 and all(g is not None for g in grads)  # 2 layers x q, v x 3 cores


def test_tt_lora_refuses_what_it_does_not_support():
    with pytest.raises(ValueError, match=r"unsupported variant combination: \(.use_dora.,\)"):
        peft.get_peft_model(_tiny(), tkpeft.tt_lora_config(r=2, target_modules=["lin0"], use_dora=True))
    with pytest.raises(NotImplementedError, match="init_lora_weights='pissa'"):
        peft.get_peft_model(_tiny(), tkpeft.tt_lora_config(r=2, target_modules=["lin0"], init_lora_weights="pissa"))
    with pytest.raises(ValueError, match="not both"):
        tkpeft.tt_lora_config(config=peft.LoraConfig(r=2), r=3)


def test_get_peft_model_entry_point_gives_metatt_for_a_metatt_config(tmp_path):
    transformers = require("transformers")
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40)  # fmt: skip
    torch.manual_seed(0)
    bert = transformers.BertModel(cfg).eval()
    w = tkpeft.get_peft_model(bert, MetaTTConfig(["query", "value"], rank=4))
    assert isinstance(w, MetaTTModel)
    w.print_trainable_parameters()
    lora = tkpeft.get_peft_model(_tiny(), peft.LoraConfig(r=2, target_modules=["lin0"]))
    assert isinstance(lora, peft.PeftModel)
    with pytest.raises(TypeError, match="takes no keyword arguments"):
        tkpeft.get_peft_model(_tiny(), MetaTTConfig(["lin0"]), adapter_name="x")


def test_two_active_tt_adapters_add_their_deltas():
    x = torch.randn(5, 16)
    cfg = dict(r=2, lora_alpha=4, target_modules=["lin0"], init_lora_weights=False)
    model = peft.get_peft_model(_tiny(), tkpeft.tt_lora_config(**cfg))
    model.add_adapter("second", tkpeft.tt_lora_config(in_modes=2, **cfg))
    model.base_model.set_adapter(["default", "second"])
    layer = model.base_model.model.lin0
    want = layer.base_layer(x) + x @ (layer.get_delta_weight("default") + layer.get_delta_weight("second")).t()
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)
