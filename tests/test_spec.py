import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ttkernels.spec import Mode, TTSpec, factorize


def _brute_min_max(n, k):
    best = n
    for combo in itertools.product([d for d in range(1, n + 1) if n % d == 0], repeat=k - 1):
        rest, ok = n, True
        for d in combo:
            if rest % d:
                ok = False
                break
            rest //= d
        if ok:
            best = min(best, max((*combo, rest)))
    return best


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 400), k=st.integers(1, 3))
def test_factorize_is_exact_and_balanced(n, k):
    f = factorize(n, k)
    assert len(f) == k
    assert math.prod(f) == n
    assert list(f) == sorted(f, reverse=True)
    assert max(f) == _brute_min_max(n, k)


@pytest.mark.parametrize(
    "n,k,expected",
    [
        (4096, 3, (16, 16, 16)),
        (1024, 3, (16, 8, 8)),  # GQA k/v output
        (4096, 2, (64, 64)),
        (11008, 2, (128, 86)),
        (11008, 3, (43, 16, 16)),
        (97, 3, (97, 1, 1)),  # a prime cannot be split
        (768, 3, (12, 8, 8)),
        (1, 2, (1, 1)),
    ],
)
def test_factorize_known(n, k, expected):
    assert factorize(n, k) == expected


@pytest.mark.parametrize("n,k", [(0, 2), (-4, 2), (8, 0)])
def test_factorize_rejects(n, k):
    with pytest.raises(ValueError, match="factorize"):
        factorize(n, k)


def test_factorize_rejects_float():
    with pytest.raises(TypeError, match="n must be an int"):
        factorize(8.0, 2)


def test_linear_spec_shapes_and_counts():
    s = TTSpec.linear(4096, 1024, in_modes=3, out_modes=2, ranks=[4, 5, 6, 7])
    assert s.in_sizes == (16, 16, 16) and s.out_sizes == (32, 32)
    assert s.core_shapes == ((1, 16, 4), (4, 16, 5), (5, 16, 6), (6, 32, 7), (7, 32, 1))
    assert s.num_params == 16 * 4 + 4 * 16 * 5 + 5 * 16 * 6 + 6 * 32 * 7 + 7 * 32
    assert s.bottleneck_ranks == (6, 6)
    assert s.max_rank == 7
    assert s.lora_params(16) == 16 * (4096 + 1024)


def test_lora_shaped_default():
    s = TTSpec.linear(10, 6, ranks=4)
    assert s.core_shapes == ((1, 10, 4), (4, 6, 1))
    assert s.num_params == s.lora_params(4)


def test_index_modes_and_bottleneck():
    s = TTSpec.build((4, 3), (5,), 2, index_modes=[Mode.index("layer", 6), Mode.task(3)])
    assert s.last_in == 1 and s.first_out == 4
    assert s.per_sample_mode.name == "task"
    assert s.fixed_index_names == ("layer",)
    assert s.check_index({"layer": 5}) == {"layer": 5}
    assert "task:3" in s.describe() and "layer:6" in s.describe()


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (
            dict(in_modes=(4, 4), out_modes=(3,), ranks=2, in_features=15),
            ValueError,
            "multiply to 16 but in_features is 15",
        ),
        (dict(in_modes=(4,), out_modes=(3, 3), ranks=2, out_features=10), ValueError, "out_features is 10"),
        (dict(in_modes=(4,), out_modes=(3,), ranks=0), ValueError, "ranks = 0"),
        (dict(in_modes=(4, 2), out_modes=(3,), ranks=[2, 0]), ValueError, r"ranks\[1\] = 0"),
        (
            dict(in_modes=(4, 2), out_modes=(3,), ranks=[2, 2, 2]),
            ValueError,
            "ranks has 3 entries but a chain of 3 cores has 2 bonds",
        ),
        (dict(in_modes=(), out_modes=(3,), ranks=2), ValueError, "in_modes is empty"),
        (dict(in_modes=(4,), out_modes=(), ranks=2), ValueError, "out_modes is empty"),
        (dict(in_modes=(4, 0), out_modes=(3,), ranks=2), ValueError, r"in_modes\[1\] = 0"),
        (dict(in_modes=(4,), out_modes=(3,), ranks=2.5), TypeError, "ranks must be an int"),
    ],
)
def test_build_errors_name_the_problem(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        TTSpec.build(**kwargs)


def test_chain_errors():
    with pytest.raises(ValueError, match="every 'in' mode before every 'out' mode"):
        TTSpec((Mode(3, "out", "o"), Mode(4, "in", "i")), (2,))
    with pytest.raises(ValueError, match="must lie between the last 'in' mode"):
        TTSpec((Mode.task(2), Mode(4, "in", "i"), Mode(3, "out", "o")), (2, 2))
    with pytest.raises(ValueError, match="at most one per-sample"):
        TTSpec.build((4,), (3,), 2, index_modes=[Mode.task(2), Mode.task(3, name="t2")])
    with pytest.raises(ValueError, match="unique"):
        TTSpec.build((4,), (3,), 2, index_modes=[Mode.index("layer", 2), Mode.index("layer", 3)])
    with pytest.raises(ValueError, match="role must be one of"):
        Mode(3, "sideways", "x")
    with pytest.raises(ValueError, match="size must be an int >= 1"):
        Mode(0, "in", "x")
    with pytest.raises(ValueError, match="needs a name"):
        Mode(3, "index")


def test_index_value_errors():
    s = TTSpec.build((4,), (3,), 2, index_modes=[Mode.index("layer", 2), Mode.task(3)])
    with pytest.raises(IndexError, match=r"index\['layer'\] = 2 is out of range"):
        s.check_index({"layer": 2})
    with pytest.raises(ValueError, match="missing values"):
        s.check_index({})
    with pytest.raises(ValueError, match="unknown mode 'head'"):
        s.check_index({"layer": 0, "head": 1})
    with pytest.raises(ValueError, match="per-sample mode"):
        s.check_index({"layer": 0, "task": 1})


def test_linear_rejects_bad_features():
    with pytest.raises(ValueError, match="in_features must be >= 1"):
        TTSpec.linear(0, 4)
    with pytest.raises(ValueError, match="multiply to 12 but in_features is 10"):
        TTSpec.linear(10, 4, in_modes=(3, 4))
