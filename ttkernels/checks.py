"""Argument checks and backend names shared by every layer of the package (the bottom of its import graph).

The op registry (:mod:`ttkernels.ops`), the kernel backends (``ttkernels._cuda_backend``,
``ttkernels._triton_kernels.backend``), the TT-matrix package and the adapter layers all check with these, so
one argument gets one rule and one message everywhere. It imports nothing from ttkernels.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "BACKENDS",
    "KERNEL_DTYPES",
    "BackendUnavailableError",
    "check_alpha",
    "check_backend_name",
    "check_dropout",
    "check_kernel_limits",
]

BACKENDS = ("auto", "torch", "triton", "cuda")

# What the Triton and CUDA kernels compute in (fp32 accumulation); float64 runs on the torch backend.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, not implemented, or no suitable device)."""


def check_kernel_limits(backend: str, dtype: torch.dtype, max_rank: int, **ranks: int) -> None:
    """What a kernel backend (``triton``, ``cuda``) cannot compute, refused with a pointer to ``torch``."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r} computes in float32, bfloat16 or float16, not {dtype}; use backend='torch' for it"
        )
    for name, r in ranks.items():
        if r > max_rank:
            raise ValueError(
                f"backend={backend!r} supports ranks up to {max_rank}, but {name} = {r}; use backend='torch'"
            )


def check_dropout(dropout: object) -> float:
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_backend_name(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def check_alpha(alpha: object, name: str = "alpha") -> float | None:
    """The adapter's scale numerator: None, or a finite number >= 0 (bool, NaN, inf, negative refused)."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {alpha!r}")
    return float(alpha)
