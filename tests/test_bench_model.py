"""The ``model`` preset on the CPU: its rows, its parameter counts, and a correctness gate that refuses a
broken adapter (the broken provider gets no row and a ProviderCheckFailed warning)."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers", reason="the model preset builds a transformers LlamaModel")
pytest.importorskip("peft", reason="the model preset times PEFT's LoRA")

import ttkernels
from bench import harness
from bench import model as bm

CPU = torch.device("cpu")
# Fewer tokens and repetitions than the quick preset: the test checks the rows, not the timings.
SMALL = dict(quick=True, seq=16, warmup=0, reps=2)


def _env():
    return {"run": "test", "device": harness.device_name(CPU), "versions": harness.versions(), "quick": True}


def _expected_metatt_params(config: str, layers: int, rank: int, factored: bool) -> int:
    shape = bm.CONFIGS[config]
    kv = shape.hidden // shape.heads * shape.kv_heads
    dims = [(shape.hidden, shape.hidden), (shape.hidden, kv), (shape.hidden, kv), (shape.hidden, shape.hidden)]
    dims += [(shape.hidden, shape.intermediate)] * 2 + [(shape.intermediate, shape.hidden)]
    groups: dict[tuple[int, int], int] = {}
    for d in dims:
        groups[d] = groups.get(d, 0) + 1
    total = 0
    for (d_in, d_out), n in groups.items():
        split = (lambda d: ttkernels.factorize(d, 2)) if factored else (lambda d: (d,))
        spec = ttkernels.TTSpec.build(
            split(d_in),
            split(d_out),
            rank,
            index_modes=[ttkernels.Mode.index("layer", layers), ttkernels.Mode.index("matrix", n)],
        )
        total += spec.num_params
    return total


def _available(providers):
    if importlib.util.find_spec("bitsandbytes") is None:  # the 4-bit-base pair needs it (tests/test_quantized.py)
        providers = tuple(p for p in providers if p not in bm.QUANTIZED_PROVIDERS)
    return providers


def _check_rows(by_key, layers, rank):
    for (config, provider), row in by_key.items():
        assert row["preset"] == "model" and row["phase"] == "train_step"
        assert row["M"] == row["batch"] * row["seq"] == 2 * 16
        assert row["layers"] == layers
        if provider in bm.QUANTIZED_PROVIDERS:  # the 4-bit pair is timed on a GPU only
            assert row["time_ms"] is None and row["tokens_per_s"] is None and row["base"] == "nf4"
        else:
            assert row["time_ms"] > 0 and row["tokens_per_s"] > 0 and row["base"] == "float32"
            assert math.isclose(row["tokens_per_s"], row["M"] / (row["time_ms"] * 1e-3), rel_tol=1e-9)
        assert row["saved_bytes_per_token"] > 0
        assert row["peak_mem_bytes"] is None  # CPU
        assert row["adapter_bytes"] == 4 * row["params"]  # float32 adapters
        if provider == "frozen":
            assert row["params"] == 0 and row["adapter_dtype"] is None and row["check"] is None
        else:
            assert row["adapter_dtype"] == "float32"
            assert row["check"]["init_err"] <= 1e-4 and row["check"]["moved"] > 1e-4
        if provider.startswith("metatt"):
            expected = _expected_metatt_params(config, layers, rank, provider == "metatt-factored")
            assert row["params"] == expected
            if (config, "peft-lora") in by_key:
                assert row["params"] < by_key[(config, "peft-lora")]["params"]


def test_model_preset_rows_of_one_config():
    rank, layers = 4, 2
    providers = _available(("frozen", "metatt", "metatt-4bit"))
    rows = bm.run_model(
        CPU, torch.float32, _env(), rank=rank, layers=layers, configs=("tiny-gqa",), providers=providers, **SMALL
    )
    by_key = {(r["config"], r["provider"]): r for r in rows}
    assert set(by_key) == {("tiny-gqa", p) for p in providers}
    _check_rows(by_key, layers, rank)
    if "metatt-4bit" in providers:
        assert by_key[("tiny-gqa", "metatt-4bit")]["params"] == by_key[("tiny-gqa", "metatt")]["params"]


@pytest.mark.slow  # every config and provider: about 45 s on 2 cores
def test_model_preset_rows():
    rank, layers = 4, 2
    configs = ("llama7b-gqa8", "llama7b-mha")
    providers = _available(bm.PROVIDERS)
    progress = harness.Progress(bm.total_steps(True, configs, providers), force=False)
    rows = bm.run_model(
        CPU, torch.float32, _env(), rank=rank, layers=layers, progress=progress, providers=providers, **SMALL
    )
    assert progress.done == bm.total_steps(True, configs, providers)

    by_key = {(r["config"], r["provider"]): r for r in rows}
    assert set(by_key) == {(c, p) for c in ("tiny-gqa", "tiny-mha") for p in providers}
    _check_rows(by_key, layers, rank)
    # LoRA's count: r (d_in + d_out) per targeted projection.
    gqa = bm.CONFIGS["tiny-gqa"]
    kv = gqa.hidden // gqa.heads * gqa.kv_heads
    per_layer = rank * (2 * (2 * gqa.hidden) + 2 * (gqa.hidden + kv) + 3 * (gqa.hidden + gqa.intermediate))
    assert by_key[("tiny-gqa", "peft-lora")]["params"] == layers * per_layer
    # MHA's k/v join q/o in one 4-matrix group: the same cores count differently from GQA's.
    assert by_key[("tiny-mha", "metatt")]["params"] != by_key[("tiny-gqa", "metatt")]["params"]
    # the 4-bit pair adapts the same projections: the same counts as over the float base
    for config in ("tiny-gqa", "tiny-mha") if "peft-qlora" in providers else ():
        assert by_key[(config, "peft-qlora")]["params"] == by_key[(config, "peft-lora")]["params"]
        assert by_key[(config, "metatt-4bit")]["params"] == by_key[(config, "metatt")]["params"]


def _adapter_ignored(self, x, task_ids=None):
    return F.linear(x, self.weight, self.bias)


@pytest.mark.parametrize("breakage", ["adapter ignored", "wrong scaling"])
def test_gate_refuses_a_broken_adapter(monkeypatch, breakage):
    if breakage == "adapter ignored":
        # The adapter computes nothing: the output never moves from the frozen model's.
        monkeypatch.setattr(ttkernels.TTLinear, "forward", _adapter_ignored)
        expect = "does nothing"
    else:
        # The forward applies twice the scaling its delta-W says: the merged model disagrees. (Patched on the
        # layer, not on ops.tt_linear: the eager torch path of TTLinear does not call tt_linear.)
        real = ttkernels.TTLinear.adapter_forward

        def doubled(self, x, task_ids=None):
            scaling = self.scaling
            self.scaling = 2 * scaling
            try:
                return real(self, x, task_ids)
            finally:
                self.scaling = scaling

        monkeypatch.setattr(ttkernels.TTLinear, "adapter_forward", doubled)
        expect = "merging its delta-W"
    with pytest.warns(bm.ProviderCheckFailed, match=expect):
        rows = bm.run_model(
            CPU, torch.float32, _env(), rank=4, configs=("tiny-gqa",), providers=("frozen", "metatt"), **SMALL
        )
    assert [r["provider"] for r in rows] == ["frozen"]


def test_quantized_pair_without_bitsandbytes_is_skipped_with_a_warning(monkeypatch):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'bitsandbytes'")

    monkeypatch.setattr(bm, "_quantize_base", missing)
    with pytest.warns(bm.ProviderSkipped, match=r"ttkernels\[bnb\]"):
        rows = bm.run_model(
            CPU, torch.float32, _env(), rank=4, configs=("tiny-gqa",), providers=("frozen", "peft-qlora"), **SMALL
        )
    assert [r["provider"] for r in rows] == ["frozen"]
