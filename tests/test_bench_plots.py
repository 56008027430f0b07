"""bench.plots on synthetic result rows: choosing the run, the README table, and the figures."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

# bench/ is a folder of the repository, not an installed package: importable under `python -m pytest` from
# the root (the working directory is on sys.path), and here under a bare `pytest` too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import plots

OLD, NEW = "2026-11-20T09:00:00-cpu", "2026-11-23T13:40:00-cpu"
# Time relative to the frozen layer per provider, as bench/layer.py records it: every row carries the
# format and rank of the configuration it measures, the frozen layer's rows too.
RATIOS = {"frozen": 1.0, "peft-lora-r16": 1.6, "ttkernels-torch": 1.3, "peft-lora-params": 1.5}
CONFIGS = [("lora", (512, 512)), ("ttlora", (512, 512)), ("lora", (768, 3072))]
HAS_MPL = importlib.util.find_spec("matplotlib") is not None


def layer_row(run, provider, M, *, fmt="lora", shape=(512, 512), phase="forward+backward", slow=1.0, **extra):
    ratio = RATIOS[provider] * slow * (1.1 if fmt == "ttlora" else 1.0) if provider != "frozen" else 1.0
    row = {
        "run": run,
        "preset": "layer",
        "provider": provider,
        "phase": phase,
        "device": "CPU: test (2 threads)",
        "device_type": "cpu",
        "dtype": "float32",
        "time_ms": 0.01 * M * ratio,
        "time_min_ms": 0.009 * M * ratio,
        "reps": 10,
        "M": M,
        "d_in": shape[0],
        "d_out": shape[1],
        "rank": 16,
        "format": fmt,
        "ratio_to_base": ratio,
        "peak_mem_bytes": None,
        "versions": {"python": "3.11.7", "torch": "2.14.1", "cuda": None, "ttkernels": "0.1.0"},
        "quick": False,
    }
    if phase == "forward":
        row["saved_bytes_per_token"] = 4 * shape[0] * (1 + (ratio - 1) / 2)
        row["saved_ratio_to_x"] = 1 + (ratio - 1) / 2
    row.update(extra)
    return row


def model_row(run, provider, tps, config="tiny"):
    return {
        "run": run,
        "preset": "model",
        "provider": provider,
        "phase": "train_step",
        "device": "CPU: test (2 threads)",
        "device_type": "cpu",
        "dtype": "float32",
        "config": config,
        "M": 64,
        "rank": None if provider == "frozen" else 8,
        "tokens_per_s": tps,
        "peak_mem_bytes": None,
        "versions": {"torch": "2.14.1"},
    }


@pytest.fixture
def rows():
    out = []
    # The newer run comes first in the file: the timestamps in the ids decide.
    for run, slow in ((NEW, 1.0), (OLD, 2.0)):
        for fmt, shape in CONFIGS:
            for M in (1, 16, 256, 4096):
                for provider in RATIOS:
                    for phase in ("forward", "forward+backward"):
                        out.append(layer_row(run, provider, M, fmt=fmt, shape=shape, phase=phase, slow=slow))
    out += [model_row(NEW, p, tps) for p, tps in (("frozen", 900.0), ("peft-lora", 700.0), ("metatt", 800.0))]
    out.append(model_row(NEW, "metatt", 300.0, config="small"))
    return out


def test_latest_run_uses_the_timestamp_in_the_id(rows):
    assert plots.latest_run(rows) == NEW
    assert plots.latest_run(rows, device_type="cpu", preset="layer") == NEW
    assert plots.latest_run(rows, device_type="cuda") is None
    assert plots.latest_run([]) is None


def test_latest_run_falls_back_to_file_order():
    rows = [{"run": "b", "device_type": "cpu"}, {"run": "a", "device_type": "cpu"}, {"device_type": "cpu"}]
    assert plots.latest_run(rows) == "a"
    assert plots.latest_run(rows + [{"run": "b"}]) == "b"


def test_latest_run_per_preset():
    rows = [
        {"run": "2026-01-01T00:00:00-cuda", "preset": "layer", "device_type": "cuda"},
        {"run": "2026-01-01T00:05:00-cuda", "preset": "model", "device_type": "cuda"},
    ]
    assert plots.latest_run(rows, device_type="cuda") == "2026-01-01T00:05:00-cuda"
    assert plots.latest_run(rows, device_type="cuda", preset="layer") == "2026-01-01T00:00:00-cuda"


def table_lines(table):
    return [line for line in table.splitlines() if line.startswith("| ")]


def test_markdown_table(rows):
    table = plots.markdown_table(rows)
    assert "CPU figures" in table
    assert NEW in table and OLD not in table
    assert "512 x 512" in table and "rank 16" in table and "torch 2.14.1" in table
    lines = table_lines(table)
    assert lines[0] == "| provider | format | M=1 | M=16 | M=256 | M=4096 |"
    # The frozen layer once, first; then the lora lines, then the ttlora lines; the frozen times last.
    assert lines[1] == "| frozen |  | 1.00 | 1.00 | 1.00 | 1.00 |"
    assert "| ttkernels-torch | lora | 1.30 | 1.30 | 1.30 | 1.30 |" in lines
    assert "| ttkernels-torch | ttlora | 1.43 | 1.43 | 1.43 | 1.43 |" in lines
    assert "| peft-lora-r16 | lora | 1.60 | 1.60 | 1.60 | 1.60 |" in lines
    assert "| peft-lora-params | ttlora | 1.65 | 1.65 | 1.65 | 1.65 |" in lines
    formats = [line.split("|")[2].strip() for line in lines[2:-1]]
    assert formats == ["lora"] * 3 + ["ttlora"] * 3
    assert lines[-1] == "| _frozen, ms_ |  | 0.01 | 0.16 | 2.56 | 41 |"


def test_markdown_table_of_another_run_and_shape(rows):
    table = plots.markdown_table(rows, OLD, d_in=768, d_out=3072)
    assert "768 x 3072" in table
    lines = table_lines(table)
    assert lines[0] == "| provider | M=1 | M=16 | M=256 | M=4096 |"  # one format: no format column
    assert "| ttkernels-torch | 2.60 | 2.60 | 2.60 | 2.60 |" in lines


def test_markdown_table_with_ranks_per_provider():
    """Rows that give each provider its own rank (none for the frozen layer, LoRA's matched rank)."""
    rows = [
        layer_row(NEW, "frozen", 64, rank=None, format=None),
        layer_row(NEW, "ttkernels-torch", 64, format="ttlora"),
        layer_row(NEW, "peft-lora-r16", 64),
        layer_row(NEW, "peft-lora-params", 64, rank=2),
        layer_row(NEW, "peft-lora-params", 64, rank=2, d_in=4096),  # another shape: not in the table
    ]
    lines = table_lines(plots.markdown_table(rows))
    assert lines[0] == "| provider | format | M=64 |"
    assert lines[1] == "| frozen |  | 1.00 |"
    assert "| peft-lora-params (r=2) | lora | 1.50 |" in lines
    assert "| ttkernels-torch | ttlora | 1.30 |" in lines


def test_markdown_table_without_rows():
    assert "No layer rows" in plots.markdown_table([])


def test_missing_ratio_is_computed_and_bad_fields_are_tolerated(rows):
    run = [r for r in rows if r["run"] == NEW]
    for r in run:
        r.pop("ratio_to_base", None)
    run.append({"run": NEW, "preset": "layer", "phase": "forward+backward", "M": None, "time_ms": "n/a"})
    run.append({"run": NEW, "preset": "layer", "phase": "forward+backward", "M": 16, "provider": None})
    lines = table_lines(plots.markdown_table(run))
    assert "| ttkernels-torch | ttlora | 1.43 | 1.43 | 1.43 | 1.43 |" in lines


def test_variant_labels_name_the_rank_only_where_needed():
    labels = plots.variant_labels([("a", 4), ("a", 8), ("b", 16), ("frozen", None)])
    assert labels == {("a", 4): "a r=4", ("a", 8): "a r=8", ("b", 16): "b", ("frozen", None): "frozen"}


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_figures_are_written(rows, tmp_path):
    run = plots.run_rows(rows, NEW)
    files = [
        plots.plot_layer_time_ratio(run, tmp_path / "ratio.png"),
        plots.plot_layer_memory(run, tmp_path / "memory.png"),
        plots.plot_model(run, tmp_path / "model.png"),
    ]
    for path in files:
        assert path is not None and path.stat().st_size > 1000
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plots.plot_model([r for r in run if r["preset"] == "layer"], tmp_path / "none.png") is None


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_command_line(rows, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert plots.main(["--results", str(results), "--out", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"from {results}:")  # says which rows it drew
    names = sorted(p.rsplit("/", 1)[-1] for p in text.split()[2:])
    assert names == ["layer-memory-cpu.png", "layer-table-cpu.md", "layer-time-ratio-cpu.png", "model-cpu.png"]
    assert plots.main(["--results", str(results), "--run", "nope"]) == 1
    assert plots.main(["--results", str(tmp_path / "missing.jsonl")]) == 1


def test_command_line_tables_only(rows, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    assert plots.main(["--results", str(results), "--out", str(out), "--no-figures", "--run", OLD]) == 0
    assert [p.name for p in out.iterdir()] == ["layer-table-cpu.md"]
    assert OLD in (out / "layer-table-cpu.md").read_text()


def test_clear_error_when_matplotlib_cannot_be_imported(rows, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(RuntimeError, match="pip install matplotlib"):
        plots.plot_layer_time_ratio(rows, tmp_path / "ratio.png")
    assert not (tmp_path / "ratio.png").exists()


def test_every_provider_name_is_explained():
    for name in ("frozen", "peft-lora-params", "peft-lora-r8", "tt-einsum", "tt-reconstruct", "metatt-factored"):
        assert plots.provider_note(name), name
    assert plots.provider_note("ttkernels-cuda") == "ttkernels, cuda backend"
    assert "torch's GEMM" in plots.provider_note("ttkernels-triton-cublas")
    assert "rank 16" in plots.provider_note("peft-lora-r16")
    assert plots.provider_note("something-else") == ""


def test_the_table_leaves_out_dropout_rows(rows):
    run = plots.run_rows(rows, NEW)
    noisy = [dict(r, dropout=0.1, ratio_to_base=9.0) for r in run if r.get("format") == "lora"]
    assert plots.markdown_table(run + noisy) == plots.markdown_table(run)
    selected, _ = plots.table_rows(run + noisy, dropout=0.1)
    assert selected and all(r["dropout"] == 0.1 for r in selected)


def _drawn(monkeypatch, draw, *args):
    """Draw with ``draw`` and return ``(title, axes)`` instead of saving the figure."""
    seen = {}

    def keep(plt, fig, axes, title, rows, path):
        seen.update(title=title, axes=axes, fig=fig)
        return path

    monkeypatch.setattr(plots, "_finish", keep)
    assert draw(*args) is not None
    return seen["title"], seen["axes"]


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_layer_figures_say_what_they_show(rows, tmp_path, monkeypatch):
    run = plots.run_rows(rows, NEW)
    # a dropout case where PEFT keeps the dropped copy of x and ttkernels does not
    for provider, saved in (("frozen", 0.0), ("peft-lora-r16", 2.03), ("ttkernels-torch", 1.03)):
        row = layer_row(NEW, provider, 256, phase="forward", saved_ratio_to_x=saved, dropout=0.1)
        run += [row, dict(row, phase="forward+backward")]

    title, axes = _drawn(monkeypatch, plots.plot_layer_time_ratio, run, tmp_path / "t.png")
    assert "float32" in title and "rank 16" in title and "CPU figures" in title
    assert [ax.get_title() for ax in axes] == [
        "lora, 512 x 512",
        "lora, 768 x 3072",
        "lora, 512 x 512, dropout 0.1",
        "ttlora, 512 x 512",
    ]
    for ax in axes:
        assert "lower is better" in ax.get_ylabel()
        labels = ax.get_legend_handles_labels()[1]
        assert plots.REFERENCE_TIME in labels  # the dashed line at 1 says what it is
        assert not any(label.startswith("frozen") for label in labels)  # the reference line, not a line
        assert all(":" in label for label in labels if label != plots.REFERENCE_TIME)  # provider: what it is
        assert ax.lines  # no empty panel

    # a configuration where only the frozen layer was measured gets no (empty) panel
    lonely = layer_row(NEW, "frozen", 16, shape=(64, 64))
    assert len(_drawn(monkeypatch, plots.plot_layer_time_ratio, [*run, lonely], tmp_path / "t.png")[1]) == 4
    assert plots.plot_layer_time_ratio([lonely], tmp_path / "none.png") is None

    title, (ax,) = _drawn(monkeypatch, plots.plot_layer_memory, run, tmp_path / "m.png")
    assert "rank 16" in title and "float32" in title
    assert "lower is better" in ax.get_ylabel()
    groups = [t.get_text() for t in ax.get_xticklabels()]
    assert "lora\n512 x 512\ndropout 0.1" in groups and "lora\n512 x 512" in groups
    labels = ax.get_legend_handles_labels()[1]
    assert plots.REFERENCE_SAVED in labels and not any(label.startswith("frozen") for label in labels)
    values = {t.get_text() for t in ax.texts}  # each bar's value written above it
    assert {"2.03", "1.03"} <= values


@pytest.mark.skipif(not HAS_MPL, reason="matplotlib not installed")
def test_model_figure_says_which_way_is_better(rows, tmp_path, monkeypatch):
    title, axes = _drawn(monkeypatch, plots.plot_model, plots.run_rows(rows, NEW), tmp_path / "model.png")
    assert "rank 8" in title and "64 tokens a step" in title
    assert [ax.get_ylabel() for ax in axes] == ["tokens/s (higher is better)"]
    labels = axes[0].get_legend_handles_labels()[1]
    assert any(label.startswith("metatt: ") for label in labels)
