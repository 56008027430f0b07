"""The grad-mode lean path of ``TTLinear`` for a chain of cores without middle cores: one autograd node.

For a spec of in modes then out modes (no index or per-sample mode between them), ``A`` is a product of the in
cores and ``B`` of the out cores. Built with torch autograd ops, every call records those products (reshapes and
matmuls, one graph node each, forward and backward). Here a plan holds the factors of one version of the cores and
what their backward needs, computed once without a graph (the layer keeps it while the cores are unchanged and
rebuilds it after an optimizer step, ``load_state_dict`` or ``.to()``); its ``forward`` computes
``y = x W^T + b + scaling * x A B`` and, in grad mode, attaches one autograd node whose backward gives ``dx``, the
weight and bias gradients when they are wanted, and each core's gradient straight from ``dA = x^T dS`` and
``dB = S^T dY``: two small matmuls per core and no graph of the factors.

Two implementations of one algorithm: the C++ extension ``ttkernels._lean`` (csrc/host/lean_chain.cpp: the node
is a C++ ``torch::autograd::Node``, so neither forward nor backward runs Python; built by setup.py wherever torch
and a C++ compiler are, no nvcc needed) and, where it is not built, :class:`Plan` and :class:`LeanAdapter` here
(an ``autograd.Function``). :func:`make_plan` picks the first; :data:`NATIVE` is the loaded extension or None.

``scaling`` is folded into the kept factors: ``As = scaling * A`` (forward ``S = x As``, ``y += S B``) and
``Bs^T = scaling * B^T`` (backward ``dS = dY Bs^T``, ``dx = dY W + dS A^T``, ``dA = x^T dS``, ``dB = S^T dY``).

Backward refuses, as torch's own nodes do, cores changed in place since the forward, and the weight when ``dx``
needs it (``x`` and ``S`` are saved tensors, checked by torch). Double backward (``create_graph=True``) recomputes
the layer from the saved inputs with torch autograd ops and differentiates that, so higher derivatives are exact.
"""

from __future__ import annotations

import importlib
import operator
import os
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

__all__ = ["NATIVE", "LeanAdapter", "Plan", "make_plan"]


def _load_native():
    """The C++ extension ``ttkernels._lean``, or None when it is not built, fails to load (built against another
    torch) or ``TTKERNELS_LEAN_NATIVE=0`` asks for the Python node."""
    if os.environ.get("TTKERNELS_LEAN_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        return importlib.import_module("ttkernels._lean")  # the compiled module (no Python source)
    except ImportError:
        return None


NATIVE = _load_native()


def make_plan(cores: Sequence[Tensor], last_in: int, scaling: float, previous=None):
    """The plan of this version of an in-then-out chain (``last_in``: the last in core), or None when the cores'
    dtypes differ or one is not contiguous (a copy would miss their in-place updates; the layer then builds the
    factors with torch ops; also for cores of a tensor subclass). The C++ plan where :data:`NATIVE` is loaded, else :class:`Plan`; both have
    ``fresh(scaling)``, ``forward(x, weight, bias)``, ``cores``, ``versions``, ``A``, ``As``, ``B``, ``Bs``.
    ``previous``: the plan this one replaces; the Python plan reuses its matrix views of cores whose storages
    stayed (an optimizer step changes versions, not storages)."""
    dtype = cores[0].dtype
    if not all(c.dtype == dtype and c.is_contiguous() for c in cores) or torch._C._has_torch_function(cores):
        return None  # (a tensor subclass or a TorchFunctionMode sees torch ops, which the C++ node would hide)
    if NATIVE is not None:
        return NATIVE.Plan(list(cores), last_in, float(scaling))
    return Plan(cores, last_in, scaling, previous if isinstance(previous, Plan) else None)


def _matrices(cores: Sequence[Tensor], last_in: int) -> list[Tensor]:
    """The cores seen as matrices, detached views sharing their storages and version counters: ``(s_0, r_1)``
    for the first, ``(r_{k-1}, s_k r_k)`` for the other in cores, ``(r_{k-1} s_k, r_k)`` for the out cores but
    the last, ``(r, s)`` for the last."""
    K = len(cores)
    mats = []
    for k, c in enumerate(cores):
        r0, s, r1 = c.shape
        shape = (s, r1) if k == 0 else (r0, s * r1) if k <= last_in else (r0 * s, r1) if k < K - 1 else (r0, s)
        mats.append(c.detach().view(shape))
    return mats


class Plan:
    """The factors of one version of the cores, computed without a graph (the Python twin of the C++ plan).

    ``As``: ``scaling * A`` ``(d_in, r)``; ``A``; ``B``: ``(r, d_out)``; ``Bs``: ``scaling * B``. ``a_steps``: per
    in core ``k >= 1``, from the last down, ``(k, P_{k-1}^T, G_k, split, shape)``, where ``P_k`` is the product of
    the in cores up to ``k`` as ``(s_0 .. s_k, r_k)``, ``G_k`` core ``k`` as a matrix, ``split`` the view of
    ``dP_k`` that takes it back through that product and ``shape`` the core's; ``b_steps`` per out core but the
    last, from the first up, ``(k, Q_{k+1}, G_k^T, split, shape)`` with ``Q_{k+1}`` the product of the later out
    cores as ``(r_k, s_{k+1} ..)``. ``versions`` and ``ptrs``: the cores' in-place versions and storages it was
    built from.
    """

    __slots__ = ("A", "As", "B", "Bs", "a_steps", "b_steps", "cores", "mats", "ptrs", "scaling", "shapes", "versions")

    def __init__(self, cores: Sequence[Tensor], last_in: int, scaling: float, previous: Optional[Plan] = None) -> None:
        cores = tuple(cores)
        ptrs = [c.data_ptr() for c in cores]
        with torch.no_grad():
            if previous is not None and previous.ptrs == ptrs and all(map(operator.is_, previous.cores, cores)):
                mats = previous.mats  # views of the same storages (they share the cores' version counters)
            else:
                mats = _matrices(cores, last_in)
            K = len(cores)
            P = mats[0]
            a_steps = []
            for k in range(1, last_in + 1):
                shape = cores[k].shape
                a_steps.append((k, P.t(), mats[k], (P.shape[0], mats[k].shape[1]), shape))
                P = torch.mm(P, mats[k]).view(-1, shape[2])
            Q = mats[-1]
            b_steps = []
            for k in range(K - 2, last_in, -1):
                shape = cores[k].shape
                b_steps.append((k, Q, mats[k].t(), (mats[k].shape[0], Q.shape[1]), shape))
                Q = torch.mm(mats[k], Q).view(shape[0], -1)
            self.A, self.B = P, Q
            self.As, self.Bs = (P, Q) if scaling == 1.0 else (P * scaling, Q * scaling)
        self.scaling = scaling
        self.cores = cores  # held: no core of this plan can be freed and its id reused
        self.versions = [c._version for c in cores]
        self.ptrs = ptrs
        self.mats = mats
        self.shapes = (cores[0].shape, cores[-1].shape)
        self.a_steps = a_steps[::-1]  # backward walks from the last in core down
        self.b_steps = b_steps[::-1]  # and from the first out core up

    def fresh(self, scaling: float) -> bool:
        """True while every core is the one (storage and in-place version) this plan was built from."""
        return (
            scaling == self.scaling
            and [c._version for c in self.cores] == self.versions
            and [c.data_ptr() for c in self.cores] == self.ptrs
        )

    def forward(self, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``x W^T + b + x As B``; in grad mode one :class:`LeanAdapter` node."""
        if torch.is_grad_enabled() and not torch.is_inference_mode_enabled():
            return LeanAdapter.apply(x, weight, bias, self, *self.cores)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = F.linear(x, weight, bias)
        (y if y.dim() == 2 else y.view(-1, y.shape[-1])).addmm_(x2 @ self.As, self.B)
        return y


class LeanAdapter(torch.autograd.Function):
    """``y = x W^T + b + x As B`` from a :class:`Plan`; see the module docstring. Called as
    ``LeanAdapter.apply(x, weight, bias, plan, *plan.cores)``."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan, *cores: Tensor) -> Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        S = torch.mm(x2, plan.As)
        y = F.linear(x, weight, bias)
        (y if y.dim() == 2 else y.view(-1, y.shape[-1])).addmm_(S, plan.B)
        ctx.save_for_backward(x, S)
        ctx.state = (plan, weight, bias, weight._version)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, S = ctx.saved_tensors  # torch checks these for in-place changes
        plan, weight, bias, weight_version = ctx.state
        if [c._version for c in plan.cores] != plan.versions or (
            weight._version != weight_version and ctx.needs_input_grad[0]  # the weight serves dx alone
        ):
            _refuse_changed(plan, weight, weight_version)
        if torch.is_grad_enabled():  # create_graph=True: differentiate a recomputation with torch autograd ops
            return _recomputed_grads(ctx, dy, x, weight, bias, plan)
        need = ctx.needs_input_grad
        if dy.dim() != 2:
            dy = dy.reshape(-1, dy.shape[-1])
            x2 = x.reshape(-1, x.shape[-1])
        else:
            x2 = x
        dy = dy.contiguous()  # the gradient of a sum is an expanded tensor: one copy, not one per matmul
        dS = F.linear(dy, plan.Bs)  # dy Bs^T
        dx = dw = db = None
        if need[0]:
            dx = F.linear(dS, plan.A).addmm_(dy, weight)  # dS A^T + dy W
            if x.dim() != 2:
                dx = dx.view(x.shape)
        if need[1]:
            dw = torch.mm(dy.t(), x2)
        if need[2]:
            db = dy.sum(0)
        if not any(need[4:]):
            return (dx, dw, db, None, *(None for _ in plan.cores))
        grads: list[Tensor] = [dS] * len(plan.cores)
        dP = torch.mm(x2.t(), dS)  # dA
        for k, Pt, G, split, shape in plan.a_steps:
            dPv = dP.view(split)
            grads[k] = torch.mm(Pt, dPv).view(shape)
            dP = F.linear(dPv, G)  # dPv G^T
        grads[0] = dP.view(plan.shapes[0])
        dQ = torch.mm(S.t(), dy)  # dB (S is x As, scaling included)
        for k, Q, Gt, split, shape in plan.b_steps:
            dQv = dQ.view(split)
            grads[k] = F.linear(dQv, Q).view(shape)  # dQv Q^T
            dQ = torch.mm(Gt, dQv)
        grads[-1] = dQ.view(plan.shapes[1])
        return (dx, dw, db, None, *grads)


def _refuse_changed(plan: Plan, weight: Tensor, weight_version: int) -> None:
    """Cores or the weight changed in place between forward and backward: refused, as torch refuses a changed
    saved tensor."""
    for k, (c, v) in enumerate(zip(plan.cores, plan.versions)):
        if c._version != v:
            what, now, then = f"cores[{k}]", c._version, v
            break
    else:
        what, now, then = "the base weight", weight._version, weight_version
    raise RuntimeError(
        f"one of the variables needed for gradient computation has been modified by an inplace operation: {what} "
        f"of the TTLinear is at version {now}; expected version {then} instead (run backward before an optimizer "
        "step or another in-place change)"
    )


def _recomputed_grads(ctx, dy: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], plan: Plan):
    """Backward under ``create_graph=True``: the layer recomputed from the Function's inputs with torch autograd
    ops and differentiated, so that the gradients carry their own graph (double backward is exact)."""
    need = ctx.needs_input_grad
    # from aliases (differentiable views) of the inputs, so that the inner grad stops there: the inputs' own hooks
    # and retain_grad run once, in the outer backward; the gradients reach the inputs through the aliases
    x, weight, bias, *cores = (None if t is None else t.view_as(t) for t in (x, weight, bias, *plan.cores))
    last_in = len(plan.a_steps)
    A, B = reference.build_sides(cores, last_in, last_in + 1)
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias) + plan.scaling * ((x2 @ A) @ B)
    flags = [n and t is not None and t.requires_grad for t, n in zip((x, weight, bias, *cores), (*need[:3], *need[4:]))]
    inputs = [t for t, n in zip((x, weight, bias, *cores), flags) if n]
    found = iter(torch.autograd.grad(y, inputs, dy.reshape(y.shape), create_graph=True, allow_unused=True))
    out = [next(found) if n else None for n in flags]
    return (*out[:3], None, *out[3:])
