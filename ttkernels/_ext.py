"""Lazy loader of the CUDA extension ``ttkernels._C`` (csrc/, built by setup.py or CMakeLists.txt).

The extension is a plain shared library with no Python module init: loading it with
``torch.ops.load_library`` runs its ``TORCH_LIBRARY(ttkernels_cuda, ...)`` registration, after which its ops
are ``torch.ops.ttkernels_cuda.*``. Importing this module never fails and never loads the library (the
pure-Python package must work where the extension was not built); the first call that needs an op loads it.
"""

from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import os
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import Tensor

__all__ = [
    "CUDAExtensionNotBuiltError",
    "cuda_extension_path",
    "load_cuda_extension",
    "cuda_extension_available",
    "cuda_dropout",
]

BUILD_COMMAND = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ."
_BUILD_HINT = (
    f"Build it from the repository root with:\n    {BUILD_COMMAND}\n"
    "(needs nvcc, i.e. the CUDA toolkit, and a CUDA build of torch; set CUDA_HOME to the toolkit's folder). "
    "Alternatively build it with CMake (see CMakeLists.txt) and copy _C.so into the ttkernels package folder."
)

_lock = threading.Lock()
_loaded_path: str | None = None


class CUDAExtensionNotBuiltError(RuntimeError):
    """The CUDA extension ttkernels._C is missing or cannot be loaded; the message says how to build it."""


def cuda_extension_path() -> str | None:
    """Path of the built extension (``ttkernels/_C*.so``), or None when there is none."""
    try:
        spec = importlib.util.find_spec("ttkernels._C")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin and os.path.isfile(spec.origin):
        return spec.origin
    # find_spec only sees files whose suffix matches this interpreter (e.g. .cpython-312-x86_64-linux-gnu.so);
    # the library needs no Python ABI, so also accept _C.so (CMake) or another interpreter's suffix.
    here = os.path.dirname(os.path.abspath(__file__))
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    candidates = [os.path.join(here, "_C" + s) for s in suffixes] + sorted(glob.glob(os.path.join(here, "_C*.so")))
    for path in candidates:
        if os.path.isfile(path):
            return path
    return None


def load_cuda_extension() -> str:
    """Load the extension once (later calls return at once); returns the path it was loaded from.

    Raises CUDAExtensionNotBuiltError when the library is missing or fails to load (e.g. built against
    another torch version).
    """
    global _loaded_path
    if _loaded_path is not None:
        return _loaded_path
    with _lock:
        if _loaded_path is not None:
            return _loaded_path
        path = cuda_extension_path()
        if path is None:
            raise CUDAExtensionNotBuiltError(
                "The CUDA extension ttkernels._C is not built (no ttkernels/_C*.so next to the package). " + _BUILD_HINT
            )
        import torch

        try:
            torch.ops.load_library(path)
        except OSError as e:
            raise CUDAExtensionNotBuiltError(
                f"The CUDA extension {path} exists but failed to load ({e}); it was probably built against "
                f"another torch or CUDA version. Rebuild it. " + _BUILD_HINT
            ) from e
        _loaded_path = path
        return path


def cuda_extension_available() -> bool:
    """True when the extension loads (it may still have no GPU to run on: see torch.cuda.is_available())."""
    try:
        load_cuda_extension()
    except CUDAExtensionNotBuiltError:
        return False
    return True


def cuda_dropout(x: Tensor, seed: int | Tensor, p: float) -> Tensor:
    """``drop(x)`` by the CUDA kernel: x (rows, cols) contiguous CUDA fp32/fp16/bf16, 0 <= p < 1; seed an int in
    ``[0, 2**63)`` or a one-element integer tensor on x's GPU (read there by the kernel, never on the host).

    Same hash, mask and fp32 scale as the pure-torch reference (csrc/dropout_hash.cuh); a dropped element is
    +0. Returns a new tensor in x's dtype. No autograd (the caller's autograd.Function owns the backward).
    """
    load_cuda_extension()
    import torch

    from .checks import device_seed

    return torch.ops.ttkernels_cuda.dropout(x, device_seed(seed, x.device), float(p))
