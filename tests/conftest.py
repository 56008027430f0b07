"""Every test gets fresh random inputs: a new seed each run, printed so a failure can be replayed
with TTKERNELS_TEST_SEED=<seed>. Without a GPU, Triton kernels run in the interpreter."""

import os
import random

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter. It must be on before ttkernels imports them
# (triton.jit decides at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# On a GPU, the many small test shapes would each start an autotuning search: one configuration per kernel
# (tests/test_triton.py turns autotuning on for its real-shape test).
os.environ.setdefault("TTKERNELS_TRITON_AUTOTUNE", "0")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = int(os.environ.get("TTKERNELS_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"[ttkernels test seed: TTKERNELS_TEST_SEED={seed}]")
    yield seed
