"""Steps 3 and 6 of the ``fused`` plan: a GEMM whose accumulator also takes a low-rank term.

``OUT = X @ W + bias + scaling * drop(L @ R)``, one kernel, with
``X (M, K)``, ``W (K, N)``, ``L (M, RK)``, ``R (RK, N)``, ``bias (N,)``; any strides (transposes cost nothing).

* expand (step 3): ``y = x W^T + b + scaling * U B`` — ``X = x``, ``W = weight^T``, ``L = U``, ``R = B``.
* grad_x (step 6): ``dx = dy W + drop'(dS A^T)`` — ``X = dy``, ``W = weight``, ``L = dS``, ``R = A^T``, with
  the dropout mask of the forward (same seed; columns are d_in's) applied to the low-rank term only.

The low-rank product is computed first, masked and scaled, and seeds the one float32 accumulator that the
base GEMM's K loop then extends (a second accumulator would cost a full tile of registers: 255 registers and
spills at 128x128 tiles on sm_90); one rounding to the output dtype. With ``BASE=False`` the kernel writes
only ``bias + scaling * drop(L @ R)`` (the ``cublas`` plan's step functions, before torch's ``addmm_`` adds
the base product with beta = 1). Program ids are grouped along M (``GROUP_M``) so neighbouring programs
reuse W's tiles from L2. Row offsets are int64 (``M x K`` may pass 2^31). fp32 accumulation; ``RK <= 128``;
fp32 inputs use tf32 only when torch's matmul does.

**Decode** (at most :data:`DECODE_M` tokens, with the base product): when the output tiles give fewer than two
programs per SM, K is split over ``split`` programs per tile (:func:`split_k`; the fixed tiling, not autotuned);
each writes float32 partial sums of its K range (the first range also carries the low-rank term and the bias)
to a ``(split, M, N)`` buffer, and ``_split_sum_kernel`` adds them in order and rounds once: one more small
launch, deterministic in any mode. ``TTKERNELS_TRITON_SPLIT_K=0`` turns it off. Compiled, not run: whether it
pays is for a GPU run (the traffic model, with every launch at the device's peak whatever its program count,
sees only the partials' bytes).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from . import _common
from ._common import (
    DROPOUT_ARGS,
    INTERPRET,
    Tuned,
    config,
    dropout_args,
    empty,
    grouped_tile,
    keep_mask,
    m_bucket,
    num_sms,
    precision,
    rank_block,
)


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _gemm_lowrank_kernel(
    X, W, L, R, BIAS, OUT,
    M, N, K, RK, M_BUCKET,
    stride_xm, stride_xk, stride_wk, stride_wn,
    stride_lm, stride_lr, stride_rr, stride_rn, stride_om, stride_on,
    scaling, SEED, threshold, keep_scale,
    BASE: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr, SPLIT_K: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N

    # The low-rank term first: it seeds the accumulator of the base product.
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for r0 in range(0, RK, BLOCK_R):
        ri = r0 + rr
        r_ok = ri < RK
        lt = tl.load(
            L + rm64[:, None] * stride_lm + ri[None, :] * stride_lr, mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        rt = tl.load(
            R + ri[:, None] * stride_rr + rn[None, :] * stride_rn, mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc = tl.dot(lt, rt, acc, input_precision=PRECISION)
    if DROPOUT:
        acc = tl.where(keep_mask(rm, rn, tl.load(SEED), threshold), acc * (keep_scale * scaling), 0.0)
    else:
        acc = acc * scaling
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    k_lo = 0
    k_hi = K
    if SPLIT_K:  # decode: K range pid_k of num_programs(1); the first range also carries the low-rank term
        pid_k = tl.program_id(1)
        k_per = tl.cdiv(tl.cdiv(K, BLOCK_K), tl.num_programs(1)) * BLOCK_K
        k_lo = pid_k * k_per
        k_hi = tl.minimum(k_lo + k_per, K)
        acc = tl.where(pid_k == 0, acc, 0.0)
    if BASE:
        rk = tl.arange(0, BLOCK_K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            x = tl.load(
                X + rm64[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(
                W + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0
            )
            acc = tl.dot(x, w, acc, input_precision=PRECISION)
    out_ptrs = OUT + rm64[:, None] * stride_om + rn[None, :] * stride_on
    if SPLIT_K:  # float32 partial sums, one (M, N) slice per K range
        out_ptrs += tl.program_id(1).to(tl.int64) * M * N
    tl.store(out_ptrs, acc.to(OUT.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _split_sum_kernel(WS, OUT, M, N, SPLIT, stride_om, stride_on, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # OUT = sum over s of WS[s] (float32 (SPLIT, M, N), contiguous), added in order, one rounding
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rm < M)[:, None] & (rn < N)[None, :]
    rm64 = rm.to(tl.int64)
    ptrs = WS + rm64[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for _ in range(0, SPLIT):
        acc += tl.load(ptrs, mask=ok, other=0.0)
        ptrs += M * N
    tl.store(OUT + rm64[:, None] * stride_om + rn[None, :] * stride_on, acc.to(OUT.dtype.element_ty), mask=ok)


def _configs(hopper: bool) -> list[triton.Config]:
    # Compiled without spills at 16-divisible shapes and strides (make triton-gate); 128 x 128 x 32,
    # 128 x 256, 256 x 128 and 64 x 256 tiles spilled and are not listed.
    shapes = [  # (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)
        (16, 64, 64, 4, 4),
        (32, 64, 64, 4, 4),
        (64, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 64, 4, 4),
        (128, 128, 64, 8, 3),
    ]
    return [config(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8) for bm, bn, bk, w, s in shapes]


def _unaligned_configs(hopper: bool) -> list[triton.Config]:
    # Strides or sizes not divisible by 16: every element address is computed alone, and larger tiles spill.
    return [config(4, 4, BLOCK_M=bm, BLOCK_N=64, BLOCK_K=64, GROUP_M=8) for bm in (16, 32)]


_INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "GROUP_M": 2}
_KEY = ["M_BUCKET", "N", "K", "RK", "stride_wk", "stride_wn"]
_GPU_META = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
GEMM = Tuned(_gemm_lowrank_kernel, _INTERPRET_META, _GPU_META, _configs, _KEY)
_UNALIGNED_META = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
GEMM_UNALIGNED = Tuned(_gemm_lowrank_kernel, _INTERPRET_META, _UNALIGNED_META, _unaligned_configs, _KEY)


DECODE_M = 64
SUM_BLOCK = 16 if INTERPRET else 64
# ``TTKERNELS_TRITON_SPLIT_K=0`` turns the decode split off (read at import; :data:`SPLIT_K` may be set later).
SPLIT_K = os.environ.get("TTKERNELS_TRITON_SPLIT_K", "1") != "0"


def split_k(M: int, N: int, K: int, itemsize: int, meta: dict, device: torch.device) -> int:
    """K ranges per output tile: 1 above :data:`DECODE_M` tokens or when the tiles give two programs per SM;
    at decode, enough for two programs per SM, at most one range per four K tiles, and few enough that the
    float32 partials (written and read back: ``2 x split x M x N x 4`` bytes) stay within 1/8 of W's bytes."""
    tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
    if not SPLIT_K or M > DECODE_M or tiles >= 2 * num_sms(device):
        return 1
    by_bytes = K * itemsize // (64 * M)
    return max(1, min(triton.cdiv(2 * num_sms(device), tiles), triton.cdiv(K, 4 * meta["BLOCK_K"]), by_bytes))


def tuned_for(args: tuple) -> Tuned:
    """The configuration list for a launch's arguments: the aligned one when N, K and every stride (other than
    1, which Triton specializes as a constant) are divisible by 16, as Triton's specialization sees them."""
    N, K, strides = args[7], args[8], args[11:21]
    aligned = N % 16 == 0 and K % 16 == 0 and all(v == 1 or v % 16 == 0 for v in strides)
    return GEMM if aligned else GEMM_UNALIGNED


def gemm_lowrank(
    out: torch.Tensor,
    X: Optional[torch.Tensor],
    W: Optional[torch.Tensor],
    L: torch.Tensor,
    R: torch.Tensor,
    bias: Optional[torch.Tensor],
    scaling: float,
    p: float = 0.0,
    seed: int | torch.Tensor = 0,
) -> torch.Tensor:
    """Writes ``X @ W + bias + scaling * drop(L @ R)`` into ``out`` (``X``/``W`` None: no base product)."""
    M, N = out.shape
    RK = L.shape[1]
    if M == 0:
        return out
    base = X is not None
    K = X.shape[1] if base else 0
    SEED, thr, keep_scale = dropout_args(p, seed, L)
    xs = (X.stride(0), X.stride(1)) if base else (0, 0)
    ws = (W.stride(0), W.stride(1)) if base else (0, 0)
    args = (
        X if base else L, W if base else R, L, R, bias if bias is not None else out, out,
        M, N, K, RK, m_bucket(M),
        *xs, *ws, L.stride(0), L.stride(1), R.stride(0), R.stride(1), out.stride(0), out.stride(1),
        float(scaling), SEED, thr, keep_scale,
    )  # fmt: skip
    flags = dict(
        BASE=base, HAS_BIAS=bias is not None, DROPOUT=p > 0.0,
        PRECISION=precision(L.dtype), BLOCK_R=min(rank_block(RK), 64),
    )  # fmt: skip
    tuned = tuned_for(args)
    meta = tuned.fixed_meta(out.device)
    split = split_k(M, N, K, X.element_size(), meta, out.device) if base else 1
    if split > 1:
        # Decode: the tiles alone leave SMs idle. Split K over programs (the fixed tiling: the buffer's size
        # depends on it), float32 partials summed in order by one small kernel: deterministic in any mode.
        ws = empty((split, M, N), torch.float32, out.device)
        tiles = triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"])
        ws_args = args[:5] + (ws,) + args[6:19] + (N, 1) + args[21:]
        tuned.launch_fixed(meta, (tiles, split), *ws_args, SPLIT_K=True, **flags)
        grid = (triton.cdiv(M, SUM_BLOCK), triton.cdiv(N, SUM_BLOCK))
        _common.run(
            _split_sum_kernel, grid, ws, out, M, N, split, out.stride(0), out.stride(1),
            BLOCK_M=SUM_BLOCK, BLOCK_N=SUM_BLOCK,
        )  # fmt: skip
        return out
    tuned.launch(
        out.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        *args, SPLIT_K=False, **flags,
    )  # fmt: skip
    return out
