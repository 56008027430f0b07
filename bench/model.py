"""The ``model`` preset: one training step of a stack of LLaMA-7B-sized decoder layers, per adapter provider.

**The model.** A transformers ``LlamaModel`` built from a ``LlamaConfig`` with random weights (nothing is
downloaded): hidden 4096, intermediate 11008, 32 attention heads, in two variants, ``llama7b-gqa8`` (8 KV
heads, grouped-query attention) and ``llama7b-mha`` (32 KV heads, LLaMA-7B itself). Only a few decoder
layers are built (default 4): the adapters' cost is per layer, and 32 layers of every provider would not fit
the GPU side by side. Base weights are frozen and in the benchmark dtype (bf16 on the GPU, fp32 on the CPU);
attention is ``sdpa`` (``eager`` where transformers refuses ``sdpa``).

**No vocabulary.** The step feeds ``inputs_embeds`` (random, ``requires_grad=True``) and takes the loss as
``mean(h ** 2)`` of the last hidden state, so neither the token embedding nor an LM head is part of what is
timed (the vocabulary is 1024 only to keep the unused embedding table small). The LM head of a 32000-token
vocabulary would add the same cost to every provider and hide the adapters' difference. Because the input
requires grad, backward runs through every layer even for the frozen model, as it would below an adapter.

**Tokens.** On the GPU batch 2 x seq 2048 = 4096 tokens per step (the token counts of the published fused
LoRA kernels' benchmarks), which fits an 80 GB H100 with every provider, one at a time. ``quick=True`` (the
CPU) uses a tiny model of the same structure (hidden 256, intermediate 688, 8 heads, 2 or 8 KV heads,
2 layers, batch 2 x seq 32), and its rows say ``tiny-gqa`` / ``tiny-mha``.

**Providers**, each timed for a whole training step (forward, loss, backward, AdamW step over the
trainable parameters, ``zero_grad(set_to_none=True)``):

* ``frozen``: no adapter, no optimizer; backward reaches ``inputs_embeds``.
* ``peft-lora``: PEFT's LoRA on q/k/v/o/gate/up/down, ``r = lora_alpha = rank``, no dropout; the adapter
  dtype is PEFT's default (float32 on a bf16 base) and is recorded in the row.
* ``metatt``: ``ttkernels.get_metatt_model`` with ``MetaTTConfig(q/k/v/o/gate/up/down, rank, alpha=rank)``:
  one TT per (in_features, out_features) group of the targeted projections, chained
  ``(in, layer, matrix, out)``; its index modes pick the layer and which matrix of the group; every targeted
  ``nn.Linear`` becomes a view of its group's shared cores.
* ``metatt-factored``: the same layout built here with ``TTLinear.from_cores`` views and ``d_in`` and
  ``d_out`` each split into two modes (``factorize(d, 2)``), which ``MetaTTConfig`` does not offer.
* ``peft-qlora`` and ``metatt-4bit``, the 4-bit-base pair: every targeted projection of the frozen model is
  replaced by a ``bitsandbytes.nn.Linear4bit`` (nf4, double quantization, compute dtype = the benchmark
  dtype) holding the same weights, and PEFT's LoRA (its QLoRA layer, ``r = lora_alpha = rank``) or MetaTT
  (as ``metatt``) is put on that same 4-bit model. Their rows carry ``base = "nf4"``. Step time, tokens/s and
  peak memory are measured on a GPU only; on the CPU these rows have them as None ("not measured": the
  CPU's bitsandbytes path says nothing about a GPU's) and report the counts. Without bitsandbytes the pair
  gets no row and a :class:`ProviderSkipped` warning.

**The correctness gate.** Before an adapted provider is timed, on a short input (one sample, at most 256
tokens): (1) its trainable parameters are exactly the adapter's expected count (the base is frozen); (2) at
its initial state (delta-W = 0) its output equals the frozen model's; (3) after adding N(0, 0.02) noise to
every adapter parameter (0.02 is LLaMA's weight init std) its output moves away from the frozen output, and
the move matches the frozen model run with every delta-W merged into its weights (PEFT's
``get_delta_weight``, TTLinear's ``delta_weight``; for the 4-bit pair, merged into the dequantized weights); (4) a backward gives every adapter parameter a finite,
non-zero gradient. A provider that fails gets no row: :func:`run_model` warns with
:class:`ProviderCheckFailed` naming the check and the numbers, and goes on.

**Metrics** per row: median step time (:func:`bench.harness.measure`, no L2 flush: a whole step is far
larger than the cache), ``tokens_per_s = M / time``, ``peak_mem_bytes`` (CUDA only), trainable ``params``
(shared cores counted once), ``adapter_bytes`` (the trainable parameters' bytes: what an adapter checkpoint
holds), ``saved_bytes_per_token`` (bytes autograd saves over forward + loss, every model
parameter and buffer excluded, divided by M; it includes the token-independent tensors saved while the TT
factors are built from the cores, which weigh per token only at the quick preset's few tokens),
``adapter_dtype``, and the gate's numbers under ``check``. A row has no ``d_in`` / ``d_out``: it is told
apart by ``config``.
"""

from __future__ import annotations

import copy
import gc
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ttkernels import MetaTTConfig, Mode, TTLinear, TTSpec, factorize, get_metatt_model
from ttkernels.modules import new_cores, shared_factors

from . import harness

__all__ = [
    "CONFIGS",
    "PROVIDERS",
    "QUANTIZED_PROVIDERS",
    "ProviderSkipped",
    "TARGETS",
    "ProviderCheckFailed",
    "run_model",
    "total_steps",
]

QUANTIZED_PROVIDERS = ("peft-qlora", "metatt-4bit")
PROVIDERS = ("frozen", "peft-lora", "metatt", "metatt-factored", *QUANTIZED_PROVIDERS)
ATTN_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTN_TARGETS + MLP_TARGETS
VOCAB = 1024
NOISE_STD = 0.02  # the gate's perturbation of the adapter parameters (LLaMA's initializer_range)
SEED = 0


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int


CONFIGS: dict[str, Shape] = {
    "llama7b-gqa8": Shape(4096, 11008, 32, 8),
    "llama7b-mha": Shape(4096, 11008, 32, 32),
    "tiny-gqa": Shape(256, 688, 8, 2),
    "tiny-mha": Shape(256, 688, 8, 8),
}
QUICK_CONFIG = {"llama7b-gqa8": "tiny-gqa", "llama7b-mha": "tiny-mha"}

# (layers, batch, seq, warmup, reps)
FULL_DEFAULTS = (4, 2, 2048, 3, 10)
QUICK_DEFAULTS = (2, 2, 32, 1, 3)

# Gate tolerances, relative Frobenius norms: (equal at init, merged vs unmerged delta).
_TOLERANCES = {torch.float32: (1e-4, 1e-3), torch.float64: (1e-8, 1e-6)}
# bf16/fp16: rounding the merged weights alone moves the reference by ~5% of the adapter's change (measured
# 0.05-0.065 at LLaMA-7B dimensions in bf16, 0.07-0.12 for the tiny model, whose change is smaller).
_LOW_PRECISION_TOLERANCES = (1e-2, 0.2)


class ProviderCheckFailed(UserWarning):
    """A provider failed the correctness gate and was not timed (the message says which check and why)."""


class ProviderSkipped(UserWarning):
    """A provider could not be built here (the message says what is missing) and was not run."""


class _GateError(Exception):
    pass


# ------------------------------------------------------------------------------------------ building
def _resolve_config(name: str, quick: bool) -> str:
    if quick:
        name = QUICK_CONFIG.get(name, name)
    if name not in CONFIGS:
        raise ValueError(f"unknown model config {name!r}; known: {sorted(CONFIGS)}")
    return name


def _build_base(shape: Shape, layers: int, seq: int, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialized, frozen ``LlamaModel`` in ``dtype`` (rotary buffers stay float32)."""
    from transformers import LlamaConfig, LlamaModel

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        num_hidden_layers=layers,
        max_position_embeddings=max(2048, seq),
        use_cache=False,
    )
    errors = []
    for impl in ("sdpa", "eager"):
        torch.manual_seed(SEED)
        try:
            config = LlamaConfig(**kwargs, attn_implementation=impl)
            with torch.device(device):
                model = LlamaModel(config)
        except (ValueError, ImportError) as e:  # transformers refuses an implementation it cannot run
            errors.append(f"{impl}: {e}")
            continue
        break
    else:
        raise RuntimeError("could not build the LlamaModel: " + "; ".join(errors))
    for p in model.parameters():
        p.data = p.data.to(dtype)
        p.requires_grad_(False)
    return model.train()


def _attn_impl(llama: nn.Module) -> str:
    return str(getattr(llama.config, "_attn_implementation", None) or "eager")


def _targets(llama: nn.Module) -> Iterator[tuple[int, str, nn.Module]]:
    """``(layer index, projection name, parent module)`` for every targeted projection, in a fixed order."""
    for i, layer in enumerate(llama.layers):
        for name in TARGETS:
            yield i, name, layer.self_attn if name in ATTN_TARGETS else layer.mlp


def _attach_lora(base: nn.Module, rank: int) -> tuple[nn.Module, nn.Module]:
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS), lora_dropout=0.0)
    with warnings.catch_warnings():  # PEFT calls transformers' deprecated is_gradient_checkpointing
        warnings.simplefilter("ignore", FutureWarning)
        model = peft.get_peft_model(copy.deepcopy(base), config)
    return model, model.base_model.model


def _metatt_groups(llama: nn.Module) -> dict[tuple[int, int], list[str]]:
    """Projection names of one layer grouped by (in_features, out_features), in TARGETS order."""
    groups: dict[tuple[int, int], list[str]] = {}
    for i, name, parent in _targets(llama):
        if i > 0:
            break
        lin = getattr(parent, name)
        groups.setdefault((lin.in_features, lin.out_features), []).append(name)
    return groups


def _attach_metatt_factored(base: nn.Module, rank: int) -> tuple[nn.Module, list[TTSpec]]:
    """The ``metatt-factored`` provider: MetaTT's layout with d_in and d_out each split into two modes."""
    model = copy.deepcopy(base)
    n_layers = len(model.layers)
    device = next(model.parameters()).device
    specs = []
    for (d_in, d_out), names in _metatt_groups(model).items():
        spec = TTSpec.build(
            factorize(d_in, 2),
            factorize(d_out, 2),
            rank,
            index_modes=[Mode.index("layer", n_layers), Mode.index("matrix", len(names))],
        )
        cores = new_cores(spec, device, torch.float32)
        specs.append(spec)
        for i, name, parent in _targets(model):
            if name in names:
                index = {"layer": i, "matrix": names.index(name)}
                view = TTLinear.from_cores(getattr(parent, name), cores, spec, index=index, alpha=rank)
                setattr(parent, name, view)
    # as a MetaTTModel call does: the views of one forward share their group's A and B
    model.register_forward_pre_hook(_open_shared_factors)
    model.register_forward_hook(_close_shared_factors, always_call=True)
    return model, specs


@dataclass
class _Quantized:
    """The 4-bit copy of the frozen model, its dense twin (the dequantized weights, for the gate's merge
    check) and the 4-bit model's output on the gate's input."""

    model: nn.Module
    dense: nn.Module
    y_frozen: torch.Tensor


def _quantize_base(base: nn.Module, x_check: torch.Tensor) -> _Quantized:
    """Every targeted projection of a copy of ``base`` as an nf4 ``Linear4bit`` with the same weights."""
    import bitsandbytes as bnb

    from ttkernels.quantized import dequantize_weight

    model, dense = copy.deepcopy(base), copy.deepcopy(base)
    dtype = x_check.dtype
    for (_, name, parent), (_, _, dense_parent) in zip(_targets(model), _targets(dense), strict=True):
        lin = getattr(parent, name)
        device = lin.weight.device
        q = bnb.nn.Linear4bit(
            lin.in_features, lin.out_features, bias=lin.bias is not None, compute_dtype=dtype, quant_type="nf4"
        )
        q.weight = bnb.nn.Params4bit(lin.weight.data.cpu(), requires_grad=False, quant_type="nf4")
        if lin.bias is not None:
            q.bias = nn.Parameter(lin.bias.data.cpu(), requires_grad=False)
        q = q.to(device).train()
        setattr(parent, name, q)
        getattr(dense_parent, name).weight.data = dequantize_weight(q).to(device=device, dtype=dtype)
    model.is_loaded_in_4bit = True  # what transformers sets: PEFT then builds its QLoRA layer
    with torch.no_grad():
        y_frozen = _hidden(model, x_check)
    return _Quantized(model, dense, y_frozen)


def _open_shared_factors(module: nn.Module, args: Any) -> None:
    block = shared_factors()
    block.__enter__()
    module.__dict__.setdefault("_shared_factor_blocks", []).append(block)


def _close_shared_factors(module: nn.Module, args: Any, output: Any) -> None:
    module.__dict__["_shared_factor_blocks"].pop().__exit__(None, None, None)


def _lora_params(llama: nn.Module, rank: int) -> int:
    return sum(rank * (getattr(p, n).in_features + getattr(p, n).out_features) for _, n, p in _targets(llama))


# ------------------------------------------------------------------------------------------ the step
def _loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=x, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return h.float().pow(2).mean()


def _hidden(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(inputs_embeds=x, use_cache=False)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _make_step(model: nn.Module, x: torch.Tensor, opt: torch.optim.Optimizer | None) -> Callable[[], None]:
    def step() -> None:
        _loss(model, x).backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        x.grad = None

    return step


# ------------------------------------------------------------------------------------------ the gate
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _delta_weight(module: nn.Module) -> torch.Tensor:
    if isinstance(module, TTLinear):
        return module.delta_weight()
    if hasattr(module, "get_delta_weight"):  # a PEFT LoRA layer
        return module.get_delta_weight("default")
    raise _GateError(f"the targeted projection is a {type(module).__name__}, not an adapter")


@torch.no_grad()
def _merged_hidden(base: nn.Module, adapted: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The frozen model's output with every adapter's delta-W added to its base weight (restored after)."""
    originals = []
    try:
        for (_, name, parent), (_, _, adapted_parent) in zip(_targets(base), _targets(adapted), strict=True):
            lin = getattr(parent, name)
            delta = _delta_weight(getattr(adapted_parent, name))
            originals.append((lin, lin.weight))
            merged = (lin.weight.float() + delta.float()).to(lin.weight.dtype)
            lin.weight = nn.Parameter(merged, requires_grad=False)
        return _hidden(base, x)
    finally:
        for lin, weight in originals:
            lin.weight = weight


def _check_adapter(
    base: nn.Module,
    model: nn.Module,
    llama: nn.Module,
    x: torch.Tensor,
    y_frozen: torch.Tensor,
    expected_params: int,
) -> dict[str, float]:
    """The correctness gate (module docstring); raises :class:`_GateError` saying what failed."""
    eq_tol, match_tol = _TOLERANCES.get(x.dtype, _LOW_PRECISION_TOLERANCES)
    trainable = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in trainable)
    if n != expected_params:
        raise _GateError(f"{n} trainable parameters, expected {expected_params} (adapter only, base frozen)")
    with torch.no_grad():
        init_err = _rel(_hidden(model, x), y_frozen)
        if not init_err <= eq_tol:
            raise _GateError(
                f"at its initial state (delta-W = 0) the output differs from the frozen model's by "
                f"{init_err:.3g} (relative; tolerance {eq_tol:g})"
            )
        for p in trainable:
            p.add_(torch.randn_like(p) * NOISE_STD)
        y = _hidden(model, x)
    moved = _rel(y, y_frozen)
    if not moved > eq_tol:
        raise _GateError(
            f"with randomized adapter weights the output moved only {moved:.3g} from the frozen model's "
            f"(relative; needs > {eq_tol:g}): the adapter does nothing"
        )
    y_merged = _merged_hidden(base, llama, x)
    merged_err = _rel(y - y_frozen, y_merged - y_frozen)
    if not merged_err <= match_tol:
        raise _GateError(
            f"the adapter's change of the output differs from the change made by merging its delta-W into "
            f"the weights by {merged_err:.3g} (relative; tolerance {match_tol:g})"
        )
    model.zero_grad(set_to_none=True)
    _loss(model, x).backward()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        g = p.grad
        if g is None or not bool(torch.isfinite(g).all()) or not bool(g.any()):
            state = "no" if g is None else ("a non-finite" if not bool(torch.isfinite(g).all()) else "a zero")
            raise _GateError(f"the adapter parameter {name} got {state} gradient")
    model.zero_grad(set_to_none=True)
    return {"init_err": init_err, "moved": moved, "merged_err": merged_err}


# ------------------------------------------------------------------------------------------ running
def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def total_steps(quick: bool, configs: Sequence[str] = ("llama7b-gqa8", "llama7b-mha"), providers=PROVIDERS) -> int:
    """Progress-bar steps of :func:`run_model`: one per (config, provider)."""
    return len(configs) * len(providers)


def _measure_provider(
    provider: str,
    base: nn.Module,
    x: torch.Tensor,
    x_check: torch.Tensor,
    y_frozen: torch.Tensor,
    rank: int,
    warmup: int,
    reps: int,
    quantized: _Quantized | None = None,
) -> dict[str, Any]:
    """Build ``provider`` on a copy of ``base``, gate it, time it; every reference to the model dies on return."""
    device = x.device
    check = None
    if provider == "frozen":
        model = base
    else:
        gate_base = base
        if provider in QUANTIZED_PROVIDERS:
            assert quantized is not None
            gate_base, y_frozen = quantized.dense, quantized.y_frozen
        metatt_config = MetaTTConfig(list(TARGETS), rank=rank, alpha=rank)
        if provider == "peft-lora":
            model, llama = _attach_lora(base, rank)
            expected = _lora_params(base, rank)
        elif provider == "peft-qlora":
            model, llama = _attach_lora(quantized.model, rank)
            expected = _lora_params(base, rank)
        elif provider in ("metatt", "metatt-4bit"):  # the public API: ttkernels.get_metatt_model
            start = base if provider == "metatt" else quantized.model
            wrapper = get_metatt_model(copy.deepcopy(start), metatt_config)
            model, llama = wrapper, wrapper.model
            expected = sum(g.spec.num_params for g in wrapper.groups.values())
        else:
            model, specs = _attach_metatt_factored(base, rank)
            llama, expected = model, sum(s.num_params for s in specs)
        model.train()
        if provider in QUANTIZED_PROVIDERS:
            from ttkernels.quantized import quantization_of

            kinds = {quantization_of(getattr(getattr(p, n), "base_layer", None)) for _, n, p in _targets(llama)}
            if kinds != {"bnb-4bit"}:
                raise _GateError(f"the targeted projections' bases are {kinds}, not all bitsandbytes 4-bit layers")
        check = _check_adapter(gate_base, model, llama, x_check, y_frozen, expected)
    trainable = [p for p in model.parameters() if p.requires_grad]
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in trainable})
    opt = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None
    step = _make_step(model, x, opt)
    if provider in QUANTIZED_PROVIDERS and device.type != "cuda":
        timing, peak = None, None  # not measured: bitsandbytes' CPU path says nothing about a GPU
    else:
        timing = harness.measure(step, device, warmup=warmup, reps=reps, flush=False)
        peak = harness.peak_memory(step, device)
    exclude = list(model.parameters()) + list(model.buffers())
    saved = harness.saved_bytes(lambda: _loss(model, x), exclude=exclude)
    x.grad = None
    return {
        "timing": timing,
        "peak_mem_bytes": peak,
        "saved_bytes": saved,
        "params": sum(p.numel() for p in trainable),
        "adapter_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "adapter_dtype": ",".join(dtypes) if dtypes else None,
        "check": check,
    }


def run_model(
    device: torch.device,
    dtype: torch.dtype,
    env: dict,
    *,
    quick: bool,
    layers: int | None = None,
    batch: int | None = None,
    seq: int | None = None,
    rank: int = 16,
    configs: Sequence[str] = ("llama7b-gqa8", "llama7b-mha"),
    progress: harness.Progress | None = None,
    providers: Sequence[str] = PROVIDERS,
    warmup: int | None = None,
    reps: int | None = None,
) -> list[dict[str, Any]]:
    """One ``train_step`` row per (config, provider) that passes the correctness gate (module docstring).

    ``quick`` swaps the LLaMA-7B configs for the tiny ones and uses the small defaults. ``providers``,
    ``warmup`` and ``reps`` default to everything and to the preset's repetitions (they exist for tests).
    """
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown providers {unknown}; known: {PROVIDERS}")
    d_layers, d_batch, d_seq, d_warmup, d_reps = QUICK_DEFAULTS if quick else FULL_DEFAULTS
    layers, batch, seq = layers or d_layers, batch or d_batch, seq or d_seq
    warmup = d_warmup if warmup is None else warmup
    reps = reps or d_reps
    M = batch * seq
    dtype_name = str(dtype).removeprefix("torch.")
    rows: list[dict[str, Any]] = []

    for config_arg in configs:
        config = _resolve_config(config_arg, quick)
        shape = CONFIGS[config]
        base = _build_base(shape, layers, seq, device, dtype)
        gen = torch.Generator(device=device).manual_seed(SEED + 1)
        x = torch.randn(batch, seq, shape.hidden, device=device, dtype=dtype, generator=gen).requires_grad_()
        x_check = x.detach()[:1, : min(seq, 256)].clone()
        with torch.no_grad():
            y_frozen = _hidden(base, x_check)

        quantized = None
        if any(p in QUANTIZED_PROVIDERS for p in providers):
            try:
                quantized = _quantize_base(base, x_check)
            except ImportError as e:
                warnings.warn(
                    f"model preset: {', '.join(QUANTIZED_PROVIDERS)} need bitsandbytes "
                    f"(pip install ttkernels[bnb]) and get no row: {e}",
                    ProviderSkipped,
                    stacklevel=2,
                )

        for provider in providers:
            try:
                if provider in QUANTIZED_PROVIDERS and quantized is None:
                    result = None
                else:
                    result = _measure_provider(
                        provider, base, x, x_check, y_frozen, rank, warmup, reps, quantized=quantized
                    )
            except _GateError as e:
                warnings.warn(
                    f"model preset: {provider} on {config} failed its correctness check and gets no row: {e}",
                    ProviderCheckFailed,
                    stacklevel=2,
                )
                result = None
            _release(device)
            if result is not None:
                timing = result["timing"]
                time_ms = None if timing is None else timing.median_ms
                rows.append(
                    harness.make_row(
                        preset="model",
                        provider=provider,
                        phase="train_step",
                        device=device,
                        dtype=dtype,
                        timing=timing,
                        env=env,
                        config=config,
                        layers=layers,
                        batch=batch,
                        seq=seq,
                        M=M,
                        rank=None if provider == "frozen" else rank,
                        hidden=shape.hidden,
                        intermediate=shape.intermediate,
                        heads=shape.heads,
                        kv_heads=shape.kv_heads,
                        attn_implementation=_attn_impl(base),
                        base="nf4" if provider in QUANTIZED_PROVIDERS else dtype_name,
                        tokens_per_s=None if time_ms is None else harness.rate(M, time_ms, 1.0),
                        peak_mem_bytes=result["peak_mem_bytes"],
                        params=result["params"],
                        adapter_bytes=result["adapter_bytes"],
                        saved_bytes_per_token=result["saved_bytes"] / M,
                        adapter_dtype=result["adapter_dtype"],
                        check=result["check"],
                    )
                )
            if progress is not None:
                progress.step(f"model {config} {provider}")

        del base, x, x_check, y_frozen, quantized
        _release(device)
    return rows
