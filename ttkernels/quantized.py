"""Quantized frozen bases: TT adapters over bitsandbytes 4-bit and 8-bit linear layers (QLoRA-style) and
over torchao-quantized linear layers.

A quantized linear layer (``bitsandbytes.nn.Linear4bit``, nf4 or fp4, and ``bitsandbytes.nn.Linear8bitLt``)
stores a packed weight whose shape is not the layer's: its features are the layer's own ``in_features`` /
``out_features``, and only the layer's own forward knows how to multiply by it. Over such a base the
adapter layer computes, as PEFT's LoRA layers over bitsandbytes do,

    y = base(x) + scaling * drop(x) A C B

``base(x)`` is the quantized layer's forward (no dequantized copy of the weight is kept); ``A, C, B`` are the
factors of the cores (:func:`ttkernels.ops.factors`, differentiable). The adapter term is computed with torch
matmuls in the compute dtype (the fused kernels take the frozen weight as a dense GEMM operand, which a packed
weight is not), so autograd gives dx through the quantized base (bitsandbytes' own backward) plus the
adapter's dx, and the core gradients. Saved for backward: what bitsandbytes saves, ``S = drop(x) A``, and
with dropout the dropped input; the dropout mask is the seeded hash of :mod:`ttkernels.reference`.

**Merge** dequantizes the weight, adds delta-W in float32, and quantizes the sum again: the merged layer is
a quantized layer of the same kind, and the result differs from the unmerged adapter by the quantization's
rounding (a :class:`UserWarning` says so, as PEFT's does). The packed weight from before the merge is kept
(not copied: the merge installs a new weight Parameter), so unmerge puts it back bit for bit.

bitsandbytes is optional (``pip install ttkernels[bnb]``): it is never imported here, a layer is recognised
by its class only when ``bitsandbytes`` is already imported.

**torchao** (``pip install ttkernels[torchao]``; imported here only to requantize a torchao weight):
``torchao.quantization.quantize_``
keeps an ``nn.Linear`` and makes its weight a tensor subclass (a ``torchao.utils.TorchAOBaseTensor``:
``Int8Tensor`` for ``Int8WeightOnlyConfig`` / ``Int8DynamicActivationInt8WeightConfig``, ``Float8Tensor``,
``IntxUnpackedToInt8Tensor``, ...). Such a layer is the base kind ``"torchao"``: its forward is torchao's, dx
through it is what torchao's ops give (weight-only int8 gives the full dx; a dynamically quantized activation
gives none, so dx is the adapter's alone, as under PEFT's LoRA), the compute dtype is the weight's (its high
precision dtype). Merging requantizes symmetric ``Int8Tensor`` weights (per-row or per-tensor, keeping the
activation-quantization settings) with the rounding warning; every other torchao weight refuses
to merge (``TypeError``), since its quantization cannot be redone from the weight alone. Unmerge restores the
kept weight (the old tensor-subclass Parameter) bit for bit.

The adapter-layer base (:mod:`ttkernels.layer`) treats a quantized layer as a kind of frozen base: it
registers it as ``base_layer``, runs its forward, and merges through :func:`merged_weight` (keeping the packed
weight, :func:`packed_state`, for an exact unmerge). The layers call :func:`adapter_forward` /
:func:`adapter_term` for the adapted forward.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Optional

import torch
from torch import Tensor, nn

from . import checks, ops, reference
from .spec import TTSpec

__all__ = [
    "add_delta",
    "adapter_forward",
    "adapter_term",
    "check_mergeable",
    "compute_dtype",
    "dequantize_weight",
    "install_weight",
    "is_quantized_linear",
    "merged_weight",
    "num_weights",
    "packed_state",
    "quantization_of",
    "set_packed_state",
]

ROUNDING_WARNING = (
    "merging a TT adapter into a {kind} quantized layer dequantizes its weight, adds delta-W and quantizes "
    "the sum again: the merged layer's outputs differ from the unmerged adapter's by the rounding"
)


KINDS = ("bnb-4bit", "bnb-8bit", "torchao")


def _bnb():
    return sys.modules.get("bitsandbytes")


def _is_torchao_tensor(t: object) -> bool:
    """A torchao quantized tensor subclass (only when ``torchao`` is already imported)."""
    if "torchao" not in sys.modules or not isinstance(t, Tensor):
        return False
    utils = sys.modules.get("torchao.utils")
    base = getattr(utils, "TorchAOBaseTensor", None)
    return base is not None and isinstance(t, base)


def quantization_of(module: object) -> Optional[str]:
    """``"bnb-4bit"`` for a ``bitsandbytes.nn.Linear4bit``, ``"bnb-8bit"`` for a ``Linear8bitLt``,
    ``"torchao"`` for an ``nn.Linear`` whose weight is a torchao quantized tensor, else None."""
    if not isinstance(module, nn.Module):
        return None
    bnb = _bnb()
    if bnb is not None:
        if isinstance(module, bnb.nn.Linear4bit):
            return "bnb-4bit"
        if isinstance(module, bnb.nn.Linear8bitLt):
            return "bnb-8bit"
    if isinstance(module, nn.Linear) and _is_torchao_tensor(getattr(module, "weight", None)):
        return "torchao"
    return None


def is_quantized_linear(module: object) -> bool:
    """Whether ``module`` is a quantized linear layer this module handles."""
    return quantization_of(module) is not None


def num_weights(param: Tensor) -> int:
    """How many weights ``param`` holds: a bitsandbytes 4-bit parameter packs two per byte of its storage
    (PEFT's count in ``print_trainable_parameters``), every other tensor one per element."""
    if type(param).__name__ == "Params4bit":
        return param.numel() * 2 * param.element_size()
    return param.numel()


def _describe(module: nn.Module) -> str:
    kind = quantization_of(module)
    if kind == "torchao":
        return f"torchao {type(module.weight).__name__}"
    if kind == "bnb-4bit":
        return f"bitsandbytes 4-bit {getattr(module.weight, 'quant_type', '?')}"
    return "bitsandbytes 8-bit"


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the quantized layer computes in: a torchao weight's dtype (its high precision
    dtype), a 4-bit layer's ``compute_dtype`` when set, else its bias's dtype, else float32."""
    if quantization_of(module) == "torchao" and module.weight.dtype.is_floating_point:
        return module.weight.dtype
    dtype = getattr(module, "compute_dtype", None)
    if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
        return dtype
    bias = getattr(module, "bias", None)
    if isinstance(bias, Tensor) and bias.is_floating_point():
        return bias.dtype
    return torch.float32


def _check_x(x: object, in_features: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x has shape {tuple(x.shape)}; its last dimension must be in_features = {in_features}")
    return x


def adapter_term(
    x: Tensor,
    cores: Sequence[Tensor],
    spec: TTSpec,
    *,
    index: Mapping[str, int] | None = None,
    task_ids: Optional[Tensor] = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    seed: int | Tensor | None = None,
    backend: str = "auto",
) -> Tensor:
    """``scaling * drop(x) A C B`` alone (no base), ``(..., out_features)`` in the compute dtype: x's, or
    autocast's when it is on. Differentiable in x and the cores."""
    x = _check_x(x, spec.in_features)
    p = ops.check_dropout(dropout)
    dtype = ops.input_compute_dtype(x)
    A, C, B = ops.factors(list(cores), spec, index, dtype=dtype, backend=backend)
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, spec.in_features).to(dtype)
    ids = None
    if C is not None and C.dim() == 3:
        if task_ids is None:
            raise ValueError(f"the adapter has a per-sample (task) mode of {C.shape[0]} tasks: pass task_ids")
        ids = ops.expand_task_ids(task_ids, lead)
        if not torch.compiler.is_compiling():
            checks.check_task_ids_range(ids, C.shape[0])  # no host read on a GPU (a device-side assert)
    elif task_ids is not None:
        raise ValueError("task_ids was given but the adapter has no per-sample (task) mode")
    if p > 0.0:
        checks.check_seed(seed)
        x2 = reference.apply_dropout(x2, ops.dropout_seed(seed, x2.device), p)  # as the registry's ops draw it
    U = reference.mid(x2 @ A, C, ids)
    return (scaling * (U @ B)).reshape(*lead, spec.out_features)


def adapter_forward(
    base: nn.Module,
    x: Tensor,
    cores: Sequence[Tensor],
    spec: TTSpec,
    *,
    index: Mapping[str, int] | None = None,
    task_ids: Optional[Tensor] = None,
    scaling: float = 1.0,
    dropout: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """``base(x) + scaling * drop(x) A C B`` in the dtype of the base's output (x's dtype for bitsandbytes)."""
    x = _check_x(x, spec.in_features)
    result = base(x)
    term = adapter_term(
        x, cores, spec, index=index, task_ids=task_ids, scaling=scaling, dropout=dropout, backend=backend
    )
    return result + term.to(result.dtype)


# ------------------------------------------------------------------------------------------------ merge
def dequantize_weight(base: nn.Module, weight: Optional[Tensor] = None) -> Tensor:
    """The base's weight (or ``weight``, a packed weight of the base's kind, e.g. one kept by a merge) as a dense
    ``(out_features, in_features)`` float32 tensor (a new tensor)."""
    bnb = _bnb()
    kind = quantization_of(base)
    w = base.weight if weight is None else weight
    if kind == "torchao":
        return w.dequantize().float()
    if kind == "bnb-4bit":
        if getattr(w.quant_state, "packing_format_for_cpu", False):
            # repacked by bitsandbytes' CPU inference path (eval, no grad); undone as its own state_dict does
            unpack = getattr(bnb.functional, "_convert_weight_packed_for_cpu_inverse", None)
            if unpack is None:
                raise RuntimeError("this 4-bit weight is in bitsandbytes' CPU packing format, which cannot be undone")
            w.data, w.quant_state = unpack(w.data, w.quant_state)
        return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()
    if kind == "bnb-8bit":
        if w.dtype != torch.int8:  # has_fp16_weights: a plain float weight
            return w.detach().float().clone()
        scb = w.SCB if getattr(w, "SCB", None) is not None else base.state.SCB
        return bnb.functional.int8_vectorwise_dequant(w.data, scb.to(w.device)).float()
    raise TypeError(f"base must be a quantized linear layer, got {type(base).__name__}")


def _requantized(base: nn.Module, dense: Tensor) -> nn.Parameter:
    """A new weight Parameter of the base's kind holding ``dense`` quantized (the base is not changed)."""
    bnb = _bnb()
    w = base.weight
    kind = quantization_of(base)
    if kind == "torchao":
        return nn.Parameter(_requantized_torchao(w, dense), requires_grad=False)
    if kind == "bnb-4bit":
        qs = w.quant_state
        return bnb.nn.Params4bit(
            dense.to(qs.dtype).cpu(),
            requires_grad=False,
            blocksize=w.blocksize,
            compress_statistics=w.compress_statistics,
            quant_type=w.quant_type,
            quant_storage=w.quant_storage,
            module=base,
        ).to(w.device)
    if w.dtype != torch.int8:
        return bnb.nn.Int8Params(dense.to(w.dtype).to(w.device), requires_grad=False, has_fp16_weights=True)
    return bnb.nn.Int8Params(dense.to(torch.float16).cpu(), requires_grad=False, has_fp16_weights=False).to(w.device)


def check_mergeable(base: nn.Module) -> None:
    """TypeError when the quantized ``base`` cannot be merged into (a torchao weight other than ``Int8Tensor``,
    or an ``Int8Tensor`` that is asymmetric or whose blocks are neither per row nor per tensor)."""
    if quantization_of(base) == "torchao":
        _int8_granularity(base.weight)


def _int8_granularity(w: Tensor):
    name = type(w).__name__
    if name != "Int8Tensor" or not hasattr(w, "block_size"):
        raise TypeError(
            f"merging into a torchao {name} weight is refused: ttkernels requantizes torchao Int8Tensor weights "
            "only (Int8WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig). Use the adapter unmerged, or "
            "merge into a high-precision copy of the base"
        )
    zero = getattr(w, "zero_point", None)
    if isinstance(zero, Tensor) and bool((zero != 0).any()):
        raise TypeError("merging into an asymmetric torchao Int8Tensor (non-zero zero points) is refused")
    from torchao.quantization import PerRow, PerTensor  # torchao is imported: the weight is one of its tensors

    block, shape = list(w.block_size), list(w.shape)
    if block == shape:
        return PerTensor()
    if len(shape) == 2 and block == [1, shape[1]]:
        return PerRow()
    raise TypeError(
        f"merging into a torchao Int8Tensor with block size {block} (weight shape {shape}) is refused: only per-row "
        "and per-tensor int8 weights are requantized"
    )


def _requantized_torchao(w: Tensor, dense: Tensor) -> Tensor:
    """``dense`` quantized as ``w`` was: a symmetric Int8Tensor of the same granularity, dtype, device and
    activation-quantization settings (its scales are chosen again for the new values)."""
    new = type(w).from_hp(
        dense.to(device=w.device, dtype=w.dtype),
        _int8_granularity(w),
        act_quant_kwargs=getattr(w, "act_quant_kwargs", None),
        act_quant_scale=getattr(w, "act_quant_scale", None),
        act_quant_zero_point=getattr(w, "act_quant_zero_point", None),
        act_pre_scale=getattr(w, "act_pre_scale", None),
        reduce_range=getattr(w, "reduce_range", False),
    )
    return new


def packed_state(base: nn.Module) -> tuple:
    """Everything that defines a quantized base's weight: the weight Parameter itself (packed data and
    quantization statistics) and, for an 8-bit layer, the int8 weight and scales it caches in ``base.state``.
    :func:`set_packed_state` puts it back; nothing is copied (a merge replaces the weight, it does not write it)."""
    kind = quantization_of(base)
    if kind is None:
        raise TypeError(f"base must be a quantized linear layer, got {type(base).__name__}")
    if kind == "bnb-8bit":
        return (base.weight, base.state.CB, base.state.SCB)
    return (base.weight,)


def set_packed_state(base: nn.Module, state: tuple) -> None:
    """The base's weight (and 8-bit cache) back to a :func:`packed_state`."""
    base.weight = state[0]
    if len(state) == 3:
        base.state.CB, base.state.SCB = state[1], state[2]


@torch.no_grad()
def merged_weight(
    base: nn.Module, delta: Tensor, *, source: Optional[tuple] = None, safe: bool = False, what: str = "the adapter"
) -> nn.Parameter:
    """A new weight Parameter of the base's kind: ``quantize(dequantize(W) + delta)``, ``W`` the base's weight
    or the one of ``source`` (a :func:`packed_state`). ``delta`` is the scaled ``(out_features, in_features)``
    delta-W. Warns about the rounding. Nothing is changed; with ``safe``, a non-finite delta or sum raises."""
    kind = quantization_of(base)
    if kind is None:
        raise TypeError(f"base must be a quantized linear layer, got {type(base).__name__}")
    shape = (base.out_features, base.in_features)
    if tuple(delta.shape) != shape:
        raise ValueError(f"delta has shape {tuple(delta.shape)} but must be (out_features, in_features) = {shape}")
    check_mergeable(base)
    warnings.warn(ROUNDING_WARNING.format(kind=_describe(base)), UserWarning, stacklevel=3)
    if source is None:
        dense = dequantize_weight(base)
    else:
        current = packed_state(base)
        set_packed_state(base, source)  # the kept weight's 8-bit scales may live in base.state
        try:
            dense = dequantize_weight(base)
        finally:
            set_packed_state(base, current)
    dense = dense + delta.to(device=dense.device, dtype=torch.float32)
    if safe and not torch.isfinite(dense).all():
        raise ValueError(f"merging {what} refused: the merged weight would hold non-finite values (safe_merge=True)")
    return _requantized(base, dense)


def install_weight(base: nn.Module, weight: nn.Parameter) -> None:
    """``weight`` (from :func:`merged_weight`) becomes the base's weight."""
    base.weight = weight
    if quantization_of(base) == "bnb-8bit":
        # drop the quantized weight the layer keeps in its state: it takes CB / SCB from the new weight on the
        # next forward (Linear8bitLt.init_8bit_state), or quantizes it again (has_fp16_weights)
        base.state.CB = None
        base.state.SCB = None


@torch.no_grad()
def add_delta(base: nn.Module, delta: Tensor, sign: float = 1.0, *, safe: bool = False) -> None:
    """``W <- quantize(dequantize(W) + sign * delta)`` for a quantized ``base``, for good (no copy is kept: what
    ``merge_and_unload`` does). Warns about the rounding. With ``safe``, a non-finite sum raises ValueError and
    the base is left as it was (it is also left as it was when requantizing fails)."""
    install_weight(base, merged_weight(base, sign * delta, safe=safe))
