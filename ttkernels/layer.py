"""The adapter-layer base: what every adapted linear layer of ttkernels does the same way.

:class:`AdapterLayer` is the base of :class:`~ttkernels.TTLinear` (and MetaTT's views) and
:class:`~ttkernels.ttm.TTMLinear`; the PEFT layer (:class:`ttkernels.peft.TTLoraLinear`, whose class base is
PEFT's ``LoraLayer``) uses the same pieces: :func:`check_alpha`, :func:`adapter_scaling` and
:class:`MergeGuard`. A subclass gives its cores' spec rule (:meth:`AdapterLayer.spec_for_cores`), the dense
delta-W (:meth:`AdapterLayer.delta_weight`) and the adapted forward (:meth:`AdapterLayer.adapter_forward`);
the base owns

* the frozen base, of one of these kinds (:func:`base_kind`, the layer's ``base_kind``):

  - ``"linear"`` / ``"conv1d"``: ``weight`` / ``bias`` shared with the wrapped module and frozen;
    ``weight_transposed`` says that the weight is stored ``(in_features, out_features)`` (transformers'
    ``Conv1D``, GPT-2), and :attr:`AdapterLayer.base_weight` always reads ``(out_features, in_features)``;
  - ``"bnb-4bit"`` / ``"bnb-8bit"``: a bitsandbytes quantized linear (:mod:`ttkernels.quantized`), registered
    as the submodule ``base_layer`` (its state-dict entries, quantization statistics included, stay its own),
    frozen; ``weight`` / ``bias`` are None and ``base_weight`` raises (the weight exists only packed). The base
    computes with its own forward and the adapter adds its term;
  - ``"torchao"``: an ``nn.Linear`` whose weight torchao quantized (a tensor subclass), held the same way as a
    bitsandbytes layer (``base_layer``, its own forward; merging requantizes ``Int8Tensor`` weights and refuses
    the others);
* ``alpha`` and ``scaling``: one validation (:func:`check_alpha`) and one formula (:func:`adapter_scaling`);
* merge / unmerge and disabling, with the guarantees below, and the forward around them.

**Merge guarantees.** :meth:`AdapterLayer.merge` keeps a copy of the base weight as it was (one weight's memory,
in its dtype and on its device, while merged) and writes ``W + delta-W`` computed in float32 (float64 for a
float64 weight) and rounded once to the weight's dtype. :meth:`AdapterLayer.unmerge` copies the kept weight back,
so the base weight is bit for bit what it was, whatever happened in between (cores changed by an optimizer step,
``reset_adapter_parameters``, ``replace_cores``, ``load_state_dict``; non-finite cores; bfloat16 or float16
weights). While merged:

* the cores are watched (identity and in-place version of each): when they change, the next forward writes
  ``W + delta-W`` of the new cores (from the kept weight, so nothing drifts) before it computes. Writes through
  ``core.data`` bypass torch's version counter and are not seen: call ``unmerge()`` and ``merge()`` after them;
* ``adapter_disabled()`` computes with the kept weight: exactly the base layer;
* training is refused: a backward through the merged layer's output raises when its cores require gradients
  (they would get none); unmerge first. Forwards (inference) are fine;
* ``state_dict()`` holds the merged weight under its usual key and the kept weight under
  ``weight_before_merge``; loading that state dict gives a merged layer with the same kept weight, and loading
  an unmerged state dict into a merged layer unmerges it first (so delta-W is never applied twice);
* ``merge(safe_merge=True)`` refuses a delta-W or a merged weight that is not finite and leaves the weight as it
  was.

Under ``torch.compile`` the forward does not look at the cores' versions (call ``unmerge()`` and ``merge()``
after changing cores there). An adapter with a per-sample (task) mode merges one task's delta-W at a time
(``TTLinear.merge(task=)``): the delta-W a layer merges is its :meth:`AdapterLayer._merge_delta`, and the merged
state it records in a state dict (``merged.<name>``) comes from ``_merge_state()``.

**Over a quantized base** (:class:`QuantizedMergeGuard`) merging dequantizes the weight, adds delta-W in float32
and quantizes the sum again (a ``UserWarning`` says that the merged outputs differ from the adapter's by that
rounding). The guard keeps the packed weight Parameter from before the merge (and an 8-bit layer's cached int8
weight and scales): not a copy, since the merge installs a new Parameter, so keeping it costs the packed
weight's memory. ``unmerge()`` puts it back, bit for bit; ``adapter_disabled()`` computes with it; changed cores
are merged again from it; safe_merge and the refused backward hold as above. What cannot be done exactly is
refused: ``state_dict()`` of a merged layer over a quantized base raises (unmerge first, or
``merge_and_unload()`` for a merged quantized model), and so does loading a merged state dict
(``weight_before_merge``) into one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import quantized, versions
from .checks import check_alpha

__all__ = [
    "BEFORE_MERGE_KEY",
    "INPUT_DTYPES",
    "AdapterLayer",
    "MergeGuard",
    "QuantizedMergeGuard",
    "adapter_scaling",
    "add_delta_",
    "base_compute_dtype",
    "base_kind",
    "check_alpha",
    "guard_merged_output",
    "is_conv1d",
    "merge_guard_for",
    "param_group_holding",
    "register_merge_hooks",
    "swap_parameters",
]

# What the adapted layers take as x (float8 and the rest are refused with the argument named).
INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

# state_dict key (under the layer's prefix) of the base weight kept while merged
BEFORE_MERGE_KEY = "weight_before_merge"


def adapter_scaling(alpha: Optional[float], rank: int, *, rslora: bool = False, gain: float = 1.0) -> float:
    """``scaling = alpha / rank * gain`` (``alpha / sqrt(rank) * gain`` with rsLoRA): the one formula of every
    layer. ``alpha=None``: ``scaling = 1`` (the cores carry delta-W unscaled).

    ``gain`` is the scaling rule's factor (:func:`ttkernels.init.scaling_gain`: ``sqrt(F)`` under rule 2, 1 under
    rule 1 and for LoRA-shaped adapters), which depends on mode sizes and sites only. ``rank`` is the adapter's
    largest bond rank when the layer was made; it does not follow later rank changes (``replace_cores``,
    ``rank.compress_``), so that cores with the same delta-W give the same outputs.
    """
    if alpha is None:
        return 1.0
    return float(alpha) / (math.sqrt(rank) if rslora else rank) * gain


def is_conv1d(module: object) -> bool:
    """transformers' ``Conv1D`` (GPT-2): weight ``(in, out)``, ``y = x W + b``. Recognized by name, so that
    transformers stays optional."""
    return (
        isinstance(module, nn.Module)
        and type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), Tensor)
    )


def base_kind(module: nn.Module) -> str:
    """The kind of frozen base ``module`` is: ``"bnb-4bit"`` / ``"bnb-8bit"`` (a bitsandbytes quantized linear),
    ``"torchao"`` (an ``nn.Linear`` with a torchao-quantized weight), ``"linear"`` or ``"conv1d"``; TypeError for
    anything else."""
    kind = quantized.quantization_of(module)
    if kind is not None:
        return kind
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    raise TypeError(f"the base layer must be an nn.Linear or a Conv1D, got {type(module).__name__}")


def base_compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype the base computes in: its weight's, or a quantized layer's compute dtype (not the packed
    weight's)."""
    if quantized.is_quantized_linear(module):
        return quantized.compute_dtype(module)
    return module.weight.dtype


def base_features(module: nn.Module) -> tuple[int, int, bool]:
    """``(in_features, out_features, weight_transposed)`` of an ``nn.Linear`` (quantized ones included) or a
    ``Conv1D``."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features, False
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out), True
    raise TypeError(f"the base layer must be an nn.Linear or a Conv1D, got {type(module).__name__}")


@torch.no_grad()
def add_delta_(weight: Tensor, delta: Tensor, *, safe: bool = False, what: str = "the adapter") -> None:
    """``weight += delta`` computed in float32 (float64 for a float64 weight), rounded once to the weight's
    dtype. ``safe``: a non-finite delta or result is refused and the weight is left as it was."""
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    delta = delta.to(device=weight.device, dtype=acc)
    if safe and not torch.isfinite(delta).all():
        raise ValueError(f"merging {what} refused: its delta-W holds non-finite values (safe_merge=True)")
    new = weight.to(acc) + delta
    if safe and not torch.isfinite(new).all():
        raise ValueError(f"merging {what} refused: the merged weight would hold non-finite values (safe_merge=True)")
    weight.copy_(new.to(weight.dtype))


def _sum(deltas: Sequence[Tensor]) -> Tensor:
    acc = torch.float64 if any(d.dtype == torch.float64 for d in deltas) else torch.float32
    total = deltas[0].to(acc)
    for d in deltas[1:]:
        total = total + d.to(device=total.device, dtype=acc)
    return total


class MergeGuard:
    """What an exact unmerge needs: the base weight as it was before the first merge, and the cores it merged.

    One guard per layer. ``weight`` is the base weight Parameter itself (in its stored orientation); every
    delta given to it must be in that orientation.
    """

    def __init__(self) -> None:
        self.original: Optional[Tensor] = None
        self.fingerprint: tuple = ()

    @property
    def merged(self) -> bool:
        return self.original is not None

    @staticmethod
    def fingerprint_of(params: Sequence[Tensor]) -> tuple:
        return versions.fingerprint(params)

    @torch.no_grad()
    def merge(
        self,
        weight: Tensor,
        deltas: Sequence[Tensor],
        params: Sequence[Tensor],
        *,
        safe: bool = False,
        what: str = "the adapter",
    ) -> None:
        """Add ``deltas`` to ``weight``, keeping the weight as it was (first merge only). ``params``: every core
        merged so far (watched for changes). When a check fails, nothing has changed."""
        original = weight.detach().clone() if self.original is None else None
        add_delta_(weight, _sum(deltas), safe=safe, what=what)  # writes only after its checks
        if original is not None:
            self.original = original
        self.fingerprint = self.fingerprint_of(params)

    @torch.no_grad()
    def restore(self, weight: Tensor) -> None:
        """The base weight back, bit for bit; the guard forgets the merge."""
        if self.original is not None:
            weight.copy_(self.original)
        self.original, self.fingerprint = None, ()

    def stale(self, params: Sequence[Tensor]) -> bool:
        return self.merged and self.fingerprint != self.fingerprint_of(params)

    def refresh(self, weight: Tensor, params: Sequence[Tensor], deltas: Callable[[], Sequence[Tensor]]) -> None:
        """Before a merged forward: merge again from the kept weight when the cores changed (not while
        torch.compile traces)."""
        if not torch.compiler.is_compiling() and self.stale(params):
            self.remerge(weight, deltas(), params)

    @torch.no_grad()
    def remerge(self, weight: Tensor, deltas: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        """``weight = kept weight + deltas`` (after the cores changed while merged)."""
        assert self.original is not None
        weight.copy_(self.original)
        add_delta_(weight, _sum(deltas))
        self.fingerprint = self.fingerprint_of(params)

    def adopt(self, weight: Tensor, original: Tensor, where: str) -> None:
        """Take ``original`` (from a state dict) as the kept weight, after checking it fits ``weight``."""
        if not isinstance(original, Tensor) or tuple(original.shape) != tuple(weight.shape):
            raise ValueError(
                f"{where} must be a tensor of the base weight's shape {tuple(weight.shape)}, got "
                f"{tuple(original.shape) if isinstance(original, Tensor) else type(original).__name__}"
            )
        if not original.is_floating_point():
            raise ValueError(f"{where} must be floating point, got {original.dtype}")
        self.original = original.detach().to(device=weight.device, dtype=weight.dtype).clone()


class QuantizedMergeGuard(MergeGuard):
    """The :class:`MergeGuard` of a quantized base. Its target is the base module (not a weight tensor): a merge
    installs a new packed weight, and ``original`` is the base's :func:`~ttkernels.quantized.packed_state` from
    before the first merge (the old Parameter itself, not a copy)."""

    @torch.no_grad()
    def merge(
        self,
        base: nn.Module,
        deltas: Sequence[Tensor],
        params: Sequence[Tensor],
        *,
        safe: bool = False,
        what: str = "the adapter",
    ) -> None:
        delta = _sum(deltas)
        if safe and not torch.isfinite(delta).all():
            raise ValueError(f"merging {what} refused: its delta-W holds non-finite values (safe_merge=True)")
        new = quantized.merged_weight(base, delta, safe=safe, what=what)  # checks before anything changes
        if self.original is None:
            self.original = quantized.packed_state(base)
        quantized.install_weight(base, new)
        self.fingerprint = self.fingerprint_of(params)

    @torch.no_grad()
    def restore(self, base: nn.Module) -> None:
        if self.original is not None:
            quantized.set_packed_state(base, self.original)
        self.original, self.fingerprint = None, ()

    @torch.no_grad()
    def remerge(self, base: nn.Module, deltas: Sequence[Tensor], params: Sequence[Tensor]) -> None:
        assert self.original is not None
        quantized.install_weight(base, quantized.merged_weight(base, _sum(deltas), source=self.original))
        self.fingerprint = self.fingerprint_of(params)

    def adopt(self, base: nn.Module, original: Tensor, where: str) -> None:
        raise ValueError(
            f"{where}: a merged state cannot be loaded into a layer over a quantized base (the weight it kept is "
            "packed; it is not saved). Load an unmerged state dict and merge() after loading"
        )

    @contextlib.contextmanager
    def kept(self, base: nn.Module) -> Iterator[nn.Module]:
        """Within the block ``base`` holds the kept (unmerged) weight."""
        assert self.original is not None
        current = quantized.packed_state(base)
        quantized.set_packed_state(base, self.original)
        try:
            yield base
        finally:
            self.original = quantized.packed_state(base)  # an 8-bit forward moves its scales into base.state
            quantized.set_packed_state(base, current)


def merge_guard_for(base: nn.Module) -> MergeGuard:
    """The merge guard of a layer over ``base``: a :class:`QuantizedMergeGuard` for a quantized base."""
    return QuantizedMergeGuard() if quantized.is_quantized_linear(base) else MergeGuard()


class _RefuseBackward(torch.autograd.Function):
    """Identity forward; its backward refuses (a merged layer's cores would get no gradient)."""

    @staticmethod
    def forward(ctx, y: Tensor, what: str, *params: Tensor) -> Tensor:
        ctx.what = what
        return y.view_as(y)

    @staticmethod
    def backward(ctx, *grads: Tensor):
        raise RuntimeError(
            f"backward through a merged {ctx.what}: its cores would get no gradient. Call unmerge() before "
            "training (a merged layer is for inference; run it under torch.no_grad() to skip this check)."
        )


def guard_merged_output(y: Tensor, what: str, params: Sequence[Tensor]) -> Tensor:
    """``y`` of a merged layer, made to refuse a backward when its cores require gradients."""
    params = [p for p in params if p.requires_grad]
    if not params or not torch.is_grad_enabled():
        return y
    return _RefuseBackward.apply(y, what, *params)


# ------------------------------------------------------------------------------------------------ optimizers
def param_group_holding(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], what: str) -> dict:
    """The param group of ``optimizer`` that holds ``params`` (found before anything is changed)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
    ids = {id(p) for p in params}
    for group in optimizer.param_groups:
        if any(id(p) in ids for p in group["params"]):
            return group
    raise ValueError(f"the optimizer does not hold {what}")


def swap_parameters(
    optimizer: torch.optim.Optimizer, group: dict, old: Sequence[Tensor], new: Sequence[Tensor]
) -> None:
    """The old Parameters leave ``group`` (their state dropped), the new ones join it with fresh state."""
    old_ids = {id(p) for p in old}
    group["params"] = [p for p in group["params"] if id(p) not in old_ids] + list(new)
    for p in old:
        optimizer.state.pop(p, None)


# ------------------------------------------------------------------------------------------------ the base
class AdapterLayer(nn.Module):
    """A frozen linear base plus an adapter of trainable cores; see the module docstring for what it owns.

    Subclasses set ``spec`` and ``cores`` and implement :meth:`spec_for_cores`, :meth:`delta_weight` and
    :meth:`adapter_forward`; they call :meth:`_attach_base` and :meth:`_set_alpha` once when built.
    """

    cores: nn.ParameterList
    weight_transposed: bool = False
    merged: bool = False

    # ------------------------------------------------------------------------------ subclass contract
    def spec_for_cores(self, cores: Sequence[Tensor]) -> Any:
        """The spec of ``cores`` if they can replace this layer's (same mode sizes, any bond ranks), else
        ValueError / TypeError naming what does not fit."""
        raise NotImplementedError

    def delta_weight(self) -> Tensor:
        """The scaled dense delta-W ``(out_features, in_features)``: what :meth:`merge` adds."""
        raise NotImplementedError

    def adapter_forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``x W^T + b + scaling * x dW^T`` (the adapter on, unmerged)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ building
    def _attach_base(self, base: nn.Module) -> None:
        """Share (not copy) and freeze the base's weight and bias; ``base`` is kept for :meth:`unload`. A
        quantized base is registered as the submodule ``base_layer`` instead (see the module docstring)."""
        self.base_kind = base_kind(base)
        self.in_features, self.out_features, self.weight_transposed = base_features(base)
        if self.quantized_base:
            base.requires_grad_(False)
            self.base_layer = base
            self.weight = None
            self.bias = None
        else:
            base.weight.requires_grad_(False)
            self.weight = base.weight
            bias = getattr(base, "bias", None)
            if bias is not None:
                bias.requires_grad_(False)
            self.bias = bias
        self.__dict__["_base_module"] = base  # a dense base is no submodule: its Parameters are registered here
        self.__dict__["_merge_guard"] = merge_guard_for(base)
        self.merged = False
        self._disabled = False
        register_merge_hooks(self)

    def _set_alpha(self, alpha: object, rank: int, gain: float = 1.0) -> None:
        """``alpha`` checked; ``scaling`` by :func:`adapter_scaling` (``gain``: the scaling rule's factor,
        :func:`ttkernels.init.scaling_gain`). ``alpha=None`` keeps ``alpha = rank`` and ``scaling = 1``."""
        alpha = check_alpha(alpha)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = adapter_scaling(alpha, rank, gain=gain)

    @property
    def base_module(self) -> nn.Module:
        """The wrapped ``nn.Linear`` / ``Conv1D`` (its Parameters are this layer's ``weight`` and ``bias``), or
        the quantized layer (``base_layer``)."""
        return self.__dict__["_base_module"]

    @property
    def quantized_base(self) -> bool:
        """True over a quantized base (``base_kind`` ``"bnb-4bit"`` / ``"bnb-8bit"`` / ``"torchao"``)."""
        return self.base_kind in quantized.KINDS

    @property
    def base_weight(self) -> Tensor:
        """The frozen weight as ``(out_features, in_features)`` (a transposed view for a Conv1D-style base)."""
        if self.quantized_base:
            raise RuntimeError(
                "the base is a quantized layer: its weight exists only packed (ttkernels.quantized.dequantize_weight "
                "gives a dense copy)"
            )
        return self.weight.t() if self.weight_transposed else self.weight

    @property
    def base_bias(self) -> Optional[Tensor]:
        """The frozen bias (a quantized base's own), or None."""
        return self.base_layer.bias if self.quantized_base else self.bias

    @property
    def disabled(self) -> bool:
        """True inside :meth:`adapter_disabled`."""
        return self._disabled

    # ------------------------------------------------------------------------------ cores
    @torch.no_grad()
    def replace_cores(
        self, cores: Sequence[Tensor], *, optimizer: Optional[torch.optim.Optimizer] = None
    ) -> nn.ParameterList:
        """Swap this layer's cores for ``cores`` of other bond ranks (same mode sizes), between steps.

        An ``nn.ParameterList`` is registered as it is (shared with whoever else holds it); other tensors are
        copied into fresh Parameters on the old cores' device and dtype. ``scaling`` stays as it was. With
        ``optimizer``, the old Parameters leave its param group (their state is dropped) and the new ones join
        the same group with fresh state. Nothing changes when a check fails. A merged layer stays merged (the
        next forward merges the new cores; ``unmerge()`` restores the base weight exactly).
        """
        spec = self.spec_for_cores(cores)
        old = list(self.cores)
        held = None if optimizer is None else param_group_holding(optimizer, old, "this layer's cores")
        if isinstance(cores, nn.ParameterList):
            new = cores
        else:
            ref = old[0]
            new = nn.ParameterList(
                [nn.Parameter(c.detach().to(device=ref.device, dtype=ref.dtype).clone()) for c in cores]
            )
        self.cores = new
        self.spec = spec
        if held is not None:
            swap_parameters(optimizer, held, old, list(new))
        return new

    @property
    def num_adapter_params(self) -> int:
        return self.spec.num_params

    # ------------------------------------------------------------------------------ forward
    def check_input(self, x: object) -> Tensor:
        """x's type, dtype and last dimension, refused with the argument named."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in INPUT_DTYPES:
            raise TypeError(f"x must be a floating-point tensor (float32, float64, bfloat16 or float16), got {x.dtype}")
        if x.dim() == 0:
            raise ValueError("x must have shape (..., in_features); got a 0-d tensor")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has last dimension {x.shape[-1]} but in_features is {self.in_features}")
        return x

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        self.check_input(x)
        if self.merged:
            params = list(self.cores)
            guard = self.__dict__["_merge_guard"]
            guard.refresh(self._merge_target(), params, lambda: [self._merge_delta()])
            if self._disabled:
                return self._kept_base_forward(x)
            return guard_merged_output(self.base_forward(x), type(self).__name__, params)
        if self._disabled:
            return self.base_forward(x)
        return self.adapter_forward(x, **kwargs)

    def base_forward(self, x: Tensor) -> Tensor:
        """The frozen base alone: ``x W^T + b``, or a quantized base's own forward."""
        if self.quantized_base:
            return self.base_layer(x)
        return self._base_linear(x, self.base_weight)

    def _kept_base_forward(self, x: Tensor) -> Tensor:
        """The base with the weight kept by the merge (merged and disabled): exactly the unmerged base."""
        guard = self.__dict__["_merge_guard"]
        if self.quantized_base:
            with guard.kept(self.base_layer):
                return self.base_layer(x)
        w = guard.original.t() if self.weight_transposed else guard.original
        return self._base_linear(x, w)

    def _base_linear(self, x: Tensor, weight: Tensor) -> Tensor:
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"x is {x.dtype} but the base weight is {weight.dtype}: cast them to one dtype, or run under "
                "torch.autocast"
            )
        return F.linear(x, weight, self.bias)

    # ------------------------------------------------------------------------------ merge
    def _merge_target(self) -> Any:
        """What the merge guard writes: the base weight, or a quantized base module."""
        return self.base_layer if self.quantized_base else self.weight

    def _stored(self, delta: Tensor) -> Tensor:
        """``delta`` ``(out, in)`` in the stored weight's orientation."""
        return delta.t() if self.weight_transposed else delta

    def _merge_delta(self) -> Tensor:
        """What :meth:`merge` adds, in the stored weight's orientation (a subclass with several delta-Ws, such as
        one per task, picks the merged one)."""
        return self._stored(self.delta_weight())

    def _check_mergeable(self) -> None:
        """Raise when this adapter cannot be merged into one weight now."""

    @torch.no_grad()
    def merge(self, safe_merge: bool = False) -> None:
        """Add delta-W into the base weight (no-op when already merged), keeping the weight as it was for an
        exact :meth:`unmerge`. ``safe_merge``: refuse a non-finite delta-W (the weight is left as it was)."""
        if self.merged:
            return
        self._check_mergeable()
        guard = self.__dict__["_merge_guard"]
        guard.merge(self._merge_target(), [self._merge_delta()], list(self.cores), safe=safe_merge)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """The base weight back to what it was before :meth:`merge`, bit for bit (no-op when not merged)."""
        if not self.merged:
            return
        self.__dict__["_merge_guard"].restore(self._merge_target())
        self.merged = False

    @torch.no_grad()
    def merge_and_unload(self, safe_merge: bool = False) -> nn.Module:
        """Add delta-W into the base module's weight for good and return the base module (``nn.Linear`` or
        ``Conv1D``, or the quantized layer, requantized with a rounding warning); no copy of the weight is kept.
        Unmerges first if merged."""
        self.unmerge()
        self._check_mergeable()
        if self.quantized_base:
            quantized.add_delta(self.base_layer, self._merge_delta(), safe=safe_merge)
        else:
            add_delta_(self.weight, self._merge_delta(), safe=safe_merge)
        return self.base_module

    def _merge_state(self) -> tuple[MergeGuard, Any, str, None]:
        key = "base_layer.weight" if self.quantized_base else "weight"
        return self.__dict__["_merge_guard"], self._merge_target(), key, None

    def _resume_merge(self, names: Sequence[str], *, from_weight: bool = False) -> None:
        if names not in ([], [""]):
            raise ValueError(f"this {type(self).__name__} has one adapter; the state dict names merged ones {names}")
        if from_weight:
            self.merge()
        else:
            self.__dict__["_merge_guard"].remerge(self._merge_target(), [self._merge_delta()], list(self.cores))
            self.merged = True

    @contextlib.contextmanager
    def adapter_disabled(self) -> Iterator[AdapterLayer]:
        """Within the block the layer computes the base ``x W^T + b`` only (merged or not)."""
        previous = self._disabled
        self._disabled = True
        try:
            yield self
        finally:
            self._disabled = previous


# ------------------------------------------------------------------------------------------------ state dicts
# A mergeable layer (AdapterLayer, the PEFT layer) answers ``_merge_state()`` with (its MergeGuard, what the
# guard writes (the base weight, or a quantized base module), the weight's state-dict key under the layer's prefix, the names of the merged adapters or None for a
# single adapter) and ``_resume_merge(names)`` (merged again from the kept weight the guard has just adopted).
def register_merge_hooks(module: nn.Module) -> None:
    """State-dict hooks of a mergeable layer: a merged layer's state dict records the kept weight (and the merged
    adapters' names); loading it gives a merged layer; loading into a merged layer unmerges it first."""
    module.register_state_dict_post_hook(_state_dict_post_hook)
    module.register_load_state_dict_pre_hook(_load_pre_hook)
    module.register_load_state_dict_post_hook(_load_post_hook)


def _before_key(weight_key: str) -> str:
    return weight_key.rpartition(".")[0] + ("." if "." in weight_key else "") + BEFORE_MERGE_KEY


def _state_dict_post_hook(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    guard, _, key, names = module._merge_state()
    if guard.original is not None and isinstance(guard, QuantizedMergeGuard):
        raise RuntimeError(
            f"state_dict() of a merged {type(module).__name__} over a quantized base is refused: the weight it "
            "kept for an exact unmerge is packed and is not saved. unmerge() first (exact), or merge_and_unload() "
            "for a merged quantized model"
        )
    if guard.original is not None:
        state_dict[prefix + _before_key(key)] = guard.original.detach().clone()
        for name in names or ():
            state_dict[prefix + "merged." + name] = torch.ones((), dtype=torch.bool)


def _load_pre_hook(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    guard, _, key, names = module._merge_state()
    was = list(names) if names is not None else ([""] if guard.merged else [])
    module.unmerge()  # the weight in the file is a base weight: never add delta-W twice
    before = state_dict.pop(prefix + _before_key(key), None)
    saved = [k[len(prefix + "merged.") :] for k in list(state_dict) if k.startswith(prefix + "merged.")]
    for name in saved:
        state_dict.pop(prefix + "merged." + name)
    again = was if prefix + key not in state_dict else []
    module.__dict__["_pending_merge"] = (before, saved, again, prefix + _before_key(key))


def _load_post_hook(module: nn.Module, incompatible_keys: Any) -> None:
    pending = module.__dict__.pop("_pending_merge", None)
    if pending is None:
        return
    before, saved, again, where = pending
    guard, weight, _, _ = module._merge_state()
    if before is not None:
        guard.adopt(weight, before, where)
        module._resume_merge(saved)
    elif again:
        module._resume_merge(again, from_weight=True)
