"""Pure-torch reference of the TT adapter: the ground truth of every kernel, and the ``torch`` backend.

Everything here runs in any float dtype on any device, float64 on the CPU included, and never builds
delta-W except in :func:`dense_delta`, which exists for merging and for tests.

Shapes (M tokens, after flattening leading dimensions):

* ``x``: ``(M, d_in)``; ``weight``: ``(d_out, d_in)``; ``bias``: ``(d_out,)`` or None
* ``A``: ``(d_in, r_a)``; ``B``: ``(r_b, d_out)``
* ``C``: None (no middle cores: ``U = S``), ``(r_a, r_b)``, or ``(T, r_a, r_b)`` with ``task_ids: (M,)``
* ``S = drop(x) A``: ``(M, r_a)``; ``U = S C``: ``(M, r_b)``

Data flow (docs/design.md section 2): :func:`shrink` (step 2), :func:`expand` (3), :func:`grad_dy` (4),
:func:`grad_mid` (5), :func:`grad_x` (6), :func:`grad_a` (7). Steps 1 and 8 are :func:`factors` and
torch autograd through it.

**Dropout** is a pure function of ``(seed, row, col)`` — a counter-based hash, :func:`dropout_keep` —
so that backward regenerates the forward's mask from the seed and no mask is ever stored. Every backend
implements the same hash (``csrc/dropout_hash.cuh`` is the CUDA one), so kernels can be compared with this
reference bit for bit, dropout included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .spec import TTSpec

__all__ = [
    "check_chain",
    "check_cores",
    "dropout_keep",
    "apply_dropout",
    "factors",
    "dense_delta",
    "task_factors",
    "shrink",
    "mid",
    "expand",
    "grad_dy",
    "grad_mid",
    "grad_x",
    "grad_a",
]

# --------------------------------------------------------------------------------------------- dropout
_U32 = 0xFFFFFFFF
_MIX_1 = 0x7FEB352D
_MIX_2 = 0x846CA68B
# Rows of x handled at once when dropout is on: bounds the int64 hash temporaries to ~32 MiB.
_DROPOUT_CHUNK_ELEMS = 1 << 22


def _mix32_int(h: int) -> int:
    h &= _U32
    h ^= h >> 16
    h = (h * _MIX_1) & _U32
    h ^= h >> 15
    h = (h * _MIX_2) & _U32
    h ^= h >> 16
    return h


def _mul32(h: Tensor, c: int) -> Tensor:
    # (h * c) mod 2^32 for int64 h in [0, 2^32): split c in 16-bit halves so no product leaves int64.
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _U32


def _mix32(h: Tensor) -> Tensor:
    h = h ^ (h >> 16)
    h = _mul32(h, _MIX_1)
    h = h ^ (h >> 15)
    h = _mul32(h, _MIX_2)
    return h ^ (h >> 16)


def check_seed(seed: int | Tensor) -> int | Tensor:
    """An int seed in ``[0, 2**63)``; a seed tensor (int64, one element, on the data's device) is taken as it is,
    unread: the functional API checked it on its device, and the hash below runs on it there."""
    if isinstance(seed, Tensor):
        return seed.reshape(())
    seed = int(seed)
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must be in [0, 2**63), got {seed}")
    return seed


def dropout_threshold(p: float) -> int:
    """The uint32 threshold below which a hash drops its element: ``floor(p * 2^32)``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
    return int(p * 4294967296.0)


def dropout_keep(
    seed: int | Tensor, rows: int, cols: int, p: float, *, row_offset: int = 0, device: torch.device | str = "cpu"
) -> Tensor:
    """The keep-mask of rows ``row_offset .. row_offset + rows`` (bool, ``(rows, cols)``).

    ``u = mix32(mix32(seed_lo ^ mix32(row ^ mix32(seed_hi))) ^ col)`` on uint32 with wraparound, where
    ``mix32`` is a xorshift-multiply finalizer and rows are taken mod 2^32; an element is kept when
    ``u >= floor(p * 2^32)``, so it is kept with probability ``1 - p`` (to within 2^-32).
    """
    seed = check_seed(seed)
    threshold = dropout_threshold(p)
    # a seed tensor stays where it is (no host read: the mask of a captured CUDA graph follows the seed's value
    # at replay); an int seed gives the same mask as the tensor of its value
    hi = _mix32((seed >> 32) & _U32) if isinstance(seed, Tensor) else _mix32_int(seed >> 32)
    r = (torch.arange(rows, dtype=torch.int64, device=device) + row_offset) & _U32
    row_hash = _mix32((seed & _U32) ^ _mix32(r ^ hi))
    c = torch.arange(cols, dtype=torch.int64, device=device)
    return _mix32(row_hash[:, None] ^ c[None, :]) >= threshold


def _row_blocks(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, _DROPOUT_CHUNK_ELEMS // max(cols, 1))
    return [(i, min(i + step, rows)) for i in range(0, rows, step)]


def _drop_rows(t: Tensor, seed: int | Tensor, p: float, start: int) -> Tensor:
    keep = dropout_keep(seed, t.shape[0], t.shape[1], p, row_offset=start, device=t.device)
    scale = 1.0 / (1.0 - p)
    # where(), not a multiply: a dropped element is +0 even when it was negative, inf or NaN
    if t.dtype == torch.float64:
        return torch.where(keep, t * scale, 0.0)
    return torch.where(keep, t.float() * scale, 0.0).to(t.dtype)


def apply_dropout(t: Tensor, seed: int | Tensor, p: float) -> Tensor:
    """``drop(t)``: elements whose hash falls below the threshold are zeroed, the rest scaled by 1/(1-p).

    Applied to ``x`` in forward and, with the same seed, to ``dS A^T`` in backward (the derivative of
    dropout is the same mask and scale). The scale is applied in float32 (float64 for float64 inputs).
    """
    if p == 0.0:
        return t
    seed = check_seed(seed)
    out = torch.empty_like(t)
    for i, j in _row_blocks(*t.shape):
        out[i:j] = _drop_rows(t[i:j], seed, p, i)
    return out


# --------------------------------------------------------------------------------------------- factors
def check_cores(cores: Sequence[Tensor], spec: TTSpec) -> None:
    if len(cores) != spec.num_cores:
        raise ValueError(f"cores has {len(cores)} tensors but the spec has {spec.num_cores} modes")
    for k, (core, shape) in enumerate(zip(cores, spec.core_shapes)):
        if not isinstance(core, Tensor):
            raise TypeError(f"cores[{k}] must be a torch.Tensor, got {type(core).__name__}")
        if tuple(core.shape) != shape:
            raise ValueError(
                f"cores[{k}] has shape {tuple(core.shape)} but the spec's mode {spec.modes[k].name!r} needs {shape}"
            )
    dev = cores[0].device
    for k, core in enumerate(cores):
        if core.device != dev:
            raise ValueError(f"cores[{k}] is on {core.device} but cores[0] is on {dev}")
        if not core.is_floating_point():
            raise TypeError(f"cores[{k}] must be floating point, got {core.dtype}")


def check_chain(cores: Sequence[Tensor], what: str = "cores", *, values: bool = False) -> list[Tensor]:
    """A TT's cores ``(r_{k-1}, n_k, r_k)`` checked as a chain (3-D, floating point, one device, matching bonds,
    end bonds of 1), returned detached. ``values=True`` (the rank tools, which read the numbers) also refuses
    meta tensors and non-finite values; errors name ``what``."""
    if isinstance(cores, Tensor) or not isinstance(cores, (list, tuple, torch.nn.ParameterList)):
        raise TypeError(f"{what} must be a list of torch.Tensor cores, got {type(cores).__name__}")
    cores = list(cores)
    if not cores:
        raise ValueError(f"{what} is empty")
    for k, c in enumerate(cores):
        if not isinstance(c, Tensor):
            raise TypeError(f"{what}[{k}] must be a torch.Tensor, got {type(c).__name__}")
        if c.dim() != 3 or min(c.shape) < 1:
            raise ValueError(f"{what}[{k}] must be 3-D (r_prev, n, r_next) with positive sizes, got {tuple(c.shape)}")
        if not c.is_floating_point():
            raise TypeError(f"{what}[{k}] must be floating point, got {c.dtype}")
        if values and c.device.type == "meta":
            raise ValueError(f"{what}[{k}] is on the meta device: the rank tools need values")
        if values and not torch.isfinite(c).all():
            raise ValueError(f"{what}[{k}] holds non-finite values (NaN or inf): the rank tools need finite cores")
        if c.device != cores[0].device:
            raise ValueError(f"{what}[{k}] is on {c.device} but {what}[0] is on {cores[0].device}")
        if k and c.shape[0] != cores[k - 1].shape[2]:
            raise ValueError(
                f"{what}[{k - 1}] and {what}[{k}] do not chain: bond {cores[k - 1].shape[2]} != {c.shape[0]}"
            )
    if cores[0].shape[0] != 1 or cores[-1].shape[2] != 1:
        raise ValueError(
            f"the first core must start with a bond of 1 and the last end with one, got {cores[0].shape[0]} and "
            f"{cores[-1].shape[2]}"
        )
    return [c.detach() for c in cores]


def factors(
    cores: Sequence[Tensor], spec: TTSpec, index: Mapping[str, int] | None = None
) -> tuple[Tensor, Tensor | None, Tensor]:
    """The bottleneck factors ``(A, C, B)`` of the cores, with fixed index modes set from ``index``.

    ``A`` contracts the cores up to the last in mode (``(d_in, r_a)``, C-order over the in modes),
    ``B`` the cores from the first out mode on (``(r_b, d_out)``), and ``C`` multiplies the slices in
    between: None when there are none, ``(r_a, r_b)`` when they are all fixed, ``(T, r_a, r_b)`` with a
    per-sample mode of size T. Cost ``O((d_in + d_out) r^2)``; differentiable by torch autograd.
    """
    check_cores(cores, spec)
    return build_factors(cores, spec, spec.check_index(index))


def build_factors(
    cores: Sequence[Tensor], spec: TTSpec, index: Mapping[str, int]
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`factors` without its checks: ``cores`` already checked against ``spec``, ``index`` by
    ``spec.check_index`` (the layers check once per spec and cores, not per call)."""
    p, q = spec.last_in, spec.first_out

    def sliced(k: int) -> Tensor:
        return cores[k][:, index[spec.modes[k].name], :]

    A: Tensor | None = None
    for k in range(p + 1):
        core = cores[k]
        if spec.modes[k].role == "in":
            r0, s, r1 = core.shape
            A = core.reshape(s, r1) if A is None else (A @ core.reshape(r0, s * r1)).reshape(-1, r1)
        else:
            A = sliced(k) if A is None else A @ sliced(k)

    B: Tensor | None = None
    for k in range(spec.num_cores - 1, q - 1, -1):
        core = cores[k]
        if spec.modes[k].role == "out":
            r0, s, r1 = core.shape
            B = core.reshape(r0, s) if B is None else (core.reshape(r0 * s, r1) @ B).reshape(r0, -1)
        else:
            B = sliced(k) if B is None else sliced(k) @ B

    assert A is not None and B is not None
    return A, factor_c(cores, spec, index), B


def build_sides(cores: Sequence[Tensor], last_in: int, first_out: int) -> tuple[Tensor, Tensor]:
    """``A`` and ``B`` of :func:`build_factors` for a spec whose cores up to ``last_in`` are all in modes and
    from ``first_out`` on all out modes (index modes only in between): they do not depend on the index."""
    r0, s, r1 = cores[0].shape
    A = cores[0].reshape(s, r1)
    for k in range(1, last_in + 1):
        r0, s, r1 = cores[k].shape
        A = (A @ cores[k].reshape(r0, s * r1)).reshape(-1, r1)
    r0, s, r1 = cores[-1].shape
    B = cores[-1].reshape(r0, s)
    for k in range(len(cores) - 2, first_out - 1, -1):
        r0, s, r1 = cores[k].shape
        B = (cores[k].reshape(r0 * s, r1) @ B).reshape(r0, -1)
    return A, B


def factor_c(cores: Sequence[Tensor], spec: TTSpec, index: Mapping[str, int]) -> Tensor | None:
    """``C`` of :func:`factors` alone (``index`` already checked by ``spec.check_index``)."""
    C: Tensor | None = None
    for k in range(spec.last_in + 1, spec.first_out):
        piece = cores[k].permute(1, 0, 2) if spec.modes[k].per_sample else cores[k][:, index[spec.modes[k].name], :]
        C = piece if C is None else torch.matmul(C, piece)
    return C


def task_factors(
    cores: Sequence[Tensor],
    spec: TTSpec,
    index: Mapping[str, int] | None = None,
    *,
    task: int | None = None,
    caller: str = "task_factors",
) -> tuple[Tensor, Tensor | None, Tensor]:
    """:func:`factors` with a per-sample mode's slice ``task`` chosen: ``C`` is None or ``(r_a, r_b)``."""
    A, C, B = factors(cores, spec, index)
    if spec.per_sample_mode is not None:
        if task is None:
            raise ValueError(f"this spec has a per-sample mode: {caller} needs task=")
        T = spec.per_sample_mode.size
        if not 0 <= int(task) < T:
            raise IndexError(f"task = {task} is out of range for {T} tasks")
        assert C is not None
        C = C[int(task)]
    elif task is not None:
        raise ValueError("task= was given but the spec has no per-sample mode")
    return A, C, B


def dense_delta(
    cores: Sequence[Tensor],
    spec: TTSpec,
    index: Mapping[str, int] | None = None,
    *,
    task: int | None = None,
) -> Tensor:
    """The dense, unscaled ``dW^T = A C B`` of shape ``(d_in, d_out)`` — for merging and tests only.

    With a per-sample mode, ``task`` picks its slice.
    """
    A, C, B = task_factors(cores, spec, index, task=task, caller="dense_delta")
    return A @ B if C is None else A @ C @ B


# ------------------------------------------------------------------------------------ data-flow steps
def mid(S: Tensor, C: Tensor | None, task_ids: Tensor | None) -> Tensor:
    """``U = S C``, with C chosen per row when it is 3-D."""
    if C is None:
        return S
    if C.dim() == 2:
        return S @ C
    return torch.bmm(S.unsqueeze(1), C[task_ids]).squeeze(1)


def shrink(
    x: Tensor, A: Tensor, C: Tensor | None, task_ids: Tensor | None, p: float, seed: int | Tensor
) -> tuple[Tensor, Tensor]:
    """Step 2: ``S = drop(x) A`` and ``U = S C``, in x's dtype."""
    if p == 0.0:
        S = x @ A
    else:
        seed = check_seed(seed)
        S = x.new_empty((x.shape[0], A.shape[1]))
        for i, j in _row_blocks(*x.shape):
            S[i:j] = _drop_rows(x[i:j], seed, p, i) @ A
    return S, mid(S, C, task_ids)


def expand(x: Tensor, weight: Tensor, bias: Tensor | None, U: Tensor, B: Tensor, scaling: float) -> Tensor:
    """Step 3: ``y = x W^T + b + scaling * U B``."""
    y = x @ weight.t() if bias is None else torch.addmm(bias, x, weight.t())
    return y.addmm_(U, B, alpha=scaling)


def grad_dy(dy: Tensor, U: Tensor, B: Tensor, scaling: float) -> tuple[Tensor, Tensor]:
    """Step 4: ``dU = scaling * dY B^T`` and ``dB = scaling * U^T dY``."""
    return (dy @ B.t()).mul_(scaling), (U.t() @ dy).mul_(scaling)


def grad_mid(S: Tensor, dU: Tensor, C: Tensor | None, task_ids: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Step 5: ``dS = dU C^T`` and ``dC = S^T dU`` (summed per task when C is 3-D)."""
    if C is None:
        return dU, None
    if C.dim() == 2:
        return dU @ C.t(), S.t() @ dU
    dS = torch.bmm(dU.unsqueeze(1), C[task_ids].transpose(1, 2)).squeeze(1)
    dC = torch.zeros_like(C).index_add_(0, task_ids, S.unsqueeze(2) * dU.unsqueeze(1))
    return dS, dC


def grad_x(dy: Tensor, weight: Tensor, dS: Tensor, A: Tensor, p: float, seed: int | Tensor) -> Tensor:
    """Step 6: ``dX = dY W + drop'(dS A^T)``."""
    if p == 0.0:
        return torch.addmm(dy @ weight, dS, A.t())
    return (dy @ weight).add_(apply_dropout(dS @ A.t(), seed, p))


def grad_a(x: Tensor, dS: Tensor, p: float, seed: int | Tensor) -> Tensor:
    """Step 7: ``dA = drop(x)^T dS``, a reduction over tokens."""
    if p == 0.0:
        return x.t() @ dS
    seed = check_seed(seed)
    dA = x.new_zeros((x.shape[1], dS.shape[1]))
    for i, j in _row_blocks(*x.shape):
        dA.addmm_(_drop_rows(x[i:j], seed, p, i).t(), dS[i:j])
    return dA
