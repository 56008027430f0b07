"""TT-matrix (MPO) adapters: cores ``(r_{k-1}, m_k, n_k, r_k)``, one out mode and one in mode each.

The adapter's delta-W (``d_out x d_in``) is

    dW[(o_1..o_K), (i_1..i_K)] = G_1[:, o_1, i_1, :] G_2[:, o_2, i_2, :] ... G_K[:, o_K, i_K, :]

with C-order flattening of the out indices and of the in indices (the tltorch / torchTT convention: out before
in inside a core). There is no rank bottleneck, so the bottleneck kernels do not apply; Kronecker adapters
(LoKr, KronA) are the bond-rank-1 case: two cores of bond 1 give ``dW = A kron B``.

The package, from the bottom up:

* :mod:`~ttkernels.ttm.spec` — :class:`TTMSpec` (on :class:`~ttkernels.spec.ChainSpec`, as ``TTSpec``);
* :mod:`~ttkernels.ttm.reference` — the dense delta-W, the einsum sweep with its analytic backward, the
  Kronecker-sum form and the kernels' contract in torch (any dtype: the ground truth of the tests);
* :mod:`~ttkernels.ttm.dispatch` — what ``backend="auto"`` runs on a GPU (measured, failures reported);
* :mod:`~ttkernels.ttm.ops` — :func:`ttm_apply`, the registered Kronecker-sum ops and their autograd;
* :mod:`~ttkernels.ttm.layer` — :class:`TTMLinear` on the adapter-layer base.
"""

from . import dispatch, ops, reference
from .dispatch import dispatch_model
from .layer import TTMLinear
from .ops import TTM_BACKENDS, ttm_apply, ttm_dispatch
from .reference import (
    KronSplit,
    choose_split,
    kron_apply_ref,
    kron_factors,
    kron_grad_p_ref,
    kron_grad_q_ref,
    kron_splits,
    kron_views,
    ttm_dense,
    ttm_plan,
)
from .spec import TTMSpec

__all__ = [
    "TTMLinear",
    "TTMSpec",
    "TTM_BACKENDS",
    "KronSplit",
    "choose_split",
    "dispatch",
    "dispatch_model",
    "kron_apply_ref",
    "kron_factors",
    "kron_grad_p_ref",
    "kron_grad_q_ref",
    "kron_splits",
    "kron_views",
    "ops",
    "reference",
    "ttm_apply",
    "ttm_dense",
    "ttm_dispatch",
    "ttm_plan",
]
