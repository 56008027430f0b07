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

from . import checks, ops, quantized
from .init import RULES, SCALING_RULE, scaling_gain
from .layer import adapter_scaling, check_alpha
from .layer import is_conv1d as _is_conv1d
from .metatt_hf import ForwardWithModelSignature, PeftSurface
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
        modules_to_save: names (suffixes, as ``target_modules``) of modules outside the TT that train in full, such
            as a new classification head: unfrozen in place, written to the adapter file, restored on loading.
        r, lora_alpha, lora_dropout: PEFT's names for ``rank``, ``alpha`` and ``dropout`` (give one spelling).
    """

    target_modules: Any
    rank: Any = None  # None: 8
    alpha: Optional[float] = None
    modes: Sequence[str] = ("layer", "matrix")
    num_tasks: Optional[int] = None
    num_heads: Optional[int] = None
    dropout: Optional[float] = None  # None: 0.0
    backend: str = "auto"
    adapter_dtype: Optional[str] = None
    modules_to_save: Optional[list[str]] = None
    r: dataclasses.InitVar[Any] = None
    lora_alpha: dataclasses.InitVar[Optional[float]] = None
    lora_dropout: dataclasses.InitVar[Optional[float]] = None

    def __post_init__(self, r: Any, lora_alpha: Optional[float], lora_dropout: Optional[float]) -> None:
        for ours, theirs, value in (("rank", "r", r), ("alpha", "lora_alpha", lora_alpha),
                                    ("dropout", "lora_dropout", lora_dropout)):  # fmt: skip
            if value is not None:
                if getattr(self, ours) is not None:
                    raise ValueError(f"give {ours} or {theirs} (PEFT's name for it), not both")
                setattr(self, ours, value)
        if self.rank is None:
            self.rank = 8
        if self.dropout is None:
            self.dropout = 0.0
        mts = self.modules_to_save
        if mts is not None:
            if isinstance(mts, (str, bytes)) or not isinstance(mts, Sequence):
                raise TypeError(f"modules_to_save must be a list of module names or None, got {mts!r}")
            if not all(isinstance(t, str) and t for t in mts):
                raise TypeError(f"modules_to_save must hold non-empty strings, got {list(mts)!r}")
            self.modules_to_save = list(mts) or None
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
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)} | {"modes": list(self.modes)}
        if data["modules_to_save"] is None:
            del data["modules_to_save"]  # folders without the field stay byte-identical to earlier ones
        return data

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
        return _Routing()  # ids live only within a call

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
class MetaTTModel(PeftSurface, nn.Module):
    """A model with a MetaTT adapter: ``forward`` passes through to the model (``task_ids=`` routes each sample
    to its task slice). Build it with :func:`get_metatt_model` or :meth:`from_pretrained`.

    ``config`` is the wrapped model's config and ``metatt_config`` the adapter's; the rest of PEFT's model surface
    (``generate``, ``get_base_model``, gradient checkpointing, per-task merge, ``export_lora``) is
    :class:`~ttkernels.metatt_hf.PeftSurface`."""

    forward = ForwardWithModelSignature()

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
        saved = _find_modules_to_save(model, config, targets)
        snapshot = checks.ModelSnapshot(model)
        try:
            self._adapt(model, config, groups, targets, num_layers, saved)
        except BaseException:
            snapshot.restore()
            raise

    def _adapt(
        self,
        model: nn.Module,
        config: MetaTTConfig,
        groups: dict[str, _Group],
        targets: list[_Target],
        num_layers: int,
        saved: list[str],
    ) -> None:
        self.metatt_config = config
        self.groups = groups
        self.targets = targets
        self.num_layers = num_layers
        self._routing = _Routing()
        for p in model.parameters():
            p.requires_grad_(False)
        self.modules_to_save = saved
        for name in saved:
            model.get_submodule(name).requires_grad_(True)
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
            view.scaling = self.group_scaling(t.group)  # config.max_rank's, for saved lower ranks too
            _set_submodule(model, t.name, view)
        self._install_state_dict_hooks()

    def group_scaling(self, group: str) -> float:
        """The scaling of every view of ``group``: ``alpha / max(config.rank) * gain``, the gain of this
        adapter's ``scaling_rule`` with the group's number of targets as its sites (:mod:`ttkernels.init`)."""
        return _group_scalings(self.metatt_config, self.groups, self.targets, self.scaling_rule)[group]

    def _set_scaling_rule(self, rule: int) -> None:
        self.scaling_rule = rule
        for t in self.targets:
            self.model.get_submodule(t.name).scaling = self.group_scaling(t.group)

    # -------------------------------------------------------------------------------- forward
    def _forward(self, *args: Any, task_ids: Optional[Tensor] = None, **kwargs: Any) -> Any:
        # the ids are set as _task_scope sets them, written out so that torch.compile traces it in one graph
        routing = self._routing  # per thread: concurrent calls keep their own task ids
        previous, previous_shared = routing.task_ids, routing.shared
        routing.task_ids = self._check_task_ids(task_ids)
        routing.shared = {}  # A and B of each group's cores, built once in this call for all its views
        try:
            return self.model(*args, **kwargs)
        finally:
            routing.task_ids, routing.shared = previous, previous_shared

    def _current_task_ids(self) -> Optional[Tensor]:
        """The task ids the views read now (those of the innermost :meth:`_task_scope`)."""
        return self._routing.task_ids

    @contextlib.contextmanager
    def _task_scope(self, task_ids: Optional[Tensor]) -> Iterator[None]:
        """The views read ``task_ids`` within the block (nested blocks restore the outer ids on exit)."""
        previous = self._routing.task_ids
        self._routing.task_ids = task_ids
        try:
            yield
        finally:
            self._routing.task_ids = previous

    def _check_task_ids(self, task_ids: Optional[Tensor]) -> Optional[Tensor]:
        num_tasks = self.metatt_config.num_tasks
        merged = self._merged_task() if num_tasks is not None else None
        if merged is not None and task_ids is not None and not self._views_disabled():
            raise ValueError(f"task {merged} is merged into the weights: unmerge() before routing task_ids per sample")
        if num_tasks is None:
            if task_ids is not None:
                raise ValueError("task_ids was given but this MetaTT adapter has no 'task' mode")
            return None
        if task_ids is None:
            if self._views_disabled() or self._merged_task() is not None:
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
        r = self.metatt_config.max_rank if rank is None else rank
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"rank must be a positive int or None, got {rank!r}")
        return sum(r * (self.groups[t.group].in_features + self.groups[t.group].out_features) for t in self.targets)

    def trainable_parameters_summary(self) -> str:
        trainable = self.num_trainable_parameters()
        tt = sum(p.numel() for p in self.metatt_cores.parameters() if p.requires_grad)
        total = sum(quantized.num_weights(p) for p in self.parameters())  # 4-bit weights counted unpacked
        lora = self.lora_parameters()
        groups = ", ".join(f"{g.name}: {g.spec.num_params} ({len(g.matrices)} matrices)" for g in self.groups.values())
        saved = f" + {trainable - tt:,} in modules_to_save {self.modules_to_save}" if self.modules_to_save else ""
        return (
            f"trainable params: {trainable:,} ({tt:,} in {len(self.groups)} shared TT(s) [{groups}] on "
            f"{len(self.targets)} modules{saved})"
            f" || LoRA r={self.metatt_config.max_rank} on the same targets: {lora:,} ({lora / max(tt, 1):.1f}x more)"
            f" || all params: {total:,} || trainable%: {100 * trainable / max(total, 1):.4f}"
        )

    def print_trainable_parameters(self) -> None:
        print(self.trainable_parameters_summary())

    # -------------------------------------------------------------------------------- merge / unload
    def _merged_task(self) -> Optional[int]:
        """The task merged into the weights (:meth:`merge` merges every view together, so the first one tells)."""
        first = next(self.views(), None)
        return first[1].merged_task if first is not None and first[1].merged else None

    def _check_merge_task(self, task: object) -> Optional[int]:
        num_tasks = self.metatt_config.num_tasks
        if num_tasks is None:
            if task is not None:
                raise ValueError(f"task={task!r} was given but this MetaTT adapter has no 'task' mode")
            return None
        if task is None:
            raise ValueError(f"this MetaTT adapter has a 'task' mode ({num_tasks} tasks): merge one task with task=t")
        if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < num_tasks:
            raise ValueError(f"task must be an int in [0, {num_tasks}), got {task!r}")
        return task

    @torch.no_grad()
    def merge(self, task: Optional[int] = None, *, safe_merge: bool = False) -> None:
        """Add every delta-W into its base weight, keeping the views (:meth:`unmerge` restores every base weight
        bit for bit: the merge guarantees of :mod:`ttkernels.layer`). A task adapter merges one task (``task``);
        then ``forward`` needs no ``task_ids``, and the views' state dicts record the task. All or nothing: when a
        view refuses (``safe_merge=True`` and a non-finite delta-W), the views merged before it are unmerged."""
        task = self._check_merge_task(task)
        if any(view.merged for _, view in self.views()):
            raise RuntimeError("the adapter is already merged: unmerge() first")
        done = []
        try:
            for _, view in self.views():
                view.merge(safe_merge, task=task)
                done.append(view)
        except BaseException:
            for view in done:
                view.unmerge()
            raise

    @torch.no_grad()
    def unmerge(self) -> None:
        """Every base weight back to what it was before :meth:`merge`, bit for bit."""
        for _, view in self.views():
            view.unmerge()

    @torch.no_grad()
    def merge_and_unload(self, task: Optional[int] = None, *, safe_merge: bool = False) -> nn.Module:
        """Add every delta-W into its base weight, put the base modules back, and return the bare model; no copy
        of the weights is kept.

        A task adapter merges one task's delta-W (``task``); the other tasks are gone from the result. After
        :meth:`merge`, the merged task is the one unloaded (``task`` may repeat it)."""
        if any(view.merged for _, view in self.views()):
            merged = self._merged_task()
            if task is not None and task != merged:
                raise ValueError(f"task {merged} is merged already, not task {task}: unmerge() first")
            task = merged
        else:
            task = self._check_merge_task(task)
            if safe_merge:
                self.merge(task, safe_merge=True)  # every view checked before any weight is given away
        for _, view in self.views():
            view.merge_and_unload(task=task)  # no copy of the weight is kept: the views go
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
        """The shared cores, once each: ``metatt.<group>.<k>``; and the ``modules_to_save`` tensors:
        ``modules_to_save.<module name>.<tensor name>``."""
        out = {f"metatt.{g}.{k}": c.detach() for g, cores in self.metatt_cores.items() for k, c in enumerate(cores)}
        for name in self.modules_to_save:
            for key, t in self.model.get_submodule(name).state_dict(keep_vars=True).items():
                out[f"modules_to_save.{name}.{key}"] = t.detach()
        return out

    def _layout(self) -> dict:
        config = self.metatt_config.to_dict()
        if isinstance(config["target_modules"], str):  # a pattern: saved as the literal names it matched
            config["target_modules"] = sorted(t.name for t in self.targets)
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": config,
            "num_layers": self.num_layers,
            "scaling_rule": self.scaling_rule,
            "scaling": _group_scalings(self.metatt_config, self.groups, self.targets, self.scaling_rule),
            "groups": {g.name: g.describe() for g in self.groups.values()},
            "targets": {t.name: [t.group, t.layer, t.matrix] for t in self.targets},
        } | ({"modules_to_save": list(self.modules_to_save)} if self.modules_to_save else {})

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
        layout["dtypes"] = {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items() if v.is_floating_point()}
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
        saved_modules = _find_modules_to_save(model, config, targets)
        rule = _scaling_rule(layout)
        scaling = _group_scalings(config, groups, targets, rule)
        if layout["format_version"] == 1:  # one scaling for every group: alpha / max(rank) (rule 1)
            scaling = adapter_scaling(config.alpha, config.max_rank)
        want = {
            "num_layers": num_layers,
            "targets": {t.name: [t.group, t.layer, t.matrix] for t in targets},
            "scaling": scaling,
            "groups": {g.name: g.describe() for g in groups.values()},
            "modules_to_save": saved_modules,
        }
        structure = lambda gs: {n: {k: v for k, v in g.items() if k != "core_shapes"} for n, g in gs.items()}
        for key in ("num_layers", "targets", "scaling", "groups", "modules_to_save"):
            saved, now = layout.get(key, []), want[key]
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
        # modules_to_save: every tensor of each module, in its shape (floating tensors in any floating dtype)
        kept = {
            f"modules_to_save.{name}.{key}": t
            for name in saved_modules
            for key, t in model.get_submodule(name).state_dict(keep_vars=True).items()
        }
        weights = os.path.join(pretrained_dir, WEIGHTS_NAME)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"no {WEIGHTS_NAME} in {pretrained_dir}")
        header = checks.read_safetensors_header(weights)
        expected = set(needed) | set(kept)
        missing, unexpected = sorted(expected - set(header)), sorted(set(header) - expected)
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
        for key, t in kept.items():
            info = header[key]
            if info.shape != tuple(t.shape):
                raise ValueError(f"{key} has shape {info.shape} in the file, this model's is {tuple(t.shape)}")
            if t.is_floating_point() and info.dtype not in checks.FLOAT_DTYPE_NAMES:
                raise ValueError(f"{key} has dtype torch.{info.dtype} in the file; this model's is {t.dtype}")
            if not t.is_floating_point() and f"torch.{info.dtype}" != str(t.dtype):
                raise ValueError(f"{key} has dtype torch.{info.dtype} in the file; this model's is {t.dtype}")
            if key in dtypes and info.dtype != dtypes[key]:
                raise ValueError(f"{key} has dtype torch.{info.dtype} in the file but {dtypes[key]} in its config")
        tensors = checks.load_safetensors(weights)  # no more than the header declared, checked above
        for key in expected:
            if tensors[key].is_floating_point() and not torch.isfinite(tensors[key]).all():
                raise ValueError(f"{key} holds non-finite values")
        snapshot = checks.ModelSnapshot(model)
        before = {key: t.detach().clone() for key, t in kept.items()}  # the model's own values, overwritten below
        self = cls(model, config, _ranks=ranks)  # restores the model itself when it fails
        try:
            self._set_scaling_rule(rule)
            with torch.no_grad():
                for key, target in self.adapter_state_dict().items():
                    target.copy_(tensors[key])
        except BaseException:
            with torch.no_grad():
                for key, t in kept.items():
                    t.detach().copy_(before[key])
            snapshot.restore()
            raise
        return self

    def extra_repr(self) -> str:
        return f"groups={list(self.groups)}, targets={len(self.targets)}, modes={self.metatt_config.modes}"


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


# every key a layout may hold: "dtypes" and "modules_to_save" are optional, "scaling_rule" belongs to format
# version 2 (required there) only
_LAYOUT_KEYS = (
    "format", "format_version", "config", "num_layers", "scaling", "groups", "targets", "scaling_rule", "dtypes",
    "modules_to_save",
)  # fmt: skip
_OPTIONAL_LAYOUT_KEYS = ("dtypes", "modules_to_save")
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
    version = layout.get("format_version")
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{file} has format_version {str(version)[:50]}; this version reads 1 to {FORMAT_VERSION}")

    def fail(what: str, value: Any) -> ValueError:
        return ValueError(f"{file}: {what}, got {str(value)[:200]}")

    unknown = sorted(set(layout) - set(_LAYOUT_KEYS))
    if unknown:
        raise fail("unknown fields", unknown[:10])
    for key in _LAYOUT_KEYS:
        if key in _OPTIONAL_LAYOUT_KEYS or (key == "scaling_rule" and version < 2):
            continue
        if key not in layout:
            raise ValueError(f"{file} has no {key}")
    if not isinstance(layout["config"], dict):
        raise fail("config must be an object", layout["config"])
    if type(layout["num_layers"]) is not int or layout["num_layers"] < 1:
        raise fail("num_layers must be a positive int", layout["num_layers"])

    def number(v: Any) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v >= 0

    scaling = layout["scaling"]
    if version == 1:  # one scaling, alpha / max(rank); no scaling rule (it was rule 1)
        if "scaling_rule" in layout:
            raise fail("scaling_rule is not a field of format version 1", layout["scaling_rule"])
        if not number(scaling):
            raise fail("scaling must be a finite number >= 0", scaling)
    else:  # the rule, and one scaling per group
        rule = layout["scaling_rule"]
        if type(rule) is not int or rule not in RULES:
            raise fail(f"scaling_rule must be one of {list(RULES)}", rule)
        if not isinstance(scaling, dict) or not all(isinstance(k, str) and number(v) for k, v in scaling.items()):
            raise fail("scaling must be an object mapping group names to finite numbers >= 0", scaling)
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
    saved = layout.get("modules_to_save", [])
    if not isinstance(saved, list) or not all(isinstance(m, str) and m for m in saved):
        raise fail("modules_to_save must be a list of module names", saved)
    return layout


def _find_modules_to_save(model: nn.Module, config: MetaTTConfig, targets: list[_Target]) -> list[str]:
    """The modules named by ``config.modules_to_save`` (suffixes, as PEFT; never regular expressions), outermost
    only; each name must match, and none may hold or lie inside a target. Reads the model, changes nothing."""
    if not config.modules_to_save:
        return []
    found: list[str] = []
    for name, _ in model.named_modules():
        if name and _matches(name, config.modules_to_save) and not any(name.startswith(f + ".") for f in found):
            found.append(name)
    for want in config.modules_to_save:
        if not any(_matches(name, [want]) for name in found):
            raise ValueError(f"modules_to_save names {want!r}, but no module of the model matches it")
    for name in found:
        for t in targets:
            if t.name == name or t.name.startswith(name + ".") or name.startswith(t.name + "."):
                raise ValueError(f"modules_to_save module {name!r} overlaps the MetaTT target {t.name!r}")
    return found


def _scaling_rule(layout: dict) -> int:
    """The scaling rule a checked layout was saved under: 1 for format version 1, else its ``scaling_rule``."""
    return 1 if layout["format_version"] == 1 else layout["scaling_rule"]


def _group_scalings(config: MetaTTConfig, groups: dict[str, _Group], targets: list[_Target], rule: int) -> dict:
    """Each group's scaling under scaling rule ``rule``: ``alpha / max(config.rank) * gain``, the gain
    (:func:`ttkernels.init.scaling_gain`) with the group's number of targets as its sites. ``config.max_rank``,
    not the cores' ranks: rank changes and saved lower ranks keep the scaling."""
    out = {}
    for name, g in groups.items():
        sites = sum(t.group == name for t in targets)
        out[name] = adapter_scaling(config.alpha, config.max_rank, gain=scaling_gain(g.spec, sites=sites, rule=rule))
    return out


def get_metatt_model(model: nn.Module, config: MetaTTConfig) -> MetaTTModel:
    """Adapt ``model`` in place with one shared TT per target shape and return the wrapper.

    Every parameter of ``model`` is frozen; only the shared cores train. At initialization the last core of
    every TT is zero, so the wrapped model computes exactly what ``model`` computed.
    """
    return MetaTTModel(model, config)
