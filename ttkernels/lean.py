"""The grad-mode lean path of ``TTLinear`` for a chain of cores without middle cores: one autograd node.

For a spec of in modes then out modes (no index or per-sample mode between them), ``A`` is a product of the in
cores and ``B`` of the out cores. Built with torch autograd ops, every call records those products (reshapes and
matmuls, one graph node each, forward and backward). Here a :class:`Layout` holds the cores seen as matrices
(detached views, kept while the cores' storages stay), a :class:`Plan` the factors of one version of the cores and
what their backward needs, computed once without a graph (the layer keeps it while the cores are unchanged and
rebuilds it after an optimizer step, ``load_state_dict`` or ``.to()``), and :class:`LeanAdapter`, one
``autograd.Function``, computes ``y = x W^T + b + scaling * x A B`` and, in backward, ``dx``, the weight and bias
gradients when they are wanted, and each core's gradient straight from ``dA = x^T dS`` and ``dB = S^T dY``: two
small matmuls per core and no graph of the factors.

``scaling`` is folded into the kept factors: ``As = scaling * A`` (forward ``S = x As``, ``y += S B``) and
``Bs^T = scaling * B^T`` (backward ``dS = dY Bs^T``, ``dx = dY W + dS A^T``, ``dA = x^T dS``, ``dB = S^T dY``).

Backward refuses, as torch's own nodes do, cores changed in place since the forward, and the weight when ``dx``
needs it (``x`` and ``S`` are saved tensors, checked by torch). Double backward (``create_graph=True``) recomputes
the layer from the saved inputs with torch autograd ops and differentiates that, so higher derivatives are exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

__all__ = ["Layout", "LeanAdapter", "Plan"]


class Layout:
    """The cores of an in-then-out chain seen as matrices, for as long as their storages stay: detached views
    (``(s_0, r_1)`` for the first, ``(r_{k-1}, s_k r_k)`` for the other in cores, ``(r_{k-1} s_k, r_k)`` for the
    out cores but the last, ``(r, s)`` for the last) and their transposes. They share the cores' storages and
    version counters, so an in-place update (an optimizer step) leaves them valid; a new storage (``.data =``,
    ``.to()``, ``load_state_dict`` into a new tensor) changes ``ptrs`` and the layer builds a new layout.
    ``dtype`` is None when the cores' dtypes differ or one is not contiguous (the layer then builds the factors
    with torch ops, as for other chains)."""

    __slots__ = ("cores", "device", "dtype", "last_in", "mats", "mats_t", "ptrs", "shapes")

    def __init__(self, cores: Sequence[Tensor], last_in: int, ptrs: list[int]) -> None:
        K = len(cores)
        shapes = []
        for k, c in enumerate(cores):
            r0, s, r1 = c.shape
            shapes.append(
                (s, r1) if k == 0 else (r0, s * r1) if k <= last_in else (r0 * s, r1) if k < K - 1 else (r0, s)
            )
        self.cores = tuple(cores)  # held: no core of this layout can be freed and its id reused
        self.ptrs = ptrs
        self.last_in = last_in
        self.shapes = shapes
        dtype = cores[0].dtype
        # a non-contiguous core has no matrix view of its storage (a copy would miss its in-place updates)
        usable = all(c.dtype == dtype and c.is_contiguous() for c in cores)
        self.dtype = dtype if usable else None
        self.device = cores[0].device
        self.mats = [c.detach().view(shape) for c, shape in zip(cores, shapes)] if usable else []
        self.mats_t = [m.t() for m in self.mats]


class Plan:
    """The factors of one version of the cores of a :class:`Layout`, computed without a graph.

    ``As``: ``scaling * A`` ``(d_in, r)``; ``A``; ``B``: ``(r, d_out)``; ``Bs``: ``scaling * B``. ``a_steps``: per
    in core ``k >= 1``, from the last down, ``(k, P_{k-1}^T, G_k, split, shape)``, where ``P_k`` is the product of
    the in cores up to ``k`` as ``(s_0 .. s_k, r_k)``, ``G_k`` core ``k`` as a matrix, ``split`` the view of
    ``dP_k`` that takes it back through that product and ``shape`` the core's; ``b_steps`` per out core but the
    last, from the first up, ``(k, Q_{k+1}, G_k^T, split, shape)`` with ``Q_{k+1}`` the product of the later out
    cores as ``(r_k, s_{k+1} ..)``. ``key``: what the layer compares to reuse the plan; ``versions``: the cores'
    in-place versions it was built from.
    """

    __slots__ = ("A", "As", "B", "Bs", "a_steps", "b_steps", "cores", "key", "scaling", "shapes", "versions")

    def __init__(self, layout: Layout, scaling: float, versions: list[int], key: tuple = ()) -> None:
        cores, mats, mats_t = layout.cores, layout.mats, layout.mats_t
        K, last_in = len(cores), layout.last_in
        P = mats[0]
        a_steps = []
        for k in range(1, last_in + 1):
            shape = cores[k].shape
            a_steps.append((k, mats_t[0] if k == 1 else P.t(), mats[k], (P.shape[0], layout.shapes[k][1]), shape))
            P = torch.mm(P, mats[k]).view(-1, shape[2])
        Q = mats[-1]
        b_steps = []
        for k in range(K - 2, last_in, -1):
            shape = cores[k].shape
            b_steps.append((k, Q, mats_t[k], (layout.shapes[k][0], Q.shape[1]), shape))
            Q = torch.mm(mats[k], Q).view(shape[0], -1)
        self.A, self.B = P, Q
        self.As, self.Bs = (P, Q) if scaling == 1.0 else (P * scaling, Q * scaling)
        self.key = key
        self.scaling = scaling
        self.cores = cores
        self.versions = versions
        self.shapes = (cores[0].shape, cores[-1].shape)
        self.a_steps = a_steps[::-1]  # backward walks from the last in core down
        self.b_steps = b_steps[::-1]  # and from the first out core up


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
    cores = plan.cores
    last_in = len(plan.a_steps)
    A, B = reference.build_sides(cores, last_in, last_in + 1)
    x2 = x.reshape(-1, x.shape[-1])
    y = F.linear(x2, weight, bias) + plan.scaling * ((x2 @ A) @ B)
    flags = (*need[:3], *need[4:])
    inputs = [t for t, n in zip((x, weight, bias, *cores), flags) if n]
    found = iter(torch.autograd.grad(y, inputs, dy.reshape(y.shape), create_graph=True, allow_unused=True))
    out = [next(found) if n else None for n in flags]
    return (*out[:3], None, *out[3:])
