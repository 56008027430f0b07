"""The definition of a TT adapter: its modes, their roles, its bond ranks.

A TT adapter on a linear map ``d_in -> d_out`` is a chain of K cores; core k has shape
``(r_{k-1}, s_k, r_k)`` with ``r_0 = r_K = 1``. Mode k has size ``s_k`` and one of three roles:

* ``"in"``: a factor of ``d_in`` (the product of all in-mode sizes is ``in_features``);
* ``"out"``: a factor of ``d_out``;
* ``"index"``: a named structural axis (layer, matrix, task, ...) whose slice is *selected* rather than
  contracted with data. An index mode is either fixed per module (``per_sample=False``: a layer or
  matrix index) or chosen per sample (``per_sample=True``: a task index).

Only the bottleneck form is defined here: every in mode comes before every out mode, so that
``dW^T = A C B`` (see :mod:`ttkernels.reference`). A per-sample index mode must sit between the last in
mode and the first out mode, because that is where its slice can be chosen per row of the activations.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["ChainSpec", "Mode", "TTSpec", "as_int", "factorize"]

_ROLES = ("in", "out", "index")


@dataclass(frozen=True)
class Mode:
    """One mode of a TT adapter: its size, its role and its name."""

    size: int
    role: str
    name: str = ""
    per_sample: bool = False

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            raise ValueError(f"Mode.role must be one of {_ROLES}, got {self.role!r}")
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise ValueError(f"Mode.size must be an int >= 1, got {self.size!r} (mode {self.name!r})")
        if self.per_sample and self.role != "index":
            raise ValueError(f"only index modes can be per_sample; mode {self.name!r} has role {self.role!r}")
        if self.role == "index" and not self.name:
            raise ValueError("an index mode needs a name (e.g. 'layer', 'matrix', 'task')")

    @classmethod
    def index(cls, name: str, size: int, *, per_sample: bool = False) -> Mode:
        return cls(size=size, role="index", name=name, per_sample=per_sample)

    @classmethod
    def task(cls, num_tasks: int, name: str = "task") -> Mode:
        """A per-sample index mode: each row of the activations selects its own slice."""
        return cls(size=num_tasks, role="index", name=name, per_sample=True)


def as_int(value: object, what: str) -> int:
    """``value`` as an int (numpy integers included); floats and bools are refused."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r})")


_as_int = as_int


class ChainSpec:
    """What every adapter chain has, whatever its cores carry: ``K`` cores ``(r_{k-1}, *sites[k], r_k)`` with
    ``r_0 = r_K = 1``. :class:`TTSpec` (one mode per core) and :class:`~ttkernels.ttm.TTMSpec` (an out and an in
    mode per core) build on it.

    Constructor names mean the same on every chain spec: ``build(in_modes, out_modes, ranks, ...)`` takes mode
    sizes, ``linear(in_features, out_features, *, in_modes=, out_modes=, ranks=)`` takes a layer's features and
    factors them.
    """

    ranks: tuple[int, ...]

    @property
    def site_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The mode sizes each core carries between its two bonds, one tuple per core."""
        raise NotImplementedError

    @property
    def num_cores(self) -> int:
        return len(self.site_shapes)

    @property
    def bond_ranks(self) -> tuple[int, ...]:
        """All K+1 bond ranks including the boundary ones: ``(1, r_1, ..., r_{K-1}, 1)``."""
        return (1, *self.ranks, 1)

    def core_shape(self, k: int) -> tuple[int, ...]:
        b = self.bond_ranks
        return (b[k], *self.site_shapes[k], b[k + 1])

    @property
    def core_shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(self.core_shape(k) for k in range(self.num_cores))

    @property
    def max_rank(self) -> int:
        """The largest bond rank (1 for a single core): the ``rank`` of ``scaling = alpha / rank``."""
        return max(self.ranks, default=1)

    @property
    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.core_shapes)


@dataclass(frozen=True)
class TTSpec(ChainSpec):
    """Modes and bond ranks of a TT adapter in bottleneck form (immutable: derived facts are cached).

    ``ranks`` holds the K-1 internal bond ranks ``r_1 .. r_{K-1}``; pass one int to :meth:`build` for all
    bonds. Use :meth:`build` (or :meth:`linear`) rather than the constructor to get the checks on
    ``in_features`` / ``out_features``; the constructor checks the chain itself.
    """

    modes: tuple[Mode, ...]
    ranks: tuple[int, ...]

    def __post_init__(self) -> None:
        modes = tuple(self.modes)
        object.__setattr__(self, "modes", modes)
        if not all(isinstance(m, Mode) for m in modes):
            raise TypeError("TTSpec.modes must be a sequence of Mode")
        ranks = tuple(_as_int(r, f"ranks[{i}]") for i, r in enumerate(self.ranks))
        object.__setattr__(self, "ranks", ranks)
        if len(ranks) != len(modes) - 1:
            raise ValueError(
                f"ranks has {len(ranks)} entries but a chain of {len(modes)} cores has {len(modes) - 1} bonds"
            )
        for i, r in enumerate(ranks):
            if r < 1:
                raise ValueError(f"ranks[{i}] = {r}: every bond rank must be >= 1")
        roles = [m.role for m in modes]
        if "in" not in roles:
            raise ValueError("a TT adapter needs at least one 'in' mode")
        if "out" not in roles:
            raise ValueError("a TT adapter needs at least one 'out' mode")
        last_in = max(i for i, r in enumerate(roles) if r == "in")
        first_out = min(i for i, r in enumerate(roles) if r == "out")
        if last_in > first_out:
            raise ValueError(f"the bottleneck form needs every 'in' mode before every 'out' mode; got roles {roles}")
        names = [m.name for m in modes if m.role == "index"]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"index mode names must be unique; repeated: {dupes}")
        per_sample = [i for i, m in enumerate(modes) if m.per_sample]
        if len(per_sample) > 1:
            raise ValueError(
                f"at most one per-sample index mode is supported, got {[modes[i].name for i in per_sample]}"
            )
        for i in per_sample:
            if not last_in < i < first_out:
                raise ValueError(
                    f"the per-sample mode {modes[i].name!r} must lie between the last 'in' mode and the "
                    "first 'out' mode"
                )
        # Derived facts are computed now, not on first use: on Python 3.11 functools.cached_property takes an
        # RLock that torch.compile cannot trace, so a compiled first call must find them cached.
        for name in _CACHED:
            getattr(self, name)

    # ------------------------------------------------------------------ construction
    @classmethod
    def build(
        cls,
        in_modes: Sequence[int],
        out_modes: Sequence[int],
        ranks: int | Sequence[int],
        *,
        index_modes: Sequence[Mode] = (),
        in_features: int | None = None,
        out_features: int | None = None,
    ) -> TTSpec:
        """Chain ``in_modes``, then ``index_modes`` (in the given order), then ``out_modes``.

        ``ranks`` is one int for every bond or a sequence with one entry per bond (K-1 entries).
        ``in_features`` / ``out_features``, when given, must equal the products of the mode sizes.
        """
        in_modes = tuple(_as_int(s, f"in_modes[{i}]") for i, s in enumerate(in_modes))
        out_modes = tuple(_as_int(s, f"out_modes[{i}]") for i, s in enumerate(out_modes))
        if not in_modes:
            raise ValueError("in_modes is empty: a TT adapter needs at least one 'in' mode")
        if not out_modes:
            raise ValueError("out_modes is empty: a TT adapter needs at least one 'out' mode")
        for what, sizes in (("in_modes", in_modes), ("out_modes", out_modes)):
            for i, s in enumerate(sizes):
                if s < 1:
                    raise ValueError(f"{what}[{i}] = {s}: mode sizes must be >= 1")
        if in_features is not None and math.prod(in_modes) != in_features:
            raise ValueError(f"in_modes {in_modes} multiply to {math.prod(in_modes)} but in_features is {in_features}")
        if out_features is not None and math.prod(out_modes) != out_features:
            raise ValueError(
                f"out_modes {out_modes} multiply to {math.prod(out_modes)} but out_features is {out_features}"
            )
        modes = (
            tuple(Mode(s, "in", f"in{i}") for i, s in enumerate(in_modes))
            + tuple(index_modes)
            + tuple(Mode(s, "out", f"out{i}") for i, s in enumerate(out_modes))
        )
        return cls(modes, _expand_ranks(ranks, len(modes) - 1))

    @classmethod
    def linear(
        cls,
        in_features: int,
        out_features: int,
        *,
        in_modes: int | Sequence[int] | None = None,
        out_modes: int | Sequence[int] | None = None,
        ranks: int | Sequence[int] = 8,
        index_modes: Sequence[Mode] = (),
    ) -> TTSpec:
        """The spec of an adapter on ``Linear(in_features, out_features)``.

        ``in_modes`` / ``out_modes``: a sequence of sizes, or an int asking for that many near-balanced
        factors (:func:`factorize`), or None for one mode (the LoRA-shaped chain).
        """
        in_features = _as_int(in_features, "in_features")
        out_features = _as_int(out_features, "out_features")
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        if out_features < 1:
            raise ValueError(f"out_features must be >= 1, got {out_features}")
        return cls.build(
            _resolve_modes(in_modes, in_features, "in_modes"),
            _resolve_modes(out_modes, out_features, "out_modes"),
            ranks,
            index_modes=index_modes,
            in_features=in_features,
            out_features=out_features,
        )

    # ------------------------------------------------------------------ derived facts
    @property
    def site_shapes(self) -> tuple[tuple[int], ...]:
        return tuple((m.size,) for m in self.modes)

    @functools.cached_property
    def in_sizes(self) -> tuple[int, ...]:
        return tuple(m.size for m in self.modes if m.role == "in")

    @functools.cached_property
    def out_sizes(self) -> tuple[int, ...]:
        return tuple(m.size for m in self.modes if m.role == "out")

    @functools.cached_property
    def in_features(self) -> int:
        return math.prod(self.in_sizes)

    @functools.cached_property
    def out_features(self) -> int:
        return math.prod(self.out_sizes)

    @functools.cached_property
    def index_modes(self) -> tuple[Mode, ...]:
        return tuple(m for m in self.modes if m.role == "index")

    @functools.cached_property
    def fixed_index_names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.index_modes if not m.per_sample)

    @functools.cached_property
    def per_sample_mode(self) -> Mode | None:
        return next((m for m in self.modes if m.per_sample), None)

    @functools.cached_property
    def last_in(self) -> int:
        """Position of the last in-mode core (the end of the A block)."""
        return max(i for i, m in enumerate(self.modes) if m.role == "in")

    @functools.cached_property
    def first_out(self) -> int:
        """Position of the first out-mode core (the start of the B block)."""
        return min(i for i, m in enumerate(self.modes) if m.role == "out")

    @functools.cached_property
    def bottleneck_ranks(self) -> tuple[int, int]:
        """``(r_a, r_b)``: the widths of A's columns and B's rows."""
        b = self.bond_ranks
        return b[self.last_in + 1], b[self.first_out]

    def lora_params(self, rank: int | None = None) -> int:
        """Parameters of a LoRA adapter on the same layer (rank defaults to :attr:`max_rank`)."""
        r = self.max_rank if rank is None else rank
        return r * (self.in_features + self.out_features)

    def check_index(self, index: Mapping[str, int] | None) -> dict[str, int]:
        """Validate fixed index values: every fixed index mode named once, each value in range."""
        index = dict(index or {})
        sizes = {m.name: m.size for m in self.index_modes}
        per_sample = self.per_sample_mode
        for name, value in index.items():
            if per_sample is not None and name == per_sample.name:
                raise ValueError(
                    f"index[{name!r}]: {name!r} is a per-sample mode; pass task ids with the input instead"
                )
            if name not in sizes:
                raise ValueError(f"index names unknown mode {name!r}; the index modes are {list(sizes)}")
            v = _as_int(value, f"index[{name!r}]")
            if not 0 <= v < sizes[name]:
                raise IndexError(f"index[{name!r}] = {v} is out of range for a mode of size {sizes[name]}")
            index[name] = v
        missing = [n for n in self.fixed_index_names if n not in index]
        if missing:
            raise ValueError(f"index is missing values for the fixed index modes {missing}")
        return index

    def describe(self) -> str:
        parts = []
        for m in self.modes:
            tag = m.role if m.role != "index" else ("task" if m.per_sample else m.name)
            parts.append(f"{tag}:{m.size}")
        return "(" + ", ".join(parts) + ")"


_CACHED = tuple(name for name, attr in vars(TTSpec).items() if isinstance(attr, functools.cached_property))


def _expand_ranks(ranks: int | Sequence[int], n_bonds: int) -> tuple[int, ...]:
    if isinstance(ranks, Iterable) and not isinstance(ranks, (str, bytes)):
        ranks = tuple(_as_int(r, f"ranks[{i}]") for i, r in enumerate(ranks))
        if len(ranks) != n_bonds:
            raise ValueError(f"ranks has {len(ranks)} entries but a chain of {n_bonds + 1} cores has {n_bonds} bonds")
        return ranks
    r = _as_int(ranks, "ranks")
    if r < 1:
        raise ValueError(f"ranks = {r}: every bond rank must be >= 1")
    return (r,) * n_bonds


def _resolve_modes(modes: int | Sequence[int] | None, features: int, what: str) -> tuple[int, ...]:
    if modes is None:
        return (features,)
    if isinstance(modes, Iterable) and not isinstance(modes, (str, bytes)):
        return tuple(modes)
    k = _as_int(modes, what)
    if not 1 <= k <= MAX_FACTORS:
        raise ValueError(f"{what} = {k}: ask for between 1 and {MAX_FACTORS} modes, or give the mode sizes")
    return factorize(features, k)


# ---------------------------------------------------------------------- factorization
MAX_FACTORS = 64  # factorize's k: more factors than bits of n are all 1s
MAX_FACTORIZE = 2**40  # factorize's n: the divisor search takes sqrt(n) steps


def _divisors(n: int) -> list[int]:
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


@functools.lru_cache(maxsize=4096)
def _balanced(n: int, k: int, cap: int) -> tuple[int, ...] | None:
    """The k factors of n, each <= cap, with the smallest possible largest factor (descending)."""
    if k == 1:
        return (n,) if n <= cap else None
    for d in _divisors(n):  # ascending: the first feasible largest factor is the best one
        if d > cap:
            return None
        if d**k < n:
            continue
        rest = _balanced(n // d, k - 1, d)
        if rest is not None:
            return (d, *rest)
    return None


def factorize(n: int, k: int) -> tuple[int, ...]:
    """Split ``n`` into ``k`` near-balanced integer factors whose product is ``n`` (descending order).

    "Near-balanced" means the largest factor is as small as it can be (ties: the remaining factors are
    balanced the same way, recursively). A prime ``n`` cannot be split: it gives ``(n, 1, ..., 1)``.
    Examples: ``factorize(4096, 3) == (16, 16, 16)``, ``factorize(1024, 3) == (16, 8, 8)``,
    ``factorize(11008, 2) == (128, 86)``.
    """
    n = _as_int(n, "n")
    k = _as_int(k, "k")
    if n < 1:
        raise ValueError(f"factorize: n must be >= 1, got {n}")
    if k < 1:
        raise ValueError(f"factorize: k must be >= 1, got {k}")
    if k > MAX_FACTORS:
        raise ValueError(f"factorize: k must be <= {MAX_FACTORS} (further factors would be 1), got {k}")
    if n > MAX_FACTORIZE:
        raise ValueError(f"factorize: n must be <= 2**40 (the search takes sqrt(n) steps), got {n}; give the sizes")
    result = _balanced(n, k, n)
    assert result is not None and math.prod(result) == n  # k factors of n always exist (1s pad)
    return result
