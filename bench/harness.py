"""The measuring instrument: timing, ceilings, FLOP and byte counts, result rows, the terminal table.

Everything a preset needs to turn "run this function" into a result row that says what was measured, where
and with what software. Rows are plain dicts (see :func:`make_row`) appended as JSON lines to
``results.jsonl`` in the results folder (:func:`results_dir`); plots and tables are drawn from those rows.

Two folders: ``bench/out/`` (git-ignored) takes every run by default, so a benchmark never changes a file
of the repository; ``bench/results/`` holds the published rows and the figures the README shows, and is
written only when asked for (``--results-dir bench/results``, ``make publish-results``).

Timing (:func:`measure`): warm-up, then many repetitions; the median is reported. On CUDA each repetition is
timed with CUDA events and the L2 cache is flushed before it (a 256 MiB buffer is overwritten), so the cache
is not measured; on the CPU, ``time.perf_counter`` around each call. Callers rotate their inputs across
repetitions where the input itself could stay cached (:class:`Rotating`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

BENCH_DIR = Path(__file__).resolve().parent
LOCAL_DIR = BENCH_DIR / "out"  # git-ignored: where runs go by default
PUBLISHED_DIR = BENCH_DIR / "results"  # tracked: the rows and figures the README shows
RESULTS_DIR_ENV = "TTKERNELS_BENCH_RESULTS_DIR"
RESULTS_NAME = "results.jsonl"


def results_dir(explicit: str | os.PathLike | None = None, environ: dict[str, str] | None = None) -> Path:
    """The folder a run writes its rows and figures to: ``explicit`` (``--results-dir``), else the
    ``TTKERNELS_BENCH_RESULTS_DIR`` variable, else ``bench/out/`` (git-ignored)."""
    environ = os.environ if environ is None else environ
    chosen = explicit if explicit not in (None, "") else environ.get(RESULTS_DIR_ENV) or LOCAL_DIR
    return Path(chosen)


RESULTS_DIR = results_dir()
RESULTS_FILE = RESULTS_DIR / RESULTS_NAME


def add_results_args(ap: Any) -> None:
    """``--results-dir DIR`` and ``--results FILE`` on an argparse parser (see :func:`results_file`)."""
    ap.add_argument(
        "--results-dir",
        default=None,
        help=f"folder for the rows and figures (default: ${RESULTS_DIR_ENV}, else bench/out/, git-ignored; "
        "bench/results/ is the published folder the README shows)",
    )
    ap.add_argument("--results", default=None, help="the JSON-lines file itself (default: results.jsonl there)")


def results_file(args: Any) -> Path:
    """The rows file of parsed ``args`` (from :func:`add_results_args`): ``--results``, else
    ``results.jsonl`` in :func:`results_dir`."""
    return Path(args.results) if args.results else results_dir(args.results_dir) / RESULTS_NAME


# ------------------------------------------------------------------------------------------ device info


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU: {cpu} ({torch.get_num_threads()} threads)"


def versions() -> dict[str, str | None]:
    """Versions of everything that can change a timing."""

    def version_of(module: str) -> str | None:
        try:
            mod = __import__(module)
        except Exception:
            return None
        return getattr(mod, "__version__", None)

    import ttkernels

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": version_of("triton"),
        "peft": version_of("peft"),
        "transformers": version_of("transformers"),
        "ttkernels": ttkernels.__version__,
    }


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    median_ms: float
    min_ms: float
    reps: int

    @property
    def spread(self) -> float:
        return self.median_ms / self.min_ms if self.min_ms > 0 else math.inf


class Rotating:
    """Cycles through ``n`` copies of an input so that repetitions do not reuse a cached tensor."""

    def __init__(self, make: Callable[[], Any], n: int) -> None:
        self.items = [make() for _ in range(max(1, n))]
        self.i = 0

    def next(self) -> Any:
        item = self.items[self.i]
        self.i = (self.i + 1) % len(self.items)
        return item


_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    buf = _FLUSH.get(device)
    if buf is None:
        buf = _FLUSH[device] = torch.empty(256 * 2**20 // 4, dtype=torch.int32, device=device)
    buf.zero_()


def measure(
    fn: Callable[[], Any],
    device: torch.device,
    *,
    warmup: int = 5,
    reps: int = 30,
    max_seconds: float = 2.0,
    flush: bool = True,
    setup: Callable[[], Any] | None = None,
) -> Timing:
    """Median time of ``fn()`` in milliseconds. ``setup`` (not timed) runs before every call.

    Stops early after ``max_seconds`` of measuring (but after at least 3 repetitions).
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    samples: list[float] = []
    budget_end = time.perf_counter() + max_seconds
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(reps):
            if setup is not None:
                setup()
            if flush:
                _flush_l2(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
            if len(samples) >= 3 and time.perf_counter() > budget_end:
                break
    else:
        for _ in range(reps):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e3)
            if len(samples) >= 3 and time.perf_counter() > budget_end:
                break
    return Timing(statistics.median(samples), min(samples), len(samples))


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes allocated above the current level while ``fn()`` runs (CUDA only; None on the CPU)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def saved_bytes(fn: Callable[[], Any], exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the tensors autograd saves for backward while ``fn()`` runs, excluding ``exclude`` (by
    storage pointer: the parameters)."""
    ptrs = {t.data_ptr() for t in exclude}
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        if t.numel() and t.data_ptr() not in ptrs:
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def run_env(device: torch.device, quick: bool, label: str, suffix: str = "") -> dict[str, Any]:
    """A run's identity for :func:`make_row` (``run``, ``device``, ``versions``, ``quick``), printed as a header
    that starts with ``label``."""
    env: dict[str, Any] = {
        "run": time.strftime("%Y-%m-%dT%H:%M:%S") + f"-{device.type}{suffix}",
        "device": device_name(device),
        "versions": versions(),
        "quick": quick,
    }
    print(f"{label} {env['run']}: {env['device']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v))
    return env


def interleaved_us(fns: dict, reps: int, device: torch.device, rounds: int = 21) -> dict[str, float]:
    """Median microseconds per call of each function, timed side by side: every round times each function for
    ``reps`` calls in a rotated order, so that load on a shared machine falls on all of them alike."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # On the CPU: this thread's CPU time, so that time the scheduler gives to other processes is not counted.
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    names = list(fns)
    for name in names:
        for _ in range(max(reps // 10, 10)):
            fns[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:
            fn = fns[name]
            sync()
            t0 = clock()
            for _ in range(reps):
                fn()
            sync()
            samples[name].append((clock() - t0) / reps * 1e6)
    return {name: statistics.median(v) for name, v in samples.items()}


# ------------------------------------------------------------------------------------------ ceilings
def ceilings(device: torch.device, dtype: torch.dtype, quick: bool = False) -> dict[str, float]:
    """Measured on this device now: ``copy_gbps`` (a large copy, bytes read + written) and ``matmul_tflops``
    (a large square matmul in ``dtype``)."""
    if device.type == "cuda":
        n_copy, n_mm = 2**28, 8192
    else:
        n_copy, n_mm = (2**22, 512) if quick else (2**25, 2048)
    src = torch.empty(n_copy, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    t_copy = measure(lambda: dst.copy_(src), device, warmup=2, reps=10, flush=False)
    a = torch.randn(n_mm, n_mm, device=device, dtype=dtype)
    b = torch.randn(n_mm, n_mm, device=device, dtype=dtype)
    t_mm = measure(lambda: a @ b, device, warmup=2, reps=10, flush=False)
    return {
        "copy_gbps": 2 * n_copy / (t_copy.median_ms * 1e-3) / 1e9,
        "matmul_tflops": 2 * n_mm**3 / (t_mm.median_ms * 1e-3) / 1e12,
    }


# ------------------------------------------------------------------------------------------ arithmetic
PHASES = ("forward", "backward", "forward+backward")


def layer_flops(M: int, d_in: int, d_out: int, rank: int, phase: str, adapter: bool = True) -> int:
    """Useful FLOPs of one adapted linear layer with a frozen base, for ``phase``.

    Base: ``2 M d_in d_out`` forward; backward computes dX only (the weight is frozen): the same again.
    Adapter (docs/design.md section 3): ``2 M r (d_in + d_out)`` forward, twice that backward (dU and dB, dX's
    adapter term and dA), so ``6 M r (d_in + d_out)`` forward + backward. Token-independent factor work is
    not counted.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    base = 2 * M * d_in * d_out
    extra = 2 * M * rank * (d_in + d_out) if adapter else 0
    fwd, bwd = base + extra, base + 2 * extra
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[phase]


def layer_bytes(M: int, d_in: int, d_out: int, elem: int, phase: str) -> int:
    """The least memory traffic of the frozen layer for ``phase``: every operand read once, every result
    written once (x, W, y forward; dY, W, dX backward). The floor the adapter should add little to."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    fwd = (M * d_in + d_in * d_out + M * d_out) * elem
    bwd = (M * d_out + d_in * d_out + M * d_in) * elem
    return {"forward": fwd, "backward": bwd, "forward+backward": fwd + bwd}[phase]


def rate(amount: float, ms: float, unit: float) -> float | None:
    """``amount / seconds / unit`` (e.g. unit 1e12 for TFLOP/s); None for a zero or missing time."""
    if not ms or ms <= 0 or not math.isfinite(ms):
        return None
    return amount / (ms * 1e-3) / unit


LAYER_KEY = ("preset", "phase", "M", "d_in", "d_out", "rank", "format", "dropout", "dtype", "device")
MODEL_KEY = ("preset", "phase", "config", "layers", "M", "dtype", "device")


def add_ratios(rows: list[dict[str, Any]], base_provider: str = "frozen", fields: Sequence[str] = LAYER_KEY) -> None:
    """Set ``ratio_to_base`` on every row: its time over the time of the ``base_provider`` row that agrees on
    ``fields`` (the configuration); None where there is no such row."""
    base = {tuple(r.get(k) for k in fields): r["time_ms"] for r in rows if r["provider"] == base_provider}
    for row in rows:
        b = base.get(tuple(row.get(k) for k in fields))
        row["ratio_to_base"] = row["time_ms"] / b if b and row["time_ms"] is not None else None


def make_row(
    *,
    preset: str,
    provider: str,
    phase: str,
    device: torch.device,
    dtype: torch.dtype,
    timing: Timing | None,
    env: dict[str, Any],
    **fields: Any,
) -> dict[str, Any]:
    """One result. ``env`` is ``{"device": device_name, "versions": versions(), "ceilings": ..., "run": id}``.
    Extra ``fields``: M, d_in, d_out, rank, format, tflops, gbps, peak_mem_bytes, saved_bytes_per_token, ..."""
    return {
        "run": env["run"],
        "preset": preset,
        "provider": provider,
        "phase": phase,
        "device": env["device"],
        "device_type": device.type,
        "dtype": str(dtype).removeprefix("torch."),
        "time_ms": None if timing is None else timing.median_ms,
        "time_min_ms": None if timing is None else timing.min_ms,
        "reps": None if timing is None else timing.reps,
        **fields,
        "ceilings": env.get("ceilings"),
        "versions": env["versions"],
        "quick": env.get("quick", False),
    }


def append_rows(rows: Sequence[dict[str, Any]], path: Path = RESULTS_FILE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
    return path


def read_rows(path: Path = RESULTS_FILE) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open() as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------ output
def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain-text table of ``columns`` (missing values print as '-')."""
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


class Progress:
    """A one-line progress bar on stderr (only when it is a terminal, or when forced)."""

    def __init__(self, total: int, label: str = "", force: bool = False) -> None:
        self.total, self.done, self.label = max(total, 1), 0, label
        self.enabled = force or sys.stderr.isatty()

    def step(self, what: str = "") -> None:
        self.done += 1
        if not self.enabled:
            return
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r{self.label} [{bar:<30}] {self.done}/{self.total} {what[:50]:<50}")
        if self.done >= self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()
