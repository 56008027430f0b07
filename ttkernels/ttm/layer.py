"""``TTMLinear``: a frozen linear layer plus a TT-matrix adapter, on the adapter-layer base."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..init import init_ttm_cores_, scaling_gain
from ..layer import AdapterLayer, base_compute_dtype
from .ops import TTM_BACKENDS, ttm_apply
from .reference import ttm_dense
from .spec import TTMSpec, spec_of

__all__ = ["TTMLinear"]


class TTMLinear(AdapterLayer):
    """A frozen linear layer plus a TT-matrix adapter: ``x W^T + b + scaling * x dW^T``.

    The TT-matrix counterpart of :class:`~ttkernels.TTLinear`, on the same base
    (:class:`~ttkernels.layer.AdapterLayer`: the base is shared and frozen, ``scaling = alpha / max(ranks) *
    sqrt(F)`` with ``F = d_out / (m_K n_K^2)`` for the last core ``(r, m_K, n_K, 1)`` (:mod:`ttkernels.init`;
    ``alpha=None``: 1), ``delta_weight()`` is scaled, ``merge()`` / ``unmerge()`` with an exact unmerge,
    ``adapter_disabled()``, ``replace_cores()``). delta-W starts at zero (the last core is zero; the others are
    drawn from ``N(0, 1 / (r_{k-1} n_k))``, the first times 1/3, as LoRA's ``A``). No dropout. ``backend`` is
    :func:`~ttkernels.ttm.ttm_apply`'s (``"auto"``: the torch sweep on the CPU, the measured choice between the
    fused kernels and reconstruct-then-GEMM on a GPU).

    ``from_linear`` also takes a bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` or a torchao-quantized
    ``nn.Linear`` (:mod:`ttkernels.quantized`):
    the layer computes ``base(x) + scaling * x dW^T`` with the base's own forward, the cores default to float32
    (float64 for a float64 compute dtype), and merging requantizes (with a warning; unmerge is exact; torchao
    weights other than ``Int8Tensor`` refuse to merge).
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
        spec = TTMSpec.linear(in_features, out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks)
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._setup(base, spec, alpha, adapter_dtype, backend)

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
        """Wrap ``linear`` (its weight and bias are shared, not copied, and frozen) with a new adapter."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        spec = TTMSpec.linear(
            linear.in_features, linear.out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks
        )
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(linear, spec, alpha, adapter_dtype, backend)
        return self

    def _setup(self, base: nn.Linear, spec: TTMSpec, alpha, adapter_dtype, backend) -> None:
        if backend not in TTM_BACKENDS:
            raise ValueError(f"backend must be one of {TTM_BACKENDS}, got {backend!r}")
        if adapter_dtype is not None and (
            not isinstance(adapter_dtype, torch.dtype) or not adapter_dtype.is_floating_point
        ):
            raise TypeError(f"adapter_dtype must be a floating-point torch.dtype or None, got {adapter_dtype!r}")
        self._set_alpha(alpha, spec.max_rank, gain=scaling_gain(spec))
        self._attach_base(base)
        wd = base_compute_dtype(base)
        dtype = adapter_dtype or (wd if wd in (torch.float32, torch.float64) else torch.float32)
        self.spec = spec
        self.cores = nn.ParameterList(
            [nn.Parameter(torch.empty(s, device=base.weight.device, dtype=dtype)) for s in spec.core_shapes]
        )
        self.backend = backend
        self.reset_adapter_parameters()

    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Re-draw the cores (:func:`ttkernels.init.init_ttm_cores_`): delta-W becomes zero (the last core is
        zero)."""
        init_ttm_cores_(self.cores)

    def spec_for_cores(self, cores: Sequence[Tensor]) -> TTMSpec:
        """The spec of ``cores`` (same mode sizes as this layer's, any bond ranks), checked as a chain."""
        if isinstance(cores, Tensor) or not isinstance(cores, Sequence):
            raise TypeError(f"cores must be a sequence of 4-D tensors, got {type(cores).__name__}")
        spec = spec_of(cores)
        if (spec.out_modes, spec.in_modes) != (self.spec.out_modes, self.spec.in_modes):
            raise ValueError(
                f"cores have modes {spec.describe()} but this adapter has {self.spec.describe()} (only bond ranks "
                "may change)"
            )
        spec.check_cores(list(cores))
        return spec

    def adapter_forward(self, x: Tensor) -> Tensor:
        y = self.base_forward(x)
        return y + ttm_apply(x, list(self.cores), scaling=self.scaling, backend=self.backend).to(y.dtype)

    def delta_weight(self, *, scaled: bool = True) -> Tensor:
        """The dense delta-W ``(out_features, in_features)``, scaled by default (what :meth:`merge` adds)."""
        dW = ttm_dense(list(self.cores))
        return dW * self.scaling if scaled else dW

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.base_bias is not None}, "
            f"cores={self.spec.describe()}, params={self.spec.num_params}, scaling={self.scaling:g}, "
            f"backend={self.backend}" + (", merged=True" if self.merged else "")
        )
