"""Step 2 (shrink): ``S = drop(x) A`` and ``U = S C`` in one pass over x.

Shapes: ``x (M, d_in)``, ``A (d_in, r_a)``, ``C`` None / ``(r_a, r_b)`` / ``(T, r_a, r_b)`` with
``task_ids (M,)``; outputs ``S (M, r_a)`` and ``U (M, r_b)`` in x's dtype. One program owns ``BLOCK_M``
rows: it streams x's row block once, applies dropout from the seed (the hash of ``_common``), accumulates
``S`` in float32, rounds it to x's dtype (the S that backward will use), and multiplies by ``C`` — one
``tl.dot`` for a shared C, or a per-row gather of ``C[task]`` for per-sample tasks. **Decode**: when the row
blocks give fewer than one program per two SMs, ``drop(x) A`` is split over K (:func:`split_k`): one launch
writes float32 partial sums per K range, the shrink kernel adds them in order (``FROM_PARTIALS``), then
rounds S and forms U as above; the row-owner forward of :mod:`.rows` does the same. fp32 accumulation;
``r_a, r_b <= 128``. Checked in tests/test_steps.py against ``ttkernels.reference.shrink``.
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
    dropout_args,
    empty,
    gathered_matmul,
    keep_mask,
    m_bucket,
    num_sms,
    precision,
    rank_block,
)


@triton.jit
def drop_x_a(X, A, rm, rm64, row_ok, ra, k_lo, k_hi, stride_xm, stride_xk, stride_ak, stride_ar, RA,
             SEED, threshold, keep_scale,
             DROPOUT: tl.constexpr, PRECISION: tl.constexpr, RA_P: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_K: tl.constexpr):  # fmt: skip
    """``drop(x[rm, k_lo:k_hi]) A[k_lo:k_hi]`` in float32: ``(BLOCK_M, RA_P)``."""
    rk = tl.arange(0, BLOCK_K)
    if DROPOUT:
        seed = tl.load(SEED)
    acc = tl.zeros((BLOCK_M, RA_P), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < k_hi
        x = tl.load(
            X + rm64[:, None] * stride_xm + kk[None, :] * stride_xk, mask=row_ok[:, None] & k_ok[None, :], other=0.0
        )
        if DROPOUT:
            keep = keep_mask(rm, kk, seed, threshold)
            x = tl.where(keep, x.to(tl.float32) * keep_scale, 0.0).to(X.dtype.element_ty)
        a = tl.load(
            A + kk[:, None] * stride_ak + ra[None, :] * stride_ar, mask=k_ok[:, None] & (ra < RA)[None, :], other=0.0
        )
        acc = tl.dot(x, a, acc, input_precision=PRECISION)
    return acc


@triton.jit
def drop_x_a_nonempty(X, A, rm, rm64, row_ok, ra, k_lo, k_hi, stride_xm, stride_xk, stride_ak, stride_ar, RA,
                      SEED, threshold, keep_scale,
                      DROPOUT: tl.constexpr, PRECISION: tl.constexpr, RA_P: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_K: tl.constexpr):  # fmt: skip
    """``drop_x_a`` called only for a non-empty K range (zeros otherwise): the same sums. Without the test, LLVM
    zeroes the accumulator on the loop's zero-trip path, after the loop's wgmma in the code, which ptxas takes for a
    write to an accumulator in flight and serializes wgmma (C7515); ``_rows_fwd_kernel`` keeps ``drop_x_a`` (with the
    test, one of its tiles spills)."""
    acc = tl.zeros((BLOCK_M, RA_P), tl.float32)
    if k_lo < k_hi:
        acc = drop_x_a(X, A, rm, rm64, row_ok, ra, k_lo, k_hi, stride_xm, stride_xk, stride_ak, stride_ar, RA,
                       SEED, threshold, keep_scale, DROPOUT, PRECISION, RA_P, BLOCK_M, BLOCK_K)  # fmt: skip
    return acc


@triton.jit
def sum_partials(P, rm64, row_ok, ra, M, SPLIT_K, RA_P: tl.constexpr, BLOCK_M: tl.constexpr):
    """The split-K partial sums of ``drop(x) A`` for rows ``rm``, added in order: ``(BLOCK_M, RA_P)`` float32."""
    acc = tl.zeros((BLOCK_M, RA_P), tl.float32)
    ptrs = P + rm64[:, None] * RA_P + ra[None, :]
    for _ in range(0, SPLIT_K):
        acc += tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        ptrs += M * RA_P
    return acc


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _shrink_partial_kernel(
    X, A, P,
    M, K, RA, M_BUCKET,
    stride_xm, stride_xk, stride_ak, stride_ar,
    SEED, threshold, keep_scale,
    DROPOUT: tl.constexpr, PRECISION: tl.constexpr, RA_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    # Split-K (decode): program (m, s) sums drop(x) A over its range of K into P[s] (SPLIT_K, M, RA_P) float32.
    pid_s = tl.program_id(1)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    row_ok = rm < M
    ra = tl.arange(0, RA_P)
    k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
    k_lo = pid_s * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    acc = drop_x_a_nonempty(X, A, rm, rm64, row_ok, ra, k_lo, k_hi, stride_xm, stride_xk, stride_ak, stride_ar, RA,
                            SEED, threshold, keep_scale, DROPOUT, PRECISION, RA_P, BLOCK_M, BLOCK_K)  # fmt: skip
    out = P + pid_s.to(tl.int64) * M * RA_P + rm64[:, None] * RA_P + ra[None, :]
    tl.store(out, acc, mask=row_ok[:, None])


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _shrink_kernel(
    X, A, C, T, S, U, P,
    M, K, RA, RB, SPLIT_K, M_BUCKET,
    stride_xm, stride_xk, stride_ak, stride_ar,
    stride_ct, stride_ca, stride_cb,
    SEED, threshold, keep_scale,
    HAS_C: tl.constexpr, PER_SAMPLE: tl.constexpr, DROPOUT: tl.constexpr, FROM_PARTIALS: tl.constexpr,
    PRECISION: tl.constexpr, RA_P: tl.constexpr, RB_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    ra = tl.arange(0, RA_P)
    row_ok = rm < M
    if FROM_PARTIALS:
        acc = sum_partials(P, rm64, row_ok, ra, M, SPLIT_K, RA_P, BLOCK_M)
    else:
        acc = drop_x_a_nonempty(X, A, rm, rm64, row_ok, ra, 0, K, stride_xm, stride_xk, stride_ak, stride_ar, RA,
                                SEED, threshold, keep_scale, DROPOUT, PRECISION, RA_P, BLOCK_M, BLOCK_K)  # fmt: skip
    s = acc.to(S.dtype.element_ty)
    tl.store(S + rm64[:, None] * RA + ra[None, :], s, mask=row_ok[:, None] & (ra < RA)[None, :])
    if HAS_C:
        rb = tl.arange(0, RB_P)
        b_ok = rb < RB
        if PER_SAMPLE:
            # U[m] = S[m] C[t_m], with each row's C gathered
            t = tl.load(T + rm, mask=row_ok, other=0)
            mask = row_ok[:, None] & b_ok[None, :]
            u = gathered_matmul(s.to(tl.float32), ra, RA, C + t[:, None] * stride_ct, stride_ca, rb, stride_cb, mask)
        else:
            c = tl.load(
                C + ra[:, None] * stride_ca + rb[None, :] * stride_cb,
                mask=(ra < RA)[:, None] & b_ok[None, :],
                other=0.0,
            )
            u = tl.dot(s, c, input_precision=PRECISION)
        tl.store(U + rm64[:, None] * RB + rb[None, :], u.to(U.dtype.element_ty), mask=row_ok[:, None] & b_ok[None, :])


def _configs(hopper: bool) -> list[triton.Config]:
    # 64 x 128, 64 x 256 and 128 x 128 spilled with per-sample tasks and dropout (make triton-gate): not listed
    cfgs = [config(4, 3, BLOCK_M=bm, BLOCK_K=bk) for bm in (16, 32) for bk in (64, 128)]
    cfgs += [config(4, 3, BLOCK_M=64, BLOCK_K=64), config(8, 3, BLOCK_M=128, BLOCK_K=64)]
    return cfgs


SHRINK = Tuned(
    _shrink_kernel,
    {"BLOCK_M": 16, "BLOCK_K": 16},
    {"BLOCK_M": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    _configs,
    ["M_BUCKET", "K", "RA", "RB"],
)
SHRINK_PARTIAL = Tuned(
    _shrink_partial_kernel,
    {"BLOCK_M": 16, "BLOCK_K": 16},
    {"BLOCK_M": 16, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3},
    lambda hopper: [config(4, 3, BLOCK_M=16, BLOCK_K=bk) for bk in (64, 128, 256)],
    ["M_BUCKET", "K", "RA"],
)
# Row-block size that decides split-K (the decode tiles' BLOCK_M).
DECODE_BLOCK_M = 16


def split_k(M: int, K: int, device: torch.device) -> int:
    """K ranges per row block for ``drop(x) A``: 1 unless the row blocks give fewer than one program per two SMs
    (decode, small batches); then enough for two programs per SM, at most one per four K tiles."""
    blocks = triton.cdiv(M, DECODE_BLOCK_M)
    if 2 * blocks >= num_sms(device):
        return 1
    block_k = SHRINK_PARTIAL.fixed_meta(device)["BLOCK_K"]
    return max(1, min(triton.cdiv(2 * num_sms(device), blocks), triton.cdiv(K, 4 * block_k)))


def partials(x: torch.Tensor, A: torch.Tensor, p: float, seed: int | torch.Tensor, split: int) -> torch.Tensor:
    """Split-K partial sums of ``drop(x) A``: ``(split, M, rank_block(RA))`` float32, summed in order by the caller."""
    M, K = x.shape
    RA = A.shape[1]
    P = torch.empty((split, M, rank_block(RA)), dtype=torch.float32, device=x.device)
    SEED, thr, keep_scale = dropout_args(p, seed, x)
    SHRINK_PARTIAL.launch(
        x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), split),
        x, A, P, M, K, RA, m_bucket(M),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        SEED, thr, keep_scale,
        DROPOUT=p > 0.0, PRECISION=precision(x.dtype), RA_P=rank_block(RA),
    )  # fmt: skip
    return P


def shrink(
    x: torch.Tensor,
    A: torch.Tensor,
    C: Optional[torch.Tensor],
    task_ids: Optional[torch.Tensor],
    p: float,
    seed: int | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    RA = A.shape[1]
    RB = RA if C is None else C.shape[-1]
    S = empty((M, RA), x.dtype, x.device)
    U = S if C is None else empty((M, RB), x.dtype, x.device)
    if M == 0:
        return S, U
    per_sample = C is not None and C.dim() == 3
    SEED, thr, keep_scale = dropout_args(p, seed, x)
    c_strides = (0, 0, 0) if C is None else ((C.stride(0),) if per_sample else (0,)) + tuple(C.stride()[-2:])
    split = split_k(M, K, x.device)
    P = partials(x, A, p, SEED, split) if split > 1 else S
    SHRINK.launch(
        x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        x, A, S if C is None else C, task_ids if per_sample else S, S, U, P,
        M, K, RA, RB, split, m_bucket(M),
        x.stride(0), x.stride(1), A.stride(0), A.stride(1),
        *c_strides,
        SEED, thr, keep_scale,
        HAS_C=C is not None, PER_SAMPLE=per_sample, DROPOUT=p > 0.0, FROM_PARTIALS=split > 1,
        PRECISION=precision(x.dtype), RA_P=rank_block(RA), RB_P=rank_block(RB),
    )  # fmt: skip
    return S, U
