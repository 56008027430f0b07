"""Figures and the README table, drawn from the result rows of a results folder.

    python -m bench.plots [--results-dir DIR | --results PATH] [--out DIR] [--run RUN_ID] [--device-type cuda]
                          [--no-figures]

The rows are ``results.jsonl`` of the results folder (``bench/out/``, git-ignored, unless ``--results-dir``
or ``$TTKERNELS_BENCH_RESULTS_DIR`` says otherwise); the files go to ``plots/`` beside them (``--out``).
``bench/results/`` is the published folder whose figures the README shows (``make publish-results``).

For every device type found (or only ``--device-type``), each figure is drawn from the newest run that has
rows for it: the layer figures from the newest run with ``layer`` rows, the model figure from the newest run
with ``model`` rows (``python -m bench --preset layer`` and ``--preset model`` are separate runs).
``--run`` draws everything from that one run instead. Files written:

* ``layer-time-ratio-<device_type>.png``: forward + backward time over the frozen layer's time against the
  number of tokens M, one line per provider, one panel per shape (and dtype);
* ``layer-memory-<device_type>.png``: bytes saved for backward per token relative to the bytes of x, and
  peak memory where it was measured (CUDA only);
* ``model-<device_type>.png``: tokens/s and peak memory of a training step per provider and model config;
* ``layer-table-<device_type>.md``: :func:`markdown_table` of the same run, ready for the README;
* ``convergence-<device_type>.png`` (from the newest ``convergence`` run): per task, the evaluation loss
  against the step at lr 1e-3, the final loss against the learning rate at r 8 / alpha 16, and the final loss
  against the trainable parameters at lr 1e-3 (log axis); ``convergence-table-<device_type>.md``: its rows.

CPU runs are labelled "CPU figures". Every row field may be missing or None; rows without the fields a
figure needs are left out of that figure. matplotlib is needed only to draw (imported on first use): without
it the command writes the tables, says how to get the figures, and exits 0.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.harness import add_results_args, read_rows, results_file

Row = dict[str, Any]

MAIN_PHASE = "forward+backward"
BASE_PROVIDER = "frozen"
FORMATS = ("lora", "ttlora", "metatt")
VERSION_KEYS = ("python", "torch", "cuda", "triton", "peft", "transformers", "ttkernels")
# What each provider name stands for, in the figures' legends (bench/providers.py and bench/model.py define them).
PROVIDER_NOTES = {
    "frozen": "the frozen base, no adapter",
    "peft-lora-params": "PEFT LoRA at the rank with the TT's parameter count",
    "peft-lora": "PEFT LoRA on every projection",
    "tt-einsum": "TT-LoRA-style einsum, one core at a time",
    "tt-reconstruct": "rebuilds the dense delta-W every step",
    "metatt": "ttkernels MetaTT (get_metatt_model)",
    "metatt-factored": "ttkernels MetaTT, d_in and d_out in 2 modes each",
    "ttkernels-triton-cublas": "ttkernels, Triton kernels + torch's GEMM",
}


# ------------------------------------------------------------------------------------------ helpers
def _num(value: Any) -> float | None:
    """``value`` as a finite float, or None (for None, bools, strings, NaN and infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _device_type(row: Row) -> str:
    return str(row.get("device_type") or "unknown")


def _first(rows: Iterable[Row], key: str) -> Any:
    """The first non-empty value of ``key`` in ``rows`` (None if there is none)."""
    for row in rows:
        value = row.get(key)
        if value not in (None, "", {}):
            return value
    return None


def _most_common(values: Iterable[Any]) -> Any:
    """The most frequent value (ties: the largest, so the biggest shape or rank wins); None if empty."""
    counts = Counter(v for v in values if v is not None)
    if not counts:
        return None
    return max(counts, key=lambda v: (counts[v], v))


def _sort_key(value: Any) -> tuple:
    """Numbers before anything else and in numeric order (768 before 4096); tuples element by element."""
    if isinstance(value, tuple):
        return tuple(_sort_key(v) for v in value)
    n = _num(value)
    return (0, n, "") if n is not None else (1, 0.0, str(value))


def _run_time(run_id: str) -> datetime | None:
    """The timestamp a run id starts with (``2026-11-23T13:40:00-cpu``), or None."""
    m = re.match(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?", run_id)
    if m is None:
        return None
    try:
        return datetime.fromisoformat(m.group(0))
    except ValueError:
        return None


def _filter(rows: Iterable[Row], **fields: Any) -> list[Row]:
    """Rows whose fields equal the given values; a value of None means "any"."""
    wanted = {k: v for k, v in fields.items() if v is not None}
    out = []
    for row in rows:
        if "device_type" in wanted and _device_type(row) != wanted["device_type"]:
            continue
        if all(row.get(k) == v for k, v in wanted.items() if k != "device_type"):
            out.append(row)
    return out


# ------------------------------------------------------------------------------------------ selecting rows
def latest_run(rows: Sequence[Row], device_type: str | None = None, preset: str | None = None) -> str | None:
    """Id of the newest run among ``rows`` (only those of ``device_type`` / ``preset`` when given).

    Runs are ordered by the timestamp their ids start with when every id has one, otherwise by where their
    rows last appear (results are appended, so later is newer). None when no row has a run id.
    """
    last_seen: dict[str, int] = {}
    for i, row in enumerate(_filter(rows, device_type=device_type, preset=preset)):
        run = row.get("run")
        if run not in (None, ""):
            last_seen[str(run)] = i
    if not last_seen:
        return None
    times = {run: _run_time(run) for run in last_seen}
    if all(t is not None for t in times.values()):
        return max(last_seen, key=lambda run: (times[run], last_seen[run]))
    return max(last_seen, key=last_seen.__getitem__)


def run_rows(rows: Sequence[Row], run: str | None, **fields: Any) -> list[Row]:
    """The rows of ``run`` (also matching ``fields``); [] when ``run`` is None."""
    if run is None:
        return []
    return [row for row in _filter(rows, **fields) if str(row.get("run")) == run]


def device_types(rows: Iterable[Row]) -> list[str]:
    return sorted({_device_type(row) for row in rows})


def with_ratios(rows: Sequence[Row], base_provider: str = BASE_PROVIDER) -> list[Row]:
    """Copies of ``rows`` where a missing ``ratio_to_base`` is filled in from the base provider's time for
    the same preset, phase, shape, dtype and device (and format and rank where the base rows have them);
    left None when there is no such time."""
    shape_fields = ("preset", "phase", "M", "d_in", "d_out", "dtype", "device")
    base: dict[tuple, float] = {}
    for row in rows:
        t = _num(row.get("time_ms"))
        if row.get("provider") == base_provider and t:
            key = tuple(row.get(k) for k in shape_fields)
            base[(*key, row.get("format"), row.get("rank"))] = t
            base.setdefault(key, t)
    out = []
    for row in rows:
        row = dict(row)
        if _num(row.get("ratio_to_base")) is None:
            key = tuple(row.get(k) for k in shape_fields)
            b = base.get((*key, row.get("format"), row.get("rank"))) or base.get(key)
            t = _num(row.get("time_ms"))
            row["ratio_to_base"] = t / b if t is not None and b else None
        out.append(row)
    return out


# ------------------------------------------------------------------------------------------ labels
def provider_note(provider: str) -> str:
    """What a provider name means, for a legend ("" when unknown)."""
    if provider in PROVIDER_NOTES:
        return PROVIDER_NOTES[provider]
    m = re.fullmatch(r"peft-lora-r(\d+)", provider)
    if m:
        return f"PEFT LoRA at rank {m.group(1)}, the TT's own factors"
    if provider.startswith("ttkernels-"):
        return f"ttkernels, {provider.removeprefix('ttkernels-')} backend"
    return ""


def _legend_label(label: str, provider: str) -> str:
    note = provider_note(provider)
    return f"{label}: {note}" if note else label


def _dropout(row: Row) -> float:
    """The adapter dropout of a row (0 when the row does not say)."""
    return _num(row.get("dropout")) or 0.0


def variant(row: Row) -> tuple[str, int | None]:
    """What one line or bar stands for: ``(provider, rank)``. (The format is the configuration the row
    measures, shown by panel or group, not by line.)"""
    rank = _num(row.get("rank"))
    return str(row.get("provider") or "?"), (None if rank is None else int(rank))


def variant_labels(variants: Iterable[tuple[str, int | None]]) -> dict[tuple, str]:
    """Labels that name the provider, adding the rank only where one provider has several."""
    variants = sorted(set(variants), key=_variant_order)
    ranks = defaultdict(set)
    for provider, rank in variants:
        ranks[provider].add(rank)
    return {
        (provider, rank): provider + (f" r={rank}" if len(ranks[provider]) > 1 and rank is not None else "")
        for provider, rank in variants
    }


def _variant_order(v: tuple[str, int | None]) -> tuple:
    provider, rank = v
    return (provider != BASE_PROVIDER, provider, -1 if rank is None else rank)


def _format_order(rows: Iterable[Row]) -> list[str | None]:
    """The formats of ``rows``: lora, ttlora, metatt first, then others in order of appearance."""
    seen = list(dict.fromkeys(r.get("format") for r in rows))
    return sorted(seen, key=lambda f: (FORMATS.index(f) if f in FORMATS else len(FORMATS), seen.index(f)))


def versions_line(rows: Iterable[Row]) -> str:
    """``torch 2.14.1, cuda 13.0, triton 3.6.0, ...`` from the first row that records versions."""
    versions = _first(rows, "versions") or {}
    if not isinstance(versions, dict):
        return ""
    return ", ".join(f"{k} {versions[k]}" for k in VERSION_KEYS if versions.get(k))


def device_line(rows: Sequence[Row]) -> str:
    """One line naming the device, dtype, run and versions; CPU runs say "CPU figures"."""
    parts = []
    if any(_device_type(r) == "cpu" for r in rows):
        parts.append("CPU figures")
    device = _first(rows, "device")
    if device:
        parts.append(str(device))
    dtypes = sorted({str(r["dtype"]) for r in rows if r.get("dtype")})
    if dtypes:
        parts.append("/".join(dtypes))
    run = _first(rows, "run")
    if run:
        parts.append(f"run {run}" + (" (quick)" if any(r.get("quick") for r in rows) else ""))
    line = "; ".join(parts)
    versions = versions_line(rows)
    return f"{line}; {versions}" if versions else line


def _title(what: str, rows: Sequence[Row]) -> str:
    cpu = any(_device_type(r) == "cpu" for r in rows)
    return f"{what} (CPU figures)" if cpu else what


# ------------------------------------------------------------------------------------------ markdown
def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _fmt_ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def table_rows(
    rows: Sequence[Row],
    *,
    d_in: int | None = None,
    d_out: int | None = None,
    rank: int | None = None,
    phase: str = MAIN_PHASE,
    dtype: str | None = None,
    dropout: float = 0.0,
) -> tuple[list[Row], dict[str, Any]]:
    """The layer rows of one phase, shape, dtype, rank and adapter dropout, and the values chosen for those.

    Unset values are chosen from the rows: the most frequent shape, dtype and rank. Rows without a rank (the
    frozen layer) are kept, and so is a provider measured at other ranks only (LoRA with a TT adapter's
    parameter count, where its rank is recorded), at all of them.
    """
    rows = with_ratios(_filter(rows, preset="layer", phase=phase))
    rows = [r for r in rows if _dropout(r) == dropout]
    dtype = dtype or _most_common(r.get("dtype") for r in rows)
    rows = _filter(rows, dtype=dtype)
    if d_in is None or d_out is None:
        shape = _most_common((r.get("d_in"), r.get("d_out")) for r in rows if r.get("d_in") and r.get("d_out"))
        d_in, d_out = shape if shape else (d_in, d_out)
    rows = _filter(rows, d_in=d_in, d_out=d_out)
    rank = rank if rank is not None else _most_common(variant(r)[1] for r in rows)
    if rank is not None:
        has_rank = {variant(r)[0] for r in rows if variant(r)[1] == rank}
        rows = [r for r in rows if variant(r)[1] in (None, rank) or variant(r)[0] not in has_rank]
    return rows, {"d_in": d_in, "d_out": d_out, "rank": rank, "phase": phase, "dtype": dtype}


def _table_cells(rows: Sequence[Row], rank: int | None) -> tuple[dict, dict[tuple, str], dict[int, float | None]]:
    """``(cells, labels, frozen_ms)``: ratio per line ``(format, provider, rank)`` and M, the label of each
    line, and the frozen layer's time per M. The frozen layer is one line (its ratio is 1 in every format)."""
    cells: dict[tuple, dict[int, float | None]] = defaultdict(dict)
    frozen_ms: dict[int, float | None] = {}
    for r in rows:
        m = int(r["M"])
        provider, r_rank = variant(r)
        if provider == BASE_PROVIDER:
            cells[(None, provider, r_rank)].setdefault(m, _num(r.get("ratio_to_base")))
            frozen_ms.setdefault(m, _num(r.get("time_ms")))
        else:
            cells[(r.get("format"), provider, r_rank)][m] = _num(r.get("ratio_to_base"))
    names = variant_labels((p, k) for _, p, k in cells)
    labels = {}
    for fmt, provider, r_rank in cells:
        label = names[(provider, r_rank)]
        if r_rank is not None and rank is not None and r_rank != rank and "r=" not in label:
            label += f" (r={r_rank})"  # a provider kept at another rank than the table's says which
        labels[(fmt, provider, r_rank)] = label
    return cells, labels, frozen_ms


def markdown_table(
    rows: Sequence[Row],
    run: str | None = None,
    *,
    device_type: str | None = None,
    d_in: int | None = None,
    d_out: int | None = None,
    rank: int | None = None,
    phase: str = MAIN_PHASE,
    dtype: str | None = None,
) -> str:
    """The README table of one run's layer rows: providers down (with the adapter format when the run has
    several), tokens M across, time relative to the frozen layer in the cells, the frozen layer's own time
    in ms as the last line, and the device line above.

    ``run`` defaults to the newest run with layer rows (of ``device_type`` when given); the shape, rank and
    dtype default as in :func:`table_rows`. Returns a short note instead when there is nothing to show.
    """
    run = run or latest_run(rows, device_type=device_type, preset="layer")
    rows = run_rows(rows, run, device_type=device_type)
    selected, chosen = table_rows(rows, d_in=d_in, d_out=d_out, rank=rank, phase=phase, dtype=dtype)
    selected = [r for r in selected if _num(r.get("M")) is not None]
    if not selected:
        return f"_No layer rows for phase {phase} in run {run}._\n"
    ms = sorted({int(r["M"]) for r in selected})
    cells, labels, frozen_ms = _table_cells(selected, chosen["rank"])
    formats = _format_order(selected)
    show_format = len([f for f in formats if f is not None]) > 1
    order = lambda line: (line[1] != BASE_PROVIDER, formats.index(line[0]) if line[0] in formats else -1, line[1:])
    rank_text = f", rank {chosen['rank']}" if chosen["rank"] is not None else ""
    head = ["provider", "format"] if show_format else ["provider"]
    lines = [
        device_line(selected),
        "",
        f"Time relative to the frozen layer ({chosen['phase']}, d_in x d_out = {chosen['d_in']} x "
        f"{chosen['d_out']}{rank_text}; lower is better, 1.00 = the frozen layer alone):",
        "",
        "| " + " | ".join(head + [f"M={m}" for m in ms]) + " |",
        "|" + "---|" * (len(head) + len(ms)),
    ]
    for line in sorted(cells, key=lambda k: _sort_key(order(k))):
        first = [labels[line], line[0] or ""] if show_format else [labels[line]]
        lines.append("| " + " | ".join(first + [_fmt_ratio(cells[line].get(m)) for m in ms]) + " |")
    if frozen_ms:
        first = ["_frozen, ms_", ""] if show_format else ["_frozen, ms_"]
        lines.append("| " + " | ".join(first + [_fmt_ms(frozen_ms.get(m)) for m in ms]) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ drawing
class MatplotlibMissingError(RuntimeError):
    """matplotlib cannot be imported: the figures cannot be drawn (the tables can)."""


def _pyplot():
    """matplotlib.pyplot on the Agg backend, with a clear message when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError as e:
        raise MatplotlibMissingError(
            "bench.plots needs matplotlib to draw figures: pip install matplotlib (or pip install -e '.[bench]'; "
            "`make install` includes it); the result rows and markdown_table work without it"
        ) from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(plt, n: int, width: float = 5.0, height: float = 3.6, max_cols: int = 3):
    """``n`` panels on the fewest rows, then the fewest empty slots (4 panels: 2 x 2, not 3 + 1); the empty
    slots are hidden."""
    nrows = max(1, math.ceil(n / max_cols))
    cols = max(1, math.ceil(n / nrows))
    fig, axes = plt.subplots(
        nrows, cols, figsize=(width * cols, height * nrows + 1.2), squeeze=False, layout="constrained"
    )
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(plt, fig, axes, title: str, rows: Sequence[Row], path: Path) -> Path:
    """Title (with the device), one legend for all panels (each provider with what it is), the run and
    versions as a footer; saves and closes."""
    handles: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        labels = [textwrap.fill(label, 44, subsequent_indent="  ") for label in handles]
        fig.legend(handles.values(), labels, loc="outside right center", fontsize=8, frameon=False)
    device = _first(rows, "device")
    fig.suptitle(title + (f"\n{device}" if device else ""), fontsize=12)
    # The footer is a figure x label, so the layout keeps room for it; wrapped to the figure's width.
    chars = max(40, int(fig.get_figwidth() * 15))
    fig.supxlabel(textwrap.fill(device_line(rows), chars), fontsize=8, color="0.35")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _m_ticks(ax, ms: Iterable[float]) -> None:
    """Ticks at the measured token counts (at most about eight of them), written as plain numbers."""
    ms = sorted(set(ms))
    step = max(1, math.ceil(len(ms) / 8))
    ax.set_xticks(ms[::step])
    ax.set_xticklabels([f"{m:g}" for m in ms[::step]], fontsize=8)
    ax.minorticks_off()


def _styles(variants: Sequence[tuple]) -> dict[tuple, dict[str, Any]]:
    """A colour per provider, a line style and marker per variant of that provider."""
    colours = [f"C{i}" for i in range(10)]
    markers, dashes = "osD^v<>", ["-", "--", "-.", ":"]
    providers = sorted({v[0] for v in variants}, key=lambda p: (p != BASE_PROVIDER, p))
    seen: Counter = Counter()
    styles = {}
    for v in sorted(variants, key=_variant_order):
        k = seen[v[0]]
        seen[v[0]] += 1
        styles[v] = {
            "color": colours[providers.index(v[0]) % len(colours)],
            "marker": markers[k % len(markers)],
            "linestyle": dashes[k % len(dashes)],
        }
    return styles


def _panel_title(key: tuple, show: tuple[bool, ...]) -> str:
    """``ttlora, 4096 x 4096, bfloat16, dropout 0.1`` with only the parts that differ between panels (and
    the dropout where there is one)."""
    fmt, d_in, d_out, dtype, dropout = key
    parts = [
        str(fmt) if show[0] else "",
        f"{d_in} x {d_out}",
        str(dtype) if show[1] else "",
        f"dropout {dropout:g}" if dropout else "",
    ]
    return ", ".join(p for p in parts if p)


def _ranks_text(rows: Iterable[Row]) -> str:
    ranks = sorted(
        {int(r["rank"]) for r in rows if _num(r.get("rank")) is not None and r.get("provider") != BASE_PROVIDER}
    )
    return f"rank {'/'.join(map(str, ranks))}" if ranks else ""


def plot_layer_time_ratio(rows: Sequence[Row], path: Path, phase: str = MAIN_PHASE) -> Path | None:
    """Time over the frozen layer's against M (log axis): a line per provider, a panel per adapter format,
    shape and dtype. None (nothing written) when no row has a ratio and a token count."""
    rows = with_ratios(_filter(rows, preset="layer", phase=phase))
    rows = [r for r in rows if _num(r.get("ratio_to_base")) is not None and (_num(r.get("M")) or 0) > 0]
    if not rows:
        return None
    plt = _pyplot()
    formats = _format_order(rows)
    panels: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        panels[(r.get("format"), r.get("d_in"), r.get("d_out"), r.get("dtype"), _dropout(r))].append(r)
    # a panel with the frozen layer alone would be empty (it is the reference line): left out
    keys = [k for k in panels if any(variant(r)[0] != BASE_PROVIDER for r in panels[k])]
    if not keys:
        return None
    keys.sort(key=lambda k: (formats.index(k[0]), k[4], _sort_key(k[1:4])))
    show = (len({k[0] for k in keys}) > 1, len({k[3] for k in keys}) > 1)
    # the frozen layer is the dashed reference line at 1, not a line of its own
    labels = {v: _legend_label(text, v[0]) for v, text in variant_labels(variant(r) for r in rows).items()}
    styles = _styles(list(labels))
    fig, axes = _grid(plt, len(keys))
    for ax, key in zip(axes, keys):
        lines: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
        for r in panels[key]:
            if variant(r)[0] != BASE_PROVIDER:
                lines[variant(r)].append((float(r["M"]), float(r["ratio_to_base"])))
        for v in sorted(lines, key=_variant_order):
            xs, ys = zip(*sorted(lines[v]))
            ax.plot(xs, ys, label=labels[v], linewidth=1.6, markersize=4, **styles[v])
        _ratio_axes(ax, [y for pts in lines.values() for _, y in pts])
        _m_ticks(ax, (float(r["M"]) for r in panels[key]))
        ax.set_title(_panel_title(key, show), fontsize=10)
        ax.set_xlabel("tokens M")
        ax.set_ylabel("time / frozen layer (lower is better)")
    dtypes = "/".join(sorted({str(k[3]) for k in keys if k[3]}))
    details = ", ".join(p for p in (dtypes, _ranks_text(rows)) if p)
    what = f"Adapted layer time relative to the frozen layer, {phase}" + (f", {details}" if details else "")
    return _finish(plt, fig, axes, _title(what, rows), rows, path)


REFERENCE_TIME = "1 = frozen nn.Linear alone (no adapter)"
REFERENCE_SAVED = "1 = the bytes of x (what the frozen layer keeps)"


def _ratio_axes(ax, ratios: Sequence[float]) -> None:
    """Log-2 x axis; a linear y axis from 0, or a log one when the ratios span more than 20x; a labelled
    dashed line at 1 (the frozen layer)."""
    ax.set_xscale("log", base=2)
    positive = [y for y in ratios if y > 0]
    if positive and max(positive) / min(positive) > 20:
        ax.set_yscale("log")
    else:
        ax.set_ylim(bottom=0, top=max([1.1, *ratios]) * 1.08)
    ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label=REFERENCE_TIME)
    ax.grid(True, alpha=0.3)


def _bars(
    ax, groups: Sequence[Any], values: dict[tuple, dict[Any, float]], labels, styles, *, values_fmt: str = ""
) -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per variant in ``values`` (variants without a
    value in any group get no bar and no legend entry); ``values_fmt`` writes each value above its bar."""
    variants = [v for v in sorted(values, key=_variant_order) if any(g in values[v] for g in groups)]
    width = 0.8 / max(1, len(variants))
    for i, v in enumerate(variants):
        xs = [g + (i - (len(variants) - 1) / 2) * width for g in range(len(groups))]
        ys = [values[v].get(group, math.nan) for group in groups]
        hatch = "//" if styles[v]["linestyle"] != "-" else None
        bars = ax.bar(xs, ys, width=width, label=labels[v], color=styles[v]["color"], hatch=hatch, edgecolor="white")
        if values_fmt:
            texts = [values_fmt.format(y) if y == y else "" for y in ys]
            ax.bar_label(bars, labels=texts, fontsize=6, padding=2, rotation=90)
    if values_fmt:
        ax.margins(y=0.15)  # room for the values above the tallest bar
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels([_group_label(g) for g in groups], fontsize=8)
    ax.grid(True, axis="y", alpha=0.3)


def _group_label(group: Any) -> str:
    """``(format, d_in, d_out[, dropout])`` as ``ttlora\\n4096 x 4096[\\ndropout 0.1]`` (the format left out
    when None); else str()."""
    if isinstance(group, tuple) and len(group) in (3, 4):
        fmt, d_in, d_out = group[:3]
        dropout = group[3] if len(group) == 4 else 0.0
        return (f"{fmt}\n" if fmt else "") + f"{d_in} x {d_out}" + (f"\ndropout {dropout:g}" if dropout else "")
    return str(group)


def _median(values: Sequence[float]) -> float:
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def memory_values(rows: Sequence[Row]) -> tuple[dict, dict]:
    """``(saved, peak)``: per variant and group ``(format, d_in, d_out, dropout)``, the median saved-bytes ratio to
    x over all M and phases, and the peak memory in MiB at the largest M (forward + backward where
    measured)."""
    saved: dict[tuple, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    peak_rows: dict[tuple, dict[tuple, Row]] = defaultdict(dict)
    for r in _filter(rows, preset="layer"):
        shape = (r.get("format"), r.get("d_in"), r.get("d_out"), _dropout(r))
        ratio = _num(r.get("saved_ratio_to_x"))
        if ratio is not None:
            saved[variant(r)][shape].append(ratio)
        if _num(r.get("peak_mem_bytes")) is not None:
            best = peak_rows[variant(r)].get(shape)
            rank_of = lambda x: (x.get("phase") == MAIN_PHASE, _num(x.get("M")) or 0)
            if best is None or rank_of(r) > rank_of(best):
                peak_rows[variant(r)][shape] = r
    saved_med = {v: {s: _median(xs) for s, xs in by.items()} for v, by in saved.items()}
    peak = {v: {s: r["peak_mem_bytes"] / 2**20 for s, r in by.items()} for v, by in peak_rows.items()}
    return saved_med, peak


def plot_layer_memory(rows: Sequence[Row], path: Path) -> Path | None:
    """Bars of the saved-bytes ratio to x per provider and shape, and of peak memory where measured. None
    when no layer row has either."""
    rows = _filter(rows, preset="layer")
    saved, peak = memory_values(rows)
    if not saved and not peak:
        return None
    plt = _pyplot()
    labels = {v: _legend_label(text, v[0]) for v, text in variant_labels(list(saved) + list(peak)).items()}
    styles = _styles(list(labels))
    panels = [p for p in (saved, peak) if p]
    n_shapes = len({s for p in panels for by in p.values() for s in by})
    width = min(12.0, max(7.5, 0.35 * n_shapes * len(labels)))
    fig, axes = _grid(plt, len(panels), width=width, height=4.0, max_cols=2)
    for ax, values in zip(axes, panels):
        formats = _format_order({"format": g[0]} for by in values.values() for g in by)
        shapes = sorted({s for by in values.values() for s in by}, key=lambda g: (formats.index(g[0]), _sort_key(g)))
        ax.set_xlabel("adapter format, layer d_in x d_out")
        if values is saved:
            # the frozen layer saves x alone: the reference line, not a bar
            values = {v: by for v, by in values.items() if v[0] != BASE_PROVIDER}
            _bars(ax, shapes, values, labels, styles, values_fmt="{:.2f}")
            ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1, label=REFERENCE_SAVED)
            ax.set_ylabel("saved bytes per token / bytes of x\n(lower is better)")
            ax.set_title("Activation memory saved for backward", fontsize=10)
        else:
            _bars(ax, shapes, values, labels, styles)
            ax.set_ylabel("peak memory, MiB (lower is better)")
            largest = max((_num(r.get("M")) or 0) for r in rows if _num(r.get("peak_mem_bytes")) is not None)
            ax.set_title(f"Peak memory, forward + backward (largest M = {largest:.0f})", fontsize=10)
    dtypes = "/".join(sorted({str(r["dtype"]) for r in rows if r.get("dtype")}))
    details = ", ".join(p for p in (dtypes, _ranks_text(rows)) if p)
    what = "Adapted layer memory" + (f", {details}" if details else "")
    return _finish(plt, fig, axes, _title(what, rows), rows, path)


def model_values(rows: Sequence[Row]) -> tuple[list[str], dict, dict]:
    """``(groups, tokens_per_s, peak_mib)`` of the model rows: per variant and group (the config, with its
    token count when a config was run at several), the best tokens/s and the peak memory in MiB of the
    training step."""
    rows = _filter(rows, preset="model")
    token_counts = defaultdict(set)
    for r in rows:
        token_counts[str(r.get("config") or "?")].add(r.get("M"))
    groups: list[str] = []
    tps: dict[tuple, dict[str, float]] = defaultdict(dict)
    peak: dict[tuple, dict[str, float]] = defaultdict(dict)
    for r in rows:
        config = str(r.get("config") or "?")
        group = config if len(token_counts[config]) == 1 else f"{config}\nM={r.get('M')}"
        if group not in groups:
            groups.append(group)
        v = variant(r)
        t, p = _num(r.get("tokens_per_s")), _num(r.get("peak_mem_bytes"))
        if t is not None:
            tps[v][group] = max(t, tps[v].get(group, 0.0))
        if p is not None:
            peak[v][group] = p / 2**20
    return groups, dict(tps), dict(peak)


def plot_model(rows: Sequence[Row], path: Path) -> Path | None:
    """Bars of tokens/s and peak memory per provider and model config. None when no model row has either."""
    rows = _filter(rows, preset="model")
    configs, tps, peak = model_values(rows)
    if not tps and not peak:
        return None
    plt = _pyplot()
    labels = {v: _legend_label(text, v[0]) for v, text in variant_labels(list(tps) + list(peak)).items()}
    styles = _styles(list(labels))
    panels = [
        (values, name, better)
        for values, name, better in ((tps, "tokens/s", "higher"), (peak, "peak memory, MiB", "lower"))
        if values
    ]
    width = min(12.0, max(7.5, 0.35 * len(configs) * len(labels)))
    fig, axes = _grid(plt, len(panels), width=width, max_cols=2)
    for ax, (values, name, better) in zip(axes, panels):
        _bars(ax, [c for c in configs if any(c in by for by in values.values())], values, labels, styles)
        ax.set_ylabel(f"{name} ({better} is better)")
        ax.set_xlabel("model config")
        ax.set_title(f"Training step: {name}", fontsize=10)
    dtypes = "/".join(sorted({str(r["dtype"]) for r in rows if r.get("dtype")}))
    layers = sorted({int(r["layers"]) for r in rows if _num(r.get("layers")) is not None})
    tokens = sorted({int(r["M"]) for r in rows if _num(r.get("M")) is not None})
    details = [dtypes, _ranks_text(rows)]
    details += [f"{'/'.join(map(str, layers))} decoder layers" if layers else ""]
    details += [f"{'/'.join(map(str, tokens))} tokens a step" if tokens else ""]
    what = "Model training step" + "".join(f", {d}" for d in details if d)
    return _finish(plt, fig, axes, _title(what, rows), rows, path)


# ------------------------------------------------------------------------------------------ convergence
CONVERGENCE_LR = 1e-3


def _adapter_style(row: Row) -> dict[str, Any]:
    colour = {"lora": "C0", "ttlora": "C1", "metatt": "C2"}.get(str(row.get("format")), "C7")
    if row.get("scaling_rule") == 1:
        return {"color": colour, "linestyle": ":", "marker": "x"}
    if row.get("core_lr"):
        return {"color": colour, "linestyle": "-.", "marker": "D"}
    budget = row.get("rank") != 8  # the parameter-budget runs beside the r 8 ones
    return {"color": colour, "linestyle": "--" if budget else "-", "marker": "s" if budget else "o"}


def plot_convergence(rows: Sequence[Row], path: Path) -> Path | None:
    """Three panels per task (module docstring). None when there is no convergence row with losses."""
    rows = [r for r in _filter(rows, preset="convergence") if _num(r.get("final_eval_loss")) is not None]
    tasks = sorted({str(r.get("task")) for r in rows})
    if not tasks:
        return None
    plt = _pyplot()
    fig, axes = _grid(plt, 3 * len(tasks), width=4.6, max_cols=3)
    for i, task in enumerate(tasks):
        mine = [r for r in rows if str(r.get("task")) == task]
        curves, by_lr, budget = axes[3 * i : 3 * i + 3]
        for r in mine:
            if r.get("lr") == CONVERGENCE_LR and isinstance(r.get("eval_losses"), list):
                steps, losses = zip(*r["eval_losses"])
                curves.plot(steps, losses, label=r.get("provider"), markersize=3, **_adapter_style(r))
        curves.set_yscale("log")
        curves.set_xlabel("step")
        curves.set_ylabel("eval loss")
        curves.set_title(f"{task}: eval loss, lr {CONVERGENCE_LR:g}", fontsize=10)
        lines: dict[str, list] = defaultdict(list)
        for r in mine:
            if r.get("rank") == 8 and r.get("scaling_rule") != 1:
                lines[str(r.get("provider"))].append((r["lr"], r["final_eval_loss"], r))
        for label, pts in lines.items():
            pts.sort(key=lambda p: p[0])
            by_lr.plot([p[0] for p in pts], [p[1] for p in pts], label=label, **_adapter_style(pts[0][2]))
        by_lr.set_xscale("log")
        by_lr.set_yscale("log")
        by_lr.set_xlabel("learning rate")
        by_lr.set_ylabel("final eval loss")
        by_lr.set_title(f"{task}: r 8, alpha 16, by learning rate", fontsize=10)
        for r in mine:
            if r.get("lr") == CONVERGENCE_LR and _num(r.get("params")):
                style = _adapter_style(r)
                budget.scatter(r["params"], r["final_eval_loss"], color=style["color"], marker=style["marker"],
                               label=r.get("provider"))  # fmt: skip
                budget.annotate(f"r{r.get('rank')}", (r["params"], r["final_eval_loss"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")  # fmt: skip
        budget.set_xscale("log")
        budget.set_yscale("log")
        budget.set_xlabel("trainable parameters")
        budget.set_ylabel("final eval loss")
        budget.set_title(f"{task}: final loss vs parameters, lr {CONVERGENCE_LR:g}", fontsize=10)
    title = "Fine-tuning all-MiniLM-L6-v2: q/k/v adapters, same steps, same data"
    return _finish(plt, fig, axes, _title(title, rows), rows, path)


def convergence_table(rows: Sequence[Row], run: str | None = None) -> str:
    """Markdown: per task and adapter, params, alpha, lr, untrained and final eval loss, ratio to LoRA r 8."""
    rows = _filter(rows, preset="convergence")
    lines = [
        f"Run `{run or _first(rows, 'run')}`: {device_line(rows)}.",
        "",
        "| task | adapter | params | alpha | lr | eval loss, untrained | eval loss, final | / LoRA r8 |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ratio = _num(r.get("ratio_to_lora"))
        lines.append(
            f"| {r.get('task')} | {r.get('provider')} | {r.get('params', 0):,} | {r.get('alpha', 0):g} | "
            f"{r.get('lr', 0):g} | {r.get('untrained_eval_loss', 0):.4f} | {r.get('final_eval_loss', 0):.4f} | "
            f"{_fmt_ratio(ratio)} |"
        )
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ command line
def _selections(rows: Sequence[Row], run: str | None, device_type: str | None) -> list[tuple[str, dict]]:
    """Per device type: ``{"layer": (run id, rows), "model": (run id, rows)}``, the newest run per preset
    unless ``run`` is given."""
    out = []
    for dt in [device_type] if device_type else device_types(rows):
        chosen = {}
        for preset in ("layer", "model", "convergence"):
            run_id = run or latest_run(rows, device_type=dt, preset=preset)
            chosen[preset] = (run_id, run_rows(rows, run_id, device_type=dt, preset=preset))
        out.append((dt, chosen))
    return out


def write_tables(rows: Sequence[Row], out: Path, run: str | None = None, device_type: str | None = None) -> list[Path]:
    """``layer-table-<device_type>.md`` (see :func:`markdown_table`) for each device type with layer rows."""
    written = []
    for dt, chosen in _selections(rows, run, device_type):
        run_id, layer = chosen["layer"]
        if layer:
            path = out / f"layer-table-{dt}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(markdown_table(layer, run_id, device_type=dt))
            written.append(path)
        run_id, conv = chosen["convergence"]
        if conv:
            path = out / f"convergence-table-{dt}.md"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(convergence_table(conv, run_id))
            written.append(path)
    return written


def draw_all(rows: Sequence[Row], out: Path, run: str | None = None, device_type: str | None = None) -> list[Path]:
    """Every figure for each device type (from the newest run per preset, or from ``run``); the files
    written. Raises RuntimeError when matplotlib is missing and there is something to draw."""
    written: list[Path] = []
    for dt, chosen in _selections(rows, run, device_type):
        layer, model = chosen["layer"][1], chosen["model"][1]
        for path in (
            plot_layer_time_ratio(layer, out / f"layer-time-ratio-{dt}.png"),
            plot_layer_memory(layer, out / f"layer-memory-{dt}.png"),
            plot_model(model, out / f"model-{dt}.png"),
            plot_convergence(chosen["convergence"][1], out / f"convergence-{dt}.png"),
        ):
            if path is not None:
                written.append(path)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n")[0])
    add_results_args(parser)
    parser.add_argument("--out", type=Path, default=None, help="folder for the files (default: plots/ beside the rows)")
    parser.add_argument("--run", default=None, help="draw this run id (default: the newest run per preset)")
    parser.add_argument("--device-type", default=None, help="only this device type (cpu, cuda)")
    parser.add_argument("--no-figures", action="store_true", help="write the tables only (needs no matplotlib)")
    args = parser.parse_args(argv)
    results = results_file(args)
    out = args.out if args.out is not None else results.parent / "plots"
    rows = read_rows(results)
    if not rows:
        print(f"no result rows in {results} (python -m bench --quick writes some)", file=sys.stderr)
        return 1
    if args.run and not any(str(r.get("run")) == args.run for r in rows):
        print(f"run {args.run!r} not found in {results}", file=sys.stderr)
        return 1
    written = write_tables(rows, out, run=args.run, device_type=args.device_type)
    status = 0
    try:
        if not args.no_figures:
            written += draw_all(rows, out, run=args.run, device_type=args.device_type)
    except MatplotlibMissingError as e:
        # the table is the result; the figures are a convenience that a user's own environment may lack
        print(f"figures not drawn: {e}; then run this command again", file=sys.stderr)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        status = 1
    print(f"from {results}:")
    for path in written:
        print(path)
    if not written:
        print("nothing to draw: no layer, model or convergence rows", file=sys.stderr)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
