"""Fuzzing the MetaTT loader: random edits of ``adapter_config.json`` fields and of the safetensors header.

Every outcome must be a correct load (finite outputs) or a clear error (ValueError, TypeError,
FileNotFoundError with a message), with the model left as it was after an error, and never an allocation
beyond what the file holds: the cores the loader allocates are counted and bounded by the file's size.
The fast variant runs a few dozen cases; ``slow`` runs many more.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_guarantees import assert_same_state, net, randomize, state

from ttkernels import metatt as metatt_module
from ttkernels.metatt import CONFIG_NAME, WEIGHTS_NAME, MetaTTConfig, MetaTTModel, get_metatt_model

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.sampled_from([0, 1, 2, 3, 8, 6, 4096, 10**9, 10**12, -1])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(["8x8", "8x6", "layers.0.q", "float64", "F32", "I64", "([\\w.]+)+!", "task", "layer"])
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@pytest.fixture(scope="module")
def good_folder():
    folder = tempfile.mkdtemp(prefix="ttk-fuzz-")
    w = get_metatt_model(net(), MetaTTConfig(["q", "v"], rank=3, modes=("layer", "matrix", "task"), num_tasks=2))
    randomize(w)
    w.save_pretrained(folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _paths(node, prefix=()):
    """Every place in a JSON tree: (path, container kind)."""
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, (*prefix, i))


def _edit(tree, data):
    """One random edit of a JSON tree: replace a value, delete a key or an item, or add a key."""
    path = data.draw(st.sampled_from(list(_paths(tree))))
    action = data.draw(st.sampled_from(["replace", "delete", "add"]))
    if not path:
        return data.draw(VALUES) if action == "replace" else tree
    parent = tree
    for key in path[:-1]:
        parent = parent[key]
    last = path[-1]
    if action == "delete":
        del parent[last]
    elif action == "add" and isinstance(parent, dict):
        parent[data.draw(st.text(max_size=8))] = data.draw(VALUES)
    else:
        parent[last] = data.draw(VALUES)
    return tree


def _split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _check_load(folder, monkeypatch) -> None:
    allocated = []
    real = metatt_module.new_cores

    def counting(spec, *args, **kwargs):
        allocated.append(spec.num_params)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr(metatt_module, "new_cores", counting)
    model = net()
    before = state(model)
    try:
        w = MetaTTModel.from_pretrained(model, folder)
    except (ValueError, TypeError, FileNotFoundError) as e:
        assert str(e)
        assert_same_state(before, state(model))
    else:
        w.eval()
        y = w(torch.randn(2, 8), task_ids=torch.tensor([0, 1]))
        assert torch.isfinite(y).all()
    # nothing beyond the declared tensors, which the file holds: at least 2 bytes per element
    assert 2 * sum(allocated) <= os.path.getsize(os.path.join(folder, WEIGHTS_NAME))


def _fuzz_config(good_folder, monkeypatch, data):
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(good_folder, folder, dirs_exist_ok=True)
        with open(os.path.join(folder, CONFIG_NAME)) as f:
            layout = json.load(f)
        for _ in range(data.draw(st.integers(1, 3))):
            layout = _edit(layout, data)
        with open(os.path.join(folder, CONFIG_NAME), "w") as f:
            json.dump(layout, f)
        _check_load(folder, monkeypatch)


def _fuzz_header(good_folder, monkeypatch, data):
    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(good_folder, folder, dirs_exist_ok=True)
        file = os.path.join(folder, WEIGHTS_NAME)
        with open(file, "rb") as f:
            raw = f.read()
        header, body = _split(raw)
        kind = data.draw(st.sampled_from(["edit", "edit", "length", "truncate"]))
        if kind == "edit":
            for _ in range(data.draw(st.integers(1, 3))):
                header = _edit(header, data)
            text = json.dumps(header).encode()
            raw = struct.pack("<Q", len(text)) + text + body
        elif kind == "length":
            raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8:]
        else:
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        with open(file, "wb") as f:
            f.write(raw)
        _check_load(folder, monkeypatch)


FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(data=st.data())
def test_fuzzed_configs_load_correctly_or_fail_clearly(good_folder, monkeypatch, data):
    _fuzz_config(good_folder, monkeypatch, data)


@FAST
@given(data=st.data())
def test_fuzzed_safetensors_headers_load_correctly_or_fail_clearly(good_folder, monkeypatch, data):
    _fuzz_header(good_folder, monkeypatch, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_fuzzed_configs_many(good_folder, monkeypatch, data):
    _fuzz_config(good_folder, monkeypatch, data)


@pytest.mark.slow
@SLOW
@given(data=st.data())
def test_fuzzed_headers_many(good_folder, monkeypatch, data):
    _fuzz_header(good_folder, monkeypatch, data)


# ------------------------------------------------------------------------------------------------ load_tt_lora
@pytest.fixture(scope="module")
def good_tt_lora_folder():
    from test_guarantees import saved_tt_lora

    folder = tempfile.mkdtemp(prefix="ttk-fuzz-lora-")
    saved_tt_lora(__import__("pathlib").Path(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def _fuzz_tt_lora(good_folder, data, what):
    from test_guarantees import _tiny

    from ttkernels import peft as tkpeft

    with tempfile.TemporaryDirectory() as folder:
        shutil.copytree(good_folder, folder, dirs_exist_ok=True)
        if what == "config":
            with open(os.path.join(folder, "adapter_config.json")) as f:
                config = json.load(f)
            for _ in range(data.draw(st.integers(1, 3))):
                config = _edit(config, data)
            with open(os.path.join(folder, "adapter_config.json"), "w") as f:
                json.dump(config, f)
        else:
            file = os.path.join(folder, "adapter_model.safetensors")
            with open(file, "rb") as f:
                header, body = _split(f.read())
            header = _edit(header, data)
            text = json.dumps(header).encode()
            with open(file, "wb") as f:
                f.write(struct.pack("<Q", len(text)) + text + body)
        model = _tiny()
        before = state(model)
        try:
            loaded = tkpeft.load_tt_lora(model, folder, in_modes=2)
        except (ValueError, TypeError, FileNotFoundError) as e:
            assert str(e)
            assert_same_state(before, state(model))
        else:
            assert torch.isfinite(loaded(torch.randn(2, 16))).all()


@FAST
@given(data=st.data(), what=st.sampled_from(["config", "header"]))
def test_fuzzed_tt_lora_folders_load_correctly_or_fail_clearly(good_tt_lora_folder, data, what):
    _fuzz_tt_lora(good_tt_lora_folder, data, what)


@pytest.mark.slow
@SLOW
@given(data=st.data(), what=st.sampled_from(["config", "header"]))
def test_fuzzed_tt_lora_folders_many(good_tt_lora_folder, data, what):
    _fuzz_tt_lora(good_tt_lora_folder, data, what)
