"""Per-call cost of the op registration: how much the dispatcher and the Python wrapper add.

Times tiny problems (one token, d = 64, r = 4), where the arithmetic is negligible and what is left is
per-call overhead, for the same forward computed five ways, and forward + backward for TTLinear beside
nn.Linear. Prints a table and writes a JSON row to the results folder (bench/out/, git-ignored, unless --out) with the device and versions.

    python -m bench.overhead [--device cpu|cuda] [--reps 2000]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import ttkernels as tk
from ttkernels import reference as ref

from .harness import results_dir


def _time_us(fn, reps: int, device: torch.device) -> float:
    for _ in range(max(reps // 10, 10)):
        fn()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples = []
    for _ in range(11):
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        samples.append((time.perf_counter() - t0) / reps * 1e6)
    return statistics.median(samples)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="per-call overhead of the ttkernels ops")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=1000)
    parser.add_argument("--out", default=None, help="folder for the row (default: bench/out/, git-ignored)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    d, r, M = 64, 4, 1
    layer = tk.TTLinear(d, d, ranks=r, device=device)
    with torch.no_grad():
        layer.cores[-1].normal_()
    lin = torch.nn.Linear(d, d, device=device)
    x = torch.randn(M, d, device=device)
    xg = x.clone().requires_grad_()
    A, C, B = ref.factors(list(layer.cores), layer.spec)
    A, B = A.detach(), B.detach()
    W, b = layer.weight, layer.bias

    def direct():
        S, U = ref.shrink(x, A, C, None, 0.0, 0)
        return ref.expand(x, W, b, U, B, 1.0)

    def fwd_bwd(module):
        def run():
            module(xg).sum().backward()

        return run

    with torch.no_grad():
        rows = {
            "reference functions, no dispatcher": _time_us(direct, args.reps, device),
            "torch.ops.ttkernels.tt_adapter_fwd": _time_us(
                lambda: torch.ops.ttkernels.tt_adapter_fwd(x, W, b, A, C, B, None, 1.0, 0.0, None, "torch"),
                args.reps,
                device,
            ),
            "tt_adapter (checks + op)": _time_us(lambda: tk.tt_adapter(x, W, b, A, C, B), args.reps, device),
            "TTLinear forward (factors + checks + op)": _time_us(lambda: layer(x), args.reps, device),
            "nn.Linear forward": _time_us(lambda: lin(x), args.reps, device),
        }
    rows["TTLinear forward+backward"] = _time_us(fwd_bwd(layer), args.reps // 2, device)
    rows["nn.Linear forward+backward"] = _time_us(fwd_bwd(lin), args.reps // 2, device)

    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    print(f"per-call time, M={M}, d={d}, r={r}, float32, {name}, torch {torch.__version__}")
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"  {k:<{width}}  {v:8.1f} us")
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
        "us_per_call": rows,
    }
    path = out / f"overhead-{device.type}.jsonl"
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
