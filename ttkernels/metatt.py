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
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from . import checks, ops
from .layer import adapter_scaling, check_alpha
from .layer import is_conv1d as _is_conv1d
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
FORMAT_VERSION = 1
MODE_NAMES = ("layer", "matrix", "head", "task")
_TASK_ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------------ config
@dataclasses.dataclass
class MetaTTConfig:
    """What to adapt and how.

    Args:
        target_modules: module-name suffixes (``["q_proj", "v_proj"]`` matches ``...self_attn.q_proj``), or a
            regular expression matched against the whole module name (as PEFT does).
        rank: one bond rank for every bond, or one per bond (``num_cores - 1`` entries).
        alpha: ``scaling = alpha / max(rank)``; None: ``alpha = max(rank)`` (scaling 1).
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
        self.alpha = check_alpha(self.alpha)
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
class _Routing(threading.local):
    """Per-call state the wrapper shares with its views: the current batch's task ids, one value per thread,
    so concurrent calls with different task ids each route their own batch. (Under ``torch.compile`` the ids
    flow through the traced graph; the attribute is only the tracing-time link between wrapper and views.)"""

    def __init__(self) -> None:
        self.task_ids: Optional[Tensor] = None
        # factors the views share within this call (A and B of each group's cores, built once), or None
        self.shared: Optional[dict] = None

    def __deepcopy__(self, memo: dict) -> _Routing:
        return _Routing()

    def __reduce__(self) -> tuple:
        return (_Routing, ())


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
        if not isinstance(base, nn.Linear) and not _is_conv1d(base):
            raise TypeError(f"cannot adapt a {type(base).__name__}: MetaTT targets nn.Linear or Conv1D layers")
        # the base's own Parameters, under the names it gives them (state dicts keep their keys); a Conv1D's
        # weight is stored (in, out): the view's weight_transposed says so
        self = cls.from_cores(base, cores, spec, index=index, alpha=alpha, dropout=dropout, backend=backend)
        self.__dict__["_routing"] = routing
        return self

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


def _adapter_holder(module: nn.Module) -> bool:
    """A module that holds an adapter already (ttkernels' layers, a MetaTT wrapper, PEFT's tuner layers)."""
    if isinstance(module, (TTLinear, MetaTTModel)):
        return True
    return any(c.__name__ in ("BaseTunerLayer", "TTMLinear") for c in type(module).__mro__)


def _plan(model: nn.Module, config: MetaTTConfig) -> tuple[dict[str, _Group], list[_Target], int]:
    """Groups, targets and the layer count for ``config`` on ``model``; reads the model, changes nothing."""
    num_modules = 0
    for name, module in model.named_modules():
        num_modules += 1
        if _adapter_holder(module) and not isinstance(module, MetaTTLinear):
            raise ValueError(
                f"the model already has an adapter ({name or 'the model'} is a {type(module).__name__}): adapting "
                "it again would freeze that adapter; merge or unload it first"
            )
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
    others = [n for n, m in model.named_modules() if isinstance(m, MetaTTLinear)]
    if others:
        raise ValueError(
            f"the model already has a MetaTT adapter ({others[0]} is a MetaTT view): adapting it again would freeze "
            "that adapter; unload it first"
        )
    num_layers = max(f[2] for f in found) + 1
    if num_layers > num_modules:  # a model with layers 0..N-1 has at least N modules
        name = max(found, key=lambda f: f[2])[0]
        raise ValueError(
            f"target {name!r} has layer number {num_layers - 1}, but the model has only {num_modules} modules: "
            "layer numbers must count the model's layers"
        )
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

    def __init__(self, model: nn.Module, config: MetaTTConfig, *, _ranks: Optional[dict] = None) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, MetaTTConfig):
            raise TypeError(f"config must be a MetaTTConfig, got {type(config).__name__}")
        groups, targets, num_layers = _plan(model, config)
        for name, ranks in (_ranks or {}).items():  # a saved adapter's ranks (from_pretrained)
            groups[name].spec = dataclasses.replace(groups[name].spec, ranks=ranks)
        checks.check_adapter_size(
            sum(g.spec.num_params for g in groups.values()),
            sum(groups[t.group].in_features * groups[t.group].out_features for t in targets),
            "the MetaTT adapter",
        )
        snapshot = checks.ModelSnapshot(model)
        try:
            self._adapt(model, config, groups, targets, num_layers)
        except BaseException:
            snapshot.restore()
            raise

    def _adapt(
        self, model: nn.Module, config: MetaTTConfig, groups: dict[str, _Group], targets: list[_Target], num_layers: int
    ) -> None:
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
            view.scaling = self.alpha / config.max_rank  # as replace_cores keeps it, for saved lower ranks
            _set_submodule(model, t.name, view)

    # -------------------------------------------------------------------------------- forward
    def forward(self, *args: Any, task_ids: Optional[Tensor] = None, **kwargs: Any) -> Any:
        routing = self._routing  # per thread: concurrent calls keep their own task ids
        previous, previous_shared = routing.task_ids, routing.shared
        routing.task_ids = self._check_task_ids(task_ids)
        routing.shared = {}  # A and B of each group's cores, built once in this call for all its views
        try:
            return self.model(*args, **kwargs)
        finally:
            routing.task_ids, routing.shared = previous, previous_shared

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
        if task_ids.dtype not in _TASK_ID_DTYPES:
            raise TypeError(
                f"task_ids must be an integer tensor, got {task_ids.dtype} (int64, int32, int16, int8 or uint8)"
            )
        if task_ids.device.type == "meta":
            raise ValueError("task_ids is on the meta device: it needs values")
        if task_ids.dim() != 1:
            raise ValueError(f"task_ids must be 1-D (one id per sample), got shape {tuple(task_ids.shape)}")
        if not torch.compiler.is_compiling():
            checks.check_task_ids_range(task_ids, num_tasks)  # on the ids' device: no host read on a GPU
        return task_ids

    def views(self) -> Iterator[tuple[str, MetaTTLinear]]:
        for t in self.targets:
            yield t.name, self.model.get_submodule(t.name)

    def _views_disabled(self) -> bool:
        return all(v.disabled for _, v in self.views())

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
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank must be a positive int or None, got {rank!r}")
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
            view.merge_and_unload()  # no copy of the weight is kept: the views go
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
        ``alpha / max(config.rank)``, so cores representing the same delta-W give the same outputs. With
        ``optimizer``, the old Parameters leave its param group (their state is dropped) and the new ones
        join the same group with fresh state (moments start at zero).
        """
        if group not in self.groups:
            raise KeyError(f"no group {group!r}; the groups are {sorted(self.groups)}")
        views = [self.model.get_submodule(t.name) for t in self.targets if t.group == group]
        if not views:
            raise RuntimeError("this MetaTT model was unloaded: it has no views whose cores could be replaced")
        # the first view checks the cores, makes the new Parameters and tells the optimizer; the others share them
        new = views[0].replace_cores(cores, optimizer=optimizer)
        for view in views[1:]:
            view.replace_cores(new)
        self.metatt_cores[group] = new
        self.groups[group].spec = views[0].spec
        return new

    # -------------------------------------------------------------------------------- save / load
    def adapter_state_dict(self) -> dict[str, Tensor]:
        """The shared cores, once each: ``metatt.<group>.<k>``."""
        return {f"metatt.{g}.{k}": c.detach() for g, cores in self.metatt_cores.items() for k, c in enumerate(cores)}

    def _layout(self) -> dict:
        config = self.config.to_dict()
        if isinstance(config["target_modules"], str):  # a pattern: saved as the literal names it matched
            config["target_modules"] = sorted(t.name for t in self.targets)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config,
            "num_layers": self.num_layers,
            "scaling": adapter_scaling(self.alpha, self.config.max_rank),
            "groups": {g.name: g.describe() for g in self.groups.values()},
            "targets": {t.name: [t.group, t.layer, t.matrix] for t in self.targets},
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (each shared core once).

        Refused after :meth:`merge_and_unload` / :meth:`unload` (the model no longer holds the adapter)."""
        from safetensors.torch import save_file

        if not self.targets:
            raise RuntimeError(
                "this MetaTT adapter was unloaded (merge_and_unload() or unload()): there is no adapter to save; "
                "save before unloading"
            )
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
        Nothing executes code: the config is JSON and the cores are read with safetensors. Every field of the
        config, and the names, shapes and dtypes in the safetensors header, are checked against the model
        before anything is allocated; nothing from the file is used as a regular expression (a saved pattern
        is replaced by the literal target names saved beside it). All or nothing: when loading fails, the
        model is left as it was.
        """
        bad = sorted(set(overrides) - {"dropout", "backend"})
        if bad:
            raise ValueError(f"only dropout and backend can be overridden when loading, got {bad}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        pretrained_dir = checks.check_path(pretrained_dir, "pretrained_dir")
        layout = _read_layout(pretrained_dir)
        file = os.path.join(pretrained_dir, CONFIG_NAME)
        data = dict(layout["config"])
        if isinstance(data.get("target_modules"), str):
            data["target_modules"] = sorted(layout["targets"]) or data["target_modules"]
        try:
            config = MetaTTConfig.from_dict(data | overrides)
        except TypeError as e:  # a value of the wrong type in the file
            raise ValueError(f"{file}: {e}") from e
        groups, targets, num_layers = _plan(model, config)
        want = {
            "num_layers": num_layers,
            "targets": {t.name: [t.group, t.layer, t.matrix] for t in targets},
            "scaling": float(config.max_rank if config.alpha is None else config.alpha) / config.max_rank,
            "groups": {g.name: g.describe() for g in groups.values()},
        }
        structure = lambda gs: {n: {k: v for k, v in g.items() if k != "core_shapes"} for n, g in gs.items()}
        for key in ("num_layers", "targets", "scaling", "groups"):
            saved, now = layout[key], want[key]
            if key == "groups":
                saved, now = structure(saved), structure(now)
            if saved != now:
                raise ValueError(_mismatch(key, saved, now, pretrained_dir))
        ranks = {
            name: _saved_ranks(layout["groups"][name]["core_shapes"], g.spec, name, file) for name, g in groups.items()
        }
        needed = {}
        for name, g in groups.items():
            spec = dataclasses.replace(g.spec, ranks=ranks[name])
            needed |= {f"metatt.{name}.{k}": shape for k, shape in enumerate(spec.core_shapes)}
        weights = os.path.join(pretrained_dir, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {pretrained_dir}")
        header = checks.read_safetensors_header(weights)
        missing, unexpected = sorted(set(needed) - set(header)), sorted(set(header) - set(needed))
        if missing or unexpected:
            raise ValueError(
                f"{weights} does not match its config: missing {missing}, unexpected {unexpected[:10]}"
                + (f" (and {len(unexpected) - 10} more)" if len(unexpected) > 10 else "")
            )
        dtypes = layout.get("dtypes", {})
        for key, shape in needed.items():
            info = header[key]
            if info.shape != tuple(shape):
                raise ValueError(f"{key} has shape {info.shape} in the file, the adapter needs {tuple(shape)}")
            if info.dtype not in checks.FLOAT_DTYPE_NAMES:
                raise ValueError(f"{key} has dtype torch.{info.dtype} in the file; cores are floating point")
            if key in dtypes and info.dtype != dtypes[key]:
                raise ValueError(f"{key} has dtype torch.{info.dtype} in the file but {dtypes[key]} in its config")
        tensors = checks.load_safetensors(weights)  # no more than the header declared, checked above
        for key in needed:
            if not torch.isfinite(tensors[key]).all():
                raise ValueError(f"{key} holds non-finite values")
        snapshot = checks.ModelSnapshot(model)
        self = cls(model, config, _ranks=ranks)  # restores the model itself when it fails
        try:
            with torch.no_grad():
                for key, target in self.adapter_state_dict().items():
                    target.copy_(tensors[key])
        except BaseException:
            snapshot.restore()
            raise
        return self

    def extra_repr(self) -> str:
        return f"groups={list(self.groups)}, targets={len(self.targets)}, modes={self.config.modes}"


def _saved_ranks(shapes: Any, spec: TTSpec, group: str, where: Any) -> tuple[int, ...]:
    """The bond ranks of saved ``core_shapes``, which must chain and have the mode sizes of ``spec``."""
    well_formed = (
        isinstance(shapes, list)
        and len(shapes) == spec.num_cores
        and all(isinstance(x, list) and len(x) == 3 and all(type(v) is int and v > 0 for v in x) for x in shapes)
    )
    if well_formed:
        chained = shapes[0][0] == 1 and shapes[-1][2] == 1 and all(a[2] == b[0] for a, b in itertools.pairwise(shapes))
        sizes = all(x[1] == m.size for x, m in zip(shapes, spec.modes))
        well_formed = chained and sizes
    if not well_formed:
        raise ValueError(
            f"the adapter config {where} gives group {group} malformed core_shapes {str(shapes)[:200]}: it needs "
            f"{spec.num_cores} chained [r_prev, size, r_next] with sizes {[m.size for m in spec.modes]}"
        )
    return tuple(x[2] for x in shapes[:-1])


def _mismatch(key: str, saved: Any, now: Any, where: Any) -> str:
    if key == "targets" and isinstance(saved, dict):
        missing = sorted(set(saved) - set(now))
        extra = sorted(set(now) - set(saved))
        changed = sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
        return (
            f"the adapter in {where} was saved for other targets: not in this model {missing[:5]}, new in this "
            f"model {extra[:5]}, placed differently {changed[:5]}"
        )
    return f"the adapter in {where} does not fit this model: its {key} is {str(saved)[:2000]}, this model gives {now!r}"


_LAYOUT_KEYS = ("format", "format_version", "config", "num_layers", "scaling", "groups", "targets", "dtypes")
_GROUP_KEYS = ("in_features", "out_features", "matrices", "modes", "core_shapes")


def _read_layout(path: str | os.PathLike) -> dict:
    """The saved layout, every field checked for its type (its values are checked against the model later)."""
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}")
    try:
        layout = checks.read_json(file)
    except ValueError as e:
        if "a JSON object" in str(e):  # JSON, but not an object
            raise ValueError(f"{file} is not a ttkernels MetaTT adapter config (format {FORMAT!r} expected)") from e
        raise
    if layout.get("format") != FORMAT:
        raise ValueError(f"{file} is not a ttkernels MetaTT adapter config (format {FORMAT!r} expected)")
    if layout.get("format_version") != FORMAT_VERSION or type(layout.get("format_version")) is not int:
        raise ValueError(
            f"{file} has format_version {str(layout.get('format_version'))[:50]}; this version reads {FORMAT_VERSION}"
        )

    def fail(what: str, value: Any) -> ValueError:
        return ValueError(f"{file}: {what}, got {str(value)[:200]}")

    unknown = sorted(set(layout) - set(_LAYOUT_KEYS))
    if unknown:
        raise fail("unknown fields", unknown[:10])
    for key in _LAYOUT_KEYS[:-1]:
        if key not in layout:
            raise ValueError(f"{file} has no {key}")
    if not isinstance(layout["config"], dict):
        raise fail("config must be an object", layout["config"])
    if type(layout["num_layers"]) is not int or layout["num_layers"] < 1:
        raise fail("num_layers must be a positive int", layout["num_layers"])
    scaling = layout["scaling"]
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise fail("scaling must be a finite number", scaling)
    groups = layout["groups"]
    if not isinstance(groups, dict) or not groups:
        raise fail("groups must be a non-empty object", groups)
    for name, g in groups.items():
        if not isinstance(g, dict) or sorted(g) != sorted(_GROUP_KEYS):
            raise fail(f"group {name[:100]!r} must hold exactly {list(_GROUP_KEYS)}", g)
        if any(type(g[k]) is not int or g[k] < 1 for k in ("in_features", "out_features")):
            raise fail(f"group {name[:100]!r} needs positive int in_features and out_features", g)
        if not isinstance(g["matrices"], list) or not all(isinstance(m, str) for m in g["matrices"]):
            raise fail(f"group {name[:100]!r}: matrices must be a list of names", g["matrices"])
        if not isinstance(g["modes"], str):
            raise fail(f"group {name[:100]!r}: modes must be a string", g["modes"])
    targets = layout["targets"]
    if not isinstance(targets, dict) or not targets:
        raise fail("targets must be a non-empty object", targets)
    for name, place in targets.items():
        ok = isinstance(place, list) and len(place) == 3 and isinstance(place[0], str)
        if not ok or any(type(v) is not int or v < 0 for v in place[1:]):
            raise fail(f"target {name[:100]!r} must be placed as [group, layer, matrix]", place)
    dtypes = layout.get("dtypes", {})
    if not isinstance(dtypes, dict) or not all(v in checks.FLOAT_DTYPE_NAMES for v in dtypes.values()):
        raise fail(f"dtypes must map tensor names to one of {list(checks.FLOAT_DTYPE_NAMES)}", dtypes)
    return layout


def get_metatt_model(model: nn.Module, config: MetaTTConfig) -> MetaTTModel:
    """Adapt ``model`` in place with one shared TT per target shape and return the wrapper.

    Every parameter of ``model`` is frozen; only the shared cores train. At initialization the last core of
    every TT is zero, so the wrapped model computes exactly what ``model`` computed.
    """
    return MetaTTModel(model, config)
