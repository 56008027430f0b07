"""The TT-matrix adapter in plain torch: the dense delta-W, the einsum sweep with its analytic backward, and the
Kronecker-sum form the fused kernels compute, with its float64-capable reference contractions.

**The sweep** (:func:`ttm_sweep`): ``x`` (``M x d_in``) viewed as ``(M, n_1, ..., n_K)`` absorbs one core at a
time; after ``k`` cores the state is ``(M, m_1..m_k, r_k, n_{k+1}..n_K)``. Left to right or right to left:
:func:`ttm_plan` counts both orders' FLOPs and largest intermediate for a spec and a token count and picks the
cheaper (FLOPs first, then the intermediate). Its backward (:class:`SweepFunction`) is analytic and saves only x:
the right environments of dY (the last of which is dx, ``dY W``), then the left states of x recomputed one core at
a time, each core's gradient the contraction of its left state and right environment.

**The Kronecker-sum form** (:func:`kron_splits`, :func:`choose_split`, :func:`kron_factors`): cut at one bond, the
chain is a sum of Kronecker products; :func:`kron_apply_ref`, :func:`kron_grad_q_ref`, :func:`kron_grad_p_ref` are
the contract of the Triton (``triton_kernels/ttm.py``) and CUDA (``csrc/ttm.cu``) kernels, in any dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .spec import TTMSpec, spec_of

__all__ = [
    "KronSplit",
    "SweepFunction",
    "choose_split",
    "kron_apply_ref",
    "kron_factors",
    "kron_grad_p_ref",
    "kron_grad_q_ref",
    "kron_splits",
    "kron_views",
    "ttm_dense",
    "ttm_plan",
    "ttm_sweep",
]


def ttm_dense(cores: Sequence[Tensor]) -> Tensor:
    """The dense ``dW`` ``(d_out, d_in)`` of TT-matrix cores (for merging and tests only)."""
    spec = spec_of(cores)
    spec.check_cores(cores)
    t = cores[0].reshape(cores[0].shape[1], cores[0].shape[2], -1)  # (O, I, r)
    for c in cores[1:]:
        o, i, r = t.shape
        t = torch.einsum("oir,rmns->omins", t, c).reshape(o * c.shape[1], i * c.shape[2], c.shape[3])
    return t.reshape(spec.out_features, spec.in_features)


# ------------------------------------------------------------------------------------------------ the sweep
def _sweep_ltr(x: Tensor, cores: Sequence[Tensor]) -> Tensor:
    """``x (M, d_in) -> x dW^T (M, d_out)``, absorbing cores left to right."""
    m_tok = x.shape[0]
    ins = [c.shape[2] for c in cores]
    state = x.reshape(m_tok, 1, 1, ins[0], math.prod(ins[1:]))  # (M, P, r, n_k, Q); sizes explicit for M = 0
    for k, g in enumerate(cores):
        new = torch.einsum("bprnq,rmns->bpmsq", state, g)  # (M, P, m_k, r_k, Q)
        p = new.shape[1] * new.shape[2]
        if k + 1 < len(cores):
            state = new.reshape(m_tok, p, g.shape[3], ins[k + 1], math.prod(ins[k + 2 :]))
        else:
            return new.reshape(m_tok, p)
    raise AssertionError("no cores")


def _reversed(cores: Sequence[Tensor]) -> list[Tensor]:
    return [g.permute(3, 1, 2, 0) for g in reversed(cores)]


def ttm_plan(spec: TTMSpec, tokens: int) -> dict:
    """FLOPs and largest intermediate (elements) of the left-to-right and right-to-left sweeps for
    ``tokens`` rows; ``"order"`` is the cheaper (FLOPs, then intermediate size)."""

    def cost(outs, ins, bonds):
        flops, peak = 0, tokens * math.prod(ins)
        for k in range(len(ins)):
            p_prev, q = math.prod(outs[:k]), math.prod(ins[k + 1 :])
            flops += 2 * tokens * p_prev * q * bonds[k] * ins[k] * outs[k] * bonds[k + 1]
            peak = max(peak, tokens * p_prev * outs[k] * bonds[k + 1] * q)
        return flops, peak

    ltr = cost(spec.out_modes, spec.in_modes, spec.bond_ranks)
    rtl = cost(spec.out_modes[::-1], spec.in_modes[::-1], spec.bond_ranks[::-1])
    order = "ltr" if ltr <= rtl else "rtl"
    return {"order": order, "ltr": {"flops": ltr[0], "peak": ltr[1]}, "rtl": {"flops": rtl[0], "peak": rtl[1]}}


def _apply(x: Tensor, cores: Sequence[Tensor], order: str) -> Tensor:
    if order == "ltr":
        return _sweep_ltr(x, cores)
    m_tok = x.shape[0]
    ins, outs = [c.shape[2] for c in cores], [c.shape[1] for c in cores]
    k = len(cores)
    xr = x.reshape(m_tok, *ins).permute(0, *range(k, 0, -1)).reshape(m_tok, math.prod(ins))
    yr = _sweep_ltr(xr, _reversed(cores))
    return yr.reshape(m_tok, *outs[::-1]).permute(0, *range(k, 0, -1)).reshape(m_tok, math.prod(outs))


class SweepFunction(torch.autograd.Function):
    """``y = scaling * x dW^T``; saves x and the cores only, recomputes the sweep's states in backward."""

    @staticmethod
    def forward(ctx, x: Tensor, scaling: float, order: str, *cores: Tensor) -> Tensor:
        ctx.save_for_backward(x, *cores)
        ctx.scaling = scaling
        return _apply(x, cores, order) * scaling

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        x, *cores = ctx.saved_tensors
        dy = dy.contiguous() * ctx.scaling
        m_tok, k = x.shape[0], len(cores)
        ins, outs = [c.shape[2] for c in cores], [c.shape[1] for c in cores]
        # right environments: env[k] = dY contracted with cores k..K-1, shape (M, prod outs[:k], r_k, prod ins[k:])
        env = [None] * (k + 1)
        env[k] = dy.reshape(m_tok, math.prod(outs), 1, 1)
        for j in range(k - 1, -1, -1):
            g, q = cores[j], math.prod(ins[j + 1 :])
            e = env[j + 1].reshape(m_tok, math.prod(outs[:j]), outs[j], g.shape[3], q)
            env[j] = torch.einsum("bpmsq,rmns->bprnq", e, g).reshape(m_tok, math.prod(outs[:j]), g.shape[0], ins[j] * q)
        dx = env[0].reshape(m_tok, math.prod(ins)) if ctx.needs_input_grad[0] else None
        grads = []
        state = x.reshape(m_tok, 1, 1, ins[0], math.prod(ins[1:]))  # left state before core j: (M, P, r_j, n_j, Q)
        for j, g in enumerate(cores):
            q = math.prod(ins[j + 1 :])
            right = env[j + 1].reshape(m_tok, state.shape[1], outs[j], g.shape[3], q)
            grads.append(torch.einsum("bparq,bpmsq->amrs", state, right) if ctx.needs_input_grad[3 + j] else None)
            if j + 1 < k:
                new = torch.einsum("bprnq,rmns->bpmsq", state, g)
                state = new.reshape(m_tok, new.shape[1] * new.shape[2], g.shape[3], ins[j + 1], math.prod(ins[j + 2 :]))
        return (dx, None, None, *grads)


def ttm_sweep(x2: Tensor, cores: Sequence[Tensor], scaling: float, order: Optional[str] = None) -> Tensor:
    """``scaling * x2 dW^T`` for ``x2`` ``(M, d_in)`` by the sweep (``order``: ``"ltr"``, ``"rtl"``, or None for
    :func:`ttm_plan`'s choice), differentiable, saving x alone; the cores are cast to x's dtype."""
    if order is None:
        order = ttm_plan(spec_of(cores), max(x2.shape[0], 1))["order"]
    return SweepFunction.apply(x2, float(scaling), order, *[c.to(x2.dtype) for c in cores])


# ------------------------------------------------------------------------------------------------ Kronecker-sum form
# Cut the chain at bond k (0 < k < K): the first k cores merge into L (m_L, n_L, r_k) and the rest into
# R (r_k, m_R, n_R), and dW = sum_r L[:, :, r] kron R[r]. Per token, with x_b viewed as the (n_L, n_R) matrix X_b,
# Y_b = sum_r L_r X_b R_r^T. The kernels compute the general form
#
#     y[b, a, c] = sum_r sum_i Q[r, a, i] sum_j x[b, i, j] P[r, j, c]            (one "kron apply")
#
# stage A contracting j (a GEMM over tokens with a shared weight), stage B contracting i and r. Q is the factor
# applied second; its modes (a, i) stay whole inside a program, which is what bounds the fused kernels.
# order "left": Q = L (a = out-modes of L, i = in-modes of L), P = R^T; order "right" is the transpose
# (Q = R, P = L^T, x_b and y_b read transposed through strides).
@dataclass(frozen=True)
class KronSplit:
    """Where a TT-matrix chain is cut for the Kronecker-sum kernels, and which factor is applied first."""

    cut: int  # cores [0, cut) form the left factor, [cut, K) the right one
    order: str  # "left": the left factor is Q (applied second); "right": the right factor is
    rank: int
    ni: int  # Q's in size (kept whole), contracted in stage B
    nj: int  # P's in size, contracted in stage A (streamed)
    na: int  # Q's out size (kept whole)
    nc: int  # P's out size (tiled)

    def flops_per_token(self, pad: int = 1) -> int:
        """Multiply-adds x 2 per token of the forward, with the kept sizes padded to ``pad`` (kernels pad to
        tile sides)."""
        ni, na = _pad(self.ni, pad), _pad(self.na, pad)
        return 2 * self.rank * (ni * self.nj * self.nc + na * ni * self.nc)


def _pad(n: int, pad: int) -> int:
    if pad <= 1:
        return n
    p = pad
    while p < n:
        p *= 2
    return p


def kron_splits(spec: TTMSpec) -> list[KronSplit]:
    """Every cut and order of a chain of two cores or more."""
    out = []
    for k in range(1, spec.num_cores):
        m_l, n_l = math.prod(spec.out_modes[:k]), math.prod(spec.in_modes[:k])
        m_r, n_r = math.prod(spec.out_modes[k:]), math.prod(spec.in_modes[k:])
        r = spec.ranks[k - 1]
        out.append(KronSplit(k, "left", r, ni=n_l, nj=n_r, na=m_l, nc=m_r))
        out.append(KronSplit(k, "right", r, ni=n_r, nj=n_l, na=m_r, nc=m_l))
    return out


def choose_split(
    spec: TTMSpec, *, max_kept: int = 128, pad: int = 16, max_rank: Optional[int] = None
) -> Optional[KronSplit]:
    """The split with the fewest forward FLOPs (kept sizes padded to ``pad``) among those whose kept sizes
    (``ni``, ``na``) are at most ``max_kept`` after padding, and whose bond rank is at most ``max_rank`` (when
    given); None when no split qualifies (one core, or every cut keeps a side too large for a program: the staged
    plan runs then). The defaults are the Triton kernels' limits."""
    ok = [
        s
        for s in kron_splits(spec)
        if _pad(s.ni, pad) <= max_kept and _pad(s.na, pad) <= max_kept and (max_rank is None or s.rank <= max_rank)
    ]
    if not ok:
        return None
    return min(ok, key=lambda s: (s.flops_per_token(pad), s.rank * (s.ni * s.na + s.nj * s.nc), s.cut, s.order))


def _merge(cores: Sequence[Tensor]) -> Tensor:
    """Cores ``(r0, m_k, n_k, r_k)`` merged into one ``(r0, prod m, prod n, r_last)``."""
    t = cores[0]
    for c in cores[1:]:
        r0, m, n, _ = t.shape
        t = torch.einsum("amnr,rpqs->ampnqs", t, c).reshape(r0, m * c.shape[1], n * c.shape[2], c.shape[3])
    return t


def kron_factors(cores: Sequence[Tensor], split: KronSplit) -> tuple[Tensor, Tensor]:
    """``(Q (r, na, ni), P (r, nj, nc))`` of the split, differentiable (token-independent, small)."""
    left = _merge(cores[: split.cut])[0]  # (m_L, n_L, r)
    right = _merge(cores[split.cut :])[..., 0]  # (r, m_R, n_R)
    if split.order == "left":
        return left.permute(2, 0, 1), right.permute(0, 2, 1)
    return right, left.permute(2, 1, 0)


def kron_views(t2: Tensor, left: int, right: int, order: str) -> Tensor:
    """``(M, left * right)`` as the kernels' ``(M, kept, streamed)`` view: ``(M, left, right)`` for order
    "left", its transpose (strides, no copy) for "right"."""
    t3 = t2.view(t2.shape[0], left, right)
    return t3 if order == "left" else t3.transpose(1, 2)


def kron_apply_ref(x3: Tensor, q: Tensor, p: Tensor) -> Tensor:
    """``y[b, a, c] = sum_{r, i, j} q[r, a, i] x3[b, i, j] p[r, j, c]`` (the kernels' contract; any dtype)."""
    t = torch.einsum("bij,rjc->bric", x3, p)
    return torch.einsum("rai,bric->bac", q, t)


def kron_grad_q_ref(dy3: Tensor, x3: Tensor, p: Tensor) -> Tensor:
    """``dq[r, a, i] = sum_{b, c} dy3[b, a, c] sum_j x3[b, i, j] p[r, j, c]``."""
    return torch.einsum("bac,bric->rai", dy3, torch.einsum("bij,rjc->bric", x3, p))


def kron_grad_p_ref(dy3: Tensor, x3: Tensor, q: Tensor) -> Tensor:
    """``dp[r, j, c] = sum_{b, a} (sum_i q[r, a, i] x3[b, i, j]) dy3[b, a, c]``."""
    return torch.einsum("braj,bac->rjc", torch.einsum("rai,bij->braj", q, x3), dy3)
