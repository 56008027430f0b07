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
gradient being the contraction of its left state and right environment. Activation memory saved for backward
is x (the frozen base saves none), so 1.0x the bytes of x.

Checked by tests/test_ttm.py (float64 gradcheck, the dense formula, Kronecker equivalence, tensorly-torch's
block-TT layer, saved bytes). Reference only: the fused Triton / CUDA sweeps of the TT-matrix issue are not
built yet.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .spec import _as_int, factorize

__all__ = ["TTMLinear", "TTMSpec", "ttm_apply", "ttm_dense", "ttm_plan"]


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


def ttm_apply(x: Tensor, cores: Sequence[Tensor], *, scaling: float = 1.0, order: Optional[str] = None) -> Tensor:
    """``scaling * x dW^T`` for ``x`` of shape ``(..., d_in)``, differentiable (analytic backward, saves x).

    ``order``: ``"ltr"``, ``"rtl"`` or None (:func:`ttm_plan` picks). x, the cores and the output share x's
    dtype (cores are cast to it).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    cores = list(cores)
    spec = _spec_of(cores) if all(isinstance(c, Tensor) and c.dim() == 4 for c in cores) and cores else None
    if spec is None:
        raise ValueError("cores must be a non-empty list of 4-D tensors (r_prev, m, n, r_next)")
    spec.check_cores(cores)  # the spec's bonds come from the cores: a broken chain or end fails here
    if x.shape[-1] != spec.in_features:
        raise ValueError(f"x has last dimension {x.shape[-1]} but the cores take {spec.in_features} inputs")
    if order not in (None, "ltr", "rtl"):
        raise ValueError(f"order must be 'ltr', 'rtl' or None, got {order!r}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, spec.in_features)
    order = order or ttm_plan(spec, max(x2.shape[0], 1))["order"]
    y = _TTMFunction.apply(x2, float(scaling), order, *[c.to(x.dtype) for c in cores])
    return y.reshape(*lead, spec.out_features)


# ------------------------------------------------------------------------------------------------ module
class TTMLinear(nn.Module):
    """A frozen linear layer plus a TT-matrix adapter: ``x W^T + b + scaling * x dW^T``.

    The TT-matrix counterpart of :class:`~ttkernels.TTLinear`, with its contract: the base is shared and frozen
    (``from_linear``), delta-W starts at zero (the last core is zero; the others are drawn from
    ``N(0, 1 / (r_{k-1} n_k))``), ``scaling = alpha / max(ranks)``, ``delta_weight()`` is scaled,
    ``merge()`` / ``unmerge()`` fold it into the base weight and back, ``adapter_disabled()`` computes the base
    alone. No dropout.
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
    ) -> None:
        super().__init__()
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, in_modes, out_modes, ranks, alpha, adapter_dtype)

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
    ) -> TTMLinear:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, in_modes, out_modes, ranks, alpha, adapter_dtype)
        return self

    def _setup(self, base: nn.Linear, in_modes, out_modes, ranks, alpha, adapter_dtype) -> None:
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
        self.scaling = self.alpha / spec.max_rank
        self.merged, self._disabled = False, False
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        last = len(self.cores) - 1
        for k, core in enumerate(self.cores):
            if k == last:
                core.zero_()
            else:
                core.normal_(0.0, (1.0 / (core.shape[0] * core.shape[2])) ** 0.5)

    @property
    def num_adapter_params(self) -> int:
        return self.spec.num_params

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self._disabled == self.merged:  # on and unmerged, or merged but disabled (subtract it)
            sign = -1.0 if self.merged else 1.0
            y = y + ttm_apply(x, list(self.cores), scaling=sign * self.scaling).to(y.dtype)
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
            f"cores={self.spec.describe()}, params={self.spec.num_params}, scaling={self.scaling:g}"
            + (", merged=True" if self.merged else "")
        )
