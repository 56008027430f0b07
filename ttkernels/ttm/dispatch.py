"""What ``backend="auto"`` runs for a TT-matrix adapter on CUDA tensors: the policy and its measurements.

Off CUDA (or in float64) the sweep. On CUDA, the fastest of the fused Kronecker-sum kernels (``"triton"``, and
``"cuda"`` where its limits allow) and reconstruct-then-GEMM (``"dense"``), measured once per spec, power-of-two
token bucket, dtype and device and cached (:data:`cache`); with ``TTKERNELS_TTM_DISPATCH=model``, while a CUDA
graph is captured or while torch.compile traces, :func:`dispatch_model` decides instead.

A candidate that fails while it is measured is not chosen and is reported: a ``RuntimeWarning`` names it with
its error, and :data:`failures` keeps the error per cache key. When every candidate fails, the errors are raised.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from typing import Optional

import torch
from torch import Tensor

from .. import _cuda_backend
from .reference import KronSplit, choose_split
from .spec import TTMSpec

__all__ = ["DISPATCH_MODE", "cache", "candidates", "dispatch_model", "failures", "kron_split_for", "measure"]

DISPATCH_MODE = os.environ.get("TTKERNELS_TTM_DISPATCH", "measure")

# (spec, token bucket, dtype, device) -> the backend measured fastest
cache: dict[tuple, str] = {}
# (spec, token bucket, dtype, device) -> {candidate: its error} for the candidates that failed
failures: dict[tuple, dict[str, str]] = {}


def token_bucket(m: int) -> int:
    return 1 << max(0, (max(m, 1) - 1).bit_length())


def kron_split_for(spec: TTMSpec, backend: str) -> Optional[KronSplit]:
    """The cut the fused kernels of ``backend`` use, or None when no cut fits them."""
    if backend == "cuda":
        return choose_split(spec, max_kept=_cuda_backend.KRON_MAX_KEPT, pad=1, max_rank=_cuda_backend.KRON_MAX_RANK)
    return choose_split(spec)


def dispatch_model(spec: TTMSpec, tokens: int) -> str:
    """The FLOP model behind ``backend="auto"`` when nothing is measured: forward and backward of the fused
    Kronecker-sum kernels (about four forward sweeps, kept sides padded to 16) against reconstruct-then-GEMM
    (three GEMMs of ``d_out x d_in`` per token plus building dW and its gradient)."""
    split = choose_split(spec)
    if split is None:
        return "dense"
    fused = 4 * split.flops_per_token(16) * tokens
    dense = 6 * spec.in_features * spec.out_features * tokens + 4 * spec.in_features * spec.out_features * spec.max_rank
    return "triton" if fused < dense else "dense"


def candidates(spec: TTMSpec) -> list[str]:
    return (
        ["dense"]
        + (["triton"] if choose_split(spec) is not None else [])
        + (["cuda"] if kron_split_for(spec, "cuda") is not None else [])
    )


def measure(
    spec: TTMSpec,
    tokens: int,
    dtype: torch.dtype,
    device: torch.device,
    names: list[str],
    run: Callable[[Tensor, list[Tensor], str], Tensor],
) -> tuple[str, dict[str, str]]:
    """Time forward + backward of each candidate (``run(x, cores, name)``) once after a warm-up, on random
    inputs of this shape. Returns the fastest and the errors of those that failed (each also warned about);
    raises RuntimeError with every error when none runs."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, spec.in_features, device=device, dtype=dtype, generator=gen).requires_grad_()
    cores = [
        torch.randn(s, device=device, dtype=torch.float32, generator=gen).div_(math.sqrt(s[0] * s[2])).requires_grad_()
        for s in spec.core_shapes
    ]
    dy = torch.randn(tokens, spec.out_features, device=device, dtype=dtype, generator=gen)
    best, best_ms, failed = None, float("inf"), {}
    for name in names:

        def step(name: str = name) -> None:
            torch.autograd.backward(run(x, cores, name), dy)

        try:
            step()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                step()
            stop.record()
            stop.synchronize()
            ms = start.elapsed_time(stop) / 3
        except Exception as err:  # reported below, never dropped
            failed[name] = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"ttm_apply(backend='auto'): candidate {name!r} failed for {spec.describe()} at {tokens} tokens, "
                f"{dtype}, and is not chosen: {failed[name]}",
                RuntimeWarning,
                stacklevel=3,
            )
            continue
        if ms < best_ms:
            best, best_ms = name, ms
    if best is None:
        raise RuntimeError(f"ttm_apply(backend='auto'): every candidate failed for {spec.describe()}: {failed}")
    return best, failed
