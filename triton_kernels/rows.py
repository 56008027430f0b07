"""The ``cublas`` plan: row-owner kernels around torch's GEMM, forward and backward.

A program owns ``BLOCK_M`` rows (tokens) and does every adapter step of those rows, so the activations are
read once and nothing of size ``M x r`` goes to memory except the S that backward needs:

* forward (:func:`forward`), one launch of ``_rows_fwd_kernel`` then ``y0.addmm_(x, W^T)`` (beta = 1:
  cuBLAS reads y0 in its epilogue): the kernel streams x's rows once for ``S = drop(x) A`` (fp32, rounded
  to x's dtype and stored for backward), forms ``U = S C`` on chip (shared C, per-row ``C[task]``, or none)
  and writes ``y0 = b + scaling * U B``;
* backward (:func:`backward`), one zero fill of a float32 workspace, one launch of ``_rows_bwd_kernel``,
  ``dx0.addmm_(dY, W)`` and one launch of ``_finalize_kernel``: the row kernel recomputes ``U = S C``,
  streams dY's rows once for ``dU = scaling dY B^T`` (kept on chip) and ``dB += scaling U^T dY``, forms
  ``dS = dU C^T`` and ``dC += S^T dU``, then streams x's rows once for ``dA += drop(x)^T dS`` and writes
  ``dx0 = drop'(dS A^T)``; the finalize kernel rounds dA, dB, dC from the workspace into their dtypes.

So a forward + backward is 4 large launches (two row kernels, two cuBLAS GEMMs) and 2 small ones (tested in
tests/test_triton_plans.py). Token reductions (dA, dB, dC) are float32 atomics into the workspace, one per
element per row block (``cdiv(M, BLOCK_M) x r x (d_in + d_out)``; row blocks of 64 to 128 rows), or, in
torch's deterministic mode, per-row-block partial sums that the finalize kernel adds in a fixed order.

**Decode** (at most :data:`DECODE_M` = 64 tokens). When the row blocks give fewer than two programs per SM,
each row block is split over ``SPLIT`` programs along the output columns (forward: y0's; backward: dB's and d_in's): each recomputes its
rows' S (forward) or dU (backward) from x / dY and the factors, which L2 holds, and writes its own slice; and
when they give fewer than one program per two SMs, the forward's ``drop(x) A`` is split over K first
(``shrink.partials``, one more small launch: float32 partial sums that the row kernel adds in order).

Row offsets are int64. fp32 accumulation; ``r <= 128``. Checked against the float64 reference in
tests/test_triton.py (both plans) and tests/test_triton_plans.py.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    DROPOUT_ARGS,
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
from .shrink import drop_x_a, partials, split_k, sum_partials


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _rows_fwd_kernel(
    X, A, C, T, B, BIAS, S, Y0, P,
    M, K, N, RA, RB, SPLIT_K, M_BUCKET,
    stride_xm, stride_xk, stride_ak, stride_ar, stride_ct, stride_ca, stride_cb, stride_br, stride_bn,
    scaling, SEED, threshold, keep_scale,
    HAS_C: tl.constexpr, PER_SAMPLE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    FROM_PARTIALS: tl.constexpr, PRECISION: tl.constexpr, RA_P: tl.constexpr, RB_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    split = tl.num_programs(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    ra = tl.arange(0, RA_P)
    a_ok = ra < RA
    if FROM_PARTIALS:  # decode: drop(x) A was split over K (shrink.partials)
        acc = sum_partials(P, rm64, m_ok, ra, M, SPLIT_K, RA_P, BLOCK_M)
    else:
        acc = drop_x_a(X, A, rm, rm64, m_ok, ra, 0, K, stride_xm, stride_xk, stride_ak, stride_ar, RA,
                       SEED, threshold, keep_scale, DROPOUT, PRECISION, RA_P, BLOCK_M, BLOCK_K)  # fmt: skip
    s = acc.to(S.dtype.element_ty)
    if pid_j == 0:
        tl.store(S + rm64[:, None] * RA + ra[None, :], s, mask=m_ok[:, None] & a_ok[None, :])
    rb = tl.arange(0, RB_P)
    b_ok = rb < RB
    if HAS_C:
        if PER_SAMPLE:
            t = tl.load(T + rm, mask=m_ok, other=0)
            mask = m_ok[:, None] & b_ok[None, :]
            u = gathered_matmul(s.to(tl.float32), ra, RA, C + t[:, None] * stride_ct, stride_ca, rb, stride_cb, mask)
        else:
            c = tl.load(
                C + ra[:, None] * stride_ca + rb[None, :] * stride_cb, mask=a_ok[:, None] & b_ok[None, :], other=0.0
            )
            u = tl.dot(s, c, input_precision=PRECISION)
        u = u.to(S.dtype.element_ty)
    else:
        u = s
    n_per = tl.cdiv(tl.cdiv(N, BLOCK_N), split) * BLOCK_N
    n_lo = pid_j * n_per
    n_hi = tl.minimum(n_lo + n_per, N)
    for n0 in range(n_lo, n_hi, BLOCK_N):
        rn = n0 + tl.arange(0, BLOCK_N)
        n_ok = rn < n_hi
        b = tl.load(
            B + rb[:, None] * stride_br + rn[None, :] * stride_bn, mask=b_ok[:, None] & n_ok[None, :], other=0.0
        )
        y = tl.dot(u, b, input_precision=PRECISION) * scaling
        if HAS_BIAS:
            y += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(Y0 + rm64[:, None] * N + rn[None, :], y.to(Y0.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _rows_bwd_kernel(
    DY, X, A, C, T, B, S, DX, WS,
    M, K, N, RA, RB, NT, TOTAL, M_BUCKET,
    stride_ym, stride_yn, stride_xm, stride_xk, stride_ak, stride_ar,
    stride_ct, stride_ca, stride_cb, stride_br, stride_bn,
    scaling, SEED, threshold, keep_scale,
    HAS_C: tl.constexpr, PER_SAMPLE: tl.constexpr, DROPOUT: tl.constexpr, NEED_DX: tl.constexpr,
    DETERMINISTIC: tl.constexpr, PRECISION: tl.constexpr, RA_P: tl.constexpr, RB_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # WS (float32): [dA (K, RA) | dB (RB, N) | dC (NT, RA, RB)], one copy per row block when DETERMINISTIC.
    pid_m = tl.program_id(0)
    pid_j = tl.program_id(1)
    split = tl.num_programs(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    ra = tl.arange(0, RA_P)
    rb = tl.arange(0, RB_P)
    a_ok = ra < RA
    b_ok = rb < RB
    ws = WS + (pid_m.to(tl.int64) * TOTAL if DETERMINISTIC else 0)
    ws_db = ws + K * RA
    ws_dc = ws_db + RB * N

    s = tl.load(S + rm64[:, None] * RA + ra[None, :], mask=m_ok[:, None] & a_ok[None, :], other=0.0)
    if HAS_C:
        if PER_SAMPLE:
            t = tl.load(T + rm, mask=m_ok, other=0)
            u = gathered_matmul(
                s.to(tl.float32), ra, RA, C + t[:, None] * stride_ct, stride_ca, rb, stride_cb,
                m_ok[:, None] & b_ok[None, :],
            ).to(S.dtype.element_ty)  # fmt: skip
        else:
            c = tl.load(
                C + ra[:, None] * stride_ca + rb[None, :] * stride_cb, mask=a_ok[:, None] & b_ok[None, :], other=0.0
            )
            u = tl.dot(s, c, input_precision=PRECISION).to(S.dtype.element_ty)
    else:
        u = s
    ut = tl.trans(u)

    # one pass over dY: dU for the whole row block, dB for this program's columns
    n_per = tl.cdiv(tl.cdiv(N, BLOCK_N), split) * BLOCK_N
    n_lo = pid_j * n_per
    n_hi = tl.minimum(n_lo + n_per, N)
    du = tl.zeros((BLOCK_M, RB_P), tl.float32)
    # `if N > 0` changes nothing the loop computes; without it LLVM zeroes the accumulator on the loop's
    # zero-trip path, which ptxas takes for a write to a wgmma's accumulator in flight and serializes wgmma (C7515).
    if N > 0:
        for n0 in range(0, N, BLOCK_N):
            rn = n0 + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            dy = tl.load(
                DY + rm64[:, None] * stride_ym + rn[None, :] * stride_yn, mask=m_ok[:, None] & n_ok[None, :], other=0.0
            )
            b = tl.load(
                B + rb[:, None] * stride_br + rn[None, :] * stride_bn, mask=b_ok[:, None] & n_ok[None, :], other=0.0
            )
            du = tl.dot(dy, tl.trans(b), du, input_precision=PRECISION)
            if (n0 >= n_lo) & (n0 < n_hi):
                db = tl.dot(ut, dy, input_precision=PRECISION) * scaling
                db_ptrs = ws_db + rb[:, None] * N + rn[None, :]
                if DETERMINISTIC:
                    tl.store(db_ptrs, db, mask=b_ok[:, None] & n_ok[None, :])
                else:
                    tl.atomic_add(db_ptrs, db, mask=b_ok[:, None] & n_ok[None, :], sem="relaxed")
    du = (du * scaling).to(S.dtype.element_ty)

    if HAS_C:
        c_ok = a_ok[:, None] & b_ok[None, :]
        if PER_SAMPLE:
            ds = gathered_matmul(
                du.to(tl.float32), rb, RB, C + t[:, None] * stride_ct, stride_cb, ra, stride_ca,
                m_ok[:, None] & a_ok[None, :],
            ).to(S.dtype.element_ty)  # fmt: skip
            if pid_j == 0:
                for task in range(0, NT):
                    sel = (t == task) & m_ok
                    st = tl.where(sel[:, None], s, 0.0).to(S.dtype.element_ty)
                    dc_ptrs = ws_dc + task * RA * RB + ra[:, None] * RB + rb[None, :]
                    if DETERMINISTIC:  # every task's slice is written, zero where the block has none
                        tl.store(dc_ptrs, tl.dot(tl.trans(st), du, input_precision=PRECISION), mask=c_ok)
                    elif tl.sum(sel.to(tl.int32), axis=0) > 0:
                        dc = tl.dot(tl.trans(st), du, input_precision=PRECISION)
                        tl.atomic_add(dc_ptrs, dc, mask=c_ok, sem="relaxed")
        else:
            ds = tl.dot(du, tl.trans(c), input_precision=PRECISION).to(S.dtype.element_ty)
            if pid_j == 0:
                dc = tl.dot(tl.trans(s), du, input_precision=PRECISION)
                dc_ptrs = ws_dc + ra[:, None] * RB + rb[None, :]
                if DETERMINISTIC:
                    tl.store(dc_ptrs, dc, mask=c_ok)
                else:
                    tl.atomic_add(dc_ptrs, dc, mask=c_ok, sem="relaxed")
    else:
        ds = du

    # one pass over x (this program's columns): dA, and dx0 = drop'(dS A^T)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), split) * BLOCK_K
    k_lo = pid_j * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    if DROPOUT:
        seed = tl.load(SEED)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(
            X + rm64[:, None] * stride_xm + rk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
        )
        if DROPOUT:
            keep = keep_mask(rm, rk, seed, threshold)
            x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(X.dtype.element_ty)
        da = tl.dot(tl.trans(x), ds, input_precision=PRECISION)
        da_ptrs = ws + rk[:, None] * RA + ra[None, :]
        if DETERMINISTIC:
            tl.store(da_ptrs, da, mask=k_ok[:, None] & a_ok[None, :])
        else:
            tl.atomic_add(da_ptrs, da, mask=k_ok[:, None] & a_ok[None, :], sem="relaxed")
        if NEED_DX:
            a = tl.load(
                A + rk[:, None] * stride_ak + ra[None, :] * stride_ar, mask=k_ok[:, None] & a_ok[None, :], other=0.0
            )
            dx = tl.dot(ds, tl.trans(a), input_precision=PRECISION)
            if DROPOUT:
                dx = tl.where(keep, dx * keep_scale, 0.0)
            tl.store(
                DX + rm64[:, None] * K + rk[None, :], dx.to(DX.dtype.element_ty), mask=m_ok[:, None] & k_ok[None, :]
            )


@triton.jit
def _finalize_kernel(WS, DA, DB, DC, N_A, N_B, TOTAL, BLOCKS, BLOCK: tl.constexpr):
    # Sums the BLOCKS copies of the workspace in order and writes each part in its output's dtype.
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = i < TOTAL
    acc = tl.zeros((BLOCK,), tl.float32)
    ptrs = WS + i
    for _ in range(0, BLOCKS):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += TOTAL  # 64-bit pointer arithmetic: BLOCKS x TOTAL may pass 2^31
    in_a = i < N_A
    in_b = (i >= N_A) & (i < N_A + N_B)
    in_c = (i >= N_A + N_B) & ok
    tl.store(DA + i, acc.to(DA.dtype.element_ty), mask=in_a)
    tl.store(DB + (i - N_A), acc.to(DB.dtype.element_ty), mask=in_b)
    tl.store(DC + (i - N_A - N_B), acc.to(DC.dtype.element_ty), mask=in_c)


# ---------------------------------------------------------------------------------------- configurations
def _fwd_configs(hopper: bool) -> list[triton.Config]:
    # Each compiled without spills for every flag combination at the target shape, one token and odd sizes
    # (make triton-gate); the 128-row and 256-wide tiles spilled and were removed.
    cfgs = [config(4, 3, BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=128) for bm in (32, 64) for bk in (64, 128)]
    cfgs += [config(4, 3, BLOCK_M=16, BLOCK_K=128, BLOCK_N=64)]
    return cfgs


def _bwd_configs(hopper: bool) -> list[triton.Config]:
    # Row blocks of 128 rows bound the atomics (cdiv(M, BLOCK_M) per element of dA, dB); 16 to 64 for decode,
    # where the row blocks are split over columns. Each compiled without spills for every flag combination
    # (make triton-gate).
    return [
        config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
        config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
        config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
        config(4, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64),
        config(4, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128),
    ]


ROWS_FWD = Tuned(
    _rows_fwd_kernel,
    {"BLOCK_M": 16, "BLOCK_K": 16, "BLOCK_N": 16},
    {"BLOCK_M": 64, "BLOCK_K": 128, "BLOCK_N": 128, "num_warps": 4, "num_stages": 3},
    _fwd_configs,
    ["M_BUCKET", "K", "N", "RA", "RB"],
)
ROWS_BWD = Tuned(
    _rows_bwd_kernel,
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16},
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    _bwd_configs,
    ["M_BUCKET", "K", "N", "RA", "RB"],
    reset_to_zero=["WS"],
)
FINALIZE_BLOCK = 1024


DECODE_M = 64


def split_for(M: int, block_m: int, width: int, block: int, device: torch.device) -> int:
    """Programs per row block: 1 above :data:`DECODE_M` tokens (each split program re-reads its rows' x or dY,
    which only L2 makes cheap); at decode, enough for two programs per SM, at most one per ``4 * block``
    columns of ``width``."""
    blocks = triton.cdiv(M, block_m)
    if M > DECODE_M or blocks >= 2 * num_sms(device):
        return 1
    want = triton.cdiv(2 * num_sms(device), blocks)
    return max(1, min(want, triton.cdiv(width, 4 * block)))


def _c_strides(C: Optional[torch.Tensor]) -> tuple[int, int, int]:
    if C is None:
        return 0, 0, 0
    if C.dim() == 3:
        return C.stride(0), C.stride(1), C.stride(2)
    return 0, C.stride(0), C.stride(1)


# ------------------------------------------------------------------------------------------------ forward
def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    A: torch.Tensor,
    C: Optional[torch.Tensor],
    B: torch.Tensor,
    task_ids: Optional[torch.Tensor],
    scaling: float,
    p: float,
    seed: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, S)``: the row kernel writes ``S`` and ``y0 = b + scaling * drop(x) A C B``, then ``y0 += x W^T``."""
    M, K = x.shape
    N = weight.shape[0]
    RA, RB = A.shape[1], B.shape[0]
    S = empty((M, RA), x.dtype, x.device)
    y = empty((M, N), x.dtype, x.device)
    if M == 0:
        return y, S
    per_sample = C is not None and C.dim() == 3
    SEED, thr, keep_scale = dropout_args(p, seed, x)
    sk = split_k(M, K, x.device)
    P = partials(x, A, p, SEED, sk) if sk > 1 else S

    def grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(M, meta["BLOCK_M"]), split_for(M, meta["BLOCK_M"], N, meta["BLOCK_N"], x.device)

    ROWS_FWD.launch(
        x.device, grid,
        x, A, C if C is not None else A, task_ids if per_sample else S, B, bias if bias is not None else B, S, y, P,
        M, K, N, RA, RB, sk, m_bucket(M),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), *_c_strides(C), B.stride(0), B.stride(1),
        float(scaling), SEED, thr, keep_scale,
        HAS_C=C is not None, PER_SAMPLE=per_sample, HAS_BIAS=bias is not None, DROPOUT=p > 0.0,
        FROM_PARTIALS=sk > 1, PRECISION=precision(x.dtype), RA_P=rank_block(RA), RB_P=rank_block(RB),
    )  # fmt: skip
    y.addmm_(x, weight.t())
    return y, S


# ----------------------------------------------------------------------------------------------- backward
def backward(
    dy: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    A: torch.Tensor,
    C: Optional[torch.Tensor],
    B: torch.Tensor,
    S: torch.Tensor,
    task_ids: Optional[torch.Tensor],
    scaling: float,
    p: float,
    seed: int | torch.Tensor,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor]:
    """``(dx, dA, dC, dB)``; dx is empty when not needed, dC None when C is None."""
    M, K = x.shape
    N = dy.shape[1]
    RA, RB = A.shape[1], B.shape[0]
    dA = empty((K, RA), A.dtype, x.device)
    dB = empty((RB, N), B.dtype, x.device)
    dC = empty(tuple(C.shape), C.dtype, x.device) if C is not None else None
    dx = empty((M, K), x.dtype, x.device) if need_dx else x.new_empty(0)
    if M == 0:
        for g in (dA, dB, dC):
            if g is not None:
                g.zero_()
        return dx, dA, dC, dB
    per_sample = C is not None and C.dim() == 3
    NT = C.shape[0] if per_sample else 1
    n_c = C.numel() if C is not None else 0
    total = K * RA + RB * N + n_c
    SEED, thr, keep_scale = dropout_args(p, seed, x)
    S = S.contiguous()
    args = [
        dy, x, A, C if C is not None else A, task_ids if per_sample else S, B, S, dx if need_dx else S, None,
        M, K, N, RA, RB, NT, total, m_bucket(M),
        dy.stride(0), dy.stride(1), x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        *_c_strides(C), B.stride(0), B.stride(1),
        float(scaling), SEED, thr, keep_scale,
    ]  # fmt: skip
    flags = dict(
        HAS_C=C is not None, PER_SAMPLE=per_sample, DROPOUT=p > 0.0, NEED_DX=need_dx,
        PRECISION=precision(x.dtype), RA_P=rank_block(RA), RB_P=rank_block(RB),
    )  # fmt: skip
    if deterministic():
        # Per-row-block partial sums (every element written), added in order by the finalize kernel.
        meta = ROWS_BWD.fixed_meta(x.device)
        blocks = triton.cdiv(M, meta["BLOCK_M"])
        split = split_for(M, meta["BLOCK_M"], max(N, K), max(meta["BLOCK_N"], meta["BLOCK_K"]), x.device)
        args[8] = ws = empty((blocks, total), torch.float32, x.device)
        ROWS_BWD.launch_fixed(meta, (blocks, split), *args, DETERMINISTIC=True, **flags)
    else:
        blocks = 1
        args[8] = ws = torch.zeros(total, dtype=torch.float32, device=x.device)

        def grid(meta: dict) -> tuple[int, int]:
            width = max(meta["BLOCK_N"], meta["BLOCK_K"])
            return triton.cdiv(M, meta["BLOCK_M"]), split_for(M, meta["BLOCK_M"], max(N, K), width, x.device)

        ROWS_BWD.launch(x.device, grid, *args, DETERMINISTIC=False, **flags)
    if need_dx:
        dx.addmm_(dy, weight)
    run_finalize(ws, dA, dB, dC if dC is not None else dB, K * RA, RB * N, total, blocks)
    return dx, dA, dC, dB


def run_finalize(ws, dA, dB, dC, n_a: int, n_b: int, total: int, blocks: int) -> None:
    """Sums the ``blocks`` copies of the float32 workspace ``ws`` in order into dA (its first ``n_a`` elements),
    dB (the next ``n_b``) and dC (the rest), each in its dtype (also the fused plan's dx GEMM's, gemm_grad.py)."""
    from . import _common

    grid = (triton.cdiv(total, FINALIZE_BLOCK),)
    _common.run(_finalize_kernel, grid, ws, dA, dB, dC, n_a, n_b, total, blocks, BLOCK=FINALIZE_BLOCK)
