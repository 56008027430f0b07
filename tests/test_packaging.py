"""The pure-Python package works with no compiled extension and no GPU; the install layout is as promised."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_and_train_without_the_extension(tmp_path):
    pkg = tmp_path / "ttkernels"
    shutil.copytree(ROOT / "ttkernels", pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    assert not list(pkg.glob("_C*"))
    code = (
        f"PKG = {str(pkg)!r}\n"
        + """
import sys
# an editable install's finder would resolve ttkernels._C to the repository's build: drop it
sys.meta_path = [f for f in sys.meta_path if "editable" not in str(getattr(f, "__module__", "")).lower()]
import torch, ttkernels as tk
from ttkernels import _ext
assert tk.__file__.startswith(PKG), tk.__file__
assert not _ext.cuda_extension_available()
try:
    _ext.load_cuda_extension()
except _ext.CUDAExtensionNotBuiltError as e:
    assert "pip install --no-build-isolation -e ." in str(e), e
else:
    raise AssertionError("no error without the extension")
layer = tk.TTLinear(16, 8, in_modes=2, ranks=2)
layer(torch.randn(3, 16)).sum().backward()
assert layer.cores[-1].grad is not None
print("ok")
"""
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr


def test_triton_kernels_folder_is_not_a_top_level_package():
    import ttkernels._triton_kernels as tk_triton

    assert Path(tk_triton.__file__).resolve().parent == ROOT / "triton_kernels"
    code = "import importlib.util, sys; s = importlib.util.find_spec('triton_kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert str(ROOT / "triton_kernels") not in out.stdout, out.stdout
