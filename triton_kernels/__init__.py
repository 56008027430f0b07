"""Triton kernels of ttkernels (installed as ttkernels._triton_kernels)."""
