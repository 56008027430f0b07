"""The definition of a TT-matrix (MPO) adapter: ``K`` cores ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from ..spec import ChainSpec, as_int, factorize

__all__ = ["TTMSpec", "spec_of"]


def _sizes(modes: int | Sequence[int], features: int, what: str) -> tuple[int, ...]:
    """A number of near-balanced factors of ``features``, or the sizes themselves."""
    if isinstance(modes, (str, bytes)):
        raise TypeError(f"{what} must be an int or a sequence of ints, got {modes!r}")
    if isinstance(modes, Sequence):
        return tuple(as_int(s, f"{what}[{i}]") for i, s in enumerate(modes))
    k = as_int(modes, what)
    if k < 1:
        raise ValueError(f"{what} = {k}: the number of modes must be >= 1")
    return factorize(features, k)


@dataclass(frozen=True)
class TTMSpec(ChainSpec):
    """Mode sizes and bond ranks of a TT-matrix adapter: ``K`` cores ``(r_{k-1}, out_modes[k], in_modes[k], r_k)``.

    Constructors, as :class:`~ttkernels.TTSpec`'s: :meth:`build` takes the mode sizes, :meth:`linear` a layer's
    features (and factors them).
    """

    out_modes: tuple[int, ...]
    in_modes: tuple[int, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.in_modes or len(self.in_modes) != len(self.out_modes):
            raise ValueError(
                f"in_modes {self.in_modes} and out_modes {self.out_modes} must be non-empty and of the same length "
                "(one in and one out mode per core)"
            )
        for what, sizes in (("in_modes", self.in_modes), ("out_modes", self.out_modes)):
            for i, s in enumerate(sizes):
                if isinstance(s, bool) or not isinstance(s, int) or s < 1:
                    raise ValueError(f"{what}[{i}] = {s!r}: mode sizes must be positive ints")
        if len(self.ranks) != len(self.in_modes) - 1:
            raise ValueError(f"{len(self.in_modes)} cores need {len(self.in_modes) - 1} bond ranks, got {self.ranks}")
        for i, r in enumerate(self.ranks):
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"ranks[{i}] = {r!r}: ranks must be positive ints")

    @classmethod
    def build(
        cls,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        /,
        ranks: int | Sequence[int] = 8,
        **features: int | Sequence[int],
    ) -> TTMSpec:
        """The spec of these mode sizes (one in and one out mode per core); ``ranks``: one int for every bond or
        one per bond.

        Deprecated form: ``build(in_features, out_features, in_modes=, out_modes=, ranks=)`` with two ints is
        :meth:`linear` (it warns).
        """
        if not isinstance(in_modes, Sequence) and not isinstance(out_modes, Sequence):
            warnings.warn(
                "TTMSpec.build(in_features, out_features, ...) is TTMSpec.linear(...); TTMSpec.build takes mode "
                "sizes, as TTSpec.build does",
                DeprecationWarning,
                stacklevel=2,
            )
            return cls.linear(in_modes, out_modes, ranks=ranks, **features)
        if features:
            raise TypeError(f"TTMSpec.build takes in_modes, out_modes and ranks, got also {sorted(features)}")
        for what, modes in (("in_modes", in_modes), ("out_modes", out_modes)):
            if isinstance(modes, (str, bytes)) or not isinstance(modes, Sequence):
                raise TypeError(
                    f"{what} must be a sequence of mode sizes, got {modes!r} (TTMSpec.linear factors features)"
                )
        ins = _sizes(in_modes, 1, "in_modes")
        outs = _sizes(out_modes, 1, "out_modes")
        if isinstance(ranks, Sequence) and not isinstance(ranks, (str, bytes)):
            r = tuple(as_int(x, f"ranks[{i}]") for i, x in enumerate(ranks))
        else:
            r = (as_int(ranks, "ranks"),) * (len(ins) - 1)
        return cls(outs, ins, r)

    @classmethod
    def linear(
        cls,
        in_features: int,
        out_features: int,
        *,
        in_modes: int | Sequence[int] = 2,
        out_modes: int | Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
    ) -> TTMSpec:
        """The spec of an adapter on ``Linear(in_features, out_features)``. ``in_modes`` / ``out_modes``: the
        sizes, or a number of near-balanced factors (``out_modes`` defaults to as many factors as ``in_modes``
        has); their products must be the features."""
        in_features, out_features = as_int(in_features, "in_features"), as_int(out_features, "out_features")
        for what, n in (("in_features", in_features), ("out_features", out_features)):
            if n < 1:
                raise ValueError(f"{what} must be >= 1, got {n}")
        ins = _sizes(in_modes, in_features, "in_modes")
        outs = _sizes(len(ins) if out_modes is None else out_modes, out_features, "out_modes")
        if math.prod(ins) != in_features:
            raise ValueError(f"in_modes {ins} multiply to {math.prod(ins)} but in_features is {in_features}")
        if math.prod(outs) != out_features:
            raise ValueError(f"out_modes {outs} multiply to {math.prod(outs)} but out_features is {out_features}")
        return cls.build(ins, outs, ranks)

    @property
    def site_shapes(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.out_modes, self.in_modes))

    @property
    def in_features(self) -> int:
        return math.prod(self.in_modes)

    @property
    def out_features(self) -> int:
        return math.prod(self.out_modes)

    def describe(self) -> str:
        return "(" + ", ".join(f"{m}x{n}" for m, n in zip(self.out_modes, self.in_modes)) + f"; ranks {self.ranks})"

    def check_cores(self, cores: Sequence[Tensor]) -> None:
        if len(cores) != self.num_cores:
            raise ValueError(f"cores has {len(cores)} tensors but the spec has {self.num_cores} cores")
        for k, (core, shape) in enumerate(zip(cores, self.core_shapes)):
            if not isinstance(core, Tensor):
                raise TypeError(f"cores[{k}] must be a torch.Tensor, got {type(core).__name__}")
            if tuple(core.shape) != shape:
                raise ValueError(f"cores[{k}] has shape {tuple(core.shape)} but the spec needs {shape}")
            if not core.is_floating_point():
                raise TypeError(f"cores[{k}] must be floating point, got {core.dtype}")


def spec_of(cores: Sequence[Tensor]) -> TTMSpec:
    """The spec that ``cores`` (4-D tensors) describe; ValueError when they are not a non-empty list of 4-D
    tensors. Their chain is checked by :meth:`TTMSpec.check_cores`."""
    cores = list(cores)
    if not cores or not all(isinstance(c, Tensor) and c.dim() == 4 for c in cores):
        raise ValueError("cores must be a non-empty list of 4-D tensors (r_prev, m, n, r_next)")
    return TTMSpec(
        tuple(c.shape[1] for c in cores), tuple(c.shape[2] for c in cores), tuple(c.shape[3] for c in cores[:-1])
    )
