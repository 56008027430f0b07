"""TT adapters over torchao-quantized frozen bases (ttkernels/quantized.py, base kind ``"torchao"``).

``torchao.quantization.quantize_`` keeps an ``nn.Linear`` and makes its weight a tensor subclass. As in
tests/test_quantized.py the base's output is split off: ``y - base(x)`` is compared with the float64 adapter
term, dx with torchao's own dx plus the adapter's float64 dx, the core gradients with float64 autograd. A
two-core TT over an int8 torchao linear is compared with PEFT's LoRA (``TorchaoLoraLinear``) over the same
layer; MetaTT runs on a tiny LLaMA quantized with torchao.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import helpers
import ttkernels as tk
from helpers import TOL, require
from ttkernels import quantized, reference

torchao = require("torchao")
peft = require("peft")
transformers = require("transformers")

from torchao.quantization import (  # noqa: E402
    Int8DynamicActivationInt8WeightConfig,
    Int8WeightOnlyConfig,
    IntxWeightOnlyConfig,
    PerTensor,
    quantize_,
)
from torchao.quantization.quant_primitives import MappingType  # noqa: E402

from ttkernels import peft as tkpeft  # noqa: E402
from ttkernels.metatt import MetaTTConfig, MetaTTModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:.*quantized layer dequantizes:UserWarning", "ignore:.*get_apply_tensor_subclass:UserWarning"
)

CONFIGS = {
    "int8-weight-only": Int8WeightOnlyConfig,
    "int8-dynamic": Int8DynamicActivationInt8WeightConfig,
    "int8-per-tensor": lambda: Int8WeightOnlyConfig(granularity=PerTensor()),
    "intx-weight-only": IntxWeightOnlyConfig,  # int8 codes in IntxUnpackedToInt8Tensor: merging is refused
}


def ao_linear(kind, d_in, d_out, dtype=torch.float32, bias=True):
    lin = nn.Linear(d_in, d_out, bias=bias).to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(lin, CONFIGS[kind]())
    assert quantized.quantization_of(lin) == "torchao", type(lin.weight)
    return lin


def random_cores_(cores):
    with torch.no_grad():
        for c in cores:
            c.normal_(0.0, c.shape[0] ** -0.5)


CASES = [  # (config, d_in, d_out, leading shape, modes, dtype)
    ("int8-weight-only", 64, 48, (3, 5), dict(ranks=4), torch.float32),
    ("int8-weight-only", 67, 53, (1,), dict(ranks=3), torch.float32),  # 1 token, prime features
    ("int8-weight-only", 67, 53, (0,), dict(ranks=3), torch.float32),  # empty batch
    ("int8-weight-only", 64, 48, (4,), dict(ranks=(2, 3, 2), in_modes=2, out_modes=(6, 8)), torch.bfloat16),
    ("int8-dynamic", 67, 53, (2, 3), dict(ranks=5), torch.float32),
    ("int8-dynamic", 64, 48, (1,), dict(ranks=(3, 2), out_modes=2), torch.float32),
    ("int8-per-tensor", 67, 53, (5,), dict(ranks=4), torch.float32),
    ("intx-weight-only", 64, 48, (3,), dict(ranks=4), torch.float32),
]


@pytest.mark.parametrize("kind,d_in,d_out,lead,modes,dtype", CASES)
def test_ttlinear_over_torchao_base_matches_float64(kind, d_in, d_out, lead, modes, dtype):
    torch.manual_seed(0)
    base = ao_linear(kind, d_in, d_out, dtype)
    weight = base.weight
    tt = tk.TTLinear.from_linear(base, alpha=2.0, **modes)
    assert tt.base_kind == "torchao" and tt.quantized_base and tt.base_layer is base and tt.weight is None
    assert base.weight is weight  # no dequantized copy: the quantized weight stays the base's
    assert quantized.compute_dtype(base) == dtype
    assert [c.dtype for c in tt.cores] == [torch.float32] * len(tt.cores)  # compute dtype or float32
    assert {n for n, p in tt.named_parameters() if p.requires_grad} == {f"cores.{k}" for k in range(len(tt.cores))}
    random_cores_(tt.cores)

    x = torch.randn(*lead, d_in, dtype=dtype)
    dy = torch.randn(*lead, d_out, dtype=dtype)
    xq = x.clone().requires_grad_()
    y = tt(xq)
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    y.backward(dy)

    xb = x.clone().requires_grad_()  # the base alone: torchao's forward and its own dx
    yb = base(xb)
    if yb.requires_grad:  # a dynamically quantized activation cuts the graph: torchao gives no dx
        yb.backward(dy)
    base_dx = xb.grad if xb.grad is not None else torch.zeros_like(x)  # a quantized activation has no dx
    if kind == "int8-weight-only" and x.numel():
        assert xb.grad is not None and xb.grad.abs().sum() > 0

    cores64 = [c.detach().double().requires_grad_() for c in tt.cores]
    x64 = x.double().requires_grad_()
    A, C, B = reference.factors(cores64, tt.spec, {})
    U = x64.reshape(-1, d_in) @ A
    U = U if C is None else U @ C
    term64 = (tt.scaling * U @ B).reshape(*lead, d_out)
    term64.backward(dy.double())

    atol, rtol = TOL[dtype]
    scale = max(1.0, float(term64.detach().abs().max())) if term64.numel() else 1.0
    torch.testing.assert_close((y - yb).double(), term64.detach(), atol=atol * scale * 4, rtol=rtol * 4)
    dscale = max(1.0, float(base_dx.abs().max())) if x.numel() else 1.0
    torch.testing.assert_close(xq.grad.double(), base_dx.double() + x64.grad, atol=atol * dscale * 8, rtol=rtol * 8)
    for k, (c, c64) in enumerate(zip(tt.cores, cores64)):
        g = c.grad if c.grad is not None else torch.zeros_like(c)
        gscale = max(1.0, float(c64.grad.abs().max()))
        torch.testing.assert_close(g.double(), c64.grad, atol=atol * gscale * 8, rtol=rtol * 8, msg=f"core {k}")
    if x.numel():
        assert all(c.grad.abs().sum() > 0 for c in tt.cores)


class Net(nn.Module):
    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


@pytest.mark.parametrize("kind", ["int8-weight-only", "int8-dynamic"])
@pytest.mark.parametrize("lead", [(3, 5), (1,)])
def test_two_core_tt_equals_peft_lora_over_the_same_torchao_linear(kind, lead):
    torch.manual_seed(1)
    d_in, d_out, r, alpha = 64, 48, 4, 8
    model = peft.get_peft_model(
        Net(ao_linear(kind, d_in, d_out)), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"])
    )
    lora = model.base_model.model.proj
    assert type(lora).__name__ == "TorchaoLoraLinear"
    with torch.no_grad():
        lora.lora_A["default"].weight.normal_(0, 0.3)
        lora.lora_B["default"].weight.normal_(0, 0.3)
    tt = tk.TTLinear.from_linear(lora.base_layer, ranks=r, alpha=alpha)
    helpers.assert_two_core_tt_equals_lora(model, lora, tt, torch.randn(*lead, d_in))


def test_tt_lora_route_equals_peft_lora_over_the_same_torchao_linear():
    torch.manual_seed(7)
    tt = helpers.assert_tt_lora_route_equals_lora(ao_linear("int8-weight-only", 64, 48), r=4, alpha=8)
    assert quantized.quantization_of(tt.base_layer) == "torchao"


@pytest.mark.parametrize("kind", ["int8-weight-only", "int8-dynamic", "int8-per-tensor"])
def test_merge_requantizes_int8_with_a_warning_and_unmerge_is_exact(kind):
    torch.manual_seed(2)
    base = ao_linear(kind, 64, 48)
    tt = tk.TTLinear.from_linear(base, ranks=4)
    random_cores_(tt.cores)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y, y_base = tt(x), base(x)
        w0 = quantized.dequantize_weight(base)
    packed0, qdata0, scale0 = base.weight, base.weight.qdata.clone(), base.weight.scale.clone()
    with pytest.warns(UserWarning, match="torchao Int8Tensor quantized layer dequantizes"):
        tt.merge()
    w = base.weight
    assert tt.merged and w is not packed0 and type(w) is type(packed0) and w.dtype == packed0.dtype
    assert list(w.block_size) == list(packed0.block_size) and w.act_quant_kwargs == packed0.act_quant_kwargs
    assert not w.requires_grad
    w1 = quantized.dequantize_weight(base)
    delta = tt.delta_weight().detach()
    step = (w0 + delta).abs().max() / 127  # requantizing rounds to the int8 grid: about one step
    assert (w1 - (w0 + delta)).abs().max() <= step
    assert (w1 - w0).abs().max() > step / 4  # delta-W was really added
    with torch.no_grad():
        y_merged = tt(x)
        with tt.adapter_disabled():
            y_merged_off = tt(x)
    assert (y_merged - y).abs().max() < (y - y_base).abs().max() / 4
    assert torch.equal(y_merged_off, y_base)  # disabled while merged: the kept weight, exactly the base
    with pytest.raises(RuntimeError, match="backward through a merged"):
        tt(x.requires_grad_()).sum().backward()
    with pytest.raises(RuntimeError, match="quantized base is refused"):
        tt.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second rounding
        tt.unmerge()
    assert not tt.merged and base.weight is packed0
    assert torch.equal(base.weight.qdata, qdata0) and torch.equal(base.weight.scale, scale0)
    with torch.no_grad():
        assert torch.equal(tt(x.detach()), y)

    merged = tt.merge_and_unload()  # for good: requantized, the same kind of weight
    assert merged is base and type(base.weight) is type(packed0) and base.weight is not packed0
    with torch.no_grad():
        assert (base(x.detach()) - y).abs().max() < (y - y_base).abs().max() / 4


def test_merge_into_other_torchao_weights_is_refused_and_changes_nothing():
    torch.manual_seed(3)
    base = ao_linear("intx-weight-only", 64, 48)
    tt = tk.TTLinear.from_linear(base, ranks=4)
    random_cores_(tt.cores)
    packed0 = base.weight
    with pytest.raises(TypeError, match="IntxUnpackedToInt8Tensor weight is refused"):
        tt.merge()
    assert not tt.merged and base.weight is packed0
    with pytest.raises(TypeError, match="refused"):
        tt.merge_and_unload()
    assert base.weight is packed0
    with pytest.raises(TypeError, match="refused"):
        quantized.check_mergeable(base)
    quantized.check_mergeable(ao_linear("int8-weight-only", 64, 48))  # no error
    asym = nn.Linear(64, 48)
    asym.weight = nn.Parameter(
        torchao.quantization.Int8Tensor.from_hp(
            asym.weight.detach() + 0.3, PerTensor(), mapping_type=MappingType.ASYMMETRIC
        ),
        requires_grad=False,
    )
    with pytest.raises(TypeError, match="asymmetric"):
        tk.TTLinear.from_linear(asym, ranks=2).merge()
    x = torch.randn(3, 64)
    with torch.no_grad():  # the unmerged adapter still works
        assert (tt(x) - base(x)).abs().max() > 0


def test_safe_merge_refuses_non_finite_cores_over_torchao():
    base = ao_linear("int8-weight-only", 64, 48)
    tt = tk.TTLinear.from_linear(base, ranks=4)
    packed0 = base.weight
    with torch.no_grad():
        tt.cores[0].fill_(float("inf"))
        tt.cores[1].fill_(1.0)
    with pytest.raises(ValueError, match="safe_merge"):
        tt.merge(safe_merge=True)
    assert not tt.merged and base.weight is packed0


def test_peft_tt_layer_over_a_torchao_base_unmerges_exactly():
    torch.manual_seed(11)
    model = peft.get_peft_model(
        Net(ao_linear("int8-weight-only", 64, 48)), tkpeft.tt_lora_config(r=3, lora_alpha=6, target_modules=["proj"])
    )
    layer = model.base_model.model.proj
    base = layer.get_base_layer()
    with torch.no_grad():
        layer.lora_tt_cores["default"][-1].normal_(0.0, 0.3)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y, y_base = model(x), base(x)
    packed0 = base.weight
    with pytest.warns(UserWarning, match="rounding"):
        layer.merge()
    assert layer.merged and base.weight is not packed0
    with torch.no_grad():
        assert (model(x) - y).abs().max() < (y - y_base).abs().max()
    layer.unmerge()
    assert not layer.merged and base.weight is packed0
    with torch.no_grad():
        assert torch.equal(model(x), y)


def test_ttm_linear_over_a_torchao_base():
    torch.manual_seed(10)
    base = ao_linear("int8-weight-only", 64, 48)
    assert helpers.check_ttm_over_quantized_base(base).base_kind == "torchao"


def test_recognition():
    assert quantized.quantization_of(ao_linear("int8-weight-only", 8, 8)) == "torchao"
    assert quantized.quantization_of(nn.Linear(8, 8)) is None
    assert tk.TTLinear.from_linear(nn.Linear(8, 8), ranks=2).base_kind == "linear"
    tt = tk.TTLinear.from_linear(ao_linear("int8-weight-only", 8, 8), ranks=2)
    with pytest.raises(RuntimeError, match="packed"):
        tt.base_weight  # noqa: B018


# ------------------------------------------------------------------ a whole model quantized with torchao
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama_ao")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def torchao_llama(path):
    model = transformers.LlamaForCausalLM.from_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantize_(model.model, Int8WeightOnlyConfig())  # every linear of the decoder; lm_head stays dense
    assert quantized.quantization_of(model.model.layers[0].self_attn.q_proj) == "torchao"
    return model.train()


TARGETS = ["q_proj", "v_proj", "up_proj"]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


def test_metatt_on_a_torchao_llama_trains_saves_loads_and_merges(llama_dir, tmp_path):
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 7))
    wrapped = tk.get_metatt_model(torchao_llama(llama_dir), MetaTTConfig(target_modules=TARGETS, rank=3))
    view = wrapped.model.model.layers[1].self_attn.q_proj
    assert view.base_kind == "torchao" and quantized.quantization_of(view.base_layer) == "torchao"
    params = wrapped.shared_parameters()
    assert {p.dtype for p in params} == {torch.float32}
    assert wrapped.num_trainable_parameters() == sum(p.numel() for p in params)

    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _loss(wrapped, ids)
        loss.backward()
        assert all(p.grad is not None for p in params)
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]

    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(input_ids=ids).logits
        with wrapped.disable_adapter():
            base_logits = wrapped(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits)
    wrapped.save_pretrained(tmp_path)
    loaded = MetaTTModel.from_pretrained(torchao_llama(llama_dir).eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)

    with pytest.warns(UserWarning, match="rounding"):
        merged = loaded.merge_and_unload()
    assert quantized.quantization_of(merged.model.layers[1].self_attn.q_proj) == "torchao"
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert (merged_logits - logits).abs().max() < 0.05 * (base_logits - logits).abs().max()


def test_peft_route_on_a_torchao_llama_trains_saves_reloads_and_merges(llama_dir, tmp_path):
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (2, 7))
    cfg = tkpeft.tt_lora_config(r=3, lora_alpha=6, target_modules=TARGETS, in_modes=2)
    model = peft.get_peft_model(torchao_llama(llama_dir), cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, tkpeft.TTLoraLinear) and quantized.quantization_of(layer.base_layer) == "torchao"
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits)
    model.save_pretrained(tmp_path)
    loaded = tkpeft.load_tt_lora(torchao_llama(llama_dir).eval(), str(tmp_path), in_modes=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
    with pytest.warns(UserWarning, match="rounding"):
        merged = loaded.merge_and_unload()
    assert quantized.quantization_of(merged.model.layers[0].self_attn.q_proj) == "torchao"
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    assert (merged_logits - logits).abs().max() < 0.05 * (base_logits - logits).abs().max()
