"""The compile gate: every Triton launch of the backend compiled for a GPU as the JIT would, without a GPU.

    python -m ttkernels._triton_kernels.aot --arch 90 --dtypes bf16 --report [--configs all|default] [--jobs 2]

Runs the backend (both base-GEMM plans, every step, the factor sides, the TT-matrix kernels) on ``meta``
tensors in every flag combination it uses (shared / per-sample / no C, dropout, bias, dx wanted or not,
deterministic mode), at the target shape (8192 tokens, 4096 x 4096, r = 16), at one token (decode), at a shape
of odd sizes, and with dropout seeds whose low word is 1; records each kernel launch instead of running it.
Each recorded launch is then compiled with the JIT's own argument specialization (the binder Triton builds
for the kernel: pointers and ints divisible by 16, ints equal to 1 as constexprs, i32 or i64 by value,
``do_not_specialize`` honoured) for every configuration the autotuner may pick and the one used without
autotuning (``--configs all``, the default: every configuration for each kernel's launches with the most
flags on at each shape, the default configuration for the other flag combinations) or only the latter
(``--configs default``), through
``triton.compile`` for ``GPUTarget("cuda", arch, 32)`` with ptxas' log on.

Per compiled launch it prints the registers, spill bytes (stores + loads), shared memory (Triton's dynamic
allocation), tensor-core instructions in the PTX (``wgmma.mma_async`` on sm_90, ``mma.sync``), and ptxas'
wgmma-serialization warning (C7515) with its reason when given; it ends with the lines

    wgmma serialized (ptxas C7515) in K launches[: kernel (launches), ...]
    compiled N launches: F failed, S spilling, X over shared memory

and exits non-zero unless F, S and X are all 0 (K is for information; the last line is the one CI reads). ``make triton-gate`` runs it for sm_90
and bf16. This says what the compiler makes of the kernels; it does not run them and says nothing of speed.

Must run with ``TRITON_INTERPRET`` unset (the kernels must be compiled functions, not interpreted ones).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import multiprocessing
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ttkernels.ops import side_plans
from ttkernels.spec import TTSpec

from . import _common, backend, gemm, rows
from .factors import side_backward, side_forward
from .gemm import GEMM
from .gemm import tuned_for as gemm_tuned_for
from .gemm_grad import GEMM_GRAD
from .gemm_grad import tuned_for as gemm_grad_tuned_for
from .grad_a import GRAD_A
from .grad_dy import GRAD_DY
from .shrink import SHRINK, SHRINK_PARTIAL
from .ttm import kron_apply, kron_grad_p, kron_grad_q, tuned_for_launch

# Largest dynamic shared memory per block, bytes (CUDA programming guide, compute capabilities table).
SMEM_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
_TUNED = {id(t.kernel): t for t in (SHRINK, SHRINK_PARTIAL, GEMM, GRAD_DY, GRAD_A, rows.ROWS_FWD, rows.ROWS_BWD)}


def _tuned_for(kernel: Any, args: tuple, kwargs: dict) -> Any:
    if kernel is GEMM.kernel:  # the launcher picks the configuration list by the launch's alignment
        return gemm_tuned_for(args)
    if kernel is GEMM_GRAD.kernel:
        return gemm_grad_tuned_for(args)
    return _TUNED.get(id(kernel)) or tuned_for_launch(kernel, kwargs)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEED_LOW_WORD_1 = 2**32 + 1  # the seed that once made ``keep_mask`` fail to compile


@contextmanager
def _recording(out: list) -> Iterator[None]:
    saved = _common.run, gemm.num_sms
    _common.run = lambda kernel, grid, *args, **kwargs: out.append((kernel, args, kwargs))
    gemm.num_sms = lambda device: 132  # an H100's SMs: the fused GEMM's decode split-K is recorded too
    try:
        yield
    finally:
        _common.run, gemm.num_sms = saved


@contextmanager
def _deterministic(on: bool) -> Iterator[None]:
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


@contextmanager
def _plan(name: str) -> Iterator[None]:
    saved, backend.BASE_GEMM = backend.BASE_GEMM, name
    try:
        yield
    finally:
        backend.BASE_GEMM = saved


def _scenarios(dtype: torch.dtype) -> None:
    """Calls every backend function on meta tensors in each flag combination the backend uses."""
    dev = torch.device("meta")
    r, T = 16, 3

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=dev)

    # target shape, one token (decode), odd sizes
    for M, d_in, d_out in ((8192, 4096, 4096), (1, 4096, 4096), (37, 4095, 4097)):
        x, W, b, A, B, dy = t(M, d_in), t(d_out, d_in), t(d_out), t(d_in, r), t(r, d_out), t(M, d_out)
        ids = t(M, dt=torch.int64)
        for C, p, bias, det in itertools.product((None, t(r, r), t(T, r, r)), (0.0, 0.1), (None, b), (False, True)):
            task_ids = ids if C is not None and C.dim() == 3 else None
            seed = SEED_LOW_WORD_1 if p else 5
            with _deterministic(det):
                for plan in ("cublas", "fused"):
                    with _plan(plan):
                        y, S = backend.forward(x, W, bias, A, C, B, task_ids, 0.5, p, seed)
                        for need_dx in (True, False):
                            backend.backward(dy, x, W, A, C, B, S, task_ids, 0.5, p, seed, need_dx)
        # the step functions alone (step ops, benchmarks): the cublas plan's low-rank-only GEMM, grad_dy with
        # dB, grad_a (the fused plan folds both reductions into its backward GEMM)
        with _plan("cublas"):
            for p in (0.0, 0.1):
                backend.expand(x, W, b, t(M, r), B, 0.5)
                backend.grad_x(dy, W, t(M, r), A, p, SEED_LOW_WORD_1)
            for det in (False, True):
                with _deterministic(det):
                    backend.grad_dy(dy, t(M, r), B, 0.5)
                    for p in (0.0, 0.1):
                        backend.grad_a(x, t(M, r), p, SEED_LOW_WORD_1)
    _common.keep_mask_tensor(SEED_LOW_WORD_1, 64, 64, 0.1, device=dev)
    # TT-matrix Kronecker sums: kept sides 16 (a 16^3 chain's cut), and 128 (the limit) in bf16; a transposed x
    kron_cases = [(16, 16, 256, 256, 8)] + ([(5, 128, 9, 7, 2)] if dtype == torch.bfloat16 else [])
    for M in (8192, 1):
        for ni, na, nj, nc, rank in kron_cases:
            x3, q, p = t(M, nj, ni).transpose(1, 2), t(rank, na, ni), t(rank, nj, nc)
            dy3 = t(M, na, nc)
            kron_apply(x3, q, p)
            kron_grad_q(dy3, x3, p, q)
            kron_grad_p(dy3, x3, p, q)
    spec = TTSpec.linear(4096, 4096, in_modes=3, out_modes=2, ranks=16)
    cores = [t(*shape, dt=torch.float32) for shape in spec.core_shapes]
    for det in (False, True):
        with _deterministic(det):
            for order, divisors, fixed, transposed, rows_, r_out in side_plans(spec, {}):
                chain = [cores[k] for k in order]
                side_forward(chain, divisors, fixed, transposed, rows_, r_out, dtype)
                dout = t(*((r_out, rows_) if transposed else (rows_, r_out)))
                side_backward(dout, chain, divisors, fixed, transposed, rows_, r_out)


def _configs_for(kernel: Any, args: tuple, kwargs: dict, which: str, hopper: bool) -> list[dict]:
    """The meta-parameters a GPU may launch this kernel with: every autotuning configuration and the one used
    without autotuning (``which == "all"``), or only the latter."""
    tuned = _tuned_for(kernel, args, kwargs)
    if tuned is None:
        return [kwargs]
    cfgs = tuned.configs(hopper) if which == "all" else []
    base = {k: v for k, v in kwargs.items() if k not in tuned.gpu_meta}
    out = [{**base, **c.kwargs, "num_warps": c.num_warps, "num_stages": c.num_stages} for c in cfgs]
    default = {**base, **tuned.gpu_meta}
    return out + ([default] if default not in out else [])


def _binder(kernel: Any, arch: int) -> tuple[Any, Any, Any]:
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    be = make_backend(target)
    return target, be, create_function_from_signature(kernel.signature, kernel.params, be)


def specialization(kernel: Any, args: tuple, kwargs: dict, arch: int) -> tuple:
    """The JIT's cache key of this launch (argument types and attributes, constexprs, options)."""
    _, _, binder = _binder(kernel, arch)
    _, spec, options = binder(*args, **kwargs)
    return tuple(map(str, spec)), tuple(sorted(map(str, options.items())))


_PTXAS = [
    ("regs", re.compile(r"Used (\d+) registers")),
    ("spill_st", re.compile(r"(\d+) bytes spill stores")),
    ("spill_ld", re.compile(r"(\d+) bytes spill loads")),
]


_C7515 = re.compile(r"\(C7515\).*? serialized due to (.*?)(?: in the function '[^']*')?\.?$", re.M)


def _serialized_reasons(log: str) -> str:
    """ptxas' reasons for serializing wgmma (warning C7515), '; '-joined; empty when it did not."""
    reasons = [m.group(1).strip().rstrip(".") for m in _C7515.finditer(log)]
    if "C7515" in log and not reasons:
        reasons = [line.strip() for line in log.splitlines() if "C7515" in line]
    return "; ".join(dict.fromkeys(reasons))


def compile_launch(kernel: Any, args: tuple, kwargs: dict, arch: int) -> dict:
    """Compiles one launch as the JIT would; returns registers, spills, shared memory, tensor-core counts."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    target, be, binder = _binder(kernel, arch)
    kwargs = {**kwargs, "debug": False, "instrumentation_mode": knobs.compilation.instrumentation_mode}
    bound, spec, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(be, kwargs, bound, spec, options)
    src = ASTSource(kernel, signature, constexprs, attrs)
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope():
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its log
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    text = log.getvalue()
    found = {key: sum(int(v) for v in rx.findall(text)) for key, rx in _PTXAS}
    ptx = compiled.asm.get("ptx", "")
    return {
        "regs": found["regs"],
        "spill": found["spill_st"] + found["spill_ld"],
        "shared": int(compiled.metadata.shared),
        "wgmma": ptx.count("wgmma.mma_async."),
        "mma": ptx.count("mma.sync."),
        "serialized": _serialized_reasons(text),
    }


def _flags_on(kwargs: dict) -> int:
    return sum(1 for k, v in kwargs.items() if k.isupper() and not k.startswith(("BLOCK", "GROUP")) and v is True)


def _shape_of(args: tuple) -> tuple:
    return tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))[:1]


_JOBS: list = []


def _job(i: int) -> tuple[int, Any]:
    kernel, args, cfg, arch, _ = _JOBS[i]
    try:
        return i, compile_launch(kernel, args, cfg, arch)
    except Exception as err:  # reported by the parent, which then fails
        return i, f"{type(err).__name__}: {str(err).strip().splitlines()[-1] if str(err).strip() else ''}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], help="compute capabilities, e.g. 90 80")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["bf16"])
    parser.add_argument(
        "--configs",
        choices=("all", "default"),
        default="all",
        help="all: every autotuning configuration and the default one; default: the one used without autotuning",
    )
    parser.add_argument("--report", action="store_true", help="print one line per compiled launch")
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernels (names), for a quick look")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    ns = parser.parse_args(argv)
    if _common.INTERPRET:
        print("aot: TRITON_INTERPRET is set; unset it to compile the kernels", file=sys.stderr)
        return 2
    launches: list = []
    with _recording(launches):
        for name in ns.dtypes:
            _scenarios(_DTYPES[name])
    # Every autotuning configuration for each kernel's launches with the most flags on (the most code, the
    # most registers) at each shape; the default configuration for every other launch.
    most: dict[tuple, int] = {}
    for kernel, args, kwargs in launches:
        key = (kernel.__name__, _shape_of(args))
        most[key] = max(most.get(key, -1), _flags_on(kwargs))
    seen: set = set()
    if ns.kernels:
        launches = [launch for launch in launches if launch[0].__name__ in ns.kernels]
    for kernel, args, kwargs in launches:
        full = ns.configs == "all" and _flags_on(kwargs) == most[(kernel.__name__, _shape_of(args))]
        for arch in ns.arch:
            for cfg in _configs_for(kernel, args, kwargs, "all" if full else "default", arch >= 90):
                key = (kernel.__name__, arch, specialization(kernel, args, cfg, arch))
                if key in seen:
                    continue
                seen.add(key)
                flags = {k: v for k, v in cfg.items() if k.isupper() and not k.startswith("BLOCK") and k != "GROUP_M"}
                tiles = {k: v for k, v in cfg.items() if k.startswith(("BLOCK", "num_", "GROUP"))}
                ints = [a for a in args if isinstance(a, int) and not isinstance(a, bool)]
                dtype = next((str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)), "")
                label = f"sm_{arch} {kernel.__name__} {dtype} M={ints[0] if ints else '?'} {flags} {tiles}"
                _JOBS.append((kernel, args, cfg, arch, label))
    start = time.perf_counter()
    failed = spilling = over = 0
    serialized: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        if ns.jobs > 1:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(ns.jobs))
            results = pool.imap_unordered(_job, range(len(_JOBS)))
        else:
            results = map(_job, range(len(_JOBS)))
        for i, res in results:  # printed as they complete
            _, _, _, arch, label = _JOBS[i]
            if isinstance(res, str):
                failed += 1
                print(f"FAIL {label}: {res}", flush=True)
                continue
            if res["serialized"]:
                name = _JOBS[i][0].__name__
                serialized[name] = serialized.get(name, 0) + 1
            limit = SMEM_LIMIT.get(arch, 101376)
            bad = []
            if res["spill"]:
                spilling += 1
                bad.append("SPILLS")
            if res["shared"] > limit:
                over += 1
                bad.append(f"OVER {limit} B SHARED")
            if ns.report or bad:
                warn = f" C7515 (wgmma serialized: {res['serialized']})" if res["serialized"] else ""
                print(
                    f"{'BAD ' if bad else 'ok  '}{label}: regs={res['regs']} spill={res['spill']} B "
                    f"shared={res['shared']} B wgmma={res['wgmma']} mma={res['mma']}{warn} {' '.join(bad)}".rstrip(),
                    flush=True,
                )
    seconds = time.perf_counter() - start
    print(f"({seconds:.0f} s with {ns.jobs} job(s))")
    names = ", ".join(f"{name} ({n})" for name, n in sorted(serialized.items()))
    print(f"wgmma serialized (ptxas C7515) in {sum(serialized.values())} launches" + (f": {names}" if names else ""))
    print(f"compiled {len(_JOBS)} launches: {failed} failed, {spilling} spilling, {over} over shared memory")
    return 1 if failed or spilling or over else 0


if __name__ == "__main__":
    sys.exit(main())
