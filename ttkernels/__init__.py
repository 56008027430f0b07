"""ttkernels: tensor-train adapters of frozen linear layers, computed without building delta-W.

Public API:

* :class:`TTLinear` — a drop-in ``nn.Linear`` with a frozen base and a trainable TT adapter;
* :class:`TTSpec`, :class:`Mode`, :func:`factorize` — the definition of an adapter;
* :class:`MetaTTConfig`, :func:`get_metatt_model`, :class:`MetaTTModel` — one shared TT for a whole model;
* :mod:`ttkernels.peft` — TT adapters through PEFT (imported on demand: it imports peft);
* :mod:`ttkernels.init` — initialization and the scaling rule that lets TT adapters train at LoRA's settings;
* :mod:`ttkernels.rank` — TT-SVD, rounding, two-site sweeps, LoRA <-> TT, rank schedules for training;
* :func:`tt_linear`, :func:`tt_adapter` — the functional forms, backed by the ``torch.ops.ttkernels`` ops;
* :mod:`ttkernels.reference` — the pure-torch ground truth (the ``torch`` backend).

Importing ttkernels needs no GPU and no compiled extension; the CUDA extension loads lazily.
"""

from . import init, ops, rank, reference
from .metatt import MetaTTConfig, MetaTTModel, get_metatt_model
from .modules import TTLinear
from .ops import BACKENDS, BackendUnavailableError, tt_adapter, tt_linear
from .spec import Mode, TTSpec, factorize

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "MetaTTConfig",
    "MetaTTModel",
    "Mode",
    "TTLinear",
    "TTSpec",
    "__version__",
    "factorize",
    "get_metatt_model",
    "init",
    "ops",
    "rank",
    "reference",
    "tt_adapter",
    "tt_linear",
]
