"""Step grad_dy (4): one pass over ``dY (M, d_out)`` gives ``dU = scaling * dY B^T (M, r_b)`` and
``dB = scaling * U^T dY (r_b, d_out)``. A program owns a block of rows and walks d_out: ``dU`` stays in
registers; ``dB`` is a sum over row blocks, added with float32 atomics, or, in deterministic mode, written
per row block to a ``(blocks, r_b, d_out)`` float32 buffer summed afterwards in a fixed order. Without ``U``
(``HAS_DB`` off: the ``fused`` plan, whose dx GEMM adds dB, :mod:`.gemm_grad`) it computes ``dU`` only.

Deterministic mode is torch's: ``torch.use_deterministic_algorithms(True)``. fp32 accumulation; ranks
``<= 128``. Checked in tests/test_steps.py against ``ttkernels.reference``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._common import (
    Tuned,
    config,
    deterministic,
    empty,
    m_bucket,
    precision,
    rank_block,
    with_arg,
)


# ------------------------------------------------------------------------------------------- step 4
@triton.jit
def _grad_dy_kernel(
    DY, B, U, DU, DB,
    M, N, RB, M_BUCKET,
    stride_ym, stride_yn, stride_br, stride_bn, stride_um, stride_ur,
    scaling,
    HAS_DB: tl.constexpr, DETERMINISTIC: tl.constexpr, PRECISION: tl.constexpr, RB_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rm64 = rm.to(tl.int64)
    rr = tl.arange(0, RB_P)
    m_ok = rm < M
    r_ok = rr < RB
    if HAS_DB:
        u = tl.load(
            U + rm64[:, None] * stride_um + rr[None, :] * stride_ur, mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
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
        if HAS_DB:
            # dB^T = dY^T U: the tile's long side (BLOCK_N) as the dot's M, so it is a wgmma on sm_90
            db = tl.dot(tl.trans(dy), u, input_precision=PRECISION)
            db_ptrs = db_base + rr[None, :] * N + rn[:, None]
            db_ok = r_ok[None, :] & n_ok[:, None]
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


def grad_dy(
    dy: torch.Tensor, U: Optional[torch.Tensor], B: torch.Tensor, scaling: float
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(dU, dB)``; with ``U`` None only ``dU`` (dB None): the ``fused`` plan adds dB in its dx GEMM."""
    M, N = dy.shape
    RB = B.shape[0]
    dU = empty((M, RB), dy.dtype, dy.device)
    has_db = U is not None
    if M == 0:
        return dU, torch.zeros_like(B) if has_db else None
    args = (
        dy, B, U if has_db else dy, dU, None,
        M, N, RB, m_bucket(M),
        dy.stride(0), dy.stride(1), B.stride(0), B.stride(1), *(U.stride() if has_db else (0, 0)),
        float(scaling),
    )  # fmt: skip
    meta = {"PRECISION": precision(dy.dtype), "RB_P": rank_block(RB)}
    if not has_db:
        GRAD_DY.launch(
            dy.device, lambda m: (triton.cdiv(M, m["BLOCK_M"]),), *with_arg(args, 4, dU), HAS_DB=False,
            DETERMINISTIC=False, **meta,
        )  # fmt: skip
        return dU, None
    if deterministic():
        fixed = GRAD_DY.fixed_meta(dy.device)
        blocks = triton.cdiv(M, fixed["BLOCK_M"])
        buf = empty((blocks, RB, N), torch.float32, dy.device)
        GRAD_DY.launch_fixed(fixed, (blocks,), *with_arg(args, 4, buf), HAS_DB=True, DETERMINISTIC=True, **meta)
        dB32 = buf.sum(0)
    else:
        dB32 = torch.zeros((RB, N), dtype=torch.float32, device=dy.device)
        GRAD_DY.launch(
            dy.device, lambda m: (triton.cdiv(M, m["BLOCK_M"]),), *with_arg(args, 4, dB32), HAS_DB=True,
            DETERMINISTIC=False, **meta,
        )  # fmt: skip
    return dU, dB32.mul_(scaling).to(B.dtype)
