"""Step mid: ``U = S C`` from the saved S in backward (backward recomputes U rather than storing it).

* :func:`task_matmul`: ``OUT[m] = IN[m] C[t_m]`` (or ``C[t_m]^T``) for per-sample tasks, without gathering
  an ``(M, r_a, r_b)`` copy of C: U in backward (:func:`mid`) and ``dS = dU C[t]^T`` in step grad_mid
  (triton_kernels/grad_mid.py).

fp32 accumulation; ranks ``<= 128``. Checked in tests/test_steps.py against ``ttkernels.reference``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    ROW_BLOCK,
    empty,
    gathered_matmul,
    rank_block,
)


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
