"""The op registry: every op of docs/design.md section 2 defined once, with backend dispatch.

Layers, from the outside in:

* :func:`tt_linear` / :func:`tt_adapter` — the functional API. They check every argument (shape, dtype,
  device, ranges) with errors that name it, flatten leading dimensions, apply autocast's casting rule,
  and call the fused op.
* ``torch.ops.ttkernels.tt_adapter_fwd`` / ``tt_adapter_bwd`` — the fused forward (steps 2-3) and backward
  (steps 4-7), defined with :class:`torch.library.Library` and fake implementations for tracing; autograd
  is a Python :class:`torch.autograd.Function` around them, which ``torch.compile`` traces (fullgraph).
  One dispatcher call forward, one backward.
* ``torch.ops.ttkernels.{shrink, expand, grad_dy, grad_mid, grad_x, grad_a}`` — each step alone, for
  benchmarks and for testing a backend step by step.
* ``torch.ops.ttkernels.tt_factor_side`` / ``tt_factor_side_bwd`` — step 1 for one side of the factors and
  its backward (step 8), Triton only; :func:`factors` plans the sides from the spec and calls them.
* :class:`Backend` — a table of the six step functions (and ``mid``, backward's ``U = S C``). The fused ops
  call a backend's functions directly (no nested dispatch). :mod:`ttkernels.reference` is the ``torch``
  backend, ``ttkernels._triton_kernels.backend`` the ``triton`` one, ``ttkernels._cuda_backend`` (the
  extension's ops, csrc/) the ``cuda`` one.

One step, one name (docs/design.md section 2): the step ``X`` is ``ttkernels.reference.X``, the op
``torch.ops.ttkernels.X``, the Triton launcher ``X`` in ``triton_kernels/X.py`` and the CUDA binding ``X`` in
csrc/bindings.cpp (op ``torch.ops.ttkernels_cuda.X``). A kernel that serves several steps lives in one file named
for what it does (``gemm.py``, ``accumulate.cu``, ``rowmix.cu``, ``token_reduce.cu``, ``finalize.cu``); the table
says which. Tests: ``test_X`` in tests/test_steps.py, parametrized over the runners ``triton`` (interpreter on
the CPU), ``cuda-emulated`` (the CUDA kernels' source on the CPU) and ``cuda`` (on a GPU); tests/test_ops.py for
the op. Benchmark row: ``bench/micro.py``'s op ``X`` (``python -m bench --preset micro``).

========== =================== ========================================== ==========================================
step       reference           Triton: triton_kernels/file:function       CUDA: csrc/file:kernel
========== =================== ========================================== ==========================================
1 factors  ``factors``         factors.py:side_forward                    (none: torch or Triton)
           (one side:          (``_side_fwd_kernel``)                     tests: test_triton_factors.py,
           ``tt_factor_side``)                                            test_reference.py; bench: ``factors``
2 shrink   ``shrink``          shrink.py:shrink (``_shrink_kernel``,      shrink.cu:shrink_kernel (fp32),
                               ``_shrink_partial_kernel``)                shrink_mma_kernel (fp16 / bf16),
                                                                          shrink_finish_kernel (split-K); tests:
                                                                          ``test_shrink_and_mid``,
                                                                          ``test_shrink_tiles``
3 expand   ``expand``          gemm.py:gemm_lowrank                       accumulate.cu:accumulate_kernel,
                               (``_gemm_lowrank_kernel``, also grad_x)    accumulate_mma_kernel (also grad_x);
                                                                          bench: ``expand`` beside ``frozen``
mid        ``mid``             mid.py:mid (``_task_matmul_kernel``,       rowmix.cu:rowmix_kernel (also grad_mid's
(U = S C)                      also grad_mid's dS)                        dS); tests: ``test_shrink_and_mid``
4 grad_dy  ``grad_dy``         grad_dy.py:grad_dy (``_grad_dy_kernel``)   grad_dy.cu:grad_dy_kernel,
                                                                          grad_dy_mma_kernel; finalize.cu
5 grad_mid ``grad_mid``        grad_mid.py:grad_mid                       rowmix.cu:rowmix_kernel (dS),
                               (``_task_grad_c_kernel``; dS by mid.py)    token_reduce.cu:token_reduce_kernel (dC)
6 grad_x   ``grad_x``          gemm.py:gemm_lowrank (as expand)           accumulate.cu (as expand);
                                                                          bench: ``grad_x`` beside ``frozen``
7 grad_a   ``grad_a``          grad_a.py:grad_a (``_grad_a_kernel``)      token_reduce.cu:token_reduce_kernel,
                                                                          token_reduce_mma_kernel (also grad_mid's
                                                                          dC); finalize.cu
8 core     autograd of         factors.py:side_backward                   (none); tests: test_triton_factors.py
grads      ``factors``         (``_side_bwd_kernel``; op
                               ``tt_factor_side_bwd``)
========== =================== ========================================== ==========================================

Whole passes: the fused ops ``tt_adapter_fwd`` / ``tt_adapter_bwd`` call the steps above, except Triton's default
``cublas`` plan, which runs steps 2-3 and 4-7 as rows.py:forward / backward (``_rows_fwd_kernel``,
``_rows_bwd_kernel``, ``_finalize_kernel``; tests: tests/test_triton_plans.py), and Triton's ``fused`` plan,
whose backward runs grad_dy for dU only and then steps 6, 7 and dB in one launch, gemm_grad.py:gemm_grad
(``_gemm_grad_kernel``, then ``_finalize_kernel``; tests: tests/test_triton_plans.py); ``finalize.cu:finalize_kernel``
is the in-order fp32 sum every CUDA reduction ends with.

``backend`` is one of ``"auto"``, ``"torch"``, ``"triton"``, ``"cuda"``. ``torch`` runs everywhere; ``triton``
runs on CUDA tensors (and on the CPU under ``TRITON_INTERPRET=1``, for tests) and is imported on first use;
``cuda`` runs on CUDA tensors when the extension ``ttkernels._C`` is built (otherwise
:class:`BackendUnavailableError` gives the command that builds it). ``auto`` resolves to ``torch`` on every
device until GPU benchmark rows show another backend winning (README, "Choosing a backend").

Saved for backward: ``x``, ``S`` (``M x r_a``), the token-independent factors, the frozen weight (a
parameter) and the dropout seed — never a mask, never ``U``, never delta-W. The seed is a one-element int64
tensor on x's device that every backend reads there (the Triton and CUDA kernels load it on the device): no
step reads it on the host.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from . import checks, reference
from .checks import (
    BACKENDS,
    KERNEL_DTYPES,
    BackendUnavailableError,
    check_backend_name,
    check_dropout,
    check_kernel_limits,  # noqa: F401  (still importable from here)
)
from .spec import TTSpec

__all__ = [
    "BACKENDS",
    "Backend",
    "BackendUnavailableError",
    "expand_task_ids",
    "factors",
    "input_compute_dtype",
    "register_backend",
    "resolve_backend",
    "tt_adapter",
    "tt_linear",
]


@dataclass(frozen=True)
class Backend:
    """The step functions of one backend, with the signatures of :mod:`ttkernels.reference`."""

    name: str
    shrink: Callable[..., tuple[Tensor, Tensor]]
    expand: Callable[..., Tensor]
    grad_dy: Callable[..., tuple[Tensor, Tensor]]
    grad_mid: Callable[..., tuple[Tensor, Optional[Tensor]]]
    grad_x: Callable[..., Tensor]
    grad_a: Callable[..., Tensor]
    # U = S C from the saved S, in backward
    mid: Callable[..., Tensor] = reference.mid
    # Optional whole-pass functions that replace the steps in the fused ops (a backend whose kernels cross
    # step boundaries): forward(x, weight, bias, A, C, B, task_ids, scaling, p, seed) -> (y, S) and
    # backward(dy, x, weight, A, C, B, S, task_ids, scaling, p, seed, need_dx) -> (dx, dA, dC or None, dB).
    forward: Optional[Callable[..., tuple[Tensor, Tensor]]] = None
    backward: Optional[Callable[..., tuple]] = None

    @classmethod
    def from_module(cls, name: str, module: object) -> Backend:
        """The backend whose step functions are ``module``'s functions of the same names."""
        steps = [f.name for f in dataclasses.fields(cls) if f.name not in ("name", "forward", "backward")]
        passes = {p: getattr(module, p) for p in ("forward", "backward") if callable(getattr(module, p, None))}
        return cls(name, **{step: getattr(module, step) for step in steps}, **passes)


TORCH_BACKEND = Backend.from_module("torch", reference)

_IMPLEMENTED: dict[str, Backend] = {"torch": TORCH_BACKEND}


def register_backend(backend: Backend) -> None:
    """Make ``backend.name`` (one of :data:`BACKENDS` other than ``auto``) dispatchable."""
    if backend.name not in BACKENDS or backend.name == "auto":
        raise ValueError(f"backend name must be one of {BACKENDS[1:]}, got {backend.name!r}")
    _IMPLEMENTED[backend.name] = backend


def _triton_backend(device: torch.device) -> Backend:
    """The Triton kernels (imported on first use: importing triton costs about a second)."""
    if "triton" not in _IMPLEMENTED:
        try:
            from ._triton_kernels import backend as tb
        except ImportError as err:
            raise BackendUnavailableError(
                f"backend='triton' needs the triton package, which failed to import: {err}"
            ) from err
        _IMPLEMENTED["triton"] = Backend.from_module("triton", tb)
    from ._triton_kernels.backend import check_device

    why = check_device(device)
    if why is not None:
        gpu = "" if torch.cuda.is_available() else "; this machine has no CUDA GPU"
        raise BackendUnavailableError(f"{why}{gpu}. Use backend='auto' or backend='torch'.")
    return _IMPLEMENTED["triton"]


def _cuda_backend(device: torch.device) -> Backend:
    """The CUDA C++ kernels of the extension ``ttkernels._C`` (loaded on first use)."""
    if device.type != "cuda":
        gpu = "" if torch.cuda.is_available() else "; this machine has no CUDA GPU"
        raise BackendUnavailableError(
            f"backend='cuda' runs on CUDA tensors, but x is on {device}{gpu}. Use backend='auto' or backend='torch'."
        )
    if "cuda" not in _IMPLEMENTED:
        from . import _cuda_backend, _ext

        try:
            _cuda_backend.load()
        except _ext.CUDAExtensionNotBuiltError as err:
            raise BackendUnavailableError(f"backend='cuda' needs the CUDA extension ttkernels._C. {err}") from err
        _IMPLEMENTED["cuda"] = Backend.from_module("cuda", _cuda_backend)
    return _IMPLEMENTED["cuda"]


def resolve_backend(backend: str, device: torch.device) -> Backend:
    """The backend that runs on ``device``. ``auto``: torch everywhere (see README, "Choosing a backend")."""
    check_backend_name(backend)
    if backend == "auto":
        return TORCH_BACKEND
    if backend == "triton":
        return _triton_backend(device)
    if backend == "cuda":
        return _cuda_backend(device)
    return _IMPLEMENTED[backend]


def _seed(seed: Optional[Tensor], be: Backend) -> int | Tensor:
    """The dropout seed as ``be`` takes it: the int64 tensor on the data's device, never read on the host. The
    torch backend hashes it where it lives; the Triton and CUDA kernels load it on the device. So a captured CUDA
    graph hashes the seed's value at each replay (0 when there is no dropout: no seed was drawn)."""
    return 0 if seed is None else seed


def _check_task_ids_range(task_ids: Optional[Tensor], C: Optional[Tensor], be: Backend) -> None:
    # Runs inside the ops (not the Python wrapper) so that compiled graphs check values too, on the ids' device
    # (checks.check_task_ids_range: no host read on a GPU). The cuda backend's binding checks the ids itself
    # (and, while a CUDA graph is captured, its kernels turn an out-of-range id into NaN instead of reading out
    # of bounds).
    if task_ids is None or be.name == "cuda":
        return
    assert C is not None
    checks.check_task_ids_range(task_ids, C.shape[0])


# ---------------------------------------------------------------------------------- op definitions
# torch.library definitions: one kernel for every backend dispatch key (it dispatches on ``backend``
# itself), a fake for tracing, and a Python kernel at the Autograd key. The fused forward's Autograd kernel
# is an autograd.Function; every other op is not differentiable and says so when asked for gradients.
# bench/overhead.py measures what this costs per call (see README: "Per-call overhead").
_lib = torch.library.Library("ttkernels", "DEF")


def _define(
    schema: str, fake: Callable[..., object], autograd: Callable[..., object] | None = None
) -> Callable[[Callable[..., object]], Callable[..., object]]:
    name = schema.split("(", 1)[0]

    def refuse_grad(*args):
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
            raise RuntimeError(
                f"torch.ops.ttkernels.{name} is not differentiable; use ttkernels.tt_adapter or "
                "ttkernels.tt_linear (or TTLinear) for autograd"
            )
        with torch._C._AutoDispatchBelowAutograd():
            return getattr(torch.ops.ttkernels, name)(*args)

    def register(impl: Callable[..., object]) -> Callable[..., object]:
        _lib.define(schema)
        _lib.impl(name, impl, "CompositeExplicitAutograd")
        _lib.impl(name, autograd or refuse_grad, "Autograd")
        torch.library.register_fake(f"ttkernels::{name}", fake, lib=_lib)
        return impl

    return register


def _fwd_fake(x, weight, bias, A, C, B, task_ids, scaling, dropout_p, seed, backend):
    return x.new_empty((x.shape[0], weight.shape[0])), x.new_empty((x.shape[0], A.shape[1]))


def _fwd_autograd(*args):
    return _TTAdapterFunction.apply(*args)


@_define(
    "tt_adapter_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor A, Tensor? C, Tensor B, Tensor? task_ids, "
    "float scaling, float dropout_p, Tensor? seed, str backend) -> (Tensor, Tensor)",
    _fwd_fake,
    _fwd_autograd,
)
def _fwd_op(x, weight, bias, A, C, B, task_ids, scaling, dropout_p, seed, backend):
    """Steps 2-3: returns ``(y, S)``."""
    be = resolve_backend(backend, x.device)
    _check_task_ids_range(task_ids, C, be)
    if be.forward is not None:
        return be.forward(x, weight, bias, A, C, B, task_ids, scaling, dropout_p, _seed(seed, be))
    S, U = be.shrink(x, A, C, task_ids, dropout_p, _seed(seed, be))
    return be.expand(x, weight, bias, U, B, scaling), S


def _bwd_fake(dy, x, weight, A, C, B, S, task_ids, scaling, dropout_p, seed, backend, need_dx):
    dx = torch.empty_like(x) if need_dx else x.new_empty(0)
    dC = torch.empty_like(C) if C is not None else A.new_empty(0)
    return dx, torch.empty_like(A), dC, torch.empty_like(B)


@_define(
    "tt_adapter_bwd(Tensor dy, Tensor x, Tensor weight, Tensor A, Tensor? C, Tensor B, Tensor S, "
    "Tensor? task_ids, float scaling, float dropout_p, Tensor? seed, str backend, bool need_dx) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
    _bwd_fake,
)
def _bwd_op(dy, x, weight, A, C, B, S, task_ids, scaling, dropout_p, seed, backend, need_dx):
    """Steps 4-7: returns ``(dx, dA, dC, dB)``; dx is empty when not needed, dC when C is None."""
    be = resolve_backend(backend, x.device)
    s = _seed(seed, be)
    if be.backward is not None:
        dx, dA, dC, dB = be.backward(dy, x, weight, A, C, B, S, task_ids, scaling, dropout_p, s, need_dx)
        return dx, dA, (dC if dC is not None else A.new_empty(0)), dB
    U = be.mid(S, C, task_ids)
    dU, dB = be.grad_dy(dy, U, B, scaling)
    dS, dC = be.grad_mid(S, dU, C, task_ids)
    dx = be.grad_x(dy, weight, dS, A, dropout_p, s) if need_dx else x.new_empty(0)
    dA = be.grad_a(x, dS, dropout_p, s)
    return dx, dA, (dC if dC is not None else A.new_empty(0)), dB


class _TTAdapterFunction(torch.autograd.Function):
    """The Autograd kernel of ``tt_adapter_fwd``: saves x, S, the factors and the seed; no mask, no U."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, C, B, task_ids, scaling, dropout_p, seed, backend):
        with torch._C._AutoDispatchBelowAutograd():
            y, S = torch.ops.ttkernels.tt_adapter_fwd(
                x, weight, bias, A, C, B, task_ids, scaling, dropout_p, seed, backend
            )
        ctx.mark_non_differentiable(S)
        ctx.save_for_backward(x, weight, A, C, B, S, task_ids, seed)
        ctx.scaling, ctx.dropout_p, ctx.backend = scaling, dropout_p, backend
        return y, S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dS):
        x, weight, A, C, B, S, task_ids, seed = ctx.saved_tensors
        need = ctx.needs_input_grad
        dy = dy.contiguous()
        dx, dA, dC, dB = torch.ops.ttkernels.tt_adapter_bwd(
            dy, x, weight, A, C, B, S, task_ids, ctx.scaling, ctx.dropout_p, seed, ctx.backend, need[0]
        )
        # The base is normally frozen; if it is not, its gradients are plain GEMMs on dy.
        dW = dy.t() @ x if need[1] else None
        db = dy.sum(0) if need[2] else None
        return (dx if need[0] else None), dW, db, dA, (dC if need[4] else None), dB, *([None] * 5)


# ------------------------------------------------------------------------------------ step ops alone
def _shrink_fake(x, A, C, task_ids, dropout_p, seed, backend):
    rb = A.shape[1] if C is None else C.shape[-1]
    return x.new_empty((x.shape[0], A.shape[1])), x.new_empty((x.shape[0], rb))


@_define(
    "shrink(Tensor x, Tensor A, Tensor? C, Tensor? task_ids, float dropout_p, Tensor? seed, str backend) "
    "-> (Tensor, Tensor)",
    _shrink_fake,
)
def _shrink_op(x, A, C, task_ids, dropout_p, seed, backend):
    be = resolve_backend(backend, x.device)
    _check_task_ids_range(task_ids, C, be)
    S, U = be.shrink(x, A, C, task_ids, dropout_p, _seed(seed, be))
    return S, (U.clone() if U is S else U)  # op outputs may not alias each other


@_define(
    "expand(Tensor x, Tensor weight, Tensor? bias, Tensor U, Tensor B, float scaling, str backend) -> Tensor",
    lambda x, weight, bias, U, B, scaling, backend: x.new_empty((x.shape[0], weight.shape[0])),
)
def _expand_op(x, weight, bias, U, B, scaling, backend):
    return resolve_backend(backend, x.device).expand(x, weight, bias, U, B, scaling)


@_define(
    "grad_dy(Tensor dy, Tensor U, Tensor B, float scaling, str backend) -> (Tensor, Tensor)",
    lambda dy, U, B, scaling, backend: (dy.new_empty((dy.shape[0], B.shape[0])), torch.empty_like(B)),
)
def _grad_dy_op(dy, U, B, scaling, backend):
    return resolve_backend(backend, dy.device).grad_dy(dy, U, B, scaling)


@_define(
    "grad_mid(Tensor S, Tensor dU, Tensor? C, Tensor? task_ids, str backend) -> (Tensor, Tensor)",
    lambda S, dU, C, task_ids, backend: (
        torch.empty_like(S),
        torch.empty_like(C) if C is not None else S.new_empty(0),
    ),
)
def _grad_mid_op(S, dU, C, task_ids, backend):
    """Returns ``(dS, dC)``; dC is empty when C is None."""
    be = resolve_backend(backend, S.device)
    _check_task_ids_range(task_ids, C, be)
    dS, dC = be.grad_mid(S, dU, C, task_ids)
    return (dS.clone() if dS is dU else dS), (dC if dC is not None else S.new_empty(0))


@_define(
    "grad_x(Tensor dy, Tensor weight, Tensor dS, Tensor A, float dropout_p, Tensor? seed, str backend) -> Tensor",
    lambda dy, weight, dS, A, dropout_p, seed, backend: dy.new_empty((dy.shape[0], weight.shape[1])),
)
def _grad_x_op(dy, weight, dS, A, dropout_p, seed, backend):
    be = resolve_backend(backend, dy.device)
    return be.grad_x(dy, weight, dS, A, dropout_p, _seed(seed, be))


@_define(
    "grad_a(Tensor x, Tensor dS, float dropout_p, Tensor? seed, str backend) -> Tensor",
    lambda x, dS, dropout_p, seed, backend: x.new_empty((x.shape[1], dS.shape[1])),
)
def _grad_a_op(x, dS, dropout_p, seed, backend):
    be = resolve_backend(backend, x.device)
    return be.grad_a(x, dS, dropout_p, _seed(seed, be))


# ----------------------------------------------------------------------------------- factor ops (1, 8)
# One side of the factors (A: the cores up to the last in mode; B: from the first out mode on, read
# transposed) as one op, so that torch.compile sees an opaque call; only the triton backend has kernels for it.
def _side_fake(cores, divisors, fixed, transposed, rows, r_out, dtype):
    return cores[0].new_empty((r_out, rows) if transposed else (rows, r_out), dtype=dtype)


def _side_autograd(cores, divisors, fixed, transposed, rows, r_out, dtype):
    return _FactorSideFunction.apply(divisors, fixed, transposed, rows, r_out, dtype, *cores)


@_define(
    "tt_factor_side(Tensor[] cores, int[] divisors, int[] fixed, bool transposed, int rows, int r_out, "
    "ScalarType dtype) -> Tensor",
    _side_fake,
    _side_autograd,
)
def _side_op(cores, divisors, fixed, transposed, rows, r_out, dtype):
    """Step 1 for one side with two or more cores: the factor in ``dtype`` (Triton kernels)."""
    _triton_backend(cores[0].device)
    from ._triton_kernels.factors import side_forward

    return side_forward(cores, divisors, fixed, transposed, rows, r_out, dtype)


@_define(
    "tt_factor_side_bwd(Tensor dout, Tensor[] cores, int[] divisors, int[] fixed, bool transposed, int rows, "
    "int r_out) -> Tensor",
    lambda dout, cores, divisors, fixed, transposed, rows, r_out: cores[0].new_empty(
        sum(c.numel() for c in cores), dtype=torch.float32
    ),
)
def _side_bwd_op(dout, cores, divisors, fixed, transposed, rows, r_out):
    """Step 8 for one side: its cores' gradients, concatenated flat in float32 (split by the caller)."""
    _triton_backend(cores[0].device)
    from ._triton_kernels.factors import side_backward

    return side_backward(dout, cores, divisors, fixed, transposed, rows, r_out)


class _FactorSideFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, divisors, fixed, transposed, rows, r_out, dtype, *cores):
        with torch._C._AutoDispatchBelowAutograd():
            out = torch.ops.ttkernels.tt_factor_side(list(cores), divisors, fixed, transposed, rows, r_out, dtype)
        ctx.save_for_backward(*cores)
        ctx.args = (divisors, fixed, transposed, rows, r_out)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        cores = ctx.saved_tensors
        flat = torch.ops.ttkernels.tt_factor_side_bwd(dout, list(cores), *ctx.args)
        grads = torch.split(flat, [c.numel() for c in cores])
        return (None,) * 6 + tuple(g.view(c.shape).to(c.dtype) for g, c in zip(grads, cores))


def side_plans(spec: TTSpec, index: Mapping[str, int]) -> list[tuple]:
    """Per side: (core positions in chain order, divisors, fixed indices, transposed, rows, r_out).

    Row ``i`` of A takes in-core ``k``'s slice ``(i // prod(later in sizes)) % size_k`` (C order); a fixed
    index core takes ``index[name]`` for every row (divisor 0). B's chain runs from the last core backwards.
    """
    modes, K, bonds = spec.modes, spec.num_cores, spec.bond_ranks
    plans = []
    for order, role, rows, r_out, transposed in (
        (range(spec.last_in + 1), "in", spec.in_features, bonds[spec.last_in + 1], False),
        (range(K - 1, spec.first_out - 1, -1), "out", spec.out_features, bonds[spec.first_out], True),
    ):
        divisors, fixed = [], []
        for k in order:
            if modes[k].role == role:
                divisors.append(math.prod([modes[j].size for j in range(k + 1, K) if modes[j].role == role]))
                fixed.append(0)
            else:
                divisors.append(0)
                fixed.append(int(index[modes[k].name]))
        plans.append((list(order), divisors, fixed, transposed, rows, r_out))
    return plans


_FACTOR_DTYPES = KERNEL_DTYPES
_MAX_SIDE_CORES = 8
_MAX_FACTOR_RANK = 128


def factors(
    cores: Sequence[Tensor],
    spec: TTSpec,
    index: Mapping[str, int] | None = None,
    *,
    dtype: Optional[torch.dtype] = None,
    backend: str = "auto",
) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """The factors ``(A, C, B)`` of ``reference.factors``, A and B in ``dtype`` (default: the cores'), as
    ``backend`` computes them (differentiable).

    ``triton``: each side of two or more cores is one ``tt_factor_side`` launch forward and one backward; a
    side of one core is a view; C is torch's product of the index slices. Where the Triton kernels do not
    apply (float64, cores of mixed dtypes, ranks above 128, more than 8 cores in a side) and for every other
    backend, this is ``reference.factors`` through torch autograd.
    """
    check_backend_name(backend)
    if not isinstance(spec, TTSpec):
        raise TypeError(f"spec must be a TTSpec, got {type(spec).__name__}")
    if isinstance(cores, Tensor) or not isinstance(cores, Iterable):
        raise TypeError(f"cores must be a sequence of torch.Tensor (one per mode), got {type(cores).__name__}")
    cores = list(cores)
    checks.check_float_dtype(dtype, "dtype")
    fast = (
        backend == "triton"
        and len(cores) > 0
        and all(isinstance(c, Tensor) for c in cores)
        and (dtype or cores[0].dtype) in _FACTOR_DTYPES
        and cores[0].dtype in _FACTOR_DTYPES
        and all(c.dtype == cores[0].dtype for c in cores)
        and max(spec.bond_ranks) <= _MAX_FACTOR_RANK
    )
    if fast:
        reference.check_cores(cores, spec)
        index = spec.check_index(index)
        plans = side_plans(spec, index)
        fast = all(len(plan[0]) <= _MAX_SIDE_CORES for plan in plans)
    if not fast:
        A, C, B = reference.factors(cores, spec, index)
        return (A, C, B) if dtype is None else (A.to(dtype), C, B.to(dtype))
    dtype = dtype or cores[0].dtype
    sides = []
    for order, divisors, fixed, transposed, rows, r_out in plans:
        chain = [cores[k] for k in order]
        if len(chain) == 1:
            r0, s, r1 = chain[0].shape
            sides.append(chain[0].reshape(r0, s) if transposed else chain[0].reshape(s, r1))
        else:
            sides.append(torch.ops.ttkernels.tt_factor_side(chain, divisors, fixed, transposed, rows, r_out, dtype))
    return sides[0].to(dtype), reference.factor_c(cores, spec, index), sides[1].to(dtype)


# ------------------------------------------------------------------------------------ functional API
def _check_tensor(t: object, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_shape(t: Tensor, name: str, shape: tuple[int, ...], meaning: str) -> None:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must be {shape} ({meaning})")


def input_compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the layer computes in: autocast's when it is on for x's device (as nn.Linear does)."""
    dev = x.device.type
    if dev == "meta":
        raise ValueError("x is on the meta device: the adapter needs real values (materialize the model and inputs)")
    if x.dtype != torch.float64 and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def expand_task_ids(task_ids: object, lead: tuple[int, ...]) -> Tensor:
    """``task_ids`` (x's leading shape or a prefix of it, one id per sample) checked and expanded to one int64
    id per row of x flattened to ``(-1, in_features)``."""
    ids = _check_tensor(task_ids, "task_ids")
    if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise TypeError(f"task_ids must be an integer tensor, got {ids.dtype}")
    if ids.dim() > len(lead) or tuple(ids.shape) != lead[: ids.dim()]:
        raise ValueError(
            f"task_ids has shape {tuple(ids.shape)}; it must be x's leading shape {lead} or a prefix of it "
            "(one id per sample)"
        )
    ids = ids.reshape(tuple(ids.shape) + (1,) * (len(lead) - ids.dim())).expand(lead).reshape(-1)
    return ids.to(torch.int64)


def dropout_seed(seed: int | Tensor | None, device: torch.device) -> Tensor:
    """The dropout seed every backend takes: one int64 on the data's ``device``, never read on the host.

    None: drawn there from the device's generator (on a GPU a Philox draw, which a captured CUDA graph redraws
    at every replay, advancing the generator's offset as eager calls do). A tensor: moved there and
    range-checked there (``torch._assert_async``). An int: ``checks.device_seed`` (checked on the host, written
    there by a fill: no host-to-device copy, so the host never waits for the stream). The torch
    backend hashes it where it lies; the Triton and CUDA kernels load it on the device.
    """
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    if isinstance(seed, Tensor):
        seed_t = seed.reshape(()).to(device=device, dtype=torch.int64)
        if not torch.compiler.is_compiling():
            _check_seed_tensor(seed_t)
        return seed_t
    return checks.device_seed(seed, device)


def _check_seed_tensor(seed: Tensor) -> None:
    ok = seed >= 0
    if seed.device.type != "cpu":
        torch._assert_async(ok)  # no host read (see checks.check_task_ids_range)
        return
    try:
        torch._assert_async(ok, "seed")
    except RuntimeError:
        raise ValueError(f"seed must be in [0, 2**63), got {int(seed)}") from None


def tt_adapter(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    A: Tensor,
    C: Optional[Tensor],
    B: Tensor,
    *,
    task_ids: Optional[Tensor] = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    seed: int | Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``y = x W^T + b + scaling * drop(x) A C B`` for ``x`` of shape ``(..., d_in)``.

    ``C`` is None, ``(r_a, r_b)``, or ``(T, r_a, r_b)`` with ``task_ids`` (an integer tensor of x's leading
    shape, or a prefix of it: one id per sample) choosing each row's slice. ``dropout`` applies to the
    adapter's input only; its mask is a function of ``seed`` (an int, or an integer tensor used where it
    lies, never read on the host; when None, drawn on x's device from its default generator, so a captured
    CUDA graph draws a fresh one at each replay), regenerated in backward. The output has the compute dtype: x's, or autocast's when it is on.
    """
    x = _check_tensor(x, "x")
    weight = _check_tensor(weight, "weight")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError("x must have shape (..., in_features); got a 0-d tensor")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"x has last dimension {x.shape[-1]} but in_features is {d_in}")
    if bias is not None:
        _check_shape(_check_tensor(bias, "bias"), "bias", (d_out,), "out_features")
    A, B = _check_tensor(A, "A"), _check_tensor(B, "B")
    for name, t in (("A", A), ("C", C), ("B", B)):
        if t is not None and not _check_tensor(t, name).is_floating_point():
            raise TypeError(f"{name} must be a real floating-point tensor, got {t.dtype}")
    if A.dim() != 2 or A.shape[0] != d_in:
        raise ValueError(f"A has shape {tuple(A.shape)} but must be (in_features={d_in}, r_a)")
    if B.dim() != 2 or B.shape[1] != d_out:
        raise ValueError(f"B has shape {tuple(B.shape)} but must be (r_b, out_features={d_out})")
    ra, rb = A.shape[1], B.shape[0]
    lead = tuple(x.shape[:-1])
    if C is None:
        if ra != rb:
            raise ValueError(f"without C, A's columns ({ra}) must equal B's rows ({rb})")
        if task_ids is not None:
            raise ValueError("task_ids was given but C has no per-sample (task) axis")
    else:
        C = _check_tensor(C, "C")
        if C.dim() == 2:
            _check_shape(C, "C", (ra, rb), "r_a x r_b")
            if task_ids is not None:
                raise ValueError("task_ids was given but C has no per-sample (task) axis")
        elif C.dim() == 3:
            _check_shape(C, "C", (C.shape[0], ra, rb), "num_tasks x r_a x r_b")
            if task_ids is None:
                raise ValueError(f"C has a per-sample axis of {C.shape[0]} tasks: pass task_ids")
            task_ids = expand_task_ids(task_ids, lead)
        else:
            raise ValueError(f"C must be 2-D or 3-D, got shape {tuple(C.shape)}")
    p = check_dropout(dropout)
    check_backend_name(backend)
    scaling = checks.check_finite_number(scaling, "scaling")
    checks.check_seed(seed)
    named = {"weight": weight, "bias": bias, "A": A, "C": C, "B": B, "task_ids": task_ids}
    for name, t in named.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")

    dtype = input_compute_dtype(x)
    cast = {"x": x, "weight": weight, "bias": bias}
    for name, t in cast.items():
        if t is None or t.dtype == dtype:
            continue
        if dtype != x.dtype and t.is_floating_point() and t.dtype != torch.float64:
            cast[name] = t.to(dtype)  # autocast's rule
        else:
            raise TypeError(
                f"{name} is {t.dtype} but the layer computes in {dtype}: cast them to one dtype, "
                "or run under torch.autocast"
            )
    x, weight, bias = cast["x"], cast["weight"], cast["bias"]
    # The adapter's factors may be kept in float32 (or any float dtype): they follow the activations.
    A, B = A.to(dtype), B.to(dtype)
    C = C.to(dtype) if C is not None else None

    seed_t = dropout_seed(seed, x.device) if p > 0.0 else None
    x2 = x.reshape(-1, d_in)
    y, _ = torch.ops.ttkernels.tt_adapter_fwd(x2, weight, bias, A, C, B, task_ids, float(scaling), p, seed_t, backend)
    return y.reshape(*lead, d_out)


def tt_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    cores: Sequence[Tensor],
    spec: TTSpec,
    *,
    index: Mapping[str, int] | None = None,
    task_ids: Optional[Tensor] = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    seed: int | Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``y = x W^T + b + scaling * drop(x) dW^T`` with ``dW^T`` the TT adapter of ``cores`` (``spec``).

    Builds the factors A, C, B from the cores (differentiable, token-independent; with ``backend="triton"``
    one kernel launch per side of two or more cores, forward and backward) and calls :func:`tt_adapter`;
    delta-W is never formed.
    """
    if not isinstance(spec, TTSpec):
        raise TypeError(f"spec must be a TTSpec, got {type(spec).__name__}")
    if spec.per_sample_mode is None and task_ids is not None:
        raise ValueError("task_ids was given but the spec has no per-sample mode")
    if isinstance(cores, Tensor) or not isinstance(cores, Iterable):
        raise TypeError(f"cores must be a sequence of torch.Tensor (one per mode), got {type(cores).__name__}")
    cores = list(cores)
    dtype = input_compute_dtype(x) if isinstance(x, Tensor) and x.is_floating_point() else None
    A, C, B = factors(cores, spec, index, dtype=dtype, backend=backend)
    return tt_adapter(
        x,
        weight,
        bias,
        A,
        C,
        B,
        task_ids=task_ids,
        scaling=scaling,
        dropout=dropout,
        seed=seed,
        backend=backend,
    )
