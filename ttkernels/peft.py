"""ttkernels from PEFT: TT adapters through PEFT's LoRA custom-module route, and MetaTT for PEFT-style code.

Two entry points:

* :func:`tt_lora_config` — a ``peft.LoraConfig`` whose ``nn.Linear`` targets become :class:`TTLoraLinear`
  layers: PEFT's LoRA machinery (``get_peft_model``, ``print_trainable_parameters``, ``save_pretrained``,
  ``disable_adapter``, ``merge_and_unload``, several adapters) with a tensor-train delta-W of bond rank ``r``
  computed by the ttkernels ops (delta-W is never built in forward). Reload with :func:`load_tt_lora`: PEFT
  does not save the custom-module registration, so loading must be told again.
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

import dataclasses
import math
import os
import re
import warnings
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
    register_merge_hooks,
)
from .metatt import MetaTTConfig, MetaTTModel, get_metatt_model
from .modules import TTLinear
from .spec import TTSpec

__all__ = ["TTLoraConfig", "TTLoraLinear", "get_peft_model", "load_tt_lora", "tt_lora_config", "tt_lora_layer"]

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


@dataclasses.dataclass
class TTLoraConfig(peft.LoraConfig):
    """``peft.LoraConfig`` plus the format version of the TT adapter it saves (``tt_format_version``, written
    to ``adapter_config.json``; PEFT itself ignores it). Version 2 scales by :mod:`ttkernels.init`'s rule
    (``lora_alpha / r * sqrt(F)``), version 1 (folders saved before the field existed) by ``lora_alpha / r``."""

    tt_format_version: int = TT_LORA_FORMAT_VERSION

    @property
    def tt_scaling_rule(self) -> int:
        return 1 if _check_tt_format_version(self.tt_format_version) == 1 else SCALING_RULE


def _tt_config(config: peft.LoraConfig, version: int = TT_LORA_FORMAT_VERSION) -> TTLoraConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(peft.LoraConfig) if f.init}
    return TTLoraConfig(**fields, tt_format_version=version)


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
    """A :class:`TTLoraConfig` (a ``peft.LoraConfig``, built from ``lora_kwargs`` or copied from ``config``)
    whose ``nn.Linear`` targets get TT adapters: ``r`` is the TT's bond rank, ``lora_alpha`` /
    ``lora_dropout`` as in LoRA."""
    if config is not None and lora_kwargs:
        raise ValueError("pass either config or LoraConfig keyword arguments, not both")
    if config is not None:  # a TTLoraConfig keeps its format version, a plain LoraConfig gets this one
        cfg = _tt_config(config, getattr(config, "tt_format_version", TT_LORA_FORMAT_VERSION))
    else:
        cfg = TTLoraConfig(**lora_kwargs)
    cfg._register_custom_module({nn.Linear: tt_lora_layer(in_modes=in_modes, out_modes=out_modes, backend=backend)})
    return cfg


_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = "adapter_model.safetensors"
# LoRA config fields a TT-LoRA layer has no use for: refused when a file sets them (they would change the model)
_UNSUPPORTED_FIELDS = (
    "alora_invocation_tokens", "arrow_config", "corda_config", "eva_config", "fan_in_fan_out", "kasa_config",
    "layer_replication", "loftq_config", "lora_bias", "lora_ga_config", "megatron_config", "monteclora_config",
    "target_parameters", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora", "velora_config",
)  # fmt: skip
_CORE_KEY = re.compile(r"base_model\.model\.(.+)\.lora_tt_cores\.(\d{1,4})")  # fixed here, never from a file


def _names_match(name: str, targets: Any) -> bool:
    """PEFT's rule for a list of names (the name, or a suffix after a dot), without regular expressions."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_tt_lora_folder(model: nn.Module, folder: str, in_modes: Any, out_modes: Any) -> dict:
    """Every field :func:`load_tt_lora` uses from ``folder``'s config, and every tensor of its safetensors file
    (names, shapes and dtypes from the header, then finite values), checked against ``model`` before PEFT
    builds anything. Returns the literal targets and per-module ranks and alphas for the PEFT config."""
    config_file = os.path.join(folder, _PEFT_CONFIG)
    data = checks.read_json(config_file, "adapter config")

    def fail(field: str, want: str) -> ValueError:
        return ValueError(f"{config_file}: {field} must be {want}, got {str(data.get(field))[:200]}")

    if data.get("peft_type") != "LORA":
        raise fail("peft_type", "'LORA' (a TT-LoRA adapter is saved as a LoRA config)")
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
    found: dict[str, dict[int, checks.TensorInfo]] = {}
    for key, info in header.items():
        m = _CORE_KEY.fullmatch(key)
        if m is not None:
            found.setdefault(m.group(1), {})[int(m.group(2))] = info
        elif key.endswith(".bias") and data.get("bias", "none") != "none":
            continue  # biases PEFT trains and saves with bias="all" / "lora_only"
        elif not _names_match(key.removeprefix("base_model.model.").rpartition(".")[0], saved_modules):
            raise ValueError(f"{weights}: tensor {key[:200]!r} is not a TT-LoRA core (<module>.lora_tt_cores.<k>)")
    if not found:
        raise ValueError(f"{weights} holds no TT-LoRA cores")
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
                f"(missing {missing}, unexpected {extra})"
            )
        for k, shape in enumerate(spec.core_shapes):
            info = cores[k]
            if info.shape != shape:
                raise ValueError(
                    f"{weights}: core {k} of {name} has shape {info.shape}, but r = {ranks[name]}, in_modes = "
                    f"{in_modes!r}, out_modes = {out_modes!r} need {shape} (pass the options it was trained with)"
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
    return {"targets": sorted(found), "ranks": ranks, "alphas": alphas, "tt_format_version": tt_format_version}


def load_tt_lora(
    model: nn.Module, path: str, *, in_modes: Any = None, out_modes: Any = None, backend: str = "auto", **kwargs: Any
) -> peft.PeftModel:
    """``PeftModel.from_pretrained`` for an adapter saved from a :func:`tt_lora_config` model; the TT options
    must be the ones it was trained with. A folder saved before ``tt_format_version`` existed loads with the
    scaling it was trained with (``lora_alpha / r``).

    ``path`` is a local folder. Its config and its tensors' names, shapes and dtypes (from the safetensors
    header) are checked against ``model`` before anything is built, the cores' values are checked finite,
    and targets are taken as the literal module names the file holds cores for (no pattern from the file is
    used as a regular expression). All or nothing: when loading fails, ``model`` is left as it was.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    ops.check_backend_name(backend)
    folder = checks.check_path(path, "path")
    if not os.path.isdir(folder):
        raise ValueError(f"path must be a local folder holding {_PEFT_CONFIG} and {_PEFT_WEIGHTS}, got {folder!r}")
    plan = _check_tt_lora_folder(model, folder, in_modes, out_modes)
    with warnings.catch_warnings():  # PEFT's LoraConfig does not know the field and says so
        warnings.filterwarnings("ignore", message=r"Unexpected keyword arguments \['tt_format_version'\]")
        lora = peft.LoraConfig.from_pretrained(folder)
    cfg = tt_lora_config(in_modes=in_modes, out_modes=out_modes, backend=backend, config=lora)
    cfg.tt_format_version = plan["tt_format_version"]
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
