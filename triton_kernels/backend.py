"""The ``triton`` backend: the step functions of ``ttkernels.ops.Backend``, with their argument limits.

The op registry calls these with tensors it has already checked (shapes, devices, one compute dtype); this
layer adds what only the Triton kernels need: float32, bfloat16 or float16 tensors, ranks up to
:data:`MAX_RANK`, a CUDA device (or the CPU under ``TRITON_INTERPRET=1``).

**Base GEMM plan** (``TTKERNELS_TRITON_BASE_GEMM``, read at import; :data:`BASE_GEMM` may be set later):

* ``cublas`` (default): torch's GEMM (cuBLAS) computes the base products; around them, row-owner kernels
  (:mod:`.rows`) do every adapter step of a block of rows in one pass over the activations. Forward: one
  kernel writes ``y0 = b + scaling * drop(x) A C B`` (and S), then ``y0.addmm_(x, W^T)`` with beta = 1.
  Backward: one kernel reads dY and x once for ``dB``, ``dC``, ``dA`` (float32 workspace) and writes
  ``dx0 = drop'(dS A^T)``, then ``dx0.addmm_(dY, W)``, then one small kernel rounds the workspace.
* ``fused``: steps 3 and 6 are one Triton GEMM each, the low-rank term seeding the base GEMM's accumulator
  (``y = x W^T + b + scaling * U B``, ``dx = dY W + drop'(dS A^T)``); y and dx are written once, but the
  GEMM is Triton's. Forward: shrink, then the GEMM. Backward: grad_dy (dU only), grad_mid, then one GEMM
  launch (:mod:`.gemm_grad`) that also adds ``dA = drop(x)^T dS`` and ``dB = scaling U^T dY`` into a float32
  workspace (the x tile and dY chunks it loads anyway), and the finalize kernel that rounds dA and dB.

The step functions (``shrink``, ``expand``, ...) serve the step ops and the ``fused`` plan; :func:`forward` and
:func:`backward` are what the fused ops call. The dropout ``seed`` is a one-element int64 tensor on the data's
device, which the kernels load themselves (the registry passes the one it drew there: no host read, and a
captured CUDA graph hashes the seed's value at each replay), or an int, copied to the device first.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Optional

import torch

from ttkernels.checks import check_kernel_limits

from . import rows
from ._common import INTERPRET, MAX_RANK, empty
from .gemm import gemm_lowrank
from .gemm_grad import gemm_grad
from .grad_a import grad_a as _grad_a
from .grad_dy import grad_dy as _grad_dy
from .grad_mid import grad_mid as _grad_mid
from .mid import mid as _mid
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
    "forward",
    "backward",
]

BASE_GEMM = os.environ.get("TTKERNELS_TRITON_BASE_GEMM", "cublas")


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


def shrink(x, A, C, task_ids, p: float, seed: int | torch.Tensor):
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
    # y0 = b + scaling U B, then cuBLAS adds x W^T reading y0 in its epilogue (beta = 1)
    return gemm_lowrank(out, None, None, U, B, bias, scaling).addmm_(x, weight.t())


def grad_dy(dy, U, B, scaling: float):
    _check(dy.dtype, r_b=B.shape[0])
    return _grad_dy(dy, U, B, scaling)


def grad_mid(S, dU, C, task_ids):
    _check(S.dtype, r_a=S.shape[1], r_b=dU.shape[1])
    return _grad_mid(S, dU, C, task_ids)


def grad_x(dy, weight, dS, A, p: float, seed: int | torch.Tensor):
    _check(dy.dtype, r_a=A.shape[1])
    out = empty((dy.shape[0], weight.shape[1]), dy.dtype, dy.device)
    if _plan() == "fused":
        return gemm_lowrank(out, dy, weight, dS, A.t(), None, 1.0, p, seed)
    return gemm_lowrank(out, None, None, dS, A.t(), None, 1.0, p, seed).addmm_(dy, weight)


def grad_a(x, dS, p: float, seed: int | torch.Tensor):
    _check(x.dtype, r_a=dS.shape[1])
    return _grad_a(x, dS, p, seed)


def forward(x, weight, bias, A, C, B, task_ids, scaling: float, p: float, seed: int | torch.Tensor):
    """Steps 2-3 as the plan runs them: ``(y, S)``."""
    rb = A.shape[1] if C is None else C.shape[-1]
    _check(x.dtype, r_a=A.shape[1], r_b=rb)
    if _plan() == "cublas":
        return rows.forward(x, weight, bias, A, C, B, task_ids, scaling, p, seed)
    S, U = _shrink(x, A, C, task_ids, p, seed)
    return gemm_lowrank(empty((x.shape[0], weight.shape[0]), x.dtype, x.device), x, weight.t(), U, B, bias, scaling), S


def backward(dy, x, weight, A, C, B, S, task_ids, scaling: float, p: float, seed: int | torch.Tensor, need_dx: bool):
    """Steps 4-7 as the plan runs them: ``(dx, dA, dC, dB)`` (dx empty unless ``need_dx``; dC None without C)."""
    rb = A.shape[1] if C is None else C.shape[-1]
    _check(x.dtype, r_a=A.shape[1], r_b=rb)
    if _plan() == "cublas":
        return rows.backward(dy, x, weight, A, C, B, S, task_ids, scaling, p, seed, need_dx)
    U = _mid(S, C, task_ids)
    dU, _ = _grad_dy(dy, None, B, scaling)
    dS, dC = _grad_mid(S, dU, C, task_ids)
    dx, dA, dB = gemm_grad(dy, weight, dS, A, x, U, B.dtype, scaling, p, seed, need_dx)
    return dx, dA, dC, dB
