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
import json
import os
import warnings
from typing import Any, Optional

import peft
import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from . import ops, reference
from .init import SCALING_RULE, adapter_scaling
from .metatt import MetaTTConfig, MetaTTModel, get_metatt_model
from .modules import TTLinear

__all__ = ["TTLoraConfig", "TTLoraLinear", "get_peft_model", "load_tt_lora", "tt_lora_config", "tt_lora_layer"]

TT_LORA_FORMAT_VERSION = 2  # saved in adapter_config.json; absent: 1, saved under scaling rule 1


@dataclasses.dataclass
class TTLoraConfig(peft.LoraConfig):
    """``peft.LoraConfig`` plus the format version of the TT adapter it saves (``tt_format_version``, written
    to ``adapter_config.json``; PEFT itself ignores it). Version 2 scales by :mod:`ttkernels.init`'s rule 2,
    version 1 (folders saved before the field existed) by ``lora_alpha / r``."""

    tt_format_version: int = TT_LORA_FORMAT_VERSION

    @property
    def tt_scaling_rule(self) -> int:
        v = self.tt_format_version
        if type(v) is not int or not 1 <= v <= TT_LORA_FORMAT_VERSION:
            raise ValueError(f"tt_format_version must be an int from 1 to {TT_LORA_FORMAT_VERSION}, got {v!r}")
        return 1 if v == 1 else SCALING_RULE


def _tt_config(config: peft.LoraConfig, version: int = TT_LORA_FORMAT_VERSION) -> TTLoraConfig:
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(peft.LoraConfig) if f.init}
    return TTLoraConfig(**fields, tt_format_version=version)


class TTLoraLinear(nn.Module, LoraLayer):
    """A PEFT LoRA layer on an ``nn.Linear`` whose delta-W is a TT adapter (``r`` = every bond rank).

    Only the cores are registered (``lora_tt_cores[adapter]``), so PEFT saves, loads and trains them alone;
    the base layer is PEFT's ``base_layer``. ``scaling = lora_alpha / r * sqrt(F)`` (``/ sqrt(r)`` with
    rslora), ``F = d_out / s_K`` (1 for one out mode: LoRA's scaling; :mod:`ttkernels.init`).
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
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kw)

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, config: peft.LoraConfig, **kw) -> None:
        base = self.get_base_layer()
        if not isinstance(base, nn.Linear) or config.fan_in_fan_out:
            raise TypeError(f"TTLoraLinear adapts nn.Linear layers, got {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r must be a positive int, got {r!r}")
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
        self.tt_scaling[adapter_name] = adapter_scaling(lora_alpha, tt.spec, rule=rule, rslora=config.use_rslora)
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
            return base(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.lora_tt_cores]
        dropout = lambda a: self.tt_dropout[a] if self.training else 0.0
        if len(active) == 1 and type(base) is nn.Linear and not args and not kwargs:
            a = active[0]  # the fused op: one call, delta-W never formed
            cores = list(self.lora_tt_cores[a])
            return ops.tt_linear(
                x, base.weight, base.bias, cores, self.tt_spec[a], scaling=self.scaling[a], dropout=dropout(a),
                backend=self.tt_backend,
            )  # fmt: skip
        result = base(x, *args, **kwargs)
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

    @torch.no_grad()
    def _add_delta(self, adapter: str, sign: float, safe: bool = False) -> None:
        w = self.get_base_layer().weight
        acc = torch.float64 if w.dtype == torch.float64 else torch.float32
        new = w.to(acc) + sign * self.get_delta_weight(adapter).to(w.device, acc)
        if safe and not torch.isfinite(new).all():
            raise ValueError(f"merging adapter {adapter!r} gives non-finite weights")
        w.copy_(new.to(w.dtype))

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        for a in check_adapters_to_merge(self, adapter_names):
            if a in self.lora_tt_cores:
                self._add_delta(a, +1.0, safe_merge)
                self.merged_adapters.append(a)

    def unmerge(self) -> None:
        while self.merged_adapters:
            a = self.merged_adapters.pop()
            if a in self.lora_tt_cores:
                self._add_delta(a, -1.0)

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


def load_tt_lora(
    model: nn.Module, path: str, *, in_modes: Any = None, out_modes: Any = None, backend: str = "auto", **kwargs: Any
) -> peft.PeftModel:
    """``PeftModel.from_pretrained`` for an adapter saved from a :func:`tt_lora_config` model; the TT options
    must be the ones it was trained with (the core shapes are checked on load). A folder saved before
    ``tt_format_version`` existed loads with the scaling it was trained with (``lora_alpha / r``)."""
    version = _saved_format_version(path)
    with warnings.catch_warnings():  # PEFT reads the file again and drops the field it does not know
        warnings.filterwarnings("ignore", message=r"Unexpected keyword arguments \['tt_format_version'\]")
        lora = peft.LoraConfig.from_pretrained(path)
    cfg = tt_lora_config(in_modes=in_modes, out_modes=out_modes, backend=backend, config=lora)
    cfg.tt_format_version = version
    loaded = peft.PeftModel.from_pretrained(model, path, config=cfg, **kwargs)
    for module in loaded.modules():
        if isinstance(module, TTLoraLinear):
            for a, cores in module.lora_tt_cores.items():
                reference._check_cores(list(cores), module.tt_spec[a])
    return loaded


def _saved_format_version(path: str) -> int:
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter_config.json in {path}")
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not a readable JSON file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    version = data.get("tt_format_version", 1)
    if type(version) is not int or not 1 <= version <= TT_LORA_FORMAT_VERSION:
        raise ValueError(f"{file} has tt_format_version {version!r}; this version reads 1 to {TT_LORA_FORMAT_VERSION}")
    return version


def get_peft_model(model: nn.Module, config: Any, **kwargs: Any) -> MetaTTModel | peft.PeftModel:
    """MetaTT for a :class:`~ttkernels.metatt.MetaTTConfig`, ``peft.get_peft_model`` for any other config."""
    if isinstance(config, MetaTTConfig):
        if kwargs:
            raise TypeError(f"get_peft_model with a MetaTTConfig takes no keyword arguments, got {sorted(kwargs)}")
        return get_metatt_model(model, config)
    return peft.get_peft_model(model, config, **kwargs)
