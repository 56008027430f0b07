"""``TTLinear``: a drop-in ``nn.Linear`` with a frozen base and a trainable TT adapter.

``TTLinear(x) = x W^T + b + scaling * x dW^T`` where ``dW^T`` is the TT adapter of :mod:`ttkernels.spec`
(C-order flattening of the in and out multi-indices) and ``scaling`` as below. The module
knows nothing about kernels: it builds the factors from its cores and calls :func:`ttkernels.ops.tt_adapter`.

**Initialization and scaling** (:mod:`ttkernels.init`, where the rule is derived). delta-W is zero at the
start, as LoRA's zero ``B``: the last core is zero, and the in part ``A`` has LoRA's variance ``1 / (3 d_in)``.
``scaling = alpha / max(ranks) * sqrt(F)`` with ``F = d_out / s_K`` (1 for the LoRA-shaped chain), so that an
Adam step moves the output as LoRA's does at the same ``alpha``, rank and learning rate; ``alpha=None``
means ``scaling = 1``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn
from torch.autograd import forward_ad

from . import checks, lean, ops, quantized, reference, versions
from .init import init_cores_, scaling_gain
from .layer import AdapterLayer, MergeGuard, add_delta_, base_compute_dtype, base_features, check_alpha, is_conv1d
from .spec import TTSpec

__all__ = ["TTLinear", "init_cores_", "new_cores", "shared_factors"]

_LEAN_BACKENDS = ("auto", "torch")


def _capturing(x: Tensor) -> bool:
    """True while a CUDA graph is being captured on x's device: the lean path's kept factors were computed
    before the capture, so a replay after an optimizer step would read stale ones; such calls build the factors
    inside the graph (the fused op's path), as torch.compile's do."""
    return x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


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
        alpha: the scale numerator, a finite number >= 0; ``scaling = alpha / max(ranks) * sqrt(F)``
            (:mod:`ttkernels.init`). None: ``alpha = max(ranks)`` and ``scaling = 1``.
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

        ``device`` / ``dtype`` default to the base weight's and only steer the new cores. ``linear`` may be a
        bitsandbytes ``Linear4bit`` / ``Linear8bitLt`` or an ``nn.Linear`` with a torchao-quantized weight (see
        :mod:`ttkernels.quantized`): then ``dtype`` defaults to its compute dtype.
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
        dtype = base_compute_dtype(linear) if dtype is None else dtype
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
        self._set_alpha(alpha, spec.max_rank, gain=scaling_gain(spec))
        self.spec = spec
        self.cores = cores
        self.index = index
        self.dropout = dropout
        self.backend = backend
        self.merged_task: Optional[int] = None  # the task whose delta-W is merged (per-sample adapters)
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
        if per_sample and task_ids is None and not (self._disabled or self.merged):
            raise ValueError("this TTLinear has a per-sample (task) mode: pass task_ids")
        if not per_sample and task_ids is not None:
            raise ValueError("task_ids was given but this TTLinear has no per-sample (task) mode")
        if self.merged and task_ids is not None and not self._disabled:
            raise ValueError(
                f"task {self.merged_task} is merged into the weight: unmerge() before routing task_ids per sample"
            )
        return super().forward(x, task_ids=task_ids)

    def adapter_forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        if (
            not self.quantized_base
            and self.backend in _LEAN_BACKENDS
            and not torch.compiler.is_compiling()
            and not _capturing(x)
        ):
            return self._lean_forward(x, task_ids)
        adapter = dict(
            index=self.index,
            task_ids=task_ids,
            scaling=self.scaling,
            dropout=self.dropout if self.training else 0.0,
            backend=self.backend,
        )
        if self.quantized_base:  # the base's own forward plus the adapter term (the weight is packed)
            return quantized.adapter_forward(self.base_layer, x, list(self.cores), self.spec, **adapter)
        return ops.tt_linear(x, self.base_weight, self.bias, list(self.cores), self.spec, **adapter)

    # -------------------------------------------------------------------------------- the lean path
    # The torch backend in eager mode. At one token a call costs Python, dispatcher and autograd-graph overhead
    # (the arithmetic is noise), so this path checks the cores once per (spec, cores) and keeps what it builds from
    # them while they are unchanged (keyed on each core's in-place version and storage: an optimizer step or a
    # .to() rebuilds it once; writes through core.data are not seen, as README says).
    # * A chain of in cores then out cores (no index modes): a lean plan (lean.make_plan) holds the factors built
    #   without a graph; a call is one forward with them and, in grad mode, one autograd node whose backward gives
    #   each core's gradient directly (the C++ node of ttkernels._lean, else the autograd.Function
    #   lean.LeanAdapter), so the factors' products are not recorded per call.
    # * Without the C++ node, the LoRA-shaped chain: its factors are views of the cores (a view's graph holds no
    #   saved tensor, so it serves any number of backward passes), kept in grad mode too; plain torch ops under
    #   torch autograd (as nn.Linear and PEFT's LoRA do: that costs less than a Python autograd.Function).
    # * Index modes (MetaTT views): the factors are built per call in grad mode (shared between the views of one
    #   call, see shared_factors), kept in no-grad calls.
    # Dropout, task ids, autocast and mixed dtypes go through the fused op (ops.tt_adapter) with these factors.
    # Under torch.compile, while a CUDA graph is captured, and for the other backends, forward goes through
    # ops.tt_linear as before.
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
            # no middle cores: the one-node path (a lean plan); without the C++ node the LoRA-shaped chain's
            # factors, views of its cores, are cheaper under plain torch autograd than a Python autograd.Function
            cache.chain = spec.first_out == spec.last_in + 1 and (lean.NATIVE is not None or not cache.views)
            cache.factors = None
            cache.plan = None
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
        key = (grad, versions.STEPS, *((id(c), c._version, c.data_ptr(), c.device) for c in cores))
        cached = cache.factors
        if cached is not None and cached[0] == key:
            return cached[1]
        factors = reference.build_factors(cores, self.spec, self.index)
        cache.factors = (key, factors)  # one assignment: a reader sees an old or a new pair
        return factors

    def _plan(self, cache: _LeanCache, cores: list[Tensor]):
        """The kept plan (lean.make_plan) of this version of the cores (an in-then-out chain), rebuilt when a core
        (its in-place version or storage), ``scaling`` or the optimizer step count (versions.STEPS) changed; None
        when the cores' dtypes differ or one is not contiguous. ``_checked_cores`` drops the plan when a core is
        replaced by a new Parameter."""
        steps = versions.STEPS
        kept = cache.plan
        if kept is not None and kept[0] == steps and kept[1].fresh(self.scaling):
            return kept[1]
        plan = lean.make_plan(cores, self.spec.last_in, self.scaling, None if kept is None else kept[1])
        # a plan of non-leaf cores (torch.func.functional_call with a hypernetwork's output) serves this call only:
        # kept, it would hold their graph until the next call. One assignment: a reader sees an old or a new pair.
        cache.plan = (steps, plan) if plan is not None and all(c.grad_fn is None for c in cores) else None
        return plan

    def _lean_forward(self, x: Tensor, task_ids: Optional[Tensor]) -> Tensor:
        cache = self.__dict__.get("_lean") or self._lean_state()
        cores = self._checked_cores(cache)
        p = self.dropout if self.training else 0.0
        params = self._parameters
        weight, bias = params["weight"], params.get("bias")
        if self.weight_transposed:
            weight = weight.t()
        dt = x.dtype
        if (
            cache.chain
            and p == 0.0
            and task_ids is None
            and not _functorch_or_forward_ad()
            and not _compiled_autograd()
        ):
            plan = self._plan(cache, cores)
            if plan is not None:
                core = cores[0]
                device = core.device
                if (
                    dt == core.dtype == weight.dtype
                    and (bias is None or bias.dtype == dt)
                    and x.device == device == weight.device
                    and not x.is_meta
                    and not torch.is_autocast_enabled(device.type)
                    # a tensor subclass or a TorchFunctionMode sees torch ops: the C++ node would hide them
                    and not torch._C._has_torch_function((x, weight, bias, core))
                ):
                    return plan.forward(x, weight, bias)
        dev = x.device
        plain = (
            p == 0.0
            and task_ids is None
            and dev == weight.device
            and (bias is None or bias.dtype == dt)
            and not x.is_meta
            and not torch.is_autocast_enabled(dev.type)
        )
        A, C, B = self._factors(cache, cores)
        if (
            not plain
            or not dt == weight.dtype == A.dtype == B.dtype
            or (C is not None and C.dtype != dt)
            or A.device != dev
        ):
            # the fused op, with its checks, casts and dropout
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

    # -------------------------------------------------------------------------------- merge
    def _check_task(self, task: object) -> Optional[int]:
        """``task`` for merging: None without a per-sample mode, else an int in ``[0, size)``."""
        mode = self.spec.per_sample_mode
        if mode is None:
            if task is not None:
                raise ValueError(f"task={task!r} was given but this TTLinear has no per-sample (task) mode")
            return None
        if task is None:
            raise ValueError(f"this TTLinear has a per-sample (task) mode: merge(task=t) with t in [0, {mode.size})")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < mode.size:
            raise ValueError(f"task must be an int in [0, {mode.size}), got {task!r}")
        return task

    def _task_to_merge(self, task: object) -> Optional[int]:
        if self.merged:
            if task is not None and task != self.merged_task:
                raise ValueError(f"task {self.merged_task} is merged already, not task {task}: unmerge() first")
            return self.merged_task
        return self._check_task(task)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, *, task: Optional[int] = None) -> None:
        """Add delta-W into the base weight, keeping the weight for an exact :meth:`unmerge` (the guarantees of
        :mod:`ttkernels.layer`; a no-op when already merged). A per-sample (task) adapter merges one task's delta-W
        (``task``); then the layer needs no ``task_ids`` until :meth:`unmerge`, and its state dict records the
        task (``merged.task<t>``)."""
        task = self._task_to_merge(task)
        if self.merged:
            return
        self.merged_task = task
        try:
            super().merge(safe_merge)
        finally:
            if not self.merged:
                self.merged_task = None

    @torch.no_grad()
    def unmerge(self) -> None:
        super().unmerge()
        self.merged_task = None

    @torch.no_grad()
    def merge_and_unload(self, safe_merge: bool = False, *, task: Optional[int] = None) -> nn.Module:
        """Add delta-W (one task's for a per-sample adapter: ``task``, or the merged one) into the base module's
        weight for good and return the base module; no copy of the weight is kept."""
        task = self._task_to_merge(task)
        self.unmerge()
        if self.quantized_base:
            quantized.add_delta(self.base_layer, self.delta_weight(task), safe=safe_merge)
        else:
            add_delta_(self.weight, self._stored(self.delta_weight(task)), safe=safe_merge)
        return self.base_module

    def _merge_delta(self) -> Tensor:
        return self._stored(self.delta_weight(self.merged_task))

    def _merge_state(self) -> tuple[MergeGuard, Tensor, str, Optional[list[str]]]:
        guard, target, key, _ = super()._merge_state()
        if self.spec.per_sample_mode is None:
            return guard, target, key, None
        return guard, target, key, [f"task{self.merged_task}"] if self.merged else []

    def _resume_merge(self, names: Sequence[str], *, from_weight: bool = False) -> None:
        if self.spec.per_sample_mode is None:
            super()._resume_merge(names, from_weight=from_weight)
            return
        size = self.spec.per_sample_mode.size
        tasks = [n.removeprefix("task") for n in names]
        if len(tasks) != 1 or not tasks[0].isdigit() or not 0 <= int(tasks[0]) < size:
            raise ValueError(
                f"the state dict names merged {list(names)}; this TTLinear merges one of task0..task{size - 1}"
            )
        task = int(tasks[0])
        if from_weight:
            self.merge(task=task)
        else:
            self.merged_task = task
            self.__dict__["_merge_guard"].remerge(self._merge_target(), [self._merge_delta()], list(self.cores))
            self.merged = True

    def extra_repr(self) -> str:
        text = (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.base_bias is not None}, modes={self.spec.describe()}, ranks={self.spec.ranks}, "
            f"params={self.spec.num_params}, scaling={self.scaling:g}, dropout={self.dropout:g}, "
            f"backend={self.backend!r}"
        )
        if self.index:
            text += f", index={self.index}"
        if self.merged:
            text += ", merged=True" + ("" if self.merged_task is None else f", merged_task={self.merged_task}")
        return text


class _LeanCache:
    """What the lean path keeps between calls: the checked (spec, cores) and the factors of one core version.
    Not state: a copy or a pickle of the layer starts empty (the factors may carry autograd graph views)."""

    __slots__ = ("chain", "checked", "factors", "plan", "sides", "views")

    def __init__(self) -> None:
        self.checked: Optional[tuple] = None
        self.views = False
        self.sides = False
        self.chain = False
        self.factors: Optional[tuple] = None
        self.plan: Optional[tuple] = None  # (versions.STEPS, a lean plan: C++ or lean.Plan)

    def __deepcopy__(self, memo: dict) -> _LeanCache:
        return _LeanCache()

    def __reduce__(self) -> tuple:
        return (_LeanCache, ())


def _compiled_autograd() -> bool:
    """Compiled autograd is on (``torch._dynamo.config.compiled_autograd`` or an enabling block): it traces
    backward nodes, which the C++ lean node does not describe to it, so the layer records torch ops instead."""
    if lean.NATIVE is None:
        return False
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    return ca is not None and (ca.compiled_autograd_enabled or sys.modules["torch._dynamo"].config.compiled_autograd)


def _functorch_or_forward_ad() -> bool:
    """A torch.func transform or a forward-mode AD level is active: the lean path's autograd.Function defines
    neither, so the layer computes with torch autograd ops there."""
    return torch._C._are_functorch_transforms_active() or forward_ad._current_level >= 0


def _check_adapter_args(alpha: object, dropout: object, backend: object) -> None:
    check_alpha(alpha)
    ops.check_dropout(dropout)
    ops.check_backend_name(backend)


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
