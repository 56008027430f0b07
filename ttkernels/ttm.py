"""TT-matrix (MPO) adapters: cores ``(r_{k-1}, m_k, n_k, r_k)``, one out mode and one in mode each.

The adapter's delta-W (``d_out x d_in``) is

    dW[(o_1..o_K), (i_1..i_K)] = G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_K[:, o_K, i_K, :]

with C-order flattening of the out indices and of the in indices (the tltorch / torchTT convention: out before
in inside a core). There is no rank bottleneck, so the bottleneck kernels do not apply; Kronecker adapters
(LoKr, KronA) are the bond-rank-1 case: two cores of bond 1 give ``dW = A kron B``.

**The sweep** (:func:`ttm_apply`): ``x`` (``M x d_in``) viewed as ``(M, n_1, ..., n_K)`` absorbs one core at a
time; after ``k`` cores the state is ``(M, m_1..m_k, r_k, n_{k+1}..n_K)``. Left to right or right to left:
:func:`ttm_plan` counts both orders' FLOPs and largest intermediate for a spec and a token count and picks the
cheaper (FLOPs first, then the intermediate); an order that contracts cores with each other before touching x
is what a general einsum optimizer may also find, and ``tests/test_ttm.py`` compares the sweep's cost with
opt_einsum's path where it is installed.

**Backward** (:class:`_TTMFunction`) is analytic and saves only x: it computes the right environments of dY
(the last of which is dx, ``dY W``), then recomputes the left states of x one core at a time, each core's
gradient being the contraction of its left state and right environment.

**The fused form** (:func:`kron_splits`, :func:`choose_split`, :func:`kron_factors`): cut at one bond, the
chain is a sum of Kronecker products, and the Triton (``triton_kernels/ttm.py``) and CUDA (``csrc/ttm.cu``)
kernels compute ``y_b = sum_r Q_r x_b P_r`` without storing the intermediate; :class:`_KronFunction` is their
autograd function (saves x and the two small merged factors; backward recomputes). ``backend="kron-torch"`` runs
the same plumbing with torch contractions (float64 gradcheck on the CPU).

**Dispatch** (:func:`ttm_dispatch`): off CUDA the sweep; on CUDA the fastest of the fused kernels and
reconstruct-then-GEMM (:func:`_dense_apply`), measured once per shape bucket.

Every path saves x alone per token for backward. Checked by tests/test_ttm.py (float64 gradcheck of the sweep, the
Kronecker-sum plumbing and the dense path; the dense formula; Kronecker equivalence; tensorly-torch's block-TT
layer; saved bytes) and tests/test_ttm_kernels.py (the Triton kernels against float64).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .init import adapter_scaling, init_ttm_cores_
from .spec import _as_int, factorize

__all__ = [
    "TTMLinear",
    "TTMSpec",
    "TTM_BACKENDS",
    "KronSplit",
    "choose_split",
    "kron_factors",
    "kron_splits",
    "ttm_apply",
    "ttm_dense",
    "ttm_dispatch",
    "ttm_plan",
]


@dataclass(frozen=True)
class TTMSpec:
    """Mode sizes and bond ranks of a TT-matrix adapter: ``K`` cores ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``."""

    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.in_modes or len(self.in_modes) != len(self.out_modes):
            raise ValueError(
                f"in_modes {self.in_modes} and out_modes {self.out_modes} must be non-empty and of the same length "
                "(one in and one out mode per core)"
            )
        for what, sizes in (("in_modes", self.in_modes), ("out_modes", self.out_modes)):
            for i, s in enumerate(sizes):
                if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                    raise ValueError(f"{what}[{i}] = {s!r}: mode sizes must be positive ints")
        if len(self.ranks) != len(self.in_modes) - 1:
            raise ValueError(f"{len(self.in_modes)} cores need {len(self.in_modes) - 1} bond ranks, got {self.ranks}")
        for i, r in enumerate(self.ranks):
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"ranks[{i}] = {r!r}: ranks must be positive ints")

    @classmethod
    def build(
        cls,
        in_features: int,
        out_features: int,
        *,
        in_modes: int | Sequence[int] = 2,
        out_modes: int | Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
    ) -> TTMSpec:
        """``in_modes`` / ``out_modes``: the sizes, or a number of near-balanced factors (``out_modes``
        defaults to as many factors as ``in_modes`` has); their products must be the features."""
        in_features, out_features = _as_int(in_features, "in_features"), _as_int(out_features, "out_features")
        ins = factorize(in_features, _as_int(in_modes, "in_modes")) if isinstance(in_modes, int) else tuple(in_modes)
        if out_modes is None:
            out_modes = len(ins)
        outs = (
            factorize(out_features, _as_int(out_modes, "out_modes")) if isinstance(out_modes, int) else tuple(out_modes)
        )
        if math.prod(ins) != in_features:
            raise ValueError(f"in_modes {ins} multiply to {math.prod(ins)} but in_features is {in_features}")
        if math.prod(outs) != out_features:
            raise ValueError(f"out_modes {outs} multiply to {math.prod(outs)} but out_features is {out_features}")
        k = len(ins)
        r = (ranks,) * (k - 1) if isinstance(ranks, int) else tuple(ranks)
        return cls(tuple(outs), tuple(ins), r)

    @property
    def num_cores(self) -> int:
        return len(self.in_modes)

    @property
    def bond_ranks(self) -> tuple[int, ...]:
        return (1, *self.ranks, 1)

    @property
    def core_shapes(self) -> tuple[tuple[int, int, int, int], ...]:
        b = self.bond_ranks
        return tuple((b[k], m, n, b[k + 1]) for k, (m, n) in enumerate(zip(self.out_modes, self.in_modes)))

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    @property
    def max_rank(self) -> int:
        return max(self.ranks, default=1)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.core_shapes)

    def describe(self) -> str:
        return "(" + ", ".join(f"{m}x{n}" for m, n in zip(self.out_modes, self.in_modes)) + f"; ranks {self.ranks})"

    def check_cores(self, cores: Sequence[Tensor]) -> None:
        if len(cores) != self.num_cores:
            raise ValueError(f"cores has {len(cores)} tensors but the spec has {self.num_cores} cores")
        for k, (core, shape) in enumerate(zip(cores, self.core_shapes)):
            if not isinstance(core, Tensor):
                raise TypeError(f"cores[{k}] must be a torch.Tensor, got {type(core).__name__}")
            if tuple(core.shape) != shape:
                raise ValueError(f"cores[{k}] has shape {tuple(core.shape)} but the spec needs {shape}")
            if not core.is_floating_point():
                raise TypeError(f"cores[{k}] must be floating point, got {core.dtype}")


def _spec_of(cores: Sequence[Tensor]) -> TTMSpec:
    return TTMSpec(
        tuple(c.shape[1] for c in cores), tuple(c.shape[2] for c in cores), tuple(c.shape[3] for c in cores[:-1])
    )


def ttm_dense(cores: Sequence[Tensor]) -> Tensor:
    """The dense ``dW`` ``(d_out, d_in)`` of TT-matrix cores (for merging and tests only)."""
    spec = _spec_of(cores)
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


class _TTMFunction(torch.autograd.Function):
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

    * ``"torch"``: the einsum sweep (:func:`ttm_plan` picks ``order``, ``"ltr"`` or ``"rtl"``, when None), analytic
      backward; any dtype, any device. The cores are cast to x's dtype.
    * ``"triton"`` / ``"cuda"``: the fused Kronecker-sum kernels (:func:`choose_split` cuts the chain; the factors
      are merged in the cores' dtype, then cast to x's). float32, bfloat16, float16. Where no cut keeps the
      second factor within the Triton kernels' limit (128 per side), the staged sweep runs instead (each stage a
      vendor GEMM, intermediates in memory); ``"cuda"`` (bond ranks <= 16, sides <= 64) raises.
    * ``"dense"``: reconstruct-then-GEMM (dW built in float32, one GEMM in x's dtype).
    * ``"auto"`` (default): ``"torch"`` off CUDA or in float64; on CUDA, :func:`ttm_dispatch`.
    * ``"kron-torch"``: the fused path's plumbing with torch contractions (tests, float64).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    cores = list(cores)
    spec = _spec_of(cores) if all(isinstance(c, Tensor) and c.dim() == 4 for c in cores) and cores else None
    if spec is None:
        raise ValueError("cores must be a non-empty list of 4-D tensors (r_prev, m, n, r_next)")
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
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec.in_features)
    if backend == "auto":
        backend = ttm_dispatch(spec, x2.shape[0], x.dtype, x.device)
    if backend in ("triton", "cuda") and x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"backend={backend!r} computes in float32, bfloat16 or float16, not {x.dtype}; use backend='torch'"
        )
    y = None
    if backend == "dense":
        y = _dense_apply(x2, cores, float(scaling))
    elif backend in ("triton", "cuda", "kron-torch"):
        y = _kron_apply(x2, cores, float(scaling), spec, backend)
        if y is None and backend == "cuda":
            raise ValueError(
                f"backend='cuda' runs TT-matrix chains with a cut of bond rank <= 16 and sides <= 64; "
                f"{spec.describe()} has none: use backend='triton' or 'torch'"
            )
    if y is None:  # torch, or the staged plan of a chain the fused kernels cannot hold
        order = order or ttm_plan(spec, max(x2.shape[0], 1))["order"]
        y = _TTMFunction.apply(x2, float(scaling), order, *[c.to(x.dtype) for c in cores])
    return y.reshape(*lead, spec.out_features)


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


# ------------------------------------------------------------------------------------------------ kernel paths
class _RefKernels:
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


class _TritonKernels:
    def __init__(self) -> None:
        from ._triton_kernels import ttm as k

        self.k = k

    def apply(self, x3, q, p, out3):
        self.k.kron_apply(x3, q, p, out3)

    def grad_q(self, dy3, x3, p, q):
        return self.k.kron_grad_q(dy3, x3, p, q)

    def grad_p(self, dy3, x3, p, q):
        return self.k.kron_grad_p(dy3, x3, p, q)


class _CudaKernels:
    def __init__(self) -> None:
        from . import _cuda_backend

        _cuda_backend.load()
        self.k = _cuda_backend

    def apply(self, x3, q, p, out3):
        out3.copy_(self.k.kron_apply(x3, q, p))

    def grad_q(self, dy3, x3, p, q):
        return self.k.kron_grad_q(dy3, x3, p)

    def grad_p(self, dy3, x3, p, q):
        return self.k.kron_grad_p(dy3, x3, q)


class _KronFunction(torch.autograd.Function):
    """``y = x dW^T`` with dW the Kronecker sum of ``(q, p)``; saves x (and the small factors), recomputes the
    kernels' intermediates in backward. ``layout = (n_L, n_R, m_L, m_R, order)``."""

    @staticmethod
    def forward(ctx, x2: Tensor, q: Tensor, p: Tensor, layout: tuple, kernels) -> Tensor:
        n_l, n_r, m_l, m_r, order = layout
        y2 = torch.empty((x2.shape[0], m_l * m_r), dtype=x2.dtype, device=x2.device)
        kernels.apply(kron_views(x2, n_l, n_r, order), q, p, kron_views(y2, m_l, m_r, order))
        ctx.save_for_backward(x2, q, p)
        ctx.layout, ctx.kernels = layout, kernels
        return y2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy2: Tensor):
        x2, q, p = ctx.saved_tensors
        n_l, n_r, m_l, m_r, order = ctx.layout
        kernels = ctx.kernels
        dy3 = kron_views(dy2.contiguous(), m_l, m_r, order)
        x3 = kron_views(x2, n_l, n_r, order)
        dx2 = dq = dp = None
        if ctx.needs_input_grad[0]:  # dx_b = sum_r Q_r^T dY_b P_r^T: the forward with both factors transposed
            dx2 = torch.empty_like(x2)
            qt, pt = q.transpose(1, 2).contiguous(), p.transpose(1, 2).contiguous()
            kernels.apply(dy3, qt, pt, kron_views(dx2, n_l, n_r, order))
        if ctx.needs_input_grad[1]:
            dq = kernels.grad_q(dy3, x3, p, q).to(q.dtype)
        if ctx.needs_input_grad[2]:
            dp = kernels.grad_p(dy3, x3, p, q).to(p.dtype)
        return dx2, dq, dp, None, None


TTM_BACKENDS = ("auto", "torch", "dense", "triton", "cuda", "kron-torch")
_KERNEL_OBJECTS: dict[str, object] = {}


def _kernels(name: str, device: torch.device):
    if name == "kron-torch":
        return _RefKernels
    if name == "triton":
        from .ops import _triton_backend

        _triton_backend(device)  # raises BackendUnavailableError with the reason (no GPU, no interpreter)
    if name == "cuda":
        from .ops import _cuda_backend

        _cuda_backend(device)
    if name not in _KERNEL_OBJECTS:
        _KERNEL_OBJECTS[name] = _TritonKernels() if name == "triton" else _CudaKernels()
    return _KERNEL_OBJECTS[name]


def _kron_split_for(spec: TTMSpec, backend: str) -> Optional[KronSplit]:
    if backend == "cuda":
        from . import _cuda_backend

        kb = _cuda_backend
        return choose_split(spec, max_kept=kb.KRON_MAX_KEPT, pad=1, max_rank=kb.KRON_MAX_RANK)
    return choose_split(spec)


def _kron_apply(x2: Tensor, cores: Sequence[Tensor], scaling: float, spec: TTMSpec, backend: str) -> Optional[Tensor]:
    """The fused path, or None when no split fits the kernels (the caller runs the staged sweep)."""
    kernels = _kernels(backend, x2.device)  # first: a device the kernels cannot run on is refused either way
    split = _kron_split_for(spec, backend)
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
    return _KronFunction.apply(x2.contiguous(), q, p, layout, kernels)


def _dense_apply(x2: Tensor, cores: Sequence[Tensor], scaling: float) -> Tensor:
    """Reconstruct-then-GEMM: dW built from the cores (in their dtype, float32 at least), one GEMM."""
    acc = torch.float64 if x2.dtype == torch.float64 else torch.float32
    dw = ttm_dense([c.to(acc) for c in cores]) * scaling
    return F.linear(x2, dw.to(x2.dtype))


# The dispatch of backend="auto" on CUDA tensors: measured once per (spec, token bucket, dtype, device).
_DISPATCH: dict[tuple, str] = {}
DISPATCH_MODE = os.environ.get("TTKERNELS_TTM_DISPATCH", "measure")


def _token_bucket(m: int) -> int:
    return 1 << max(0, (max(m, 1) - 1).bit_length())


def dispatch_model(spec: TTMSpec, tokens: int) -> str:
    """The FLOP model behind ``backend="auto"`` when nothing is measured: forward and backward of the fused
    Kronecker-sum kernels (about four forward sweeps, kept sides padded to 16) against reconstruct-then-GEMM
    (three GEMMs of ``d_out x d_in`` per token plus building dW and its gradient)."""
    split = choose_split(spec)
    if split is None:
        return "dense"
    fused = 4 * split.flops_per_token(16) * tokens
    dense = 6 * spec.in_features * spec.out_features * tokens + 4 * spec.in_features * spec.out_features * spec.max_rank
    return "triton" if fused < dense else "dense"


def _measure(spec: TTMSpec, tokens: int, dtype: torch.dtype, device: torch.device, candidates: list[str]) -> str:
    """Time forward + backward of each candidate once (after a warm-up) on random inputs of this shape."""
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, spec.in_features, device=device, dtype=dtype, generator=gen).requires_grad_()
    cores = [
        torch.randn(s, device=device, dtype=torch.float32, generator=gen).div_(math.sqrt(s[0] * s[2])).requires_grad_()
        for s in spec.core_shapes
    ]
    dy = torch.randn(tokens, spec.out_features, device=device, dtype=dtype, generator=gen)
    best, best_ms = candidates[0], float("inf")
    for name in candidates:
        try:

            def step():
                y = ttm_apply(x, cores, backend=name)
                torch.autograd.backward(y, dy)

            step()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(3):
                step()
            stop.record()
            stop.synchronize()
            ms = start.elapsed_time(stop) / 3
        except Exception:  # a path that cannot run here (no extension, a limit) is not a candidate
            continue
        if ms < best_ms:
            best, best_ms = name, ms
    return best


def ttm_dispatch(spec: TTMSpec, tokens: int, dtype: torch.dtype, device: torch.device) -> str:
    """What ``backend="auto"`` runs for this shape: ``"torch"`` off CUDA; on CUDA the fastest of ``"triton"``
    (fused Kronecker-sum kernels), ``"cuda"`` (where its limits allow) and ``"dense"`` (reconstruct-then-GEMM),
    measured once per spec, power-of-two token bucket, dtype and device and cached (``TTKERNELS_TTM_DISPATCH=model``:
    :func:`dispatch_model` instead, also used while a CUDA graph is captured or torch.compile traces)."""
    if device.type != "cuda" or dtype == torch.float64:
        return "torch"
    key = (spec, _token_bucket(tokens), dtype, device)
    if key in _DISPATCH:
        return _DISPATCH[key]
    capturing = torch.cuda.is_current_stream_capturing() or torch.compiler.is_compiling()
    if DISPATCH_MODE == "model" or capturing:
        return dispatch_model(spec, tokens)
    candidates = ["dense"] + (["triton"] if choose_split(spec) is not None else [])
    if _kron_split_for(spec, "cuda") is not None:
        candidates.append("cuda")
    with torch.enable_grad():
        _DISPATCH[key] = _measure(spec, tokens, dtype, device, candidates)
    return _DISPATCH[key]


# ------------------------------------------------------------------------------------------------ module
class TTMLinear(nn.Module):
    """A frozen linear layer plus a TT-matrix adapter: ``x W^T + b + scaling * x dW^T``.

    The TT-matrix counterpart of :class:`~ttkernels.TTLinear`, with its contract: the base is shared and frozen
    (``from_linear``), delta-W starts at zero (the last core is zero; the others are drawn from
    ``N(0, 1 / (r_{k-1} n_k))``, the first times 1/3), ``scaling = alpha / max(ranks) * sqrt(F)`` with
    ``F = d_out / (m_K n_K^2)`` (:mod:`ttkernels.init`; ``alpha=None``: 1), ``delta_weight()`` is scaled,
    ``merge()`` / ``unmerge()`` fold it into the base weight and back, ``adapter_disabled()`` computes the base
    alone. No dropout. ``backend`` is :func:`ttm_apply`'s (``"auto"``: the torch sweep on the CPU, the measured
    choice between the fused kernels and reconstruct-then-GEMM on a GPU).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        in_modes: int | Sequence[int] = 2,
        out_modes: int | Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        alpha: float | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, in_modes, out_modes, ranks, alpha, adapter_dtype, backend)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        in_modes: int | Sequence[int] = 2,
        out_modes: int | Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        alpha: float | None = None,
        adapter_dtype: torch.dtype | None = None,
        backend: str = "auto",
    ) -> TTMLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, in_modes, out_modes, ranks, alpha, adapter_dtype, backend)
        return self

    def _setup(self, base: nn.Linear, in_modes, out_modes, ranks, alpha, adapter_dtype, backend) -> None:
        if backend not in TTM_BACKENDS:
            raise ValueError(f"backend must be one of {TTM_BACKENDS}, got {backend!r}")
        spec = TTMSpec.build(base.in_features, base.out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        if alpha is not None and (
            isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha)
        ):
            raise ValueError(f"alpha must be a finite number or None, got {alpha!r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        base.weight.requires_grad_(False)
        self.weight = base.weight
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.bias = base.bias
        wd = base.weight.dtype
        dtype = adapter_dtype or (wd if wd in (torch.float32, torch.float64) else torch.float32)
        self.spec = spec
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(s, device=base.weight.device, dtype=dtype)) for s in spec.core_shapes]
        )
        self.alpha = float(spec.max_rank if alpha is None else alpha)
        self.scaling = adapter_scaling(alpha, spec)
        self.merged, self._disabled = False, False
        self.backend = backend
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        init_ttm_cores_(self.cores)

    @property
    def num_adapter_params(self) -> int:
        return self.spec.num_params

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self._disabled == self.merged:  # on and unmerged, or merged but disabled (subtract it)
            sign = -1.0 if self.merged else 1.0
            y = y + ttm_apply(x, list(self.cores), scaling=sign * self.scaling, backend=self.backend).to(y.dtype)
        return y

    def delta_weight(self, *, scaled: bool = True) -> Tensor:
        """The dense delta-W ``(out_features, in_features)``, scaled by default (what :meth:`merge` adds)."""
        dW = ttm_dense(list(self.cores))
        return dW * self.scaling if scaled else dW

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self._add_delta(+1.0)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self._add_delta(-1.0)
            self.merged = False

    def _add_delta(self, sign: float) -> None:
        w = self.weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        w.copy_((w.to(acc) + sign * self.delta_weight().to(device=w.device, dtype=acc)).to(w.dtype))

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[TTMLinear]:
        previous, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = previous

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"cores={self.spec.describe()}, params={self.spec.num_params}, scaling={self.scaling:g}, "
            f"backend={self.backend}" + (", merged=True" if self.merged else "")
        )
