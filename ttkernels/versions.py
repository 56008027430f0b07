"""What the layers can see of a change to a parameter, for the values they keep between calls (the lean path's
plans and factors, the merge guard's fingerprint).

torch's in-place version counter (``Tensor._version``) moves with every in-place op that autograd sees, most
optimizer steps included. torch.optim's fused kernels (``fused=True``: ``_fused_adam_``, ``_fused_sgd_`` and the
like) write the parameters without moving it, so the count of optimizer steps goes into every key as well:
:data:`STEPS`, counted by torch.optim's global post-step hook, which every ``torch.optim.Optimizer`` runs, fused
or not. After any step every kept value is rebuilt once. Writes through ``.data`` and optimizers outside
torch.optim that bypass the version counter stay invisible (README, "Per-call overhead").
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["STEPS", "fingerprint"]

STEPS = 0  # optimizer steps taken in this process (any torch.optim optimizer)


def _count(optimizer, args, kwargs) -> None:
    global STEPS
    STEPS += 1


_HANDLE = register_optimizer_step_post_hook(_count)


def fingerprint(params: Sequence[Tensor]) -> tuple:
    """What changes when one of ``params`` is replaced, updated in place or stepped by an optimizer."""
    return (STEPS, *((id(p), p._version) for p in params))
