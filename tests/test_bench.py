"""The benchmark harness: its arithmetic, its result rows, the provider check, and the CLI in --quick mode."""

import json

import pytest
import torch

from bench import __main__ as cli
from bench import harness, layer
from bench.providers import (
    FORMATS,
    Problem,
    ProviderCheckError,
    TTEinsum,
    check_provider,
    lora_rank_for_params,
    providers_for,
)
from helpers import require


def test_layer_flops_and_bytes():
    M, di, do, r = 8, 32, 16, 4
    base = 2 * M * di * do
    extra = 2 * M * r * (di + do)
    assert harness.layer_flops(M, di, do, r, "forward") == base + extra
    assert harness.layer_flops(M, di, do, r, "backward") == base + 2 * extra
    assert harness.layer_flops(M, di, do, r, "forward+backward") == 2 * base + 6 * M * r * (di + do)
    assert harness.layer_flops(M, di, do, r, "forward", adapter=False) == base
    assert harness.layer_bytes(M, di, do, 2, "forward") == 2 * (M * di + di * do + M * do)
    assert harness.layer_bytes(M, di, do, 2, "forward+backward") == 4 * (M * di + di * do + M * do)
    with pytest.raises(ValueError, match="phase must be one of"):
        harness.layer_flops(M, di, do, r, "sideways")


def test_rate_and_ratios():
    assert harness.rate(2e12, 1000.0, 1e12) == pytest.approx(2.0)
    assert harness.rate(1.0, 0.0, 1.0) is None
    common = dict(preset="layer", phase="forward", M=4, d_in=8, d_out=8, dtype="float32", device="cpu")
    rows = [
        {**common, "provider": "frozen", "time_ms": 2.0, "format": "lora", "rank": 4},
        {**common, "provider": "a", "time_ms": 3.0, "format": "lora", "rank": 4},
        {**common, "provider": "c", "time_ms": 3.0, "format": "ttlora", "rank": 4},
        {**common, "provider": "b", "time_ms": 5.0, "M": 16, "format": "lora", "rank": 4},
    ]
    harness.add_ratios(rows)
    assert [r["ratio_to_base"] for r in rows] == [1.0, 1.5, None, None]


def test_rows_round_trip_and_table(tmp_path):
    env = {"run": "r1", "device": "CPU: test", "versions": harness.versions(), "ceilings": {"copy_gbps": 1.0}}
    t = harness.Timing(median_ms=1.5, min_ms=1.0, reps=7)
    row = harness.make_row(
        preset="layer",
        provider="frozen",
        phase="forward",
        device=torch.device("cpu"),
        dtype=torch.bfloat16,
        timing=t,
        env=env,
        M=3,
    )
    assert (
        row["dtype"] == "bfloat16"
        and row["time_ms"] == 1.5
        and row["M"] == 3
        and row["versions"]["torch"] == torch.__version__
    )
    path = tmp_path / "r.jsonl"
    harness.append_rows([row, row], path)
    assert harness.read_rows(path) == [json.loads(json.dumps(row))] * 2
    text = harness.table([row], ("provider", "M", "time_ms", "missing"))
    assert "frozen" in text and "1.50" in text and text.splitlines()[2].rstrip().endswith("-")
    assert t.spread == 1.5


def test_measure_runs_the_function():
    calls = []
    timing = harness.measure(lambda: calls.append(1), torch.device("cpu"), warmup=2, reps=5, setup=lambda: None)
    assert timing.reps == 5 and len(calls) == 7 and 0 <= timing.min_ms <= timing.median_ms


def test_saved_bytes_excludes_parameters():
    lin = torch.nn.Linear(8, 4)
    x = torch.randn(5, 8, requires_grad=True)
    assert harness.saved_bytes(lambda: lin(x), lin.parameters()) == 5 * 8 * 4  # x, for dW
    assert harness.saved_bytes(lambda: lin(x)) == 5 * 8 * 4 + 4 * 8 * 4  # and W


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_provider_passes_its_check(fmt, dtype):
    p = Problem(fmt, 48, 30, 4, dtype, torch.device("cpu"))
    names = []
    for provider in providers_for(p, ["torch"]):
        check_provider(provider, p)
        names.append(provider.name)
    assert names == ["frozen", "peft-lora-r4", "peft-lora-params", "ttkernels-torch", "tt-einsum", "tt-reconstruct"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # bf16: the interpreter's tl.dot is wrong
def test_triton_providers_pass_their_check(fmt, dtype):
    # The Triton kernels run in the interpreter here (tests/conftest.py): this checks the providers' wiring,
    # both base-GEMM plans, and that each plan is active while its provider runs.
    from ttkernels._triton_kernels import backend as tb

    p = Problem(fmt, 48, 30, 4, dtype, torch.device("cpu"))
    default = tb.BASE_GEMM
    provs = [pr for pr in providers_for(p, ["triton"]) if pr.name.startswith("ttkernels")]
    assert [pr.name for pr in provs] == ["ttkernels-triton", "ttkernels-triton-cublas"]
    for provider, plan in zip(provs, ["fused", "cublas"]):
        with provider.active():
            assert tb.BASE_GEMM == plan
            check_provider(provider, p)
    assert tb.BASE_GEMM == default


@pytest.mark.parametrize("dtype,factor", [(torch.float32, 1.01), (torch.bfloat16, 0.0)])
def test_a_wrong_provider_is_refused(dtype, factor):
    p = Problem("ttlora", 60, 35, 4, dtype, torch.device("cpu"))
    provider = TTEinsum(p)
    honest = provider.delta64()
    with torch.no_grad():
        provider.cores[1].mul_(factor)  # now computes something else than it claims
    provider.delta64 = lambda: honest
    with pytest.raises(ProviderCheckError, match="tt-einsum: output differs from the float64 formula"):
        check_provider(provider, p)


def test_lora_rank_for_params():
    assert lora_rank_for_params(16 * (4096 + 4096), 4096, 4096) == 16
    assert lora_rank_for_params(10, 4096, 4096) == 1


def test_cli_quick_layer_and_micro(tmp_path, capsys):
    out = tmp_path / "results.jsonl"
    args = "--quick --M 1 7 --shapes 24x20 --formats lora ttlora metatt --reps 2".split() + ["--results", str(out)]
    assert cli.main(["--preset", "layer", *args]) == 0
    assert cli.main(["--preset", "micro", *args]) == 0
    text = capsys.readouterr().out
    assert "CPU figures" in text and "GPU figures need a GPU" in text
    rows = harness.read_rows(out)
    layer_rows = [r for r in rows if r["preset"] == "layer"]
    providers = {r["provider"] for r in layer_rows}
    assert {"frozen", "peft-lora-r8", "peft-lora-params", "ttkernels-torch", "tt-einsum", "tt-reconstruct"} <= providers
    assert {r["phase"] for r in layer_rows} == set(harness.PHASES)
    assert {(r["M"], r["format"]) for r in layer_rows} == {(m, f) for m in (1, 7) for f in ("lora", "ttlora", "metatt")}
    for r in layer_rows:
        assert r["device_type"] == "cpu" and r["dtype"] == "float32" and r["quick"] is True
        assert r["versions"]["ttkernels"] and r["ceilings"]["matmul_tflops"] > 0
        assert r["time_ms"] > 0 and r["ratio_to_base"] is not None
        if r["provider"] == "frozen":
            assert r["ratio_to_base"] == 1.0
    forward = [r for r in layer_rows if r["phase"] == "forward" and r["M"] == 7]
    for fmt in ("lora", "ttlora"):
        fwd = {r["provider"]: r for r in forward if r["format"] == fmt and r["dropout"] == 0}
        assert fwd["ttkernels-torch"]["saved_ratio_to_x"] == pytest.approx(1 + 8 / 24)  # x and S only
    # the sequential einsum keeps its intermediates once the in modes are factored
    assert fwd["tt-einsum"]["saved_ratio_to_x"] > 1.5 * fwd["ttkernels-torch"]["saved_ratio_to_x"]
    # --quick's dropout case (LoRA-shaped, first shape): PEFT keeps the dropped copy of x, ttkernels a seed
    drop = {r["provider"]: r for r in forward if r["dropout"] == layer.QUICK_DROPOUT}
    assert set(drop) == {"frozen", "peft-lora-r8", "peft-lora-params", "ttkernels-torch"}  # no TT baselines
    assert {r["format"] for r in drop.values()} == {"lora"}
    assert drop["ttkernels-torch"]["saved_ratio_to_x"] == pytest.approx(1 + 8 / 24)
    assert drop["peft-lora-r8"]["saved_ratio_to_x"] > 1.9
    micro_ops = {r["phase"] for r in rows if r["preset"] == "micro"}
    assert micro_ops == {"factors", "shrink", "expand", "grad_dy", "grad_mid", "grad_x", "grad_a"}


def test_cli_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--shapes", "4096by4096"])
    with pytest.raises(SystemExit):
        cli.main(["--ranks", "0"])
    assert "D_INxD_OUT" in capsys.readouterr().err


def test_default_grids():
    assert layer.FULL_M == (1, 16, 256, 2048, 8192, 16384)
    assert layer.FULL_SHAPES == ((4096, 4096), (4096, 11008), (11008, 4096), (4096, 1024))


def test_an_interrupted_run_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    real = layer.run_config
    calls = []

    def interrupt_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # what bench/gpu.sh's timeout sends
        return real(*args, **kwargs)

    monkeypatch.setattr(layer, "run_config", interrupt_second)
    out = tmp_path / "r.jsonl"
    argv = "--preset layer --quick --M 1 3 --shapes 16x12 --formats lora --reps 2".split() + ["--results", str(out)]
    assert cli.main(argv) == 130
    rows = harness.read_rows(out)
    assert rows and {r["M"] for r in rows} == {1}
    assert all(r["ratio_to_base"] is not None for r in rows)


def test_cli_ttm_quick(tmp_path, capsys):
    """python -m bench.ttm --quick: every torch path checked against float64, timed, rows written."""
    from bench import ttm as bench_ttm

    require("tltorch")
    out = tmp_path / "rows.jsonl"
    assert bench_ttm.main("--quick --M 3 --modes 2 3 --rank 2 --reps 2".split() + ["--results", str(out)]) == 0
    rows = harness.read_rows(out)
    providers = {r["provider"] for r in rows}
    assert {"dense", "sweep", "tltorch"} <= providers  # tensorly-torch is a test dependency
    for r in rows:
        assert r["preset"] == "ttm" and r["M"] == 3 and r["d_in"] == 6 and r["rank"] == 2
        assert r["rel_error"] < 1e-2 and r["time_ms"] > 0
    sweep = [r for r in rows if r["provider"] == "sweep"]
    assert all(abs(r["saved_vs_x"] - 1.0) < 1e-9 for r in sweep)  # the sweep keeps x alone
    dense = {r["phase"]: r for r in rows if r["provider"] == "dense"}
    assert dense["forward"]["x_vs_dense"] == 1.0
    assert "x_vs_tltorch" in capsys.readouterr().out
