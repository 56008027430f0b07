"""The CUDA kernels of csrc/ run on the CPU (csrc/host_emulation.h) against the float64 reference.

The kernel sources are compiled by the host C++ compiler with -DTTK_HOST_EMULATION into a small shared library
(no torch, no CUDA runtime: only the toolkit's headers for the fp16/bf16 types) and called through ctypes with
CPU tensors. Each block runs as 256 threads meeting at __syncthreads(), so the kernels' indexing, masking, tiling,
shared-memory staging, atomics and deterministic reductions are checked as written, bf16 included. This does not
make them "run on a GPU": speed, the GPU memory model and code generation are only checked on a GPU
(tests/test_cuda_backend.py).

``Emulated`` (tests/cuda_emulation.py) replays the plan of csrc/bindings.cpp for each op (outputs, fp32 buffers,
launch order) so the launchers are called as the binding calls them; outputs are filled with NaN before the kernels
write them. The six step tests run in tests/test_steps.py (runner ``cuda-emulated``); this file holds the checks
specific to the kernels: split-K, vector loads and unaligned rows, buffer plans, masks, launch limits, kron ops.

Needs a C++20 compiler and the CUDA headers (CUDA_HOME, /usr/local/cuda, or the nvidia-cuda-runtime wheel);
without them the tests skip, and with TTKERNELS_REQUIRE_CUDA_EXT=1 (CI) they fail. On a machine with a GPU they
skip: there tests/test_cuda_backend.py runs the kernels themselves.
"""

from __future__ import annotations

import pytest
import torch

import helpers
from cuda_emulation import CODE, DTYPES, NUM_SMS, Emulated, build_lib, poisoned, ptr, use_emulated_cuda_backend
from helpers import check_error_ratio as check
from ttkernels import reference as ref
from ttkernels import ttm


@pytest.fixture(scope="module")
def lib(tmp_path_factory):
    return build_lib(tmp_path_factory)


rnd = helpers.rnd


def both(emu, fn_name, *args):
    return helpers.against_reference(emu, fn_name, *args)


def middle(kind, ra, rb, n_tasks, dtype, m):
    return helpers.random_middle(kind, ra, rb, n_tasks, dtype, m, run=3)


def seed():
    return int(torch.randint(0, 2**62, ()).item())


# (dtype, aligned) of the vector-load tests: every dtype with rows whose addresses allow 16-byte loads, bf16 with
# rows that do not (the scalar fallback); the other dtypes' unaligned runs are slow (the full run has them).
VEC_CASES = [(d, True) for d in DTYPES] + [(torch.bfloat16, False)]
VEC_CASES += [pytest.param(d, False, marks=pytest.mark.slow) for d in (torch.float32, torch.float16)]
VEC_IDS = ["fp32", "fp16", "bf16", "bf16-offset", "fp32-offset", "fp16-offset"]


# (M, d_in, ra, rb): split-K at decode (1 and 5 tokens over 1000 / 1031 columns: several K ranges, the last one
# short), rows that allow 16-byte loads (d_in a multiple of 8) and rows that do not, every rank bucket
SHRINK_SPLIT_K = [(1, 1000, 16, 16), (5, 1031, 33, 7), (3, 512, 128, 100), (40, 264, 3, 70)]


@pytest.mark.parametrize("dtype, aligned", VEC_CASES, ids=VEC_IDS)
@pytest.mark.parametrize("kind", ["none", "task"])
@pytest.mark.parametrize("shape", SHRINK_SPLIT_K)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_split_k_and_vector_loads(lib, shape, kind, p, aligned, dtype):
    m, d_in, ra, rb = shape
    assert lib.ttk_shrink_splits(m, d_in, ra, NUM_SMS) > 1
    rb = ra if kind == "none" else rb
    x, A = rnd(m, d_in, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5)
    if not aligned:  # the launcher must fall back to scalar loads (a misaligned vector load fails the launch)
        x = offset_copy(x)
    C, ids = middle(kind, ra, rb, 4, dtype, m)
    (S, U), (S64, U64), (St, Ut) = both(Emulated(lib), "shrink", x, A, C, ids, p, seed())
    check("S", S, S64, St, dtype)
    check("U", U, U64, Ut, dtype)


# (M, d_in, ra): one K split (enough row blocks on NUM_SMS = 3, or K one or two chunks), rows of x and A that allow
# 16-byte loads, row blocks cut by M, every rank bucket
SHRINK_ONE_SPLIT = [(900, 72, 8), (131, 64, 64), (70, 40, 128), (800, 24, 24)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHRINK_ONE_SPLIT)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_shrink_vector_and_scalar_staging_agree(lib, shape, p, dtype):
    """The one-split path against float64, then the same inputs at addresses that refuse 16-byte loads (x and A
    staged element by element): the same tiles in the same order, so the same bits."""
    m, d_in, ra = shape
    assert lib.ttk_shrink_splits(m, d_in, ra, NUM_SMS) == 1
    x, A = rnd(m, d_in, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=d_in**-0.5)
    C = rnd(ra, 5, dtype=dtype, scale=ra**-0.5)
    s, emu = seed(), Emulated(lib)
    (S, U), (S64, U64), (St, Ut) = both(emu, "shrink", x, A, C, None, p, s)
    check("S", S, S64, St, dtype)
    check("U", U, U64, Ut, dtype)
    S2, U2 = emu.shrink(offset_copy(x), offset_copy(A), C, None, p, s)
    assert torch.equal(S2, S) and torch.equal(U2, U)


# (M, d_in, d_out, ra, rb): rows that allow 16-byte updates of out (d_out, d_in multiples of 8), ranks over more than
# one 32-rank chunk and not multiples of 16, tiles cut by M and N
ACCUMULATE_ROWS = [(37, 24, 136, 40, 40), (5, 64, 16, 3, 3), (70, 128, 264, 16, 16), (33, 8, 8, 100, 77)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ACCUMULATE_ROWS)
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_accumulate_vector_rows(lib, shape, p, dtype):
    m, d_in, d_out, ra, rb = shape
    emu = Emulated(lib)
    x, W = rnd(m, d_in, dtype=dtype), rnd(d_out, d_in, dtype=dtype, scale=d_in**-0.5)
    U, B = rnd(m, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    y, y64, yt = both(emu, "expand", x, W, None, U, B, 0.75)
    check("y", y, y64, yt, dtype)
    dy, dS, A = rnd(m, d_out, dtype=dtype), rnd(m, ra, dtype=dtype), rnd(d_in, ra, dtype=dtype, scale=ra**-0.5)
    Wt = rnd(d_out, d_in, dtype=dtype, scale=d_out**-0.5)
    s = seed()
    dx, dx64, dxt = both(emu, "grad_x", dy, Wt, dS, A, p, s)
    check("dx", dx, dx64, dxt, dtype)
    # the same update on an out whose rows are not 16-byte aligned (scalar updates) gives the same bits
    base = dy @ Wt
    moved = offset_copy(base)
    drop = emu._drop(p, s)
    assert (
        lib.ttk_accumulate_launch(CODE[dtype], ptr(moved), ptr(dS), ptr(A), 1, ra, m, d_in, ra, 1.0, *drop, None) == 0
    )
    assert torch.equal(moved, dx)


def offset_copy(t, by=1):
    """t's values in a contiguous tensor whose data starts `by` elements into its storage (not 16-byte aligned)."""
    flat = torch.empty(t.numel() + by, dtype=t.dtype)
    out = flat[by:].view(t.shape)
    out.copy_(t)
    return out


# (M, d_out, rb): row lengths that allow 16-byte loads, several column slices (few row tiles on NUM_SMS = 3), several
# row tiles per split (many rows), ranks in every bucket
GRAD_DY_GRID = [(70, 160, 24), (3000, 96, 16), (33, 64, 128), (5, 1000, 3), (300, 40, 70)]


@pytest.mark.parametrize("dtype, aligned", VEC_CASES, ids=VEC_IDS)
@pytest.mark.parametrize("shape", GRAD_DY_GRID)
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_grad_dy_slices_splits_and_vector_loads(lib, shape, det, aligned, dtype):
    m, d_out, rb = shape
    dy, U, B = rnd(m, d_out, dtype=dtype), rnd(m, rb, dtype=dtype), rnd(rb, d_out, dtype=dtype, scale=rb**-0.5)
    if not aligned:  # the launcher must fall back to scalar loads (a misaligned vector load fails the launch)
        dy, B = offset_copy(dy), offset_copy(B)
    (dU, dB), (dU64, dB64), (dUt, dBt) = both(Emulated(lib, det), "grad_dy", dy, U, B, 0.5)
    check("dU", dU, dU64, dUt, dtype)
    check("dB", dB, dB64, dBt, dtype)


def test_grad_dy_plan_and_bounded_buffers(lib):
    """More than one column slice when the rows are few, more than one row tile per split when they are many, and a
    deterministic dB buffer that does not grow with M."""
    assert lib.ttk_grad_dy_slices(70, 160, 24, NUM_SMS) > 1
    assert lib.ttk_grad_dy_splits(3000, 96, 16, 1, NUM_SMS) < 3000 // 128
    sms, n, rb = 132, 4096, 128
    sizes = [lib.ttk_grad_dy_splits(m, n, rb, 1, sms) * rb * n * 4 for m in (8192, 65536, 2**20)]
    assert max(sizes) <= 64 * 2**20 and sizes[-1] <= sizes[0] * 1.01
    # the dU buffer (slices > 1 only when the rows are few) stays within a few MiB at the decode and training shapes
    for m in (1, 32, 8192, 65536):
        assert lib.ttk_grad_dy_slices(m, n, rb, sms) * m * rb * 4 <= 64 * 2**20


# (M, d_in, ra): rows of x that allow 16-byte loads, several column blocks and row splits, ranks in every bucket
GRAD_A_ROWS = [(300, 136, 16), (45, 64, 33), (700, 24, 100), (1, 8, 1)]


@pytest.mark.parametrize("dtype, aligned", VEC_CASES, ids=VEC_IDS)
@pytest.mark.parametrize("shape", GRAD_A_ROWS)
@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("det", [False, True], ids=["atomic", "deterministic"])
def test_grad_a_vector_rows(lib, shape, p, det, aligned, dtype):
    m, d_in, ra = shape
    x, dS = rnd(m, d_in, dtype=dtype), rnd(m, ra, dtype=dtype)
    if not aligned:  # the launcher must fall back to scalar loads (a misaligned vector load fails the launch)
        x = offset_copy(x)
    dA, dA64, dAt = both(Emulated(lib, det), "grad_a", x, dS, p, seed())
    check("dA", dA, dA64, dAt, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dropout_masks_are_the_reference_hash_bit_for_bit(lib, dtype):
    """S = drop(x) I, the dropout op, and drop'(dS I^T) added to zero all equal the reference's drop(x)."""
    x = rnd(37, 16, dtype=dtype)
    x = torch.where(x == 0, torch.ones_like(x), x)
    s, p = int(torch.randint(2**32, 2**62, ()).item()), 0.4
    want = ref.apply_dropout(x, s, p)
    eye = torch.eye(16, dtype=dtype)
    emu = Emulated(lib)
    assert torch.equal(emu.shrink(x, eye, None, None, p, s)[0], want)
    y = poisoned(37, 16, dtype=dtype)
    thr, scale = ref.dropout_threshold(p), float(torch.tensor(1 / (1 - p), dtype=torch.float32))
    seed_t = torch.tensor(s)  # the launchers take the seed's address: the kernels read it
    assert lib.ttk_dropout_launch(CODE[dtype], ptr(x), ptr(y), 37, 16, ptr(seed_t), thr, scale, None) == 0
    assert torch.equal(y, want)
    dx = emu.grad_x(torch.zeros(37, 3, dtype=dtype), torch.zeros(3, 16, dtype=dtype), x, eye, p, s)
    assert torch.equal(dx, want)


EDGE_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1, "random", "negative tensor"]


@pytest.mark.parametrize("seed", EDGE_SEEDS)
def test_every_dropout_kernel_reads_the_seed_it_is_given(lib, seed):
    """Each kernel with dropout (the dropout op, shrink, accumulate's grad_x, token_reduce's grad_a) gets the seed as
    the address of one int64 and reads it itself; its mask equals ``reference.dropout_keep`` bit for bit, for seeds
    at the edges of both 32-bit words, and for a negative seed tensor (its bits hashed as uint64, as the reference
    hashes a seed tensor)."""
    if seed == "random":
        seed = int(torch.randint(0, 2**63 - 1, ()).item())
    elif seed == "negative tensor":
        seed = torch.tensor(-(2**40) - 7)
    m, n, p = 19, 37, 0.45
    keep = ref.dropout_keep(seed, m, n, p)
    x = torch.ones(m, n)
    seed_t = seed if isinstance(seed, torch.Tensor) else torch.tensor(seed)
    y = poisoned(m, n, dtype=torch.float32)
    thr, scale = ref.dropout_threshold(p), float(torch.tensor(1 / (1 - p), dtype=torch.float32))
    assert lib.ttk_dropout_launch(CODE[torch.float32], ptr(x), ptr(y), m, n, ptr(seed_t), thr, scale, None) == 0
    assert torch.equal(y != 0, keep)
    emu = Emulated(lib)
    for given in (seed, seed_t):  # an int is copied into a tensor, as the backend layer does; a tensor is used
        assert torch.equal(emu.shrink(x, torch.eye(n), None, None, p, given)[0] != 0, keep)
        dx = emu.grad_x(torch.zeros(m, 2), torch.zeros(2, n), x, torch.eye(n), p, given)
        assert torch.equal(dx != 0, keep)
        assert torch.equal(emu.grad_a(x, torch.eye(m), p, given).t() != 0, keep)


def test_deterministic_reductions_repeat_bit_for_bit(lib):
    first, again = helpers.reductions_twice(
        Emulated(lib, deterministic=True), rnd, middle, m=700, d_in=70, d_out=40, r=16
    )
    for a, b in zip(first, again):
        assert torch.equal(a, b)


def test_out_of_range_task_ids_give_nan_rows_not_out_of_bounds_reads(lib):
    """What the kernels do when the binding could not check the ids (CUDA graph capture)."""
    m, ra, rb = 6, 3, 2
    x, A, C = rnd(m, 8), rnd(8, ra), rnd(3, ra, rb)
    ids = torch.tensor([0, 3, 1, -1, 2, 7])
    emu = Emulated(lib)
    _, U = emu.shrink(x, A, C, ids, 0.0, 0)
    bad = torch.tensor([False, True, False, True, False, True])
    assert torch.isnan(U[bad]).all() and torch.isfinite(U[~bad]).all()
    assert torch.isnan(emu.mid(rnd(m, ra), C, ids)[bad]).all()
    dS, dC = emu.grad_mid(rnd(m, ra), rnd(m, rb), C, ids)
    assert torch.isnan(dS[bad]).all() and torch.isfinite(dC).all()


# ------------------------------------------------------------------------------ Kronecker-sum ops (ttm.cu)
# (M, R, NI, NJ, NA, NC): empty, one token, primes at R = 1 and 3, NJ and NC over several tiles (16 j per chunk,
# 16 c per apply / grad_q tile, 64 c per grad_p tile), the R = 16 / NI = NA = 64 edge, lopsided kept sizes (the
# token tile follows the larger), and enough tokens for several grad_q / grad_p splits.
KRON_SHAPES = [(0, 3, 3, 7, 5, 11), (1, 1, 3, 7, 5, 11), (7, 3, 3, 7, 5, 11), (13, 3, 5, 70, 7, 130),
               (5, 16, 64, 9, 64, 17), (37, 2, 2, 130, 1, 70), (9, 4, 1, 33, 64, 5), (9, 4, 64, 3, 1, 20),
               (150, 1, 4, 5, 3, 6)]  # fmt: skip


LAYOUTS = ["contiguous", "transposed", "strided"]


def _kron_fast(shape, layout, dtype):
    """The fast suite: every small case; a shape with a side of 64 or more (about a second a case) in every
    layout, each layout in another dtype."""
    heavy = max(shape[1:]) >= 64
    return not heavy or dtype == DTYPES[(KRON_SHAPES.index(shape) + LAYOUTS.index(layout)) % len(DTYPES)]


@helpers.matrix("shape,layout,dtype", KRON_SHAPES, LAYOUTS, DTYPES, fast=_kron_fast)
def test_kron_apply_and_grads(lib, shape, layout, dtype):
    x, dy, q, p = helpers.kron_case(shape, dtype, layout)
    helpers.check_kron_ops(Emulated(lib), x, dy, q, p, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "spec",
    [
        ttm.TTMSpec((3, 4), (2, 5), (3,)),
        ttm.TTMSpec((2, 3, 2), (3, 2, 5), (2, 3)),
        ttm.TTMSpec((70, 2), (66, 2), (2,)),  # only the right factor fits the kernels' 64 per side
    ],
    ids=lambda s: s.describe(),
)
def test_ttm_apply_on_the_emulated_cuda_kernels(lib, spec, dtype, monkeypatch):
    """ttm_apply(backend="cuda") end to end (the cut, the views, the autograd function, dx through transposed
    factors) with the op calls answered by the emulated kernels, against the float64 sweep."""
    emulated = ttm.ops.CudaKronKernels.__new__(ttm.ops.CudaKronKernels)
    emulated.k = Emulated(lib)
    monkeypatch.setattr(ttm.ops, "kron_kernels", lambda name, device: emulated)
    m = 9
    x = rnd(m, spec.in_features, dtype=dtype)
    cores = [rnd(*s, scale=(s[0] * s[2]) ** -0.5) for s in spec.core_shapes]
    dy = rnd(m, spec.out_features, dtype=dtype)

    def run(x, cores, dy, backend):
        x = x.detach().requires_grad_()
        cores = [c.detach().requires_grad_() for c in cores]
        y = ttm.ttm_apply(x, cores, scaling=0.5, backend=backend)
        return (y, *torch.autograd.grad(y, (x, *cores), dy))

    got = run(x, cores, dy, "cuda")
    want = run(x.double(), [c.double() for c in cores], dy.double(), "torch")
    base = run(x, cores, dy, "torch")
    for name, g, w, b in zip(["y", "dx"] + [f"dG{k}" for k in range(len(cores))], got, want, base):
        check(name, g, w, b, g.dtype)
    # a chain with no cut inside the limits is refused, not computed another way
    wide = ttm.TTMSpec((70, 2), (2, 66), (2,))
    with pytest.raises(ValueError, match="bond rank <= 16 and sides <= 64"):
        ttm.ttm_apply(rnd(2, wide.in_features, dtype=dtype), [rnd(*s) for s in wide.core_shapes], backend="cuda")


def test_kron_grads_split_and_repeat_bit_for_bit(lib):
    """Several token splits (summed in order by finalize); two runs give the same bits."""
    shape = (400, 1, 5, 13, 7, 50)
    m, r, _, nj, _, nc = shape
    assert lib.ttk_kron_grad_q_splits(m, r, NUM_SMS) > 1 and lib.ttk_kron_grad_p_splits(m, r, nj, nc, NUM_SMS) > 1
    x, dy, q, p = helpers.kron_case(shape, torch.float32, "transposed")
    emu = Emulated(lib)
    first = helpers.check_kron_ops(emu, x, dy, q, p, torch.float32)
    again = (emu.kron_apply(x, q, p), emu.kron_grad_q(dy, x, p), emu.kron_grad_p(dy, x, q))
    for a, b in zip(first, again):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "name, args",
    [
        ("ttk_shrink_launch", [0, None, None, None, None, 0, None, None, None, 3, 0, 4, 2, 2, 0, 0, 0, 1.0, None]),
        ("ttk_shrink_launch", [0, None, None, None, None, 0, None, None, None, 3, 4, 4, 129, 129, 0, 0, 0, 1.0, None]),
        ("ttk_shrink_launch", [7, None, None, None, None, 0, None, None, None, 3, 4, 4, 2, 2, 0, 0, 0, 1.0, None]),
        ("ttk_shrink_launch", [0, None, None, None, None, 0, None, None, None, 3, 4, 4096, 2, 2, 0, 0, 0, 1.0, None]),
        ("ttk_grad_dy_launch", [0, None, None, None, None, None, None, 0, 3, 4, 4, 0, 1.0, None]),
        ("ttk_grad_dy_launch", [0, None, None, None, None, None, None, 0, 3, 4, 4096, 4, 1.0, None]),
        ("ttk_token_reduce_launch", [0, None, None, None, 1, None, 0, 0, 4, 4, 2, 0, 0, 0, 1.0, None]),
        ("ttk_accumulate_launch", [0, None, None, None, 1, 1, 4, 0, 2, 1.0, 0, 0, 0, 1.0, None]),
        ("ttk_rowmix_launch", [0, None, None, None, 0, 0, None, 4, 0, 2, None]),
        ("ttk_finalize_launch", [0, None, 0, 4, 1.0, None, None]),
        # dropout on without a seed to read
        ("ttk_shrink_launch", [0, None, None, None, None, 0, None, None, None, 3, 4, 4, 2, 2, 1, None, 0, 1.0, None]),
        ("ttk_token_reduce_launch", [0, None, None, None, 1, None, 1, 0, 4, 4, 2, 1, None, 0, 1.0, None]),
        ("ttk_accumulate_launch", [0, None, None, None, 1, 1, 4, 4, 2, 1.0, 1, None, 0, 1.0, None]),
        ("ttk_dropout_launch", [0, None, None, 4, 4, None, 0, 1.0, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, 1, None, None, None, 0, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, 1, None, None, None, 4, 17, 1, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, 1, None, None, None, 4, 1, 65, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [0, None, 1, 1, -1, None, None, None, 4, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_apply_launch", [7, None, 1, 1, 1, None, None, None, 4, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_grad_q_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 0, 4, 1, 1, 1, 1, 1, None]),
        ("ttk_kron_grad_q_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 1, 4, 1, 1, 1, 65, 1, None]),
        ("ttk_kron_grad_p_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 1, 4, 1, 1, 0, 1, 1, None]),
        ("ttk_kron_grad_p_launch", [0, None, 1, 1, 1, None, 1, 1, 1, None, None, 1, 4, 1, 1, 1, 1, 0, None]),
    ],
)  # fmt: skip
def test_launchers_refuse_out_of_range_sizes(lib, name, args):
    assert getattr(lib, name)(*args) == 1  # cudaErrorInvalidValue, before touching any pointer


# --------------------------------------------------------------- the whole registry on the emulated kernels
@pytest.mark.parametrize("spec_name", sorted(helpers.FUSED_SPECS))
@pytest.mark.parametrize("m", [1, 13])
@pytest.mark.parametrize("seed", [None, 2**32 + 1, "tensor"])
def test_tt_linear_with_dropout_through_the_registry(lib, spec_name, m, seed, monkeypatch):
    """``tt_linear(backend="cuda")`` forward and backward with dropout, the seed drawn by the registry on the data's
    device (None) or given as an int or a tensor, the kernels reading it there: against float64 with the same
    seed (a drawn seed: the same generator state)."""
    use_emulated_cuda_backend(monkeypatch, lib)
    make, index = helpers.FUSED_SPECS[spec_name]
    case = helpers.TTLinearCase(make(), index, m)
    if seed == "tensor":
        seed = torch.randint(0, 2**62, ())
    kw = dict(scaling=0.5, dropout=0.3, seed=seed)
    state = torch.get_rng_state()
    got = case.run("cuda", torch.float32, "cpu", **kw)
    torch.set_rng_state(state)
    want64 = case.run("torch", torch.float64, "cpu", **kw)
    torch.set_rng_state(state)
    lowp = case.run("torch", torch.float32, "cpu", **kw)
    helpers.check_case(case, got, want64, lowp, torch.float32)
