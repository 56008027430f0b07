"""Pieces shared by every Triton kernel of ttkernels: the dropout hash, launch configuration, allocation.

**Dropout hash.** :func:`mix32` and :func:`keep_mask` are the Triton form of
``ttkernels.reference.dropout_keep``: ``u = mix32(mix32(seed_lo ^ mix32(row ^ mix32(seed_hi))) ^ col)`` on
uint32, an element kept when ``u >= floor(p * 2^32)``. The seed reaches a kernel as a pointer ``SEED`` to one
int64 on the data's device (:func:`dropout_args`), loaded by the kernel (``tl.load(SEED)``) and split into its
two words there: the host never reads it, so a captured CUDA graph hashes the seed's value at each replay. The
tests compare the mask bit for bit with the reference.

**Configurations.** Every kernel has one small configuration for the interpreter (``TRITON_INTERPRET=1``:
the CPU checks of CI) and, on a GPU, a list that ``triton.autotune`` searches, keyed by the problem's shape
(token counts bucketed to powers of two so a new batch size does not retune). Lists for Hopper
(compute capability 9.x) add the larger tiles that its tensor cores and shared memory favour.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from ttkernels.checks import device_seed

# Ranks above this are refused: the rank tiles live in registers.
MAX_RANK = 128
# The smallest tile side tl.dot accepts on a GPU.
MIN_DOT = 16


@triton.jit
def mix32(h):
    """A xorshift-multiply finalizer on uint32 (wraps mod 2^32)."""
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def keep_mask(rows, cols, seed, threshold):
    """Keep-mask of the ``(rows, cols)`` tile: True where the element survives dropout.

    ``seed`` is the int64 the kernel loaded from ``SEED`` (its 64 bits taken as uint64: the low word, and the
    high word mixed); ``threshold`` is a uint32 passed as int32 (:func:`dropout_args`). Neither ``SEED`` nor
    ``threshold`` is ever specialized (every kernel lists them in :data:`DROPOUT_ARGS`).
    """
    r = rows.to(tl.uint32)
    bits = seed.to(tl.uint64, bitcast=True)
    lo = (bits & 0xFFFFFFFF).to(tl.uint32)
    hi = mix32((bits >> 32).to(tl.uint32))
    row_hash = mix32(lo ^ mix32(r ^ hi))
    u = mix32(row_hash[:, None] ^ cols.to(tl.uint32)[None, :])
    return u >= threshold.to(tl.uint32, bitcast=True)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(pid_m, pid_n)`` of program ``pid`` over an ``(M, N)`` output in ``BLOCK_M x BLOCK_N`` tiles, program ids
    grouped ``GROUP_M`` row tiles at a time so that neighbouring programs share the other operand's tiles in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_m, (pid % per_group) // group_m


@triton.jit
def gathered_matmul(v, ii, n, rows_base, stride_i, jj, stride_j, mask):
    """``out[m, j] = sum_{i < n} v[m, i] * M_m[i, j]`` where row m's matrix starts at ``rows_base[m]``.

    ``v``: ``(BLOCK, len(ii))``; ``rows_base``: ``(BLOCK, 1)`` pointers; ``mask``: ``(BLOCK, len(jj))``.
    One rank column of v at a time against each row's gathered matrix row: ranks are small, and every row
    may select a different matrix (a task's C, a core's slice), so this runs on CUDA cores, in fp32.
    """
    out = tl.zeros((v.shape[0], jj.shape[0]), tl.float32)
    for i in range(0, n):
        v_i = tl.sum(tl.where(ii[None, :] == i, v, 0.0), axis=1)
        m = tl.load(rows_base + i * stride_i + jj[None, :] * stride_j, mask=mask, other=0.0)
        out += v_i[:, None] * m.to(tl.float32)
    return out


# Dropout arguments of every kernel that takes them: never specialized. Triton would otherwise compile a variant
# per threshold that is 1 (a constexpr), divisible by 16, or not, and per alignment of the seed's address.
DROPOUT_ARGS = ["SEED", "threshold"]


@triton.jit(do_not_specialize=DROPOUT_ARGS)
def _keep_mask_kernel(OUT, M, N, row_offset, SEED, threshold, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = keep_mask(rm + row_offset, rn, tl.load(SEED), threshold)
    tl.store(OUT + rm[:, None] * N + rn[None, :], keep.to(tl.int8), mask=(rm < M)[:, None] & (rn < N)[None, :])


def _as_i32(u: int) -> int:
    """A uint32 value as the int32 of the same bits (so Triton always types it i32, never i64)."""
    return u - (1 << 32) if u >= 1 << 31 else u


def seed_tensor(seed: int | torch.Tensor, device: torch.device) -> torch.Tensor:
    """The seed as the kernels take it: one int64 on ``device`` (``ttkernels.checks.device_seed``: a tensor is
    used where it lies, never read on the host; its bits are hashed as uint64; an int is range-checked and
    written on ``device`` by a fill)."""
    return device_seed(seed, device)


def dropout_args(p: float, seed: int | torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """``(SEED, threshold, keep_scale)`` for the kernels on ``like``'s device.

    ``SEED``: the seed as :func:`seed_tensor` gives it; without dropout (``p == 0``) nothing reads it and it is
    ``like`` itself (no allocation). ``threshold`` is ``floor(p * 2^32)``, a uint32 carried in int32 (bit-cast
    back in :func:`keep_mask`).
    """
    if p == 0.0:
        return like, 0, 1.0
    return seed_tensor(seed, like.device), _as_i32(int(p * 4294967296.0)), 1.0 / (1.0 - p)


def keep_mask_tensor(
    seed: int | torch.Tensor, rows: int, cols: int, p: float, *, row_offset: int = 0, device="cpu"
) -> torch.Tensor:
    """The kernels' keep-mask as a bool tensor (for tests: it must equal ``reference.dropout_keep``)."""
    out = torch.empty((rows, cols), dtype=torch.int8, device=device)
    SEED, thr = seed_tensor(seed, out.device), dropout_args(p, seed, out)[1]
    if rows and cols:
        grid = (triton.cdiv(rows, 16), triton.cdiv(cols, 16))
        run(_keep_mask_kernel, grid, out, rows, cols, row_offset, SEED, thr, BLOCK_M=16, BLOCK_N=16)
    return out.bool()


# ------------------------------------------------------------------------------------------- launching
INTERPRET = type(mix32).__name__ == "InterpretedFunction"
# Rows per program of the small, untuned kernels (per-task products, factor sides).
ROW_BLOCK = 16 if INTERPRET else 64
# Autotune on GPUs (``TTKERNELS_TRITON_AUTOTUNE=0``: each kernel's one default configuration instead).
AUTOTUNE = os.environ.get("TTKERNELS_TRITON_AUTOTUNE", "1") != "0"


def next_pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(max(int(n), 1)))


def rank_block(r: int) -> int:
    """The padded tile side holding a rank of ``r`` (at least tl.dot's minimum)."""
    return next_pow2(r, MIN_DOT)


def m_bucket(M: int) -> int:
    """Token counts as an autotuning key: 16 and 64 below 64 (decode), powers of two up to 8192, then one."""
    if M <= 16:
        return 16
    if M <= 64:
        return 64
    return min(next_pow2(M), 8192)


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision for float32 inputs, following torch's matmul setting (as nn.Linear does)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        return "tf32"
    return "ieee"


def hopper(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(device).multi_processor_count


# Every launch goes through here: ``aot.py`` replaces it to record launches and compile them for a GPU.
def run(kernel: Any, grid: Any, *args: Any, **kwargs: Any) -> None:
    kernel[grid](*args, **kwargs)


def config(num_warps: int = 4, num_stages: int = 3, **meta: int) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


@dataclass
class Tuned:
    """A kernel with its interpreter configuration and its autotuned GPU form (built on first GPU use).

    ``gpu_meta`` is the GPU configuration used when autotuning is off (``TTKERNELS_TRITON_AUTOTUNE=0``: the
    GPU tests, whose many small shapes would each start a search) and where a caller needs a known tiling.

    ``configs(hopper: bool)`` gives the search space; ``key`` the arguments that key the tuning cache, to which
    every upper-case constexpr of the kernel that is not a tile parameter (``DROPOUT``, ``HAS_BIAS``,
    ``DETERMINISTIC``, ...) is added, so a flag never reuses another flag's tuning; ``reset_to_zero`` the
    outputs that autotuning must zero between trials (small atomic accumulators). No kernel updates a large
    output in place, so no trial ever copies one.
    """

    kernel: Any
    interpret_meta: dict[str, int]
    gpu_meta: dict[str, int]
    configs: Callable[[bool], list[triton.Config]]
    key: list[str]
    reset_to_zero: Optional[list[str]] = None
    _tuned: dict[bool, Any] = field(default_factory=dict)

    def meta_for(self, device: torch.device) -> Optional[dict[str, int]]:
        """Fixed meta-parameters when nothing is tuned (interpreter, or autotuning off); None when autotuned."""
        if INTERPRET or device.type != "cuda":
            return dict(self.interpret_meta)
        return None if AUTOTUNE else dict(self.gpu_meta)

    def fixed_meta(self, device: torch.device) -> dict[str, int]:
        """One known tiling (interpreter or ``gpu_meta``), for callers that size buffers by it."""
        return self.meta_for(device) or dict(self.gpu_meta)

    def launch(self, device: torch.device, grid: Callable[[dict], tuple], *args: Any, **kwargs: Any) -> None:
        meta = self.meta_for(device)
        if meta is not None:
            run(self.kernel, grid(meta), *args, **kwargs, **meta)
            return
        h = hopper(device)
        if h not in self._tuned:
            self._tuned[h] = triton.autotune(self.configs(h), key=self.full_key(h), reset_to_zero=self.reset_to_zero)(
                self.kernel
            )
        run(self._tuned[h], grid, *args, **kwargs)

    def full_key(self, hopper: bool) -> list[str]:
        """``key`` plus every flag constexpr of the kernel (upper-case names that no configuration sets)."""
        tiles = {name for cfg in self.configs(hopper) for name in cfg.kwargs}
        sig = inspect.signature(self.kernel.fn)
        constexprs = [n for n, p in sig.parameters.items() if "constexpr" in str(p.annotation)]
        flags = [n for n in constexprs if n not in tiles and n not in self.key]
        return list(self.key) + flags

    def launch_fixed(self, meta: dict[str, int], grid: tuple, *args: Any, **kwargs: Any) -> None:
        """Launch with given meta-parameters (when the caller must know the tiling, e.g. partial buffers)."""
        run(self.kernel, grid, *args, **kwargs, **meta)


# ------------------------------------------------------------------------------------------ allocation
# Tests set this to fill every kernel output with NaN before the kernels write it, so that an element a
# kernel forgets to write cannot pass for a right answer.
POISON = os.environ.get("TTKERNELS_POISON_OUTPUTS", "0") == "1"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def deterministic() -> bool:
    """Reductions over tokens use no atomics when torch's deterministic mode is on."""
    return torch.are_deterministic_algorithms_enabled()


def with_arg(args: tuple, i: int, value: object) -> tuple:
    """``args`` with its ``i``-th element replaced by ``value``."""
    return args[:i] + (value,) + args[i + 1 :]
