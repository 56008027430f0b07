"""bench/traffic.py: the roofline traffic model of the Triton plans (predicted, not measured), checked against
byte and FLOP counts written out by hand at the target shape (bf16, M = 8192, 4096 x 4096, r = 16)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("ttkernels._triton_kernels.backend")
from bench import traffic

M, D, R = 8192, 4096, 16
E = 2  # bf16
H100, H200 = traffic.GPUS["H100-SXM"], traffic.GPUS["H200"]
GEMM_S = 2 * M * D * D / 989e12  # one frozen GEMM at the dense bf16 peak


def test_frozen_layer_is_two_compute_bound_gemms():
    launches = traffic.record("frozen", M, D, D, R, torch.bfloat16)
    assert [launch.name for launch in launches] == ["addmm", "mm"]
    assert traffic.predicted_seconds(launches, H100) == pytest.approx(2 * GEMM_S, rel=1e-12)


def test_cublas_plan_bytes_by_hand():
    launches = traffic.record("cublas", M, D, D, R, torch.bfloat16)
    by = {(launch.name, i): launch for i, launch in enumerate(launches)}
    names = [launch.name for launch in launches]
    assert names == ["_rows_fwd_kernel", "addmm_", "zeros", "_rows_bwd_kernel", "addmm_", "_finalize_kernel"]
    assert sum(not launch.small for launch in launches) == 4 and sum(launch.small for launch in launches) == 2
    fwd, bwd = by[("_rows_fwd_kernel", 0)], by[("_rows_bwd_kernel", 3)]
    factors = 2 * D * R * E  # A and B
    assert fwd.read == M * D * E + factors + D * E  # x once, A, B, the bias
    assert fwd.written == M * D * E + M * R * E  # y0 and S
    assert bwd.read == 2 * M * D * E + M * R * E + factors  # dY and x once, S, A, B
    assert bwd.written == M * D * E  # dx0
    assert bwd.atomics == (M // 128) * 2 * D * R  # one per element of dA and dB per 128-row block
    # cuBLAS reads y0 / dx0 in its epilogue (beta = 1): compute-bound, so hidden in the roofline
    assert by[("addmm_", 1)].seconds(H100) == pytest.approx(GEMM_S, rel=1e-12)


@pytest.mark.parametrize("gpu", [H100, H200], ids=["H100", "H200"])
def test_default_plan_predicted_ratio(gpu):
    # The cublas plan's extra traffic at the target shape: x and y0 forward, dY, x and dx0 backward (5 x 64 MiB),
    # the atomics as 4 bytes each, the rank-sized rest; everything else is the frozen GEMMs' time.
    extra_bytes = 5 * M * D * E + 2 * M * R * E + 2 * (2 * D * R * E) + D * E + (M // 128) * 2 * D * R * 4
    small = (2 * D * R * 4 + 2 * D * R * 4 + 2 * D * R * E) / gpu.bandwidth  # zero fill and finalize
    want = (2 * GEMM_S + extra_bytes / gpu.bandwidth + small) / (2 * GEMM_S)
    got = traffic.predicted_ratio("cublas", gpu)
    assert got == pytest.approx(want, rel=1e-9)
    # the numbers README quotes (predicted, not measured)
    assert round(got, 2) == {"H100 SXM": 1.20, "H200": 1.14}[gpu.name]


def test_report_says_predicted():
    text = traffic.report(64, 256, 128, 8, torch.bfloat16, "metatt", 0.1)
    assert "PREDICTED" in text and "not measured" in text
    assert "cublas: 4 large + 2 small launches" in text


def test_fused_plan_bytes_by_hand():
    launches = traffic.record("fused", M, D, D, R, torch.bfloat16)
    names = [launch.name for launch in launches]
    assert names == [
        "_shrink_kernel", "_gemm_lowrank_kernel", "_grad_dy_kernel", "zeros", "_gemm_grad_kernel", "_finalize_kernel"
    ]  # fmt: skip
    assert sum(not launch.small for launch in launches) == 4 and sum(launch.small for launch in launches) == 2
    dy, grad = launches[2], launches[4]
    assert (dy.read, dy.written, dy.atomics) == (M * D * E + R * D * E, M * R * E, 0)  # dU only: no dB atomics
    assert grad.read == 2 * M * D * E + 2 * M * R * E + D * D * E + D * R * E  # dY, x, dS, U, W, A
    assert grad.written == M * D * E  # dx
    assert grad.atomics == (M // 64) * 2 * D * R  # one per element of dA and dB per 64-row tile
    assert grad.flops == 2 * M * D * (D + R) + 2 * (2 * M * D * R)  # dx, then dA and dB
    det = traffic.record("fused", M, D, D, R, torch.bfloat16, deterministic=True)
    grad_det = next(launch for launch in det if launch.name == "_gemm_grad_kernel")
    assert grad_det.atomics == 0 and grad_det.written == M * D * E + (M // 64) * 2 * D * R * 4


@pytest.mark.parametrize("gpu", [H100, H200], ids=["H100", "H200"])
def test_fused_plan_predicted_ratio(gpu):
    # Two memory-bound passes (shrink over x, grad_dy over dY), the two GEMMs at the tensor-core peak with their
    # low-rank FLOPs (the forward's U B; the backward's dS A^T, dA and dB), a zero fill and the finalize.
    bw, peak = gpu.bandwidth, 989e12
    passes = (M * D * E + D * R * E + M * R * E) + (M * D * E + R * D * E + M * R * E)
    fwd = 2 * M * D * (D + R) / peak
    bwd = (2 * M * D * (D + R) + 4 * M * D * R) / peak
    small = (2 * D * R * 4 + 2 * D * R * 4 + 2 * D * R * E) / bw
    want = (passes / bw + fwd + bwd + small) / (2 * GEMM_S)
    got = traffic.predicted_ratio("fused", gpu)
    assert got == pytest.approx(want, rel=1e-9)
    # the numbers README quotes (predicted, not measured)
    assert round(got, 3) == {"H100 SXM": 1.081, "H200": 1.059}[gpu.name]
    assert got < traffic.predicted_ratio("cublas", gpu)
