"""Training steps of the model preset's providers side by side: frozen, PEFT's LoRA, MetaTT, factored MetaTT.

The providers and the step are :mod:`bench.model`'s (same model, targets, rank, AdamW step); here they are timed
interleaved in one run (every round times each provider for ``--reps`` steps, in a rotated order; medians over
rounds; on the CPU the thread's CPU time, with one thread by default), so that a loaded machine slows them alike,
and each is given as a ratio to PEFT's LoRA step. The correctness gate is :mod:`bench.model`'s, not repeated here.
Prints a table and appends a JSON row to the results folder (bench/out/, git-ignored, unless --out).

    python -m bench.step [--config tiny-gqa|tiny-mha|llama7b-gqa8|llama7b-mha] [--rank 8] [--rounds 9]
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
import warnings

import torch

import ttkernels as tk

from . import model as bm
from .harness import interleaved_us, results_dir, versions


def build_steps(config: str, rank: int, layers: int, batch: int, seq: int, device: torch.device) -> dict:
    """One training-step closure per provider, on copies of one frozen base model."""
    shape = bm.CONFIGS[config]
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    torch.manual_seed(bm.SEED)
    base = bm._build_base(shape, layers, seq, device, dtype)
    x = torch.randn(batch, seq, shape.hidden, device=device, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = {
            "frozen": base,
            "peft-lora": bm._attach_lora(base, rank)[0],
            "metatt": tk.get_metatt_model(
                copy.deepcopy(base), tk.MetaTTConfig(list(bm.TARGETS), rank=rank, alpha=rank)
            ),
            "metatt-factored": bm._attach_metatt_factored(base, rank)[0],
        }
    steps = {}
    for name, model in models.items():
        model.train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
        steps[name] = bm._make_step(model, x, opt)
    return steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="training steps of the model preset's providers, side by side")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--config", default="tiny-gqa", choices=sorted(bm.CONFIGS))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3, help="steps per timed sample")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved samples per provider")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--out", default=None, help="folder for the row (default: bench/out/, git-ignored)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    steps = build_steps(args.config, args.rank, args.layers, args.batch, args.seq, device)
    us = interleaved_us(steps, args.reps, device, args.rounds)
    ratios = {k: v / us["peft-lora"] for k, v in us.items()}
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    method = f"median of {args.rounds} interleaved samples of {args.reps} steps"
    print(
        f"training step, {args.config}, {args.layers} layers, batch {args.batch} x {args.seq}, rank {args.rank}, "
        f"{name}, {args.threads} thread(s), torch {torch.__version__}, {method}"
    )
    for k, v in us.items():
        print(f"  {k:<16}  {v / 1000:9.2f} ms  {ratios[k]:6.2f} x PEFT LoRA")
    out = results_dir(args.out)
    out.mkdir(parents=True, exist_ok=True)
    row = {
        "bench": "step",
        "device": name,
        "config": args.config,
        "shape": {"layers": args.layers, "batch": args.batch, "seq": args.seq, "rank": args.rank},
        "threads": args.threads,
        "torch": torch.__version__,
        **{k: v for k, v in versions().items() if k in ("peft", "transformers")},
        "python": platform.python_version(),
        "ttkernels": tk.__version__,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "method": method,
        "us_per_step": us,
        "ratio_to_peft_lora": ratios,
    }
    path = out / f"step-{device.type}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
