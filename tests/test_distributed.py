"""Global negatives across processes (CPU / gloo): the 2-process contrastive loss and its
gradients equal the single-process values at the same global batch, for equal and unequal
shard sizes (a batch that lost skipped samples is smaller than the others)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from mmkd.losses import contrastive_loss, distributed_gather

WORLD = 2
TOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_problem(sizes: list[int]) -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A student projection, its inputs and the teacher embeddings for the global batch."""
    torch.manual_seed(0)
    student = nn.Linear(12, 8, bias=False).double()
    total = sum(sizes)
    inputs = torch.randn(total, 12, dtype=torch.float64)
    teacher = nn.functional.normalize(torch.randn(total, 8, dtype=torch.float64), dim=-1)
    scale = torch.tensor(7.0, dtype=torch.float64)
    return student, inputs, teacher, scale


def single_process(sizes: list[int]) -> tuple[float, torch.Tensor]:
    student, inputs, teacher, scale = make_problem(sizes)
    emb = nn.functional.normalize(student(inputs), dim=-1)
    loss = contrastive_loss(emb, teacher, scale)
    loss.backward()
    return loss.item(), student.weight.grad.clone()


def worker(rank: int, port: int, sizes: list[int], out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        student, inputs, teacher, scale = make_problem(sizes)
        start = sum(sizes[:rank])
        local = slice(start, start + sizes[rank])
        emb = nn.functional.normalize(student(inputs[local]), dim=-1)
        loss = contrastive_loss(emb, teacher[local], scale, distributed_gather)
        # DDP averages gradients over processes: a process holding n of the N samples weighs
        # its mean loss by WORLD * n / N so that the average is the global mean's gradient
        # (the factor is 1 for equal shards). The gradients reaching this process's rows from
        # the other processes' losses flow back through the gather.
        (loss * WORLD * sizes[rank] / sum(sizes)).backward()
        grad = student.weight.grad.clone()
        dist.all_reduce(grad)
        grad /= WORLD
        # the global loss is the sample-weighted mean of the per-process losses
        weighted = torch.tensor([loss.item() * sizes[rank]], dtype=torch.float64)
        dist.all_reduce(weighted)
        out[rank] = (weighted.item() / sum(sizes), grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("sizes", [[4, 4], [5, 3]], ids=["equal", "unequal"])
def test_two_process_contrastive_equals_single_process(sizes):
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        out = manager.dict()
        mp.start_processes(
            worker, args=(free_port(), sizes, out), nprocs=WORLD, start_method="spawn"
        )
        results = dict(out)
    loss, grad = single_process(sizes)
    for rank in range(WORLD):
        got_loss, got_grad = results[rank]
        assert abs(got_loss - loss) < TOL
        assert torch.allclose(got_grad, grad, atol=TOL, rtol=0)
