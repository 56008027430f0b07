"""The Kronecker-sum kernels of TT-matrix adapters: ``y_b = sum_r Q_r X_b P_r`` per token, fused.

A TT-matrix chain cut at one bond is a sum of ``r`` Kronecker products (``ttkernels.ttm.kron_factors``); per
token ``b``, with ``x_b`` read as an ``(NI, NJ)`` matrix,

    y[b, a, c] = sum_r sum_i Q[r, a, i] sum_j x[b, i, j] P[r, j, c]        Q (R, NA, NI), P (R, NJ, NC)

**Forward** (:func:`kron_apply`, also dx with Q and P transposed): a program owns ``BLOCK_M`` tokens and
``BLOCK_C`` columns of ``c``. For each ``r`` it runs stage A, one GEMM tile ``T = X_rows P_r`` whose rows are the
pairs ``(i, b)`` (i-major, gathered through x's strides) and whose K loop streams ``j``; then stage B,
``acc += Q_r T'`` where ``T'`` is the same tile read as ``(NI, BLOCK_M * BLOCK_C)`` (a row-major reshape: a
layout change on chip on a GPU). ``T`` is rounded to x's dtype for stage B (the operand type of the second
product), ``acc`` is float32, and nothing but ``y`` reaches memory: the intermediate (``r * NI * NC`` elements
per token, several times x) never exists in full.

**Backward** recomputes ``T`` (for ``dQ = sum_b dY_b T_b^T``) and ``W = Q_r X_b`` (for
``dP = sum_b W_b^T dY_b``) tile by tile instead of storing them; each reduction over tokens writes float32
partial sums per token split, added in a fixed order afterwards (deterministic, no atomics).

Limits: ``NI`` and ``NA`` (the sides of the factor applied second, kept whole in a program) up to
:data:`MAX_KEPT` after padding to 16; ``NJ``, ``NC``, ``R`` and the token count are unbounded.
Checked in tests/test_ttm.py against the float64 reference ``ttkernels.ttm.kron_*_ref``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ._common import Tuned, config, empty, m_bucket, next_pow2, num_sms, precision

MAX_KEPT = 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _stage_a(x_rows, row_ok, P_r, cc, c_ok, NJ, NC, sxj, PRECISION: tl.constexpr, ROWS: tl.constexpr,
             BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr):  # fmt: skip
    """``T[(i, b), c] = sum_j x[b, i, j] P_r[j, c]`` for one tile, float32."""
    jj = tl.arange(0, BLOCK_J)
    t = tl.zeros((ROWS, BLOCK_C), tl.float32)
    for j0 in range(0, NJ, BLOCK_J):
        j = j0 + jj
        j_ok = j < NJ
        xt = tl.load(x_rows[:, None] + j[None, :].to(tl.int64) * sxj, mask=row_ok[:, None] & j_ok[None, :], other=0.0)
        pt = tl.load(P_r + j[:, None] * NC + cc[None, :], mask=j_ok[:, None] & c_ok[None, :], other=0.0)
        t = tl.dot(xt, pt, t, input_precision=PRECISION)
    return t


@triton.jit
def _kron_apply_kernel(
    X, Q, P, Y,
    M, NI, NJ, NA, NC, R, M_BUCKET,
    sxb, sxi, sxj, syb, sya, syc,
    PRECISION: tl.constexpr, NI_P: tl.constexpr, NA_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    b0 = tl.program_id(0) * BLOCK_M
    c0 = tl.program_id(1) * BLOCK_C
    t = tl.arange(0, NI_P * BLOCK_M)  # stage-A rows (i, b), i-major
    ti = t // BLOCK_M
    tb = b0 + t % BLOCK_M
    row_ok = (ti < NI) & (tb < M)
    x_rows = X + tb.to(tl.int64) * sxb + ti.to(tl.int64) * sxi
    cc = c0 + tl.arange(0, BLOCK_C)
    c_ok = cc < NC
    aa = tl.arange(0, NA_P)
    ii = tl.arange(0, NI_P)
    q_mask = (aa < NA)[:, None] & (ii < NI)[None, :]
    acc = tl.zeros((NA_P, BLOCK_M * BLOCK_C), tl.float32)
    for r in range(0, R):
        tr = _stage_a(x_rows, row_ok, P + r * NJ * NC, cc, c_ok, NJ, NC, sxj, PRECISION, NI_P * BLOCK_M, BLOCK_C,
                      BLOCK_J)  # fmt: skip
        t2 = tl.reshape(tr.to(X.dtype.element_ty), (NI_P, BLOCK_M * BLOCK_C))
        q = tl.load(Q + r * NA * NI + aa[:, None] * NI + ii[None, :], mask=q_mask, other=0.0)
        acc = tl.dot(q, t2, acc, input_precision=PRECISION)
    u = tl.arange(0, BLOCK_M * BLOCK_C)  # acc columns (b, c), b-major
    ub = b0 + u // BLOCK_C
    uc = c0 + u % BLOCK_C
    ptr = Y + ub.to(tl.int64)[None, :] * syb + aa.to(tl.int64)[:, None] * sya + uc.to(tl.int64)[None, :] * syc
    tl.store(ptr, acc.to(Y.dtype.element_ty), mask=(aa < NA)[:, None] & ((ub < M) & (uc < NC))[None, :])


@triton.jit
def _kron_grad_q_kernel(
    DY, X, P, DQ,
    M, NI, NJ, NA, NC, R, TOKENS_PER_SPLIT, M_BUCKET,
    sdb, sda, sdc, sxb, sxi, sxj,
    PRECISION: tl.constexpr, NI_P: tl.constexpr, NA_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Partial ``dQ[s, r] = sum_{b in split s} dY_b T_b^T`` (float32), ``T_b = X_b P_r`` recomputed."""
    r = tl.program_id(0)
    s = tl.program_id(1)
    start = s * TOKENS_PER_SPLIT
    stop = tl.minimum(start + TOKENS_PER_SPLIT, M)
    t = tl.arange(0, NI_P * BLOCK_M)
    ti = t // BLOCK_M
    tm = t % BLOCK_M
    u = tl.arange(0, BLOCK_M * BLOCK_C)  # dY tile columns (b, c), b-major
    ub = u // BLOCK_C
    uc = u % BLOCK_C
    aa = tl.arange(0, NA_P)
    ii = tl.arange(0, NI_P)
    P_r = P + r * NJ * NC
    acc = tl.zeros((NA_P, NI_P), tl.float32)
    for b0 in range(start, stop, BLOCK_M):
        tb = b0 + tm
        row_ok = (ti < NI) & (tb < M)
        x_rows = X + tb.to(tl.int64) * sxb + ti.to(tl.int64) * sxi
        for c0 in range(0, NC, BLOCK_C):
            cc = c0 + tl.arange(0, BLOCK_C)
            tr = _stage_a(x_rows, row_ok, P_r, cc, cc < NC, NJ, NC, sxj, PRECISION, NI_P * BLOCK_M, BLOCK_C,
                          BLOCK_J)  # fmt: skip
            t2 = tl.reshape(tr.to(X.dtype.element_ty), (NI_P, BLOCK_M * BLOCK_C))
            bu = b0 + ub
            cu = c0 + uc
            dy = tl.load(
                DY + bu.to(tl.int64)[None, :] * sdb + aa.to(tl.int64)[:, None] * sda + cu.to(tl.int64)[None, :] * sdc,
                mask=(aa < NA)[:, None] & ((bu < M) & (cu < NC))[None, :],
                other=0.0,
            )
            acc = tl.dot(dy, tl.trans(t2), acc, input_precision=PRECISION)
    out = DQ + (s * R + r).to(tl.int64) * NA * NI + aa[:, None] * NI + ii[None, :]
    tl.store(out, acc, mask=(aa < NA)[:, None] & (ii < NI)[None, :])


@triton.jit
def _kron_grad_p_kernel(
    DY, X, Q, DP,
    M, NI, NJ, NA, NC, R, TOKENS_PER_SPLIT, M_BUCKET,
    sdb, sda, sdc, sxb, sxi, sxj,
    PRECISION: tl.constexpr, NI_P: tl.constexpr, NA_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_J: tl.constexpr,
):  # fmt: skip
    """Partial ``dP[s, r, j-tile, c-tile] = sum_{b in split s} W_b^T dY_b`` (float32), ``W_b = Q_r X_b``
    recomputed."""
    num_j = tl.cdiv(NJ, BLOCK_J)
    r = tl.program_id(0) // num_j
    j0 = (tl.program_id(0) % num_j) * BLOCK_J
    c0 = tl.program_id(1) * BLOCK_C
    s = tl.program_id(2)
    start = s * TOKENS_PER_SPLIT
    stop = tl.minimum(start + TOKENS_PER_SPLIT, M)
    aa = tl.arange(0, NA_P)
    ii = tl.arange(0, NI_P)
    q = tl.load(Q + r * NA * NI + aa[:, None] * NI + ii[None, :], mask=(aa < NA)[:, None] & (ii < NI)[None, :],
                other=0.0)  # fmt: skip
    u = tl.arange(0, BLOCK_M * BLOCK_J)  # X tile columns (b, j), b-major
    ub = u // BLOCK_J
    uj = j0 + u % BLOCK_J
    t = tl.arange(0, NA_P * BLOCK_M)  # dY tile rows (a, b), a-major
    ta = t // BLOCK_M
    tm = t % BLOCK_M
    jj = j0 + tl.arange(0, BLOCK_J)
    cc = c0 + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_J, BLOCK_C), tl.float32)
    # `if start < stop` changes nothing the loop computes; without it LLVM zeroes the accumulator on the loop's
    # zero-trip path, which ptxas takes for a write to a wgmma's accumulator in flight and serializes wgmma (C7515).
    if start < stop:
        for b0 in range(start, stop, BLOCK_M):
            bu = b0 + ub
            xt = tl.load(
                X + bu.to(tl.int64)[None, :] * sxb + ii.to(tl.int64)[:, None] * sxi + uj.to(tl.int64)[None, :] * sxj,
                mask=(ii < NI)[:, None] & ((bu < M) & (uj < NJ))[None, :],
                other=0.0,
            )
            w = tl.dot(q, xt, input_precision=PRECISION)  # (NA_P, (b, j))
            w2 = tl.reshape(w.to(X.dtype.element_ty), (NA_P * BLOCK_M, BLOCK_J))  # rows (a, b)
            tb = b0 + tm
            dy = tl.load(
                DY + tb.to(tl.int64)[:, None] * sdb + ta.to(tl.int64)[:, None] * sda + cc.to(tl.int64)[None, :] * sdc,
                mask=((ta < NA) & (tb < M))[:, None] & (cc < NC)[None, :],
                other=0.0,
            )
            acc = tl.dot(tl.trans(w2), dy, acc, input_precision=PRECISION)
    out = DP + (s * R + r).to(tl.int64) * NJ * NC + jj[:, None] * NC + cc[None, :]
    tl.store(out, acc, mask=(jj < NJ)[:, None] & (cc < NC)[None, :])


# ------------------------------------------------------------------------------------------ configurations
def kept(n: int) -> int:
    """A kept side padded to a power of two, at least tl.dot's 16."""
    return next_pow2(n, 16)


def _tile_elems(ni_p: int, na_p: int, bm: int, bc: int, bj: int, kind: str) -> int:
    """The largest float32 tile of a configuration, in elements."""
    if kind == "grad_p":
        return max(na_p * bm * bj, bj * bc)
    return max(ni_p * bm * bc, na_p * bm * bc)


def _tile_ok(ni_p: int, na_p: int, bm: int, bc: int, bj: int, kind: str, budget: int = 16384) -> bool:
    """Register budget of a configuration: every float32 tile at most ``budget`` elements, at most 512 rows."""
    rows = (na_p if kind == "grad_p" else ni_p) * bm
    return _tile_elems(ni_p, na_p, bm, bc, bj, kind) <= budget and rows <= 512


def _gpu_configs(ni_p: int, na_p: int, kind: str, hopper: bool) -> list[triton.Config]:
    # Register budgets from the compile gate (make triton-gate, sm_90): 16K-element tiles spill with 4 warps,
    # and with a kept side of 128 every tile over 8K elements spills, with 4 or 8 warps.
    big = max(ni_p, na_p) >= 128
    budget = 8192 if big else 16384
    tiles = []
    for bm in (1, 2, 4, 8, 16):
        for bc in (32, 64, 128):
            for bj in (32, 64):
                # grad_p's 16-row tiles with bc * bj >= 4096 need 262-394 KB of shared memory on sm_90
                # (make triton-gate), over the 227 KB limit
                too_big = kind == "grad_p" and bm >= 16 and bc * bj >= 4096
                # and with a kept side of 128, grad_p's 2-token tiles spill too
                too_big = too_big or (kind == "grad_p" and na_p >= 128 and bm > 1)
                if _tile_ok(ni_p, na_p, bm, bc, bj, kind, budget) and max(ni_p, na_p) * bm >= 64 and not too_big:
                    tiles.append((bm, bc, bj))
    if not tiles:
        tiles = [(1, 32, 32)]
    tiles.sort(key=lambda c: (c[0] * c[1], c[2]), reverse=True)  # the largest tiles reuse each load most
    tiles = tiles[:6] + ([tiles[-1]] if len(tiles) > 6 else [])
    stages = 4 if hopper else 3
    return [
        config(w, stages, BLOCK_M=bm, BLOCK_C=bc, BLOCK_J=bj)
        for (bm, bc, bj) in tiles
        for w in ((8,) if big or _tile_elems(ni_p, na_p, bm, bc, bj, kind) > 8192 else (4, 8))
    ]


def _gpu_default(ni_p: int, na_p: int, kind: str) -> dict[str, int]:
    budget = 8192 if max(ni_p, na_p) >= 128 else 16384  # as in _gpu_configs
    for bm, bc, bj in ((8, 64, 64), (4, 64, 64), (2, 64, 64), (1, 64, 64), (1, 32, 32)):
        if _tile_ok(ni_p, na_p, bm, bc, bj, kind, budget):
            return {"BLOCK_M": bm, "BLOCK_C": bc, "BLOCK_J": bj, "num_warps": 8, "num_stages": 3}
    return {"BLOCK_M": 1, "BLOCK_C": 16, "BLOCK_J": 16, "num_warps": 4, "num_stages": 2}


_KERNELS = {"apply": _kron_apply_kernel, "grad_q": _kron_grad_q_kernel, "grad_p": _kron_grad_p_kernel}
_TUNED: dict[tuple[str, int, int], Tuned] = {}


def tuned(kind: str, ni_p: int, na_p: int) -> Tuned:
    """The kernel of ``kind`` with its configurations for padded kept sides ``(ni_p, na_p)``."""
    key = (kind, ni_p, na_p)
    if key not in _TUNED:
        _TUNED[key] = Tuned(
            _KERNELS[kind],
            {"BLOCK_M": 2, "BLOCK_C": 16, "BLOCK_J": 16},
            _gpu_default(ni_p, na_p, kind),
            lambda hopper: _gpu_configs(ni_p, na_p, kind, hopper),
            ["M_BUCKET", "NI", "NJ", "NA", "NC", "R"],
        )
    return _TUNED[key]


def tuned_for_launch(kernel: Any, kwargs: dict) -> Optional[Tuned]:
    """For ``aot.py``: the :class:`Tuned` of a recorded launch of one of these kernels, else None."""
    for kind, k in _KERNELS.items():
        if k is kernel:
            return tuned(kind, kwargs["NI_P"], kwargs["NA_P"])
    return None


# ------------------------------------------------------------------------------------------------ launchers
def check(x3: torch.Tensor, q: torch.Tensor, p: torch.Tensor) -> None:
    """What the kernels need beyond the shapes (which ``ttkernels.ttm`` derives from one spec)."""
    if x3.dtype not in DTYPES:
        raise TypeError(f"backend='triton' computes in float32, bfloat16 or float16, not {x3.dtype}")
    for name, t in (("q", q), ("p", p)):
        if t.dtype != x3.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x3.dtype}")
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if kept(q.shape[1]) > MAX_KEPT or kept(q.shape[2]) > MAX_KEPT:
        raise ValueError(
            f"q has shape {tuple(q.shape)}: the factor applied second is kept whole in a program, at most "
            f"{MAX_KEPT} per side"
        )


def kron_apply(x3: torch.Tensor, q: torch.Tensor, p: torch.Tensor, out3: Optional[torch.Tensor] = None):
    """``out3[b, a, c] = sum_{r, i, j} q[r, a, i] x3[b, i, j] p[r, j, c]``; ``out3`` ``(M, NA, NC)`` may be a
    strided view (written through its strides), allocated when None."""
    check(x3, q, p)
    M, NI, NJ = x3.shape
    R, NA, _ = q.shape
    NC = p.shape[2]
    if out3 is None:
        out3 = empty((M, NA, NC), x3.dtype, x3.device)
    if M == 0:
        return out3
    ni_p, na_p = kept(NI), kept(NA)
    tuned("apply", ni_p, na_p).launch(
        x3.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(NC, meta["BLOCK_C"])),
        x3, q, p, out3,
        M, NI, NJ, NA, NC, R, m_bucket(M),
        *x3.stride(), *out3.stride(),
        PRECISION=precision(x3.dtype), NI_P=ni_p, NA_P=na_p,
    )  # fmt: skip
    return out3


def _splits(M: int, programs: int, device: torch.device) -> tuple[int, int]:
    """(splits, tokens per split): about two waves of programs, at least 64 tokens a split; tokens per split a
    multiple of 16 so that every BLOCK_M divides it (a block never straddles two splits)."""
    want = max(1, (2 * num_sms(device) + programs - 1) // programs)
    splits = max(1, min(want, (M + 63) // 64))
    per = (M + splits - 1) // splits
    per = (per + 15) // 16 * 16
    return (M + per - 1) // per, per


def _kron_reduce(kind: str, dy3: torch.Tensor, x3: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """dq (``kind == "grad_q"``, q's shape) or dp (p's shape), float32: per-split partial sums, added in order."""
    check(x3, q, p)
    R, NA, NI = q.shape
    M, _, NJ = x3.shape
    NC = p.shape[2]
    shape = tuple(q.shape if kind == "grad_q" else p.shape)
    if M == 0:
        return torch.zeros(shape, dtype=torch.float32, device=x3.device)
    ni_p, na_p = kept(NI), kept(NA)
    t = tuned(kind, ni_p, na_p)
    if kind == "grad_q":  # a program per (r, split)
        splits, per = _splits(M, R, x3.device)
        grid = lambda meta: (R, splits)
    else:  # a program per (r, j tile, c tile, split); the split count sizes the buffer before tiles are tuned
        fixed = t.fixed_meta(x3.device)
        tiles = R * triton.cdiv(NJ, fixed["BLOCK_J"]) * triton.cdiv(NC, fixed["BLOCK_C"])
        splits, per = _splits(M, tiles, x3.device)
        grid = lambda meta: (R * triton.cdiv(NJ, meta["BLOCK_J"]), triton.cdiv(NC, meta["BLOCK_C"]), splits)
    part = empty((splits, *shape), torch.float32, x3.device)
    t.launch(
        x3.device, grid,
        dy3, x3, p if kind == "grad_q" else q, part,
        M, NI, NJ, NA, NC, R, per, m_bucket(M),
        *dy3.stride(), *x3.stride(),
        PRECISION=precision(x3.dtype), NI_P=ni_p, NA_P=na_p,
    )  # fmt: skip
    return part[0] if splits == 1 else part.sum(0)


def kron_grad_q(dy3: torch.Tensor, x3: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``dq[r, a, i] = sum_{b, c} dy3[b, a, c] sum_j x3[b, i, j] p[r, j, c]``, float32, q's shape."""
    return _kron_reduce("grad_q", dy3, x3, p, q)


def kron_grad_p(dy3: torch.Tensor, x3: torch.Tensor, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``dp[r, j, c] = sum_{b, a} (sum_i q[r, a, i] x3[b, i, j]) dy3[b, a, c]``, float32, p's shape."""
    return _kron_reduce("grad_p", dy3, x3, p, q)
