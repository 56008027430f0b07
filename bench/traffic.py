"""A traffic model of the Triton backend's plans: bytes and FLOPs per launch, and a roofline-predicted time.

    python -m bench.traffic                                   # the target shape, both plans, H100 SXM and H200
    python -m bench.traffic --M 1 16 256 8192 --shape 4096x11008 --rank 16 --format metatt

**Predicted, not measured.** Nothing here runs a kernel. Each plan's forward + backward is run on ``meta``
tensors with every launch recorded instead of executed (the Triton launches through ``_common.run``, torch's
GEMMs and fills through a dispatch mode), each launch with the tiling used without autotuning
(``Tuned.gpu_meta``) and the device's SM count. Per launch the model counts the bytes it must read and write in
DRAM (each operand once; token-independent operands once per launch, as L2 holds them; float32 atomics as 4
bytes each) and its FLOPs, and predicts ``max(bytes / bandwidth, FLOPs / peak)``: a roofline with no launch
latency, no overlap between launches and every kernel at the device's peak. The frozen layer is the same model
of ``nn.Linear``'s forward (``addmm``) and backward with a frozen weight (``mm`` for dx).

Its use is to compare plans and to find where bytes go, not to promise a speed: a GPU run of
``python -m bench --preset layer`` (``bench/gpu.sh``) measures what it predicts.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ttkernels import checks


@dataclass(frozen=True)
class GPU:
    name: str
    bandwidth: float  # bytes/s, DRAM
    flops: float  # dense 16-bit tensor-core FLOP/s
    sms: int


GPUS = {
    "H100-SXM": GPU("H100 SXM", 3.35e12, 989e12, 132),
    "H200": GPU("H200", 4.8e12, 989e12, 132),
}

TARGET = dict(M=8192, d_in=4096, d_out=4096, rank=16, dtype=torch.bfloat16)


@dataclass
class Launch:
    """One recorded launch: what it reads and writes in DRAM, its FLOPs, its float32 atomics."""

    name: str
    read: int
    written: int
    flops: int
    atomics: int = 0
    small: bool = False

    @property
    def bytes(self) -> int:
        return self.read + self.written + 4 * self.atomics

    def seconds(self, gpu: GPU) -> float:
        return max(self.bytes / gpu.bandwidth, self.flops / gpu.flops)


def _cdiv(n: int, d: int) -> int:
    return -(-n // d)


def _nbytes(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None or not isinstance(t, torch.Tensor) else t.numel() * t.element_size()


# ------------------------------------------------------------------------------------- per-kernel costs
def _triton_cost(name: str, a: dict[str, Any]) -> Launch:
    es = a["X"].element_size() if "X" in a else a.get("DY", a.get("WS")).element_size()
    if name == "_rows_fwd_kernel":
        M, K, N, RA, RB = a["M"], a["K"], a["N"], a["RA"], a["RB"]
        read = M * K * es + _nbytes(a["A"]) + _nbytes(a["B"]) + (_nbytes(a["C"]) if a["HAS_C"] else 0)
        read += N * es if a["HAS_BIAS"] else 0
        return Launch(name, read, (M * RA + M * N) * es, 2 * M * (K * RA + RA * RB * a["HAS_C"] + RB * N))
    if name == "_rows_bwd_kernel":
        M, K, N, RA, RB = a["M"], a["K"], a["N"], a["RA"], a["RB"]
        read = (M * N + M * K + M * RA) * es + _nbytes(a["A"]) + _nbytes(a["B"])
        read += _nbytes(a["C"]) if a["HAS_C"] else 0
        written = M * K * es if a["NEED_DX"] else 0
        blocks = _cdiv(M, a["BLOCK_M"])
        flops = 2 * M * (2 * N * RB + 2 * K * RA + (3 * RA * RB if a["HAS_C"] else 0))
        if a["DETERMINISTIC"]:
            return Launch(name, read, written + blocks * a["TOTAL"] * 4, flops)
        return Launch(name, read, written, flops, atomics=blocks * a["TOTAL"])
    if name == "_finalize_kernel":
        total, blocks = a["TOTAL"], a["BLOCKS"]
        return Launch(name, blocks * total * 4, total * a["DA"].element_size(), blocks * total, small=True)
    if name == "_shrink_kernel":
        M, K, RA, RB = a["M"], a["K"], a["RA"], a["RB"]
        read = M * K * es + _nbytes(a["A"]) + (_nbytes(a["C"]) if a["HAS_C"] else 0)
        written = M * RA * es + (M * RB * es if a["HAS_C"] else 0)
        return Launch(name, read, written, 2 * M * (K * RA + RA * RB * a["HAS_C"]))
    if name == "_shrink_partial_kernel":  # decode split-K of drop(x) A
        M, K, RA = a["M"], a["K"], a["RA"]
        return Launch(name, M * K * es + _nbytes(a["A"]), _nbytes(a["P"]), 2 * M * K * RA)
    if name == "_gemm_lowrank_kernel":
        M, N, K, RK = a["M"], a["N"], a["K"], a["RK"]
        read = M * RK * es + RK * N * es + (N * es if a["HAS_BIAS"] else 0)
        if a["BASE"]:
            read += M * K * es + K * N * es
        written = a["_split"] * M * N * 4 if a["SPLIT_K"] else M * N * es  # decode: float32 partials per K range
        return Launch(name, read, written, 2 * M * N * (K + RK))
    if name == "_split_sum_kernel":
        M, N = a["M"], a["N"]
        return Launch(name, a["SPLIT"] * M * N * 4, M * N * a["OUT"].element_size(), a["SPLIT"] * M * N, small=True)
    if name == "_gemm_grad_kernel":  # the fused plan's backward GEMM: dx, and dA, dB from the tiles it loads
        M, N, K, RA, RB, need_dx = a["M"], a["N"], a["K"], a["RA"], a["RB"], a["NEED_DX"]
        read = (M * K + M * N + M * RA + M * RB) * es  # dY, x, dS, U
        read += (K * N + N * RA) * es if need_dx else 0  # W, A
        written = M * N * es if need_dx else 0
        flops = 2 * M * N * RA + 2 * M * K * RB + (2 * M * N * (K + RA) if need_dx else 0)
        partials = _cdiv(M, a["BLOCK_M"]) * a["TOTAL"]  # one per element of dA and dB per m-tile
        if a["DETERMINISTIC"]:
            return Launch(name, read, written + 4 * partials, flops)
        return Launch(name, read, written, flops, atomics=partials)
    if name == "_grad_dy_kernel" and not a["HAS_DB"]:  # dU only
        M, N, RB = a["M"], a["N"], a["RB"]
        return Launch(name, M * N * es + _nbytes(a["B"]), M * RB * es, 2 * M * N * RB)
    if name == "_grad_dy_kernel":
        M, N, RB = a["M"], a["N"], a["RB"]
        read = (M * N + M * RB) * es + _nbytes(a["B"])
        blocks = _cdiv(M, a["BLOCK_M"])
        det = a["DETERMINISTIC"]
        return Launch(
            name, read, M * RB * es + (blocks * RB * N * 4 if det else 0), 4 * M * N * RB, 0 if det else blocks * RB * N
        )
    if name == "_grad_a_kernel":
        M, K, RA = a["M"], a["K"], a["RA"]
        return Launch(name, (M * K + M * RA) * es, 0, 2 * M * K * RA, atomics=K * RA * a.get("_split", 1))
    # the per-task products and reductions, the factor sides: small, rank-sized
    sizes = sum(_nbytes(v) for v in a.values() if isinstance(v, torch.Tensor))
    return Launch(name, sizes, 0, 0, small=True)


def _torch_cost(name: str, args: tuple, out: Any) -> Optional[Launch]:
    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    if name in ("addmm", "addmm_", "mm"):
        m1, m2 = tensors[-2], tensors[-1]
        M, K = m1.shape
        N = m2.shape[1]
        c = tensors[0] if name != "mm" else None
        read = _nbytes(m1) + _nbytes(m2) + (_nbytes(c) if c is not None else 0)
        return Launch(name, read, M * N * m1.element_size(), 2 * M * N * K)
    if name in ("zeros", "zero_", "fill_", "new_zeros"):
        t = out if isinstance(out, torch.Tensor) else tensors[0]
        return Launch(name, 0, _nbytes(t), 0, small=True)
    if name in ("empty", "empty_strided", "view", "t", "transpose", "detach", "alias", "_unsafe_view", "expand"):
        return None
    read = sum(_nbytes(t) for t in tensors)
    written = sum(_nbytes(t) for t in (out if isinstance(out, (tuple, list)) else [out]) if isinstance(t, torch.Tensor))
    return Launch(name, read, written, 0, small=read + written < 1 << 24)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.launches: list[Launch] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        cost = _torch_cost(func.overloadpacket.__name__, args, out)
        if cost is not None:
            self.launches.append(cost)
        return out

    def run(self, kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
        fn = kernel.fn if hasattr(kernel, "fn") else kernel
        while hasattr(fn, "fn"):
            fn = fn.fn
        bound = inspect.signature(fn).bind(*args, **{k: v for k, v in kwargs.items() if not k.startswith("num_")})
        a = dict(bound.arguments)
        if fn.__name__ == "_grad_a_kernel":
            a["_split"] = grid[1] if isinstance(grid, tuple) else grid(kwargs)[1]
        if fn.__name__ == "_gemm_lowrank_kernel" and a["SPLIT_K"]:
            a["_split"] = grid[1]
        self.launches.append(_triton_cost(fn.__name__, a))


@contextmanager
def _recording(gpu: GPU) -> Iterator[_Recorder]:
    from ttkernels._triton_kernels import _common, gemm, grad_a, rows

    rec = _Recorder()
    saved = (_common.run, _common.Tuned.meta_for, rows.num_sms, grad_a.num_sms, gemm.num_sms)
    _common.run = rec.run
    _common.Tuned.meta_for = lambda self, device: dict(self.gpu_meta)  # the tiling used without autotuning
    rows.num_sms = grad_a.num_sms = gemm.num_sms = lambda device: gpu.sms
    try:
        with rec:
            yield rec
    finally:
        _common.run, _common.Tuned.meta_for, rows.num_sms, grad_a.num_sms, gemm.num_sms = saved


def _operands(M: int, d_in: int, d_out: int, r: int, dtype: torch.dtype, fmt: str, tasks: int = 3) -> dict:
    meta = torch.device("meta")

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, device=meta)

    C = None if fmt == "lora" else t(r, r) if fmt == "metatt" else t(tasks, r, r)
    ids = t(M, dt=torch.int64) if fmt == "tasks" else None
    return dict(x=t(M, d_in), W=t(d_out, d_in), b=t(d_out), A=t(d_in, r), C=C, B=t(r, d_out), ids=ids, dy=t(M, d_out))


def record(
    plan: str, M: int, d_in: int, d_out: int, rank: int, dtype: torch.dtype, *, fmt: str = "lora",
    dropout: float = 0.0, gpu: GPU = GPUS["H100-SXM"], deterministic: bool = False,
) -> list[Launch]:  # fmt: skip
    """The launches of one forward + backward of the adapted layer under ``plan`` (``fused``, ``cublas``,
    or ``frozen``: the frozen ``nn.Linear``)."""
    o = _operands(M, d_in, d_out, rank, dtype, fmt)
    if plan == "frozen":
        with _recording(gpu) as rec:
            torch.addmm(o["b"], o["x"], o["W"].t())
            torch.mm(o["dy"], o["W"])
        return rec.launches
    from ttkernels._triton_kernels import _common, backend

    saved, saved_det = backend.BASE_GEMM, _common.deterministic
    backend.BASE_GEMM = plan
    _common.deterministic = lambda: deterministic
    import ttkernels._triton_kernels.gemm_grad as gemm_grad
    import ttkernels._triton_kernels.grad_a as grad_a
    import ttkernels._triton_kernels.grad_dy as grad_dy
    import ttkernels._triton_kernels.grad_mid as grad_mid
    import ttkernels._triton_kernels.rows as rows

    steps = (gemm_grad, grad_a, grad_dy, grad_mid, rows)
    saved_steps = [m.deterministic for m in steps]
    for m in steps:
        m.deterministic = lambda: deterministic
    # the seed as ttkernels.ops hands it to a backend: a tensor already on the data's device (drawn there)
    seed = checks.device_seed(7, o["x"].device)
    try:
        with _recording(gpu) as rec:
            args = (o["x"], o["W"], o["b"], o["A"], o["C"], o["B"], o["ids"], 2.0, dropout, seed)
            _, S = backend.forward(*args)
            backend.backward(o["dy"], o["x"], o["W"], o["A"], o["C"], o["B"], S, o["ids"], 2.0, dropout, seed, True)
    finally:
        backend.BASE_GEMM, _common.deterministic = saved, saved_det
        for m, d in zip(steps, saved_steps):
            m.deterministic = d
    return rec.launches


def predicted_seconds(launches: list[Launch], gpu: GPU) -> float:
    return sum(launch.seconds(gpu) for launch in launches)


def predicted_ratio(plan: str, gpu: GPU, **shape: Any) -> float:
    """Predicted forward + backward time of ``plan`` over the frozen layer's (roofline; not measured)."""
    shape = {**TARGET, **shape}
    frozen = record("frozen", shape["M"], shape["d_in"], shape["d_out"], shape["rank"], shape["dtype"], gpu=gpu)
    mine = record(plan, shape["M"], shape["d_in"], shape["d_out"], shape["rank"], shape["dtype"], gpu=gpu,
                  fmt=shape.get("fmt", "lora"), dropout=shape.get("dropout", 0.0))  # fmt: skip
    return predicted_seconds(mine, gpu) / predicted_seconds(frozen, gpu)


def report(M: int, d_in: int, d_out: int, rank: int, dtype: torch.dtype, fmt: str, dropout: float) -> str:
    lines = [
        f"Traffic model, PREDICTED (roofline), not measured: M={M}, {d_in}x{d_out}, r={rank}, {fmt}, "
        f"{str(dtype).replace('torch.', '')}, dropout={dropout}, forward + backward"
    ]
    gpus = list(GPUS.values())
    for plan in ("frozen", "cublas", "fused"):
        launches = record(plan, M, d_in, d_out, rank, dtype, fmt=fmt, dropout=dropout)
        large = sum(not launch.small for launch in launches)
        lines.append(f"\n{plan}: {large} large + {len(launches) - large} small launches")
        lines.append(f"  {'launch':<24}{'read MB':>10}{'written MB':>12}{'atomics':>10}{'GFLOP':>10}" + "".join(
            f"{g.name + ' us':>14}" for g in gpus))  # fmt: skip
        for launch in launches:
            lines.append(
                f"  {launch.name:<24}{launch.read / 1e6:>10.2f}{launch.written / 1e6:>12.2f}{launch.atomics:>10}"
                f"{launch.flops / 1e9:>10.2f}" + "".join(f"{launch.seconds(g) * 1e6:>14.2f}" for g in gpus)
            )
        total = "".join(f"{predicted_seconds(launches, g) * 1e6:>14.2f}" for g in gpus)
        lines.append(f"  {'total':<66}{total}")
    lines.append("")
    for g in gpus:
        frozen = predicted_seconds(record("frozen", M, d_in, d_out, rank, dtype, gpu=g), g)
        ratios = []
        for plan in ("cublas", "fused"):
            t = predicted_seconds(record(plan, M, d_in, d_out, rank, dtype, fmt=fmt, dropout=dropout, gpu=g), g)
            ratios.append(f"{plan} {t / frozen:.3f}x")
        lines.append(f"predicted ratio to frozen on {g.name} ({g.bandwidth / 1e12:.2f} TB/s, "
                     f"{g.flops / 1e12:.0f} TFLOP/s): " + ", ".join(ratios))  # fmt: skip
    return "\n".join(lines)


def _shape(text: str) -> tuple[int, int]:
    a, b = text.lower().split("x")
    return int(a), int(b)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.traffic", description=__doc__.splitlines()[0])
    ap.add_argument("--M", nargs="+", type=int, default=[TARGET["M"]])
    ap.add_argument("--shape", type=_shape, default=(TARGET["d_in"], TARGET["d_out"]))
    ap.add_argument("--rank", type=int, default=TARGET["rank"])
    ap.add_argument("--format", choices=("lora", "metatt", "tasks"), default="lora")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--dropout", type=float, default=0.0)
    ns = ap.parse_args(argv)
    for M in ns.M:
        print(report(M, *ns.shape, ns.rank, getattr(torch, ns.dtype), ns.format, ns.dropout))
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
