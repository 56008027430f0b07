"""Argument checks and backend names shared by every layer of the package (the bottom of its import graph).

The op registry (:mod:`ttkernels.ops`), the kernel backends (``ttkernels._cuda_backend``,
``ttkernels._triton_kernels.backend``), the TT-matrix package and the adapter layers all check with these, so
one argument gets one rule and one message everywhere. It imports nothing from ttkernels.

The loaders and the public entry points also find here bounded reads of adapter files, input checks that
name the argument, and an all-or-nothing guard for changes to a user's model.

**Files.** :func:`read_json` reads a config of at most :data:`MAX_CONFIG_BYTES` and turns every parse failure
(deep nesting included) into a ``ValueError`` naming the file. :func:`read_safetensors_header` reads a
safetensors header (at most :data:`MAX_HEADER_BYTES`) and checks every entry (dtype, shape, byte range
inside the file) before a single tensor is allocated, so a loader can compare the declared names, shapes and
dtypes against what the model needs and refuse a mismatch having read only the header.

**Sizes.** :func:`check_adapter_size` bounds what a constructor may allocate for an adapter: at most
``max(MIN_ADAPTER_LIMIT, ADAPTER_LIMIT_FACTOR x the dense delta-Ws it stands for)`` parameters, so a
``num_tasks=10**12`` or a bond rank of ``10**9`` is refused before the allocator sees it.

**Rollback.** :class:`ModelSnapshot` records the module tree of a model (every module's registered children,
Parameters, buffers and hooks, its other attributes, and every Parameter's ``requires_grad``); ``restore()``
puts all of it back, so an operation that fails half-way leaves the model as it was.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import struct
from typing import Any, Optional

import torch
from torch import Tensor, nn

__all__ = [
    "BACKENDS",
    "KERNEL_DTYPES",
    "BackendUnavailableError",
    "check_alpha",
    "check_backend_name",
    "check_dropout",
    "check_kernel_limits",
    "ADAPTER_LIMIT_FACTOR",
    "MAX_CONFIG_BYTES",
    "MAX_HEADER_BYTES",
    "MIN_ADAPTER_LIMIT",
    "ModelSnapshot",
    "TensorInfo",
    "check_adapter_size",
    "check_device",
    "check_finite_number",
    "check_float_dtype",
    "check_path",
    "check_seed",
    "check_task_ids_range",
    "device_seed",
    "read_json",
    "read_safetensors_header",
]

BACKENDS = ("auto", "torch", "triton", "cuda")

# What the Triton and CUDA kernels compute in (fp32 accumulation); float64 runs on the torch backend.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (not built, not implemented, or no suitable device)."""


def check_kernel_limits(backend: str, dtype: torch.dtype, max_rank: int, **ranks: int) -> None:
    """What a kernel backend (``triton``, ``cuda``) cannot compute, refused with a pointer to ``torch``."""
    if dtype not in KERNEL_DTYPES:
        raise TypeError(
            f"backend={backend!r} computes in float32, bfloat16 or float16, not {dtype}; use backend='torch' for it"
        )
    for name, r in ranks.items():
        if r > max_rank:
            raise ValueError(
                f"backend={backend!r} supports ranks up to {max_rank}, but {name} = {r}; use backend='torch'"
            )


def check_dropout(dropout: object) -> float:
    if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a float in [0, 1), got {dropout!r}")
    return float(dropout)


def check_backend_name(backend: object) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend  # type: ignore[return-value]


def check_alpha(alpha: object, name: str = "alpha") -> float | None:
    """The adapter's scale numerator: None, or a finite number >= 0 (bool, NaN, inf, negative refused)."""
    if alpha is None:
        return None
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"{name} must be a finite number >= 0 or None, got {alpha!r}")
    return float(alpha)


MAX_CONFIG_BYTES = 16 * 2**20
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit
MIN_ADAPTER_LIMIT = 2**24
ADAPTER_LIMIT_FACTOR = 4

# safetensors dtype names -> (torch dtype name, bytes per element)
_ST_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
}
FLOAT_DTYPE_NAMES = ("float64", "float32", "float16", "bfloat16")


# ------------------------------------------------------------------------------------------------ files
def _loads(text: str | bytes, where: str) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply to be an adapter config") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} is not a readable JSON file: {e}") from e


def read_json(file: str | os.PathLike, what: str = "config") -> dict:
    """The JSON object in ``file`` (at most :data:`MAX_CONFIG_BYTES`); ValueError for anything else."""
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no {what} file {file}")
    size = os.path.getsize(file)
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{file} has {size} bytes; a {what} file has at most {MAX_CONFIG_BYTES}")
    try:
        with open(file, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ValueError(f"{file} cannot be read: {e}") from e
    data = _loads(raw, file)
    if not isinstance(data, dict):
        raise ValueError(f"{file} must hold a JSON object, got {type(data).__name__}")
    return data


class TensorInfo(tuple):
    """``(dtype, shape, nbytes)`` of one tensor of a safetensors file; ``dtype`` is torch's name."""

    __slots__ = ()

    def __new__(cls, dtype: str, shape: tuple[int, ...], nbytes: int) -> TensorInfo:
        return super().__new__(cls, (dtype, shape, nbytes))

    @property
    def dtype(self) -> str:
        return self[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self[1]


def read_safetensors_header(file: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor a safetensors file declares, checked against the file's length, without reading data.

    ValueError (naming the file and the tensor) for a short file, a header longer than
    :data:`MAX_HEADER_BYTES` or than the file, malformed JSON, an unknown dtype, a shape of negative or
    non-integer sizes, or a byte range that does not match the shape or lies outside the data.
    """
    file = os.fspath(file)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no safetensors file {file}")
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{file} is not a valid safetensors file: {size} bytes, shorter than its header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            raise ValueError(
                f"{file} is not a valid safetensors file: its header claims {n} bytes (the file has {size}, "
                f"the limit is {MAX_HEADER_BYTES})"
            )
        raw = f.read(n)
    header = _loads(raw, f"the safetensors header of {file}")
    if not isinstance(header, dict):
        raise ValueError(f"the safetensors header of {file} is not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ValueError(f"the safetensors header of {file} has a malformed __metadata__")
            continue
        bad = f"{file}: tensor {name!r} has a malformed header entry"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ValueError(f"{bad} {entry!r}"[:300])
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _ST_DTYPES:
            raise ValueError(f"{bad}: unknown dtype {dtype!r}"[:300])
        if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 8:
            raise ValueError(f"{bad}: shape {shape!r}"[:300])
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int and o >= 0 for o in offsets)):
            raise ValueError(f"{bad}: data_offsets {offsets!r}"[:300])
        torch_dtype, itemsize = _ST_DTYPES[dtype]
        nbytes = math.prod(shape) * itemsize
        begin, end = offsets
        if end - begin != nbytes or end > data_bytes:
            raise ValueError(
                f"{file}: tensor {name!r} declares shape {shape} of {dtype} ({nbytes} bytes) at bytes "
                f"[{begin}, {end}) of {data_bytes}: the file does not hold it"
            )
        out[name] = TensorInfo(torch_dtype, tuple(shape), nbytes)
    return out


def load_safetensors(file: str | os.PathLike) -> dict[str, Tensor]:
    """The tensors of ``file`` (its header is checked first by :func:`read_safetensors_header`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    read_safetensors_header(file)
    try:
        return load_file(os.fspath(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{os.fspath(file)} is not a valid safetensors file: {e}") from e


# ------------------------------------------------------------------------------------------------ inputs
def check_finite_number(value: object, name: str) -> float:
    """``value`` as a float; TypeError for a non-number (a tensor included), ValueError for NaN or inf."""
    if torch.compiler.is_compiling():  # a traced number may be symbolic: checked by the eager call only
        return value  # type: ignore[return-value]
    if type(value) not in (float, int) and (isinstance(value, (bool, Tensor)) or not isinstance(value, numbers.Real)):
        raise TypeError(f"{name} must be a real number (not a tensor), got {type(value).__name__} ({value!r})"[:200])
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def check_task_ids_range(task_ids: Tensor, num_tasks: int) -> None:
    """``0 <= task_ids < num_tasks``, checked where the ids are, without a host read on an accelerator.

    On the CPU a bad id raises IndexError naming the range and the values found. On a GPU the check is
    ``torch._assert_async``: queued with the kernels, it never stops the host (so forward and backward stay free
    of synchronization and can be captured in a CUDA graph), and a bad id fails as a device-side assert at the
    next synchronization, as torch's own indexing does, instead of reading out of bounds.
    """
    if task_ids.numel() == 0:
        return
    ok = ((task_ids >= 0) & (task_ids < num_tasks)).all()
    if task_ids.device.type != "cpu":
        torch._assert_async(ok)
        return
    try:
        torch._assert_async(ok, "task_ids out of range")
    except RuntimeError:
        # the error path: reading the values here costs nothing that matters
        lo, hi = int(task_ids.min()), int(task_ids.max())
        raise IndexError(f"task_ids must lie in [0, {num_tasks}), got values from {lo} to {hi}") from None


def check_seed(seed: object, name: str = "seed") -> None:
    """None, an int, or an integer tensor of one element; TypeError for anything else (a str, a float)."""
    if seed is None or torch.compiler.is_compiling():
        return
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(
                f"{name} must be an int or a one-element integer tensor, got {seed.dtype} {tuple(seed.shape)}"
            )
        return
    if type(seed) is int:
        return
    try:
        if isinstance(seed, bool):
            raise TypeError
        operator.index(seed)  # numpy integers too
    except TypeError:
        raise TypeError(f"{name} must be an int or None, got {type(seed).__name__} ({seed!r})"[:200]) from None


def device_seed(seed: int | Tensor, device: torch.device | str, name: str = "seed") -> Tensor:
    """The dropout seed as the Triton and CUDA kernels take it: a one-element int64 tensor on ``device``, which
    the kernels read on the device (so the host never waits for it, and a captured CUDA graph hashes its value
    at each replay).

    A tensor is used where it lies: it must be a one-element integer tensor on ``device`` (another integer dtype
    is cast on the device). Its 64 bits are hashed as uint64: a negative value gives the mask of
    ``value + 2**64``, as ``reference.dropout_keep`` does for a seed tensor; the kernels cannot raise, and
    ``ttkernels.tt_adapter`` checks a caller's seed tensor with ``torch._assert_async``. An int is checked on the
    host (``[0, 2**63)``, ValueError) and written on ``device`` by a fill kernel that takes the value as its
    argument: ``torch.tensor(value, device=...)`` would copy it from pageable host memory, which makes the host
    wait for the stream on a GPU (and cannot be captured in a CUDA graph).
    """
    device = torch.device(device)
    if isinstance(seed, Tensor):
        if seed.numel() != 1 or seed.dtype.is_floating_point or seed.dtype.is_complex or seed.dtype == torch.bool:
            raise TypeError(f"{name} must be a one-element integer tensor, got {seed.dtype} {tuple(seed.shape)}")
        if seed.device != device:
            raise ValueError(f"{name} is on {seed.device} but the data is on {device}")
        return seed if seed.dtype == torch.int64 else seed.to(torch.int64)
    check_seed(seed, name)
    value = operator.index(seed)
    if not 0 <= value < 2**63:
        raise ValueError(f"{name} must be in [0, 2**63), got {value}")
    return torch.full((), value, dtype=torch.int64, device=device)


def check_float_dtype(dtype: object, name: str, *, allow_none: bool = True) -> Optional[torch.dtype]:
    """A real floating-point ``torch.dtype`` (or None when allowed); TypeError naming ``name`` otherwise."""
    if dtype is None and allow_none:
        return None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a floating-point torch.dtype (float32, float64, float16, bfloat16)"
            f"{' or None' if allow_none else ''}, got {dtype!r}"
        )
    return dtype


def check_device(device: object, name: str = "device") -> None:
    """None, a ``torch.device``, a device string or an index that torch understands; ValueError otherwise."""
    if device is None or isinstance(device, torch.device):
        return
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{name} must be a torch.device, a device string or None, got {type(device).__name__}")
    try:
        torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ValueError(f"{name} = {device!r} is not a device torch knows: {str(e)[:120]}") from None


def check_path(path: object, name: str) -> str:
    """``path`` as a str (str or os.PathLike); TypeError naming ``name`` otherwise."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike folder, got {type(path).__name__}")
    return os.fspath(path)


def check_adapter_size(num_params: int, dense: int, what: str) -> None:
    """Refuse an adapter of more than ``max(MIN_ADAPTER_LIMIT, ADAPTER_LIMIT_FACTOR * dense)`` parameters,
    ``dense`` being the entries of the dense delta-Ws it stands for."""
    limit = max(MIN_ADAPTER_LIMIT, ADAPTER_LIMIT_FACTOR * dense)
    if num_params > limit:
        raise ValueError(
            f"{what} would have {num_params:,} parameters, more than {limit:,} (max({MIN_ADAPTER_LIMIT:,}, "
            f"{ADAPTER_LIMIT_FACTOR} x the {dense:,} entries of its dense delta-W)): lower the ranks or mode sizes"
        )


# ------------------------------------------------------------------------------------------------ rollback
class ModelSnapshot:
    """What an adapter constructor or loader may change in ``model``, recorded so that ``restore()`` can put it
    back: the module tree (children, Parameters, buffers, hooks and other attributes of every module) and
    every Parameter's ``requires_grad``. Tensor values are not recorded (constructors and loaders write only
    the tensors they create)."""

    def __init__(self, model: nn.Module) -> None:
        self.modules: list[tuple[nn.Module, dict, dict]] = []
        for module in model.modules():
            attrs = dict(module.__dict__)
            dicts = {k: dict(v) for k, v in attrs.items() if isinstance(v, dict)}  # hooks are OrderedDicts
            self.modules.append((module, attrs, dicts))
        self.grads = [(p, p.requires_grad) for p in model.parameters()]

    def restore(self) -> None:
        for module, attrs, dicts in self.modules:
            for key in [k for k in module.__dict__ if k not in attrs]:
                del module.__dict__[key]
            for key, value in attrs.items():
                if key in dicts:
                    value.clear()
                    value.update(dicts[key])
                module.__dict__[key] = value
        for p, flag in self.grads:
            p.requires_grad_(flag)
