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
  masked ``tl.dot`` per index value present in the block, added with fp32 atomics, or in torch's
  deterministic mode written per row block and summed in order), then ``D <- D M(s)^T``. One launch for the
  whole side, plus one zero-filled buffer holding every core gradient of the side.

The middle factor C (index slices between the sides; per-sample tasks) stays a torch product: nothing for
LoRA or TT-LoRA, one small matmul for MetaTT-4D. A side of one core is a view (no launch); sides longer than
:data:`MAX_CORES` use torch (``ttkernels.ops.factors`` decides). fp32 accumulation; ranks ``<= 128``. Checked in tests/test_triton_factors.py against
``ttkernels.reference.factors``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from . import _common
from ._common import MAX_RANK, ROW_BLOCK, deterministic, gathered_matmul, rank_block

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
            v = gathered_matmul(v, cols, r_in, G + digit[:, None] * st_s, st_in, cols, st_out, out_ok)
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
    ROWS, R_OUT, stride_dr, stride_dc, TOTAL,
    NUM: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, DETERMINISTIC: tl.constexpr,
):  # fmt: skip
    # DETERMINISTIC: each program writes its own copy of the gradients (TOTAL elements further on per
    # program), summed afterwards in a fixed order; otherwise fp32 atomics into one copy.
    block_base = tl.program_id(0).to(tl.int64) * TOTAL if DETERMINISTIC else 0
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
                ptrs = DG + block_base + cols[:, None] * st_in + s * st_s + cols[None, :] * st_out
                if DETERMINISTIC:
                    tl.store(ptrs, part, mask=g_ok)
                else:
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
# A chain is the side's cores in chain order (contiguous), ``divisors`` / ``fixed`` say how a row picks each
# core's slice (divisor 0: the fixed index), ``transposed`` reads every core as G[:, s, :]^T (the B side,
# whose output is written as (r_out, rows)). ``ttkernels.ops`` plans the chains from the spec and calls
# these through the ops ``ttkernels::tt_factor_side`` / ``tt_factor_side_bwd``.
_DESC_CACHE: dict[tuple, torch.Tensor] = {}


def _desc(chain: Sequence[torch.Tensor], divisors: Sequence[int], fixed: Sequence[int], transposed: bool):
    """The chain's descriptor table on its device (cached: built and copied once per layout)."""
    key = (tuple(c.shape for c in chain), tuple(c.stride() for c in chain), tuple(divisors), tuple(fixed))
    key += (transposed, chain[0].device)
    t = _DESC_CACHE.get(key)
    if t is None:
        table = []
        for c, div, fix in zip(chain, divisors, fixed):
            r0, s, r1 = c.shape
            s0, ss, s1 = c.stride()
            table += ([r1, r0, s, s1, ss, s0] if transposed else [r0, r1, s, s0, ss, s1]) + [div, fix]
        t = _DESC_CACHE[key] = torch.tensor(table, dtype=torch.int64).to(chain[0].device)
    return t


def _rank_tile(chain: Sequence[torch.Tensor]) -> int:
    return rank_block(max(max(c.shape[0], c.shape[2]) for c in chain))


def check_chain(chain: Sequence[torch.Tensor]) -> None:
    if not 2 <= len(chain) <= MAX_CORES:
        raise ValueError(f"a factor side has 2 to {MAX_CORES} cores in the Triton kernels, got {len(chain)}")
    if any(max(c.shape[0], c.shape[2]) > MAX_RANK for c in chain):
        raise ValueError(f"backend='triton' supports ranks up to {MAX_RANK}")
    if any(c.dtype != chain[0].dtype for c in chain) or chain[0].dtype not in (
        torch.float32,
        torch.bfloat16,
        torch.float16,
    ):
        raise TypeError("the Triton factor kernels need cores of one dtype: float32, bfloat16 or float16")


def side_forward(
    chain: Sequence[torch.Tensor],
    divisors: Sequence[int],
    fixed: Sequence[int],
    transposed: bool,
    rows: int,
    r_out: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The factor of one side: ``(rows, r_out)``, or ``(r_out, rows)`` when ``transposed``, in ``dtype``."""
    check_chain(chain)
    chain = [c.contiguous() for c in chain]
    out = _common.empty((r_out, rows) if transposed else (rows, r_out), dtype, chain[0].device)
    so_r, so_c = (out.stride(1), out.stride(0)) if transposed else (out.stride(0), out.stride(1))
    pad = [chain[0]] * (MAX_CORES - len(chain))
    _common.run(
        _side_fwd_kernel, (triton.cdiv(rows, ROW_BLOCK),),
        out, _desc(chain, divisors, fixed, transposed), *chain, *pad, rows, r_out, so_r, so_c,
        NUM=len(chain), RP=_rank_tile(chain), BLOCK=ROW_BLOCK,
    )  # fmt: skip
    return out


def side_backward(
    dout: torch.Tensor,
    chain: Sequence[torch.Tensor],
    divisors: Sequence[int],
    fixed: Sequence[int],
    transposed: bool,
    rows: int,
    r_out: int,
) -> torch.Tensor:
    """The gradients of the chain's cores given the factor's gradient ``dout``: one float32 vector, the
    cores' gradients one after the other, each laid out like its (contiguous) core, so one descriptor table
    serves cores and gradients."""
    check_chain(chain)
    chain = [c.contiguous() for c in chain]
    dev = chain[0].device
    total = sum(c.numel() for c in chain)
    blocks = triton.cdiv(rows, ROW_BLOCK)
    det = deterministic()
    # Zero-filled: a row block writes only the slices its rows select.
    flat = torch.zeros((blocks if det else 1) * total, dtype=torch.float32, device=dev)
    grads, at = [], 0
    for c in chain:
        grads.append(flat[at : at + c.numel()].view(c.shape))
        at += c.numel()
    sd_r, sd_c = (dout.stride(1), dout.stride(0)) if transposed else (dout.stride(0), dout.stride(1))
    pad = MAX_CORES - len(chain)
    _common.run(
        _side_bwd_kernel, (blocks,),
        dout, _desc(chain, divisors, fixed, transposed), *chain, *([chain[0]] * pad), *grads, *([grads[0]] * pad),
        rows, r_out, sd_r, sd_c, total,
        NUM=len(chain), RP=_rank_tile(chain), BLOCK=ROW_BLOCK, DETERMINISTIC=det,
    )  # fmt: skip
    return flat.view(blocks, total).sum(0) if det else flat
