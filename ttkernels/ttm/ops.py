"""TT-matrix ops: :func:`ttm_apply`, its backends, and the fused Kronecker-sum kernels as registered ops.

``scaling * x dW^T`` through one of

* the sweep (``"torch"``, :func:`~ttkernels.ttm.reference.ttm_sweep`): einsum contractions, analytic backward;
* the fused Kronecker-sum kernels (``"triton"``, ``"cuda"``; ``"kron-torch"`` is the same plumbing with the torch
  contractions of :mod:`ttkernels.ttm.reference`, for float64 gradchecks on the CPU): the chain cut at one bond
  (:func:`~ttkernels.ttm.reference.choose_split`), ``y_b = sum_r Q_r x_b P_r`` without storing the
  intermediate. The kernels are the registered ops ``torch.ops.ttkernels.ttm_kron_apply``, ``ttm_kron_grad_q``
  and ``ttm_kron_grad_p`` (each with a fake, so ``torch.compile`` traces them; checked by
  ``torch.library.opcheck``); :class:`KronFunction` is their autograd function (saves x and the two small merged
  factors; backward recomputes);
* reconstruct-then-GEMM (``"dense"``);
* ``"auto"``: :func:`ttm_dispatch` (see :mod:`ttkernels.ttm.dispatch`).

Every path saves x alone per token for backward. Checked by tests/test_ttm.py (float64 gradcheck of the sweep, the
Kronecker-sum plumbing and the dense path; the ops' opcheck; bad input) and tests/test_ttm_kernels.py (the Triton
kernels against float64).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops as tt_ops
from ..checks import KERNEL_DTYPES
from . import dispatch
from .reference import (
    kron_apply_ref,
    kron_factors,
    kron_grad_p_ref,
    kron_grad_q_ref,
    kron_views,
    ttm_dense,
    ttm_sweep,
)
from .spec import TTMSpec, spec_of

__all__ = [
    "TTM_BACKENDS",
    "CudaKronKernels",
    "KronFunction",
    "TorchKronKernels",
    "TritonKronKernels",
    "kron_kernels",
    "ttm_apply",
    "ttm_dispatch",
]

TTM_BACKENDS = ("auto", "torch", "dense", "triton", "cuda", "kron-torch")
X_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# ------------------------------------------------------------------------------------------------ kernel tables
class TorchKronKernels:
    """The kernels' contract in torch (any dtype): lets the Kronecker-sum autograd function run on the CPU in
    float64 (gradcheck) with the same plumbing as the kernels."""

    @staticmethod
    def apply(x3, q, p, out3):
        out3.copy_(kron_apply_ref(x3, q, p))

    @staticmethod
    def grad_q(dy3, x3, p, q):
        return kron_grad_q_ref(dy3, x3, p)

    @staticmethod
    def grad_p(dy3, x3, p, q):
        return kron_grad_p_ref(dy3, x3, q)


class TritonKronKernels:
    def __init__(self) -> None:
        from .._triton_kernels import ttm as k

        self.k = k

    def apply(self, x3, q, p, out3):
        self.k.kron_apply(x3, q, p, out3)

    def grad_q(self, dy3, x3, p, q):
        return self.k.kron_grad_q(dy3, x3, p, q)

    def grad_p(self, dy3, x3, p, q):
        return self.k.kron_grad_p(dy3, x3, p, q)


class CudaKronKernels:
    def __init__(self) -> None:
        from .. import _cuda_backend

        _cuda_backend.load()
        self.k = _cuda_backend

    def apply(self, x3, q, p, out3):
        out3.copy_(self.k.kron_apply(x3, q, p))

    def grad_q(self, dy3, x3, p, q):
        return self.k.kron_grad_q(dy3, x3, p)

    def grad_p(self, dy3, x3, p, q):
        return self.k.kron_grad_p(dy3, x3, q)


_KERNEL_OBJECTS: dict[str, object] = {}


def kron_kernels(name: str, device: torch.device):
    """The kernel table of ``name`` (``"kron-torch"``, ``"triton"``, ``"cuda"``) for ``device``; raises
    :class:`~ttkernels.BackendUnavailableError` with the reason where it cannot run."""
    if name == "kron-torch":
        return TorchKronKernels
    if name not in ("triton", "cuda"):
        raise ValueError(f"the Kronecker-sum kernels are 'kron-torch', 'triton' or 'cuda', got {name!r}")
    tt_ops.resolve_backend(name, device)  # no GPU, no interpreter, no extension: refused with the reason
    if name not in _KERNEL_OBJECTS:
        _KERNEL_OBJECTS[name] = TritonKronKernels() if name == "triton" else CudaKronKernels()
    return _KERNEL_OBJECTS[name]


# ------------------------------------------------------------------------------------------------ registered ops
# layout: x2 (M, in_left * in_right) is seen as the kernels' (M, kept, streamed) view of order ``order``, and the
# output (M, out_left * out_right) likewise (kron_views); dx uses the same op with both factors transposed.
@torch.library.custom_op("ttkernels::ttm_kron_apply", mutates_args=())
def _kron_apply_op(
    x2: Tensor,
    q: Tensor,
    p: Tensor,
    in_left: int,
    in_right: int,
    out_left: int,
    out_right: int,
    order: str,
    backend: str,
) -> Tensor:
    """``y_b = sum_r Q_r x_b P_r`` for every token b (the kernels' contract, :func:`kron_apply_ref`)."""
    kernels = kron_kernels(backend, x2.device)
    y2 = torch.empty((x2.shape[0], out_left * out_right), dtype=x2.dtype, device=x2.device)
    kernels.apply(kron_views(x2, in_left, in_right, order), q, p, kron_views(y2, out_left, out_right, order))
    return y2


@_kron_apply_op.register_fake
def _(x2, q, p, in_left, in_right, out_left, out_right, order, backend):
    return x2.new_empty((x2.shape[0], out_left * out_right))


@torch.library.custom_op("ttkernels::ttm_kron_grad_q", mutates_args=())
def _kron_grad_q_op(
    dy2: Tensor, x2: Tensor, q: Tensor, p: Tensor, in_left: int, in_right: int, out_left: int, out_right: int,
    order: str, backend: str,
) -> Tensor:  # fmt: skip
    """``dq`` (:func:`kron_grad_q_ref`) in q's dtype."""
    kernels = kron_kernels(backend, x2.device)
    dy3, x3 = kron_views(dy2, out_left, out_right, order), kron_views(x2, in_left, in_right, order)
    return kernels.grad_q(dy3, x3, p, q).to(q.dtype).contiguous()


@_kron_grad_q_op.register_fake
def _(dy2, x2, q, p, in_left, in_right, out_left, out_right, order, backend):
    return torch.empty_like(q)


@torch.library.custom_op("ttkernels::ttm_kron_grad_p", mutates_args=())
def _kron_grad_p_op(
    dy2: Tensor, x2: Tensor, q: Tensor, p: Tensor, in_left: int, in_right: int, out_left: int, out_right: int,
    order: str, backend: str,
) -> Tensor:  # fmt: skip
    """``dp`` (:func:`kron_grad_p_ref`) in p's dtype."""
    kernels = kron_kernels(backend, x2.device)
    dy3, x3 = kron_views(dy2, out_left, out_right, order), kron_views(x2, in_left, in_right, order)
    return kernels.grad_p(dy3, x3, p, q).to(p.dtype).contiguous()


@_kron_grad_p_op.register_fake
def _(dy2, x2, q, p, in_left, in_right, out_left, out_right, order, backend):
    return torch.empty_like(p)


class KronFunction(torch.autograd.Function):
    """``y = x dW^T`` with dW the Kronecker sum of ``(q, p)``; saves x (and the small factors), recomputes the
    kernels' intermediates in backward. ``layout = (n_L, n_R, m_L, m_R, order)``."""

    @staticmethod
    def forward(ctx, x2: Tensor, q: Tensor, p: Tensor, layout: tuple, backend: str) -> Tensor:
        n_l, n_r, m_l, m_r, order = layout
        y2 = torch.ops.ttkernels.ttm_kron_apply(x2, q, p, n_l, n_r, m_l, m_r, order, backend)
        ctx.save_for_backward(x2, q, p)
        ctx.layout, ctx.backend = layout, backend
        return y2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy2: Tensor):
        x2, q, p = ctx.saved_tensors
        n_l, n_r, m_l, m_r, order = ctx.layout
        dy2 = dy2.contiguous()
        dx2 = dq = dp = None
        if ctx.needs_input_grad[0]:  # dx_b = sum_r Q_r^T dY_b P_r^T: the forward with both factors transposed
            qt, pt = q.transpose(1, 2).contiguous(), p.transpose(1, 2).contiguous()
            dx2 = torch.ops.ttkernels.ttm_kron_apply(dy2, qt, pt, m_l, m_r, n_l, n_r, order, ctx.backend)
        if ctx.needs_input_grad[1]:
            dq = torch.ops.ttkernels.ttm_kron_grad_q(dy2, x2, q, p, n_l, n_r, m_l, m_r, order, ctx.backend)
        if ctx.needs_input_grad[2]:
            dp = torch.ops.ttkernels.ttm_kron_grad_p(dy2, x2, q, p, n_l, n_r, m_l, m_r, order, ctx.backend)
        return dx2, dq, dp, None, None


# ------------------------------------------------------------------------------------------------ paths
def _kron_apply(x2: Tensor, cores: Sequence[Tensor], scaling: float, spec: TTMSpec, backend: str) -> Optional[Tensor]:
    """The fused path, or None when no split fits the kernels (the caller runs the staged sweep)."""
    kron_kernels(backend, x2.device)  # first: a device the kernels cannot run on is refused either way
    split = dispatch.kron_split_for(spec, backend)
    if split is None:
        return None
    q, p = kron_factors(cores, split)
    q = (q * scaling).to(x2.dtype).contiguous()
    p = p.to(x2.dtype).contiguous()
    k = split.cut
    layout = (
        math.prod(spec.in_modes[:k]),
        math.prod(spec.in_modes[k:]),
        math.prod(spec.out_modes[:k]),
        math.prod(spec.out_modes[k:]),
        split.order,
    )
    return KronFunction.apply(x2.contiguous(), q, p, layout, backend)


def _dense_apply(x2: Tensor, cores: Sequence[Tensor], scaling: float) -> Tensor:
    """Reconstruct-then-GEMM: dW built from the cores (in their dtype, float32 at least), one GEMM."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    dw = ttm_dense([c.to(acc) for c in cores]) * scaling
    return F.linear(x2, dw.to(x2.dtype))


def check_scaling(scaling: object) -> float:
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise TypeError(f"scaling must be a finite real number (not a tensor), got {scaling!r}")
    return float(scaling)


def ttm_apply(
    x: Tensor,
    cores: Sequence[Tensor],
    *,
    scaling: float = 1.0,
    order: Optional[str] = None,
    backend: str = "auto",
) -> Tensor:
    """``scaling * x dW^T`` for ``x`` of shape ``(..., d_in)``, differentiable; activation memory saved for
    backward is x alone on every path.

    ``backend``:

    * ``"torch"``: the einsum sweep (:func:`~ttkernels.ttm.reference.ttm_plan` picks ``order``, ``"ltr"`` or
      ``"rtl"``, when None), analytic backward; float32, float64, bfloat16, float16, any device. The cores are cast
      to x's dtype.
    * ``"triton"`` / ``"cuda"``: the fused Kronecker-sum kernels (``choose_split`` cuts the chain; the factors
      are merged in the cores' dtype, then cast to x's). float32, bfloat16, float16. Where no cut keeps the
      second factor within the Triton kernels' limit (128 per side), the staged sweep runs instead (each stage a
      vendor GEMM, intermediates in memory); ``"cuda"`` (bond ranks <= 16, sides <= 64) raises.
    * ``"dense"``: reconstruct-then-GEMM (dW built in float32, one GEMM in x's dtype).
    * ``"auto"`` (default): ``"torch"`` off CUDA or in float64; on CUDA, :func:`ttm_dispatch`.
    * ``"kron-torch"``: the fused path's plumbing with torch contractions (tests, float64).

    Bad input (x not a float32/float64/bfloat16/float16 tensor, a wrong last dimension, cores that do not chain,
    a kernel backend asked for float64) raises TypeError / ValueError naming the argument.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in X_DTYPES:
        raise TypeError(f"x must be a floating-point tensor (float32, float64, bfloat16 or float16), got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have shape (..., in_features); got a 0-d tensor")
    if isinstance(cores, Tensor) or not isinstance(cores, Sequence):
        raise TypeError(f"cores must be a sequence of 4-D tensors, got {type(cores).__name__}")
    cores = list(cores)
    spec = spec_of(cores)
    spec.check_cores(cores)  # the spec's bonds come from the cores: a broken chain or end fails here
    for k, c in enumerate(cores):
        if c.device != x.device:
            raise ValueError(f"cores[{k}] is on {c.device} but x is on {x.device}")
    if x.shape[-1] != spec.in_features:
        raise ValueError(f"x has last dimension {x.shape[-1]} but the cores take {spec.in_features} inputs")
    if order not in (None, "ltr", "rtl"):
        raise ValueError(f"order must be 'ltr', 'rtl' or None, got {order!r}")
    if backend not in TTM_BACKENDS:
        raise ValueError(f"backend must be one of {TTM_BACKENDS}, got {backend!r}")
    scaling = check_scaling(scaling)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec.in_features)
    if backend == "auto":
        backend = ttm_dispatch(spec, x2.shape[0], x.dtype, x.device)
    if backend in ("triton", "cuda") and x.dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r} computes in float32, bfloat16 or float16, not {x.dtype}; use backend='torch'"
        )
    y = None
    if backend == "dense":
        y = _dense_apply(x2, cores, scaling)
    elif backend in ("triton", "cuda", "kron-torch"):
        y = _kron_apply(x2, cores, scaling, spec, backend)
        if y is None and backend == "cuda":
            raise ValueError(
                f"backend='cuda' runs TT-matrix chains with a cut of bond rank <= 16 and sides <= 64; "
                f"{spec.describe()} has none: use backend='triton' or 'torch'"
            )
    if y is None:  # torch, or the staged plan of a chain the fused kernels cannot hold
        y = ttm_sweep(x2, cores, scaling, order)
    return y.reshape(*lead, spec.out_features)


def ttm_dispatch(spec: TTMSpec, tokens: int, dtype: torch.dtype, device: torch.device) -> str:
    """What ``backend="auto"`` runs for this shape: ``"torch"`` off CUDA or in float64; on CUDA the fastest of
    ``"triton"``, ``"cuda"`` (where its limits allow) and ``"dense"``, measured once per spec, power-of-two token
    bucket, dtype and device and cached (:mod:`ttkernels.ttm.dispatch`; a candidate that fails is warned about
    and recorded, never silently skipped)."""
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"
    key = (spec, dispatch.token_bucket(tokens), dtype, device)
    if key in dispatch.cache:
        return dispatch.cache[key]
    capturing = torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()
    if dispatch.DISPATCH_MODE == "model" or capturing:
        return dispatch.dispatch_model(spec, tokens)
    with torch.enable_grad():
        best, failed = dispatch.measure(
            spec, tokens, dtype, device, dispatch.candidates(spec), lambda x, c, name: ttm_apply(x, c, backend=name)
        )
    dispatch.cache[key] = best
    if failed:
        dispatch.failures[key] = failed
    return best
