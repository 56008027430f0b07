"""A short demo: a TT adapter learns a planted TT delta on random data.

Run with ``python -m ttkernels.demo``. Builds a ``TTLinear`` on a frozen random layer, trains only its
cores for a few AdamW steps toward a teacher whose weight differs by a random TT-structured delta-W,
and prints the adapter's parameter count beside LoRA's at the same rank, the falling loss, and which
backends run on this machine.
"""

from __future__ import annotations

import argparse
import time

import torch

import ttkernels as tk


def _backend_status(device: torch.device) -> dict[str, str]:
    status = {}
    for name in tk.BACKENDS:
        try:
            status[name] = tk.ops.resolve_backend(name, device).name
        except tk.BackendUnavailableError as err:
            status[name] = f"unavailable ({str(err).split(';')[0].split('. ')[0]})"
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--features", type=int, default=1024)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    d, r = args.features, args.rank
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layer = tk.TTLinear(d, d, in_modes=3, out_modes=3, ranks=r, dropout=0.0, device=device)
    teacher = tk.TTLinear(d, d, in_modes=3, out_modes=3, ranks=r, device=device)
    with torch.no_grad():
        teacher.weight.copy_(layer.weight)
        teacher.bias.copy_(layer.bias)
        for core in teacher.cores:
            core.normal_(0.0, core.shape[0] ** -0.5)

    spec = layer.spec
    print(f"ttkernels {tk.__version__} on {device} (torch {torch.__version__})")
    print(f"layer: Linear({d}, {d}) frozen, TT adapter {spec.describe()} ranks {spec.ranks}")
    print(f"trainable parameters: TT {spec.num_params:,}  vs  LoRA r={r} {spec.lora_params(r):,}")
    print(f"  ({spec.lora_params(r) / spec.num_params:.1f}x fewer than LoRA at the same rank)")
    print("backends: " + ", ".join(f"{k} -> {v}" for k, v in _backend_status(device).items()))

    x = torch.randn(args.tokens, d, device=device)
    with torch.no_grad():
        target = teacher(x)
    opt = torch.optim.AdamW(layer.cores.parameters(), lr=2e-2, weight_decay=0.0)
    first = last = None
    start = time.perf_counter()
    for step in range(args.steps):
        loss = torch.nn.functional.mse_loss(layer(x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        last = loss.item()
        first = last if first is None else first
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step:3d}  loss {last:.6f}")
    elapsed = time.perf_counter() - start
    print(f"loss {first:.6f} -> {last:.6f} in {args.steps} steps ({elapsed:.2f} s)")
    if not last < first:
        print("the loss did not fall")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
