"""Every test gets fresh random inputs: a new seed each run, printed so a failure can be replayed
with TTKERNELS_TEST_SEED=<seed>."""

import os
import random

import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = int(os.environ.get("TTKERNELS_TEST_SEED", random.randrange(2**31)))
    torch.manual_seed(seed)
    random.seed(seed)
    request.node.user_properties.append(("seed", seed))
    print(f"[ttkernels test seed: TTKERNELS_TEST_SEED={seed}]")
    yield seed
