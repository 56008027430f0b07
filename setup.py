"""Build script of ttkernels: the Python packages and, when they can be built, the CUDA extension
``ttkernels._C`` and the host extension ``ttkernels._lean``.

Project metadata (name, version, dependencies) lives in pyproject.toml; this file only adds what pyproject.toml
cannot say: the package layout, the extension module and its build command.

Packages: ``ttkernels`` (and subpackages), and the top-level folder ``triton_kernels/`` installed as
``ttkernels._triton_kernels`` -- never as a top-level ``triton_kernels``, an import name Triton's own kernel
library already uses.

The extension (csrc/*.cu, csrc/*.cpp -> ttkernels/_C*.so, loaded with torch.ops.load_library by
ttkernels/_ext.py) is built when torch is importable, torch is a CUDA build, and nvcc is found (CUDA_HOME,
else nvcc on PATH, else /usr/local/cuda). Otherwise the pure-Python package is installed and a message says
why. ``ttkernels._lean`` (csrc/host/lean_chain.cpp, a pybind11 module) needs torch and a C++ compiler only;
without it the lean path runs its Python fallback. Torch is not a build requirement (an isolated build env has
none), so build the extensions with

    CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e .

Environment variables:
    TTKERNELS_SKIP_CUDA_BUILD=1   do not build ttkernels._C
    TTKERNELS_SKIP_HOST_BUILD=1   do not build ttkernels._lean (the lean path's C++ autograd node; no nvcc needed)
    TTKERNELS_FORCE_HOST_BUILD=1  a failed build of ttkernels._lean fails the install (else it is reported, skipped)
    TTKERNELS_FORCE_CUDA_BUILD=1  a missing prerequisite is an error, not a fallback to pure Python
    TTKERNELS_CUDA_ARCHS          e.g. "80;90a" (default) or "8.0,9.0a"; SASS for each, PTX for the newest
    MAX_JOBS                      parallel compile jobs (default: min(cores, free GiB / 3), at least 1)
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "80;90a"
BUILD_COMMAND = "CUDA_HOME=/usr/local/cuda pip install --no-build-isolation -e ."


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _say(message: str) -> None:
    # pip shows a build backend's output only with -v; stderr at least keeps it out of captured stdout.
    print(f"ttkernels setup: {message}", file=sys.stderr, flush=True)


def _packages() -> tuple[list[str], dict[str, str]]:
    packages = find_packages(where=ROOT, include=["ttkernels", "ttkernels.*"])
    package_dir = {}
    triton_dir = os.path.join(ROOT, "triton_kernels")
    if os.path.isfile(os.path.join(triton_dir, "__init__.py")):
        packages.append("ttkernels._triton_kernels")
        packages += ["ttkernels._triton_kernels." + sub for sub in find_packages(where=triton_dir)]
        # Relative path: setuptools rejects absolute package_dir entries in some of its commands.
        package_dir["ttkernels._triton_kernels"] = "triton_kernels"
    return packages, package_dir


def parse_cuda_archs(spec: str) -> list[str]:
    """ "80;90a" or "8.0, 9.0a" or "sm_90a" -> ["80", "90a"] (deduplicated, order kept)."""
    archs = []
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not token:
            continue
        arch = token.lower().removeprefix("sm_").removeprefix("compute_").replace(".", "")
        if not re.fullmatch(r"\d+[af]?", arch):
            raise ValueError(f"TTKERNELS_CUDA_ARCHS: cannot parse arch {token!r} in {spec!r}")
        if arch not in archs:
            archs.append(arch)
    if not archs:
        raise ValueError(f"TTKERNELS_CUDA_ARCHS is empty: {spec!r}")
    return archs


def gencode_flags(archs: list[str]) -> list[str]:
    """SASS for every arch, plus PTX of the newest; an arch-specific "90a" gets PTX of plain "90"."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    newest = max(archs, key=lambda a: int(re.match(r"\d+", a).group()))
    ptx = re.match(r"\d+", newest).group()
    flags.append(f"-gencode=arch=compute_{ptx},code=compute_{ptx}")
    return flags


def _default_max_jobs() -> int:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    free_gib = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free_gib = int(line.split()[1]) / 2**20
                    break
    except OSError:
        pass
    # An nvcc job with torch headers peaks at 1-3 GiB.
    jobs = cores if free_gib is None else min(cores, int(free_gib / 3))
    return max(1, jobs)


def _nvcc_release(nvcc: str) -> str | None:
    """ "13.0" from `nvcc --version`, or None when it cannot be run or read."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def _nvcc_major(nvcc: str) -> int | None:
    release = _nvcc_release(nvcc)
    return int(release.split(".")[0]) if release else None


def cuda_version_problem(nvcc: str) -> str | None:
    """None when torch's own cpp_extension check accepts the toolkit of ``nvcc`` for this torch, else a sentence
    saying exactly why not, with both versions.

    The rule is torch's, not ours: ``torch.utils.cpp_extension._check_cuda_version`` (the check BuildExtension
    runs) with its CUDA_HOME pointed at this nvcc's toolkit. A minor-version difference only warns there; a major
    one is refused by the torch versions that refuse it (2.14 does), and accepted by any that accept it. Host
    compiler bounds for the toolkit are part of the same check. A torch without that function is left to its own
    BuildExtension.
    """
    import torch
    from torch.utils import cpp_extension as ce

    check = getattr(ce, "_check_cuda_version", None)
    if check is None:
        return None
    release = _nvcc_release(nvcc) or "unknown"
    home = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    saved = ce.CUDA_HOME
    ce.CUDA_HOME = home
    try:
        compiler = ce.get_cxx_compiler()
        _, compiler_version = ce.get_compiler_abi_compatibility_and_version(compiler)
        check(compiler, compiler_version)
    except (RuntimeError, ValueError, OSError, subprocess.SubprocessError) as e:
        args = e.args
        text = args[0] % tuple(args[1:]) if len(args) > 1 and isinstance(args[0], str) else str(e)
        return (
            f"torch's cpp_extension check refuses this toolkit: nvcc {nvcc} is CUDA {release}, torch "
            f"{torch.__version__} was built with CUDA {torch.version.cuda} ({text.strip()}). Install a torch built "
            f"for CUDA {release.split('.')[0]}.x, or point CUDA_HOME at a CUDA {torch.version.cuda.split('.')[0]}.x "
            f"toolkit"
        )
    finally:
        ce.CUDA_HOME = saved
    return None


def _nvidia_wheel_include_dirs(nvcc_major: int | None) -> list[str]:
    """Header folders of the nvidia-* wheels torch depends on (site-packages/nvidia/*/include).

    A CUDA toolkit installed from wheels may lack headers torch's CUDA headers include (cublas, cusparse, ...);
    the wheels that came with torch carry them. A "cuNN" folder is used only when NN is nvcc's major version,
    so a toolkit of another version never picks up mismatched CUDA runtime headers.
    """
    roots = []
    try:
        import nvidia  # namespace package of the nvidia-* wheels

        roots = list(getattr(nvidia, "__path__", []))
    except ImportError:
        pass
    dirs = []
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "*", "include"))):
            name = os.path.basename(os.path.dirname(inc))
            m = re.fullmatch(r"cu(\d+)", name)
            if m and (nvcc_major is None or int(m.group(1)) != nvcc_major):
                continue
            if os.path.isdir(inc) and inc not in dirs:
                dirs.append(inc)
    return dirs


def _find_nvcc() -> tuple[str | None, str]:
    """(path of nvcc, "") or (None, why not). CUDA_HOME (or CUDA_PATH) wins when set: torch builds with it."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home:
            nvcc = os.path.join(home, "bin", "nvcc")
            if os.path.isfile(nvcc):
                return nvcc, ""
            return None, f"{var}={home} has no bin/nvcc"
    for nvcc in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if nvcc and os.path.isfile(nvcc):
            return nvcc, ""
    return None, "nvcc not found (looked in $CUDA_HOME/bin, PATH and /usr/local/cuda/bin)"


def _cuda_extension() -> list:
    """[CUDAExtension] of ``ttkernels._C``, or [] with a message saying why not."""
    if _env_flag("TTKERNELS_SKIP_CUDA_BUILD"):
        _say("TTKERNELS_SKIP_CUDA_BUILD is set: installing the pure-Python package without ttkernels._C.")
        return []
    force = _env_flag("TTKERNELS_FORCE_CUDA_BUILD")

    def give_up(reason: str) -> list:
        how = (
            "To build the extension, install a CUDA build of torch and the CUDA toolkit (nvcc), then run: "
            + BUILD_COMMAND
        )
        if force:
            raise RuntimeError(f"TTKERNELS_FORCE_CUDA_BUILD=1 but the CUDA extension cannot be built: {reason}. {how}")
        _say(
            f"not building the CUDA extension ttkernels._C: {reason}. Installing the pure-Python package "
            f"(the torch and Triton backends still work). {how}"
        )
        return []

    try:
        import torch
    except ImportError as e:
        return give_up(
            f"torch is not importable in the build environment ({e}); with build isolation pip "
            f"builds in a fresh environment without torch, so pass --no-build-isolation"
        )
    if torch.version.cuda is None:
        return give_up(f"torch {torch.__version__} is not a CUDA build (torch.version.cuda is None)")
    nvcc, why_not = _find_nvcc()
    if nvcc is None:
        return give_up(why_not)
    nvcc_major = _nvcc_major(nvcc)
    # torch.utils.cpp_extension reads CUDA_HOME when first imported, just below.
    if not os.environ.get("CUDA_HOME"):
        os.environ["CUDA_HOME"] = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    _say(f"nvcc {nvcc}: CUDA {_nvcc_release(nvcc) or 'unknown'}; torch {torch.__version__}: CUDA {torch.version.cuda}")
    problem = cuda_version_problem(nvcc)
    if problem is not None:
        return give_up(problem)

    from torch.utils.cpp_extension import CUDAExtension

    archs = parse_cuda_archs(os.environ.get("TTKERNELS_CUDA_ARCHS", DEFAULT_CUDA_ARCHS))
    if "MAX_JOBS" not in os.environ:
        os.environ["MAX_JOBS"] = str(_default_max_jobs())
    # -isystem is searched after every -I folder, so these only fill in headers the toolkit lacks.
    system_includes = []
    for inc in _nvidia_wheel_include_dirs(nvcc_major):
        system_includes += ["-isystem", inc]
    _say(f"building ttkernels._C with {nvcc} for archs {';'.join(archs)} (MAX_JOBS={os.environ['MAX_JOBS']}).")

    csrc = os.path.join(ROOT, "csrc")
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "*.cu")))
    sources = [os.path.relpath(s, ROOT) for s in sources]
    # No -std flag: BuildExtension adds the standard torch's own headers need when none is given (c++20 for
    # torch 2.14; its headers use std::strong_ordering and do not compile with -std=c++17). csrc/ itself is
    # C++17 and C++20 clean.
    ext = CUDAExtension(
        name="ttkernels._C",
        sources=sources,
        include_dirs=[csrc],
        extra_compile_args={
            "cxx": ["-O3", *system_includes],
            "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo", *gencode_flags(archs), *system_includes],
        },
        # The .so is loaded with torch.ops.load_library, not imported: no Python module init needed.
        py_limited_api=False,
    )
    return [ext]


def _host_extension() -> list:
    """[CppExtension] of ``ttkernels._lean`` (csrc/host/lean_chain.cpp: the lean path's C++ autograd node, any
    device, no nvcc needed), or [] with a message saying why not (the lean path then runs its Python
    autograd.Function: same results, more per-call cost)."""
    if _env_flag("TTKERNELS_SKIP_HOST_BUILD"):
        _say("TTKERNELS_SKIP_HOST_BUILD is set: not building ttkernels._lean (the lean path runs in Python).")
        return []
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CppExtension
    except ImportError as e:
        _say(f"not building ttkernels._lean: torch is not importable in the build environment ({e}).")
        return []
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _say("not building ttkernels._lean: no C++ compiler (c++ or $CXX) on PATH; the lean path runs in Python.")
        return []
    source = os.path.relpath(os.path.join(ROOT, "csrc", "host", "lean_chain.cpp"), ROOT)
    return [CppExtension(name="ttkernels._lean", sources=[source], extra_compile_args=["-O3"])]


def _build_ext_command() -> type:
    """torch's BuildExtension (ninja), except that a failed build of ``ttkernels._lean`` is reported and skipped
    (the lean path then runs its Python node) unless TTKERNELS_FORCE_HOST_BUILD=1; ``ttkernels._C`` fails the
    install as before."""
    from torch.utils.cpp_extension import BuildExtension

    base = BuildExtension.with_options(use_ninja=True)

    class BuildExt(base):
        def build_extension(self, ext) -> None:
            if ext.name != "ttkernels._lean" or _env_flag("TTKERNELS_FORCE_HOST_BUILD"):
                return super().build_extension(ext)
            try:
                super().build_extension(ext)
            except Exception as e:  # a compiler or torch-header problem: the Python node serves
                _say(f"could not build ttkernels._lean ({type(e).__name__}: {e}); the lean path runs in Python.")

    return BuildExt


packages, package_dir = _packages()
cuda_modules = _cuda_extension()  # first: it sets CUDA_HOME before torch.utils.cpp_extension is imported
ext_modules = _host_extension() + cuda_modules
cmdclass = {"build_ext": _build_ext_command()} if ext_modules else {}

setup(
    packages=packages,
    package_dir=package_dir,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
