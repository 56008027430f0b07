"""Rank tools: TT-SVD, TT rounding, two-site (DMRG-style) sweeps during training, LoRA <-> TT conversion.

A TT here is a list of cores ``G_k`` of shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_K = 1``; its full tensor
is ``T[i_1, ..., i_K] = G_1[:, i_1, :] ... G_K[:, i_K, :]``. For an adapter (``TTSpec``) the modes are its in,
index and out modes in order, and for a matrix adapter ``T`` reshaped to ``(d_in, d_out)`` is ``dW^T``.

**Error bounds.** Every truncation keeps, at each bond, the fewest singular values whose discarded tail has
norm at most ``delta = rel_eps * ||T||_F / sqrt(K - 1)``, then at most ``max_rank`` of them. Done on an
orthogonalized TT (TT-SVD, :func:`tt_round`, the left-to-right half of :func:`sweep`), the discarded parts are
orthogonal to each other, so the result ``T'`` satisfies ``||T - T'||_F <= rel_eps * ||T||_F`` whenever
``max_rank`` did not cut further (with ``max_rank`` alone, ranks never exceed it and the error is what it is:
:func:`relative_error` measures it without forming ``T``).

**Cost.** Nothing here forms a dense tensor except :func:`tt_svd`, whose input is one. :func:`tt_round` and
:func:`sweep` cost ``O(K n r^3)``; :func:`from_lora` costs ``O((d_in + d_out) r^2)`` plus the small SVDs of the
in and out chains (``O(d_in r max(n_k))`` and ``O(d_out r max(n_k))``), never ``O(d_in d_out)``.

**Training.** :func:`compress_` replaces the cores of a :class:`~ttkernels.TTLinear` (that owns them) or of every
group of a :class:`~ttkernels.MetaTTModel` with swept cores of lower ranks, between optimizer steps; the
optimizer drops the old Parameters and their state and gets the new ones with fresh (zero) moments: AdamW's
moments are per-entry statistics of the old cores' entries, which have no meaning on the new bases, so they
are reset rather than projected. :class:`RankSchedule` calls it every N steps, lowering the largest rank step by
step to a target rank or parameter budget. Rank growth is not implemented: a sweep over existing cores cannot
raise a rank (merging two cores of bond ``r`` gives a matrix of rank at most ``r``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import reference
from .export import lora_factors
from .layer import param_group_holding
from .metatt import MetaTTModel
from .modules import TTLinear
from .spec import TTSpec

__all__ = [
    "RankSchedule",
    "compress_",
    "from_lora",
    "relative_error",
    "sweep",
    "to_lora",
    "tt_full",
    "tt_norm",
    "tt_round",
    "tt_svd",
]


# ------------------------------------------------------------------------------------------------ checks
def _check_limits(max_rank: Optional[int], rel_eps: Optional[float]) -> None:
    if max_rank is not None and (isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1):
        raise ValueError(f"max_rank must be a positive int or None, got {max_rank!r}")
    if rel_eps is not None:
        if isinstance(rel_eps, bool) or not isinstance(rel_eps, (int, float)) or not 0.0 < rel_eps < 1.0:
            raise ValueError(f"rel_eps must be in (0, 1) or None, got {rel_eps!r}")


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _keep(s: Tensor, delta: float, max_rank: Optional[int]) -> int:
    """The fewest leading singular values whose discarded tail has norm <= delta (at least 1, at most max_rank)."""
    tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0]).sqrt()  # tail[i] = ||s[i:]||
    r = int((tail > delta).sum().item()) if delta > 0 else int((s > 0).sum().item())
    r = max(1, min(r, s.numel()))
    return min(r, max_rank) if max_rank is not None else r


# ------------------------------------------------------------------------------------------------ basics
def tt_full(cores: Sequence[Tensor]) -> Tensor:
    """The dense tensor of a TT (for tests and small problems)."""
    cores = reference.check_chain(cores, values=True)
    t = cores[0].reshape(cores[0].shape[1], -1)
    for c in cores[1:]:
        t = (t @ c.reshape(c.shape[0], -1)).reshape(-1, c.shape[2])
    return t.reshape([c.shape[1] for c in cores])


def _right_orthogonalize(cores: list[Tensor]) -> list[Tensor]:
    """Cores 1..K-1 right-orthonormal (QR from the right); the whole norm ends up in core 0."""
    cores = [c.to(_work_dtype(c)) for c in cores]
    for k in range(len(cores) - 1, 0, -1):
        r0, n, r1 = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(r0, n * r1).t())  # G = r^T q^T
        rk = q.shape[1]
        cores[k] = q.t().reshape(rk, n, r1)
        p0, pn, _ = cores[k - 1].shape
        cores[k - 1] = (cores[k - 1].reshape(p0 * pn, r0) @ r.t()).reshape(p0, pn, rk)
    return cores


def tt_norm(cores: Sequence[Tensor]) -> Tensor:
    """``||T||_F`` without forming T."""
    cores = reference.check_chain(cores, values=True)
    return torch.linalg.vector_norm(_right_orthogonalize(cores)[0])


def _difference(a: list[Tensor], b: list[Tensor]) -> list[Tensor]:
    """The TT of ``A - B``: block cores (first: side by side, middle: block-diagonal, last: stacked)."""
    dtype = _work_dtype(a[0])
    a, b = [c.to(dtype) for c in a], [c.to(dtype) for c in b]
    if len(a) == 1:
        return [a[0] - b[0]]
    out = [torch.cat([a[0], -b[0]], dim=2)]
    for x, y in zip(a[1:-1], b[1:-1]):
        block = x.new_zeros(x.shape[0] + y.shape[0], x.shape[1], x.shape[2] + y.shape[2])
        block[: x.shape[0], :, : x.shape[2]] = x
        block[x.shape[0] :, :, x.shape[2] :] = y
        out.append(block)
    out.append(torch.cat([a[-1], b[-1]], dim=0))
    return out


def relative_error(cores: Sequence[Tensor], approx: Sequence[Tensor]) -> float:
    """``||T - T'||_F / ||T||_F`` of two TTs with the same mode sizes, without forming either (the norm of the
    difference's TT, by orthogonalization: no cancellation)."""
    cores, approx = reference.check_chain(cores, values=True), reference.check_chain(approx, "approx", values=True)
    if [c.shape[1] for c in cores] != [c.shape[1] for c in approx]:
        raise ValueError("the two TTs have different mode sizes")
    num = float(tt_norm(_difference(cores, approx)))
    den = float(tt_norm(cores))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


# ------------------------------------------------------------------------------------------------ TT-SVD
def tt_svd(
    tensor: Tensor,
    max_rank: Optional[int] = None,
    rel_eps: Optional[float] = None,
    *,
    in_modes: Optional[Sequence[int]] = None,
    out_modes: Optional[Sequence[int]] = None,
) -> list[Tensor]:
    """The TT cores of a dense tensor, by sequential truncated SVDs (TT-SVD).

    With ``in_modes`` and ``out_modes``, ``tensor`` is a matrix ``(d_in, d_out)`` (an adapter's ``dW^T``) taken
    as the tensor of modes ``(*in_modes, *out_modes)`` (C order, as ``TTSpec``). Relative Frobenius error at
    most ``rel_eps`` (see the module docstring); ranks at most ``max_rank``; both None: exact to working
    precision (singular values below ``10 eps ||T||`` are dropped, so a tensor of exact TT rank gets it). Computes in float64 for float64 input, else float32; returns cores in
    the input's dtype.
    """
    if not isinstance(tensor, Tensor) or not tensor.is_floating_point():
        raise TypeError(f"tensor must be a floating-point torch.Tensor, got {getattr(tensor, 'dtype', type(tensor))}")
    if tensor.device.type == "meta" or not torch.isfinite(tensor).all():
        raise ValueError("tensor holds non-finite values (NaN or inf) or is on the meta device: TT-SVD needs values")
    _check_limits(max_rank, rel_eps)
    if (in_modes is None) != (out_modes is None):
        raise ValueError("give both in_modes and out_modes, or neither")
    if in_modes is not None:
        if tensor.dim() != 2:
            raise ValueError(
                f"with in_modes / out_modes, tensor must be a (d_in, d_out) matrix, got {tuple(tensor.shape)}"
            )
        spec = TTSpec.build(in_modes, out_modes, 1, in_features=tensor.shape[0], out_features=tensor.shape[1])
        tensor = tensor.reshape([m.size for m in spec.modes])
    if tensor.dim() == 0 or tensor.numel() == 0:
        raise ValueError(f"tensor must have at least one mode and no empty one, got shape {tuple(tensor.shape)}")
    sizes = list(tensor.shape)
    work = tensor.detach().to(_work_dtype(tensor))
    d = len(sizes)
    delta = _rounding_delta(work, float(torch.linalg.vector_norm(work)), rel_eps, d)
    cores, rest, r_prev = [], work.reshape(sizes[0], -1), 1
    for k in range(d - 1):
        u, s, vh = torch.linalg.svd(rest.reshape(r_prev * sizes[k], -1), full_matrices=False)
        r = _keep(s, delta, max_rank)
        cores.append(u[:, :r].reshape(r_prev, sizes[k], r))
        rest = s[:r, None] * vh[:r]
        r_prev = r
    cores.append(rest.reshape(r_prev, sizes[-1], 1))
    return [c.to(tensor.dtype) for c in cores]


def tt_round(cores: Sequence[Tensor], max_rank: Optional[int] = None, rel_eps: Optional[float] = None) -> list[Tensor]:
    """Truncate a TT to lower ranks without forming it: right-to-left QR, then left-to-right truncated SVDs.

    Ranks never exceed ``max_rank``; with ``rel_eps`` the relative Frobenius error is at most ``rel_eps``
    (unless ``max_rank`` cuts further). Both None: exact recompression (ranks drop only where the TT is
    over-parameterized to working precision). Returns new cores in the input's dtype.
    """
    cores = reference.check_chain(cores, values=True)
    _check_limits(max_rank, rel_eps)
    dtype = cores[0].dtype
    work = _right_orthogonalize(cores)
    d = len(work)
    norm = float(torch.linalg.vector_norm(work[0]))
    delta = _rounding_delta(work, norm, rel_eps, d)
    for k in range(d - 1):
        r0, n, r1 = work[k].shape
        u, s, vh = torch.linalg.svd(work[k].reshape(r0 * n, r1), full_matrices=False)
        r = _keep(s, delta, max_rank)
        work[k] = u[:, :r].reshape(r0, n, r)
        nxt = work[k + 1]
        work[k + 1] = ((s[:r, None] * vh[:r]) @ nxt.reshape(r1, -1)).reshape(r, nxt.shape[1], nxt.shape[2])
    return [c.to(dtype) for c in work]


def _rounding_delta(work: Sequence[Tensor] | Tensor, norm: float, rel_eps: Optional[float], d: int) -> float:
    if rel_eps is not None and d > 1:
        return rel_eps * norm / math.sqrt(d - 1)
    # exact: drop only what is zero to working precision
    dtype = work.dtype if isinstance(work, Tensor) else work[0].dtype
    return norm * torch.finfo(dtype).eps * 10


def sweep(cores: Sequence[Tensor], max_rank: Optional[int] = None, rel_eps: Optional[float] = None) -> list[Tensor]:
    """One DMRG-style two-site sweep: right-orthogonalize, then left to right merge each neighbouring pair
    into ``(r_{k-1} n_k, n_{k+1} r_{k+1})``, truncate its SVD (``max_rank``, ``rel_eps``: the bound of the
    module docstring) and split it (left factor orthonormal); then right to left re-split each pair exactly, so
    the norm ends in the first core as it started. Returns new cores in the input's dtype."""
    cores = reference.check_chain(cores, values=True)
    _check_limits(max_rank, rel_eps)
    dtype = cores[0].dtype
    work = _right_orthogonalize(cores)
    d = len(work)
    delta = _rounding_delta(work, float(torch.linalg.vector_norm(work[0])), rel_eps, d)

    def split(k: int, keep_delta: float, limit: Optional[int], left_orthonormal: bool) -> None:
        a, b = work[k], work[k + 1]
        r0, n0, r1 = a.shape
        _, n1, r2 = b.shape
        pair = torch.einsum("anb,bmc->anmc", a, b).reshape(r0 * n0, n1 * r2)
        u, s, vh = torch.linalg.svd(pair, full_matrices=False)
        # the pair has rank <= r1: its further singular values are rounding noise, never kept
        r = _keep(s, keep_delta, r1 if limit is None else min(limit, r1))
        if left_orthonormal:
            work[k], work[k + 1] = u[:, :r].reshape(r0, n0, r), (s[:r, None] * vh[:r]).reshape(r, n1, r2)
        else:
            work[k], work[k + 1] = (u[:, :r] * s[:r]).reshape(r0, n0, r), vh[:r].reshape(r, n1, r2)

    for k in range(d - 1):
        split(k, delta, max_rank, left_orthonormal=True)
    exact = _rounding_delta(work, float(torch.linalg.vector_norm(work[0])), None, d)
    for k in range(d - 2, -1, -1):
        split(k, exact, None, left_orthonormal=False)
    return [c.to(dtype) for c in work]


# ------------------------------------------------------------------------------------------------ LoRA
def from_lora(
    lora_A: Tensor,
    lora_B: Tensor,
    in_modes: Sequence[int],
    out_modes: Sequence[int],
    max_rank: Optional[int] = None,
    rel_eps: Optional[float] = None,
    *,
    scaling: float = 1.0,
) -> tuple[list[Tensor], TTSpec]:
    """A TT adapter ``(cores, spec)`` whose ``dW^T`` is ``scaling * (B A)^T``, from a LoRA adapter in PEFT's
    layout (``lora_A``: ``(r, d_in)``, ``lora_B``: ``(d_out, r)``), without forming the ``d_out x d_in`` matrix.

    The in part is a QR of ``A^T`` whose ``Q`` is split into the in modes by exact TT-SVD; the out part is the
    TT-SVD of ``R B^T`` (``r x d_out``); the two chains are joined and :func:`tt_round` truncates
    (``max_rank``, ``rel_eps``). Exact when the ranks allow. ``spec`` has the resulting per-bond ranks.
    """
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D floating-point tensor, got {getattr(t, 'shape', type(t))}")
        if t.device.type == "meta" or not torch.isfinite(t).all():
            raise ValueError(f"{name} holds non-finite values (NaN or inf) or is on the meta device")
    if lora_A.shape[0] != lora_B.shape[1]:
        raise ValueError(f"lora_A is {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}: their ranks differ")
    _check_limits(max_rank, rel_eps)
    d_in, d_out = lora_A.shape[1], lora_B.shape[0]
    shape_spec = TTSpec.build(in_modes, out_modes, 1, in_features=d_in, out_features=d_out)
    in_sizes, out_sizes = list(shape_spec.in_sizes), list(shape_spec.out_sizes)
    dtype = _work_dtype(lora_A)
    q, r = torch.linalg.qr(lora_A.t().to(dtype))  # A^T = Q R: (d_in, k), (k, r)
    left = tt_svd(q.reshape(*in_sizes, q.shape[1]))  # cores of modes (*in, k); the last is (r_p, k, 1)
    join = left[-1].reshape(left[-1].shape[0], -1)  # (r_p, k)
    right_mat = join @ r @ (scaling * lora_B.t().to(dtype))  # (r_p, d_out)
    right = tt_svd(right_mat.reshape(right_mat.shape[0], *out_sizes))  # modes (r_p, *out); first core (1, r_p, s)
    first = right[0].reshape(right[0].shape[1], right[0].shape[2])  # (r_p, s)
    joined = torch.einsum("anb,bc->anc", left[-2], first)  # left has len(in_sizes) + 1 >= 2 cores
    cores = tt_round([*left[:-2], joined, *right[1:]], max_rank, rel_eps)
    spec = TTSpec.build(in_sizes, out_sizes, [c.shape[2] for c in cores[:-1]])
    return [c.to(lora_A.dtype) for c in cores], spec


def to_lora(
    cores: Sequence[Tensor],
    spec: TTSpec,
    index: Optional[dict] = None,
    *,
    task: Optional[int] = None,
    scaling: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """LoRA factors ``(lora_A (r, d_in), lora_B (d_out, r))`` with ``lora_B @ lora_A == scaling * dW`` exactly,
    from the bottleneck form ``dW^T = A C B`` (``r = r_b``); ``index`` / ``task`` pick fixed and per-sample
    slices. ``scaling`` (the adapter's ``alpha / rank``) is folded into ``lora_B``: the default 1 gives the
    unscaled delta-W, an adapter's ``scaling`` the delta-W its layer adds."""
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling must be a finite number, got {scaling!r}")
    return lora_factors(list(cores), spec, index, task=task, scaling=float(scaling))


# ------------------------------------------------------------------------------------------------ training
@torch.no_grad()
def compress_(
    module: nn.Module,
    max_rank: Optional[int] = None,
    rel_eps: Optional[float] = None,
    *,
    optimizer: Optional[torch.optim.Optimizer] = None,
) -> dict[str, tuple[int, ...]]:
    """Sweep the cores of ``module`` (a :class:`~ttkernels.TTLinear` owning its cores, a
    :class:`~ttkernels.MetaTTModel`: every group, a TT-LoRA layer of :mod:`ttkernels.peft`: every adapter, or a
    model holding TT-LoRA layers, such as a ``peft.PeftModel``: every layer and adapter) down to ``max_rank`` /
    ``rel_eps`` in place, between steps.

    The scaling stays as it was, so the outputs move only by the truncation. Returns the new ranks per TT
    (``""`` for a TTLinear, the group names for MetaTT, the adapter names for a TT-LoRA layer,
    ``"<module name>:<adapter>"`` for a model with TT-LoRA layers).
    """
    _check_limits(max_rank, rel_eps)
    if max_rank is None and rel_eps is None:
        raise ValueError("give max_rank, rel_eps or both")
    if isinstance(module, MetaTTModel):
        out = {}
        for name in list(module.groups):
            reference.check_chain(list(module.metatt_cores[name]), f"the cores of group {name}", values=True)
            new = sweep(list(module.metatt_cores[name]), max_rank, rel_eps)
            module.replace_cores(name, new, optimizer=optimizer)
            out[name] = module.groups[name].spec.ranks
        return out
    if isinstance(module, TTLinear):
        if not module.owns_cores:
            raise ValueError("this TTLinear is a view onto shared cores: compress their owner (e.g. the MetaTTModel)")
        module.replace_cores(sweep(list(module.cores), max_rank, rel_eps), optimizer=optimizer)
        return {"": module.spec.ranks}
    if _is_tt_lora_layer(module):
        return _compress_tt_lora(module, max_rank, rel_eps, optimizer)
    layers = [(n, m) for n, m in module.named_modules() if _is_tt_lora_layer(m)]
    if layers:
        if optimizer is not None:  # every adapter is checked before any is changed
            for name, layer in layers:
                for a, cores in layer.lora_tt_cores.items():
                    param_group_holding(optimizer, list(cores), f"the cores of {name} (adapter {a!r})")
        return {
            f"{name}:{a}": ranks
            for name, layer in layers
            for a, ranks in _compress_tt_lora(layer, max_rank, rel_eps, optimizer).items()
        }
    raise TypeError(
        f"compress_ takes a TTLinear, a MetaTTModel, a TT-LoRA layer or a model holding TT-LoRA layers, got "
        f"{type(module).__name__}"
    )


def _is_tt_lora_layer(module: nn.Module) -> bool:
    # ttkernels.peft.TTLoraLinear, recognized by what it holds (peft is an optional integration above this module)
    return (
        isinstance(getattr(module, "lora_tt_cores", None), nn.ModuleDict)
        and hasattr(module, "tt_spec")
        and callable(getattr(module, "replace_cores", None))
    )


def _compress_tt_lora(layer: nn.Module, max_rank: Optional[int], rel_eps: Optional[float], optimizer: Any) -> dict:
    out = {}
    for a in list(layer.lora_tt_cores):
        cores = reference.check_chain(list(layer.lora_tt_cores[a]), f"the cores of adapter {a!r}", values=True)
        layer.replace_cores(sweep(cores, max_rank, rel_eps), adapter=a, optimizer=optimizer)
        out[a] = layer.tt_spec[a].ranks
    return out


class RankSchedule:
    """Progressive rank reduction during training: every ``every`` steps, :func:`compress_` lowers the largest
    bond rank of ``module`` one stage closer to ``final_rank`` (or to the largest rank whose parameter count
    fits ``max_params``), in ``stages`` equal stages; ``rel_eps``, when given, may cut further.

    Call ``schedule.step(step)`` after ``optimizer.step()``; it returns the new ranks when it compressed.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: Optional[torch.optim.Optimizer],
        *,
        every: int,
        final_rank: Optional[int] = None,
        max_params: Optional[int] = None,
        stages: int = 1,
        rel_eps: Optional[float] = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int, got {every!r}")
        if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
            raise ValueError(f"stages must be a positive int, got {stages!r}")
        if (final_rank is None) == (max_params is None):
            raise ValueError("give exactly one of final_rank and max_params")
        _check_limits(final_rank, rel_eps)
        self.module, self.optimizer, self.every, self.stages, self.rel_eps = module, optimizer, every, stages, rel_eps
        self.start_rank = self._max_rank()
        self.final_rank = final_rank if final_rank is not None else self._rank_for_budget(max_params)
        self.done = 0

    def _specs(self) -> list[TTSpec]:
        if isinstance(self.module, MetaTTModel):
            return [g.spec for g in self.module.groups.values()]
        return [self.module.spec]

    def _max_rank(self) -> int:
        return max(max(s.ranks) for s in self._specs())

    def _rank_for_budget(self, max_params: object) -> int:
        if isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1:
            raise ValueError(f"max_params must be a positive int, got {max_params!r}")
        for r in range(self._max_rank(), 0, -1):
            total = sum(TTSpec(s.modes, tuple(min(x, r) for x in s.ranks)).num_params for s in self._specs())
            if total <= max_params:
                return r
        raise ValueError(f"no rank fits max_params = {max_params}: rank 1 needs more")

    def step(self, step: int) -> Optional[dict]:
        if isinstance(step, bool) or not isinstance(step, int):
            raise TypeError(f"step must be an int (the optimizer step count), got {type(step).__name__}")
        if step <= 0 or step % self.every or self.done >= self.stages:
            return None
        self.done += 1
        target = self.start_rank - (self.start_rank - self.final_rank) * self.done // self.stages
        return compress_(self.module, max(target, 1), self.rel_eps, optimizer=self.optimizer)
