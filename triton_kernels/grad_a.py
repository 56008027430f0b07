"""Step grad_a (7): ``dA = drop(x)^T dS (d_in, r_a)``, a reduction over tokens split in ``SPLIT``
ranges (grid ``d_in blocks x SPLIT``); the partial sums are added with atomics, or, in deterministic mode,
written to a ``(SPLIT, d_in, r_a)`` buffer and summed in order. The mask is the forward's (same seed).

Deterministic mode is torch's: ``torch.use_deterministic_algorithms(True)``. fp32 accumulation; ranks
``<= 128``. Checked in tests/test_steps.py against ``ttkernels.reference``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    DROPOUT_ARGS,
    INTERPRET,
    Tuned,
    config,
    deterministic,
    dropout_args,
    empty,
    keep_mask,
    m_bucket,
    num_sms,
    precision,
    rank_block,
    with_arg,
)


# ------------------------------------------------------------------------------------------- step 7
@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _grad_a_kernel(
    X, DS, DA,
    M, K, RA, M_BUCKET,
    stride_xm, stride_xk, stride_sm, stride_sr,
    SEED, threshold, keep_scale,
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
    if DROPOUT:
        seed = tl.load(SEED)
    # `if m_lo < m_hi` changes nothing the loop computes; without it LLVM zeroes the accumulator on the loop's
    # zero-trip path, which ptxas takes for a write to a wgmma's accumulator in flight and serializes wgmma (C7515).
    if m_lo < m_hi:
        for m0 in range(m_lo, m_hi, BLOCK_M):
            rm = m0 + tl.arange(0, BLOCK_M)
            m_ok = rm < m_hi
            x = tl.load(
                X + rm.to(tl.int64)[:, None] * stride_xm + rk[None, :] * stride_xk,
                mask=m_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            if DROPOUT:
                keep = keep_mask(rm, rk, seed, threshold)
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


def grad_a(x: torch.Tensor, dS: torch.Tensor, p: float, seed: int | torch.Tensor) -> torch.Tensor:
    M, K = x.shape
    RA = dS.shape[1]
    if M == 0:
        return torch.zeros((K, RA), dtype=x.dtype, device=x.device)
    SEED, thr, keep_scale = dropout_args(p, seed, x)
    args = (
        x, dS, None,
        M, K, RA, m_bucket(M),
        x.stride(0), x.stride(1), dS.stride(0), dS.stride(1),
        SEED, thr, keep_scale,
    )  # fmt: skip
    meta = {"DROPOUT": p > 0.0, "PRECISION": precision(x.dtype), "RA_P": rank_block(RA)}
    if deterministic():
        fixed = GRAD_A.fixed_meta(x.device)
        split = _split(M, K, fixed["BLOCK_M"], fixed["BLOCK_K"], x.device)
        buf = empty((split, K, RA), torch.float32, x.device)
        grid = (triton.cdiv(K, fixed["BLOCK_K"]), split)
        GRAD_A.launch_fixed(fixed, grid, *with_arg(args, 2, buf), DETERMINISTIC=True, **meta)
        return buf.sum(0).to(x.dtype)
    dA32 = torch.zeros((K, RA), dtype=torch.float32, device=x.device)

    def grid(m: dict) -> tuple[int, int]:
        return triton.cdiv(K, m["BLOCK_K"]), _split(M, K, m["BLOCK_M"], m["BLOCK_K"], x.device)

    GRAD_A.launch(x.device, grid, *with_arg(args, 2, dA32), DETERMINISTIC=False, **meta)
    return dA32.to(x.dtype)
