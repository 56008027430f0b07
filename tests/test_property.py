"""Property tests over random specs, shapes and dtypes: forward and gradients equal the dense float64
formula."""

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ttkernels as tk
from helpers import TOL, dense_ref
from ttkernels.spec import Mode, TTSpec


@st.composite
def problems(draw):
    in_modes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    out_modes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    idx = []
    if draw(st.booleans()):
        idx.append(Mode.index("layer", draw(st.integers(1, 4))))
    if draw(st.booleans()):
        idx.append(Mode.task(draw(st.integers(1, 3))))
    if draw(st.booleans()):
        idx.append(Mode.index("matrix", draw(st.integers(1, 3))))
    n_bonds = len(in_modes) + len(out_modes) + len(idx) - 1
    ranks = draw(st.one_of(st.integers(1, 4), st.lists(st.integers(1, 4), min_size=n_bonds, max_size=n_bonds)))
    spec = TTSpec.build(in_modes, out_modes, ranks, index_modes=idx)
    lead = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bfloat16]))
    index = {m.name: draw(st.integers(0, m.size - 1)) for m in idx if not m.per_sample}
    return spec, lead, dtype, index, draw(st.floats(0.25, 2.0)), draw(st.integers(0, 2**31))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_random_specs_match_dense_float64(problem):
    spec, lead, dtype, index, scaling, seed = problem
    g = torch.Generator().manual_seed(seed)
    d_in, d_out = spec.in_features, spec.out_features
    cores64 = [torch.randn(s, generator=g, dtype=torch.float64) * 0.5 for s in spec.core_shapes]
    W = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * d_in**-0.5
    b = torch.randn(d_out, generator=g, dtype=torch.float64)
    x64 = torch.randn(*lead, d_in, generator=g, dtype=torch.float64)
    ps = spec.per_sample_mode
    ids = torch.randint(0, ps.size, lead[:1], generator=g) if ps else None
    full_ids = ids.reshape(ids.shape + (1,) * (len(lead) - 1)).expand(lead) if ps else None

    xr = x64.clone().requires_grad_()
    cr = [c.clone().requires_grad_() for c in cores64]
    yr = dense_ref(xr, W, b, cr, spec, scaling, index, full_ids)
    dy = torch.randn(yr.shape, generator=g, dtype=torch.float64)
    yr.backward(dy)

    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    x = x64.to(dtype).requires_grad_()
    cores = [c.to(cdtype).requires_grad_() for c in cores64]
    y = tk.tt_linear(x, W.to(dtype), b.to(dtype), cores, spec, index=index, task_ids=ids, scaling=scaling)
    y.backward(dy.to(dtype))
    atol, rtol = TOL[dtype]
    # errors grow with the contraction lengths: scale the tolerance by them
    k = max(d_in, d_out, 1) ** 0.5 * max(1, x64.numel() // max(d_in, 1)) ** 0.5
    torch.testing.assert_close(y.double(), yr, atol=atol * k * 4, rtol=rtol * 4)
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=atol * k * 4, rtol=rtol * 4)
    for c, c_ref in zip(cores, cr):
        torch.testing.assert_close(c.grad.double(), c_ref.grad, atol=atol * k * 8, rtol=rtol * 8)
