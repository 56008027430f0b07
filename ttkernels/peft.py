"""ttkernels from PEFT: TT adapters through PEFT's LoRA custom-module route, and MetaTT for PEFT-style code.

Two entry points:

* :func:`tt_lora_config` — a :class:`TTLoraConfig` (a ``peft.LoraConfig``) whose ``nn.Linear`` targets become
  :class:`TTLoraLinear` layers: PEFT's LoRA machinery (``get_peft_model``, ``print_trainable_parameters``,
  ``save_pretrained``, ``disable_adapter``, ``merge_and_unload``, several adapters) with a tensor-train delta-W
  of bond rank ``r`` computed by the ttkernels ops (delta-W is never built in forward).
* Saved folders describe themselves: ``adapter_config.json`` has ``peft_type`` ``"TT_LORA"`` and the TT's
  options (``tt_in_modes``, ``tt_out_modes``, ``tt_backend``). PEFT without ttkernels refuses such a folder
  (it knows no ``TT_LORA``) instead of loading it as a no-op; once this module is imported,
  ``peft.PeftModel.from_pretrained`` and :func:`load_tt_lora` load it with nothing more to say.
* :func:`export_lora` writes a plain PEFT LoRA folder with the same delta-W (for stock PEFT and serving engines).
* :func:`get_peft_model` — ``get_peft_model(model, config)`` for either kind of config: a
  :class:`~ttkernels.metatt.MetaTTConfig` gives the MetaTT wrapper (whose methods carry PEFT's names:
  ``print_trainable_parameters``, ``save_pretrained``, ``from_pretrained``, ``disable_adapter``,
  ``merge_and_unload``, ``unload``), anything else goes to ``peft.get_peft_model``. Training code written for
  PEFT switches to MetaTT by changing its config.

PEFT passes a custom layer only LoRA's arguments (``r``, ``lora_alpha``, the config), so the TT's own options
(its in and out modes, the backend) are class attributes: :func:`tt_lora_layer` makes the class.
Checked by tests/test_peft.py against peft 0.21 (train, save, reload, merge, disable).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Optional

import peft
import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from . import checks, ops, quantized, reference
from .init import SCALING_RULE, scaling_gain
from .layer import (
    MergeGuard,
    adapter_scaling,
    check_alpha,
    guard_merged_output,
    merge_guard_for,
    param_group_holding,
    register_merge_hooks,
    swap_parameters,
)
from .metatt import MetaTTConfig, MetaTTModel, get_metatt_model
from .modules import TTLinear
from .spec import TTSpec

__all__ = [
    "TTLoraConfig",
    "TTLoraLinear",
    "export_lora",
    "get_peft_model",
    "load_tt_lora",
    "tt_lora_config",
    "tt_lora_layer",
]

# ---------------------------------------------------------------- format version of TT-LoRA folders (scaling rule)
# All that the scaling rule (ttkernels.init) adds to the TT-LoRA route: the ``tt_format_version`` field of
# TTLoraConfig (saved in adapter_config.json), the layer's ``tt_scaling`` / ``set_scale``, and its reading in
# _check_tt_lora_folder / load_tt_lora.
TT_LORA_FORMAT_VERSION = 2  # saved in adapter_config.json; absent: 1, saved under scaling rule 1


def _check_tt_format_version(version: object, where: str = "tt_format_version") -> int:
    if type(version) is not int or not 1 <= version <= TT_LORA_FORMAT_VERSION:
        raise ValueError(
            f"{where} must be an int from 1 to {TT_LORA_FORMAT_VERSION}, got tt_format_version {version!r}"
        )
    return version


# ------------------------------------------------------------------------------------------------ the layer


class TTLoraLinear(nn.Module, LoraLayer):
    """A PEFT LoRA layer on an ``nn.Linear`` whose delta-W is a TT adapter (``r`` = every bond rank).

    Only the cores are registered (``lora_tt_cores[adapter]``), so PEFT saves, loads and trains them alone;
    the base layer is PEFT's ``base_layer``. ``scaling = lora_alpha / r * sqrt(F)`` (``/ sqrt(r)`` with
    rslora), ``F = d_out / s_K`` (1 for one out mode: LoRA's scaling; :mod:`ttkernels.init`); a config of
    ``tt_format_version`` 1 gives ``lora_alpha / r``.

    Its class base is PEFT's ``LoraLayer`` (for PEFT's machinery); alpha, scaling and merging are the
    adapter-layer base's (:mod:`ttkernels.layer`), with its guarantees: ``merge()`` keeps the base weight for an
    exact ``unmerge()``, ``merge(safe_merge=True)`` refuses non-finite deltas, a backward through a merged layer
    is refused, merged cores that change are merged again at the next forward, and a merged layer's state dict
    records the kept weight (``base_layer.weight_before_merge``) and the merged adapters (``merged.<name>``).
    Over a quantized base (bitsandbytes or torchao, :mod:`ttkernels.quantized`) the forward is the base's own plus each
    adapter's term, and merging is the base's :class:`~ttkernels.layer.QuantizedMergeGuard`'s (requantized with
    a warning, unmerged exactly; a merged layer's state dict is refused).
    """

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_tt_cores",)
    other_param_names = LoraLayer.other_param_names + ("tt_spec", "tt_dropout", "tt_scaling")
    tt_in_modes: Any = None
    tt_out_modes: Any = None
    tt_backend: str = "auto"

    def __init__(
        self, base_layer: nn.Module, adapter_name: str, config: peft.LoraConfig, r: int = 0, lora_alpha: float = 1, **kw
    ) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer, **kw)
        self.lora_tt_cores = nn.ModuleDict()
        self.tt_spec: dict = {}
        self.tt_dropout: dict = {}
        self.tt_scaling: dict = {}  # the scaling at scale 1 (set_scale multiplies it)
        self.fan_in_fan_out = config.fan_in_fan_out
        self._active_adapter = adapter_name
        self.__dict__["_merge_guard"] = merge_guard_for(self.get_base_layer())
        register_merge_hooks(self)
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kw)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: peft.LoraConfig, **kw) -> None:
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear) or config.fan_in_fan_out:
            raise TypeError(f"TTLoraLinear adapts nn.Linear layers, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
        lora_alpha = check_alpha(lora_alpha, "lora_alpha")
        if lora_alpha is None:
            raise ValueError("lora_alpha must be a finite number >= 0, got None")
        if config.lora_bias:
            raise NotImplementedError("lora_bias is not supported by TTLoraLinear")
        init = config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise NotImplementedError(f"init_lora_weights={init!r} is not supported by TTLoraLinear")
        self.resolve_lora_variant(config=config)  # DoRA and the other variants are refused here
        tt = TTLinear.from_linear(
            base, ranks=r, in_modes=self.tt_in_modes, out_modes=self.tt_out_modes, dropout=config.lora_dropout
        )
        if init is False:  # PEFT's convention: a non-zero delta-W from the start
            with torch.no_grad():
                tt.cores[-1].normal_(0.0, 0.1)
        self.lora_tt_cores[adapter_name] = tt.cores
        self.tt_spec[adapter_name] = tt.spec
        self.tt_dropout[adapter_name] = float(config.lora_dropout)
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.lora_dropout[adapter_name] = nn.Identity()  # the ops apply dropout from a seed, no module
        rule = config.tt_scaling_rule if isinstance(config, TTLoraConfig) else SCALING_RULE
        gain = scaling_gain(tt.spec, rule=rule)
        self.tt_scaling[adapter_name] = adapter_scaling(lora_alpha, r, rslora=config.use_rslora, gain=gain)
        self.scaling[adapter_name] = self.tt_scaling[adapter_name]
        self.use_rslora[adapter_name] = config.use_rslora
        self.use_dora[adapter_name] = False
        self.lora_bias[adapter_name] = False
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=config.inference_mode)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        self._check_forward_args(x, *args, **kwargs)
        if kwargs.pop("adapter_names", None) is not None:
            raise NotImplementedError("TTLoraLinear does not support mixed-adapter batches (adapter_names=)")
        base = self.base_layer
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return base(x, *args, **kwargs)
        if self.merged:
            params = self._merged_cores()
            self.__dict__["_merge_guard"].refresh(self._merge_target(), params, self._merged_deltas)
            return guard_merged_output(base(x, *args, **kwargs), type(self).__name__, params)
        active = [a for a in self.active_adapters if a in self.lora_tt_cores]
        dropout = lambda a: self.tt_dropout[a] if self.training else 0.0
        quantized_base = quantized.is_quantized_linear(base)  # torchao's keeps nn.Linear, its weight is packed
        if len(active) == 1 and type(base) is nn.Linear and not quantized_base and not args and not kwargs:
            a = active[0]  # the fused op: one call, delta-W never formed
            cores = list(self.lora_tt_cores[a])
            return ops.tt_linear(
                x, base.weight, base.bias, cores, self.tt_spec[a], scaling=self.scaling[a], dropout=dropout(a),
                backend=self.tt_backend,
            )  # fmt: skip
        result = base(x, *args, **kwargs)
        if quantized_base:  # adapter terms without the packed weight
            for a in active:
                term = quantized.adapter_term(
                    x, list(self.lora_tt_cores[a]), self.tt_spec[a], scaling=self.scaling[a], dropout=dropout(a),
                    backend=self.tt_backend,
                )  # fmt: skip
                result = result + term.to(result.dtype)
            return result
        for a in active:  # more than one adapter: each adds its low-rank term to the base output
            zero = torch.zeros((), dtype=x.dtype, device=x.device)
            A, C, B = ops.factors(list(self.lora_tt_cores[a]), self.tt_spec[a], dtype=x.dtype)
            term = ops.tt_adapter(x, zero.expand(B.shape[1], x.shape[-1]), None, A, C, B, scaling=self.scaling[a],
                                  dropout=dropout(a), backend=self.tt_backend)  # fmt: skip
            result = result + term.to(result.dtype)
        return result

    def get_delta_weight(self, adapter: str) -> Tensor:
        """The scaled dense delta-W ``(out_features, in_features)``, for merging."""
        dW = reference.dense_delta(list(self.lora_tt_cores[adapter]), self.tt_spec[adapter]).t()
        return dW * self.scaling[adapter]

    def _merge_target(self) -> Any:
        """What the merge guard writes: the base weight, or a quantized base module."""
        base = self.get_base_layer()
        return base if quantized.is_quantized_linear(base) else base.weight

    def _merged_cores(self) -> list[Tensor]:
        return [p for a in self.merged_adapters if a in self.lora_tt_cores for p in self.lora_tt_cores[a]]

    def _merged_deltas(self) -> list[Tensor]:
        return [self.get_delta_weight(a) for a in self.merged_adapters if a in self.lora_tt_cores]

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """PEFT's merge: the adapters' delta-W into the base weight, which is kept for an exact :meth:`unmerge`."""
        todo = [a for a in check_adapters_to_merge(self, adapter_names) if a in self.lora_tt_cores]
        if not todo:
            return
        params = self._merged_cores() + [p for a in todo for p in self.lora_tt_cores[a]]
        deltas = [self.get_delta_weight(a) for a in todo]
        self.__dict__["_merge_guard"].merge(
            self._merge_target(), deltas, params, safe=safe_merge, what=f"adapter(s) {todo}"
        )
        self.merged_adapters.extend(todo)

    def _merge_state(self) -> tuple[MergeGuard, Any, str, list[str]]:
        return self.__dict__["_merge_guard"], self._merge_target(), "base_layer.weight", self.merged_adapters

    def _resume_merge(self, names: list[str], *, from_weight: bool = False) -> None:
        unknown = [n for n in names if n not in self.lora_tt_cores]
        if unknown or not names:
            raise ValueError(f"the state dict names merged adapters {names}; this layer has {list(self.lora_tt_cores)}")
        if from_weight:
            self.merge(adapter_names=list(names))
        else:
            self.merged_adapters.extend(names)
            guard = self.__dict__["_merge_guard"]
            guard.remerge(self._merge_target(), self._merged_deltas(), self._merged_cores())

    @torch.no_grad()
    def unmerge(self) -> None:
        """Every merged adapter out: the base weight back to what it was, bit for bit."""
        if not self.merged_adapters:
            return
        self.__dict__["_merge_guard"].restore(self._merge_target())
        self.merged_adapters.clear()

    @torch.no_grad()
    def replace_cores(
        self, cores: Sequence[Tensor], *, adapter: str = "default", optimizer: Optional[torch.optim.Optimizer] = None
    ) -> nn.ParameterList:
        """Swap ``adapter``'s cores for ``cores`` of other bond ranks (same mode sizes), between steps, as
        :meth:`ttkernels.layer.AdapterLayer.replace_cores`: fresh Parameters on the old cores' device and dtype (and
        ``requires_grad``), the scaling unchanged; with ``optimizer`` the old Parameters leave its param group and
        the new ones join it with fresh state. Nothing changes when a check fails. A merged layer stays merged (the
        next forward merges the new cores; ``unmerge()`` restores the base weight exactly)."""
        if adapter not in self.lora_tt_cores:
            raise KeyError(f"no TT-LoRA adapter {adapter!r}; this layer has {list(self.lora_tt_cores)}")
        old = list(self.lora_tt_cores[adapter])
        spec = self.tt_spec[adapter]
        cores = reference.check_chain(list(cores), "cores")
        if len(cores) != spec.num_cores:
            raise ValueError(f"cores has {len(cores)} tensors but adapter {adapter!r} has {spec.num_cores} cores")
        for k, (core, mode) in enumerate(zip(cores, spec.modes)):
            if core.shape[1] != mode.size:
                raise ValueError(
                    f"cores[{k}] must be (r_prev, {mode.size}, r_next) for mode {mode.name!r}, got {tuple(core.shape)}"
                )
        held = None if optimizer is None else param_group_holding(optimizer, old, f"the cores of adapter {adapter!r}")
        ref = old[0]
        new = nn.ParameterList(
            [
                nn.Parameter(c.to(device=ref.device, dtype=ref.dtype).clone(), requires_grad=ref.requires_grad)
                for c in cores
            ]
        )
        self.lora_tt_cores[adapter] = new
        self.tt_spec[adapter] = TTSpec(spec.modes, tuple(c.shape[2] for c in cores[:-1]))
        if held is not None:
            swap_parameters(optimizer, held, old, list(new))
        return new

    def set_scale(self, adapter: str, scale: float) -> None:
        if adapter in self.tt_scaling:  # LoraLayer's version recomputes lora_alpha / r
            self.scaling[adapter] = scale * self.tt_scaling[adapter]

    # LoraLayer's versions look adapters up in lora_A
    def scale_layer(self, scale: float) -> None:
        for a in self.active_adapters:
            if a in self.lora_tt_cores:
                self.scaling[a] *= scale

    def unscale_layer(self, scale: Optional[float] = None) -> None:
        for a in self.active_adapters:
            if a in self.lora_tt_cores:
                if scale is None:
                    self.set_scale(a, 1.0)
                else:
                    self.scaling[a] /= scale

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        return False

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def tt_lora_layer(*, in_modes: Any = None, out_modes: Any = None, backend: str = "auto") -> type[TTLoraLinear]:
    """The :class:`TTLoraLinear` class with these TT options (``in_modes`` / ``out_modes`` as for
    :class:`~ttkernels.TTLinear`: None for one mode, an int for that many balanced factors, or the sizes)."""
    ops.check_backend_name(backend)
    name = f"TTLoraLinear_{in_modes}_{out_modes}_{backend}".replace(" ", "")
    return type(name, (TTLoraLinear,), {"tt_in_modes": in_modes, "tt_out_modes": out_modes, "tt_backend": backend})


def tt_lora_config(
    *, in_modes: Any = None, out_modes: Any = None, backend: str = "auto", config: Optional[peft.LoraConfig] = None,
    **lora_kwargs: Any,
) -> peft.LoraConfig:  # fmt: skip
    """A :class:`TTLoraConfig` (built from ``lora_kwargs``, or from the fields of ``config``) whose ``nn.Linear``
    targets get TT adapters: ``r`` is the TT's bond rank, ``lora_alpha`` / ``lora_dropout`` as in LoRA."""
    if config is not None and lora_kwargs:
        raise ValueError("pass either config or LoraConfig keyword arguments, not both")
    if config is not None and not isinstance(config, peft.LoraConfig):
        raise TypeError(f"config must be a peft.LoraConfig, got {type(config).__name__}")
    tt = {"tt_in_modes": in_modes, "tt_out_modes": out_modes, "tt_backend": backend}
    if config is not None:
        fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(peft.LoraConfig) if f.init}
        fields.pop("peft_type", None)
        version = getattr(config, "tt_format_version", TT_LORA_FORMAT_VERSION)  # a plain LoraConfig: this one
        return TTLoraConfig(**fields, **tt, tt_format_version=version)
    return TTLoraConfig(**lora_kwargs, **tt)


_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
# LoRA config fields a TT-LoRA layer has no use for: refused when a file sets them (they would change the model)
_UNSUPPORTED_FIELDS = (
    "alora_invocation_tokens", "arrow_config", "corda_config", "eva_config", "fan_in_fan_out", "kasa_config",
    "layer_replication", "loftq_config", "lora_bias", "lora_ga_config", "megatron_config", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora", "velora_config",
)  # fmt: skip
_CORE_KEY = re.compile(r"base_model\.model\.(.+)\.lora_tt_cores\.(\d{1,4})")  # fixed here, never from a file
_LORA_KEY = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")  # a plain LoRA adapter's tensors


def _names_match(name: str, targets: Any) -> bool:
    """PEFT's rule for a list of names (the name, or a suffix after a dot), without regular expressions."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _within(name: str, modules: Any) -> bool:
    """``name`` is one of ``modules`` (PEFT's rule) or lies inside one."""
    parts = name.split(".")
    return any(_names_match(".".join(parts[:i]), modules) for i in range(len(parts), 0, -1))


def _tt_options(data: dict, config_file: str, in_modes: Any, out_modes: Any, backend: Optional[str]) -> dict:
    """The TT options of a saved folder's config ``data``: a ``TT_LORA`` folder's own (each checked; options
    given here must agree, ``backend`` overrides), or for a ``LORA`` folder the ones given here."""
    kind = data.get("peft_type")
    if kind == "LORA":  # saved before folders recorded their TT options (or a plain LoRA folder: refused later)
        return {"kind": kind, "in_modes": in_modes, "out_modes": out_modes, "backend": backend or "auto"}
    if kind != TT_LORA:
        raise ValueError(f"{config_file} holds a {str(kind)[:50]!r} adapter, not a TT-LoRA one (peft_type {TT_LORA!r})")
    try:
        saved = {
            "in_modes": _check_tt_modes("tt_in_modes", data.get("tt_in_modes")),
            "out_modes": _check_tt_modes("tt_out_modes", data.get("tt_out_modes")),
        }
        saved_backend = data.get("tt_backend", "auto")
        ops.check_backend_name(saved_backend)
    except ValueError as e:
        raise ValueError(f"{config_file}: {e}") from e
    for name, given in (("in_modes", in_modes), ("out_modes", out_modes)):
        if given is not None and _check_tt_modes(name, given) != saved[name]:
            raise ValueError(f"{config_file} was saved with tt_{name}={saved[name]!r}, but {name}={given!r} was given")
    return {"kind": kind, **saved, "backend": backend or saved_backend}


def _config_from(data: dict, options: dict, config_file: str) -> TTLoraConfig:
    """The :class:`TTLoraConfig` of checked config ``data`` (fields PEFT does not know are left out, as PEFT
    does) with the TT ``options``; built from ``data``, never by reading the file again."""
    known = {f.name for f in dataclasses.fields(peft.LoraConfig) if f.init} - {"peft_type"}
    fields = {k: v for k, v in data.items() if k in known}
    try:
        return TTLoraConfig(
            **fields, tt_in_modes=options["in_modes"], tt_out_modes=options["out_modes"], tt_backend=options["backend"]
        )
    except (TypeError, ValueError) as e:
        raise ValueError(f"{config_file}: PEFT refuses the config: {e}") from e


def _check_tt_lora_folder(
    model: Optional[nn.Module], folder: str, in_modes: Any, out_modes: Any, backend: Optional[str]
) -> dict:
    """Every field :func:`load_tt_lora` uses from ``folder``'s config (the TT options included), and every tensor
    of its safetensors file (names, shapes and dtypes from the header, then finite values), checked against
    ``model`` before PEFT builds anything. Returns the :class:`TTLoraConfig`, the literal targets and per-module
    ranks and alphas. Without a model, only the config and the tensor names are checked."""
    config_file = os.path.join(folder, _PEFT_CONFIG)
    data = checks.read_json(config_file, "adapter config")

    def fail(field: str, want: str) -> ValueError:
        return ValueError(f"{config_file}: {field} must be {want}, got {str(data.get(field))[:200]}")

    options = _tt_options(data, config_file, in_modes, out_modes, backend)
    in_modes, out_modes = options["in_modes"], options["out_modes"]
    if options["kind"] == TT_LORA:
        misfit = f"the cores saved in {folder} do not fit its TT options (tt_in_modes={in_modes!r}, " + (
            f"tt_out_modes={out_modes!r})"
        )
    else:
        misfit = "pass the options it was trained with"
    r = data.get("r")
    if type(r) is not int or r < 1:
        raise fail("r", "a positive int")
    alpha = data.get("lora_alpha")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise fail("lora_alpha", "a finite number")
    dropout = data.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise fail("lora_dropout", "a number in [0, 1)")
    for flag in ("use_rslora", "use_dora", "fan_in_fan_out", "inference_mode", "lora_bias"):
        if type(data.get(flag, False)) is not bool:
            raise fail(flag, "true or false")
    tt_format_version = _check_tt_format_version(data.get("tt_format_version", 1), config_file)  # absent: 1
    unsupported = sorted(k for k in _UNSUPPORTED_FIELDS if data.get(k))
    if unsupported:
        raise ValueError(f"{config_file} sets {unsupported}, which TT-LoRA layers do not support")
    if data.get("bias", "none") not in ("none", "all", "lora_only"):
        raise fail("bias", "'none', 'all' or 'lora_only'")
    if data.get("init_lora_weights", True) not in (True, False, "gaussian"):
        raise fail("init_lora_weights", "true, false or 'gaussian'")
    targets = data.get("target_modules")
    literal_targets = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if not (literal_targets or (isinstance(targets, str) and targets)):
        raise fail("target_modules", "a non-empty list of module names")
    patterns = {}
    for field, ok in (("rank_pattern", lambda v: type(v) is int and v >= 1), ("alpha_pattern", None)):
        pattern = data.get(field) or {}
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and k for k in pattern):
            raise fail(field, "an object mapping module names to values")
        for key, value in pattern.items():
            good = ok(value) if ok else not isinstance(value, bool) and isinstance(value, (int, float))
            if not good or (ok is None and not math.isfinite(value)):
                raise ValueError(f"{config_file}: {field}[{key[:100]!r}] = {str(value)[:50]} is not a valid value")
        patterns[field] = pattern
    saved_modules = data.get("modules_to_save") or []
    if not isinstance(saved_modules, list) or not all(isinstance(m, str) and m for m in saved_modules):
        raise fail("modules_to_save", "null or a list of module names")

    weights = os.path.join(folder, _PEFT_WEIGHTS)
    header = checks.read_safetensors_header(weights)
    if any(_LORA_KEY.search(key) for key in header):
        raise ValueError(
            f"{folder} holds a plain PEFT LoRA adapter (peft_type {str(data.get('peft_type'))[:50]}, lora_A / lora_B "
            "weights), not a TT-LoRA one: load it with peft.PeftModel.from_pretrained"
        )
    config = _config_from(data, options, config_file)
    config.tt_format_version = tt_format_version
    found: dict[str, dict[int, checks.TensorInfo]] = {}
    others: dict[str, checks.TensorInfo] = {}  # modules_to_save tensors and biases, checked against the model below
    for key, info in header.items():
        m = _CORE_KEY.fullmatch(key)
        if m is not None:
            found.setdefault(m.group(1), {})[int(m.group(2))] = info
        elif key.endswith(".bias") and data.get("bias", "none") != "none":
            others[key] = info  # biases PEFT trains and saves with bias="all" / "lora_only"
        elif _within(key.removeprefix("base_model.model.").rpartition(".")[0], saved_modules):
            others[key] = info
        else:
            raise ValueError(f"{weights}: tensor {key[:200]!r} is not a TT-LoRA core (<module>.lora_tt_cores.<k>)")
    if not found:
        raise ValueError(f"{weights} holds no TT-LoRA cores")
    if model is None:
        return {"config": config}
    own = model.state_dict(keep_vars=True)
    for key, info in others.items():
        name = key.removeprefix("base_model.model.")
        t = own.get(name)
        if t is None:
            raise ValueError(f"{weights}: tensor {key[:200]!r} has no counterpart {name[:200]!r} in the model")
        if info.shape != tuple(t.shape):
            raise ValueError(f"{weights}: {key[:200]} has shape {info.shape}, the model's {name} is {tuple(t.shape)}")
        if t.is_floating_point() != (info.dtype in checks.FLOAT_DTYPE_NAMES):
            raise ValueError(f"{weights}: {key[:200]} has dtype {info.dtype}, the model's {name} is {t.dtype}")
    modules = dict(model.named_modules())
    ranks, alphas = {}, {}
    for name, cores in sorted(found.items()):
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            what = "no module" if module is None else f"a {type(module).__name__}"
            raise ValueError(f"{weights} holds cores for {name[:200]!r}, but the model has {what} there (nn.Linear)")
        ranks[name] = next((v for k, v in patterns["rank_pattern"].items() if _names_match(name, [k])), r)
        alphas[name] = next((v for k, v in patterns["alpha_pattern"].items() if _names_match(name, [k])), alpha)
        spec = TTSpec.linear(
            module.in_features, module.out_features, in_modes=in_modes, out_modes=out_modes, ranks=ranks[name]
        )
        missing = [k for k in range(spec.num_cores) if k not in cores]
        extra = sorted(k for k in cores if k >= spec.num_cores)
        if missing or extra:
            raise ValueError(
                f"{weights}: {name} has cores {sorted(cores)}, the adapter needs 0..{spec.num_cores - 1} "
                f"(missing {missing}, unexpected {extra}; {misfit})"
            )
        for k, shape in enumerate(spec.core_shapes):
            info = cores[k]
            if info.shape != shape:
                raise ValueError(
                    f"{weights}: core {k} of {name} has shape {info.shape}, but r = {ranks[name]}, in_modes = "
                    f"{in_modes!r}, out_modes = {out_modes!r} need {shape} ({misfit})"
                )
            if info.dtype not in checks.FLOAT_DTYPE_NAMES:
                raise ValueError(f"{weights}: core {k} of {name} has dtype {info.dtype}; cores are floating point")
    if literal_targets:
        wanted = [n for n, m in modules.items() if n and isinstance(m, nn.Linear) and _names_match(n, targets)]
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise ValueError(f"{weights} has no cores for {missing[:5]}, which its config targets")
    tensors = checks.load_safetensors(weights)  # no more than the header declared, checked above
    for key, t in tensors.items():
        if not torch.isfinite(t).all():
            raise ValueError(f"{weights}: {key} holds non-finite values")
    return {"config": config, "targets": sorted(found), "ranks": ranks, "alphas": alphas}


def load_tt_lora(
    model: nn.Module,
    path: str,
    *,
    in_modes: Any = None,
    out_modes: Any = None,
    backend: Optional[str] = None,
    **kwargs: Any,
) -> peft.PeftModel:
    """``PeftModel.from_pretrained`` for an adapter saved from a :func:`tt_lora_config` model; the TT options
    must be the ones it was trained with. A folder saved before ``tt_format_version`` existed loads with the
    scaling it was trained with (``lora_alpha / r``).

    The folder records its TT options (``peft_type`` ``TT_LORA``, ``tt_in_modes``, ``tt_out_modes``,
    ``tt_backend``); ``in_modes`` / ``out_modes``, when given, must agree with them, and ``backend`` overrides the
    saved one. A folder saved as ``LORA`` before the options were recorded loads with the options given here; a
    plain PEFT LoRA folder is refused (load it with ``peft.PeftModel.from_pretrained``).

    ``path`` is a local folder. Its config (the TT options included) and its tensors' names, shapes and dtypes
    (from the safetensors header) are checked against ``model`` before anything is built, the tensors' values
    are checked finite, and targets are taken as the literal module names the file holds cores for (no pattern
    from the file is used as a regular expression). All or nothing: when loading fails, ``model`` is left as
    it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if backend is not None:
        ops.check_backend_name(backend)
    folder = checks.check_path(path, "path")
    if not os.path.isdir(folder):
        raise ValueError(f"path must be a local folder holding {_PEFT_CONFIG} and {_PEFT_WEIGHTS}, got {folder!r}")
    plan = _check_tt_lora_folder(model, folder, in_modes, out_modes, backend)
    cfg = plan["config"]
    cfg.target_modules = plan["targets"]  # the literal names; PEFT escapes nothing, so patterns are escaped
    cfg.rank_pattern = {re.escape(n): v for n, v in plan["ranks"].items() if v != cfg.r}
    cfg.alpha_pattern = {re.escape(n): v for n, v in plan["alphas"].items() if v != cfg.lora_alpha}
    cfg.exclude_modules, cfg.layers_to_transform, cfg.layers_pattern = None, None, None
    snapshot = checks.ModelSnapshot(model)
    try:
        loaded = peft.PeftModel.from_pretrained(model, folder, config=cfg, **kwargs)
        for module in loaded.modules():
            if isinstance(module, TTLoraLinear):
                for a, cores in module.lora_tt_cores.items():
                    reference.check_cores(list(cores), module.tt_spec[a])
    except (ValueError, TypeError):
        snapshot.restore()
        raise
    except Exception as e:  # what PEFT raises for a config it cannot use (NotImplementedError, ...)
        snapshot.restore()
        raise ValueError(f"PEFT cannot load the adapter in {folder}: {type(e).__name__}: {e}") from e
    except BaseException:
        snapshot.restore()
        raise
    return loaded


def get_peft_model(model: nn.Module, config: Any, **kwargs: Any) -> MetaTTModel | peft.PeftModel:
    """MetaTT for a :class:`~ttkernels.metatt.MetaTTConfig`, ``peft.get_peft_model`` for any other config."""
    if isinstance(config, MetaTTConfig):
        if kwargs:
            raise TypeError(f"get_peft_model with a MetaTTConfig takes no keyword arguments, got {sorted(kwargs)}")
        return get_metatt_model(model, config)
    return peft.get_peft_model(model, config, **kwargs)


# ------------------------------------------------------------------------------------------------ self-describing folders
TT_LORA = "TT_LORA"
_MAX_MODES = 16


def _check_tt_modes(name: str, modes: Any) -> Any:
    """None, a count of balanced factors, or the sizes; what a file says is checked here before any use."""
    if modes is None:
        return None
    if isinstance(modes, int) and not isinstance(modes, bool):
        if not 1 <= modes <= _MAX_MODES:
            raise ValueError(f"{name} must be None, an int in [1, {_MAX_MODES}] or a list of sizes, got {modes!r}")
        return modes
    if isinstance(modes, Sequence) and not isinstance(modes, (str, bytes)):
        sizes = list(modes)
        ok = 1 <= len(sizes) <= _MAX_MODES and all(
            isinstance(m, int) and not isinstance(m, bool) and 1 <= m <= 1 << 31 for m in sizes
        )
        if ok:
            return sizes
    raise ValueError(f"{name} must be None, an int in [1, {_MAX_MODES}] or a list of positive sizes, got {modes!r}")


@dataclasses.dataclass
class TTLoraConfig(peft.LoraConfig):
    """``peft.LoraConfig`` plus the TT options of :class:`TTLoraLinear` and the format version of the adapter
    (``tt_format_version``); saved with ``peft_type`` ``"TT_LORA"`` and these fields, so the folder says what it
    holds. In memory ``peft_type`` stays LoRA's (PEFT's LoRA
    machinery runs the layers)."""

    tt_in_modes: Any = None
    tt_out_modes: Any = None
    tt_backend: str = "auto"
    # Version 2 scales by ttkernels.init's rule (lora_alpha / r * sqrt(F)); version 1 (folders saved before the
    # field existed) by lora_alpha / r.
    tt_format_version: int = TT_LORA_FORMAT_VERSION

    @property
    def tt_scaling_rule(self) -> int:
        return 1 if _check_tt_format_version(self.tt_format_version) == 1 else SCALING_RULE

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_tt_format_version(self.tt_format_version)
        self.tt_in_modes = _check_tt_modes("tt_in_modes", self.tt_in_modes)
        self.tt_out_modes = _check_tt_modes("tt_out_modes", self.tt_out_modes)
        ops.check_backend_name(self.tt_backend)
        self._register_tt_layer()

    def _register_tt_layer(self) -> None:
        layer = tt_lora_layer(in_modes=self.tt_in_modes, out_modes=self.tt_out_modes, backend=self.tt_backend)
        self._register_custom_module({nn.Linear: layer})

    def to_dict(self) -> dict:
        return super().to_dict() | {"peft_type": TT_LORA}


def _register_with_peft() -> None:
    """``PeftModel.from_pretrained`` / ``load_adapter`` find the config class of a ``TT_LORA`` folder."""
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING

    PEFT_TYPE_TO_CONFIG_MAPPING.setdefault(TT_LORA, TTLoraConfig)


def tt_lora_folder_config(
    path: str | os.PathLike, *, in_modes: Any = None, out_modes: Any = None, backend: Optional[str] = None
) -> TTLoraConfig:
    """The :class:`TTLoraConfig` of a saved TT-LoRA folder (its TT options from the file; ``in_modes`` /
    ``out_modes`` given here must agree, ``backend`` overrides). Folders saved as ``LORA`` before the TT options
    were recorded take the options given here; a plain LoRA folder is refused. The config and the tensor names
    are checked as :func:`load_tt_lora` checks them (no model: shapes are checked when loading)."""
    if backend is not None:
        ops.check_backend_name(backend)
    folder = checks.check_path(path, "path")
    if not os.path.isdir(folder):
        raise ValueError(f"path must be a local folder holding {_PEFT_CONFIG} and {_PEFT_WEIGHTS}, got {folder!r}")
    return _check_tt_lora_folder(None, folder, in_modes, out_modes, backend)["config"]


_register_with_peft()


# ------------------------------------------------------------------------------------------------ mixed-adapter batches
def _refuse_mixed_batches() -> None:
    """PEFT checks ``adapter_names`` against ``lora_A``, which TT layers leave empty, and would report the TT
    adapters as non-existing: say what the limit is instead."""
    from peft.tuners.lora.model import LoraModel

    original = LoraModel._enable_peft_forward_hooks
    if getattr(original, "_ttkernels", False):
        return

    @contextlib.contextmanager
    def hooks(self: Any, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("adapter_names") is not None and any(isinstance(m, TTLoraLinear) for m in self.modules()):
            raise ValueError(
                "adapter_names= (a mixed-adapter batch) is not supported with ttkernels TT-LoRA layers: a "
                "TTLoraLinear applies its active adapters to the whole batch. Run one batch per adapter "
                "(set_adapter), or export each adapter with ttkernels.peft.export_lora for a multi-LoRA server"
            )
        with original(self, *args, **kwargs):
            yield

    hooks._ttkernels = True
    LoraModel._enable_peft_forward_hooks = hooks


_refuse_mixed_batches()


# ------------------------------------------------------------------------------------------------ export
@torch.no_grad()
def export_lora(
    peft_model: peft.PeftModel, save_directory: str | os.PathLike, *, adapter_names: Optional[list[str]] = None
) -> list[str]:
    """Write each TT-LoRA adapter of ``peft_model`` as a plain PEFT LoRA folder with the same delta-W (rank = the
    TT's bottleneck rank, ``rank_pattern`` where layers differ, the scaling folded into ``lora_B`` with
    ``lora_alpha = r``); ``modules_to_save`` go along. ``default`` goes to ``save_directory``, other adapters to
    ``save_directory/<name>`` (PEFT's layout). Stock PEFT loads the folders without ttkernels. Returns them."""
    from .export import lora_factors, write_lora_folder

    if not isinstance(peft_model, peft.PeftModel):
        raise TypeError(f"peft_model must be a peft.PeftModel, got {type(peft_model).__name__}")
    names = list(peft_model.peft_config) if adapter_names is None else list(adapter_names)
    unknown = sorted(set(names) - set(peft_model.peft_config))
    if unknown:
        raise ValueError(f"no adapters {unknown}; the model has {sorted(peft_model.peft_config)}")
    inner = peft_model.get_base_model()
    written = []
    for a in names:
        factors = {}
        for name, module in inner.named_modules():
            if isinstance(module, TTLoraLinear) and a in module.lora_tt_cores:
                spec = module.tt_spec[a]
                factors[name] = lora_factors(list(module.lora_tt_cores[a]), spec, scaling=float(module.scaling[a]))
            elif isinstance(module, LoraLayer) and a in getattr(module, "lora_A", {}):
                raise ValueError(f"export_lora writes TT-LoRA layers; {name} is a {type(module).__name__} of PEFT")
        if not factors:
            raise ValueError(f"adapter {a!r} has no TT-LoRA layers")
        state = peft.get_peft_model_state_dict(peft_model, adapter_name=a)
        extra = {k: v for k, v in state.items() if ".lora_tt_cores." not in k}
        cfg = peft_model.peft_config[a]
        folder = str(save_directory) if a == "default" else os.path.join(save_directory, a)
        write_lora_folder(
            folder, factors, modules_to_save=list(cfg.modules_to_save) if cfg.modules_to_save else None,
            extra_tensors=extra, task_type=cfg.task_type, base_model_name_or_path=cfg.base_model_name_or_path,
        )  # fmt: skip
        written.append(folder)
    return written
