"""Backward steps 4, 5 and 7, and the per-sample middle product.

* :func:`grad_dy` (step 4): one pass over ``dY (M, d_out)`` gives ``dU = scaling * dY B^T (M, r_b)`` and
  ``dB = scaling * U^T dY (r_b, d_out)``. A program owns a block of rows and walks d_out: ``dU`` stays in
  registers; ``dB`` is a sum over row blocks, added with float32 atomics, or, in deterministic mode, written
  per row block to a ``(blocks, r_b, d_out)`` float32 buffer summed afterwards in a fixed order.
* :func:`grad_a` (step 7): ``dA = drop(x)^T dS (d_in, r_a)``, a reduction over tokens split in ``SPLIT``
  ranges (grid ``d_in blocks x SPLIT``); the partial sums are added with atomics, or, in deterministic mode,
  written to a ``(SPLIT, d_in, r_a)`` buffer and summed in order. The mask is the forward's (same seed).
* :func:`task_matmul`: ``OUT[m] = IN[m] C[t_m]`` (or ``C[t_m]^T``) for per-sample tasks, without gathering
  an ``(M, r_a, r_b)`` copy of C: U in backward and ``dS = dU C[t]^T`` in step 5.
* :func:`grad_mid` (step 5): ``dS = dU C^T`` and ``dC = S^T dU``; per task, ``dC[t]`` sums the rows of task
  ``t`` (one masked ``tl.dot`` per task present in a row block; atomics or a deterministic buffer of
  ``(blocks, T, r_a, r_b)``). With a shared C these are two tiny matmuls and use torch.

Deterministic mode is torch's: ``torch.use_deterministic_algorithms(True)``. fp32 accumulation; ranks
``<= 128``. Checked in tests/test_triton.py against ``ttkernels.reference``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    DROPOUT_ARGS,
    INTERPRET,
    ROW_BLOCK,
    Tuned,
    config,
    deterministic,
    dropout_args,
    empty,
    gathered_matmul,
    keep_mask,
    m_bucket,
    num_sms,
    precision,
    rank_block,
)


# ------------------------------------------------------------------------------------------- step 4
@triton.jit
def _grad_dy_kernel(
    DY, B, U, DU, DB,
    M, N, RB, M_BUCKET,
    stride_ym, stride_yn, stride_br, stride_bn, stride_um, stride_ur,
    scaling,
    DETERMINISTIC: tl.constexpr, PRECISION: tl.constexpr, RB_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    rr = tl.arange(0, RB_P)
    m_ok = rm < M
    r_ok = rr < RB
    u = tl.load(U + rm64[:, None] * stride_um + rr[None, :] * stride_ur, mask=m_ok[:, None] & r_ok[None, :], other=0.0)
    ut = tl.trans(u)
    du = tl.zeros((BLOCK_M, RB_P), tl.float32)
    db_base = DB + (pid.to(tl.int64) * RB * N if DETERMINISTIC else 0)
    for n0 in range(0, N, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        dy = tl.load(
            DY + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, mask=m_ok[:, None] & n_ok[None, :], other=0.0
        )
        b = tl.load(
            B + rr[:, None] * stride_br + rn[None, :] * stride_bn, mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )
        du = tl.dot(dy, tl.trans(b), du, input_precision=PRECISION)
        db = tl.dot(ut, dy, input_precision=PRECISION)
        db_ptrs = db_base + rr[:, None] * N + rn[None, :]
        db_ok = r_ok[:, None] & n_ok[None, :]
        if DETERMINISTIC:
            tl.store(db_ptrs, db, mask=db_ok)
        else:
            tl.atomic_add(db_ptrs, db, mask=db_ok, sem="relaxed")
    tl.store(
        DU + rm64[:, None] * RB + rr[None, :],
        (du * scaling).to(DU.dtype.element_ty),
        mask=m_ok[:, None] & r_ok[None, :],
    )


def _grad_dy_configs(hopper: bool) -> list[triton.Config]:
    # 64 x 128, 128 x 128 and 64 x 256 spilled at unaligned strides (make triton-gate): not listed
    cfgs = [config(4, 3, BLOCK_M=bm, BLOCK_N=bn) for bm in (16, 32) for bn in (64, 128)]
    cfgs += [config(4, 3, BLOCK_M=64, BLOCK_N=64), config(8, 3, BLOCK_M=128, BLOCK_N=64)]
    return cfgs


# Deterministic mode needs the row-block count before launch, so it uses the fixed GPU tiling.
GRAD_DY = Tuned(
    _grad_dy_kernel,
    {"BLOCK_M": 16, "BLOCK_N": 16},
    {"BLOCK_M": 64, "BLOCK_N": 64, "num_warps": 4, "num_stages": 3},
    _grad_dy_configs,
    ["M_BUCKET", "N", "RB"],
    reset_to_zero=["DB"],
)


def grad_dy(dy: torch.Tensor, U: torch.Tensor, B: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = dy.shape
    RB = B.shape[0]
    dU = empty((M, RB), dy.dtype, dy.device)
    if M == 0:
        return dU, torch.zeros_like(B)
    args = (
        dy, B, U, dU, None,
        M, N, RB, m_bucket(M),
        dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), U.stride(0), U.stride(1),
        float(scaling),
    )  # fmt: skip
    meta = {"PRECISION": precision(dy.dtype), "RB_P": rank_block(RB)}
    if deterministic():
        fixed = GRAD_DY.fixed_meta(dy.device)
        blocks = triton.cdiv(M, fixed["BLOCK_M"])
        buf = empty((blocks, RB, N), torch.float32, dy.device)
        GRAD_DY.launch_fixed(fixed, (blocks,), *_with(args, 4, buf), DETERMINISTIC=True, **meta)
        dB32 = buf.sum(0)
    else:
        dB32 = torch.zeros((RB, N), dtype=torch.float32, device=dy.device)
        GRAD_DY.launch(
            dy.device, lambda m: (triton.cdiv(M, m["BLOCK_M"]),), *_with(args, 4, dB32), DETERMINISTIC=False, **meta
        )
    return dU, dB32.mul_(scaling).to(B.dtype)


def _with(args: tuple, i: int, value: object) -> tuple:
    return args[:i] + (value,) + args[i + 1 :]


# ------------------------------------------------------------------------------------------- step 7
@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _grad_a_kernel(
    X, DS, DA,
    M, K, RA, M_BUCKET,
    stride_xm, stride_xk, stride_sm, stride_sr,
    seed_lo, seed_hi, threshold, keep_scale,
    DETERMINISTIC: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr, RA_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    split = tl.num_programs(1)
    rk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    ra = tl.arange(0, RA_P)
    k_ok = rk < K
    a_ok = ra < RA
    per_split = tl.cdiv(tl.cdiv(M, BLOCK_M), split) * BLOCK_M
    m_lo = pid_s * per_split
    m_hi = tl.minimum(m_lo + per_split, M)
    acc = tl.zeros((BLOCK_K, RA_P), tl.float32)
    for m0 in range(m_lo, m_hi, BLOCK_M):
        rm = m0 + tl.arange(0, BLOCK_M)
        m_ok = rm < m_hi
        x = tl.load(
            X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        if DROPOUT:
            keep = keep_mask(rm, rk, seed_lo, seed_hi, threshold)
            x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(X.dtype.element_ty)
        ds = tl.load(
            DS + rm.to(tl.int64)[:, None] * stride_sm + ra[None, :] * stride_sr,
            mask=m_ok[:, None] & a_ok[None, :],
            other=0.0,
        )
        acc = tl.dot(tl.trans(x), ds, acc, input_precision=PRECISION)
    da_ptrs = DA + (pid_s.to(tl.int64) * K * RA if DETERMINISTIC else 0) + rk[:, None] * RA + ra[None, :]
    da_ok = k_ok[:, None] & a_ok[None, :]
    if DETERMINISTIC:
        tl.store(da_ptrs, acc, mask=da_ok)
    else:
        tl.atomic_add(da_ptrs, acc, mask=da_ok, sem="relaxed")


def _grad_a_configs(hopper: bool) -> list[triton.Config]:
    # 128 x 128 spilled with dropout in deterministic mode (make triton-gate): not listed
    cfgs = [config(4, 3, BLOCK_M=bm, BLOCK_K=bk) for bm in (32, 64, 128) for bk in (32, 64, 128) if bm * bk < 16384]
    if hopper:
        cfgs += [config(8, 4, BLOCK_M=128, BLOCK_K=128), config(8, 4, BLOCK_M=256, BLOCK_K=64)]
    return cfgs


GRAD_A = Tuned(
    _grad_a_kernel,
    {"BLOCK_M": 16, "BLOCK_K": 16},
    {"BLOCK_M": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3},
    _grad_a_configs,
    ["M_BUCKET", "K", "RA"],
    reset_to_zero=["DA"],
)


def _split(M: int, K: int, block_m: int, block_k: int, device: torch.device) -> int:
    """Token ranges per d_in block: about two waves of programs, never more ranges than row blocks."""
    k_blocks = triton.cdiv(K, block_k)
    want = triton.cdiv(2 * num_sms(device), k_blocks)
    return max(1, min(want, triton.cdiv(M, block_m), 64 if not INTERPRET else 3))


def grad_a(x: torch.Tensor, dS: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    M, K = x.shape
    RA = dS.shape[1]
    if M == 0:
        return torch.zeros((K, RA), dtype=x.dtype, device=x.device)
    lo, hi, thr, keep_scale = dropout_args(p, seed)
    args = (
        x, dS, None,
        M, K, RA, m_bucket(M),
        x.stride(0), x.stride(1), dS.stride(0), dS.stride(1),
        lo, hi, thr, keep_scale,
    )  # fmt: skip
    meta = {"DROPOUT": p > 0.0, "PRECISION": precision(x.dtype), "RA_P": rank_block(RA)}
    if deterministic():
        fixed = GRAD_A.fixed_meta(x.device)
        split = _split(M, K, fixed["BLOCK_M"], fixed["BLOCK_K"], x.device)
        buf = empty((split, K, RA), torch.float32, x.device)
        grid = (triton.cdiv(K, fixed["BLOCK_K"]), split)
        GRAD_A.launch_fixed(fixed, grid, *_with(args, 2, buf), DETERMINISTIC=True, **meta)
        return buf.sum(0).to(x.dtype)
    dA32 = torch.zeros((K, RA), dtype=torch.float32, device=x.device)

    def grid(m: dict) -> tuple[int, int]:
        return triton.cdiv(K, m["BLOCK_K"]), _split(M, K, m["BLOCK_M"], m["BLOCK_K"], x.device)

    GRAD_A.launch(x.device, grid, *_with(args, 2, dA32), DETERMINISTIC=False, **meta)
    return dA32.to(x.dtype)


# ----------------------------------------------------------------------------------- per-sample tasks
@triton.jit
def _task_matmul_kernel(
    IN, C, T, OUT,
    M, RI, RJ,
    stride_ct, stride_ci, stride_cj,
    RI_P: tl.constexpr, RJ_P: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    # OUT[m, j] = sum_i IN[m, i] C[t_m, i, j]; IN (M, RI) and OUT (M, RJ) contiguous.
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ri = tl.arange(0, RI_P)
    rj = tl.arange(0, RJ_P)
    m_ok = rm < M
    j_ok = rj < RJ
    t = tl.load(T + rm, mask=m_ok, other=0)
    v = tl.load(
        IN + rm.to(tl.int64)[:, None] * RI + ri[None, :], mask=m_ok[:, None] & (ri < RI)[None, :], other=0.0
    ).to(tl.float32)
    mask = m_ok[:, None] & j_ok[None, :]
    out = gathered_matmul(v, ri, RI, C + t[:, None] * stride_ct, stride_ci, rj, stride_cj, mask)
    tl.store(
        OUT + rm.to(tl.int64)[:, None] * RJ + rj[None, :],
        out.to(OUT.dtype.element_ty),
        mask=m_ok[:, None] & j_ok[None, :],
    )


def task_matmul(inp: torch.Tensor, C: torch.Tensor, task_ids: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """``out[m] = inp[m] @ C[task_ids[m]]`` (``C[task_ids[m]]^T`` with ``transpose``), C of shape (T, ra, rb)."""
    inp = inp.contiguous()
    M, RI = inp.shape
    st, si, sj = C.stride()
    if transpose:
        si, sj = sj, si
    RJ = C.shape[1] if transpose else C.shape[2]
    out = empty((M, RJ), inp.dtype, inp.device)
    if M == 0:
        return out
    block_m = ROW_BLOCK
    _common.run(
        _task_matmul_kernel,
        (triton.cdiv(M, block_m),),
        inp,
        C,
        task_ids,
        out,
        M,
        RI,
        RJ,
        st,
        si,
        sj,
        RI_P=rank_block(RI),
        RJ_P=rank_block(RJ),
        BLOCK_M=block_m,
    )
    return out


def mid(S: torch.Tensor, C: Optional[torch.Tensor], task_ids: Optional[torch.Tensor]) -> torch.Tensor:
    """``U = S C`` from a saved S (backward recomputes U rather than storing it)."""
    if C is None:
        return S
    if C.dim() == 2:
        return S @ C
    return task_matmul(S, C, task_ids)


# ------------------------------------------------------------------------------------------- step 5
@triton.jit
def _task_grad_c_kernel(
    S, DU, T, DC,
    M, RA, RB, NT,
    DETERMINISTIC: tl.constexpr, PRECISION: tl.constexpr, RA_P: tl.constexpr, RB_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    # DC[t] += S[rows of t]^T DU[rows of t]; S (M, RA), DU (M, RB), DC (T, RA, RB), all contiguous.
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    ra = tl.arange(0, RA_P)
    rb = tl.arange(0, RB_P)
    m_ok = rm < M
    t = tl.load(T + rm, mask=m_ok, other=-1)
    s = tl.load(S + rm.to(tl.int64)[:, None] * RA + ra[None, :], mask=m_ok[:, None] & (ra < RA)[None, :], other=0.0)
    du = tl.load(DU + rm.to(tl.int64)[:, None] * RB + rb[None, :], mask=m_ok[:, None] & (rb < RB)[None, :], other=0.0)
    base = DC + (pid.to(tl.int64) * NT * RA * RB if DETERMINISTIC else 0)
    c_ok = (ra < RA)[:, None] & (rb < RB)[None, :]
    for task in range(0, NT):
        sel = t == task
        if tl.sum(sel.to(tl.int32), axis=0) > 0:
            st = tl.where(sel[:, None], s, 0.0)
            dc = tl.dot(tl.trans(st), du, input_precision=PRECISION)
            ptrs = base + task * RA * RB + ra[:, None] * RB + rb[None, :]
            if DETERMINISTIC:
                tl.store(ptrs, dc, mask=c_ok)
            else:
                tl.atomic_add(ptrs, dc, mask=c_ok, sem="relaxed")


def grad_mid(
    S: torch.Tensor, dU: torch.Tensor, C: Optional[torch.Tensor], task_ids: Optional[torch.Tensor]
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    if C is None:
        return dU, None
    if C.dim() == 2:
        return dU @ C.t(), S.t() @ dU
    S, dU = S.contiguous(), dU.contiguous()
    M, RA = S.shape
    NT, _, RB = C.shape
    dS = task_matmul(dU, C, task_ids, transpose=True)
    if M == 0:
        return dS, torch.zeros_like(C)
    block_m = ROW_BLOCK
    blocks = triton.cdiv(M, block_m)
    det = deterministic()
    # Zero-filled: a row block writes only the tasks it holds.
    buf = torch.zeros((blocks, NT, RA, RB) if det else (NT, RA, RB), dtype=torch.float32, device=S.device)
    _common.run(
        _task_grad_c_kernel, (blocks,),
        S, dU, task_ids, buf, M, RA, RB, NT,
        DETERMINISTIC=det, PRECISION=precision(S.dtype), RA_P=rank_block(RA), RB_P=rank_block(RB), BLOCK_M=block_m,
    )  # fmt: skip
    return dS, (buf.sum(0) if det else buf).to(C.dtype)
