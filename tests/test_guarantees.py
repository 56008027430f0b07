"""What loading, concurrent use and input checking promise (README, "Guarantees").

* Loads are all-or-nothing: a failed ``MetaTTModel.from_pretrained`` / ``load_tt_lora`` / ``get_metatt_model``
  leaves the model exactly as it was (modules, Parameters, ``requires_grad``), and a retry works.
* Files are checked before anything is allocated (config fields, safetensors headers, sizes against the model);
  nothing from a file is used as a regular expression.
* One MetaTTModel called from several threads with different task ids gives each caller its own result.
* ``torch.compile(fullgraph=True)`` works on the first call.
* Bad input to the public entry points raises TypeError / ValueError naming the argument.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading

import pytest
import torch
from torch import nn

import ttkernels as tk
from helpers import require
from ttkernels import checks
from ttkernels import metatt as metatt_module
from ttkernels.metatt import CONFIG_NAME, WEIGHTS_NAME, MetaTTConfig, MetaTTModel, get_metatt_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


# ------------------------------------------------------------------------------------------------ a small model
class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, 6)


class Net(nn.Module):
    """``layers.N.q`` (d x d) and ``layers.N.v`` (d x 6): two MetaTT groups, structure from the names."""

    def __init__(self, d: int = 8, layers: int = 3) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = 0
        for block in self.layers:
            x = x + torch.tanh(block.q(x))
            out = out + block.v(x)
        return out


def net(seed: int = 0, **kw) -> Net:
    torch.manual_seed(seed)
    return Net(**kw)


def state(model: nn.Module) -> dict:
    """Everything a failed load must leave as it was."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        "attrs": [(n, sorted(m.__dict__)) for n, m in model.named_modules()],
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert after["modules"] == before["modules"]
    assert after["attrs"] == before["attrs"]
    assert len(after["params"]) == len(before["params"])
    for (n0, i0, g0, v0), (n1, i1, g1, v1) in zip(before["params"], after["params"]):
        assert (n0, i0, g0) == (n1, i1, g1)
        assert torch.equal(v0, v1)


def randomize(wrapper: MetaTTModel) -> None:
    with torch.no_grad():
        for p in wrapper.shared_parameters():
            p.normal_(0.0, 0.3)


def saved_metatt(path, **config) -> torch.Tensor:
    """Save a MetaTT adapter with random cores to ``path``; returns its output on a fixed input."""
    config = {"target_modules": ["q", "v"], "rank": 3} | config
    w = get_metatt_model(net(), MetaTTConfig(**config))
    randomize(w)
    w.save_pretrained(path)
    return w(torch.ones(2, 8)).detach()


def rewrite_config(path, edit) -> None:
    layout = json.loads((path / CONFIG_NAME).read_text())
    edit(layout)
    (path / CONFIG_NAME).write_text(json.dumps(layout))


def no_allocation(monkeypatch) -> None:
    """Fail the test if the MetaTT constructor allocates cores."""

    def refuse(*args, **kwargs):
        raise AssertionError("cores were allocated before the file was checked")

    monkeypatch.setattr(metatt_module, "new_cores", refuse)


# ------------------------------------------------------------------------------------------------ all-or-nothing
def _truncate(p):
    data = (p / WEIGHTS_NAME).read_bytes()
    (p / WEIGHTS_NAME).write_bytes(data[: len(data) - 7])


def _nan_core(p):
    from safetensors.torch import load_file, save_file

    tensors = load_file(p / WEIGHTS_NAME)
    tensors["metatt.8x8.1"].view(-1)[3] = float("nan")
    save_file(tensors, p / WEIGHTS_NAME)


CORRUPTIONS = {
    "truncated file": (_truncate, "does not hold it"),
    "NaN core": (_nan_core, "non-finite"),
    "bad config": (lambda p: rewrite_config(p, lambda c: c["config"].update(rank="big")), "rank must be"),
    "bad scaling": (lambda p: rewrite_config(p, lambda c: c.update(scaling=float("nan"))), "scaling must be"),
    "negative group scaling": (
        lambda p: rewrite_config(p, lambda c: c["scaling"].update({g: -1.0 for g in c["scaling"]})),
        "scaling must be",
    ),
    "bad scaling_rule": (lambda p: rewrite_config(p, lambda c: c.update(scaling_rule=True)), "scaling_rule must be"),
    "no scaling_rule": (lambda p: rewrite_config(p, lambda c: c.pop("scaling_rule")), "has no scaling_rule"),
    "scaling_rule in version 1": (
        lambda p: rewrite_config(p, lambda c: c.update(format_version=1, scaling=1.0)),
        "not a field of format version 1",
    ),
    "bad target": (
        lambda p: rewrite_config(p, lambda c: c["targets"].update({"layers.0.q": ["8x8", -1, 0]})),
        "placed",
    ),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_failed_metatt_load_leaves_the_model_as_it_was_and_a_retry_works(tmp_path, corruption):
    good, bad = tmp_path / "good", tmp_path / "bad"
    want = saved_metatt(good)
    saved_metatt(bad)
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(bad)
    model = net()
    before = state(model)
    with pytest.raises(ValueError, match=message):
        MetaTTModel.from_pretrained(model, bad)
    assert_same_state(before, state(model))
    loaded = MetaTTModel.from_pretrained(model, good)  # the same model, retried with a good adapter
    torch.testing.assert_close(loaded(torch.ones(2, 8)), want, atol=0, rtol=0)


def _edit_metatt_tensors(p, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(p / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, p / WEIGHTS_NAME)


SAVED_V = "modules_to_save.layers.1.v.weight"
MODULES_TO_SAVE_CORRUPTIONS = {
    "NaN tensor": (lambda p: _edit_metatt_tensors(p, lambda t: t[SAVED_V].view(-1)[0].fill_(math.nan)), "non-finite"),
    "integer tensor": (lambda p: _edit_metatt_tensors(p, lambda t: t.update({SAVED_V: t[SAVED_V].long()})), "dtype"),
    "other shape": (
        lambda p: _edit_metatt_tensors(p, lambda t: t.update({SAVED_V: torch.zeros(7, 8)})),
        r"layers\.1\.v\.weight has shape \(7, 8\)",
    ),
    "missing tensor": (lambda p: _edit_metatt_tensors(p, lambda t: t.pop(SAVED_V)), "missing"),
    "foreign tensor": (
        lambda p: _edit_metatt_tensors(p, lambda t: t.update({"modules_to_save.layers.0.q.weight": torch.ones(8, 8)})),
        "unexpected",
    ),
    "other modules": (
        lambda p: rewrite_config(p, lambda c: c.update(modules_to_save=["layers.0.v"])),
        "does not fit this model: its modules_to_save",
    ),
    "not a list": (
        lambda p: rewrite_config(p, lambda c: c.update(modules_to_save="layers.0.v")),
        "modules_to_save must be a list",
    ),
    "bad config field": (
        lambda p: rewrite_config(p, lambda c: c["config"].update(modules_to_save=[3])),
        "modules_to_save must hold non-empty strings",
    ),
}


@pytest.mark.parametrize("corruption", sorted(MODULES_TO_SAVE_CORRUPTIONS))
def test_modules_to_save_are_loaded_strictly_and_all_or_nothing(tmp_path, monkeypatch, corruption):
    good, bad = tmp_path / "good", tmp_path / "bad"
    config = {"target_modules": ["q"], "modules_to_save": ["v"]}
    want = saved_metatt(good, **config)
    saved_metatt(bad, **config)
    corrupt, message = MODULES_TO_SAVE_CORRUPTIONS[corruption]
    corrupt(bad)
    model = net()
    with torch.no_grad():
        model.layers[1].v.weight.normal_()  # other values in a saved module, which loading replaces
    before = state(model)
    with monkeypatch.context() as m:
        no_allocation(m)
        with pytest.raises(ValueError, match=message):
            MetaTTModel.from_pretrained(model, bad)
    assert_same_state(before, state(model))
    loaded = MetaTTModel.from_pretrained(model, good)
    assert loaded.modules_to_save == ["layers.0.v", "layers.1.v", "layers.2.v"]
    assert all(p.requires_grad for p in model.layers[1].v.parameters())
    torch.testing.assert_close(loaded(torch.ones(2, 8)), want, atol=0, rtol=0)


def test_a_constructor_failing_half_way_restores_the_model(monkeypatch):
    model = net()
    before = state(model)
    real_wrap = metatt_module.MetaTTLinear.wrap
    calls = []

    def wrap_then_fail(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("failure in the middle of adapting")
        return real_wrap(*args, **kwargs)

    monkeypatch.setattr(metatt_module.MetaTTLinear, "wrap", wrap_then_fail)
    with pytest.raises(RuntimeError, match="in the middle"):
        get_metatt_model(model, MetaTTConfig(["q", "v"], rank=2))
    assert_same_state(before, state(model))
    monkeypatch.setattr(metatt_module.MetaTTLinear, "wrap", real_wrap)
    w = get_metatt_model(model, MetaTTConfig(["q", "v"], rank=2))
    assert len(w.targets) == 6 and all(p.requires_grad for p in w.shared_parameters())


def test_adapting_an_adapted_model_is_refused_and_the_first_adapter_keeps_training():
    model = net()
    first = get_metatt_model(model, MetaTTConfig(["q"], rank=2))
    before = state(model)
    with pytest.raises(ValueError, match=r"already has a MetaTT adapter .*unload it first"):
        get_metatt_model(model, MetaTTConfig(["v"], rank=2))
    with pytest.raises(ValueError, match=r"already has an adapter .*MetaTTModel"):
        get_metatt_model(first, MetaTTConfig(["v"], rank=2))
    assert_same_state(before, state(model))
    assert all(p.requires_grad for p in first.shared_parameters())
    # a model holding a TTLinear or a PEFT layer is refused the same way
    other = net()
    other.layers[0].q = tk.TTLinear(8, 8, ranks=2)
    with pytest.raises(ValueError, match=r"already has an adapter \(layers.0.q is a TTLinear\)"):
        get_metatt_model(other, MetaTTConfig(["v"], rank=2))
    assert other.layers[0].q.cores[0].requires_grad
    # after unload() the model can be adapted again
    bare = first.unload()
    assert isinstance(get_metatt_model(bare, MetaTTConfig(["v"], rank=2)), MetaTTModel)


# ------------------------------------------------------------------------------------------------ bounded files
def test_sizes_in_the_config_are_checked_against_the_header_before_allocating(tmp_path, monkeypatch):
    saved_metatt(tmp_path)
    big = [[1, 8, 4096], [4096, 3, 4096], [4096, 1, 4096], [4096, 8, 1]]  # 50M parameters the file does not hold
    rewrite_config(tmp_path, lambda c: c["groups"]["8x8"].update(core_shapes=big))
    no_allocation(monkeypatch)
    with pytest.raises(
        ValueError, match=r"metatt.8x8.0 has shape \(1, 8, 3\) in the file, the adapter needs \(1, 8, 4096\)"
    ):
        MetaTTModel.from_pretrained(net(), tmp_path)


def test_huge_sizes_are_refused_before_allocating(monkeypatch):
    no_allocation(monkeypatch)
    config = MetaTTConfig(["q"], rank=2, modes=("layer", "matrix", "task"), num_tasks=10**12)
    with pytest.raises(ValueError, match=r"the MetaTT adapter would have .* parameters, more than"):
        get_metatt_model(net(), config)
    with pytest.raises(ValueError, match="the MetaTT adapter would have"):
        get_metatt_model(net(), MetaTTConfig(["q"], rank=10**9))
    with pytest.raises(ValueError, match="the TT adapter would have"):
        tk.TTLinear(64, 64, ranks=10**9)
    with pytest.raises(ValueError, match="the TT adapter would have"):
        tk.TTLinear.from_linear(nn.Linear(64, 64), in_modes=2, ranks=10**6)


def test_layer_numbers_are_bounded_by_the_model(monkeypatch):
    model = nn.Module()
    model.layers = nn.ModuleDict({"99999999": Block(8)})
    no_allocation(monkeypatch)
    with pytest.raises(ValueError, match="has layer number 99999999, but the model has only 5 modules"):
        get_metatt_model(model, MetaTTConfig(["q"], rank=2))


class _NoRegex:
    """Stands in for the ``re`` module of ttkernels.metatt while a file is loaded: no pattern may be used."""

    def __getattr__(self, name):
        raise AssertionError(f"re.{name} was used while loading")


def test_patterns_from_a_file_are_never_used_as_regular_expressions(tmp_path, monkeypatch):
    want = saved_metatt(tmp_path, target_modules=r"layers\.\d+\.(q|v)")
    saved = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert saved["config"]["target_modules"] == sorted(saved["targets"])  # saved as the literal names
    # an old folder that stored a pattern (one that backtracks for ever when matched against a module name)
    rewrite_config(tmp_path, lambda c: c["config"].update(target_modules=r"([\w.]+)+!"))
    monkeypatch.setattr(metatt_module, "re", _NoRegex())
    loaded = MetaTTModel.from_pretrained(net(), tmp_path)
    torch.testing.assert_close(loaded(torch.ones(2, 8)), want, atol=0, rtol=0)
    assert sorted(loaded.metatt_config.target_modules) == sorted(saved["targets"])


def test_deeply_nested_or_oversized_json_gives_a_clear_error(tmp_path):
    saved_metatt(tmp_path)
    (tmp_path / CONFIG_NAME).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ValueError, match="nested too deeply"):
        MetaTTModel.from_pretrained(net(), tmp_path)
    with open(tmp_path / CONFIG_NAME, "w") as f:
        f.truncate(checks.MAX_CONFIG_BYTES + 1)
    with pytest.raises(ValueError, match="a config file has at most"):
        MetaTTModel.from_pretrained(net(), tmp_path)


def _write_header(file, header: dict, data: bytes = b"", claimed: int | None = None) -> None:
    raw = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(raw) if claimed is None else claimed) + raw + data)


@pytest.mark.parametrize(
    "header, data, claimed, message",
    [
        ({}, b"", 2**40, "its header claims 1099511627776 bytes"),
        ({"t": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, b"", None, "does not hold it"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 8, None, "does not hold it"),
        ({"t": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "shape"),
        ({"t": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, None, "unknown dtype"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": 1}}, b"\0" * 8, None, "malformed"),
        ({"__metadata__": {"a": 1}}, b"", None, "__metadata__"),
    ],
)  # fmt: skip
def test_safetensors_headers_are_checked_without_reading_data(tmp_path, header, data, claimed, message):
    _write_header(tmp_path / "a.safetensors", header, data, claimed)
    with pytest.raises(ValueError, match=message):
        checks.read_safetensors_header(tmp_path / "a.safetensors")


def test_save_after_unloading_is_refused():
    w = get_metatt_model(net(), MetaTTConfig(["q"], rank=2))
    w.merge_and_unload()
    with pytest.raises(RuntimeError, match=r"was unloaded .* save before unloading"):
        w.save_pretrained("unused")
    w = get_metatt_model(net(), MetaTTConfig(["q"], rank=2))
    w.unload()
    with pytest.raises(RuntimeError, match="was unloaded"):
        w.save_pretrained("unused")
    assert not os.path.exists("unused")


# ------------------------------------------------------------------------------------------------ threads
def test_concurrent_calls_with_different_task_ids_each_get_their_own_result():
    torch.manual_seed(0)
    w = get_metatt_model(net(), MetaTTConfig(["q", "v"], rank=3, modes=("layer", "matrix", "task"), num_tasks=4))
    randomize(w)
    x = torch.randn(2, 8)
    tasks = [torch.tensor([t, (t + 1) % 4]) for t in range(4)]
    with torch.no_grad():
        want = [w(x, task_ids=t) for t in tasks]
    assert not torch.equal(want[0], want[1])  # the tasks differ, so a crossed route would show
    errors, barrier = [], threading.Barrier(4)

    def run(i):
        try:
            barrier.wait()
            with torch.no_grad():
                for _ in range(30):
                    torch.testing.assert_close(w(x, task_ids=tasks[i]), want[i], atol=0, rtol=0)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert w._routing.task_ids is None  # nothing left behind


def test_a_metatt_model_still_deep_copies():
    import copy

    w = get_metatt_model(net(), MetaTTConfig(["q"], rank=2, modes=("layer", "task"), num_tasks=2))
    randomize(w)
    twin = copy.deepcopy(w)
    x, t = torch.randn(3, 8), torch.tensor([0, 1, 1])
    torch.testing.assert_close(twin(x, task_ids=t), w(x, task_ids=t), atol=0, rtol=0)
    view = next(v for _, v in twin.views())
    assert view.__dict__["_routing"] is twin._routing


# ------------------------------------------------------------------------------------------------ compile
def test_ttlinear_compiles_fullgraph_on_the_first_call():
    torch._dynamo.reset()
    layer = tk.TTLinear(12, 10, in_modes=2, ranks=3)
    with torch.no_grad():
        layer.cores[-1].normal_()
    x = torch.randn(5, 12)
    y = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)  # no eager call before
    torch.testing.assert_close(y, layer(x))


def test_metatt_model_compiles_fullgraph_on_the_first_call():
    torch._dynamo.reset()
    w = get_metatt_model(net(), MetaTTConfig(["q", "v"], rank=2, modes=("layer", "matrix", "task"), num_tasks=3))
    randomize(w)
    x, t = torch.randn(2, 8), torch.tensor([2, 0])
    y = torch.compile(w, fullgraph=True, backend="aot_eager")(x, task_ids=t)  # no eager call before
    torch.testing.assert_close(y, w(x, task_ids=t))


def test_compiled_tt_adapter_takes_changing_scaling_and_seed():
    torch._dynamo.reset()
    A, B, W = torch.randn(8, 2), torch.randn(2, 8), torch.randn(8, 8)

    def call(x, scaling, seed):
        return tk.tt_adapter(x, W, None, A, None, B, scaling=scaling, dropout=0.2, seed=seed)

    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    for i in range(3):  # the second call makes the numbers symbolic
        x = torch.randn(3, 8)
        torch.testing.assert_close(compiled(x, 0.5 + i, 10 + i), call(x, 0.5 + i, 10 + i))


# ------------------------------------------------------------------------------------------------ bad input
_A, _B, _W, _X = torch.randn(8, 2), torch.randn(2, 8), torch.randn(8, 8), torch.randn(3, 8)
_NAN_CORES = [torch.randn(1, 4, 2), torch.full((2, 4, 1), float("nan"))]

BAD_INPUT = {
    "ranks=2.5": (lambda: tk.TTLinear(16, 16, ranks=2.5), TypeError, "ranks must be an int"),
    "in_modes='44'": (lambda: tk.TTLinear(16, 16, in_modes="44"), TypeError, "in_modes must be an int"),
    "in_modes=0": (lambda: tk.TTLinear(16, 16, in_modes=0), ValueError, "in_modes = 0"),
    "in_modes=1200": (lambda: tk.TTLinear(16, 16, in_modes=1200), ValueError, "in_modes = 1200"),
    "out_modes=-1": (lambda: tk.TTLinear(16, 16, out_modes=-1), ValueError, "out_modes = -1"),
    "complex adapter_dtype": (lambda: tk.TTLinear(8, 8, adapter_dtype=torch.complex64), TypeError, "adapter_dtype"),
    "integer dtype": (lambda: tk.TTLinear(8, 8, dtype=torch.int32), TypeError, "dtype must be a floating-point"),
    "from_linear complex": (
        lambda: tk.TTLinear.from_linear(nn.Linear(8, 8), adapter_dtype=torch.complex128),
        TypeError,
        "adapter_dtype",
    ),
    "meta input": (lambda: tk.TTLinear(8, 8)(torch.randn(2, 8, device="meta")), ValueError, "x is on the meta device"),
    "scaling tensor": (
        lambda: tk.tt_adapter(_X, _W, None, _A, None, _B, scaling=torch.tensor(2.0)),
        TypeError,
        "scaling must be a real number",
    ),
    "scaling NaN": (lambda: tk.tt_adapter(_X, _W, None, _A, None, _B, scaling=math.nan), ValueError, "scaling must be"),
    "seed str": (lambda: tk.tt_adapter(_X, _W, None, _A, None, _B, dropout=0.1, seed="7"), TypeError, "seed must be"),
    "seed float": (lambda: tk.tt_adapter(_X, _W, None, _A, None, _B, dropout=0.1, seed=1.5), TypeError, "seed must"),
    "cores int": (lambda: tk.tt_linear(_X, _W, None, 5, tk.TTSpec.linear(8, 8)), TypeError, "cores must be a sequence"),
    "factorize prime": (lambda: tk.factorize(2**61 - 1, 2), ValueError, r"n must be <= 2\*\*40"),
    "factorize k": (lambda: tk.factorize(64, 100), ValueError, "k must be <= 64"),
    "tt_round NaN": (lambda: tk.rank.tt_round(_NAN_CORES, 1), ValueError, r"cores\[1\] holds non-finite"),
    "sweep NaN": (lambda: tk.rank.sweep(_NAN_CORES, 1), ValueError, r"cores\[1\] holds non-finite"),
    "tt_svd NaN": (lambda: tk.rank.tt_svd(torch.full((2, 3), math.nan)), ValueError, "tensor holds non-finite"),
    "from_lora NaN": (
        lambda: tk.rank.from_lora(torch.full((2, 8), math.nan), torch.randn(8, 2), [8], [8]),
        ValueError,
        "lora_A holds non-finite",
    ),
    "A complex": (lambda: tk.tt_adapter(_X, _W, None, _A.to(torch.complex64), None, _B), TypeError, "A must be a real"),
    "B integer": (lambda: tk.tt_adapter(_X, _W, None, _A, None, _B.long()), TypeError, "B must be a real"),
    "device unknown": (lambda: tk.TTLinear(8, 8, device="nowhere"), ValueError, "device = 'nowhere' is not a device"),
    "bias str": (lambda: tk.TTLinear(8, 8, bias="no"), TypeError, "bias must be a bool"),
    "pretrained_dir int": (lambda: MetaTTModel.from_pretrained(net(), 123), TypeError, "pretrained_dir must be a str"),
    "factors dtype": (
        lambda: tk.ops.factors(_NAN_CORES, tk.TTSpec.linear(4, 4, ranks=2), dtype=torch.int32),
        TypeError,
        "dtype must be a floating-point",
    ),
    "factors spec": (lambda: tk.ops.factors(_NAN_CORES, "spec"), TypeError, "spec must be a TTSpec"),
    "schedule step": (
        lambda: tk.rank.RankSchedule(tk.TTLinear(8, 8), None, every=1, final_rank=1).step("1"),
        TypeError,
        "step must be an int",
    ),
    "tt_round not a list": (lambda: tk.rank.tt_round(torch.randn(1, 4, 1)), TypeError, "cores must be a list"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_is_refused_naming_the_argument(case):
    call, exc, message = BAD_INPUT[case]
    with pytest.raises(exc, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.float16, torch.bool])
def test_metatt_task_ids_of_other_dtypes_are_refused(dtype):
    w = get_metatt_model(net(), MetaTTConfig(["q"], rank=2, modes=("layer", "task"), num_tasks=2))
    with pytest.raises(TypeError, match=f"task_ids must be an integer tensor, got {dtype}"):
        w(torch.randn(2, 8), task_ids=torch.zeros(2, dtype=dtype))


def test_compressing_non_finite_metatt_cores_names_the_group():
    w = get_metatt_model(net(), MetaTTConfig(["q", "v"], rank=3))
    randomize(w)
    with torch.no_grad():
        w.metatt_cores["8x6"][1].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=r"the cores of group 8x6\[1\] holds non-finite"):
        tk.rank.compress_(w, max_rank=2)


# ------------------------------------------------------------------------------------------------ PEFT
peft = require("peft")
from ttkernels import peft as tkpeft  # noqa: E402


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin0 = nn.Linear(16, 24)
        self.lin1 = nn.Linear(24, 8)

    def forward(self, x):
        return self.lin1(torch.relu(self.lin0(x)))


def _tiny():
    torch.manual_seed(0)
    return _Tiny()


def saved_tt_lora(path, **kw) -> torch.Tensor:
    model = peft.get_peft_model(_tiny(), tkpeft.tt_lora_config(r=3, lora_alpha=6, target_modules=["lin0", "lin1"],
                                                               in_modes=2, **kw))  # fmt: skip
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    model.save_pretrained(path)
    return model(torch.ones(2, 16)).detach()


def _edit_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def _edit_json(path, edit):
    data = json.loads((path / "adapter_config.json").read_text())
    edit(data)
    (path / "adapter_config.json").write_text(json.dumps(data))


KEY = "base_model.model.lin0.lora_tt_cores.1"
TT_LORA_CORRUPTIONS = {
    "NaN core": (lambda p: _edit_tensors(p, lambda t: t[KEY].view(-1)[0].fill_(math.nan)), "non-finite"),
    "integer core": (lambda p: _edit_tensors(p, lambda t: t.update({KEY: t[KEY].long()})), "dtype int64"),
    "missing core": (lambda p: _edit_tensors(p, lambda t: t.pop(KEY)), r"missing \[1\]"),
    "missing module": (
        lambda p: _edit_tensors(p, lambda t: [t.pop(k) for k in list(t) if ".lin1." in k]),
        r"no cores for \['lin1'\]",
    ),
    "NaN lora_alpha": (lambda p: _edit_json(p, lambda c: c.update(lora_alpha=math.nan)), "lora_alpha must be"),
    "huge r": (lambda p: _edit_json(p, lambda c: c.update(r=10**9)), "need"),
    "string r": (lambda p: _edit_json(p, lambda c: c.update(r="3")), "r must be a positive int"),
    "foreign tensor": (lambda p: _edit_tensors(p, lambda t: t.update({"evil": torch.ones(2)})), "not a TT-LoRA core"),
    "layer_replication": (lambda p: _edit_json(p, lambda c: c.update(layer_replication=[[0, 1]])), "do not support"),
    "deep JSON": (lambda p: (p / "adapter_config.json").write_text("[" * 50_000), "nested too deeply"),
    "bad tt_format_version": (lambda p: _edit_json(p, lambda c: c.update(tt_format_version=3)), "tt_format_version 3"),
}


@pytest.mark.parametrize("corruption", sorted(TT_LORA_CORRUPTIONS))
def test_load_tt_lora_is_strict_and_all_or_nothing(tmp_path, monkeypatch, corruption):
    good, bad = tmp_path / "good", tmp_path / "bad"
    want = saved_tt_lora(good)
    saved_tt_lora(bad)
    corrupt, message = TT_LORA_CORRUPTIONS[corruption]
    corrupt(bad)
    model = _tiny()
    before = state(model)
    real = peft.PeftModel.from_pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("PEFT built the adapter before the folder was checked")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", refuse)
    with pytest.raises(ValueError, match=message):
        tkpeft.load_tt_lora(model, str(bad), in_modes=2)
    assert_same_state(before, state(model))
    monkeypatch.setattr(peft.PeftModel, "from_pretrained", real)
    loaded = tkpeft.load_tt_lora(model, str(good), in_modes=2)
    torch.testing.assert_close(loaded(torch.ones(2, 16)), want, atol=0, rtol=0)


def test_load_tt_lora_failing_inside_peft_restores_the_model(tmp_path, monkeypatch):
    saved_tt_lora(tmp_path)
    model = _tiny()
    before = state(model)
    real = tkpeft.TTLoraLinear.update_layer
    calls = []

    def fail_on_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("failure while PEFT builds the layers")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(tkpeft.TTLoraLinear, "update_layer", fail_on_second)
    with pytest.raises(ValueError, match=r"PEFT cannot load the adapter .*RuntimeError: failure while PEFT builds"):
        tkpeft.load_tt_lora(model, str(tmp_path), in_modes=2)
    assert_same_state(before, state(model))


def test_load_tt_lora_uses_literal_targets_not_patterns_from_the_file(tmp_path):
    want = saved_tt_lora(tmp_path)
    _edit_json(tmp_path, lambda c: c.update(target_modules=r"([\w.]+)+!", exclude_modules=r"(a+)+$"))
    loaded = tkpeft.load_tt_lora(_tiny(), str(tmp_path), in_modes=2)
    torch.testing.assert_close(loaded(torch.ones(2, 16)), want, atol=0, rtol=0)
    assert sorted(loaded.peft_config["default"].target_modules) == ["lin0", "lin1"]


def test_load_tt_lora_refuses_the_wrong_tt_options_before_building(tmp_path, monkeypatch):
    want = saved_tt_lora(tmp_path)  # the folder records in_modes=2: loading needs no options
    torch.testing.assert_close(tkpeft.load_tt_lora(_tiny(), str(tmp_path))(torch.ones(2, 16)), want, atol=0, rtol=0)

    def refuse(*args, **kwargs):
        raise AssertionError("PEFT built the adapter before the folder was checked")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", refuse)
    with pytest.raises(ValueError, match=r"saved with tt_in_modes=2, but in_modes=3 was given"):
        tkpeft.load_tt_lora(_tiny(), str(tmp_path), in_modes=3)
    _edit_json(tmp_path, lambda c: c.update(tt_in_modes=None))  # options in the file that do not fit its cores
    with pytest.raises(ValueError, match=r"lin0 has cores \[0, 1, 2\], the adapter needs 0..1.*do not fit its TT"):
        tkpeft.load_tt_lora(_tiny(), str(tmp_path))
    _edit_json(tmp_path, lambda c: [c.pop(k) for k in ("tt_in_modes", "tt_out_modes", "tt_backend")])
    _edit_json(tmp_path, lambda c: c.update(peft_type="LORA"))  # an older folder: the options are given
    with pytest.raises(ValueError, match=r"lin0 has cores \[0, 1, 2\], the adapter needs 0..1.*pass the options"):
        tkpeft.load_tt_lora(_tiny(), str(tmp_path))


def test_load_tt_lora_keeps_per_module_ranks_and_alphas_as_literal_names(tmp_path):
    want = saved_tt_lora(tmp_path, rank_pattern={"lin1": 2}, alpha_pattern={"lin1": 5.0})
    loaded = tkpeft.load_tt_lora(_tiny(), str(tmp_path), in_modes=2)
    torch.testing.assert_close(loaded(torch.ones(2, 16)), want, atol=0, rtol=0)
    layer = loaded.base_model.model.lin1
    assert layer.r["default"] == 2 and layer.scaling["default"] == 5.0 / 2
    _edit_json(tmp_path, lambda c: c.update(rank_pattern={"lin.": 2}))  # as a pattern it would match lin1
    with pytest.raises(ValueError, match=r"core 0 of lin1 has shape \(1, 6, 2\), but r = 3"):
        tkpeft.load_tt_lora(_tiny(), str(tmp_path), in_modes=2)


def test_load_tt_lora_checks_modules_to_save_tensors_against_the_model(tmp_path, monkeypatch):
    cfg = tkpeft.tt_lora_config(r=3, target_modules=["lin0"], modules_to_save=["lin1"], in_modes=2)
    model = peft.get_peft_model(_tiny(), cfg)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    model.save_pretrained(tmp_path)
    want = model(torch.ones(2, 16)).detach()
    loaded = tkpeft.load_tt_lora(_tiny(), str(tmp_path))
    torch.testing.assert_close(loaded(torch.ones(2, 16)), want, atol=0, rtol=0)
    good = (tmp_path / "adapter_model.safetensors").read_bytes()

    def refuse(*args, **kwargs):
        raise AssertionError("PEFT built the adapter before the folder was checked")

    monkeypatch.setattr(peft.PeftModel, "from_pretrained", refuse)
    for edit, message in (
        (lambda t: t.update({"base_model.model.lin1.weight": torch.zeros(3, 3)}), r"has shape \(3, 3\)"),
        (lambda t: t["base_model.model.lin1.weight"].view(-1)[0].fill_(math.nan), "non-finite"),
        (lambda t: t.update({"base_model.model.lin1.extra": torch.zeros(3)}), "no counterpart"),
        (lambda t: t.update({"base_model.model.lin1.bias": t["base_model.model.lin1.bias"].long()}), "dtype int64"),
    ):
        (tmp_path / "adapter_model.safetensors").write_bytes(good)
        _edit_tensors(tmp_path, edit)
        model = _tiny()
        before = state(model)
        with pytest.raises(ValueError, match=message):
            tkpeft.load_tt_lora(model, str(tmp_path))
        assert_same_state(before, state(model))


def test_tt_lora_folder_config_checks_the_file(tmp_path):
    saved_tt_lora(tmp_path)
    cfg = tkpeft.tt_lora_folder_config(tmp_path)
    assert isinstance(cfg, tkpeft.TTLoraConfig) and cfg.tt_in_modes == 2 and cfg.r == 3
    _edit_json(tmp_path, lambda c: c.update(tt_out_modes=[0]))
    with pytest.raises(ValueError, match="tt_out_modes must be None"):
        tkpeft.tt_lora_folder_config(tmp_path)
    _edit_json(tmp_path, lambda c: c.update(peft_type="IA3"))
    with pytest.raises(ValueError, match="'IA3' adapter, not a TT-LoRA one"):
        tkpeft.tt_lora_folder_config(tmp_path)


def test_the_snapshot_restores_hooks_attributes_and_children():
    model = net()
    before = state(model)
    snapshot = checks.ModelSnapshot(model)
    model.layers[0].register_forward_hook(lambda *a: None)
    model.layers[1].q = nn.Identity()
    model.layers[2].extra = 3
    model.layers[0].q.weight.requires_grad_(False)
    snapshot.restore()
    assert_same_state(before, state(model))
    assert not model.layers[0]._forward_hooks
