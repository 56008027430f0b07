"""csrc/ptxas_gate.py, the static gate of the CUDA kernels (`make cuda-gate`): its reading of ptxas reports and its
verdict, with a stand-in nvcc that prints a fixed report (the real compile runs in `make cuda-gate` and CI)."""

from __future__ import annotations

import os
import runpy

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GATE = runpy.run_path(os.path.join(REPO, "csrc", "ptxas_gate.py"), run_name="ptxas_gate_under_test")

REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z6good_kPf' for 'sm_90a'
ptxas info    : Function properties for _Z6good_kPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 96 registers, used 1 barriers, 16512 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z7spill_kPf' for 'sm_90a'
ptxas info    : Function properties for _Z7spill_kPf
    8 bytes stack frame, 8 bytes spill stores, 28 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 24832 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function '_Z5fat_kPf' for 'sm_90a'
ptxas info    : Function properties for _Z5fat_kPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 400 bytes cmem[0]
"""


def test_parse_reads_registers_spills_and_shared_memory():
    kernels = GATE["parse"](REPORT)
    assert [(k["mangled"], k["registers"], k["spill"], k["stack"], k["smem"]) for k in kernels] == [
        ("_Z6good_kPf", 96, 0, 0, 16512),
        ("_Z7spill_kPf", 32, 36, 8, 24832),
        ("_Z5fat_kPf", 168, 0, 0, 0),
    ]


def _fake_nvcc(tmp_path, report):
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    (tmp_path / "report.txt").write_text(report)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text(f"#!/bin/sh\ncat {tmp_path / 'report.txt'} >&2\n")
    nvcc.chmod(0o755)
    return str(home)


@pytest.mark.parametrize(
    "report, rc, verdicts",
    [
        (REPORT, 1, ["36 bytes of spills", "168 registers > 128"]),
        (REPORT.split("ptxas info    : Compiling entry function '_Z7spill_kPf'")[0], 0, []),
        ("ptxas info    : 0 bytes gmem\n", 1, ["reported no entry function"]),
    ],
    ids=["spills-and-registers", "clean", "nothing-compiled"],
)
def test_gate_verdict(tmp_path, monkeypatch, capsys, report, rc, verdicts):
    monkeypatch.setenv("CUDA_HOME", _fake_nvcc(tmp_path, report))
    kernel = tmp_path / "k.cu"
    kernel.write_text("// stand-in\n")
    assert GATE["main"]([str(kernel)]) == rc
    out = capsys.readouterr()
    for v in verdicts:
        assert v in out.err
    assert ("cuda gate passed" in out.out) == (rc == 0)
