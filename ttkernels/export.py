"""Plain PEFT LoRA folders from TT adapters: the route to stock PEFT and to multi-LoRA serving engines.

A bottleneck-form TT adapter of one matrix is ``dW = scaling * B^T C^T A^T``: LoRA of rank ``r_b`` with
``lora_A = (A C)^T`` and ``lora_B = scaling * B^T`` (:func:`lora_factors`, public as
:func:`ttkernels.rank.to_lora`). :func:`write_lora_folder`
writes such factors as PEFT writes a LoRA adapter: ``adapter_config.json`` with ``peft_type`` ``LORA``,
``r`` the most common rank and ``rank_pattern`` for the targets of other ranks, ``lora_alpha = r`` (and
``alpha_pattern`` beside ``rank_pattern``) so PEFT's ``lora_alpha / r`` is 1 and the scaling lives in the
factors; ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``.
Stock ``peft.PeftModel.from_pretrained`` loads it without ttkernels, and so do serving engines that take PEFT
LoRA folders (vLLM ``--enable-lora --lora-modules name=folder``, SGLang ``--lora-paths name=folder``).

The callers are :meth:`ttkernels.MetaTTModel.export_lora` and :func:`ttkernels.peft.export_lora`. This module
sits below both (it imports only :mod:`ttkernels.reference`; PEFT inside :func:`write_lora_folder`).
"""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Any, Optional

import torch
from torch import Tensor

from . import reference
from .spec import TTSpec

__all__ = ["lora_factors", "write_lora_folder"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_ALLOWED_CONFIG = {"task_type", "base_model_name_or_path", "revision", "inference_mode"}


def lora_factors(
    cores: list[Tensor], spec: TTSpec, index: Optional[dict] = None, *, task: Optional[int] = None, scaling: float = 1.0
) -> tuple[Tensor, Tensor]:
    """``(lora_A (r, d_in), lora_B (d_out, r))`` with ``lora_B @ lora_A == scaling * dW``, from the bottleneck form
    ``dW^T = A C B`` (``r = r_b``); ``index`` / ``task`` pick fixed and per-sample slices. Arguments are checked by
    the callers (:func:`ttkernels.rank.to_lora`)."""
    A, C, B = reference.task_factors(list(cores), spec, index, task=task, caller="to_lora")
    AC = A if C is None else A @ C
    B = B if scaling == 1.0 else B * scaling
    return AC.t().contiguous(), B.t().contiguous()


def write_lora_folder(
    save_directory: str | os.PathLike,
    factors: dict[str, tuple[Tensor, Tensor]],
    *,
    modules_to_save: Optional[list[str]] = None,
    extra_tensors: Optional[dict[str, Tensor]] = None,
    fan_in_fan_out: bool = False,
    dtype: Optional[torch.dtype] = None,
    **config: Any,
) -> None:
    """Write ``factors`` (module name -> ``(lora_A (r, d_in), lora_B (d_out, r))``, the scaling folded in) as a
    PEFT LoRA folder. ``extra_tensors`` are written as given (``modules_to_save`` weights under PEFT's keys);
    ``dtype`` casts the factors (default: as given); ``config`` may set ``task_type``,
    ``base_model_name_or_path``, ``revision``, ``inference_mode``."""
    import peft
    from safetensors.torch import save_file

    bad = sorted(set(config) - _ALLOWED_CONFIG)
    if bad:
        raise TypeError(f"export_lora takes LoraConfig fields {sorted(_ALLOWED_CONFIG)} only, got {bad}")
    if not factors:
        raise ValueError("export_lora: the adapter has no target modules")
    ranks = {}
    tensors: dict[str, Tensor] = {}
    for name, (A, B) in factors.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise ValueError(f"{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} are not LoRA factors")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise ValueError(f"{name}: the adapter holds non-finite values; nothing was written")
        ranks[name] = int(A.shape[0])
        cast = dtype or A.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.detach().to("cpu", cast).clone()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.detach().to("cpu", cast).clone()
    for key, t in (extra_tensors or {}).items():
        tensors[key] = t.detach().to("cpu").clone()  # one storage per tensor (safetensors)
    r = collections.Counter(ranks.values()).most_common(1)[0][0]
    # PEFT matches pattern keys as regular expressions against module names: escape the literal names
    pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    lora = peft.LoraConfig(
        r=r,
        lora_alpha=r,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        target_modules=sorted(factors),
        lora_dropout=0.0,
        bias="none",
        fan_in_fan_out=fan_in_fan_out,
        modules_to_save=modules_to_save,
        **config,
    )
    os.makedirs(save_directory, exist_ok=True)
    lora.save_pretrained(str(save_directory))
    save_file(tensors, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(save_directory, CONFIG_NAME)) as f:  # what PEFT wrote is what it will read
        if json.load(f).get("peft_type") != "LORA":
            raise RuntimeError(f"{save_directory}: PEFT did not write a LORA config")
