"""``python -m bench``: measure ttkernels beside the alternatives and record the results.

    python -m bench --quick                       # CPU: torch backend, small shapes, a dropout case
    python -m bench --preset layer                # one adapted linear layer (GPU defaults)
    python -m bench --preset model                # decoder layers at LLaMA-7B dimensions, a training step
    python -m bench --preset micro --M 2048 8192  # each op alone
    python -m bench --preset layer --ranks 8 16 64 --formats lora ttlora metatt --dtypes bfloat16 float16
    python -m bench --preset convergence          # fine-tune the pretrained MiniLM: LoRA, TT-LoRA, MetaTT (CPU)

Every run measures its ceilings (a large copy, a large matmul) first, checks every provider against the
float64 formula before timing it, prints a table, and appends one JSON row per measurement to
``results.jsonl`` in the results folder (device, dtype, shape and versions in each row): ``bench/out/`` by
default (git-ignored, so a run leaves the checkout as it was), or ``--results-dir DIR``.
``python -m bench.plots`` draws the plots from those rows. ``all`` is the timing presets (micro, layer,
model); ``convergence`` measures losses, not time, and runs alone (see bench/convergence.py); its rows go to
the same results folder.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import ttkernels as tk

from . import harness, layer, micro

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def available_backends(device: torch.device) -> list[str]:
    """The concrete ttkernels backends that run on ``device`` (never 'auto', which picks one of them)."""
    out = []
    for name in tk.BACKENDS:
        if name == "auto":
            continue
        try:
            tk.ops.resolve_backend(name, device)
        except tk.BackendUnavailableError:
            continue
        out.append(name)
    return out


def _shape(text: str) -> tuple[int, int]:
    try:
        a, b = text.lower().split("x")
        return int(a), int(b)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a shape is D_INxD_OUT, e.g. 4096x11008; got {text!r}") from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=("micro", "layer", "model", "convergence", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="CPU run: small shapes, torch backend, a dropout case")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    ap.add_argument("--M", nargs="+", type=int, default=None, help="token counts")
    ap.add_argument("--shapes", nargs="+", type=_shape, default=None, help="D_INxD_OUT ...")
    ap.add_argument("--ranks", nargs="+", type=int, default=None)
    ap.add_argument("--formats", nargs="+", choices=("lora", "ttlora", "metatt"), default=None)
    ap.add_argument(
        "--dropout",
        nargs="+",
        type=float,
        default=None,
        help=f"adapter dropout of extra LoRA-shaped layer cases at the first shape (--quick: {layer.QUICK_DROPOUT}; "
        "otherwise none); 0 for none",
    )
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per measurement")
    ap.add_argument("--max-seconds", type=float, default=None, help="time budget per measurement")
    harness.add_results_args(ap)
    ap.add_argument("--no-save", action="store_true", help="print only; write no rows")
    ap.add_argument("--progress", action="store_true", help="progress bar even when stderr is not a terminal")
    ap.add_argument("--tasks", nargs="+", choices=("sentiment", "topic"), default=None, help="convergence tasks")
    args = ap.parse_args(argv)
    for name in ("M", "ranks"):
        values = getattr(args, name)
        if values is not None and any(v < (0 if name == "M" else 1) for v in values):
            ap.error(f"--{name} values must be >= {0 if name == 'M' else 1}")
    if args.dropout is not None and any(not 0.0 <= p < 1.0 for p in args.dropout):
        ap.error("--dropout values must be in [0, 1)")
    return args


def plan(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The grid of this run: explicit flags win, then --quick's small grid, then the GPU defaults."""
    quick = args.quick
    if quick:
        defaults = dict(
            M=layer.QUICK_M, shapes=layer.QUICK_SHAPES[:2], ranks=(8,), formats=("lora", "ttlora", "metatt")
        )
        dtypes = (torch.float32,)
        dropouts = (layer.QUICK_DROPOUT,)
        reps, max_s = 5, 0.05
    else:
        # The default GPU grid fits the 8-minute GPU script; the full grid of ranks, formats and dtypes is a
        # flag away.
        defaults = dict(M=layer.FULL_M, shapes=layer.FULL_SHAPES, ranks=(16,), formats=("lora", "ttlora", "metatt"))
        dtypes = (torch.bfloat16,) if device.type == "cuda" else (torch.float32,)
        dropouts = ()
        reps, max_s = 30, 0.5
    return {
        "M": tuple(args.M or defaults["M"]),
        "shapes": tuple(args.shapes or defaults["shapes"]),
        "ranks": tuple(args.ranks or defaults["ranks"]),
        "formats": tuple(args.formats or defaults["formats"]),
        "dtypes": tuple(DTYPES[d] for d in args.dtypes) if args.dtypes else dtypes,
        "dropouts": tuple(p for p in (dropouts if args.dropout is None else args.dropout) if p > 0),
        "reps": args.reps or reps,
        "max_seconds": args.max_seconds or max_s,
    }


def layer_configs(g: dict[str, Any]) -> list[layer.LayerConfig]:
    """LoRA-shaped at every shape; the TT formats at the first shape (where the targets are stated); with
    dropout, LoRA-shaped at the first shape."""
    cfgs = layer.configs(g["M"], g["shapes"][:1], g["ranks"], g["formats"], g["dtypes"])
    if "lora" in g["formats"] and len(g["shapes"]) > 1:
        cfgs += layer.configs(g["M"], g["shapes"][1:], g["ranks"], ("lora",), g["dtypes"])
    for p in g.get("dropouts", ()):
        cfgs += layer.configs(g["M"], g["shapes"][:1], g["ranks"], ("lora",), g["dtypes"], dropout=p)
    return cfgs


def run_convergence(args: argparse.Namespace) -> int:
    """The convergence preset: training losses on the CPU, rows and the targets' verdicts."""
    from . import convergence

    env = harness.run_env(torch.device("cpu"), args.quick, "ttkernels bench convergence")
    tasks = len(args.tasks or ([0] if args.quick else convergence.TASKS))
    progress = harness.Progress(len(convergence.runs(args.quick)) * tasks, "convergence", force=args.progress)
    rows: list = []
    interrupted = False
    try:
        convergence.run_convergence(env, quick=args.quick, tasks=args.tasks, progress=progress, rows=rows)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: reporting and saving the runs finished so far", file=sys.stderr)
    convergence.add_lora_ratios(rows)
    print("\n== convergence: eval loss after the same steps, pretrained MiniLM (CPU, float32) ==")
    print(harness.table(rows, convergence.COLUMNS))
    for line in convergence.targets_report(rows):
        print("target:", line)
    if rows and not args.no_save:
        path = harness.append_rows(rows, harness.results_file(args))
        plots_cmd = "python -m bench.plots" + (f" --results {path}" if path != harness.RESULTS_FILE else "")
        print(f"\n{len(rows)} rows appended to {path} (run {env['run']}); plots: {plots_cmd}")
    return 130 if interrupted else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.preset == "convergence":
        return run_convergence(args)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.quick and device.type != "cpu":
        print("--quick runs on the CPU; ignoring --device", file=sys.stderr)
        device = torch.device("cpu")
    g = plan(args, device)
    backends = ["torch"] if args.quick else available_backends(device)
    presets = ("micro", "layer", "model") if args.preset == "all" else (args.preset,)
    env = harness.run_env(device, args.quick, "ttkernels bench")
    run_id = env["run"]
    if device.type == "cpu":
        print("CPU figures: these times say nothing about GPU speed; GPU figures need a GPU (bench/gpu.sh).")
    print(f"backends measured: {', '.join(backends)}")
    env["ceilings"] = {
        str(dt).removeprefix("torch."): harness.ceilings(device, dt, quick=args.quick) for dt in g["dtypes"]
    }
    for dt, c in env["ceilings"].items():
        print(f"ceilings ({dt}): copy {c['copy_gbps']:.1f} GB/s, matmul {c['matmul_tflops']:.2f} TFLOP/s")

    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    layer_cfgs = layer_configs(g)
    micro_cfgs = [
        c
        for c in layer_cfgs
        if c.fmt in ("lora", "metatt")
        and not c.dropout
        and c.d_in == g["shapes"][0][0]
        and c.d_out == g["shapes"][0][1]
    ]
    model_steps = 0
    if "model" in presets:
        from . import model as model_preset

        model_steps = model_preset.total_steps(args.quick)
    total = len(micro_cfgs) * ("micro" in presets) + len(layer_cfgs) * ("layer" in presets) + model_steps
    progress = harness.Progress(total, "bench", force=args.progress)

    def with_env(dt: torch.dtype) -> dict[str, Any]:
        return {**env, "ceilings": env["ceilings"][str(dt).removeprefix("torch.")]}

    interrupted = False
    runners = {"micro": (micro.run_config, micro_cfgs), "layer": (layer.run_config, layer_cfgs)}
    try:
        for preset in presets:
            if preset == "model":
                for dt in g["dtypes"]:
                    rows += model_preset.run_model(
                        device, dt, with_env(dt), quick=args.quick, rank=g["ranks"][0], progress=progress
                    )
                continue
            run_config, cfgs = runners[preset]
            for cfg in cfgs:  # rows are kept per configuration, so an interrupt loses at most one
                r, n = run_config(
                    cfg, device, with_env(cfg.dtype), backends, reps=g["reps"], max_seconds=g["max_seconds"]
                )
                rows += r
                notes += n
                progress.step(f"{preset} {cfg.fmt} {cfg.d_in}x{cfg.d_out} r{cfg.rank} M={cfg.M}")
    except KeyboardInterrupt:  # bench/gpu.sh stops a step at its time limit with SIGINT: keep what was measured
        interrupted = True
        print("\ninterrupted: reporting and saving the rows measured so far", file=sys.stderr)

    micro_rows = [r for r in rows if r["preset"] == "micro"]
    layer_rows = [r for r in rows if r["preset"] == "layer"]
    model_rows = [r for r in rows if r["preset"] == "model"]
    harness.add_ratios(micro_rows + layer_rows)  # against the frozen row of the same configuration
    harness.add_ratios(model_rows, fields=harness.MODEL_KEY)
    label = "CPU figures" if device.type == "cpu" else env["device"]
    if micro_rows:
        print(f"\n== micro: each op alone ({label}) ==")
        print(harness.table(micro_rows, micro.MICRO_COLUMNS))
    if layer_rows:
        print(f"\n== layer: one adapted linear layer, times in ms, x = ratio to the frozen layer ({label}) ==")
        print(harness.table(layer.wide(layer_rows), layer.WIDE_COLUMNS))
    if model_rows:
        print(f"\n== model: a training step ({label}) ==")
        cols = (
            "dtype",
            "config",
            "layers",
            "M",
            "rank",
            "provider",
            "base",
            "params",
            "adapter_bytes",
            "time_ms",
            "ratio_to_base",
            "tokens_per_s",
            "peak_mem_bytes",
            "saved_bytes_per_token",
        )
        print(harness.table(model_rows, cols))
    for note in notes:
        print("note:", note)
    if rows and not args.no_save:
        path = harness.append_rows(rows, harness.results_file(args))
        plots_cmd = "python -m bench.plots" + (f" --results {path}" if path != harness.RESULTS_FILE else "")
        print(f"\n{len(rows)} rows appended to {path} (run {run_id}); plots: {plots_cmd}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    raise SystemExit(main())
