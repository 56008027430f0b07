"""Step grad_mid (5): ``dS = dU C^T`` and ``dC = S^T dU``; per task, ``dC[t]`` sums the rows of task
``t`` (one masked ``tl.dot`` per task present in a row block; atomics or a deterministic buffer of
``(blocks, T, r_a, r_b)``). With a shared C these are two tiny matmuls and use torch. ``dS`` per task is
:func:`triton_kernels.mid.task_matmul` with C transposed.

Deterministic mode is torch's: ``torch.use_deterministic_algorithms(True)``. fp32 accumulation; ranks
``<= 128``. Checked in tests/test_steps.py against ``ttkernels.reference``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    ROW_BLOCK,
    deterministic,
    precision,
    rank_block,
)
from .mid import task_matmul


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
