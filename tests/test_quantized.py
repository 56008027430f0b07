"""TT adapters over bitsandbytes 4-bit and 8-bit frozen bases (ttkernels/quantized.py).

The base's output is the quantized layer's own forward, so the checks split it off: ``y - base(x)`` is compared
with the float64 adapter term, dx with bitsandbytes' own dx plus the adapter's float64 dx, the core gradients
with float64 autograd. A two-core TT over a ``Linear4bit`` is compared with PEFT's LoRA over the same layer.
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

bnb = require("bitsandbytes")
peft = require("peft")
transformers = require("transformers")

from ttkernels import peft as tkpeft  # noqa: E402
from ttkernels.metatt import MetaTTConfig, MetaTTModel  # noqa: E402

pytestmark = pytest.mark.filterwarnings(
    "ignore:MatMul8bitLt:UserWarning", "ignore:.*quantized layer dequantizes:UserWarning"
)


def linear4bit(d_in, d_out, quant_type="nf4", compute_dtype=torch.float32, bias=True):
    dense = nn.Linear(d_in, d_out, bias=bias)
    q = bnb.nn.Linear4bit(d_in, d_out, bias=bias, quant_type=quant_type, compute_dtype=compute_dtype)
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type=quant_type)
    if bias:
        q.bias = nn.Parameter(dense.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def linear8bit(d_in, d_out, bias=True):
    q = bnb.nn.Linear8bitLt(d_in, d_out, bias=bias, has_fp16_weights=False)
    q.load_state_dict(nn.Linear(d_in, d_out, bias=bias).state_dict())
    return q.to("cpu")


def make_base(kind, d_in, d_out, dtype=torch.float32):
    if kind == "nf4":
        return linear4bit(d_in, d_out, "nf4", dtype)
    if kind == "fp4":
        return linear4bit(d_in, d_out, "fp4", dtype)
    return linear8bit(d_in, d_out)


def random_cores_(tt):
    with torch.no_grad():
        for c in tt.cores:
            c.normal_(0.0, c.shape[0] ** -0.5)


CASES = [  # (base kind, d_in, d_out, leading shape, modes, dtype)
    ("nf4", 64, 48, (3, 5), dict(ranks=4), torch.float32),
    ("nf4", 67, 53, (1,), dict(ranks=3), torch.float32),
    ("fp4", 64, 48, (7,), dict(ranks=(2, 3, 2), in_modes=2, out_modes=(6, 8)), torch.float32),
    ("nf4", 67, 53, (0,), dict(ranks=3), torch.float32),
    ("nf4", 64, 48, (4,), dict(ranks=4), torch.float16),
    ("int8", 67, 53, (2, 3), dict(ranks=5), torch.float32),
    ("int8", 64, 48, (1,), dict(ranks=(3, 2), out_modes=2), torch.float32),
]


@pytest.mark.parametrize("kind,d_in,d_out,lead,modes,dtype", CASES)
def test_ttlinear_over_quantized_base_matches_float64(kind, d_in, d_out, lead, modes, dtype):
    torch.manual_seed(0)
    base = make_base(kind, d_in, d_out, dtype)
    tt = tk.TTLinear.from_linear(base, alpha=2.0, **modes)
    assert (tt.in_features, tt.out_features) == (d_in, d_out)
    assert tt.base_layer is base and tt.weight is None and tt.quantized_base and tt.base_kind.startswith("bnb-")
    assert [c.dtype for c in tt.cores] == [torch.float32] * len(tt.cores)  # compute dtype or float32
    assert not any(p.requires_grad for p in base.parameters())
    assert {n for n, p in tt.named_parameters() if p.requires_grad} == {f"cores.{k}" for k in range(len(tt.cores))}
    random_cores_(tt)

    x = torch.randn(*lead, d_in, dtype=dtype)
    dy = torch.randn(*lead, d_out, dtype=dtype)
    xq = x.clone().requires_grad_()
    y = tt(xq)
    assert y.dtype == dtype and y.shape == (*lead, d_out)
    y.backward(dy)

    xb = x.clone().requires_grad_()  # the base alone: its forward and its own dx
    yb = base(xb)
    yb.backward(dy)

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
    torch.testing.assert_close(xq.grad.double(), xb.grad.double() + x64.grad, atol=atol * 8, rtol=rtol * 8)
    for k, (c, c64) in enumerate(zip(tt.cores, cores64)):
        g = c.grad if c.grad is not None else torch.zeros_like(c)
        gscale = max(1.0, float(c64.grad.abs().max()))
        torch.testing.assert_close(g.double(), c64.grad, atol=atol * gscale * 8, rtol=rtol * 8, msg=f"core {k}")
    if x.numel():
        assert all(c.grad.abs().sum() > 0 for c in tt.cores)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("lead", [(3, 5), (1,)])
def test_two_core_tt_equals_peft_lora_over_the_same_linear4bit(quant_type, lead):
    torch.manual_seed(1)
    d_in, d_out, r, alpha = 64, 48, 4, 8

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = linear4bit(d_in, d_out, quant_type)

        def forward(self, x):
            return self.proj(x)

    net = Net()
    net.is_loaded_in_4bit = True  # what transformers sets: PEFT then builds its bitsandbytes LoRA layer
    model = peft.get_peft_model(net, peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    lora = model.base_model.model.proj
    assert type(lora).__name__ == "Linear4bit" and type(lora).__module__ == "peft.tuners.lora.bnb"
    with torch.no_grad():
        lora.lora_A["default"].weight.normal_(0, 0.3)
        lora.lora_B["default"].weight.normal_(0, 0.3)
    tt = tk.TTLinear.from_linear(lora.base_layer, ranks=r, alpha=alpha)
    helpers.assert_two_core_tt_equals_lora(model, lora, tt, torch.randn(*lead, d_in))


def test_tt_lora_route_equals_peft_qlora_over_the_same_linear4bit():
    torch.manual_seed(7)
    tt = helpers.assert_tt_lora_route_equals_lora(linear4bit(64, 48), r=4, alpha=8, is_loaded_in_4bit=True)
    assert quantized.is_quantized_linear(tt.base_layer)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merge_requantizes_with_a_warning_and_unmerge_is_exact(kind):
    torch.manual_seed(2)
    base = make_base(kind, 64, 48)
    tt = tk.TTLinear.from_linear(base, ranks=4)
    random_cores_(tt)
    x = torch.randn(6, 64)
    with torch.no_grad():
        y = tt(x)
        y_base = base(x)
        w0 = quantized.dequantize_weight(base)
    packed0, data0 = base.weight, base.weight.data.clone()
    cls, dtype = type(base.weight), base.weight.dtype
    with pytest.warns(UserWarning, match="rounding"):
        tt.merge()
    assert tt.merged and type(base.weight) is cls and base.weight.dtype == dtype  # still quantized
    w1 = quantized.dequantize_weight(base)
    delta = tt.delta_weight().detach()
    # requantizing rounds each entry to its block's grid: error at most about one grid step
    step = (w0 + delta).abs().max() / (7 if kind != "int8" else 127)
    assert (w1 - (w0 + delta)).abs().max() <= step
    assert (w1 - w0).abs().max() > step / 4  # delta-W was really added
    with torch.no_grad():
        y_merged = tt(x)
        with tt.adapter_disabled():
            y_merged_off = tt(x)
    err = (y_merged - y).abs().max()
    assert err <= step * x.abs().sum(-1).max()
    assert (y_merged_off - y_merged).abs().max() > 0
    assert torch.equal(y_merged_off, y_base)  # disabled while merged: the kept packed weight, exactly the base
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second rounding
        tt.unmerge()
    assert not tt.merged
    assert base.weight is packed0 and torch.equal(base.weight.data, data0)  # the packed weight back, bit for bit
    assert torch.equal(quantized.dequantize_weight(base), w0)
    with torch.no_grad():
        assert torch.equal(tt(x), y)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_merged_quantized_layer_follows_its_cores_refuses_training_and_state_dicts(kind):
    torch.manual_seed(9)
    base = make_base(kind, 64, 48)
    tt = tk.TTLinear.from_linear(base, ranks=4)
    random_cores_(tt)
    x = torch.randn(5, 64)
    with torch.no_grad():
        w0 = quantized.dequantize_weight(base)
    state = tt.state_dict()
    with pytest.warns(UserWarning, match="rounding"):
        tt.merge()
    with pytest.raises(RuntimeError, match="backward through a merged"):
        tt(x).sum().backward()
    with torch.no_grad():  # cores changed while merged: the next forward merges them from the kept weight
        tt.cores[-1].mul_(2.0)
    with pytest.warns(UserWarning, match="rounding"), torch.no_grad():
        tt(x)
    w1 = quantized.dequantize_weight(base)
    step = (w0 + tt.delta_weight().detach()).abs().max() / (7 if kind != "int8" else 127)
    assert (w1 - (w0 + tt.delta_weight().detach())).abs().max() <= step
    with pytest.raises(RuntimeError, match="quantized base is refused"):
        tt.state_dict()
    # cores loaded into a merged layer: unmerged first (exactly), then merged again with the loaded cores
    cores_only = {k: v for k, v in state.items() if k.startswith("cores.")}
    with pytest.warns(UserWarning, match="rounding"):
        tt.load_state_dict(cores_only, strict=False)
    assert tt.merged
    tt.unmerge()
    assert torch.equal(quantized.dequantize_weight(base), w0)
    with pytest.raises(ValueError, match="quantized base"):
        tt.load_state_dict({**cores_only, "base_layer.weight_before_merge": torch.zeros(48, 64)}, strict=False)
    assert not tt.merged and torch.equal(quantized.dequantize_weight(base), w0)
    delta = tt.delta_weight().detach().clone()
    with torch.no_grad():
        tt.cores[0].fill_(float("inf"))
    with pytest.raises(ValueError, match="safe_merge"):
        tt.merge(safe_merge=True)
    assert not tt.merged and torch.equal(quantized.dequantize_weight(base), w0)
    assert delta.abs().max() > 0


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_peft_tt_layer_over_a_quantized_base_unmerges_exactly(kind):
    torch.manual_seed(11)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = make_base(kind, 64, 48)

        def forward(self, x):
            return self.proj(x)

    model = peft.get_peft_model(Net(), tkpeft.tt_lora_config(r=3, lora_alpha=6, target_modules=["proj"]))
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
    with pytest.raises(RuntimeError, match="quantized base is refused"):
        model.state_dict()
    layer.unmerge()
    assert not layer.merged and base.weight is packed0
    with torch.no_grad():
        assert torch.equal(model(x), y)


@pytest.mark.parametrize("kind", ["nf4", "int8"])
def test_ttm_linear_over_a_quantized_base(kind):
    torch.manual_seed(10)
    base = make_base(kind, 64, 48)
    helpers.check_ttm_over_quantized_base(base)


def test_failed_safe_merge_leaves_the_base_as_it_was():
    base = linear4bit(64, 48)
    before = base.weight.data.clone()
    delta = torch.full((48, 64), float("inf"))
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="non-finite"):
        quantized.add_delta(base, delta, safe=True)
    assert torch.equal(base.weight.data, before)
    with pytest.raises(ValueError, match="delta has shape"):
        quantized.add_delta(base, torch.zeros(64, 48))
    with pytest.raises(TypeError, match="quantized linear"):
        quantized.add_delta(nn.Linear(64, 48), torch.zeros(48, 64))


def test_bad_input_names_the_argument():
    tt = tk.TTLinear.from_linear(linear4bit(64, 48), ranks=2)
    with pytest.raises(ValueError, match="in_features is 64"):
        tt(torch.randn(3, 63))
    with pytest.raises(TypeError, match="floating-point"):
        tt(torch.ones(3, 64, dtype=torch.int64))
    with pytest.raises(RuntimeError, match="packed"):
        tt.base_weight  # noqa: B018


def test_plain_linear_is_not_quantized():
    assert not quantized.is_quantized_linear(nn.Linear(4, 4))
    assert quantized.quantization_of(linear4bit(64, 48)) == "bnb-4bit"
    assert quantized.quantization_of(linear8bit(64, 48)) == "bnb-8bit"
    assert not tk.TTLinear.from_linear(nn.Linear(8, 8), ranks=2).quantized_base


# ------------------------------------------------------------------ whole models quantized by transformers
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("llama")
    # hidden size 64: bitsandbytes' CPU inference packing (eval, no grad) needs in_features a multiple of its blocksize
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def quantized_llama(path, bits):
    if bits == 4:
        q = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    else:
        q = transformers.BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu")
    cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    assert isinstance(model.model.layers[0].self_attn.q_proj, cls)
    return model.train()


TARGETS = ["q_proj", "v_proj", "up_proj"]


def _grads(params):
    return [p.grad.detach().clone() for p in params]


def _loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("bits", [4, 8])
def test_metatt_on_a_quantized_llama_trains_checkpoints_saves_and_merges(llama_dir, tmp_path, bits):
    torch.manual_seed(3)
    ids = torch.randint(0, 64, (2, 7))
    cfg = MetaTTConfig(target_modules=TARGETS, rank=3)
    wrapped = tk.get_metatt_model(quantized_llama(llama_dir, bits), cfg)
    view = wrapped.model.model.layers[1].self_attn.q_proj
    assert view.quantized_base and quantized.is_quantized_linear(view.base_layer)
    params = wrapped.shared_parameters()
    assert {p.dtype for p in params} == {torch.float32}
    # all params counts the 4-bit weights unpacked, as PEFT's print_trainable_parameters does
    dense = transformers.LlamaForCausalLM.from_pretrained(llama_dir)
    total = sum(p.numel() for p in dense.parameters()) + sum(p.numel() for p in params)
    assert f"all params: {total:,}" in wrapped.trainable_parameters_summary()
    assert wrapped.num_trainable_parameters() == sum(p.numel() for p in params)

    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _loss(wrapped, ids)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    # gradient checkpointing recomputes the quantized forward and gives the same gradients
    for p in params:
        p.grad = None
    _loss(wrapped, ids).backward()
    plain = _grads(params)
    for p in params:
        p.grad = None
    wrapped.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    _loss(wrapped, ids).backward()
    for g, h in zip(_grads(params), plain):
        torch.testing.assert_close(g, h, atol=1e-5, rtol=1e-4)
    wrapped.model.gradient_checkpointing_disable()

    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(input_ids=ids).logits
        with wrapped.disable_adapter():
            base_logits = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path)
    loaded = MetaTTModel.from_pretrained(quantized_llama(llama_dir, bits).eval(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)

    with pytest.warns(UserWarning, match="rounding"):
        merged = loaded.merge_and_unload()
    q_proj = merged.model.layers[1].self_attn.q_proj
    assert quantized.is_quantized_linear(q_proj)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    # the merged model keeps the adapter's effect up to the requantization's rounding
    rounding = 0.25 if bits == 4 else 0.05
    assert (merged_logits - logits).abs().max() < rounding * (base_logits - logits).abs().max()


@pytest.mark.parametrize("bits", [4, 8])
def test_peft_route_on_a_quantized_llama_trains_saves_reloads_and_merges(llama_dir, tmp_path, bits):
    torch.manual_seed(4)
    ids = torch.randint(0, 64, (2, 7))
    cfg = tkpeft.tt_lora_config(r=3, lora_alpha=6, target_modules=TARGETS, in_modes=2)
    model = peft.get_peft_model(quantized_llama(llama_dir, bits), cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, tkpeft.TTLoraLinear) and quantized.is_quantized_linear(layer.base_layer)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    opt = torch.optim.Adam(params, lr=2e-2)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = _loss(model, ids)
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits)
    model.save_pretrained(tmp_path)
    loaded = tkpeft.load_tt_lora(quantized_llama(llama_dir, bits).eval(), str(tmp_path), in_modes=2)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, logits)
    with pytest.warns(UserWarning, match="rounding"):
        merged = loaded.merge_and_unload()
    assert quantized.is_quantized_linear(merged.model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
    # the merged model keeps the adapter's effect up to the requantization's rounding
    rounding = 0.25 if bits == 4 else 0.05
    assert (merged_logits - logits).abs().max() < rounding * (base_logits - logits).abs().max()


def test_per_sample_task_adapter_over_a_4bit_base_matches_float64():
    torch.manual_seed(5)
    spec = tk.TTSpec.build((64,), (48,), 3, index_modes=[tk.Mode.task(3)])
    base = linear4bit(64, 48)
    cores = nn.ParameterList([nn.Parameter(c.float()) for c in _random(spec)])
    tt = tk.TTLinear.from_cores(base, cores, spec, alpha=6.0)
    x = torch.randn(4, 5, 64)
    task_ids = torch.tensor([2, 0, 1, 2])
    y = tt(x, task_ids=task_ids)
    with torch.no_grad():
        term64 = torch.stack(
            [x[i].double() @ tt.delta_weight(task=int(t), scaled=False).double().t() for i, t in enumerate(task_ids)]
        )
        torch.testing.assert_close((y - base(x)).double(), tt.scaling * term64, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="pass task_ids"):
        tt(x)
    with pytest.raises(IndexError, match="task_ids must lie in"):
        tt(x, task_ids=torch.tensor([0, 1, 2, 3]))


def test_adapter_dropout_over_a_quantized_base_is_the_seeded_mask():
    torch.manual_seed(6)
    tt = tk.TTLinear.from_linear(linear8bit(64, 48), ranks=4)
    random_cores_(tt)
    x = torch.randn(9, 64, dtype=torch.float32)
    p, seed = 0.3, 1234
    term = quantized.adapter_term(x, list(tt.cores), tt.spec, scaling=tt.scaling, dropout=p, seed=seed)
    keep = reference.dropout_keep(seed, 9, 64, p)
    x64 = torch.where(keep, x.double() / (1 - p), 0.0)
    ref = tt.scaling * x64 @ tt.delta_weight(scaled=False).double().t()
    torch.testing.assert_close(term.double(), ref, atol=1e-4, rtol=1e-4)
    tt.dropout = p
    tt.train()
    y_train = tt(x)
    tt.eval()
    y_eval = tt(x)
    assert not torch.allclose(y_train, y_eval)  # dropout applies in training only
    with pytest.raises(ValueError, match="dropout"):
        quantized.adapter_term(x, list(tt.cores), tt.spec, dropout=1.0)


def _random(spec):
    return [torch.randn(*s) * (s[0] * s[1]) ** -0.5 for s in spec.core_shapes]


def test_merge_into_an_8bit_layer_with_float_weights_drops_its_cached_quantization():
    torch.manual_seed(8)
    q = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=True)
    q.load_state_dict(nn.Linear(64, 48).state_dict())
    q = q.to("cpu").eval()
    tt = tk.TTLinear.from_linear(q, ranks=4).eval()
    random_cores_(tt)
    x = torch.randn(5, 64)
    with torch.no_grad():
        tt(x)  # the layer caches its weight's int8 form in eval mode
        expected_weight = q.weight.detach().float() + tt.delta_weight()
        with pytest.warns(UserWarning, match="rounding"):
            tt.merge()
        assert torch.equal(q.weight.detach().float(), expected_weight)  # float weights: no rounding here
        fresh = bnb.nn.Linear8bitLt(64, 48, has_fp16_weights=True)
        fresh.load_state_dict({"weight": expected_weight, "bias": q.bias.detach()})
        fresh = fresh.to("cpu").eval().requires_grad_(False)
        torch.testing.assert_close(tt(x), fresh(x), atol=0, rtol=0)


def test_one_task_merges_into_a_4bit_base_and_unmerges_exactly():
    torch.manual_seed(6)
    spec = tk.TTSpec.build((64,), (48,), 3, index_modes=[tk.Mode.task(3)])
    base = linear4bit(64, 48)
    cores = nn.ParameterList([nn.Parameter(c.float()) for c in _random(spec)])
    tt = tk.TTLinear.from_cores(base, cores, spec, alpha=6.0)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y1 = tt(x, task_ids=torch.tensor(1))
        w0 = quantized.dequantize_weight(base)
    packed0, data0 = base.weight, base.weight.data.clone()
    with pytest.warns(UserWarning, match="rounding"):
        tt.merge(task=1)
    assert tt.merged and tt.merged_task == 1
    delta = tt.delta_weight(task=1).detach()
    step = (w0 + delta).abs().max() / 7
    assert (quantized.dequantize_weight(base) - (w0 + delta)).abs().max() <= step
    with torch.no_grad():
        assert (tt(x) - y1).abs().max() <= step * x.abs().sum(-1).max()
    tt.unmerge()
    assert base.weight is packed0 and torch.equal(base.weight.data, data0)
    with pytest.warns(UserWarning, match="rounding"):
        tt.merge(task=2)
    merged2 = quantized.dequantize_weight(base)
    tt.unmerge()
    with pytest.warns(UserWarning, match="rounding"):
        unloaded = tt.merge_and_unload(task=2)
    assert unloaded is base
    assert torch.equal(quantized.dequantize_weight(base), merged2)  # for good: the same weight as merge(task=2)
    assert not torch.equal(merged2, w0)
