"""``python -m bench.ttm``: TT-matrix adapters, ``y = x dW^T``, every path side by side in one run.

    python -m bench.ttm                       # GPU: d = 4096 = 16 x 16 x 16 in and out, bond rank 8, bf16
    python -m bench.ttm --M 1024 8192 16384   # the token counts (the crossover with reconstruct-then-GEMM)
    python -m bench.ttm --quick               # CPU smoke run: d = 64 = 4 x 4 x 4, torch paths only

Providers (the adapter term only: no base layer, cores in float32 with gradients, x in the run's dtype):

* ``triton``: the fused Kronecker-sum kernels (``ttm_apply(backend="triton")``);
* ``cuda``: the CUDA C++ kernels of the same form, where the chain has a cut of bond rank <= 16 and sides
  <= 64 and the extension is built;
* ``dense``: reconstruct-then-GEMM (dW built from the cores, one GEMM);
* ``sweep``: the einsum sweep of the reference (``backend="torch"``);
* ``tltorch``: tensorly-torch's block-TT ``FactorizedLinear`` (``implementation="factorized"``, no bias) with
  the same cores, when tensorly-torch is importable (on a machine without an index, install it elsewhere with
  ``pip install --target build/tltorch tensorly-torch==0.5.0 tensorly`` and put that folder on PYTHONPATH).

Each provider's output is checked against the float64 sweep before it is timed. Rows (preset ``ttm``) go to
``results.jsonl`` of the results folder (``bench/out/`` unless ``--results-dir``) with the device, dtype, shape and versions; the table prints each time and its
ratios to ``tltorch`` and ``dense`` measured in this run, and the bytes saved for backward per token.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from typing import Any

import torch

from ttkernels.ttm import TTMSpec, ttm_apply

from . import harness

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROVIDERS = ("triton", "cuda", "dense", "sweep", "tltorch")


def tltorch_layer(spec: TTMSpec, cores: list[torch.Tensor], device: torch.device):
    """tensorly-torch's block-TT layer (factorized forward, no bias) holding ``cores`` (its layout is ours)."""
    import tltorch

    layer = tltorch.FactorizedLinear(
        in_tensorized_features=spec.in_modes,
        out_tensorized_features=spec.out_modes,
        bias=False,
        factorization="blocktt",
        rank=spec.bond_ranks,
        implementation="factorized",
        device=device,
    )
    with torch.no_grad():
        for f, c in zip(layer.weight.factors, cores):
            f.copy_(c)
    return layer


def _providers(spec, cores, device, wanted) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    out: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {}
    for name in wanted:
        if name == "tltorch":
            try:
                layer = tltorch_layer(spec, cores, device)
            except Exception as err:  # not installed here, or a version that does not take these arguments
                print(f"tltorch: not measured ({type(err).__name__}: {err})")
                continue
            out[name] = lambda x, layer=layer: layer(x)
        else:
            backend = "torch" if name == "sweep" else name
            out[name] = lambda x, backend=backend: ttm_apply(x, cores, backend=backend)
    return out


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    d_modes = tuple(args.modes)
    spec = TTMSpec(d_modes, d_modes, (args.rank,) * (len(d_modes) - 1))
    wanted = [p for p in args.providers if device.type == "cuda" or p in ("dense", "sweep", "tltorch")]
    env = harness.run_env(device, args.quick, "bench.ttm", "-ttm")
    print(f"spec {spec.describe()}, {spec.num_params} parameters")
    if device.type == "cpu":
        print("CPU figures: these times say nothing about GPU speed.")
    gen = torch.Generator().manual_seed(0)
    cores = [
        (torch.randn(s, generator=gen, dtype=torch.float64) / math.sqrt(s[0] * s[2])).to(device)
        for s in spec.core_shapes
    ]
    rows: list[dict[str, Any]] = []
    for dt_name in args.dtypes:
        dtype = DTYPES[dt_name]
        fcores = [c.detach().float().requires_grad_() for c in cores]
        provs = _providers(spec, fcores, device, wanted)
        for M in args.M:
            x = torch.randn(M, spec.in_features, generator=gen, dtype=torch.float64)
            want = ttm_apply(x, [c.detach().cpu() for c in cores], backend="torch")  # float64
            x = x.to(device=device, dtype=dtype).requires_grad_()
            dy = torch.randn(M, spec.out_features, device=device, dtype=dtype)
            for name, fn in provs.items():
                try:
                    got = fn(x).double().cpu()
                except Exception as err:  # a path that cannot run this shape here is reported, not timed
                    print(f"{name} {dt_name} M={M}: not measured ({type(err).__name__}: {err})")
                    continue
                rel = ((got - want).norm() / want.norm()).item()
                if not rel < {torch.float32: 1e-2, torch.bfloat16: 5e-2, torch.float16: 2e-2}[dtype]:
                    print(f"{name} {dt_name} M={M}: WRONG (relative error {rel:.3g}); not timed")
                    continue
                saved = harness.saved_bytes(lambda fn=fn: fn(x), exclude=fcores)  # x and whatever else
                for phase in ("forward", "forward+backward"):
                    if phase == "forward":
                        body = lambda fn=fn: fn(x)
                    else:
                        body = lambda fn=fn: torch.autograd.backward(fn(x), dy)
                    with torch.no_grad() if phase == "forward" else torch.enable_grad():
                        t = harness.measure(body, device, reps=args.reps, max_seconds=args.max_seconds)
                    rows.append(
                        harness.make_row(
                            preset="ttm", provider=name, phase=phase, device=device, dtype=dtype, timing=t, env=env,
                            M=M, d_in=spec.in_features, d_out=spec.out_features, modes=list(d_modes),
                            rank=args.rank, rel_error=rel, saved_bytes_per_token=saved / M,
                            saved_vs_x=saved / (M * spec.in_features * x.element_size()),
                        )
                    )  # fmt: skip
                    x.grad = None
                    for c in fcores:
                        c.grad = None
    key = ("preset", "phase", "M", "d_in", "d_out", "rank", "dtype", "device")
    for base in ("tltorch", "dense"):
        harness.add_ratios(rows, base, key)
        for r in rows:
            r[f"x_vs_{base}"] = None if not r["ratio_to_base"] else 1.0 / r["ratio_to_base"]
    for r in rows:
        r.pop("ratio_to_base", None)
    cols = ("provider", "phase", "dtype", "M", "time_ms", "x_vs_tltorch", "x_vs_dense", "saved_vs_x")
    print(harness.table(rows, cols))
    print("x_vs_P: P's time over this row's (above 1: faster than P), both measured in this run; saved_vs_x: bytes")
    print("autograd keeps for backward (cores excluded) over the bytes of x.")
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.ttm", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: small shapes, torch paths only")
    ap.add_argument("--device", default=None)
    ap.add_argument("--modes", nargs="+", type=int, default=None, help="mode sizes of d_in and d_out (16 16 16)")
    ap.add_argument("--rank", type=int, default=None, help="bond rank (8)")
    ap.add_argument("--M", nargs="+", type=int, default=None, help="token counts (1024 4096 8192 16384)")
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None)
    ap.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=1.0)
    harness.add_results_args(ap)
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.device = "cpu"
    args.modes = args.modes or ([4, 4, 4] if args.quick else [16, 16, 16])
    args.rank = args.rank or (4 if args.quick else 8)
    args.M = args.M or ([16, 256] if args.quick else [1024, 4096, 8192, 16384])
    args.dtypes = args.dtypes or (["float32"] if args.quick else ["bfloat16"])
    if args.quick:
        args.reps, args.max_seconds = 5, 0.3
    if any(m < 1 for m in args.M) or args.rank < 1 or any(n < 1 for n in args.modes):
        ap.error("--M, --rank and --modes take positive integers")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = run(args)
    if rows and not args.no_save:
        path = harness.append_rows(rows, harness.results_file(args))
        print(f"{len(rows)} rows appended to {path}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main())
