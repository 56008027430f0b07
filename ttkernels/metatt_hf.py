"""What PEFT- and transformers-written code expects of an adapted model, for :class:`~ttkernels.MetaTTModel`.

* ``forward``'s signature is the wrapped model's plus ``task_ids``, so ``transformers.Trainer`` keeps a dataset's
  ``task_ids`` column (and the model's own columns) with ``remove_unused_columns`` left on.
* ``state_dict`` holds each shared core once (``metatt_cores.*``): the views' copies of the same Parameters are
  left out, so safetensors (Trainer checkpoints) accepts it; ``load_state_dict`` fills the views' keys back in.
* ``generate(..., task_ids=)`` holds one task per sequence through every decoding step: each forward of the
  wrapped model within ``generate`` gets the ids repeated to its batch (beams and returned sequences are
  repeated per sample, as transformers expands them), KV cache included.
* Gradient checkpointing: recomputation in the backward pass runs outside ``forward``, so the task ids of the
  forward are handed to it through ``torch.utils.checkpoint``'s ``context_fn`` (non-reentrant checkpointing).
* ``export_lora`` (a plain PEFT LoRA folder per task, :mod:`ttkernels.export`), ``get_base_model()``,
  ``base_model``, ``device``, ``dtype``, ``config`` (the wrapped model's), parameter counts; other attributes
  fall through to the wrapped model, as PEFT's ``PeftModel`` does. (Merging, per task too, is
  :class:`~ttkernels.MetaTTModel`'s own: ``merge(task=)``, ``unmerge()``, ``merge_and_unload(task=)``.)
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .export import lora_factors, write_lora_folder

__all__ = ["ForwardWithModelSignature", "PeftSurface"]


class ForwardWithModelSignature:
    """``forward`` of the class, bound on access with the wrapped model's signature plus ``task_ids``
    (``inspect.signature(w.forward)``, which Trainer reads to choose the dataset columns it keeps)."""

    def __set_name__(self, owner: type, name: str) -> None:
        # Seen on the class (transformers' find_labels(type(model)) reads it), forward names ``labels``, which it
        # passes on to the model like any keyword: the Trainer then computes evaluation losses.
        fn = owner._forward
        sig = inspect.signature(fn)
        if "labels" not in sig.parameters:
            labels = inspect.Parameter("labels", inspect.Parameter.KEYWORD_ONLY, default=None)
            params = list(sig.parameters.values())
            fn.__signature__ = sig.replace(parameters=[*params[:-1], labels, params[-1]])

    def __get__(self, obj: Any, objtype: Any = None) -> Any:
        if obj is None:
            return objtype._forward
        if torch.compiler.is_compiling():  # the signature is for inspection only
            return functools.partial(type(obj)._forward, obj)
        bound = functools.partial(type(obj)._forward, obj)
        bound.__signature__ = obj._forward_signature()
        return bound


def _with_task_ids(sig: inspect.Signature) -> inspect.Signature:
    params = list(sig.parameters.values())
    if "task_ids" in sig.parameters:
        return sig
    task = inspect.Parameter("task_ids", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[Tensor])
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    rest = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return sig.replace(parameters=[*rest, task, *var_kw])


class PeftSurface:
    """Mixed into :class:`~ttkernels.MetaTTModel` (which provides ``model``, ``views()``, ``metatt_config``,
    ``modules_to_save``, ``_task_scope``, ``_current_task_ids``, ``_check_task_ids``)."""

    model: nn.Module

    # -------------------------------------------------------------------------------- attributes
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module: parameters, buffers, submodules
        except AttributeError:
            if name == "model" or name.startswith("__"):
                raise
            return getattr(self.model, name)

    @property
    def config(self) -> Any:
        """The wrapped model's config (``transformers``' ``PretrainedConfig``); the adapter's is ``metatt_config``."""
        return getattr(self.model, "config", None)

    @property
    def base_model(self) -> nn.Module:
        """The wrapped (adapted) model."""
        return self.model

    def get_base_model(self) -> nn.Module:
        return self.model

    @property
    def device(self) -> torch.device:
        first = next(iter(self.model.parameters()), None)
        return first.device if first is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        dtype = getattr(self.model, "dtype", None)
        if isinstance(dtype, torch.dtype):
            return dtype
        first = next((p for p in self.model.parameters() if p.is_floating_point()), None)
        return first.dtype if first is not None else torch.get_default_dtype()

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        """``(trainable, all)`` parameter counts, each shared Parameter once (PEFT's name)."""
        params = list(self.parameters())
        return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)

    def _forward_signature(self) -> inspect.Signature:
        cached = self.__dict__.get("_forward_sig")
        if cached is None:
            try:
                cached = _with_task_ids(inspect.signature(self.model.forward))
            except (TypeError, ValueError):
                cached = inspect.signature(type(self)._forward).replace()
                cached = cached.replace(parameters=list(cached.parameters.values())[1:])
            self.__dict__["_forward_sig"] = cached
        return cached

    # -------------------------------------------------------------------------------- state dict
    def _install_state_dict_hooks(self) -> None:
        self._register_state_dict_hook(_drop_view_cores)
        self._register_load_state_dict_pre_hook(_fill_view_cores, with_module=True)

    def _view_core_keys(self) -> dict[str, str]:
        """``model.<target>.cores.<k>`` -> ``metatt_cores.<group>.<k>``."""
        return {
            f"model.{t.name}.cores.{k}": f"metatt_cores.{t.group}.{k}"
            for t in self.targets
            for k in range(len(self.metatt_cores[t.group]))
        }

    # -------------------------------------------------------------------------------- generation
    def generate(self, *args: Any, task_ids: Optional[Tensor] = None, **kwargs: Any) -> Any:
        """The wrapped model's ``generate``; a task adapter takes ``task_ids`` (one per input sequence), held
        through every decoding step."""
        generate = getattr(self.model, "generate", None)
        if generate is None:
            raise TypeError(f"the wrapped {type(self.model).__name__} has no generate method")
        task_ids = self._check_task_ids(task_ids)
        if task_ids is None:
            return generate(*args, **kwargs)
        count = task_ids.shape[0]
        given = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
        if isinstance(given, Tensor) and given.dim() and given.shape[0] != count:
            raise ValueError(f"generate: {given.shape[0]} input sequences but {count} task_ids (one per sequence)")
        scopes: list[contextlib.ExitStack] = []
        thread = threading.get_ident()  # the hooks are the model's: calls from other threads pass them by

        # Another thread's forward can meet these hooks while they are being added or removed, when torch has not
        # yet (or no longer) marked them as taking kwargs: they then get no ``kw`` and return at once, as they do
        # for every other thread's call.
        def before(module: nn.Module, a: tuple, kw: Optional[dict] = None) -> None:
            if threading.get_ident() != thread or kw is None:
                return
            x = kw.get("input_ids")
            if x is None:
                x = kw.get("inputs_embeds")
            if x is None and a and isinstance(a[0], Tensor):
                x = a[0]
            rows = x.shape[0] if isinstance(x, Tensor) and x.dim() else count
            if rows % max(count, 1):
                raise ValueError(f"generate: a step of {rows} sequences for {count} task_ids (not a multiple)")
            ids = task_ids.to(x.device if isinstance(x, Tensor) else task_ids.device)
            stack = contextlib.ExitStack()
            stack.enter_context(self._task_scope(ids.repeat_interleave(rows // max(count, 1))))
            scopes.append(stack)

        def after(module: nn.Module, a: tuple, *kw_out: Any) -> None:
            if threading.get_ident() == thread and scopes:
                scopes.pop().close()

        handles = [
            self.model.register_forward_pre_hook(before, with_kwargs=True),
            self.model.register_forward_hook(after, with_kwargs=True, always_call=True),
        ]
        try:
            with self._task_scope(task_ids):  # an encoder run outside the model's forward sees the ids as given
                return generate(*args, **kwargs)
        finally:
            for h in handles:
                h.remove()
            while scopes:
                scopes.pop().close()

    # -------------------------------------------------------------------------------- gradient checkpointing
    def _checkpoint_kwargs(self, kwargs: Optional[dict]) -> dict:
        kwargs = {"use_reentrant": False} | dict(kwargs or {})
        if self.metatt_config.num_tasks is not None:
            if kwargs["use_reentrant"]:
                raise ValueError(
                    "a MetaTT task adapter needs non-reentrant checkpointing (use_reentrant=False): the task ids of "
                    "the forward reach the recomputation through context_fn"
                )
            if "context_fn" in kwargs:
                raise ValueError("a MetaTT task adapter sets the checkpoint's context_fn itself; do not pass one")

            def context_fn() -> tuple[Any, Any]:
                ids = self._current_task_ids()  # the ids of the forward that is being checkpointed
                return contextlib.nullcontext(), self._task_scope(ids)

            kwargs["context_fn"] = context_fn
        return kwargs

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kw: Any) -> None:
        """The wrapped model's gradient checkpointing, non-reentrant by default (the frozen inputs need no
        ``requires_grad``), with the task ids carried into recomputation."""
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kw)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None, **kw: Any):
        kwargs = self._checkpoint_kwargs(activation_checkpointing_kwargs)
        model = self.model
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, **kw)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, **kw)
        else:
            raise TypeError(f"the wrapped {type(model).__name__} has no gradient checkpointing")

    def gradient_checkpointing_disable(self) -> None:
        disable = getattr(self.model, "activation_checkpointing_disable", None) or getattr(
            self.model, "gradient_checkpointing_disable", None
        )
        if disable is None:
            raise TypeError(f"the wrapped {type(self.model).__name__} has no gradient checkpointing")
        disable()

    def enable_input_require_grads(self) -> None:
        """The input embeddings' output requires grad (for reentrant checkpointing of a frozen model)."""
        fn = getattr(self.model, "enable_input_require_grads", None)
        if fn is None:
            raise TypeError(f"the wrapped {type(self.model).__name__} has no enable_input_require_grads")
        fn()

    def disable_input_require_grads(self) -> None:
        fn = getattr(self.model, "disable_input_require_grads", None)
        if fn is None:
            raise TypeError(f"the wrapped {type(self.model).__name__} has no disable_input_require_grads")
        fn()

    # -------------------------------------------------------------------------------- export
    @torch.no_grad()
    def export_lora(self, save_directory: str | os.PathLike, task: Optional[int] = None, **config: Any) -> list[str]:
        """Write a plain PEFT LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``) with the same
        delta-W as this adapter, for stock PEFT and multi-LoRA serving engines; returns the folders written.

        Each target's factors are its bottleneck form (``r`` = its TT's bottleneck rank, ``rank_pattern`` where
        groups differ), the scaling folded into ``lora_B`` with ``lora_alpha = r`` (PEFT's ``lora_alpha / r``
        is 1). A task adapter writes one folder per task (``task_<t>/``), or only ``task``'s into
        ``save_directory``. ``modules_to_save`` go along. ``config`` adds ``LoraConfig`` fields (``task_type``,
        ``base_model_name_or_path``)."""
        num_tasks = self.metatt_config.num_tasks
        if any(view.merged for _, view in self.views()):
            raise RuntimeError("export_lora: the adapter is merged into the weights; unmerge() first")
        if num_tasks is None:
            if task is not None:
                raise ValueError(f"task={task!r} was given but this MetaTT adapter has no 'task' mode")
            jobs = [(None, save_directory)]
        elif task is None:
            jobs = [(t, os.path.join(save_directory, f"task_{t}")) for t in range(num_tasks)]
        else:
            if isinstance(task, bool) or not isinstance(task, int) or not 0 <= task < num_tasks:
                raise ValueError(f"task must be an int in [0, {num_tasks}), got {task!r}")
            jobs = [(task, save_directory)]
        extra = {
            f"base_model.model.{name}.{key}": t
            for name in self.modules_to_save
            for key, t in self.model.get_submodule(name).state_dict().items()
        }
        conv = {view.weight_transposed for _, view in self.views()}
        if len(conv) > 1:
            raise ValueError("export_lora: the targets mix nn.Linear and Conv1D layers (PEFT's fan_in_fan_out)")
        written = []
        for t, folder in jobs:
            factors = {}
            for name, view in self.views():
                A, B = lora_factors(list(view.cores), view.spec, view.index, task=t, scaling=view.scaling)
                factors[name] = (A, B)
            write_lora_folder(
                folder, factors, modules_to_save=list(self.modules_to_save) or None, extra_tensors=extra,
                fan_in_fan_out=conv == {True}, **config,
            )  # fmt: skip
            written.append(str(folder))
        return written


def _drop_view_cores(module: Any, state_dict: dict, prefix: str, local_metadata: Any) -> None:
    for key in module._view_core_keys():
        state_dict.pop(prefix + key, None)


def _fill_view_cores(module: Any, state_dict: dict, prefix: str, *args: Any) -> None:
    for key, owner in module._view_core_keys().items():
        if prefix + key not in state_dict and prefix + owner in state_dict:
            state_dict[prefix + key] = state_dict[prefix + owner]
