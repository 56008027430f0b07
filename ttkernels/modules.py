"""``TTLinear``: a drop-in ``nn.Linear`` with a frozen base and a trainable TT adapter.

``TTLinear(x) = x W^T + b + scaling * x dW^T`` where ``dW^T`` is the TT adapter of :mod:`ttkernels.spec`
(C-order flattening of the in and out multi-indices) and ``scaling = alpha / max(ranks)``. The module
knows nothing about kernels: it builds the factors from its cores and calls :func:`ttkernels.ops.tt_adapter`.

**Initialization.** delta-W is zero at the start, as LoRA's zero ``B``: the last core is zero, every other
core is drawn from ``N(0, 1 / r_{k-1})``, and in-mode cores from ``N(0, 1 / (r_{k-1} s_k))`` so that ``A``
has entries of variance ``1 / d_in`` (``S = x A`` keeps the scale of ``x``). The gradient of the last core is
then non-zero from the first step, and the other cores move once it has.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from . import checks, ops, reference
from .layer import AdapterLayer, base_features, check_alpha, is_conv1d
from .spec import TTSpec

__all__ = ["TTLinear", "init_cores_", "new_cores", "shared_factors"]

_LEAN_BACKENDS = ("auto", "torch")


class _Scope(threading.local):
    shared: Optional[dict] = None


_SCOPE = _Scope()


@contextlib.contextmanager
def shared_factors():
    """Within the block (per thread), views onto the same cores (``TTLinear.from_cores``) build the factors that
    do not depend on their index, A and B, once and share them; a ``MetaTTModel`` call does this by itself.
    Use it around one forward: what it keeps dies with the block, so no graph serves two backward passes.
    Eager torch backend only (under ``torch.compile`` the graph is traced as before)."""
    previous = _SCOPE.shared
    _SCOPE.shared = {}
    try:
        yield
    finally:
        _SCOPE.shared = previous


def _adapter_dtype(dtype: Optional[torch.dtype], adapter_dtype: Optional[torch.dtype]) -> torch.dtype:
    checks.check_float_dtype(dtype, "dtype")
    checks.check_float_dtype(adapter_dtype, "adapter_dtype")
    if adapter_dtype is not None:
        return adapter_dtype
    dtype = dtype or torch.get_default_dtype()
    # Low-precision bases keep a float32 adapter, as mixed-precision training wants.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


class TTLinear(AdapterLayer):
    """A frozen linear layer plus a tensor-train adapter.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        in_modes, out_modes: the factorization of ``in_features`` / ``out_features``: a sequence of sizes,
            an int asking for that many near-balanced factors, or None for a single mode (the
            LoRA-shaped two-core chain).
        ranks: one bond rank for every bond, or one per bond (``len(in_modes) + len(out_modes) - 1``).
        alpha: the scale numerator, a finite number >= 0; ``scaling = alpha / max(ranks)``. None:
            ``alpha = max(ranks)``.
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
        cores_dtype = _adapter_dtype(dtype, adapter_dtype)
        checks.check_device(device)
        if not isinstance(bias, (bool, int)):
            raise TypeError(f"bias must be a bool, got {type(bias).__name__}")
        checks.check_adapter_size(spec.num_params, in_features * out_features, "the TT adapter")
        base = nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._attach_base(base)
        cores = new_cores(spec, device, cores_dtype)
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
        _check_adapter_args(alpha, dropout, backend)  # before the base is touched
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach_base(linear)
        device = linear.weight.device if device is None else device
        dtype = linear.weight.dtype if dtype is None else dtype
        cores_dtype = _adapter_dtype(dtype, adapter_dtype)
        checks.check_device(device)
        checks.check_adapter_size(spec.num_params, linear.in_features * linear.out_features, "the TT adapter")
        cores = new_cores(spec, device, cores_dtype)
        self._attach_adapter(spec, cores, None, alpha, dropout, backend)
        return self

    @classmethod
    def from_cores(
        cls,
        linear: nn.Module,
        cores: nn.ParameterList,
        spec: TTSpec,
        *,
        index: Mapping[str, int] | None = None,
        alpha: float | None = None,
        dropout: float = 0.0,
        backend: str = "auto",
    ) -> TTLinear:
        """A view onto cores this module does not own (shared with other modules), at fixed ``index``.

        ``linear`` is an ``nn.Linear`` or a transformers ``Conv1D`` (weight stored ``(in, out)``: the view's
        ``weight_transposed`` is True).

        ``cores`` is registered as-is (not copied): every view that holds it accumulates its gradients into
        the same Parameters. ``index`` gives a value for every fixed index mode of ``spec`` (e.g.
        ``{"layer": 3, "matrix": 1}``); a per-sample mode takes ``task_ids`` at call time.
        """
        if not isinstance(linear, nn.Linear) and not is_conv1d(linear):
            raise TypeError(f"linear must be an nn.Linear or a Conv1D, got {type(linear).__name__}")
        if not isinstance(spec, TTSpec):
            raise TypeError(f"spec must be a TTSpec, got {type(spec).__name__}")
        if not isinstance(cores, nn.ParameterList):
            raise TypeError(f"cores must be an nn.ParameterList, got {type(cores).__name__}")
        d_in, d_out, _ = base_features(linear)
        if (spec.in_features, spec.out_features) != (d_in, d_out):
            raise ValueError(
                f"spec maps {spec.in_features} -> {spec.out_features} features but linear is {d_in} -> {d_out}"
            )
        reference.check_cores(list(cores), spec)
        spec.check_index(index)
        _check_adapter_args(alpha, dropout, backend)  # before the base is touched
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._attach_base(linear)
        self._attach_adapter(spec, cores, index, alpha, dropout, backend)
        self._owns_cores = False
        return self

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
        index = spec.check_index(index)
        self._set_alpha(alpha, spec.max_rank)
        self.spec = spec
        self.cores = cores
        self.index = index
        self.dropout = dropout
        self.backend = backend
        self._owns_cores = True

    @property
    def owns_cores(self) -> bool:
        """False for a view onto shared cores (:meth:`from_cores`): their owner initializes and compresses them."""
        return self._owns_cores

    # -------------------------------------------------------------------------------- parameters
    @torch.no_grad()
    def reset_adapter_parameters(self) -> None:
        """Re-draw the cores (see the module docstring); delta-W becomes zero. Views refuse: the owner
        of shared cores initializes them."""
        if not self._owns_cores:
            raise RuntimeError("this TTLinear is a view onto shared cores; initialize them where they are owned")
        init_cores_(self.cores, self.spec)

    def spec_for_cores(self, cores: Sequence[Tensor]) -> TTSpec:
        """The spec of ``cores`` (same modes as this layer's, any bond ranks), checked as a chain."""
        cores = list(cores)
        reference.check_chain(cores)
        if len(cores) != self.spec.num_cores:
            raise ValueError(f"cores has {len(cores)} tensors but this adapter has {self.spec.num_cores} cores")
        for k, (core, mode) in enumerate(zip(cores, self.spec.modes)):
            if core.shape[1] != mode.size:
                raise ValueError(
                    f"cores[{k}] must be (r_prev, {mode.size}, r_next) for mode {mode.name!r}, got {tuple(core.shape)}"
                )
        return TTSpec(self.spec.modes, tuple(c.shape[2] for c in cores[:-1]))

    # -------------------------------------------------------------------------------- forward
    def forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        per_sample = self.spec.per_sample_mode is not None
        if per_sample and task_ids is None and not self._disabled:
            raise ValueError("this TTLinear has a per-sample (task) mode: pass task_ids")
        if not per_sample and task_ids is not None:
            raise ValueError("task_ids was given but this TTLinear has no per-sample (task) mode")
        return super().forward(x, task_ids=task_ids)

    def adapter_forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        if self.backend in _LEAN_BACKENDS and not torch.compiler.is_compiling():
            return self._lean_forward(x, task_ids)
        return ops.tt_linear(
            x,
            self.base_weight,
            self.bias,
            list(self.cores),
            self.spec,
            index=self.index,
            task_ids=task_ids,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
            backend=self.backend,
        )

    # -------------------------------------------------------------------------------- the lean path
    # The torch backend in eager mode. At one token a call costs Python, dispatcher and autograd-graph overhead
    # (the arithmetic is noise), so this path checks the cores once per (spec, cores), keeps the factors while the
    # cores are unchanged (keyed on each core's identity, in-place version and storage: an optimizer step or a
    # .to() rebuilds them once; writes through core.data are not seen, as README says) in no-grad calls, and in
    # grad mode too where they are views of the cores (a LoRA-shaped chain: a view's graph holds no saved
    # tensor, so it serves any number of backward passes).
    # Without dropout or task ids it computes with plain torch ops and torch autograd (as nn.Linear and PEFT's
    # LoRA do: one Python autograd.Function backward costs more than the whole graph here). Dropout, task ids,
    # autocast and mixed dtypes go through the fused op (ops.tt_adapter) with these factors. Under
    # torch.compile, and for the other backends, forward goes through ops.tt_linear as before.
    def _lean_state(self) -> _LeanCache:
        cache = self.__dict__.get("_lean")
        if cache is None:
            cache = self.__dict__["_lean"] = _LeanCache()
        return cache

    def _checked_cores(self, cache: _LeanCache) -> list[Tensor]:
        # the ParameterList's dict, not its iterator or nn.Module.__getattr__ (each costs a Python call per use)
        cores = list(self._modules["cores"]._parameters.values())
        key = (self.spec, *map(id, cores))
        if cache.checked != key:
            cores = list(self.cores)
            reference.check_cores(cores, self.spec)
            self.spec.check_index(self.index)
            spec = self.spec
            cache.views = spec.num_cores == 2 and spec.last_in == 0 and spec.first_out == 1
            roles = [m.role for m in spec.modes]
            # in modes, then index modes, then out modes: A and B depend on the cores alone (not on index), so
            # every view onto these cores (MetaTT's groups) can share them
            cache.sides = all(r == "in" for r in roles[: spec.last_in + 1]) and all(
                r == "out" for r in roles[spec.first_out :]
            )
            cache.factors = None
            cache.checked = (self.spec, *map(id, cores))
        return cores

    def _factors(self, cache: _LeanCache, cores: list[Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor]:
        grad = torch.is_grad_enabled()
        if grad and not cache.views:
            # Within one call of a model that shares cores between its views (MetaTTModel), or a
            # shared_factors() block, A and B are built once for all views: the call hands its views a dict (per
            # thread, per call) that lives until it returns, so no graph outlives the forward that built it. Not under saved-tensor hooks (activation
            # checkpointing), where a recomputation must save what the first forward saved.
            routing = self.__dict__.get("_routing")
            shared = _SCOPE.shared if routing is None or routing.shared is None else routing.shared
            if (
                shared is not None
                and cache.sides
                and torch._C._autograd._top_saved_tensors_default_hooks(False) is None
            ):
                key = (id(self._modules["cores"]), self.spec.last_in, self.spec.first_out)
                sides = shared.get(key)
                if sides is None:
                    sides = shared[key] = reference.build_sides(cores, self.spec.last_in, self.spec.first_out)
                return sides[0], reference.factor_c(cores, self.spec, self.index), sides[1]
            return reference.build_factors(cores, self.spec, self.index)
        key = (grad, *((id(c), c._version, c.data_ptr(), c.device) for c in cores))
        cached = cache.factors
        if cached is not None and cached[0] == key:
            return cached[1]
        factors = reference.build_factors(cores, self.spec, self.index)
        cache.factors = (key, factors)  # one assignment: a reader sees an old or a new pair
        return factors

    def _lean_forward(self, x: Tensor, task_ids: Optional[Tensor]) -> Tensor:
        cache = self._lean_state()
        cores = self._checked_cores(cache)
        A, C, B = self._factors(cache, cores)
        p = self.dropout if self.training else 0.0
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        if self.weight_transposed:
            weight = weight.t()
        dev, dt = x.device, x.dtype
        plain = (
            p == 0.0
            and task_ids is None
            and dt == weight.dtype == A.dtype == B.dtype
            and dev == weight.device == A.device
            and (bias is None or bias.dtype == dt)
            and (C is None or C.dtype == dt)
            and not x.is_meta
            and not torch.is_autocast_enabled(dev.type)
        )
        if not plain:  # the fused op, with its checks, casts and dropout
            if dev.type == "meta":  # as tt_linear refuses it, before any other check
                raise ValueError(
                    "x is on the meta device: the adapter needs real values (materialize the model and inputs)"
                )
            return ops.tt_adapter(
                x, weight, bias, A, C, B, task_ids=task_ids, scaling=self.scaling, dropout=p, backend=self.backend
            )
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        S = x2 @ A
        if C is not None:
            S = S @ C
        y = torch.nn.functional.linear(x2, weight, bias).addmm_(S, B, alpha=self.scaling)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    # -------------------------------------------------------------------------------- delta-W
    def delta_weight(self, task: int | None = None, *, scaled: bool = True) -> Tensor:
        """The dense delta-W, ``(out_features, in_features)``, in the cores' dtype.

        Scaled by default (what :meth:`merge` adds to the weight): ``self(x) == x W^T + b + x
        delta_weight()^T == x W^T + b + scaling * x delta_weight(scaled=False)^T``. With a per-sample mode,
        ``task`` picks the slice. For merging and inspection only: the forward never builds it.
        """
        dW = reference.dense_delta(list(self.cores), self.spec, self.index, task=task).t()
        return dW * self.scaling if scaled else dW

    def _check_mergeable(self) -> None:
        if self.spec.per_sample_mode is not None:
            raise RuntimeError("an adapter with a per-sample (task) mode cannot be merged into one weight")

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


class _LeanCache:
    """What the lean path keeps between calls: the checked (spec, cores) and the factors of one core version.
    Not state: a copy or a pickle of the layer starts empty (the factors may carry autograd graph views)."""

    __slots__ = ("checked", "factors", "sides", "views")

    def __init__(self) -> None:
        self.checked: Optional[tuple] = None
        self.views = False
        self.sides = False
        self.factors: Optional[tuple] = None

    def __deepcopy__(self, memo: dict) -> _LeanCache:
        return _LeanCache()

    def __reduce__(self) -> tuple:
        return (_LeanCache, ())


def _check_adapter_args(alpha: object, dropout: object, backend: object) -> None:
    check_alpha(alpha)
    ops.check_dropout(dropout)
    ops.check_backend_name(backend)


def _check_linear(linear: object) -> None:
    if not isinstance(linear, nn.Linear):
        raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")


@torch.no_grad()
def init_cores_(cores: Sequence[Tensor], spec: TTSpec) -> None:
    """Draw ``cores`` in place by the rule of the module docstring: the last core zero (delta-W starts at
    zero), in-mode cores ``N(0, 1/(r_{k-1} s_k))``, the others ``N(0, 1/r_{k-1})``."""
    last = len(cores) - 1
    for k, core in enumerate(cores):
        if k == last:
            core.zero_()
            continue
        r0, s, _ = core.shape
        var = 1.0 / (r0 * s) if spec.modes[k].role == "in" else 1.0 / r0
        core.normal_(0.0, math.sqrt(var))


def new_cores(
    spec: TTSpec, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> nn.ParameterList:
    """Fresh cores of ``spec`` as Parameters, initialized by :func:`init_cores_` (shared cores too)."""
    cores = nn.ParameterList(
        [nn.Parameter(torch.empty(shape, device=device, dtype=dtype)) for shape in spec.core_shapes]
    )
    init_cores_(cores, spec)
    return cores
