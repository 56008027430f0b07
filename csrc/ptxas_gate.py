"""Static gate of the CUDA kernels: every kernel instantiation compiled for sm_90a uses at most 128 registers per
thread and spills nothing.

    python csrc/ptxas_gate.py [--arch sm_90a] [--max-registers 128] [--jobs 1] [files ...]

Compiles each kernel file of csrc/ (no torch headers; default: every csrc/*.cu) with `nvcc -Xptxas -v` for the
arch, reads ptxas's report of every entry function (registers, spill stores and loads, stack frame, shared
memory), prints one line per kernel instantiation and exits non-zero when any has spills or more registers than
allowed (a lower bound: a kernel at the limit cannot hold four 256-thread blocks per SM, and a spill is local
memory traffic in the inner loop). No GPU is needed. `make cuda-gate` runs it.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

CSRC = os.path.dirname(os.path.abspath(__file__))
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(\w+)'")
USED = re.compile(r"Used (\d+) registers")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
SMEM = re.compile(r"(\d+) bytes smem")


def find_nvcc() -> str:
    for nvcc in (
        os.path.join(os.environ.get("CUDA_HOME", ""), "bin", "nvcc"),
        shutil.which("nvcc"),
        "/usr/local/cuda/bin/nvcc",
    ):
        if nvcc and os.path.isfile(nvcc):
            return nvcc
    sys.exit("ptxas_gate: nvcc not found (set CUDA_HOME or put nvcc on PATH)")


def parse(report: str) -> list[dict]:
    """One dict per entry function of a `ptxas -v` report: name, arch, registers, spill bytes, stack, smem."""
    kernels, cur = [], None
    for line in report.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = {"mangled": m.group(1), "arch": m.group(2), "registers": None, "spill": 0, "stack": 0, "smem": 0}
            kernels.append(cur)
            continue
        if cur is None:
            continue
        if m := SPILL.search(line):
            cur["stack"], cur["spill"] = int(m.group(1)), int(m.group(2)) + int(m.group(3))
        if m := USED.search(line):
            cur["registers"] = int(m.group(1))
            if s := SMEM.search(line):
                cur["smem"] = int(s.group(1))
    return kernels


def demangle(names: list[str]) -> list[str]:
    cxxfilt = shutil.which("c++filt")
    if not cxxfilt or not names:
        return names
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return out if len(out) == len(names) else names


def compile_report(nvcc: str, path: str, arch: str) -> tuple[str, int, str]:
    cmd = [nvcc, f"-arch={arch}", "-O3", "--expt-relaxed-constexpr", "-std=c++17", "-Xptxas", "-v", f"-I{CSRC}",
           "-c", path, "-o", os.devnull]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True)
    return path, done.returncode, done.stdout + done.stderr


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="*", help="kernel files (default: every csrc/*.cu)")
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--max-registers", type=int, default=128)
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args(argv)
    files = args.files or sorted(glob.glob(os.path.join(CSRC, "*.cu")))
    nvcc = find_nvcc()
    failures, rows = [], []
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for path, rc, report in pool.map(lambda f: compile_report(nvcc, f, args.arch), files):
            name = os.path.basename(path)
            if rc != 0:
                failures.append(f"{name}: nvcc failed\n{report[-3000:]}")
                continue
            kernels = parse(report)
            if not kernels:
                failures.append(f"{name}: ptxas reported no entry function")
            for k, pretty in zip(kernels, demangle([k["mangled"] for k in kernels])):
                pretty = re.sub(r"\(anonymous namespace\)::|ttkernels::|^void ", "", pretty).split("(")[0]
                bad = []
                if k["registers"] is None:
                    bad.append("no register count")
                elif k["registers"] > args.max_registers:
                    bad.append(f"{k['registers']} registers > {args.max_registers}")
                if k["spill"]:
                    bad.append(f"{k['spill']} bytes of spills")
                rows.append((name, pretty, k["registers"], k["spill"], k["stack"], k["smem"], "; ".join(bad) or "ok"))
                if bad:
                    failures.append(f"{name}: {pretty}: {', '.join(bad)}")
    width = max([len(r[1]) for r in rows] + [6])
    print(f"{'file':<16} {'kernel':<{width}} {'regs':>5} {'spill':>6} {'stack':>6} {'smem':>6}  verdict")
    for r in rows:
        print(f"{r[0]:<16} {r[1]:<{width}} {r[2]!s:>5} {r[3]:>6} {r[4]:>6} {r[5]:>6}  {r[6]}")
    print(f"{len(rows)} kernel instantiations for {args.arch}; limits: <= {args.max_registers} registers, no spills")
    if failures:
        print("cuda gate FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("cuda gate passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
