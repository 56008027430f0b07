"""MetaTT: one shared tensor train adapts every targeted matrix of a model.

Every targeted linear map ``d_in -> d_out`` of the model becomes a :class:`MetaTTLinear`, a view onto the cores
of its group's TT at fixed ``(layer, matrix)`` indices. The TT's modes, in order, are

    in (d_in), then the index modes of ``MetaTTConfig.modes`` in the given order
    (``layer``, ``matrix``, ``task``), then the out modes: ``head`` and ``d_out / head`` with ``"head"``,
    else ``d_out``

so the default is MetaTT-4D, ``(in, layer, matrix, out)``; ``"head"`` gives MetaTT-5D and ``"task"`` a task
mode chosen per sample. Its parameter count grows with the sum of the mode sizes, not their product.

**Groups.** Modules of different shapes cannot share one TT (their in and out modes differ), so there is one
shared TT per ``(in_features, out_features)`` pair: in a LLaMA with grouped-query attention, ``q_proj`` /
``o_proj`` (``d x d``), ``k_proj`` / ``v_proj`` (``d x d_kv``), ``up_proj`` / ``gate_proj`` (``d x d_ff``) and
``down_proj`` (``d_ff x d``) make four groups. A group's ``matrix`` mode counts the distinct matrix names in
it (``self_attn.q_proj`` and ``self_attn.o_proj``: 2); every group's ``layer`` mode counts all layers.

**Structure from names.** The layer index is the first integer component of a target's name
(``model.layers.3.self_attn.q_proj`` -> 3, ``encoder.layer.3.attention.self.query`` -> 3,
``transformer.h.3.attn.c_attn`` -> 3); the matrix is the rest of the name after it. A target without an integer
component cannot be placed and is refused with its name. Targets are ``nn.Linear`` or transformers' ``Conv1D``
(GPT-2's, whose weight is stored transposed); anything else is refused.

**Sharing.** The cores are Parameters owned by the wrapper (``metatt_cores``) and registered as-is in every
view, so gradients from every site accumulate into them; nothing is copied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import ops
from .init import RULES, SCALING_RULE, adapter_scaling
from .modules import TTLinear, new_cores
from .spec import Mode, TTSpec

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "MetaTTConfig",
    "MetaTTLinear",
    "MetaTTModel",
    "get_metatt_model",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "ttkernels-metatt"
FORMAT_VERSION = 2  # 2: the config records its scaling rule (ttkernels.init); 1 was saved under rule 1
MODE_NAMES = ("layer", "matrix", "head", "task")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass
class MetaTTConfig:
    """What to adapt and how.

    Args:
        target_modules: module-name suffixes (``["q_proj", "v_proj"]`` matches ``...self_attn.q_proj``), or a
            regular expression matched against the whole module name (as PEFT does).
        rank: one bond rank for every bond, or one per bond (``num_cores - 1`` entries).
        alpha: ``scaling = alpha / max(rank) * sqrt(F)``, ``F`` = the group's targets times ``d_out`` over the
            last mode's size (:mod:`ttkernels.init`: an Adam step then moves each site as LoRA's does at the
            same ``alpha``, rank and learning rate); None: scaling 1.
        modes: the index modes between in and out, in order: ``"layer"``, ``"matrix"``, and optionally
            ``"task"`` (with ``num_tasks``) and ``"head"`` (with ``num_heads``; it splits the out mode into
            ``(num_heads, out / num_heads)``, wherever it stands in ``modes``).
        num_tasks: the size of the ``task`` mode; each sample picks its task with ``task_ids``.
        num_heads: the size of the ``head`` mode.
        dropout: dropout on the adapter's input, in ``[0, 1)``.
        backend: the ops backend of every view (``ttkernels.ops``).
        adapter_dtype: dtype of the cores, a name (``"float32"``, ...); None: float32, or float64 for float64
            models.
    """

    target_modules: Any
    rank: Any = 8
    alpha: Optional[float] = None
    modes: Sequence[str] = ("layer", "matrix")
    num_tasks: Optional[int] = None
    num_heads: Optional[int] = None
    dropout: float = 0.0
    backend: str = "auto"
    adapter_dtype: Optional[str] = None

    def __post_init__(self) -> None:
        tm = self.target_modules
        if isinstance(tm, str):
            if not tm:
                raise ValueError("target_modules is an empty string")
            try:
                re.compile(tm)
            except re.error as e:
                raise ValueError(f"target_modules {tm!r} is not a valid regular expression: {e}") from e
        else:
            if isinstance(tm, (bytes, dict)) or not isinstance(tm, Sequence) or not tm:
                raise TypeError(f"target_modules must be a non-empty list of names or a regex string, got {tm!r}")
            if not all(isinstance(t, str) and t for t in tm):
                raise TypeError(f"target_modules must hold non-empty strings, got {list(tm)!r}")
            self.target_modules = list(tm)
        ranks = [self.rank] if isinstance(self.rank, int) else self.rank
        if isinstance(ranks, (str, bytes)) or not isinstance(ranks, Sequence) or not ranks:
            raise TypeError(f"rank must be an int or a list of ints, got {self.rank!r}")
        for r in ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rank must be a positive int or a list of them, got {self.rank!r}")
        if not isinstance(self.rank, int):
            self.rank = list(self.rank)
        if isinstance(self.modes, str) or not isinstance(self.modes, Sequence):
            raise TypeError(f"modes must be a sequence of mode names, got {self.modes!r}")
        self.modes = tuple(self.modes)
        for m in self.modes:
            if m not in MODE_NAMES:
                raise ValueError(f"modes may hold {MODE_NAMES}, got {m!r}")
        if len(set(self.modes)) != len(self.modes):
            raise ValueError(f"modes has a repeated name: {self.modes}")
        for name, field, mode in (("num_tasks", self.num_tasks, "task"), ("num_heads", self.num_heads, "head")):
            if mode in self.modes:
                if isinstance(field, bool) or not isinstance(field, int) or field < 1:
                    raise ValueError(f"modes has {mode!r}: {name} must be a positive int, got {field!r}")
            elif field is not None:
                raise ValueError(f"{name} = {field!r} was given but modes {self.modes} has no {mode!r}")
        if self.alpha is not None:
            if (
                isinstance(self.alpha, bool)
                or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha)
            ):
                raise ValueError(f"alpha must be a finite number or None, got {self.alpha!r}")
            self.alpha = float(self.alpha)
        self.dropout = ops.check_dropout(self.dropout)
        ops.check_backend_name(self.backend)
        if self.adapter_dtype is not None and self.adapter_dtype not in _DTYPES:
            raise ValueError(f"adapter_dtype must be one of {sorted(_DTYPES)} or None, got {self.adapter_dtype!r}")

    @property
    def max_rank(self) -> int:
        return self.rank if isinstance(self.rank, int) else max(self.rank)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"modes": list(self.modes)}

    @classmethod
    def from_dict(cls, data: dict) -> MetaTTConfig:
        if not isinstance(data, dict):
            raise ValueError(f"a MetaTT config must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown MetaTT config fields {unknown}")
        if "target_modules" not in data:
            raise ValueError("the MetaTT config has no target_modules")
        return cls(**data)


# ------------------------------------------------------------------------------------------------ the views
class _Routing:
    """Per-call state the wrapper shares with its views: the current batch's task ids."""

    def __init__(self) -> None:
        self.task_ids: Optional[Tensor] = None


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2): weight (in, out), y = x W + b; not imported, so transformers
    # stays optional.
    return (
        type(module).__name__ == "Conv1D"
        and hasattr(module, "nf")
        and isinstance(getattr(module, "weight", None), Tensor)
    )


class MetaTTLinear(TTLinear):
    """A :class:`TTLinear` view onto a group's shared cores at fixed ``(layer, matrix)``; the task ids of a
    multi-task adapter come from the wrapper's call (``MetaTTModel.forward(..., task_ids=)``)."""

    @classmethod
    def wrap(
        cls,
        base: nn.Module,
        cores: nn.ParameterList,
        spec: TTSpec,
        index: dict[str, int],
        *,
        alpha: float,
        dropout: float,
        backend: str,
        routing: _Routing,
    ) -> MetaTTLinear:
        if isinstance(base, nn.Linear):
            self = cls.from_cores(base, cores, spec, index=index, alpha=alpha, dropout=dropout, backend=backend)
        elif _is_conv1d(base):
            d_in, d_out = base.weight.shape
            shim = nn.Linear(d_in, d_out, bias=False, device="meta")
            self = cls.from_cores(shim, cores, spec, index=index, alpha=alpha, dropout=dropout, backend=backend)
            # the Conv1D's own Parameters, under the names it gives them (state dicts keep their keys)
            base.weight.requires_grad_(False)
            self.weight = base.weight
            self._weight_transposed = True
            if base.bias is not None:
                base.bias.requires_grad_(False)
            self.bias = base.bias
        else:
            raise TypeError(f"cannot adapt a {type(base).__name__}: MetaTT targets nn.Linear or Conv1D layers")
        self.__dict__["_base_module"] = base  # what unload() puts back (its Parameters are self's)
        self.__dict__["_routing"] = routing
        return self

    @property
    def base_module(self) -> nn.Module:
        return self.__dict__["_base_module"]

    def forward(self, x: Tensor, task_ids: Optional[Tensor] = None) -> Tensor:
        if task_ids is None and self.spec.per_sample_mode is not None:
            task_ids = self.__dict__["_routing"].task_ids
        return super().forward(x, task_ids)


# ------------------------------------------------------------------------------------------------ targets
def _matches(name: str, targets: Any) -> bool:
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


_LAYER = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _place(name: str) -> tuple[int, str]:
    """``(layer, matrix name)`` from a module name; ValueError when it has no layer number."""
    m = _LAYER.search(name)
    if m is None or m.end() >= len(name):
        raise ValueError(
            f"cannot place target {name!r}: MetaTT needs a layer number in the module name "
            "(as in model.layers.N.self_attn.q_proj, encoder.layer.N.attention.self.query, transformer.h.N.attn.c_attn)"
        )
    return int(m.group(1)), name[m.end() :]


def _features(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    d_in, d_out = module.weight.shape
    return int(d_in), int(d_out)


@dataclasses.dataclass
class _Target:
    name: str
    group: str
    layer: int
    matrix: int


@dataclasses.dataclass
class _Group:
    name: str
    in_features: int
    out_features: int
    matrices: list[str]
    spec: TTSpec

    def describe(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "matrices": list(self.matrices),
            "modes": self.spec.describe(),
            "core_shapes": [list(s) for s in self.spec.core_shapes],
        }


def _plan(model: nn.Module, config: MetaTTConfig) -> tuple[dict[str, _Group], list[_Target], int]:
    found = []
    for name, module in model.named_modules():
        if not name or not _matches(name, config.target_modules):
            continue
        if isinstance(module, MetaTTLinear):
            raise ValueError(f"{name} is already a MetaTT view: the model has a MetaTT adapter")
        if not isinstance(module, nn.Linear) and not _is_conv1d(module):
            raise TypeError(
                f"target {name!r} is a {type(module).__name__}; MetaTT adapts nn.Linear and Conv1D layers only"
            )
        layer, matrix = _place(name)
        found.append((name, module, layer, matrix))
    if not found:
        raise ValueError(f"no module of the model matches target_modules {config.target_modules!r}")
    num_layers = max(f[2] for f in found) + 1
    by_shape: dict[tuple[int, int], list[str]] = {}
    for _, module, _, matrix in found:
        mats = by_shape.setdefault(_features(module), [])
        if matrix not in mats:
            mats.append(matrix)
    groups: dict[str, _Group] = {}
    for (d_in, d_out), mats in by_shape.items():
        index_modes, out_sizes = [], (d_out,)
        for mode in config.modes:
            if mode == "layer":
                index_modes.append(Mode.index("layer", num_layers))
            elif mode == "matrix":
                index_modes.append(Mode.index("matrix", len(mats)))
            elif mode == "task":
                index_modes.append(Mode.task(config.num_tasks))
            elif mode == "head":
                if d_out % config.num_heads:
                    raise ValueError(
                        f"modes has 'head' with num_heads = {config.num_heads}, but the {d_in} -> {d_out} targets "
                        f"({', '.join(mats)}) have {d_out} outputs, not a multiple of it"
                    )
                out_sizes = (config.num_heads, d_out // config.num_heads)
        spec = TTSpec.build((d_in,), out_sizes, config.rank, index_modes=index_modes)
        name = f"{d_in}x{d_out}"
        groups[name] = _Group(name, d_in, d_out, mats, spec)
    targets = []
    for name, module, layer, matrix in found:
        group = groups["{}x{}".format(*_features(module))]
        targets.append(_Target(name, group.name, layer, group.matrices.index(matrix)))
    return groups, targets, num_layers


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ------------------------------------------------------------------------------------------------ wrapper
class MetaTTModel(nn.Module):
    """A model with a MetaTT adapter: ``forward`` passes through to the model (``task_ids=`` routes each sample
    to its task slice). Build it with :func:`get_metatt_model` or :meth:`from_pretrained`."""

    def __init__(self, model: nn.Module, config: MetaTTConfig) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, MetaTTConfig):
            raise TypeError(f"config must be a MetaTTConfig, got {type(config).__name__}")
        groups, targets, num_layers = _plan(model, config)
        self.config = config
        self.groups = groups
        self.targets = targets
        self.num_layers = num_layers
        self._routing = _Routing()
        for p in model.parameters():
            p.requires_grad_(False)
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else None
        if config.adapter_dtype is not None:
            dtype = _DTYPES[config.adapter_dtype]
        else:
            dtype = torch.float64 if first is not None and first.dtype == torch.float64 else torch.float32
        # registered before the model, so named_parameters() names the cores here, once
        self.metatt_cores = nn.ModuleDict({g.name: new_cores(g.spec, device, dtype) for g in groups.values()})
        self.model = model
        self.alpha = float(config.max_rank if config.alpha is None else config.alpha)
        self.scaling_rule = SCALING_RULE
        for t in targets:
            base = model.get_submodule(t.name)
            view = MetaTTLinear.wrap(
                base,
                self.metatt_cores[t.group],
                groups[t.group].spec,
                {k: v for k, v in (("layer", t.layer), ("matrix", t.matrix)) if k in config.modes},
                alpha=self.alpha,
                dropout=config.dropout,
                backend=config.backend,
                routing=self._routing,
            )
            view.scaling = self.group_scaling(t.group)
            _set_submodule(model, t.name, view)

    def group_scaling(self, group: str) -> float:
        """The scaling of every view of ``group`` (:func:`ttkernels.init.adapter_scaling` with the group's
        number of targets as its sites, under this adapter's ``scaling_rule``)."""
        sites = sum(t.group == group for t in self.targets)
        return adapter_scaling(self.config.alpha, self.groups[group].spec, sites=sites, rule=self.scaling_rule)

    def _set_scaling_rule(self, rule: int) -> None:
        self.scaling_rule = rule
        for t in self.targets:
            self.model.get_submodule(t.name).scaling = self.group_scaling(t.group)

    # -------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, task_ids: Optional[Tensor] = None, **kwargs: Any) -> Any:
        self._routing.task_ids = self._check_task_ids(task_ids)
        try:
            return self.model(*args, **kwargs)
        finally:
            self._routing.task_ids = None

    def _check_task_ids(self, task_ids: Optional[Tensor]) -> Optional[Tensor]:
        num_tasks = self.config.num_tasks
        if num_tasks is None:
            if task_ids is not None:
                raise ValueError("task_ids was given but this MetaTT adapter has no 'task' mode")
            return None
        if task_ids is None:
            if self._views_disabled():
                return None
            raise ValueError(f"this MetaTT adapter has a 'task' mode ({num_tasks} tasks): pass task_ids")
        if not isinstance(task_ids, Tensor):
            raise TypeError(f"task_ids must be an integer tensor, got {type(task_ids).__name__}")
        if task_ids.dtype.is_floating_point or task_ids.dtype.is_complex or task_ids.dtype == torch.bool:
            raise TypeError(f"task_ids must be an integer tensor, got {task_ids.dtype}")
        if task_ids.dim() != 1:
            raise ValueError(f"task_ids must be 1-D (one id per sample), got shape {tuple(task_ids.shape)}")
        if task_ids.numel() and not torch.compiler.is_compiling():
            lo, hi = int(task_ids.min()), int(task_ids.max())
            if lo < 0 or hi >= num_tasks:
                raise IndexError(f"task_ids must lie in [0, {num_tasks}), got values from {lo} to {hi}")
        return task_ids

    def views(self) -> Iterator[tuple[str, MetaTTLinear]]:
        for t in self.targets:
            yield t.name, self.model.get_submodule(t.name)

    def _views_disabled(self) -> bool:
        return all(v._disabled for _, v in self.views())

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[MetaTTModel]:
        """Within the block the model computes without the adapter (task ids are not needed)."""
        with contextlib.ExitStack() as stack:
            for _, view in self.views():
                stack.enter_context(view.adapter_disabled())
            yield self

    def shared_parameters(self) -> list[nn.Parameter]:
        """The shared cores (the only trainable parameters), each once: for an optimizer, or for FSDP2's
        ``ignored_params`` on inner ``fully_shard`` calls (README, "Distributed training")."""
        return list(self.metatt_cores.parameters())

    # -------------------------------------------------------------------------------- counts
    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def lora_parameters(self, rank: Optional[int] = None) -> int:
        """What LoRA of ``rank`` (default: the TT's largest rank) on the same targets would train."""
        r = self.config.max_rank if rank is None else rank
        return sum(r * (self.groups[t.group].in_features + self.groups[t.group].out_features) for t in self.targets)

    def trainable_parameters_summary(self) -> str:
        tt = self.num_trainable_parameters()
        total = sum(p.numel() for p in self.parameters())
        lora = self.lora_parameters()
        groups = ", ".join(f"{g.name}: {g.spec.num_params} ({len(g.matrices)} matrices)" for g in self.groups.values())
        return (
            f"trainable params: {tt:,} in {len(self.groups)} shared TT(s) [{groups}] on {len(self.targets)} modules"
            f" || LoRA r={self.config.max_rank} on the same targets: {lora:,} ({lora / max(tt, 1):.1f}x more)"
            f" || all params: {total:,} || trainable%: {100 * tt / max(total, 1):.4f}"
        )

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters_summary())

    # -------------------------------------------------------------------------------- merge / unload
    @torch.no_grad()
    def merge_and_unload(self) -> nn.Module:
        """Add every delta-W into its base weight, put the base modules back, and return the bare model."""
        if self.config.num_tasks is not None:
            raise RuntimeError("a MetaTT adapter with a 'task' mode cannot be merged into one set of weights")
        for _, view in self.views():
            view.merge()
        return self._put_back_bases()

    def unload(self) -> nn.Module:
        """Put the base modules back (without merging) and return the bare model."""
        for _, view in self.views():
            view.unmerge()
        return self._put_back_bases()

    def _put_back_bases(self) -> nn.Module:
        for name, view in list(self.views()):
            _set_submodule(self.model, name, view.base_module)
        model = self.model
        self.targets = []
        return model

    # -------------------------------------------------------------------------------- rank adaptation
    @torch.no_grad()
    def replace_cores(
        self,
        group: str,
        cores: Sequence[Tensor],
        *,
        optimizer: Optional[torch.optim.Optimizer] = None,
    ) -> nn.ParameterList:
        """Swap the cores of ``group`` for ``cores`` of other bond ranks (same mode sizes), between steps.

        Every view of the group is pointed at the new cores (fresh Parameters); the scaling stays
        :meth:`group_scaling` (it does not depend on the ranks), so cores representing the same delta-W give
        the same outputs. With
        ``optimizer``, the old Parameters leave its param group (their state is dropped) and the new ones
        join the same group with fresh state (moments start at zero).
        """
        if group not in self.groups:
            raise KeyError(f"no group {group!r}; the groups are {sorted(self.groups)}")
        from .rank import _check_chain, _group_holding, _swap_in_group

        old_spec = self.groups[group].spec
        cores = _check_chain(cores)
        if len(cores) != old_spec.num_cores:
            raise ValueError(f"group {group} has {old_spec.num_cores} cores, got {len(cores)}")
        for k, (core, mode) in enumerate(zip(cores, old_spec.modes)):
            if core.shape[1] != mode.size:
                raise ValueError(
                    f"cores[{k}] must be (r_prev, {mode.size}, r_next) for mode {mode.name!r}, got {tuple(core.shape)}"
                )
        spec = dataclasses.replace(old_spec, ranks=tuple(c.shape[0] for c in cores[1:]))
        old = self.metatt_cores[group]
        held = None if optimizer is None else _group_holding(optimizer, old, f"the cores of group {group}")
        ref = old[0]
        new = nn.ParameterList([nn.Parameter(c.detach().to(device=ref.device, dtype=ref.dtype).clone()) for c in cores])
        self.metatt_cores[group] = new
        self.groups[group].spec = spec
        scaling = self.group_scaling(group)
        for t in self.targets:
            if t.group == group:
                view = self.model.get_submodule(t.name)
                view.cores, view.spec, view.scaling = new, spec, scaling
        if held is not None:
            _swap_in_group(optimizer, held, list(old), list(new))
        return new

    # -------------------------------------------------------------------------------- save / load
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The shared cores, once each: ``metatt.<group>.<k>``."""
        return {f"metatt.{g}.{k}": c.detach() for g, cores in self.metatt_cores.items() for k, c in enumerate(cores)}

    def _layout(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "num_layers": self.num_layers,
            "scaling_rule": self.scaling_rule,
            "scaling": {name: self.group_scaling(name) for name in self.groups},
            "groups": {g.name: g.describe() for g in self.groups.values()},
            "targets": {t.name: [t.group, t.layer, t.matrix] for t in self.targets},
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each shared core once)."""
        from safetensors.torch import save_file

        os.makedirs(save_directory, exist_ok=True)
        tensors = {k: v.contiguous().cpu() for k, v in self.adapter_state_dict().items()}
        save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt", "layout": FORMAT})
        layout = self._layout()
        layout["dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()}
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            json.dump(layout, f, indent=2, sort_keys=True)

    @classmethod
    def from_pretrained(cls, model: nn.Module, pretrained_dir: str | os.PathLike, **overrides: Any) -> MetaTTModel:
        """Wrap ``model`` with the adapter saved in ``pretrained_dir``, checked against the model and its file.

        ``overrides`` replace config fields that do not change the layout (``dropout``, ``backend``).
        Nothing executes code: the config is JSON and the cores are read with safetensors.
        """
        bad = sorted(set(overrides) - {"dropout", "backend"})
        if bad:
            raise ValueError(f"only dropout and backend can be overridden when loading, got {bad}")
        layout = _read_layout(pretrained_dir)
        config = MetaTTConfig.from_dict(dict(layout["config"]) | overrides)
        self = cls(model, config)
        self._set_scaling_rule(_scaling_rule(layout, pretrained_dir))
        self._adopt_saved_ranks(layout, pretrained_dir)
        want = self._layout()
        if layout["format_version"] == 1:  # one scaling for every group, alpha / max(rank)
            want["scaling"] = next(iter(want["scaling"].values()))
        for key in ("num_layers", "targets", "scaling", "groups"):
            if layout.get(key) != want[key]:
                raise ValueError(_mismatch(key, layout.get(key), want[key], pretrained_dir))
        tensors = _read_tensors(pretrained_dir)
        expected = self.adapter_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{os.path.join(pretrained_dir, WEIGHTS_NAME)} does not match its config: missing {missing}, "
                f"unexpected {unexpected}"
            )
        dtypes = layout.get("dtypes", {})
        with torch.no_grad():
            for key, target in expected.items():
                t = tensors[key]
                if tuple(t.shape) != tuple(target.shape):
                    raise ValueError(
                        f"{key} has shape {tuple(t.shape)} in the file, the adapter needs {tuple(target.shape)}"
                    )
                if not t.is_floating_point():
                    raise ValueError(f"{key} has dtype {t.dtype} in the file; cores are floating point")
                if key in dtypes and str(t.dtype).removeprefix("torch.") != dtypes[key]:
                    raise ValueError(f"{key} has dtype {t.dtype} in the file but {dtypes[key]} in its config")
                if not torch.isfinite(t).all():
                    raise ValueError(f"{key} holds non-finite values")
                target.copy_(t)
        return self

    def _adopt_saved_ranks(self, layout: dict, where: Any) -> None:
        """Groups saved after a rank change (``replace_cores``, ``rank.compress_``) come back at their ranks."""
        groups = layout.get("groups")
        if not isinstance(groups, dict):
            raise ValueError(f"the adapter config in {where} has no groups object")
        for name, group in self.groups.items():
            shapes = groups.get(name, {}).get("core_shapes") if isinstance(groups.get(name), dict) else None
            if shapes == [list(s) for s in group.spec.core_shapes] or shapes is None:
                continue
            well_formed = isinstance(shapes, list) and all(
                isinstance(x, list) and len(x) == 3 and all(type(v) is int and v > 0 for v in x) for x in shapes
            )
            if not well_formed:
                raise ValueError(f"the adapter config in {where} gives group {name} malformed core_shapes {shapes!r}")
            if len(shapes) != group.spec.num_cores or any(x[1] != m.size for x, m in zip(shapes, group.spec.modes)):
                continue  # other modes, not other ranks: the layout comparison reports it
            ref = self.metatt_cores[name][0]
            self.replace_cores(name, [torch.zeros(s, dtype=ref.dtype, device=ref.device) for s in shapes])

    def extra_repr(self) -> str:
        return f"groups={list(self.groups)}, targets={len(self.targets)}, modes={self.config.modes}"


def _mismatch(key: str, saved: Any, now: Any, where: Any) -> str:
    if key == "targets" and isinstance(saved, dict):
        missing = sorted(set(saved) - set(now))
        extra = sorted(set(now) - set(saved))
        changed = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
        return (
            f"the adapter in {where} was saved for other targets: not in this model {missing[:5]}, new in this "
            f"model {extra[:5]}, placed differently {changed[:5]}"
        )
    return f"the adapter in {where} does not fit this model: its {key} is {saved!r}, this model gives {now!r}"


def _read_layout(path: str | os.PathLike) -> dict:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    try:
        with open(file) as f:
            layout = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{file} is not a readable JSON file: {e}") from e
    if not isinstance(layout, dict) or layout.get("format") != FORMAT:
        raise ValueError(f"{file} is not a ttkernels MetaTT adapter config (format {FORMAT!r} expected)")
    if type(layout.get("format_version")) is not int or not 1 <= layout["format_version"] <= FORMAT_VERSION:
        raise ValueError(
            f"{file} has format_version {layout.get('format_version')!r}; this version reads 1 to {FORMAT_VERSION}"
        )
    if not isinstance(layout.get("config"), dict):
        raise ValueError(f"{file} has no config object")
    return layout


def _scaling_rule(layout: dict, where: Any) -> int:
    """The scaling rule an adapter was saved under: 1 for format version 1, else its ``scaling_rule``."""
    if layout["format_version"] == 1:
        return 1
    rule = layout.get("scaling_rule")
    if type(rule) is not int or rule not in RULES:
        raise ValueError(f"the adapter config in {where} has scaling_rule {rule!r}; this version reads {RULES}")
    return rule


def _read_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    file = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {path}")
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{file} is not a valid safetensors file: {e}") from e


def get_metatt_model(model: nn.Module, config: MetaTTConfig) -> MetaTTModel:
    """Adapt ``model`` in place with one shared TT per target shape and return the wrapper.

    Every parameter of ``model`` is frozen; only the shared cores train. At initialization the last core of
    every TT is zero, so the wrapped model computes exactly what ``model`` computed.
    """
    return MetaTTModel(model, config)
