"""Steps 6, 7 and the ``dB`` half of step 4 of the ``fused`` plan in one GEMM launch.

``dx = dY W + drop'(dS A^T)``, ``dA = drop(x)^T dS`` and ``dB = scaling U^T dY``, one kernel, with
``dY (M, K)``, ``W (K, N)`` (the weight: ``K = d_out``, ``N = d_in``), ``dS (M, RA)``, ``A (N, RA)``,
``x (M, N)``, ``U (M, RB)``; any strides.

The program owning the dx tile ``(m-tile, n-tile)`` first loads ``x[m-tile, n-tile]`` and ``dS[m-tile]``, which
its low-rank term needs anyway: it adds ``drop(x)_tile^T dS_tile`` into ``dA[n-tile]`` and seeds its float32
accumulator with ``drop'(dS_tile A^T)`` (the mask of the forward, one hash per element for both). Its main
loop then walks ``dY[m-tile, k-chunk]`` for the base product; chunk ``c`` of each m-tile is also the
``dB[:, k-chunk]`` contribution ``U[m-tile]^T dY[m-tile, k-chunk]`` of exactly one program, the one whose
``n-tile == c % n-tiles``, so every (m-tile, k-chunk) pair is added once. dY and x are read once per program
as the base GEMM reads them; ``_grad_dy_kernel`` is left with ``dU`` and ``_grad_a_kernel`` is not launched.

``dA`` and ``dB`` are float32 sums over m-tiles into one workspace laid out as ``dA (N, RA)`` then
``dB (RB, K)`` (``TOTAL`` elements): atomics into a zeroed workspace, or, in torch's deterministic mode, every
m-tile's partial sums stored in its own row of a ``(m-tiles, TOTAL)`` buffer (each element written exactly
once), which ``rows._finalize_kernel`` adds in a fixed order while rounding ``dA`` and ``dB`` to their dtypes.

Without ``NEED_DX`` the base product and the dx store are skipped; each program walks only its own dY chunks.
Program ids are grouped along M (``GROUP_M``) as in :mod:`.gemm`. Row offsets are int64. fp32 accumulation;
ranks ``<= 128``; fp32 inputs use tf32 only when torch's matmul does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import rows
from ._common import (
    DROPOUT_ARGS,
    Tuned,
    config,
    deterministic,
    dropout_args,
    empty,
    grouped_tile,
    keep_mask,
    m_bucket,
    precision,
    rank_block,
)


@triton.jit
def _db_chunk(dy, u, kk, k_ok, rb, rb_ok, ws_b, K, scaling, PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr):
    # ws_b[:, kk] (+)= scaling * U_tile^T dY_tile, as dB^T = dY^T U: the chunk's width is the dot's M (a wgmma
    # on sm_90; U^T dY, with the rank as M, is an mma.sync that serializes the main loop's wgmma)
    dbt = tl.dot(tl.trans(dy), u, input_precision=PRECISION) * scaling
    ptrs = ws_b + rb[None, :] * K + kk[:, None]
    ok = rb_ok[None, :] & k_ok[:, None]
    if DETERMINISTIC:
        tl.store(ptrs, dbt, mask=ok)
    else:
        tl.atomic_add(ptrs, dbt, mask=ok, sem="relaxed")


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _gemm_grad_kernel(
    DY, W, DS, A, X, U, DX, WS,
    M, N, K, RA, RB, TOTAL, M_BUCKET,
    stride_ym, stride_yk, stride_wk, stride_wn, stride_sm, stride_sr, stride_an, stride_ar,
    stride_xm, stride_xn, stride_um, stride_ur, stride_om, stride_on,
    scaling, SEED, threshold, keep_scale,
    NEED_DX: tl.constexpr, DETERMINISTIC: tl.constexpr, DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, RB_P: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    num_n = tl.cdiv(N, BLOCK_N)

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm64 = rm.to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    ws = WS + (pid_m.to(tl.int64) * TOTAL if DETERMINISTIC else 0)

    # dA[n-tile] (+)= drop(x)_tile^T dS_tile, and the low-rank seed drop'(dS_tile A^T), one rank chunk at a time.
    xt = tl.load(X + rm64[:, None] * stride_xm + rn[None, :] * stride_xn, mask=m_ok[:, None] & n_ok[None, :], other=0.0)
    if DROPOUT:
        keep = keep_mask(rm, rn, tl.load(SEED), threshold)
        xt = tl.where(keep, xt.to(tl.float32) * keep_scale, 0.0).to(X.dtype.element_ty)
    xtt = tl.trans(xt)
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    # The launcher refuses RA == 0. Saying so drops the loop's zero-trip path, where LLVM zeroed the accumulator
    # after the loop's wgmma in the code, which ptxas took for a write to it in flight (C7515: wgmma serialized).
    tl.assume(RA > 0)
    for r0 in range(0, RA, BLOCK_R):
        ri = r0 + rr
        r_ok = ri < RA
        ds = tl.load(
            DS + rm64[:, None] * stride_sm + ri[None, :] * stride_sr, mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        da = tl.dot(xtt, ds, input_precision=PRECISION)
        da_ptrs = ws + rn[:, None] * RA + ri[None, :]
        if DETERMINISTIC:
            tl.store(da_ptrs, da, mask=n_ok[:, None] & r_ok[None, :])
        else:
            tl.atomic_add(da_ptrs, da, mask=n_ok[:, None] & r_ok[None, :], sem="relaxed")
        if NEED_DX:
            at = tl.load(
                A + ri[:, None] * stride_ar + rn[None, :] * stride_an, mask=r_ok[:, None] & n_ok[None, :], other=0.0
            )
            acc = tl.dot(ds, at, acc, input_precision=PRECISION)

    # U[m-tile], for this program's dB chunks
    rb = tl.arange(0, RB_P)
    rb_ok = rb < RB
    u = tl.load(U + rm64[:, None] * stride_um + rb[None, :] * stride_ur, mask=m_ok[:, None] & rb_ok[None, :], other=0.0)
    ws_b = ws + N * RA
    rk = tl.arange(0, BLOCK_K)
    if NEED_DX:
        if DROPOUT:
            acc = tl.where(keep, acc * keep_scale, 0.0)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            k_ok = kk < K
            dy = tl.load(
                DY + rm64[:, None] * stride_ym + kk[None, :] * stride_yk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            w = tl.load(
                W + kk[:, None] * stride_wk + rn[None, :] * stride_wn, mask=k_ok[:, None] & n_ok[None, :], other=0.0
            )
            acc = tl.dot(dy, w, acc, input_precision=PRECISION)
            if (k0 // BLOCK_K) % num_n == pid_n:
                _db_chunk(dy, u, kk, k_ok, rb, rb_ok, ws_b, K, scaling, PRECISION, DETERMINISTIC)
        out_ptrs = DX + rm64[:, None] * stride_om + rn[None, :] * stride_on
        tl.store(out_ptrs, acc.to(DX.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])
    else:
        for c in range(pid_n, tl.cdiv(K, BLOCK_K), num_n):
            kk = c * BLOCK_K + rk
            k_ok = kk < K
            dy = tl.load(
                DY + rm64[:, None] * stride_ym + kk[None, :] * stride_yk, mask=m_ok[:, None] & k_ok[None, :], other=0.0
            )
            _db_chunk(dy, u, kk, k_ok, rb, rb_ok, ws_b, K, scaling, PRECISION, DETERMINISTIC)


def _configs(hopper: bool) -> list[triton.Config]:
    # The fused GEMM's list (gemm.py); each compiled without spills for every flag combination (make
    # triton-gate).
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
_KEY = ["M_BUCKET", "N", "K", "RA", "RB", "stride_wk", "stride_wn"]
_GPU_META = {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
GEMM_GRAD = Tuned(_gemm_grad_kernel, _INTERPRET_META, _GPU_META, _configs, _KEY, reset_to_zero=["WS"])
_UNALIGNED_META = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 4}
GEMM_GRAD_UNALIGNED = Tuned(
    _gemm_grad_kernel, _INTERPRET_META, _UNALIGNED_META, _unaligned_configs, _KEY, reset_to_zero=["WS"]
)


def tuned_for(args: tuple) -> Tuned:
    """The aligned configuration list when N, K and every stride (other than 1) are divisible by 16."""
    N, K, strides = args[9], args[10], args[15:29]
    aligned = N % 16 == 0 and K % 16 == 0 and all(v == 1 or v % 16 == 0 for v in strides)
    return GEMM_GRAD if aligned else GEMM_GRAD_UNALIGNED


def gemm_grad(
    dy: torch.Tensor,
    weight: torch.Tensor,
    dS: torch.Tensor,
    A: torch.Tensor,
    x: torch.Tensor,
    U: torch.Tensor,
    dtype_b: torch.dtype,
    scaling: float,
    p: float,
    seed: int | torch.Tensor,
    need_dx: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dB)``: ``dx = dY W + drop'(dS A^T)`` (empty unless ``need_dx``), ``dA = drop(x)^T dS``,
    ``dB = scaling U^T dY`` (in ``dtype_b``)."""
    M, K = dy.shape
    N = weight.shape[1]
    RA, RB = dS.shape[1], U.shape[1]
    if RA == 0:  # the kernel assumes RA > 0
        raise ValueError("gemm_grad: dS has no columns (rank 0); the rank must be at least 1")
    dx = empty((M, N), x.dtype, x.device) if need_dx else x.new_empty(0)
    dA = empty((N, RA), A.dtype, x.device)
    dB = empty((RB, K), dtype_b, x.device)
    if M == 0:
        if need_dx:
            dx.zero_()
        return dx, dA.zero_(), dB.zero_()
    total = N * RA + RB * K
    SEED, thr, keep_scale = dropout_args(p, seed, x)
    args = (
        dy, weight, dS, A, x, U, dx if need_dx else x, None,
        M, N, K, RA, RB, total, m_bucket(M),
        dy.stride(0), dy.stride(1), weight.stride(0), weight.stride(1), dS.stride(0), dS.stride(1),
        A.stride(0), A.stride(1), x.stride(0), x.stride(1), U.stride(0), U.stride(1),
        dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
        float(scaling), SEED, thr, keep_scale,
    )  # fmt: skip
    flags = dict(
        NEED_DX=need_dx, DROPOUT=p > 0.0, PRECISION=precision(x.dtype),
        BLOCK_R=min(rank_block(RA), 64), RB_P=rank_block(RB),
    )  # fmt: skip
    tuned = tuned_for(args)
    if deterministic():
        meta = tuned.fixed_meta(x.device)
        blocks = triton.cdiv(M, meta["BLOCK_M"])
        ws = empty((blocks, total), torch.float32, x.device)
        grid = (blocks * triton.cdiv(N, meta["BLOCK_N"]),)
        tuned.launch_fixed(meta, grid, *args[:7], ws, *args[8:], DETERMINISTIC=True, **flags)
    else:
        blocks = 1
        ws = torch.zeros(total, dtype=torch.float32, device=x.device)
        tuned.launch(
            x.device,
            lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
            *args[:7], ws, *args[8:],
            DETERMINISTIC=False, **flags,
        )  # fmt: skip
    rows.run_finalize(ws, dA, dB, dB, N * RA, RB * K, total, blocks)
    return dx, dA, dB
