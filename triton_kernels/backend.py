"""The ``triton`` backend: the step functions of ``ttkernels.ops.Backend``, with their argument limits.

The op registry calls these with tensors it has already checked (shapes, devices, one compute dtype); this
layer adds what only the Triton kernels need: float32, bfloat16 or float16 tensors, ranks up to
:data:`MAX_RANK`, a CUDA device (or the CPU under ``TRITON_INTERPRET=1``).

**Base GEMM plan** (``TTKERNELS_TRITON_BASE_GEMM``, read at import; :data:`BASE_GEMM` may be set later):

* ``fused`` (default): steps 3 and 6 are one Triton GEMM each, the low-rank term in the base GEMM's
  accumulator (``y = x W^T + b + scaling * U B``, ``dx = dY W + drop'(dS A^T)``); y and dx are written once.
* ``cublas``: torch's GEMM (cuBLAS) computes the base product and a Triton kernel adds the low-rank term in
  place: one more read and write of y / dx, but the vendor GEMM's speed.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import torch

from ttkernels.checks import check_kernel_limits

from ._common import INTERPRET, MAX_RANK, empty
from .gemm import gemm_lowrank
from .grads import grad_a as _grad_a
from .grads import grad_dy as _grad_dy
from .grads import grad_mid as _grad_mid
from .grads import mid as _mid
from .shrink import shrink as _shrink

__all__ = [
    "BASE_GEMM",
    "base_gemm",
    "INTERPRET",
    "MAX_RANK",
    "check_device",
    "shrink",
    "mid",
    "expand",
    "grad_dy",
    "grad_mid",
    "grad_x",
    "grad_a",
]

BASE_GEMM = os.environ.get("TTKERNELS_TRITON_BASE_GEMM", "fused")


@contextlib.contextmanager
def base_gemm(plan: str) -> Iterator[None]:
    """Use base-GEMM ``plan`` (``fused`` or ``cublas``) inside the block, backward included if it runs there."""
    global BASE_GEMM
    if plan not in ("fused", "cublas"):
        raise ValueError(f"plan must be 'fused' or 'cublas', got {plan!r}")
    saved, BASE_GEMM = BASE_GEMM, plan
    try:
        yield
    finally:
        BASE_GEMM = saved


def _plan() -> str:
    if BASE_GEMM not in ("fused", "cublas"):
        raise ValueError(f"TTKERNELS_TRITON_BASE_GEMM must be 'fused' or 'cublas', got {BASE_GEMM!r}")
    return BASE_GEMM


def check_device(device: torch.device) -> Optional[str]:
    """Why the Triton kernels cannot run on ``device`` (None when they can)."""
    if device.type == "cuda":
        return None
    if device.type == "cpu" and INTERPRET:
        return None
    how = " (TRITON_INTERPRET=1, set before ttkernels loads its Triton kernels, runs them on the CPU)"
    return f"backend='triton' runs on CUDA tensors, but x is on {device}{how}"


def _check(dtype: torch.dtype, **ranks: int) -> None:
    check_kernel_limits("triton", dtype, MAX_RANK, **ranks)


def shrink(x, A, C, task_ids, p: float, seed: int):
    _check(x.dtype, r_a=A.shape[1], r_b=A.shape[1] if C is None else C.shape[-1])
    return _shrink(x, A, C, task_ids, p, seed)


def mid(S, C, task_ids):
    _check(S.dtype, r_a=S.shape[1], r_b=S.shape[1] if C is None else C.shape[-1])
    return _mid(S, C, task_ids)


def expand(x, weight, bias, U, B, scaling: float):
    _check(x.dtype, r_b=B.shape[0])
    out = empty((x.shape[0], weight.shape[0]), x.dtype, x.device)
    if _plan() == "fused":
        return gemm_lowrank(out, x, weight.t(), U, B, bias, scaling)
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:
        torch.addmm(bias, x, weight.t(), out=out)
    return gemm_lowrank(out, None, None, U, B, None, scaling, accumulate=True)


def grad_dy(dy, U, B, scaling: float):
    _check(dy.dtype, r_b=B.shape[0])
    return _grad_dy(dy, U, B, scaling)


def grad_mid(S, dU, C, task_ids):
    _check(S.dtype, r_a=S.shape[1], r_b=dU.shape[1])
    return _grad_mid(S, dU, C, task_ids)


def grad_x(dy, weight, dS, A, p: float, seed: int):
    _check(dy.dtype, r_a=A.shape[1])
    out = empty((dy.shape[0], weight.shape[1]), dy.dtype, dy.device)
    if _plan() == "fused":
        return gemm_lowrank(out, dy, weight, dS, A.t(), None, 1.0, p, seed)
    torch.mm(dy, weight, out=out)
    return gemm_lowrank(out, None, None, dS, A.t(), None, 1.0, p, seed, accumulate=True)


def grad_a(x, dS, p: float, seed: int):
    _check(x.dtype, r_a=dS.shape[1])
    return _grad_a(x, dS, p, seed)
