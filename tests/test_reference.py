import pytest
import torch

import ttkernels as tk
from helpers import einsum_delta, lora_spec, metatt_spec, randn, random_cores, ttlora_spec
from ttkernels import reference as ref


@pytest.mark.parametrize(
    "spec,index,task",
    [
        (lora_spec(7, 5, 3), None, None),
        (ttlora_spec(), None, None),
        (metatt_spec(), {"layer": 2, "matrix": 1}, None),
        (metatt_spec(tasks=3), {"layer": 0, "matrix": 3}, 2),
    ],
    ids=["lora", "ttlora", "metatt", "metatt-task"],
)
def test_factors_and_dense_delta_match_einsum(spec, index, task):
    cores = random_cores(spec)
    A, C, B = ref.factors(cores, spec, index)
    assert A.shape == (spec.in_features, spec.bottleneck_ranks[0])
    assert B.shape == (spec.bottleneck_ranks[1], spec.out_features)
    expected = einsum_delta(cores, spec, index, task=task)
    torch.testing.assert_close(ref.dense_delta(cores, spec, index, task=task), expected, atol=1e-12, rtol=1e-12)
    if task is not None:
        assert C.shape == (3, *spec.bottleneck_ranks)
        torch.testing.assert_close(A @ C[task] @ B, expected, atol=1e-12, rtol=1e-12)


def test_index_modes_outside_the_bottleneck():
    # fixed index modes before the first in mode, between in modes, and after the last out mode
    spec = tk.TTSpec(
        (
            tk.Mode.index("layer", 3),
            tk.Mode(4, "in", "i0"),
            tk.Mode.index("matrix", 2),
            tk.Mode(3, "in", "i1"),
            tk.Mode(5, "out", "o0"),
            tk.Mode.index("head", 2),
        ),
        (2, 3, 2, 4, 3),
    )
    cores = random_cores(spec)
    index = {"layer": 1, "matrix": 0, "head": 1}
    torch.testing.assert_close(ref.dense_delta(cores, spec, index), einsum_delta(cores, spec, index))


def test_factors_reject_bad_cores():
    spec = ttlora_spec()
    cores = random_cores(spec)
    with pytest.raises(ValueError, match=r"cores\[2\] has shape \(4, 5, 2\) but"):
        ref.factors(cores[:2] + [torch.randn(4, 5, 2, dtype=torch.float64)] + cores[3:], spec)
    with pytest.raises(ValueError, match="cores has 4 tensors but the spec has 5 modes"):
        ref.factors(cores[:4], spec)
    with pytest.raises(TypeError, match=r"cores\[0\] must be floating point"):
        ref.factors([cores[0].long()] + cores[1:], spec)
    with pytest.raises(ValueError, match="needs task="):
        ref.dense_delta(random_cores(metatt_spec(tasks=2)), metatt_spec(tasks=2), {"layer": 0, "matrix": 0})


# ------------------------------------------------------------------------------------------ dropout
def test_dropout_keep_rate_and_determinism():
    p = 0.3
    keep = ref.dropout_keep(12345, 300, 500, p)
    assert keep.dtype == torch.bool and keep.shape == (300, 500)
    rate = keep.float().mean().item()
    assert abs(rate - (1 - p)) < 0.01, rate
    assert torch.equal(keep, ref.dropout_keep(12345, 300, 500, p))
    other = ref.dropout_keep(12346, 300, 500, p)
    assert 0.3 < (keep != other).float().mean().item() < 0.5  # independent masks differ ~2p(1-p)
    # rows do not repeat each other
    assert (keep[0] != keep[1]).any() and (keep[:, 0] != keep[:, 1]).any()


def test_dropout_keep_is_a_function_of_row_and_col():
    seed = 2**40 + 17  # exercises the high half of the seed
    full = ref.dropout_keep(seed, 40, 33, 0.5)
    assert torch.equal(ref.dropout_keep(seed, 10, 33, 0.5, row_offset=25), full[25:35])
    assert torch.equal(ref.dropout_keep(seed, 40, 20, 0.5), full[:, :20])


def _np_keep(seed, rows, cols, p, row_offset=0):
    """The dropout hash on numpy uint32 (native wraparound): independent of the torch int64 emulation."""
    import numpy as np

    def mix(h):
        h = h ^ (h >> np.uint32(16))
        h = h * np.uint32(0x7FEB352D)
        h = h ^ (h >> np.uint32(15))
        h = h * np.uint32(0x846CA68B)
        return h ^ (h >> np.uint32(16))

    with np.errstate(over="ignore"):
        lo, hi = np.uint32(seed & 0xFFFFFFFF), np.uint32(seed >> 32)
        r = (np.arange(rows, dtype=np.uint64) + row_offset).astype(np.uint32)
        row_hash = mix(lo ^ mix(r ^ mix(np.array([hi], dtype=np.uint32))[0]))
        u = mix(row_hash[:, None] ^ np.arange(cols, dtype=np.uint32)[None, :])
    return torch.from_numpy(u >= np.uint32(int(p * 2**32)))


@pytest.mark.parametrize("seed", [0, 7, 2**32 - 1, 2**32 + 5, 2**62 + 12345])
def test_dropout_hash_matches_uint32_arithmetic(seed):
    torch.testing.assert_close(
        ref.dropout_keep(seed, 19, 70, 0.37, row_offset=2**32 - 5), _np_keep(seed, 19, 70, 0.37, 2**32 - 5)
    )
    assert torch.equal(ref.dropout_keep(seed, 64, 64, 0.5), _np_keep(seed, 64, 64, 0.5))


def test_dropout_extremes_and_errors():
    assert ref.dropout_keep(1, 5, 7, 0.0).all()
    x = randn(4, 6)
    assert ref.apply_dropout(x, 3, 0.0) is x
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        ref.dropout_keep(1, 2, 2, 1.0)
    with pytest.raises(ValueError, match="seed must be in"):
        ref.dropout_keep(-1, 2, 2, 0.1)


def test_apply_dropout_chunked_equals_mask(monkeypatch):
    monkeypatch.setattr(ref, "_DROPOUT_CHUNK_ELEMS", 64)  # force many row blocks
    x = randn(37, 11)
    keep = ref.dropout_keep(99, 37, 11, 0.25)
    torch.testing.assert_close(ref.apply_dropout(x, 99, 0.25), x * keep / 0.75)
    A = randn(11, 3)
    S, U = ref.shrink(x, A, None, None, 0.25, 99)
    torch.testing.assert_close(S, (x * keep / 0.75) @ A)
    dS = randn(37, 3)
    torch.testing.assert_close(ref.grad_a(x, dS, 0.25, 99), (x * keep / 0.75).t() @ dS)


# ------------------------------------------------------------------------------------------ gradcheck
@pytest.mark.parametrize(
    "spec,index,tasks,dropout",
    [
        (lora_spec(6, 5, 3), None, None, 0.0),
        (ttlora_spec(), None, None, 0.0),
        (metatt_spec(6, 5, 3, 2, 2), {"layer": 1, "matrix": 0}, None, 0.0),
        (metatt_spec(6, 5, 3, 2, 2, tasks=3), {"layer": 2, "matrix": 1}, 3, 0.0),
        (metatt_spec(6, 5, 3, 2, 2, tasks=3), {"layer": 0, "matrix": 1}, 3, 0.4),
        (ttlora_spec(), None, None, 0.3),
    ],
    ids=["lora", "ttlora", "metatt", "metatt-task", "metatt-task-dropout", "ttlora-dropout"],
)
def test_gradcheck_x_and_every_core(spec, index, tasks, dropout):
    M = 5
    x = randn(M, spec.in_features, requires_grad=True)
    W, b = randn(spec.out_features, spec.in_features), randn(spec.out_features)
    cores = random_cores(spec, requires_grad=True)
    task_ids = torch.randint(0, tasks, (M,)) if tasks else None

    def f(x, *cores):
        return tk.tt_linear(
            x, W, b, cores, spec, index=index, task_ids=task_ids, scaling=0.7, dropout=dropout, seed=4242
        )

    assert torch.autograd.gradcheck(f, (x, *cores))


def test_gradcheck_unfrozen_base():
    spec = ttlora_spec()
    x = randn(4, spec.in_features, requires_grad=True)
    W = randn(spec.out_features, spec.in_features, requires_grad=True)
    b = randn(spec.out_features, requires_grad=True)
    cores = random_cores(spec, requires_grad=True)

    def f(x, W, b, *cores):
        return tk.tt_linear(x, W, b, cores, spec, scaling=1.3, dropout=0.2, seed=5)

    assert torch.autograd.gradcheck(f, (x, W, b, *cores))
