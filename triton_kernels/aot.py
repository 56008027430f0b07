"""Compile every Triton kernel of the backend for a GPU architecture, without a GPU.

    python -m ttkernels._triton_kernels.aot --arch 80 90 [--dtypes bf16 fp32] [--configs ends] [--jobs 2]

Runs the backend's launchers on ``meta`` tensors (every dtype, every flag combination the backend uses:
shared / per-sample / no C, dropout, bias, both base-GEMM plans, deterministic mode, the factor sides), records each kernel
launch instead of running it, and compiles each distinct one with ``triton.compile`` for the given compute
capabilities, with the smallest and the largest of its autotuning configurations (``--configs ends``), only
the largest or smallest, or all of them, and always with the configuration used when autotuning is off. It prints the shared memory each compiled kernel needs and exits non-zero when a kernel
fails to compile or no configuration of a launch fits the architecture's shared memory (not checked with
``--configs largest``: the largest tiles may exceed it, and autotuning skips them). CI runs it for
sm_90 and sm_80 (tests/test_triton_aot.py): it catches what the interpreter cannot (tile shapes tl.dot
refuses, type errors in lowering), but says nothing of speed and does not run the code.

Must run with ``TRITON_INTERPRET`` unset (the kernels must be compiled functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ttkernels.ops import side_plans
from ttkernels.spec import TTSpec

from . import _common, backend
from .factors import side_backward, side_forward
from .gemm import GEMM
from .grads import GRAD_A, GRAD_DY
from .shrink import SHRINK
from .ttm import kron_apply, kron_grad_p, kron_grad_q, tuned_for_launch

# Largest dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TYPES = {
    torch.float32: "fp32",
    torch.bfloat16: "bf16",
    torch.float16: "fp16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int8: "i8",
}
_TUNED = {id(t.kernel): t for t in (SHRINK, GEMM, GRAD_DY, GRAD_A)}


@contextmanager
def _recording(out: list) -> Iterator[None]:
    saved = _common.run
    _common.run = lambda kernel, grid, *args, **kwargs: out.append((kernel, args, kwargs))
    try:
        yield
    finally:
        _common.run = saved


@contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def _scenarios(dtype: torch.dtype) -> Iterator[None]:
    """Calls every backend function on meta tensors in each flag combination (a generator: one per step)."""
    dev = torch.device("meta")
    M, d_in, d_out, r, T = 100, 96, 80, 16, 3

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=dev)

    x, W, b, A, B = t(M, d_in), t(d_out, d_in), t(d_out), t(d_in, r), t(r, d_out)
    ids = t(M, dt=torch.int64)
    for C, p in itertools.product((None, t(r, r), t(T, r, r)), (0.0, 0.1)):
        task_ids = ids if C is not None and C.dim() == 3 else None
        backend.shrink(x, A, C, task_ids, p, 5)
        backend.mid(t(M, r), C, task_ids)
        yield
    for plan, bias, p in itertools.product(("fused", "cublas"), (None, b), (0.0, 0.1)):
        backend.BASE_GEMM = plan
        backend.expand(x, W, bias, t(M, r), B, 0.5)
        backend.grad_x(t(M, d_out), W, t(M, r), A, p, 5)
        yield
    backend.BASE_GEMM = "fused"
    # TT-matrix Kronecker sums: kept sides 16 (a 16^3 chain's cut), and 128 (the limit) in bf16; a transposed x
    kron_cases = [(16, 16, 256, 256, 8)] + ([(5, 128, 9, 7, 2)] if dtype == torch.bfloat16 else [])
    for ni, na, nj, nc, rank in kron_cases:
        x3, q, p = t(M, nj, ni).transpose(1, 2), t(rank, na, ni), t(rank, nj, nc)
        dy3 = t(M, na, nc)
        kron_apply(x3, q, p)
        kron_grad_q(dy3, x3, p, q)
        kron_grad_p(dy3, x3, p, q)
    yield
    spec = TTSpec.linear(60, 48, in_modes=3, out_modes=2, ranks=16)
    cores = [t(*shape, dt=torch.float32) for shape in spec.core_shapes]
    for det in (False, True):
        with _deterministic(det):
            for order, divisors, fixed, transposed, rows, r_out in side_plans(spec, {}):
                chain = [cores[k] for k in order]
                side_forward(chain, divisors, fixed, transposed, rows, r_out, dtype)
                dout = t(*((r_out, rows) if transposed else (rows, r_out)))
                side_backward(dout, chain, divisors, fixed, transposed, rows, r_out)
    yield
    for det in (False, True):
        with _deterministic(det):
            backend.grad_dy(t(M, d_out), t(M, r), B, 0.5)
            backend.grad_mid(t(M, r), t(M, r), t(T, r, r), ids)
            for p in (0.0, 0.1):
                backend.grad_a(x, t(M, r), p, 5)
        yield


def _arg_type(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def _compile(kernel: Any, args: tuple, kwargs: dict, arch: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    signature, constexprs = {}, {}
    values = list(args)
    for param in kernel.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[param.name] = kwargs[param.name]
        else:
            signature[param.name] = _arg_type(values.pop(0))
    src = ASTSource(kernel, signature, constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return int(compiled.metadata.shared)


def _configs_for(kernel: Any, kwargs: dict, arch: int, which: str) -> list[dict]:
    tuned = _TUNED.get(id(kernel)) or tuned_for_launch(kernel, kwargs)
    if tuned is None:
        return [kwargs]
    cfgs = tuned.configs(arch >= 90)
    if which != "all":
        area = [c.kwargs.get("BLOCK_M", 1) * max(v for k, v in c.kwargs.items() if k != "BLOCK_M") for c in cfgs]
        small, large = cfgs[area.index(min(area))], cfgs[area.index(max(area))]
        cfgs = {"ends": [small, large], "smallest": [small], "largest": [large]}[which]
    base = {k: v for k, v in kwargs.items() if k not in cfgs[0].kwargs}
    out = [{**base, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in cfgs]
    return out + [{**base, **tuned.gpu_meta}]  # the configuration used without autotuning


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_JOBS: list = []


def _job(i: int) -> tuple[int, str, int | None]:
    kernel, args, cfg, arch, label = _JOBS[i]
    try:
        return i, label, _compile(kernel, args, cfg, arch)
    except Exception as err:  # reported by the parent, which then fails
        return i, f"{label}: {type(err).__name__}: {err}", None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["fp32", "bf16", "fp16"])
    parser.add_argument(
        "--configs",
        choices=("ends", "smallest", "largest", "all"),
        default="ends",
        help="which autotuning configurations to compile (ends: the smallest and the largest)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ns = parser.parse_args(argv)
    if _common.INTERPRET:
        print("aot: TRITON_INTERPRET is set; unset it to compile the kernels", file=sys.stderr)
        return 2
    launches: list = []
    with _recording(launches):
        for name in ns.dtypes:
            for _ in _scenarios(_DTYPES[name]):
                pass
    seen: set = set()
    groups: list[tuple[str, int, list[int]]] = []  # (launch label, arch, job indices)
    for kernel, args, kwargs in launches:
        key = (kernel.__name__, tuple(_arg_type(a) for a in args), tuple(sorted(kwargs.items())))
        if key in seen:
            continue
        seen.add(key)
        flags = {k: v for k, v in kwargs.items() if k.isupper() and not k.startswith("BLOCK") and k != "GROUP_M"}
        for arch in ns.arch:
            label = f"sm_{arch} {kernel.__name__} {key[1][0]} {flags}"
            idx = []
            for cfg in _configs_for(kernel, kwargs, arch, ns.configs):
                tiles = {k: v for k, v in cfg.items() if k.startswith("BLOCK") or k.startswith("num_")}
                idx.append(len(_JOBS))
                _JOBS.append((kernel, args, cfg, arch, f"{label} {tiles}"))
            groups.append((label, arch, idx))
    start = time.perf_counter()
    if ns.jobs > 1:
        with multiprocessing.get_context("fork").Pool(ns.jobs) as pool:
            results = {i: (label, shared) for i, label, shared in pool.imap_unordered(_job, range(len(_JOBS)))}
    else:
        results = {i: (label, shared) for i, label, shared in map(_job, range(len(_JOBS)))}
    failures = compiled = 0
    for label, arch, idx in groups:
        limit = SMEM_LIMIT.get(arch, 101376)
        fits = 0
        for i in idx:
            text, shared = results[i]
            if shared is None:
                failures += 1
                print(f"FAIL {text}")
                continue
            compiled += 1
            fits += shared <= limit
            print(f"ok   {text} shared={shared}")
        if not fits and ns.configs != "largest":
            failures += 1
            print(f"FAIL {label}: no configuration compiled within {limit} bytes of shared memory")
    print(f"aot: {compiled} kernels compiled, {failures} failures, {time.perf_counter() - start:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
