"""Shared test helpers: specs, random cores, an independent einsum for delta-W, tolerances."""

from __future__ import annotations

import string

import torch

import ttkernels as tk
from ttkernels.spec import Mode, TTSpec

# (atol, rtol) for comparing a result in this dtype with the float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def randn(*shape, dtype=torch.float64, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=dtype) * scale
    return t.requires_grad_(requires_grad)


def random_cores(spec: TTSpec, dtype=torch.float64, requires_grad=False):
    """Random, non-zero cores scaled so that delta-W entries are O(1/sqrt(d_in))."""
    cores = []
    for k, (r0, s, r1) in enumerate(spec.core_shapes):
        scale = (r0 * (s if spec.modes[k].role == "in" else 1)) ** -0.5
        cores.append(randn(r0, s, r1, dtype=dtype, requires_grad=requires_grad, scale=scale))
    return cores


def einsum_delta(cores, spec: TTSpec, index=None, task=None) -> torch.Tensor:
    """dW^T (d_in, d_out) by one einsum over all cores: written independently of ttkernels.reference."""
    index = dict(index or {})
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(spec.num_cores + 1)]
    terms, operands, in_letters, out_letters = [], [], [], []
    for k, (core, mode) in enumerate(zip(cores, spec.modes)):
        if mode.role == "index":
            value = task if mode.per_sample else index[mode.name]
            operands.append(core[:, value, :])
            terms.append(bonds[k] + bonds[k + 1])
        else:
            m = next(letters)
            (in_letters if mode.role == "in" else out_letters).append(m)
            operands.append(core)
            terms.append(bonds[k] + m + bonds[k + 1])
    # The boundary bonds have size 1: fold them away with explicit ones vectors.
    one = torch.ones(1, dtype=cores[0].dtype)
    expr = ",".join([bonds[0]] + terms + [bonds[-1]]) + "->" + "".join(in_letters + out_letters)
    T = torch.einsum(expr, one, *operands, one)
    return T.reshape(spec.in_features, spec.out_features)


def lora_spec(d_in, d_out, r):
    return TTSpec.linear(d_in, d_out, ranks=r)


def ttlora_spec():
    # awkward sizes: primes and non-powers of two, per-bond ranks
    return TTSpec.build((3, 7), (5, 2, 3), (2, 4, 3, 2), in_features=21, out_features=30)


def metatt_spec(d_in=12, d_out=10, layers=3, matrices=4, r=3, tasks=None):
    idx = [Mode.index("layer", layers), Mode.index("matrix", matrices)]
    if tasks:
        idx.append(Mode.task(tasks))
    return TTSpec.build((d_in,), (d_out,), r, index_modes=idx)


def dense_ref(x, weight, bias, cores, spec, scaling, index=None, task_ids=None):
    """y in float64 from the dense delta-W (independent einsum), per sample when there are tasks."""
    x64 = x.double().reshape(-1, spec.in_features)
    y = x64 @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    cores64 = [c.double() for c in cores]
    if spec.per_sample_mode is None:
        y = y + scaling * x64 @ einsum_delta(cores64, spec, index)
    else:
        ids = task_ids.reshape(-1)
        for t in range(spec.per_sample_mode.size):
            rows = ids == t
            y[rows] = y[rows] + scaling * x64[rows] @ einsum_delta(cores64, spec, index, task=t)
    return y.reshape(*x.shape[:-1], spec.out_features)


def assert_close(actual, expected, dtype, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg or None)


__all__ = ["tk"]
