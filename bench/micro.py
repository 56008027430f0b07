"""The ``micro`` preset: each op of docs/design.md section 2 alone, through ``torch.ops.ttkernels``, per backend.

Ops: ``factors`` (A, C, B from the cores), ``shrink``, ``expand``, ``grad_dy``, ``grad_mid``, ``grad_x``,
``grad_a``. The two ops that contain the frozen layer's GEMMs get a ``frozen`` row beside them — ``expand``
against ``x W^T + b`` and ``grad_x`` against ``dY W`` — so their ratio is the adapter's extra cost. Every op
is checked against the float64 reference before it is timed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ttkernels import reference as ref

from . import harness
from .layer import LayerConfig
from .providers import Problem

OPS = torch.ops.ttkernels


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = {torch.float32: 1e-3, torch.float64: 1e-9}.get(dtype, 5e-2)
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    return bool(torch.allclose(actual.double(), expected.double(), atol=tol * scale, rtol=tol))


def run_config(
    cfg: LayerConfig,
    device: torch.device,
    env: dict[str, Any],
    backends: list[str],
    *,
    reps: int,
    max_seconds: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows for every op of one configuration, and notes on ops that were refused."""
    rows, notes = [], []
    p = Problem(cfg.fmt, cfg.d_in, cfg.d_out, cfg.rank, cfg.dtype, device)
    A, C, B = (t.to(cfg.dtype) if t is not None else None for t in ref.factors(p.cores, p.spec, p.index))
    x = torch.randn(cfg.M, cfg.d_in, device=device, dtype=cfg.dtype)
    dy = torch.randn(cfg.M, cfg.d_out, device=device, dtype=cfg.dtype)
    W, b, s = p.weight, p.bias, 1.0
    S, U = ref.shrink(x, A, C, None, 0.0, 0)
    dU, _ = ref.grad_dy(dy, U, B, s)
    dS, _ = ref.grad_mid(S, dU, C, None)
    cases: dict[str, list[tuple[str, Callable[[], Any], Callable[[], Any]]]] = {}
    # (provider, run, float64 reference); outputs compared elementwise (tuples flattened)
    x64, W64, b64, dy64 = x.double(), W.double(), b.double(), dy.double()
    A64, B64 = A.double(), B.double()
    C64 = C.double() if C is not None else None
    S64, U64 = S.double(), U.double()
    dU64, dS64 = dU.double(), dS.double()
    cases["expand"] = [("frozen", lambda: torch.addmm(b, x, W.t()), lambda: torch.addmm(b64, x64, W64.t()))]
    cases["grad_x"] = [("frozen", lambda: dy @ W, lambda: dy64 @ W64)]
    for be in backends:
        name = f"ttkernels-{be}"
        cases.setdefault("factors", []).append(
            (
                name,
                lambda: ref.factors(p.cores, p.spec, p.index),
                lambda: ref.factors([c.double() for c in p.cores], p.spec, p.index),
            )
        )
        cases.setdefault("shrink", []).append(
            (
                name,
                lambda be=be: OPS.shrink(x, A, C, None, 0.0, None, be),
                lambda: ref.shrink(x64, A64, C64, None, 0.0, 0),
            )
        )
        cases["expand"].append(
            (name, lambda be=be: OPS.expand(x, W, b, U, B, s, be), lambda: ref.expand(x64, W64, b64, U64, B64, s))
        )
        cases.setdefault("grad_dy", []).append(
            (name, lambda be=be: OPS.grad_dy(dy, U, B, s, be), lambda: ref.grad_dy(dy64, U64, B64, s))
        )
        if C is not None:
            cases.setdefault("grad_mid", []).append(
                (name, lambda be=be: OPS.grad_mid(S, dU, C, None, be), lambda: ref.grad_mid(S64, dU64, C64, None))
            )
        cases["grad_x"].append(
            (
                name,
                lambda be=be: OPS.grad_x(dy, W, dS, A, 0.0, None, be),
                lambda: ref.grad_x(dy64, W64, dS64, A64, 0.0, 0),
            )
        )
        cases.setdefault("grad_a", []).append(
            (name, lambda be=be: OPS.grad_a(x, dS, 0.0, None, be), lambda: ref.grad_a(x64, dS64, 0.0, 0))
        )
    for op, entries in cases.items():
        for provider, run, reference in entries:
            with torch.no_grad():
                got, want = run(), reference()
            got = got if isinstance(got, tuple) else (got,)
            want = want if isinstance(want, tuple) else (want,)
            if not all(
                (g is None and w is None) or (g is not None and w is not None and _close(g, w, cfg.dtype))
                for g, w in zip(got, want, strict=True)
            ):
                notes.append(f"refused {provider} {op}: differs from the float64 reference")
                continue
            with torch.no_grad():
                timing = harness.measure(run, device, reps=reps, max_seconds=max_seconds)
            rows.append(
                harness.make_row(
                    preset="micro",
                    provider=provider,
                    phase=op,
                    device=device,
                    dtype=cfg.dtype,
                    timing=timing,
                    env=env,
                    **cfg.row_fields(),
                )
            )
    return rows, notes


MICRO_COLUMNS = ("dtype", "format", "d_in", "d_out", "rank", "M", "phase", "provider", "time_ms", "ratio_to_base")
