"""Per-call cost of the op registration: how much the dispatcher and the Python wrapper add.

Times tiny problems (one token, d = 64, r = 4, one CPU thread by default), where the arithmetic is negligible and
what is left is per-call overhead: the op layers alone, then forward (no grad) and forward + backward of
nn.Linear, PEFT's LoRA layer and TTLinear (LoRA-shaped, and with 2 + 2 modes; where the C++ lean node
ttkernels._lean is built, also on its Python twin, rows marked "(Python node)"), with each path's ratio to PEFT's
LoRA. Forward + backward is timed twice: as a loop of calls (gradients accumulate, the parameters do not change),
and as a training step pays it ("step": before each call the gradients are set to None and the trainable
parameters' in-place versions bumped, as zero_grad and an optimizer step leave them, so whatever a layer keeps
per version of its parameters is rebuilt every call). Paths are timed interleaved (each round times every path, in a rotated order; medians over rounds), so a
loaded machine slows them alike; on the CPU the clock is the thread's CPU time (time.thread_time), which leaves
out time the scheduler gives to other processes. Prints a table and writes a JSON row to the results folder (bench/out/, git-ignored, unless --out) with the device and versions.

    python -m bench.overhead [--device cpu|cuda] [--reps 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

import ttkernels as tk
from ttkernels import lean
from ttkernels import reference as ref

from .harness import interleaved_us, results_dir, versions


class _Holder(torch.nn.Module):
    def __init__(self, d: int, device: torch.device) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(d, d, device=device)


def peft_lora_layer(d: int, r: int, device: torch.device) -> torch.nn.Module | None:
    """PEFT's LoRA layer on a ``d x d`` linear at rank ``r`` (B drawn, so the adapter computes), or None without
    peft."""
    try:
        import peft
    except ImportError:
        return None
    model = peft.get_peft_model(_Holder(d, device), peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    return layer


def layers(d: int, r: int, device: torch.device) -> dict[str, torch.nn.Module]:
    """The layers compared side by side: nn.Linear, PEFT's LoRA, TTLinear LoRA-shaped and with 2 + 2 modes."""
    out: dict[str, torch.nn.Module] = {"nn.Linear": torch.nn.Linear(d, d, device=device)}
    lora = peft_lora_layer(d, r, device)
    if lora is not None:
        out["PEFT LoRA"] = lora
    specs = [("TTLinear 1+1 (LoRA-shaped)", None), ("TTLinear 2+2", 2)]
    if lean.NATIVE is not None:  # the Python twin of the C++ lean node, side by side
        specs += [(f"{label} {PYTHON_NODE}", modes) for label, modes in specs]
    for label, modes in specs:
        layer = tk.TTLinear(d, d, ranks=r, in_modes=modes, out_modes=modes, device=device)
        with torch.no_grad():
            layer.cores[-1].normal_()
        out[label] = layer
    return out


PYTHON_NODE = "(Python node)"


def _python_node(run):
    """``run`` with the lean path's Python autograd.Function in place of the C++ node."""

    def wrapped():
        native = lean.NATIVE
        lean.NATIVE = None
        try:
            run()
        finally:
            lean.NATIVE = native

    return wrapped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="per-call overhead of the ttkernels ops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=200, help="calls per timed sample")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved samples per path")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=None, help="folder for the row (default: bench/out/, git-ignored)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    d, r, M = 64, 4, 1
    mods = layers(d, r, device)
    layer = mods["TTLinear 1+1 (LoRA-shaped)"]
    x = torch.randn(M, d, device=device)
    xg = x.clone().requires_grad_()
    A, C, B = ref.factors(list(layer.cores), layer.spec)
    A, B = A.detach(), B.detach()
    W, b = layer.weight, layer.bias

    def direct():
        S, U = ref.shrink(x, A, C, None, 0.0, 0)
        return ref.expand(x, W, b, U, B, 1.0)

    def fwd(module):
        def run():
            with torch.no_grad():
                module(x)

        return run

    def fwd_bwd(module):
        def run():
            module(xg).sum().backward()

        return run

    def step(module):
        """forward + backward as a training step pays it: the gradients set to None and the trainable
        parameters' in-place versions bumped before each call (what zero_grad and an optimizer step leave), so
        nothing built from the parameters is reused across calls."""
        params = [p for p in module.parameters() if p.requires_grad]
        bump = torch.autograd.graph.increment_version

        def run():
            for p in params:
                p.grad = None
            xg.grad = None
            bump(params)
            module(xg).sum().backward()

        return run

    ops_rows = {
        "reference functions, no dispatcher": direct,
        "torch.ops.ttkernels.tt_adapter_fwd": lambda: torch.ops.ttkernels.tt_adapter_fwd(
            x, W, b, A, C, B, None, 1.0, 0.0, None, "torch"
        ),
        "tt_adapter (checks + op)": lambda: tk.tt_adapter(x, W, b, A, C, B),
    }
    timed = {}
    for what, make in (("forward", fwd), ("forward+backward", fwd_bwd), ("step", step)):
        for k, m in mods.items():
            run = make(m)
            timed[f"{k} {what}"] = _python_node(run) if k.endswith(PYTHON_NODE) else run
    with torch.no_grad():
        rows = interleaved_us(ops_rows, args.reps, device, args.rounds)
    rows.update(interleaved_us(timed, args.reps, device, args.rounds))
    ratios = {}
    if "PEFT LoRA" in mods:
        for k in mods:
            for what in ("forward", "forward+backward", "step"):
                ratios[f"{k} {what}"] = rows[f"{k} {what}"] / rows[f"PEFT LoRA {what}"]

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    print(
        f"per-call time, M={M}, d={d}, r={r}, float32, {name}, {args.threads} thread(s), torch {torch.__version__}, "
        f"median of {args.rounds} interleaved samples of {args.reps} calls"
    )
    width = max(map(len, rows))
    print(f"  {'path':<{width}}  {'us/call':>8}  {'x PEFT LoRA':>11}")
    for k, v in rows.items():
        ratio = f"{ratios[k]:11.2f}" if k in ratios else " " * 11
        print(f"  {k:<{width}}  {v:8.1f}  {ratio}")
    out = results_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    row = {
        "bench": "overhead",
        "device": name,
        "dtype": "float32",
        "shape": {"M": M, "d_in": d, "d_out": d, "rank": r},
        "torch": torch.__version__,
        "python": platform.python_version(),
        "ttkernels": tk.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "threads": args.threads,
        "peft": versions()["peft"],
        "method": f"median of {args.rounds} interleaved samples of {args.reps} calls",
        "us_per_call": rows,
        "ratio_to_peft_lora": ratios,
        "lean_node": "C++ (ttkernels._lean)" if lean.NATIVE is not None else "Python (lean.LeanAdapter)",
    }
    path = out / f"overhead-{device.type}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
