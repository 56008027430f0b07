"""Tests of the CUDA extension ttkernels._C (csrc/): loading, registration, argument checks, results.

Without a GPU, what runs is loading, op registration and the argument checks (the binding checks every argument
before it touches the GPU, and rejects CPU tensors with a named error). The result tests need a GPU: they compare
the kernel bit for bit with `_keep_mask` below, a pure-torch copy of the dropout hash written from the contract
in csrc/dropout_hash.cuh (independently of ttkernels.reference, which is checked against it here too).

When the extension is not built, the tests that need it skip; with TTKERNELS_REQUIRE_CUDA_EXT=1 (CI) they fail.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from ttkernels import _ext

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


@pytest.fixture(scope="module")
def ext_path() -> str:
    try:
        return _ext.load_cuda_extension()
    except _ext.CUDAExtensionNotBuiltError as e:
        if os.environ.get("TTKERNELS_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"TTKERNELS_REQUIRE_CUDA_EXT=1 but the CUDA extension does not load: {e}")
        pytest.skip(f"CUDA extension not built (set TTKERNELS_REQUIRE_CUDA_EXT=1 to fail instead): {e}")


# ------------------------------------------------------------------------ the hash, in torch and in Python
_U32 = 0xFFFFFFFF


def _mix32_py(h: int) -> int:
    h &= _U32
    h ^= h >> 16
    h = (h * 0x7FEB352D) & _U32
    h ^= h >> 15
    h = (h * 0x846CA68B) & _U32
    return h ^ (h >> 16)


def _times_const_mod32(h: torch.Tensor, c: int) -> torch.Tensor:
    # h * c mod 2^32 for int64 h in [0, 2^32): write h = a * 2^16 + b, then h * c = (a * c mod 2^16) * 2^16
    # + b * c (mod 2^32); every product stays below 2^48.
    a, b = h >> 16, h & 0xFFFF
    return ((((a * c) & 0xFFFF) << 16) + b * c) & _U32


def _mix32(h: torch.Tensor) -> torch.Tensor:
    h = h ^ (h >> 16)
    h = _times_const_mod32(h, 0x7FEB352D)
    h = h ^ (h >> 15)
    h = _times_const_mod32(h, 0x846CA68B)
    return h ^ (h >> 16)


def _keep_mask(seed: int, rows: int, cols: int, p: float, device="cpu") -> torch.Tensor:
    """(rows, cols) bool: u(seed, row, col) >= floor(p * 2^32)."""
    seed_lo, seed_hi = seed & _U32, seed >> 32
    row = torch.arange(rows, dtype=torch.int64, device=device)
    row_hash = _mix32(seed_lo ^ _mix32(row ^ _mix32_py(seed_hi)))
    col = torch.arange(cols, dtype=torch.int64, device=device)
    u = _mix32(row_hash[:, None] ^ col[None, :])
    return u >= math.floor(p * 2**32)


def _expected(x: torch.Tensor, seed: int, p: float) -> torch.Tensor:
    keep = _keep_mask(seed, x.shape[0], x.shape[1], p, device=x.device)
    scale = torch.tensor(1.0 / (1.0 - p), dtype=torch.float32, device=x.device)  # rounded once to fp32
    return torch.where(keep, x.float() * scale, torch.zeros((), device=x.device)).to(x.dtype)


EDGE_SEEDS = [0, 1, 2**32 - 1, 2**32, 2**32 + 1, 2**63 - 1]


def _random_seeds() -> list[int]:
    """The edge seeds (each word at 0, 1 and its top), a seed below 2^32 (seed_hi = 0) and one with high bits set;
    the last two fresh every run."""
    return EDGE_SEEDS + [int(torch.randint(1, 2**32, ()).item()), int(torch.randint(2**32, 2**63 - 1, ()).item())]


def test_torch_hash_matches_python_ints():
    seed = int(torch.randint(2**32, 2**63 - 1, ()).item())
    rows, cols, p = 5, 9, 0.3
    keep = _keep_mask(seed, rows, cols, p)
    for r in range(rows):
        row_hash = _mix32_py((seed & _U32) ^ _mix32_py(r ^ _mix32_py(seed >> 32)))
        for c in range(cols):
            assert bool(keep[r, c]) == (_mix32_py(row_hash ^ c) >= math.floor(p * 2**32))


# Values printed by a host program built from csrc/dropout_hash.cuh (g++, the same inline functions the kernel
# uses), pinned so that neither side of the contract can change alone.
PINNED_MIX32 = {0: 0, 1: 1753845952, 2: 3507691905, 0xDEADBEEF: 3861431939, 0xFFFFFFFF: 1734902346}
PINNED_U = {
    (0, 0, 3): 1408362973,
    (0, 0, 1030): 843424814,
    (0x123456789ABCDEF, 7, 0): 335193633,
    (0x123456789ABCDEF, 7, 1030): 2032234686,
    (0x123456789ABCDEF, 7, 2**32 - 1): 1948912463,
    (2**63 - 1, 2**32 - 1, 3): 2318665943,
    (2**63 - 1, 2**32 - 1, 2**32 - 1): 1778163695,
}


def test_hash_pinned_values():
    for h, want in PINNED_MIX32.items():
        assert _mix32_py(h) == want
        assert _mix32(torch.tensor([h], dtype=torch.int64)).item() == want
    for (seed, row, col), want in PINNED_U.items():
        row_hash = _mix32_py((seed & _U32) ^ _mix32_py(row ^ _mix32_py(seed >> 32)))
        assert _mix32_py(row_hash ^ col) == want
        # the same through the tensor version
        t_row = _mix32((seed & _U32) ^ _mix32(torch.tensor([row]) ^ _mix32_py(seed >> 32)))
        assert _mix32(t_row ^ col).item() == want


def test_keep_fraction_is_one_minus_p():
    keep = _keep_mask(int(torch.randint(0, 2**63 - 1, ()).item()), 300, 1000, 0.25)
    assert abs(keep.float().mean().item() - 0.75) < 0.01


def test_package_reference_uses_the_same_hash():
    reference = pytest.importorskip("ttkernels.reference")
    if not hasattr(reference, "dropout_keep"):
        pytest.skip("ttkernels.reference has no dropout_keep")
    for seed in _random_seeds():
        for p in (0.0, 0.1, 0.5, 0.9):
            assert torch.equal(reference.dropout_keep(seed, 33, 65, p), _keep_mask(seed, 33, 65, p))


# ------------------------------------------------------------------------------------------- loading
def test_import_does_not_load_the_library():
    code = textwrap.dedent(
        """
        import torch
        import ttkernels
        import ttkernels._ext as ext
        assert not hasattr(torch.ops.ttkernels_cuda, "dropout"), "importing ttkernels loaded the extension"
        print("path", ext.cuda_extension_path())
        """
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_missing_extension_error_says_how_to_build(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded_path", None)
    monkeypatch.setattr(_ext, "cuda_extension_path", lambda: None)
    with pytest.raises(_ext.CUDAExtensionNotBuiltError) as info:
        _ext.load_cuda_extension()
    assert isinstance(info.value, RuntimeError)
    assert "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ." in str(info.value)
    assert "nvcc" in str(info.value)
    assert _ext.cuda_extension_available() is False


def test_extension_file_exists_and_loads(ext_path):
    assert os.path.isfile(ext_path)
    assert os.path.basename(ext_path).startswith("_C")
    assert _ext.cuda_extension_path() == ext_path
    assert _ext.load_cuda_extension() == ext_path  # idempotent
    assert _ext.cuda_extension_available()


def test_dropout_op_is_registered(ext_path):
    assert hasattr(torch.ops.ttkernels_cuda, "dropout")
    schema = str(torch.ops.ttkernels_cuda.dropout.default._schema)
    assert schema == "ttkernels_cuda::dropout(Tensor x, Tensor seed, float p) -> Tensor"


# ---------------------------------------------------------------------------------- argument checks
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "make_x, seed, p, exc, message",
    [
        (lambda d: torch.randn(4, 6, device=d, dtype=torch.float64), 1, 0.1, TypeError, "x must have dtype float32"),
        (lambda d: torch.randint(0, 9, (4, 6), device=d, dtype=torch.int32), 1, 0.1, TypeError, "x must have dtype"),
        (lambda d: torch.randn(2, 3, 5, device=d), 1, 0.1, RuntimeError, "x must be 2-D"),
        (lambda d: torch.randn(7, device=d), 1, 0.1, RuntimeError, "x must be 2-D"),
        (lambda d: torch.randn(6, 4, device=d).t(), 1, 0.1, RuntimeError, "x must be contiguous"),
        (lambda d: torch.randn(4, 12, device=d)[:, ::2], 1, 0.1, RuntimeError, "x must be contiguous"),
        (lambda d: torch.randn(4, 6, device=d), 1, 1.0, RuntimeError, "p must satisfy 0 <= p < 1"),
        (lambda d: torch.randn(4, 6, device=d), 1, -0.1, RuntimeError, "p must satisfy 0 <= p < 1"),
        (lambda d: torch.randn(4, 6, device=d), 1, float("nan"), RuntimeError, "p must satisfy 0 <= p < 1"),
        (lambda d: torch.randn(4, 6, device=d), torch.tensor(1, dtype=torch.int32), 0.1, TypeError,
         "seed must have dtype int64, got Int"),
        (lambda d: torch.randn(4, 6, device=d), torch.tensor([1, 2]), 0.1, RuntimeError,
         r"seed must have one element, got shape \[2\]"),
    ],
)  # fmt: skip
def test_binding_rejects_bad_arguments(ext_path, device, make_x, seed, p, exc, message):
    x = make_x(device)
    seed = seed.to(device) if isinstance(seed, torch.Tensor) else torch.tensor(seed, device=device)
    with pytest.raises(exc, match=message):
        torch.ops.ttkernels_cuda.dropout(x, seed, p)
    if device == "cuda":
        torch.cuda.synchronize()  # nothing was launched, so nothing failed asynchronously


@pytest.mark.parametrize("shape", [(4, 6), (0, 5)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_binding_rejects_cpu_tensor(ext_path, shape, dtype):
    x = torch.randn(shape, dtype=dtype)
    with pytest.raises(RuntimeError, match=r"x must be a CUDA tensor, got device cpu"):
        _ext.cuda_dropout(x, 7, 0.1)


# ------------------------------------------------------------------------------------ results (GPU)
@needs_cuda
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 13), (257, 1031)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
def test_dropout_matches_hash_bit_exactly(ext_path, shape, dtype, p):
    for seed in _random_seeds():
        x = torch.randn(shape, device="cuda", dtype=dtype)
        x = torch.where(x == 0, torch.ones((), device="cuda", dtype=dtype), x)  # zeros would hide the mask
        x_before = x.clone()
        y = _ext.cuda_dropout(x, seed, p)
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert y.data_ptr() != x.data_ptr() or x.numel() == 0
        assert torch.equal(x, x_before)
        keep = _keep_mask(seed, shape[0], shape[1], p, device="cuda")
        assert torch.equal(y != 0, keep), f"keep mask differs (seed={seed})"
        expected = _expected(x, seed, p)
        # Bitwise: same rounding of the fp32 product, and a dropped element is +0.
        assert torch.equal(y.view(INT_VIEW[dtype]), expected.view(INT_VIEW[dtype])), f"values differ (seed={seed})"


@needs_cuda
def test_dropout_is_deterministic_and_seed_dependent(ext_path):
    x = torch.randn(64, 300, device="cuda")
    seed = int(torch.randint(0, 2**62, ()).item())
    a = _ext.cuda_dropout(x, seed, 0.5)
    assert torch.equal(a, _ext.cuda_dropout(x, seed, 0.5))
    assert not torch.equal(a != 0, _ext.cuda_dropout(x, seed + 1, 0.5) != 0)
    assert not torch.equal(a != 0, _ext.cuda_dropout(x, seed + 2**32, 0.5) != 0)  # seed_hi matters
    assert abs((a != 0).float().mean().item() - 0.5) < 0.02


@needs_cuda
def test_dropout_reads_the_seed_tensor_on_the_device(ext_path):
    """The kernel reads the seed where it lies: a CUDA graph captured once replays with the seed's current value
    (the host never reads it); a negative seed's bits are hashed as uint64, as the reference's tensor path does."""
    from ttkernels import reference

    x = torch.randn(64, 300, device="cuda")
    x = torch.where(x == 0, torch.ones((), device="cuda"), x)
    seed = torch.tensor(5, device="cuda")
    torch.ops.ttkernels_cuda.dropout(x, seed, 0.5)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = torch.ops.ttkernels_cuda.dropout(x, seed, 0.5)
    for value in EDGE_SEEDS:
        seed.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, _expected(x, value, 0.5)), value
    seed.fill_(-3)
    graph.replay()
    assert torch.equal(y != 0, reference.dropout_keep(torch.tensor(-3, device="cuda"), 64, 300, 0.5, device="cuda"))


@needs_cuda
def test_dropout_runs_on_the_current_stream(ext_path):
    x = torch.randn(513, 777, device="cuda", dtype=torch.bfloat16)
    seed = int(torch.randint(0, 2**62, ()).item())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        y = _ext.cuda_dropout(x, seed, 0.3)
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(y.view(torch.int16), _expected(x, seed, 0.3).view(torch.int16))


@needs_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_dropout_on_second_device(ext_path):
    x = torch.randn(33, 65, device="cuda:1")
    y = _ext.cuda_dropout(x, 5, 0.2)
    assert y.device == x.device
    assert torch.equal(y, _expected(x, 5, 0.2))


# ------------------------------------------------------------------------------ setup.py's toolkit check
def _setup_module(monkeypatch):
    """setup.py's functions, without running its setup() (nor its extension build)."""
    import runpy

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kw: None)
    monkeypatch.setenv("TTKERNELS_SKIP_CUDA_BUILD", "1")
    return runpy.run_path(os.path.join(REPO_ROOT, "setup.py"), run_name="setup_under_test")


def _fake_toolkit(tmp_path, release):
    nvcc = tmp_path / f"cuda-{release}" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.1'\n")
    nvcc.chmod(0o755)
    return str(nvcc)


@pytest.mark.skipif(torch.version.cuda is None, reason="needs a CUDA build of torch")
def test_setup_defers_to_torchs_cuda_version_check(monkeypatch, tmp_path):
    """A toolkit torch's own cpp_extension check accepts is accepted (another minor version); one it refuses is
    refused with a message that gives both versions, torch's reason and what to install."""
    from torch.utils import cpp_extension as ce

    setup = _setup_module(monkeypatch)
    major, minor = (int(v) for v in torch.version.cuda.split(".")[:2])
    home_before = ce.CUDA_HOME
    assert setup["cuda_version_problem"](_fake_toolkit(tmp_path, f"{major}.{minor + 1}")) is None
    other = f"{major - 1}.{minor}"
    why = setup["cuda_version_problem"](_fake_toolkit(tmp_path, other))
    torch_refuses = True
    try:
        ce.CUDA_HOME = str(tmp_path / f"cuda-{other}")
        compiler = ce.get_cxx_compiler()
        ce._check_cuda_version(compiler, ce.get_compiler_abi_compatibility_and_version(compiler)[1])
        torch_refuses = False
    except RuntimeError:
        pass
    finally:
        ce.CUDA_HOME = home_before
    assert ce.CUDA_HOME == home_before  # the check leaves torch's module as it was
    if torch_refuses:
        assert why is not None
        for part in (f"CUDA {other}", f"built with CUDA {torch.version.cuda}", "mismatches", f"CUDA {major - 1}.x"):
            assert part in why, (part, why)
    else:
        assert why is None


def test_setup_reports_and_skips_a_failed_host_extension_build(monkeypatch, capsys):
    """A failed build of ttkernels._lean (the lean path's C++ node) is reported and skipped, the install goes on
    and the Python node serves; with TTKERNELS_FORCE_HOST_BUILD=1 it fails, as a failed ttkernels._C always does."""
    from types import SimpleNamespace

    from torch.utils import cpp_extension as ce

    setup = _setup_module(monkeypatch)
    exts = setup["_host_extension"]()
    assert [e.name for e in exts] == ["ttkernels._lean"] and exts[0].sources == ["csrc/host/lean_chain.cpp"]

    def broken(self, ext):
        raise RuntimeError(f"compiler error in {ext.name}")

    monkeypatch.setattr(ce.BuildExtension, "build_extension", broken)
    command = setup["_build_ext_command"]()
    builder = object.__new__(command)
    builder.build_extension(SimpleNamespace(name="ttkernels._lean"))
    assert (
        "could not build ttkernels._lean (RuntimeError: compiler error in ttkernels._lean)" in capsys.readouterr().err
    )
    with pytest.raises(RuntimeError, match=r"compiler error in ttkernels\._C"):
        builder.build_extension(SimpleNamespace(name="ttkernels._C"))
    monkeypatch.setenv("TTKERNELS_FORCE_HOST_BUILD", "1")
    with pytest.raises(RuntimeError, match=r"compiler error in ttkernels\._lean"):
        builder.build_extension(SimpleNamespace(name="ttkernels._lean"))
    monkeypatch.setenv("TTKERNELS_SKIP_HOST_BUILD", "1")
    assert setup["_host_extension"]() == []
