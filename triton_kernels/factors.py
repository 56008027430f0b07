"""Steps 1 and 8: the factors A and B from the cores, and the cores' gradients, one launch per side.

A side is a chain of cores read as matrices ``M_j(s) = G[:, s, :]`` (``(r_in, r_out)``). ``A`` is the chain of
cores ``0 .. last_in``: row ``i`` of A (the in indices in C order) is ``G_0(i_0) M_1(i_1) ... M_p(i_p)``.
``B^T`` is the same with the cores ``K-1 .. first_out`` transposed (``M(s) = G[:, s, :]^T``), one row per out
index. A fixed index core (a layer or matrix index inside a side) contributes the same slice to every row.

* ``_side_fwd_kernel``: a program owns ``BLOCK`` rows and walks the chain with fp32 row vectors: for each core,
  ``v <- v M(s_row)`` (a gather of each row's slice; ranks are small, so this is done on CUDA cores). One
  launch writes the whole factor, directly in the compute dtype.
* ``_side_bwd_kernel``: for each core, last to first: ``dG[:, s, :] += L^T D`` over the rows whose index is s
  (``L`` the prefix product up to the core, recomputed; ``D`` the gradient flowing into its output; one
  masked ``tl.dot`` per index value present in the block, added with fp32 atomics), then ``D <- D M(s)^T``.
  One launch for the whole side, plus one zero-filled buffer holding every core gradient of the side.

The middle factor C (index slices between the sides; per-sample tasks) stays a torch product: nothing for
LoRA or TT-LoRA, one small matmul for MetaTT-4D. A side of one core is a view (no launch). Under torch's
deterministic mode, and for sides longer than :data:`MAX_CORES`, :func:`factors` uses the torch path.
fp32 accumulation; ranks ``<= 128``. Checked in tests/test_triton_factors.py against
``ttkernels.reference.factors``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import INTERPRET, MAX_RANK, deterministic, rank_block

MAX_CORES = 8
_FIELDS = 8  # r_in, r_out, size, stride_in, stride_s, stride_out, divisor (0: fixed index), fixed index


@triton.jit
def _pick(j: tl.constexpr, P0, P1, P2, P3, P4, P5, P6, P7):
    if j == 0:
        return P0
    elif j == 1:
        return P1
    elif j == 2:
        return P2
    elif j == 3:
        return P3
    elif j == 4:
        return P4
    elif j == 5:
        return P5
    elif j == 6:
        return P6
    else:
        return P7


@triton.jit
def _digit(rows, DESC, j: tl.constexpr):
    size = tl.load(DESC + j * 8 + 2)
    div = tl.load(DESC + j * 8 + 6)
    fixed = tl.load(DESC + j * 8 + 7)
    return tl.where(div > 0, (rows // tl.maximum(div, 1)) % size, fixed)


@triton.jit
def _prefix(
    rows, ok, cols, DESC, G0, G1, G2, G3, G4, G5, G6, G7, UPTO: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr
):
    """The chain's row vectors after cores ``0 .. UPTO-1`` (fp32, ``(BLOCK, RP)``)."""
    v = tl.zeros((BLOCK, RP), tl.float32)
    for j in tl.static_range(UPTO):
        G = _pick(j, G0, G1, G2, G3, G4, G5, G6, G7)
        r_in = tl.load(DESC + j * 8 + 0)
        r_out = tl.load(DESC + j * 8 + 1)
        st_in = tl.load(DESC + j * 8 + 3)
        st_s = tl.load(DESC + j * 8 + 4)
        st_out = tl.load(DESC + j * 8 + 5)
        digit = _digit(rows, DESC, j)
        out_ok = ok[:, None] & (cols < r_out)[None, :]
        if j == 0:
            v = tl.load(G + digit[:, None] * st_s + cols[None, :] * st_out, mask=out_ok, other=0.0).to(tl.float32)
        else:
            acc = tl.zeros((BLOCK, RP), tl.float32)
            for a in range(0, r_in):
                v_a = tl.sum(tl.where(cols[None, :] == a, v, 0.0), axis=1)
                g = tl.load(G + a * st_in + digit[:, None] * st_s + cols[None, :] * st_out, mask=out_ok, other=0.0)
                acc += v_a[:, None] * g.to(tl.float32)
            v = acc
    return v


@triton.jit
def _side_fwd_kernel(
    OUT, DESC, G0, G1, G2, G3, G4, G5, G6, G7,
    ROWS, R_OUT, stride_or, stride_oc,
    NUM: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, RP)
    ok = rows < ROWS
    v = _prefix(rows, ok, cols, DESC, G0, G1, G2, G3, G4, G5, G6, G7, NUM, RP, BLOCK)
    mask = ok[:, None] & (cols < R_OUT)[None, :]
    tl.store(OUT + rows[:, None] * stride_or + cols[None, :] * stride_oc, v.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _side_bwd_kernel(
    DOUT, DESC, G0, G1, G2, G3, G4, G5, G6, G7, D0, D1, D2, D3, D4, D5, D6, D7,
    ROWS, R_OUT, stride_dr, stride_dc,
    NUM: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.arange(0, RP)
    ok = rows < ROWS
    mask = ok[:, None] & (cols < R_OUT)[None, :]
    d = tl.load(DOUT + rows[:, None] * stride_dr + cols[None, :] * stride_dc, mask=mask, other=0.0).to(tl.float32)
    for k in tl.static_range(NUM - 1, -1, -1):
        G = _pick(k, G0, G1, G2, G3, G4, G5, G6, G7)
        DG = _pick(k, D0, D1, D2, D3, D4, D5, D6, D7)
        r_in = tl.load(DESC + k * 8 + 0)
        r_out = tl.load(DESC + k * 8 + 1)
        size = tl.load(DESC + k * 8 + 2)
        st_in = tl.load(DESC + k * 8 + 3)
        st_s = tl.load(DESC + k * 8 + 4)
        st_out = tl.load(DESC + k * 8 + 5)
        digit = _digit(rows, DESC, k)
        if k == 0:
            left = tl.where(ok[:, None] & (cols == 0)[None, :], 1.0, 0.0)
        else:
            left = _prefix(rows, ok, cols, DESC, G0, G1, G2, G3, G4, G5, G6, G7, k, RP, BLOCK)
        g_ok = (cols < r_in)[:, None] & (cols < r_out)[None, :]
        for s in range(0, size):
            sel = (digit == s) & ok
            if tl.sum(sel.to(tl.int32), axis=0) > 0:
                part = tl.dot(tl.trans(tl.where(sel[:, None], left, 0.0)), d, input_precision="ieee")
                ptrs = DG + cols[:, None] * st_in + s * st_s + cols[None, :] * st_out
                tl.atomic_add(ptrs, part, mask=g_ok, sem="relaxed")
        if k > 0:
            out_ok = ok[:, None] & (cols < r_out)[None, :]
            d_new = tl.zeros((BLOCK, RP), tl.float32)
            for a in range(0, r_in):
                g = tl.load(G + a * st_in + digit[:, None] * st_s + cols[None, :] * st_out, mask=out_ok, other=0.0)
                col = tl.sum(g.to(tl.float32) * d, axis=1)
                d_new = tl.where(cols[None, :] == a, col[:, None], d_new)
            d = d_new


# ------------------------------------------------------------------------------------------ host side
@dataclass(frozen=True)
class _Side:
    """One side's chain: which cores, in which order and orientation, and how rows map to their indices."""

    cores: tuple[int, ...]  # positions in the spec, in chain order
    transposed: bool  # B side: each core read as G[:, s, :]^T
    rows: int
    r_out: int
    divisors: tuple[int, ...]  # per chain core; 0 for a fixed index core
    fixed: tuple[int, ...]

    def desc(self, cores: Sequence[torch.Tensor]) -> torch.Tensor:
        table = []
        for pos, div, fix in zip(self.cores, self.divisors, self.fixed):
            c = cores[pos]
            r0, s, r1 = c.shape
            s0, ss, s1 = c.stride()
            table += [r1, r0, s, s1, ss, s0] if self.transposed else [r0, r1, s, s0, ss, s1]
            table += [div, fix]
        return torch.tensor(table, dtype=torch.int64)


def _sides(spec, index: Mapping[str, int]) -> tuple[_Side, _Side]:
    p, q, K = spec.last_in, spec.first_out, spec.num_cores
    sizes = [m.size for m in spec.modes]

    def side(order: list[int], role: str, rows: int, r_out: int, transposed: bool) -> _Side:
        divs, fixed = [], []
        for k in order:
            if spec.modes[k].role == role:
                later = [sizes[j] for j in range(k + 1, K) if spec.modes[j].role == role]
                divs.append(int(torch.tensor(later, dtype=torch.int64).prod()) if later else 1)
                fixed.append(0)
            else:
                divs.append(0)
                fixed.append(int(index[spec.modes[k].name]))
        return _Side(tuple(order), transposed, rows, r_out, tuple(divs), tuple(fixed))

    ranks = spec.bond_ranks
    a = side(list(range(p + 1)), "in", spec.in_features, ranks[p + 1], False)
    b = side(list(range(K - 1, q - 1, -1)), "out", spec.out_features, ranks[q], True)
    return a, b


_DESC_CACHE: dict[tuple, torch.Tensor] = {}


def _desc_on(side: _Side, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The side's descriptor table on the cores' device (cached: built and copied once per layout)."""
    key = (side, tuple(cores[k].stride() for k in side.cores), cores[0].device)
    t = _DESC_CACHE.get(key)
    if t is None:
        t = _DESC_CACHE[key] = side.desc(cores).to(cores[0].device)
    return t


def _block() -> int:
    return 16 if INTERPRET else 64


def _side_forward(side: _Side, cores: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    dev = cores[0].device
    out = _common.empty((side.rows, side.r_out) if not side.transposed else (side.r_out, side.rows), dtype, dev)
    so_r, so_c = (out.stride(0), out.stride(1)) if not side.transposed else (out.stride(1), out.stride(0))
    ptrs = [cores[k] for k in side.cores] + [cores[side.cores[0]]] * (MAX_CORES - len(side.cores))
    _common.run(
        _side_fwd_kernel, (triton.cdiv(side.rows, _block()),),
        out, _desc_on(side, cores), *ptrs, side.rows, side.r_out, so_r, so_c,
        NUM=len(side.cores), RP=rank_block(max(max(cores[k].shape[0], cores[k].shape[2]) for k in side.cores)),
        BLOCK=_block(),
    )  # fmt: skip
    return out


def _side_backward(side: _Side, cores: Sequence[torch.Tensor], dout: torch.Tensor) -> list[torch.Tensor]:
    """Gradients of the side's cores (chain order); the cores are contiguous, and so are the gradients, so
    one descriptor table serves both."""
    dev = cores[0].device
    chain = [cores[k] for k in side.cores]
    flat = torch.zeros(sum(c.numel() for c in chain), dtype=torch.float32, device=dev)
    grads, at = [], 0
    for c in chain:
        grads.append(flat[at : at + c.numel()].view(c.shape))
        at += c.numel()
    sd_r, sd_c = (dout.stride(0), dout.stride(1)) if not side.transposed else (dout.stride(1), dout.stride(0))
    pad = MAX_CORES - len(chain)
    _common.run(
        _side_bwd_kernel, (triton.cdiv(side.rows, _block()),),
        dout, _desc_on(side, cores), *chain, *([chain[0]] * pad), *grads, *([grads[0]] * pad),
        side.rows, side.r_out, sd_r, sd_c,
        NUM=len(chain), RP=rank_block(max(max(c.shape[0], c.shape[2]) for c in chain)), BLOCK=_block(),
    )  # fmt: skip
    return [g.to(c.dtype) for g, c in zip(grads, chain)]


class _SideFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, side: _Side, dtype: torch.dtype, *cores: torch.Tensor) -> torch.Tensor:
        ctx.side = side
        ctx.n = len(cores)
        ctx.save_for_backward(*cores)
        return _side_forward(side, cores, dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor):
        cores = ctx.saved_tensors
        grads = _side_backward(ctx.side, cores, dout)
        out: list[Optional[torch.Tensor]] = [None] * ctx.n
        for k, g in zip(ctx.side.cores, grads):
            out[k] = g
        return (None, None, *out)


_SIDES_CACHE: dict[tuple, tuple[_Side, _Side]] = {}


def factors(
    cores: Sequence[torch.Tensor],
    spec,
    index: Mapping[str, int] | None = None,
    dtype: Optional[torch.dtype] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(A, C, B)`` as ``ttkernels.reference.factors`` computes them, with A and B in ``dtype`` (default: the
    cores'). A side of two or more cores is one kernel launch forward and one backward; a side of one core is
    a view; C is torch's. Falls back to the reference where the kernels do not apply (deterministic mode,
    float64, cores of mixed dtypes, ranks above 128, sides longer than 8 cores)."""
    from ttkernels import reference as ref

    ref._check_cores(cores, spec)
    index = spec.check_index(index)
    dtype = dtype or cores[0].dtype
    key = (spec, tuple(sorted(index.items())))
    sides = _SIDES_CACHE.get(key)
    if sides is None:
        sides = _SIDES_CACHE[key] = _sides(spec, index)
    usable = (
        not deterministic()
        and dtype in (torch.float32, torch.bfloat16, torch.float16)
        and cores[0].dtype in (torch.float32, torch.bfloat16, torch.float16)
        and all(c.dtype == cores[0].dtype for c in cores)
        and max(spec.bond_ranks) <= MAX_RANK
        and all(len(sd.cores) <= MAX_CORES for sd in sides)
    )
    if not usable:
        A, C, B = ref.factors(cores, spec, index)
        return A.to(dtype), C, B.to(dtype)
    cores = [c.contiguous() for c in cores]
    out = []
    for sd in sides:
        if len(sd.cores) == 1:
            core = cores[sd.cores[0]]
            r0, s, r1 = core.shape
            out.append((core.reshape(s, r1) if not sd.transposed else core.reshape(r0, s)).to(dtype))
        else:
            out.append(_SideFunction.apply(sd, dtype, *cores))
    return out[0], ref.factor_c(cores, spec, index), out[1]
