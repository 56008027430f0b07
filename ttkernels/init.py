"""Initialization and scaling of TT adapters: why they train at LoRA's ``r``, ``alpha`` and learning rate.

**What an Adam step does.** Adam's first step moves every trainable entry by ``lr`` times the sign of its
gradient (later steps by about ``lr`` each). With delta-W zero at initialization (the last core zero, as
LoRA's ``B``), the first step moves the last core only, and the adapter's output changes by

    scaling * x L dG_K,        L = the product of the other cores (frozen during this step)

Its component along the gradient, which is what lowers the loss, is ``lr * scaling * ||g_K||_1`` where
``g_K`` is the gradient of the last core without the scaling. For LoRA (``L = A`` with
entries of variance ``1 / (3 d_in)``, ``dG_K = dB``) every one of the ``r d_out`` entries of ``B`` follows its
own gradient: ``||g_B||_1 ~ r d_out g`` for gradient entries of size ``g``.

**A chain shares its last core.** In a TT the last core ``(r, s_K, 1)`` serves ``F`` entries of LoRA's ``B``
per entry: the other out modes (``d_out / s_K`` output positions) and, for a shared TT (MetaTT), every site
(targeted matrix) of its group. Its gradient sums ``F`` terms of LoRA's gradient through ``L``, whose signs
do not agree (different outputs, different layers), so it grows like ``sqrt(F)`` rather than ``F``, and the
change of the output along the gradient is ``1 / sqrt(F)`` of LoRA's at the same ``alpha / r``:

    F = sites * d_out / s_K                     (TT-LoRA, LoTR, MetaTT 4D/5D, with or without tasks)

(LoRA-shaped: ``F = 1``; TT-LoRA with out modes ``(24, 16)`` of 384: ``F = 24``; MetaTT-4D on 18 matrices:
``F = 18``; MetaTT-5D with 12 heads: ``F = 18 * 12``.) The per-sample ``task`` mode does not add to ``F``:
tasks share the last core as the samples of a batch do. A TT-matrix core ``(r, m_K, n_K, 1)`` also
contracts ``n_K`` of the inputs, which LoRA's ``B`` does not, and the same count gives
``F = d_out / (m_K n_K^2)`` (below 1 for large last cores: a TT-matrix moves faster than LoRA).

**The rule** (``SCALING_RULE = 2``): ``scaling = alpha / r * sqrt(F)`` (``alpha / sqrt(r) * sqrt(F)`` with
rsLoRA), ``r`` the largest bond rank, and the first in-mode core drawn so that the in part has LoRA's variance
``1 / (3 d_in)`` (PEFT's Kaiming-uniform ``A``). Then the first Adam step moves the output along the gradient
as much as LoRA's does at the same ``r``, ``alpha`` and ``lr`` (tests/test_init.py measures it against PEFT's
LoRA layer for every format), a LoRA-shaped adapter is LoRA (``F = 1``), and ``sqrt(F)`` depends on mode
sizes and sites only, never on ranks, so rank changes (``rank.compress_``, ``RankSchedule``,
``MetaTTModel.replace_cores``) keep the scaling. Rule 1, before: ``scaling = alpha / r``; adapters saved
under it load with it (their config carries the rule's version).

The price of the gain: the part of the step that is not along the gradient grows by ``sqrt(F)`` too (the
last core cannot follow each output's gradient on its own), so the largest stable learning rate of a
strongly shared TT (MetaTT-5D) can be lower than LoRA's; the ``convergence`` preset of ``python -m bench``
measures both.

**Inner cores** (neither the first nor the last: index cores, the other in and out modes) start at a scale of
about 1 and move by ``lr`` a step, so they change far more slowly, relative to their size, than LoRA's ``A``.
:func:`core_lr_groups` gives them their own learning rate, ``lr * sigma_k / sigma_first`` (the ratio of
initial standard deviations), as LoRA+ gives ``B`` its own: optimizer groups, not a default, since a plain
``AdamW(model.parameters(), lr)`` must already train (the ``convergence`` preset measures both).

``alpha=None`` means ``scaling = 1`` (the cores carry delta-W unscaled), as it did before: a converted or
hand-built adapter (``rank.from_lora``) is exact with it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from . import layer
from .checks import check_alpha
from .spec import TTSpec

__all__ = [
    "SCALING_RULE",
    "adapter_scaling",
    "core_lr_groups",
    "init_cores_",
    "init_stds",
    "init_ttm_cores_",
    "scaling_gain",
    "sharing",
]

SCALING_RULE = 2
RULES = (1, 2)
LORA_A_VARIANCE = 1.0 / 3.0  # PEFT's kaiming_uniform_(a=sqrt(5)) on A: Var = 1 / (3 fan_in)


def _is_ttm(spec: Any) -> bool:
    return not isinstance(spec, TTSpec) and all(hasattr(spec, a) for a in ("in_modes", "out_modes", "ranks"))


def sharing(spec: Any, sites: int = 1) -> float:
    """``F``: how many entries of LoRA's ``B`` (on ``sites`` matrices) one entry of the last core stands for
    (module docstring). ``spec`` is a :class:`~ttkernels.TTSpec` or a :class:`~ttkernels.ttm.TTMSpec`."""
    if isinstance(sites, bool) or not isinstance(sites, int) or sites < 1:
        raise ValueError(f"sites must be a positive int, got {sites!r}")
    if _is_ttm(spec):
        m, n = spec.out_modes[-1], spec.in_modes[-1]
        return sites * spec.out_features / (m * n * n)
    if not isinstance(spec, TTSpec):
        raise TypeError(f"spec must be a TTSpec or a TTMSpec, got {type(spec).__name__}")
    last = spec.modes[-1]
    return sites * spec.out_features / (last.size if last.role == "out" else 1)


def scaling_gain(spec: Any, *, sites: int = 1, rule: int = SCALING_RULE) -> float:
    """The factor rule ``rule`` puts on ``alpha / r``: ``sqrt(F)`` for rule 2, 1 for rule 1."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return 1.0 if rule == 1 else math.sqrt(sharing(spec, sites))


def adapter_scaling(
    alpha: Optional[float], spec: Any, *, sites: int = 1, rule: int = SCALING_RULE, rslora: bool = False
) -> float:
    """The scaling of an adapter of ``spec`` on ``sites`` matrices under rule ``rule``:
    :func:`ttkernels.layer.adapter_scaling` (the one formula, ``alpha / r * gain``; 1 for ``alpha=None``) with
    ``r`` = the largest bond rank and ``gain`` = :func:`scaling_gain`."""
    alpha = check_alpha(alpha)
    gain = scaling_gain(spec, sites=sites, rule=rule)
    return layer.adapter_scaling(alpha, spec.max_rank, rslora=rslora, gain=gain)


@torch.no_grad()
def init_cores_(cores: Sequence[Tensor], spec: TTSpec) -> None:
    """Draw ``cores`` in place: the last core zero (delta-W starts at exactly zero), in-mode cores from
    ``N(0, 1 / (r_{k-1} s_k))`` with the first one's variance times 1/3 (so the in part ``A`` has LoRA's
    variance ``1 / (3 d_in)``), every other core from ``N(0, 1 / r_{k-1})`` (it keeps the scale of what it
    multiplies)."""
    last = len(cores) - 1
    first_in = next((k for k, m in enumerate(spec.modes) if m.role == "in"), None)
    for k, core in enumerate(cores):
        if k == last:
            core.zero_()
            continue
        r0, s, _ = core.shape
        var = 1.0 / (r0 * s) if spec.modes[k].role == "in" else 1.0 / r0
        if k == first_in:
            var *= LORA_A_VARIANCE
        core.normal_(0.0, math.sqrt(var))


@torch.no_grad()
def init_ttm_cores_(cores: Sequence[Tensor]) -> None:
    """TT-matrix cores ``(r_{k-1}, m_k, n_k, r_k)`` in place: the last zero, the others from
    ``N(0, 1 / (r_{k-1} n_k))`` (the first times 1/3, as LoRA's ``A``)."""
    last = len(cores) - 1
    for k, core in enumerate(cores):
        if k == last:
            core.zero_()
            continue
        var = 1.0 / (core.shape[0] * core.shape[2]) * (LORA_A_VARIANCE if k == 0 else 1.0)
        core.normal_(0.0, math.sqrt(var))


def init_stds(spec: Any) -> list[Optional[float]]:
    """The standard deviation :func:`init_cores_` (or :func:`init_ttm_cores_`) draws each core from; None for
    the last core (zero)."""
    if _is_ttm(spec):
        shapes = spec.core_shapes
        out: list[Optional[float]] = [
            math.sqrt(1.0 / (r0 * n) * (LORA_A_VARIANCE if k == 0 else 1.0)) for k, (r0, _, n, _) in enumerate(shapes)
        ]
    else:
        first_in = next((k for k, m in enumerate(spec.modes) if m.role == "in"), None)
        out = []
        for k, ((r0, s, _), mode) in enumerate(zip(spec.core_shapes, spec.modes)):
            var = 1.0 / (r0 * s) if mode.role == "in" else 1.0 / r0
            out.append(math.sqrt(var * (LORA_A_VARIANCE if k == first_in else 1.0)))
    out[-1] = None
    return out


def _core_chains(model: torch.nn.Module) -> list[tuple[list[Tensor], Any]]:
    """Every ``(cores, spec)`` chain of ``model`` (TTLinear and its views, MetaTT groups, TT-LoRA layers of
    PEFT, TTMLinear), each once."""
    chains, seen = [], set()

    def add(cores: Any, spec: Any) -> None:
        cores = list(cores)
        if cores and id(cores[0]) not in seen:
            seen.add(id(cores[0]))
            chains.append((cores, spec))

    for m in model.modules():
        groups = getattr(m, "groups", None)
        if isinstance(getattr(m, "metatt_cores", None), torch.nn.ModuleDict) and isinstance(groups, dict):
            for name, cores in m.metatt_cores.items():
                add(cores, groups[name].spec)
        if isinstance(getattr(m, "lora_tt_cores", None), torch.nn.ModuleDict):
            for name, cores in m.lora_tt_cores.items():
                add(cores, m.tt_spec[name])
        if isinstance(getattr(m, "cores", None), torch.nn.ParameterList) and hasattr(m, "spec"):
            add(m.cores, m.spec)
    return chains


def core_lr_groups(model: torch.nn.Module, lr: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups that give the inner cores of every TT of ``model`` a larger learning rate,
    as LoRA+ does for ``B``: core ``k`` (not the first, not the last) gets ``lr * sigma_k / sigma_first``
    (at least ``lr``), ``sigma`` the standard deviations of the initialization (:func:`init_stds`), so every
    core's entries change at the same relative rate per Adam step as the first core's (LoRA's ``A``). The
    first and the last core, and any other trainable parameter, keep ``lr``.

        opt = torch.optim.AdamW(tk.init.core_lr_groups(model, lr=1e-3), lr=1e-3)
    """
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or not math.isfinite(lr):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    groups: list[dict[str, Any]] = []
    placed = set()
    for cores, spec in _core_chains(model):
        stds = init_stds(spec)
        for k, (core, std) in enumerate(zip(cores, stds)):
            if not core.requires_grad:
                continue
            mult = 1.0 if std is None or k == 0 else max(1.0, std / stds[0])
            groups.append({"params": [core], "lr": lr * mult})
            placed.add(id(core))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in placed]
    if rest:
        groups.append({"params": rest, "lr": lr})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups
