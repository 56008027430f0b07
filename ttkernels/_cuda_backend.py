"""The ``cuda`` backend: the step functions of ``ttkernels.ops.Backend`` on the CUDA C++ kernels of ``csrc/``.

Each step is one call of an op of the extension (``torch.ops.ttkernels_cuda.*``, csrc/bindings.cpp), whose
binding checks every argument before it launches anything. This layer adds what the registry's callers
expect of a backend: the reference's signatures (``C`` may be None), contiguous inputs, and errors that say
which backend to use instead (float64, ranks above 128).

The base GEMMs of steps 3 and 6 are torch's (cuBLAS): ``addmm`` / ``mm``, then a kernel adds the low-rank
term in place (beta = 1), one rounding. The reductions (dB, dC, dA) use fp32 atomics, or, under
``torch.use_deterministic_algorithms(True)``, fixed-split fp32 buffers (bounded whatever the token count) summed
in a fixed order. No op synchronizes with the host: a task id out of range gives NaN rows (see the README), it is
never copied to the host to be checked. The dropout seed reaches the kernels as a one-element int64 tensor on the
data's GPU (:func:`_seed`), which they read on the device: a CUDA graph captured with dropout hashes the seed's
value at each replay (the registry draws a fresh one there each time).

The TT-matrix Kronecker-sum ops (:func:`kron_apply`, :func:`kron_grad_q`, :func:`kron_grad_p`; csrc/ttm.cu) are the
small-bond-rank path of ``ttkernels.ttm``'s contract (``kron_apply_ref`` and its gradients): rank up to
:data:`KRON_MAX_RANK`, the kept modes ``NI``, ``NA`` up to :data:`KRON_MAX_KEPT`; their gradients are always
deterministic.

Importing this module loads nothing; the registry calls :func:`load` on the first ``backend="cuda"`` call on a
CUDA tensor, which loads the extension and registers fake kernels of its ops (for ``torch.compile``).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _ext
from .checks import KERNEL_DTYPES, check_kernel_limits, device_seed

__all__ = [
    "MAX_RANK",
    "KRON_MAX_RANK",
    "KRON_MAX_KEPT",
    "load",
    "shrink",
    "mid",
    "expand",
    "grad_dy",
    "grad_mid",
    "grad_x",
    "grad_a",
    "kron_apply",
    "kron_grad_q",
    "kron_grad_p",
]

MAX_RANK = 128
KRON_MAX_RANK = 16  # bond rank R of the Kronecker-sum ops (csrc/ttm.cu)
KRON_MAX_KEPT = 64  # NI and NA: the modes of q, the factor applied second, kept whole in a block

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

    @reg("kron_apply")
    def _(x, q, p):
        return x.new_empty((x.shape[0], q.shape[1], p.shape[2]))

    @reg("kron_grad_q")
    def _(dy, x, p):
        return x.new_empty((p.shape[0], dy.shape[1], x.shape[1]), dtype=torch.float32)

    @reg("kron_grad_p")
    def _(dy, x, q):
        return x.new_empty((q.shape[0], x.shape[2], dy.shape[2]), dtype=torch.float32)


def _check(dtype: torch.dtype, **ranks: int) -> None:
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


def _seed(p: float, seed: int | Tensor, device: torch.device) -> Optional[Tensor]:
    """The seed as the binding takes it: None without dropout, else a one-element int64 tensor on ``device``
    (``checks.device_seed``: a tensor is used where it lies, never read on the host; an int is range-checked
    here and written on the device by a fill, not copied from the host)."""
    return device_seed(seed, device) if p > 0.0 else None


def shrink(x, A, C, task_ids, p: float, seed: int | Tensor):
    _check(x.dtype, r_a=A.shape[1], r_b=A.shape[1] if C is None else C.shape[-1])
    S, U = _cuda_ops().shrink(x.contiguous(), A.contiguous(), _c(C), _c(task_ids), float(p), _seed(p, seed, x.device))
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


def grad_x(dy, weight, dS, A, p: float, seed: int | Tensor):
    _check(dy.dtype, r_a=A.shape[1])
    return _cuda_ops().grad_x(dy, weight, dS.contiguous(), A.contiguous(), float(p), _seed(p, seed, dy.device))


def grad_a(x, dS, p: float, seed: int | Tensor):
    _check(x.dtype, r_a=dS.shape[1])
    return _cuda_ops().grad_a(x.contiguous(), dS.contiguous(), float(p), _seed(p, seed, x.device))


def _check_kron(dtype: torch.dtype, rank: int, ni: int, na: int) -> None:
    if dtype not in KERNEL_DTYPES:
        raise TypeError(f"backend='cuda' computes in float32, bfloat16 or float16, not {dtype}; use backend='torch'")
    for name, n, most in (("the rank R", rank, KRON_MAX_RANK), ("NI", ni, KRON_MAX_KEPT), ("NA", na, KRON_MAX_KEPT)):
        if n > most:
            raise ValueError(
                f"the CUDA Kronecker-sum kernels support {name} up to {most}, got {n}; "
                "use backend='triton' or backend='torch'"
            )


def _size(t: Tensor, dim: int) -> int:
    """``t.shape[dim]`` of a 3-D operand, else 0 (the binding then names the bad shape)."""
    return t.shape[dim] if t.dim() == 3 else 0


def kron_apply(x3: Tensor, q: Tensor, p: Tensor) -> Tensor:
    """``y[b, a, c] = sum_{r, i, j} q[r, a, i] x3[b, i, j] p[r, j, c]`` (``ttm.kron_apply_ref``): x3 ``(M, NI, NJ)``
    with any strides (a transposed view is read in place), q ``(R, NA, NI)``, p ``(R, NJ, NC)``; y ``(M, NA, NC)``
    in x3's dtype, fp32 accumulation."""
    _check_kron(x3.dtype, _size(q, 0), _size(x3, 1), _size(q, 1))
    return _cuda_ops().kron_apply(x3, q.contiguous(), p.contiguous())


def kron_grad_q(dy3: Tensor, x3: Tensor, p: Tensor) -> Tensor:
    """``dq[r, a, i] = sum_{b, c} dy3[b, a, c] sum_j x3[b, i, j] p[r, j, c]`` (``ttm.kron_grad_q_ref``), float32;
    dy3 and x3 with any strides. Deterministic."""
    _check_kron(dy3.dtype, _size(p, 0), _size(x3, 1), _size(dy3, 1))
    return _cuda_ops().kron_grad_q(dy3, x3, p.contiguous())


def kron_grad_p(dy3: Tensor, x3: Tensor, q: Tensor) -> Tensor:
    """``dp[r, j, c] = sum_{b, a} (sum_i q[r, a, i] x3[b, i, j]) dy3[b, a, c]`` (``ttm.kron_grad_p_ref``), float32;
    dy3 and x3 with any strides. Deterministic."""
    _check_kron(dy3.dtype, _size(q, 0), _size(x3, 1), _size(dy3, 1))
    return _cuda_ops().kron_grad_p(dy3, x3, q.contiguous())
