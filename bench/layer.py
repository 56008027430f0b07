"""The ``layer`` preset: one adapted linear layer, forward, backward and forward+backward, every provider
side by side (see :mod:`bench.providers`).

Per provider and phase: median time, ratio to the frozen layer, achieved TFLOP/s and GB/s (useful work of
:func:`bench.harness.layer_flops` / :func:`~bench.harness.layer_bytes`, also as fractions of the ceilings
measured in the same run), and for the forward: bytes saved for backward per token (and relative to x),
peak memory (CUDA) and trainable parameters. The input requires grad, as inside a network, so backward
computes dX.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from . import harness
from .providers import Problem, ProviderCheckError, check_provider, providers_for

FULL_M = (1, 16, 256, 2048, 8192, 16384)
FULL_SHAPES = ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024))
QUICK_M = (1, 16, 256)
QUICK_SHAPES = ((256, 256), (256, 688), (688, 256), (256, 64))  # the full shapes scaled by 1/16
# --quick adds LoRA-shaped cases with this adapter dropout at the first shape: where the memory differs (PEFT's
# LoRA keeps a dropped copy of x for backward, ttkernels regenerates the mask from a seed)
QUICK_DROPOUT = 0.1


@dataclass(frozen=True)
class LayerConfig:
    M: int
    d_in: int
    d_out: int
    rank: int
    fmt: str
    dtype: torch.dtype
    dropout: float = 0.0  # the adapter's input dropout (providers without dropout are left out when > 0)

    def row_fields(self) -> dict[str, Any]:
        """The configuration as result-row fields (dtype goes to make_row itself)."""
        return {
            "M": self.M,
            "d_in": self.d_in,
            "d_out": self.d_out,
            "rank": self.rank,
            "format": self.fmt,
            "dropout": self.dropout,
        }


def configs(
    Ms: Sequence[int],
    shapes: Sequence[tuple[int, int]],
    ranks: Sequence[int],
    formats: Sequence[str],
    dtypes: Sequence[torch.dtype],
    dropout: float = 0.0,
) -> list[LayerConfig]:
    return [
        LayerConfig(M, d_in, d_out, r, f, dt, dropout)
        for dt, (d_in, d_out), r, f, M in itertools.product(dtypes, shapes, ranks, formats, Ms)
    ]


def _phase_runners(provider, x_rot: harness.Rotating, dy: torch.Tensor):
    """fn and setup for each phase; grads are reset (untimed) before every repetition."""
    state: dict[str, Any] = {}

    def reset() -> None:
        for prm in provider.trainable:
            prm.grad = None

    def fwd() -> None:
        state["y"] = provider(x_rot.next())

    def setup_bwd() -> None:
        reset()
        x = x_rot.next()
        x.grad = None
        state["y"] = provider(x)

    def bwd() -> None:
        state["y"].backward(dy)

    def fwd_bwd() -> None:
        provider(x_rot.next()).backward(dy)

    return {
        "forward": (fwd, reset),
        "backward": (bwd, setup_bwd),
        "forward+backward": (fwd_bwd, reset),
    }


def run_config(
    cfg: LayerConfig,
    device: torch.device,
    env: dict[str, Any],
    backends: list[str],
    *,
    reps: int,
    max_seconds: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows for every provider of one configuration, and notes on providers that were refused."""
    p = Problem(cfg.fmt, cfg.d_in, cfg.d_out, cfg.rank, cfg.dtype, device, dropout=cfg.dropout)
    rows, notes = [], []
    elem = torch.finfo(cfg.dtype).bits // 8
    x_rot = harness.Rotating(lambda: torch.randn(cfg.M, cfg.d_in, device=device, dtype=cfg.dtype).requires_grad_(), 2)
    dy = torch.randn(cfg.M, cfg.d_out, device=device, dtype=cfg.dtype)
    ceil = env.get("ceilings") or {}
    for provider in providers_for(p, backends):
        with provider.active():  # e.g. a backend option, on for the provider's measurements only
            try:
                check_provider(provider, p)
            except ProviderCheckError as err:
                notes.append(f"refused {provider.name}: {err}")
                continue
            params = sum(t.numel() for t in provider.trainable)
            exclude = list(provider.parameters())
            # per token: saved at M tokens minus saved at 0 tokens (token-independent tensors cancel), over M
            x0 = torch.randn(0, cfg.d_in, device=device, dtype=cfg.dtype, requires_grad=True)
            saved = harness.saved_bytes(lambda: provider(x_rot.next()), exclude) - harness.saved_bytes(
                lambda: provider(x0), exclude
            )
            for phase, (fn, setup) in _phase_runners(provider, x_rot, dy).items():
                timing = harness.measure(fn, device, reps=reps, max_seconds=max_seconds, setup=setup)
                adapter = provider.name != "frozen"
                flops = harness.layer_flops(cfg.M, cfg.d_in, cfg.d_out, cfg.rank, phase, adapter=adapter)
                nbytes = harness.layer_bytes(cfg.M, cfg.d_in, cfg.d_out, elem, phase)
                tflops = harness.rate(flops, timing.median_ms, 1e12)
                gbps = harness.rate(nbytes, timing.median_ms, 1e9)
                row = harness.make_row(
                    preset="layer",
                    provider=provider.name,
                    phase=phase,
                    device=device,
                    dtype=cfg.dtype,
                    timing=timing,
                    env=env,
                    **cfg.row_fields(),
                    params=params,
                    tflops=tflops,
                    gbps=gbps,
                    tflops_frac=(tflops / ceil["matmul_tflops"]) if tflops and ceil.get("matmul_tflops") else None,
                    gbps_frac=(gbps / ceil["copy_gbps"]) if gbps and ceil.get("copy_gbps") else None,
                )
                if phase == "forward+backward":
                    row["peak_mem_bytes"] = harness.peak_memory(fn, device)
                if phase == "forward":
                    row["saved_bytes_per_token"] = saved / cfg.M if cfg.M else None
                    row["saved_ratio_to_x"] = saved / (cfg.M * cfg.d_in * elem) if cfg.M else None
                rows.append(row)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows, notes


def wide(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (configuration, provider) with the three phases side by side, for the terminal."""
    out: dict[tuple, dict[str, Any]] = {}
    for r in rows:
        key = (r["dtype"], r["format"], r.get("dropout"), r["d_in"], r["d_out"], r["rank"], r["M"], r["provider"])
        line = out.setdefault(
            key,
            {
                "dtype": r["dtype"],
                "format": r["format"] + (f" p={r['dropout']:g}" if r.get("dropout") else ""),
                "shape": f"{r['d_in']}x{r['d_out']}",
                "r": r["rank"],
                "M": r["M"],
                "provider": r["provider"],
                "params": r.get("params"),
            },
        )
        short = {"forward": "fwd", "backward": "bwd", "forward+backward": "fwd+bwd"}[r["phase"]]
        line[f"{short} ms"] = r["time_ms"]
        line[f"{short} x"] = r.get("ratio_to_base")
        if r["phase"] == "forward":
            line["saved/x"] = r.get("saved_ratio_to_x")
        if r["phase"] == "forward+backward":
            line["TFLOP/s"] = r.get("tflops")
            line["peak MiB"] = None if r.get("peak_mem_bytes") is None else r["peak_mem_bytes"] / 2**20
    return list(out.values())


WIDE_COLUMNS = (
    "dtype",
    "format",
    "shape",
    "r",
    "M",
    "provider",
    "params",
    "fwd ms",
    "fwd x",
    "bwd ms",
    "fwd+bwd ms",
    "fwd+bwd x",
    "TFLOP/s",
    "saved/x",
    "peak MiB",
)
