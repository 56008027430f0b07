"""The layers being compared: one adapted linear layer, computed by each provider.

A :class:`Problem` fixes the frozen base (``W``, ``b``), the adapter format and its TT cores. Every provider
is an ``nn.Module`` computing ``y = x W^T + b + x dW^T`` for its own adapter, and says what its ``dW`` is in
float64 (:attr:`Provider.delta64`), so that :func:`check_provider` can refuse a provider whose output is
wrong before it is timed (a fast wrong kernel must not get a row).

Providers:

* ``frozen`` — ``nn.Linear`` with the weight frozen: the floor.
* ``peft-lora-r<r>`` — PEFT's LoRA at the TT's bottleneck rank, loaded with the TT's own factors
  (``A`` and ``C B``), so it computes the same function.
* ``peft-lora-params`` — PEFT's LoRA with the rank that gives about the TT's parameter count.
* ``ttkernels-<backend>`` — ``TTLinear`` on each backend available on the device; for triton also
  ``ttkernels-triton-cublas``, its plan with torch's GEMM for the base product.
* ``tt-einsum`` — the TT-LoRA-style sequential contraction: the input reshaped to its in modes and
  contracted with one core after another by ``einsum``, then expanded through the out cores; autograd keeps
  every intermediate.
* ``tt-reconstruct`` — rebuilds the dense ``dW`` from the cores on every forward and runs one GEMM with
  ``W + dW``.
"""

from __future__ import annotations

import contextlib
import string
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

import ttkernels as tk
from ttkernels import reference as ref
from ttkernels.spec import Mode, TTSpec

FORMATS = ("lora", "ttlora", "metatt")
# MetaTT-like: one TT for 32 layers x 7 matrices, this layer at a fixed (layer, matrix).
METATT_LAYERS, METATT_MATRICES, METATT_INDEX = 32, 7, {"layer": 5, "matrix": 2}


class ProviderCheckError(AssertionError):
    """A provider's output differs from the float64 formula of its own adapter."""


def make_spec(fmt: str, d_in: int, d_out: int, rank: int) -> TTSpec:
    if fmt == "lora":
        return TTSpec.linear(d_in, d_out, ranks=rank)
    if fmt == "ttlora":
        return TTSpec.linear(d_in, d_out, in_modes=3, out_modes=3, ranks=rank)
    if fmt == "metatt":
        idx = [Mode.index("layer", METATT_LAYERS), Mode.index("matrix", METATT_MATRICES)]
        return TTSpec.build((d_in,), (d_out,), rank, index_modes=idx)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


@dataclass
class Problem:
    """One adapted layer: frozen base and TT cores, in the benchmark's dtype and device."""

    fmt: str
    d_in: int
    d_out: int
    rank: int
    dtype: torch.dtype
    device: torch.device
    dropout: float = 0.0  # adapter input dropout while training (checks run in eval mode, where it is off)
    spec: TTSpec = field(init=False)
    weight: Tensor = field(init=False)
    bias: Tensor = field(init=False)
    cores: list[Tensor] = field(init=False)  # float32 (float64 for float64 problems), non-zero
    index: dict[str, int] = field(init=False)

    def __post_init__(self) -> None:
        self.spec = make_spec(self.fmt, self.d_in, self.d_out, self.rank)
        self.index = dict(METATT_INDEX) if self.fmt == "metatt" else {}
        g = torch.Generator().manual_seed(1234)
        w = torch.randn(self.d_out, self.d_in, generator=g) * self.d_in**-0.5
        self.weight = w.to(self.device, self.dtype)
        self.bias = (torch.randn(self.d_out, generator=g) * 0.1).to(self.device, self.dtype)
        core_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32  # adapters stay float32
        cores = []
        for k, (r0, s, r1) in enumerate(self.spec.core_shapes):
            scale = (r0 * (s if self.spec.modes[k].role == "in" else 1)) ** -0.5
            # the adapter contributes about as much as the base, so a provider that drops it cannot pass
            # check_provider in any dtype
            cores.append((torch.randn(r0, s, r1, generator=g) * scale).to(self.device, core_dtype))
        self.cores = cores

    @property
    def params(self) -> int:
        return self.spec.num_params

    def factors64(self) -> tuple[Tensor, Tensor]:
        """``A`` (d_in, r) and ``C B`` (r, d_out) in float64."""
        A, C, B = ref.factors([c.double() for c in self.cores], self.spec, self.index)
        return A, (B if C is None else C @ B)

    def delta64(self) -> Tensor:
        A, CB = self.factors64()
        return (A @ CB).t()  # (d_out, d_in), scaling 1


class Provider(nn.Module):
    name: str = ""
    # how many times the dense formula's rounding error the check allows (check_provider)
    check_factor: float = 4.0

    def active(self) -> contextlib.AbstractContextManager:
        """Held while this provider is checked and measured (forward and backward): settings it needs."""
        return contextlib.nullcontext()

    def delta64(self) -> Tensor:
        raise NotImplementedError

    @property
    def trainable(self) -> list[Tensor]:
        return [p for p in self.parameters() if p.requires_grad]


def _frozen_linear(p: Problem) -> nn.Linear:
    lin = nn.Linear(p.d_in, p.d_out, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        lin.weight.copy_(p.weight)
        lin.bias.copy_(p.bias)
    lin.requires_grad_(False)
    return lin


class Frozen(Provider):
    name = "frozen"

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.lin = _frozen_linear(p)

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)

    def delta64(self) -> Tensor:
        return torch.zeros(
            self.lin.out_features, self.lin.in_features, dtype=torch.float64, device=self.lin.weight.device
        )


class PeftLora(Provider):
    """PEFT LoRA on the frozen layer: with the TT's factors (same function) or random ones of rank ``rank``."""

    def __init__(self, p: Problem, rank: int | None = None) -> None:
        super().__init__()
        import peft

        same = rank is None
        r = p.spec.bottleneck_ranks[0] if same else rank
        self.name = f"peft-lora-r{r}" if same else "peft-lora-params"

        class _Holder(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.proj = _frozen_linear(p)

        cfg = peft.LoraConfig(r=r, lora_alpha=r, target_modules=["proj"], lora_dropout=p.dropout)
        self.model = peft.get_peft_model(_Holder(), cfg)
        self.layer = self.model.base_model.model.proj
        lora_a, lora_b = self.layer.lora_A["default"].weight, self.layer.lora_B["default"].weight
        with torch.no_grad():
            if same:
                A, CB = p.factors64()
                lora_a.copy_(A.t())
                lora_b.copy_(CB.t())
            else:
                lora_b.normal_(0.0, 0.02)  # PEFT starts B at zero: make the adapter do something

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def delta64(self) -> Tensor:
        a = self.layer.lora_A["default"].weight.double()
        b = self.layer.lora_B["default"].weight.double()
        return self.layer.scaling["default"] * (b @ a)


def lora_rank_for_params(params: int, d_in: int, d_out: int) -> int:
    """The LoRA rank whose parameter count ``r (d_in + d_out)`` is closest to ``params`` (at least 1)."""
    return max(1, round(params / (d_in + d_out)))


class TTKernels(Provider):
    """TTLinear on one backend; for triton, ``plan`` picks the base GEMM (``fused`` or ``cublas``)."""

    def __init__(self, p: Problem, backend: str, plan: str | None = None) -> None:
        super().__init__()
        self.name = f"ttkernels-{backend}" + (f"-{plan}" if plan and plan != "fused" else "")
        self.plan = plan
        cores = nn.ParameterList([nn.Parameter(c.clone()) for c in p.cores])
        self.layer = tk.TTLinear.from_cores(
            _frozen_linear(p),
            cores,
            p.spec,
            index=p.index or None,
            alpha=None,  # scaling 1 under every rule, as delta64
            dropout=p.dropout,
            backend=backend,
        )
        self.spec, self.index = p.spec, p.index

    def active(self) -> contextlib.AbstractContextManager:
        if self.plan is None:
            return contextlib.nullcontext()
        from ttkernels._triton_kernels.backend import base_gemm

        return base_gemm(self.plan)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x)

    def delta64(self) -> Tensor:
        return ref.dense_delta([c.double() for c in self.layer.cores], self.spec, self.index or None).t()


class _TTModule(Provider):
    """Shared by the two TT baselines: the cores as Parameters, the fixed index slices selected at call time."""

    # the chain (einsum per core, or dW rebuilt by a chain of matmuls) rounds to the dtype once per core (six for
    # a 3 + 3 chain) against the dense formula's once: its errors grow with the chain, as public implementations'
    # do; a looser check, not a different formula
    check_factor = 8.0

    def __init__(self, p: Problem) -> None:
        super().__init__()
        self.lin = _frozen_linear(p)
        self.cores = nn.ParameterList([nn.Parameter(c.clone()) for c in p.cores])
        self.spec, self.index = p.spec, p.index

    def delta64(self) -> Tensor:
        return ref.dense_delta([c.double() for c in self.cores], self.spec, self.index or None).t()

    def _chain(self, dtype: torch.dtype) -> list[tuple[str, Tensor]]:
        """(role, core) with index cores replaced by their selected ``(r0, r1)`` slice, in ``dtype``."""
        out = []
        for mode, core in zip(self.spec.modes, self.cores, strict=True):
            c = core.to(dtype)
            out.append(("index", c[:, self.index[mode.name], :]) if mode.role == "index" else (mode.role, c))
        return out


class TTEinsum(_TTModule):
    """Sequential contraction: x as (M, i_1, ..., i_p), one einsum per core, intermediates kept by autograd."""

    name = "tt-einsum"

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        n_in = len(self.spec.in_sizes)
        modes = string.ascii_lowercase
        # t: (M, in modes not yet contracted..., bond), then (M, out modes so far..., bond)
        t = x.reshape(-1, *self.spec.in_sizes, 1)
        seen = 0
        for role, core in self._chain(x.dtype):
            if role == "in":
                cur, rest = modes[seen], modes[seen + 1 : n_in]
                t = torch.einsum(f"Z{cur}{rest}X,X{cur}Y->Z{rest}Y", t, core)
                seen += 1
            elif role == "index":
                t = t @ core
            else:
                t = torch.einsum("...X,XoY->...oY", t, core)
        return self.lin(x) + t.reshape(*lead, self.spec.out_features)


class TTReconstruct(_TTModule):
    """Rebuilds ``dW`` from the cores (a chain of matmuls) each forward, then one GEMM with ``W + dW``."""

    name = "tt-reconstruct"

    def forward(self, x: Tensor) -> Tensor:
        dense: Tensor | None = None  # (rows so far, bond)
        for role, core in self._chain(x.dtype):
            if role == "index":
                dense = core if dense is None else dense @ core
            else:
                r0, s, r1 = core.shape
                dense = core.reshape(s, r1) if dense is None else (dense @ core.reshape(r0, s * r1)).reshape(-1, r1)
        assert dense is not None
        dW_t = dense.reshape(self.spec.in_features, self.spec.out_features)
        return nn.functional.linear(x, self.lin.weight + dW_t.t(), self.lin.bias)


def providers_for(p: Problem, backends: list[str]) -> list[Provider]:
    """Every provider of this problem, the frozen floor first."""
    out: list[Provider] = [Frozen(p)]
    try:
        import peft  # noqa: F401

        out.append(PeftLora(p))
        out.append(PeftLora(p, rank=lora_rank_for_params(p.params, p.d_in, p.d_out)))
    except ImportError:
        pass
    for b in backends:
        out += [TTKernels(p, b, plan) for plan in ("fused", "cublas")] if b == "triton" else [TTKernels(p, b)]
    if not p.dropout:  # the two TT baselines have no dropout
        out += [TTEinsum(p), TTReconstruct(p)]
    return out


def check_provider(provider: Provider, p: Problem, tokens: int = 5) -> None:
    """Raise :class:`ProviderCheckError` unless ``provider(x)`` equals ``x (W + dW)^T + b`` (its own dW).

    The error against the float64 formula may be at most ``provider.check_factor`` (4) times the error of the
    same dense formula computed in the problem's dtype (plus a float32-level floor), as flash-attention's tests
    compare: a provider may round like the dtype does, not more (the einsum and rebuild chains, which round once per
    core, get 8).
    """
    x = torch.randn(tokens, p.d_in, device=p.device, dtype=p.dtype)
    training = provider.training
    provider.eval()  # dropout off: the output is the adapter's function, comparable with the formula
    try:
        with torch.no_grad():
            y = provider(x).double()
    finally:
        provider.train(training)
    with torch.no_grad():
        w_eff = p.weight.double() + provider.delta64()
        expected = x.double() @ w_eff.t() + p.bias.double()
        same_dtype = (x @ w_eff.to(p.dtype).t() + p.bias).double()
    err = (y - expected).abs().max().item() if y.numel() else 0.0
    base_err = (same_dtype - expected).abs().max().item() if y.numel() else 0.0
    floor = 1e-5 * max(1.0, expected.abs().max().item() if y.numel() else 1.0)
    if not torch.isfinite(y).all() or err > provider.check_factor * base_err + floor:
        raise ProviderCheckError(
            f"{provider.name}: output differs from the float64 formula by {err:.3g} (the dense formula in "
            f"{p.dtype} differs by {base_err:.3g}) at {p.fmt} {p.d_in}x{p.d_out} r={p.rank}"
        )
