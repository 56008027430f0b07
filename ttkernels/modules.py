"""``TTLinear``: a drop-in ``nn.Linear`` with a frozen base and a trainable TT adapter.

``TTLinear(x) = x W^T + b + scaling * x dW^T`` where ``dW^T`` is the TT adapter of :mod:`ttkernels.spec`
(C-order flattening of the in and out multi-indices) and ``scaling = alpha / max(ranks)``. The module
knows nothing about kernels: it builds the factors from its cores and calls :func:`ttkernels.ops.tt_adapter`.

**Initialization and scaling** (:mod:`ttkernels.init`, where the rule is derived). delta-W is zero at the
start, as LoRA's zero ``B``: the last core is zero, and the in part ``A`` has LoRA's variance ``1 / (3 d_in)``.
``scaling = alpha / max(ranks) * sqrt(F)`` with ``F = d_out / s_K`` (1 for the LoRA-shaped chain), so that an
Adam step moves the output as LoRA's does at the same ``alpha``, rank and learning rate; ``alpha=None``
means ``scaling = 1``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops, reference
from .init import adapter_scaling, init_cores_
from .spec import TTSpec

__all__ = ["TTLinear", "init_cores_", "new_cores"]


def _adapter_dtype(dtype: Optional[torch.dtype], adapter_dtype: Optional[torch.dtype]) -> torch.dtype:
    if adapter_dtype is not None:
        return adapter_dtype
    dtype = dtype or torch.get_default_dtype()
    # Low-precision bases keep a float32 adapter, as mixed-precision training wants.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class TTLinear(nn.Module):
    """A frozen linear layer plus a tensor-train adapter.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        in_modes, out_modes: the factorization of ``in_features`` / ``out_features``: a sequence of sizes,
            an int asking for that many near-balanced factors, or None for a single mode (the
            LoRA-shaped two-core chain).
        ranks: one bond rank for every bond, or one per bond (``len(in_modes) + len(out_modes) - 1``).
        alpha: the scale numerator; ``scaling = alpha / max(ranks) * sqrt(F)`` (:mod:`ttkernels.init`).
            None: ``scaling = 1``.
        dropout: dropout probability on the adapter's input, in ``[0, 1)``; no mask is stored.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :mod:`ttkernels.ops`).
        device, dtype: of the base weight; the cores follow ``device``.
        adapter_dtype: dtype of the cores; default float32 for float16/bfloat16 bases, else ``dtype``.
    """

    cores: nn.ParameterList

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        in_modes: int | Sequence[int] | None = None,
        out_modes: int | Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        spec = TTSpec.linear(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_base(base)
        cores = new_cores(spec, device, _adapter_dtype(dtype, adapter_dtype))
        self._attach_adapter(spec, cores, None, alpha, dropout, backend)

    # -------------------------------------------------------------------------------- constructors
    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        *,
        in_modes: int | Sequence[int] | None = None,
        out_modes: int | Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        alpha: float | None = None,
        dropout: float = 0.0,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        adapter_dtype: torch.dtype | None = None,
    ) -> TTLinear:
        """Wrap ``linear`` (its weight and bias are shared, not copied, and frozen) with a new adapter.

        ``device`` / ``dtype`` default to the base weight's and only steer the new cores.
        """
        _check_linear(linear)
        spec = TTSpec.linear(
            linear.in_features, linear.out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks
        )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach_base(linear)
        device = linear.weight.device if device is None else device
        dtype = linear.weight.dtype if dtype is None else dtype
        cores = new_cores(spec, device, _adapter_dtype(dtype, adapter_dtype))
        self._attach_adapter(spec, cores, None, alpha, dropout, backend)
        return self

    @classmethod
    def from_cores(
        cls,
        linear: nn.Linear,
        cores: nn.ParameterList,
        spec: TTSpec,
        *,
        index: Mapping[str, int] | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> TTLinear:
        """A view onto cores this module does not own (shared with other modules), at fixed ``index``.

        ``cores`` is registered as-is (not copied): every view that holds it accumulates its gradients into
        the same Parameters. ``index`` gives a value for every fixed index mode of ``spec`` (e.g.
        ``{"layer": 3, "matrix": 1}``); a per-sample mode takes ``task_ids`` at call time.
        """
        _check_linear(linear)
        if not isinstance(spec, TTSpec):
            raise TypeError(f"spec must be a TTSpec, got {type(spec).__name__}")
        if not isinstance(cores, nn.ParameterList):
            raise TypeError(f"cores must be an nn.ParameterList, got {type(cores).__name__}")
        if (spec.in_features, spec.out_features) != (linear.in_features, linear.out_features):
            raise ValueError(
                f"spec maps {spec.in_features} -> {spec.out_features} features but linear is "
                f"{linear.in_features} -> {linear.out_features}"
            )
        reference._check_cores(list(cores), spec)
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach_base(linear)
        self._attach_adapter(spec, cores, index, alpha, dropout, backend)
        self._owns_cores = False
        return self

    def _attach_base(self, linear: nn.Linear) -> None:
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        linear.weight.requires_grad_(False)
        self.weight = linear.weight
        if linear.bias is not None:
            linear.bias.requires_grad_(False)
        self.bias = linear.bias

    def _attach_adapter(
        self,
        spec: TTSpec,
        cores: nn.ParameterList,
        index: Mapping[str, int] | None,
        alpha: float | None,
        dropout: float,
        backend: str,
    ) -> None:
        dropout = ops.check_dropout(dropout)
        ops.check_backend_name(backend)
        if alpha is not None and (not isinstance(alpha, (int, float)) or not math.isfinite(alpha)):
            raise ValueError(f"alpha must be a finite number or None, got {alpha!r}")
        self.spec = spec
        self.cores = cores
        self.index = spec.check_index(index)
        self.alpha = float(spec.max_rank if alpha is None else alpha)
        self.scaling = adapter_scaling(alpha, spec)
        self.dropout = dropout
        self.backend = backend
        self.merged = False
        self._disabled = False
        self._owns_cores = True

    @property
    def base_weight(self) -> Tensor:
        """The frozen weight as ``(out_features, in_features)`` (a transposed view for a Conv1D-style base,
        whose ``weight`` is stored ``(in_features, out_features)``)."""
        return self.weight.t() if getattr(self, "_weight_transposed", False) else self.weight

    # -------------------------------------------------------------------------------- parameters
    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Re-draw the cores (see the module docstring); delta-W becomes zero. Views refuse: the owner
        of shared cores initializes them."""
        if not self._owns_cores:
            raise RuntimeError("this TTLinear is a view onto shared cores; initialize them where they are owned")
        init_cores_(self.cores, self.spec)

    @property
    def num_adapter_params(self) -> int:
        return self.spec.num_params

    # -------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        per_sample = self.spec.per_sample_mode is not None
        if per_sample and task_ids is None and not (self._disabled and not self.merged):
            raise ValueError("this TTLinear has a per-sample (task) mode: pass task_ids")
        if not per_sample and task_ids is not None:
            raise ValueError("task_ids was given but this TTLinear has no per-sample (task) mode")
        if self._disabled and not self.merged:
            return F.linear(x, self.base_weight, self.bias)
        if self.merged and not self._disabled:
            return F.linear(x, self.base_weight, self.bias)
        # Adapter on and unmerged, or merged but disabled: then subtract the merged adapter exactly.
        sign = -1.0 if self.merged else 1.0
        return ops.tt_linear(
            x,
            self.base_weight,
            self.bias,
            list(self.cores),
            self.spec,
            index=self.index,
            task_ids=task_ids,
            scaling=sign * self.scaling,
            dropout=self.dropout if (self.training and not self.merged) else 0.0,
            backend=self.backend,
        )

    # -------------------------------------------------------------------------------- delta-W
    def delta_weight(self, task: int | None = None, *, scaled: bool = True) -> Tensor:
        """The dense delta-W, ``(out_features, in_features)``, in the cores' dtype.

        Scaled by default (what :meth:`merge` adds to the weight): ``self(x) == x W^T + b + x
        delta_weight()^T == x W^T + b + scaling * x delta_weight(scaled=False)^T``. With a per-sample mode,
        ``task`` picks the slice. For merging and inspection only: the forward never builds it.
        """
        dW = reference.dense_delta(list(self.cores), self.spec, self.index, task=task).t()
        return dW * self.scaling if scaled else dW

    @torch.no_grad()
    def merge(self) -> None:
        """Add delta-W into the base weight (no-op when already merged). Not for per-sample adapters."""
        if self.merged:
            return
        self._add_delta(+1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract delta-W from the base weight again (no-op when not merged)."""
        if not self.merged:
            return
        self._add_delta(-1.0)
        self.merged = False

    def _add_delta(self, sign: float) -> None:
        if self.spec.per_sample_mode is not None:
            raise RuntimeError("an adapter with a per-sample (task) mode cannot be merged into one weight")
        w = self.base_weight  # a view: writing it writes the weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = self.delta_weight().to(device=w.device, dtype=acc)
        w.copy_((w.to(acc) + sign * delta).to(w.dtype))

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[TTLinear]:
        """Within the block the layer computes the base ``x W^T + b`` only (merged or not)."""
        previous = self._disabled
        self._disabled = True
        try:
            yield self
        finally:
            self._disabled = previous

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, modes={self.spec.describe()}, ranks={self.spec.ranks}, "
            f"params={self.spec.num_params}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"backend={self.backend!r}"
        )
        if self.index:
            text += f", index={self.index}"
        if self.merged:
            text += ", merged=True"
        return text


def _check_linear(linear: object) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")


def new_cores(
    spec: TTSpec, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> nn.ParameterList:
    """Fresh cores of ``spec`` as Parameters, initialized by :func:`init_cores_` (shared cores too)."""
    cores = nn.ParameterList(
        [nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) for shape in spec.core_shapes]
    )
    init_cores_(cores, spec)
    return cores
