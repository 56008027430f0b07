"""MetaTT under DDP and FSDP2: two CPU processes (gloo) give the shared cores the gradients of one process.

The model is a small LLaMA (random weights) with a MetaTT adapter on every projection; its shared cores are
the only trainable parameters and are registered both on the wrapper and in every view. Each process takes
half of a fixed batch; the loss is a batch mean, so the averaged gradients must equal the whole batch's in
one process.

* DDP: no flags needed (DDP deduplicates the shared Parameters by identity).
* FSDP2 (``fully_shard``), the supported wrapping (README, "Distributed training"): each decoder layer with
  ``ignored_params=set(wrapper.shared_parameters())``, so that its frozen base weights are sharded per layer while
  the cores stay with the root, then the wrapper itself. Gradients are compared after ``full_tensor()``, and a
  few AdamW steps must lower the loss identically on both ranks.
"""

from __future__ import annotations

import faulthandler
import gc
import os
import socket
import sys
from datetime import timedelta

import pytest
import torch

from helpers import require, tiny_llama_config

transformers = require("transformers")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import torch.multiprocessing as mp  # noqa: E402

from ttkernels import MetaTTConfig, get_metatt_model  # noqa: E402

WORLD = 2
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make(seed: int = 0):
    torch.manual_seed(seed)
    w = get_metatt_model(transformers.LlamaForCausalLM(tiny_llama_config()), MetaTTConfig(TARGETS, rank=4))
    with torch.no_grad():
        for p in w.metatt_cores.parameters():
            p.normal_(0.0, 0.3)
    return w


def batch():
    g = torch.Generator().manual_seed(7)
    return torch.randint(1, 64, (4, 6), generator=g), torch.randn(4, 6, 64, generator=g)


def loss_fn(model, ids, target):
    return (model(ids).logits - target).square().mean()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(rank: int, kind: str, out: str) -> None:
    w = make()
    ids, target = batch()
    half = ids.shape[0] // WORLD
    ids, target = ids[rank * half : (rank + 1) * half], target[rank * half : (rank + 1) * half]
    cores = w.shared_parameters()
    if kind == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(w)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (WORLD,))
        for layer in w.model.model.layers:
            fully_shard(layer, mesh=mesh, ignored_params=set(cores))
        model = fully_shard(w, mesh=mesh)
        cores = w.shared_parameters()  # now DTensor Parameters, shared by the views
    loss_fn(model, ids, target).backward()
    grads = [(c.grad.full_tensor() if hasattr(c.grad, "full_tensor") else c.grad).clone() for c in cores]
    opt = torch.optim.AdamW(cores, lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = loss_fn(model, ids, target)
        loss.backward()
        opt.step()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / WORLD)
    if rank == 0:
        torch.save({"grads": grads, "losses": losses}, out)


def _worker(rank: int, kind: str, port: int, out: str) -> None:
    # a fatal signal (a C++ abort in any thread) prints every thread's Python stack to the test's captured stderr
    faulthandler.enable(all_threads=True)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        _train(rank, kind, out)  # the model, its FSDP state and the optimizer go with this frame
        gc.collect()
        dist.barrier()  # no rank tears down while the other one still communicates
    finally:
        dist.destroy_process_group()
    # Everything this process had to do is done (and rank 0's result is on disk). torch keeps the gloo group's
    # worker threads past destroy_process_group, and interpreter finalization can then abort the process
    # ("terminate called without an active exception": a gloo thread freeing a tensor that needs the GIL while the
    # interpreter shuts down, a torch teardown race that no ttkernels code takes part in). Leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_processes_give_the_shared_cores_one_process_gradients(kind, tmp_path):
    out = str(tmp_path / "rank0.pt")
    # the children import this file by name
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    mp.spawn(_worker, args=(kind, _free_port(), out), nprocs=WORLD, join=True)
    result = torch.load(out, weights_only=True)
    w = make()
    ids, target = batch()
    loss_fn(w, ids, target).backward()
    want = [c.grad for c in w.metatt_cores.parameters()]
    assert len(result["grads"]) == len(want)
    for got, ref in zip(result["grads"], want):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    losses = result["losses"]
    assert losses[-1] < losses[0], losses
