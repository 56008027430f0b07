"""The ``cuda`` backend: the step functions of ``ttkernels.ops.Backend`` on the CUDA C++ kernels of ``csrc/``.

Each step is one call of an op of the extension (``torch.ops.ttkernels_cuda.*``, csrc/bindings.cpp), whose
binding checks every argument before it launches anything. This layer adds what the registry's callers
expect of a backend: the reference's signatures (``C`` may be None), contiguous inputs, and errors that say
which backend to use instead (float64, ranks above 128).

The base GEMMs of steps 3 and 6 are torch's (cuBLAS): ``addmm`` / ``mm``, then a kernel adds the low-rank
term in place (beta = 1), one rounding. The reductions (dB, dC, dA) use fp32 atomics, or, under
``torch.use_deterministic_algorithms(True)``, per-block buffers summed in a fixed order.

Importing this module loads nothing; the registry calls :func:`load` on the first ``backend="cuda"`` call on a
CUDA tensor, which loads the extension and registers fake kernels of its ops (for ``torch.compile``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext

__all__ = [
    "MAX_RANK",
    "load",
    "shrink",
    "mid",
    "expand",
    "grad_dy",
    "grad_mid",
    "grad_x",
    "grad_a",
]

MAX_RANK = 128

_fakes_registered = False


def load() -> None:
    """Load the extension (raises ``_ext.CUDAExtensionNotBuiltError`` with the build command) and register
    the fake kernels of its ops, once."""
    global _fakes_registered
    _ext.load_cuda_extension()
    if not _fakes_registered:
        _register_fakes()
        _fakes_registered = True


def _register_fakes() -> None:
    def reg(name):
        return torch.library.register_fake(f"ttkernels_cuda::{name}")

    @reg("dropout")
    def _(x, seed, p):
        return torch.empty_like(x)

    @reg("shrink")
    def _(x, A, C, task_ids, p, seed):
        U = x.new_empty((x.shape[0], C.shape[-1])) if C is not None else x.new_empty(0)
        return x.new_empty((x.shape[0], A.shape[1])), U

    @reg("mid")
    def _(S, C, task_ids):
        return S.new_empty((S.shape[0], C.shape[-1]))

    @reg("expand")
    def _(x, weight, bias, U, B, scaling):
        return x.new_empty((x.shape[0], weight.shape[0]))

    @reg("grad_dy")
    def _(dy, U, B, scaling):
        return dy.new_empty((dy.shape[0], B.shape[0])), torch.empty_like(B)

    @reg("grad_mid")
    def _(S, dU, C, task_ids):
        return torch.empty_like(S), torch.empty_like(C)

    @reg("grad_x")
    def _(dy, weight, dS, A, p, seed):
        return dy.new_empty((dy.shape[0], weight.shape[1]))

    @reg("grad_a")
    def _(x, dS, p, seed):
        return x.new_empty((x.shape[1], dS.shape[1]))


def _check(dtype: torch.dtype, **ranks: int) -> None:
    from .ops import check_kernel_limits

    check_kernel_limits("cuda", dtype, MAX_RANK, **ranks)


def _c(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


_ops = None


def _cuda_ops():
    global _ops
    if _ops is None:
        load()
        _ops = torch.ops.ttkernels_cuda
    return _ops


def shrink(x, A, C, task_ids, p: float, seed: int):
    _check(x.dtype, r_a=A.shape[1], r_b=A.shape[1] if C is None else C.shape[-1])
    S, U = _cuda_ops().shrink(x.contiguous(), A.contiguous(), _c(C), _c(task_ids), float(p), int(seed))
    return S, (S if C is None else U)


def mid(S, C, task_ids):
    if C is None:
        return S
    _check(S.dtype, r_a=S.shape[1], r_b=C.shape[-1])
    return _cuda_ops().mid(S.contiguous(), C.contiguous(), _c(task_ids))


def expand(x, weight, bias, U, B, scaling: float):
    _check(x.dtype, r_b=B.shape[0])
    return _cuda_ops().expand(x, weight, bias, U.contiguous(), B.contiguous(), float(scaling))


def grad_dy(dy, U, B, scaling: float):
    _check(dy.dtype, r_b=B.shape[0])
    return _cuda_ops().grad_dy(dy.contiguous(), U.contiguous(), B.contiguous(), float(scaling))


def grad_mid(S, dU, C, task_ids):
    if C is None:
        return dU, None
    _check(S.dtype, r_a=S.shape[1], r_b=dU.shape[1])
    return _cuda_ops().grad_mid(S.contiguous(), dU.contiguous(), C.contiguous(), _c(task_ids))


def grad_x(dy, weight, dS, A, p: float, seed: int):
    _check(dy.dtype, r_a=A.shape[1])
    return _cuda_ops().grad_x(dy, weight, dS.contiguous(), A.contiguous(), float(p), int(seed))


def grad_a(x, dS, p: float, seed: int):
    _check(x.dtype, r_a=dS.shape[1])
    return _cuda_ops().grad_a(x.contiguous(), dS.contiguous(), float(p), int(seed))
