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
import json
import math
import os
from collections.abc import Sequence
from typing import Any, Optional

import peft
import torch
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from . import ops, reference
from .metatt import MetaTTConfig, MetaTTModel, get_metatt_model
from .modules import TTLinear

__all__ = [
    "TTLoraConfig",
    "TTLoraLinear",
    "export_lora",
    "get_peft_model",
    "load_tt_lora",
    "tt_lora_config",
    "tt_lora_layer",
]


class TTLoraLinear(nn.Module, LoraLayer):
    """A PEFT LoRA layer on an ``nn.Linear`` whose delta-W is a TT adapter (``r`` = every bond rank).

    Only the cores are registered (``lora_tt_cores[adapter]``), so PEFT saves, loads and trains them alone;
    the base layer is PEFT's ``base_layer``. ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with rslora), as LoRA.
    """

    adapter_layer_names = LoraLayer.adapter_layer_names + ("lora_tt_cores",)
    other_param_names = LoraLayer.other_param_names + ("tt_spec", "tt_dropout")
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
        self.scaling[adapter_name] = lora_alpha / (math.sqrt(r) if config.use_rslora else r)
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
        return TTLoraConfig(**fields, **tt)
    return TTLoraConfig(**lora_kwargs, **tt)


def load_tt_lora(
    model: nn.Module,
    path: str,
    *,
    in_modes: Any = None,
    out_modes: Any = None,
    backend: Optional[str] = None,
    **kwargs: Any,
) -> peft.PeftModel:
    """``PeftModel.from_pretrained`` for an adapter saved from a :func:`tt_lora_config` model. The folder records
    its TT options; ``in_modes`` / ``out_modes``, when given, must agree with them, and ``backend`` overrides the
    saved one. A plain PEFT LoRA folder is refused (load it with ``peft.PeftModel.from_pretrained``)."""
    cfg = tt_lora_folder_config(path, in_modes=in_modes, out_modes=out_modes, backend=backend)
    try:
        loaded = peft.PeftModel.from_pretrained(model, path, config=cfg, **kwargs)
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        raise ValueError(
            f"the cores saved in {path} do not fit its TT options (tt_in_modes={cfg.tt_in_modes!r}, "
            f"tt_out_modes={cfg.tt_out_modes!r}) on this model: {e}"
        ) from e
    for module in loaded.modules():
        if isinstance(module, TTLoraLinear):
            for a, cores in module.lora_tt_cores.items():
                reference._check_cores(list(cores), module.tt_spec[a])
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
_MAX_CONFIG_BYTES = 1 << 20


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
    """``peft.LoraConfig`` plus the TT options of :class:`TTLoraLinear`; saved with ``peft_type`` ``"TT_LORA"``
    and these fields, so the folder says what it holds. In memory ``peft_type`` stays LoRA's (PEFT's LoRA
    machinery runs the layers)."""

    tt_in_modes: Any = None
    tt_out_modes: Any = None
    tt_backend: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
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


def _read_adapter_config(path: str | os.PathLike) -> dict:
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter_config.json in {path}")
    if os.path.getsize(file) > _MAX_CONFIG_BYTES:
        raise ValueError(f"{file} is larger than {_MAX_CONFIG_BYTES} bytes: not an adapter config")
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not a readable JSON file: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{file} does not hold a JSON object")
    return data


def _weight_names(path: str | os.PathLike) -> list[str]:
    from safetensors import SafetensorError, safe_open

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter_model.safetensors in {path}")
    try:
        with safe_open(file, framework="pt") as f:  # the header only
            return list(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{file} is not a valid safetensors file: {e}") from e


def tt_lora_folder_config(
    path: str | os.PathLike, *, in_modes: Any = None, out_modes: Any = None, backend: Optional[str] = None
) -> TTLoraConfig:
    """The :class:`TTLoraConfig` of a saved TT-LoRA folder (its TT options from the file; ``in_modes`` /
    ``out_modes`` given here must agree, ``backend`` overrides). Folders saved as ``LORA`` before the TT options
    were recorded load when their weights are TT cores and the modes are given; a plain LoRA folder is refused."""
    if backend is not None:
        ops.check_backend_name(backend)
    data = _read_adapter_config(path)
    kind = data.get("peft_type")
    if kind == TT_LORA:
        cfg = TTLoraConfig.from_pretrained(str(path))
        for name, given, saved in (("in_modes", in_modes, cfg.tt_in_modes), ("out_modes", out_modes, cfg.tt_out_modes)):
            if given is not None and _check_tt_modes(name, given) != saved:
                raise ValueError(f"{path} was saved with tt_{name}={saved!r}, but {name}={given!r} was given")
        if backend is not None and backend != cfg.tt_backend:
            cfg.tt_backend = backend
            cfg._register_tt_layer()
        return cfg
    if kind == "LORA":
        names = _weight_names(path)
        if (
            names
            and all(".lora_tt_cores." in n for n in names if ".lora_" in n)
            and any(".lora_tt_cores." in n for n in names)
        ):
            # saved as LORA before folders recorded their TT options: the caller gives them
            return tt_lora_config(
                in_modes=in_modes, out_modes=out_modes, backend=backend or "auto",
                config=peft.LoraConfig.from_pretrained(str(path)),
            )  # fmt: skip
        raise ValueError(
            f"{path} holds a plain PEFT LoRA adapter (peft_type LORA, lora_A / lora_B weights), not a TT-LoRA one: "
            "load it with peft.PeftModel.from_pretrained"
        )
    raise ValueError(f"{path} holds a {kind!r} adapter, not a TT-LoRA one (peft_type {TT_LORA!r})")


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
    from .export import write_lora_folder
    from .rank import to_lora

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
                factors[name] = to_lora(list(module.lora_tt_cores[a]), spec, scaling=module.scaling[a])
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
