"""Shared set-up of the distributed tests: gloo process groups on CPU, a tiny problem, and
gradients that every process (and the single-process reference) can regenerate exactly."""

from __future__ import annotations

import faulthandler
import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from soaplab import SOAP, Shampoo
from soaplab.torchrun import leave

# Matrices (square and not), a 4-D conv weight, vectors and a shape with a 1-sized axis, in two
# param groups: every kind of factor plan, and two all-gathers per step.
SHAPES = [(16, 8), (8, 12), (12, 12), (12, 12), (4, 3, 3, 3), (5, 1)]
VECTOR_SHAPES = [(8,), (12,)]
STEPS = 20
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "soap": lambda groups, **kw: SOAP(groups, lr=1e-2, precondition_frequency=3, **kw),
    # every lossy storage option, int8 bases included (their scales are extra state entries)
    "soap_lowmem": lambda groups, **kw: SOAP(groups, lr=1e-2, precondition_frequency=3,
                                             factor_storage="packed_bf16", basis_storage="int8",
                                             momentum_storage="bf16", **kw),
    "shampoo": lambda groups, **kw: Shampoo(groups, lr=1e-2, precondition_frequency=3,
                                           weight_decay=0.01, **kw),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Run ``fn(rank, world_size, *args)`` in ``world_size`` gloo processes; re-raise failures."""
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def _entry(rank: int, fn: Callable[..., None], world_size: int, port: int, args: tuple) -> None:
    faulthandler.enable()  # a worker killed by a signal says where it was
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    clean = False
    try:
        fn(rank, world_size, *args)
        clean = True
    finally:
        leave(clean)


def make_model(seed: int = 0) -> torch.nn.ParameterList:
    """The same parameters in every process."""
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.ParameterList(torch.randn(s, generator=gen) for s in SHAPES + VECTOR_SHAPES)


def param_groups(model: torch.nn.ParameterList) -> list[dict[str, Any]]:
    params = list(model)
    return [{"params": params[:len(SHAPES)]},
            {"params": params[len(SHAPES):], "weight_decay": 0.0}]


def gradients(step: int, source: int = 0) -> list[torch.Tensor]:
    """Gradients of one step, a pure function of (step, source)."""
    gen = torch.Generator().manual_seed(1000 * step + source)
    return [torch.randn(s, generator=gen) for s in SHAPES + VECTOR_SHAPES]


def shard(model: torch.nn.Module, dim: int = 0) -> torch.nn.Module:
    """FSDP2 over every rank: each parameter becomes a DTensor sharded along ``dim`` where
    that splits evenly (FSDP2 allows uneven shards only on dim 0), else along dim 0."""
    world_size = dist.get_world_size()
    mesh = init_device_mesh("cpu", (world_size,))

    def placement(p: torch.nn.Parameter) -> Shard:
        return Shard(dim if p.dim() > dim and p.shape[dim] % world_size == 0 else 0)

    return fully_shard(model, mesh=mesh, shard_placement_fn=placement)


def full(p: torch.Tensor) -> torch.Tensor:
    """The whole value of a parameter, sharded (DTensor) or not."""
    return p.full_tensor() if isinstance(p, DTensor) else p.detach()


def set_grads(model: torch.nn.ParameterList, grads: list[torch.Tensor]) -> None:
    """Give every parameter its full gradient (a DTensor one its own shard of it)."""
    for p, g in zip(model, grads, strict=True):
        p.grad = distribute_tensor(g, p.device_mesh, p.placements, src_data_rank=None) \
            if isinstance(p, DTensor) else g.clone()


def max_diff(a: torch.nn.ParameterList, b: torch.nn.ParameterList) -> float:
    return max((full(p) - full(q)).abs().max().item() for p, q in zip(a, b, strict=True))


def check_owned_state(name: str, model: torch.nn.ParameterList, split: torch.optim.Optimizer,
                      plain: torch.optim.Optimizer) -> list[int]:
    """Each rank holds state for exactly the parameters it owns, every parameter has one
    owner, and the ranks' state adds up to the unsplit optimizer's. Returns bytes per rank."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    owners = split.split.owners()
    mine = {i for i, p in enumerate(model) if owners[p] == rank}
    held = {i for i, p in enumerate(model) if split.state.get(p)}
    assert held == mine, f"{name}: rank {rank} holds state of {held}, owns {mine}"
    everyone: list = [None] * world_size
    dist.all_gather_object(everyone, (sorted(mine), split.state_bytes()))
    owned = [i for indices, _ in everyone for i in indices]
    assert sorted(owned) == list(range(len(model))), "every parameter has one owner"
    assert sum(b for _, b in everyone) == plain.state_bytes()
    return [b for _, b in everyone]


def kib(per_rank: list[int]) -> str:
    """Bytes per rank, as the KiB list the tests print."""
    return ", ".join(f"{b / 1024:.1f}" for b in per_rank)


def tracks_one_process(make: Callable[[], torch.nn.Sequential],
                       distribute: Callable[[torch.nn.Module], Any], label: str,
                       split_batch: bool) -> None:
    """Real training of ``make()``, laid out by ``distribute``, against one process on the whole
    batch, with SOAP at max_precond_dim=0 (Adam in the identity basis, the same code path:
    parameters within 1e-6) and with SOAP itself (losses within 1%: its first basis comes from
    one gradient, so every non-square factor is rank-deficient and eigh picks an arbitrary
    basis of its null space, where Adam turns the collectives' rounding into O(1) steps).
    With ``split_batch`` each rank trains on its slice of the batch (data parallel), else on
    all of it (tensor parallel)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    for kwargs in ({"max_precond_dim": 0}, {}):
        parallel, plain = make(), make()
        distribute(parallel)
        opt = SOAP(parallel.parameters(), lr=1e-2, precondition_frequency=3, **kwargs)
        reference = SOAP(plain.parameters(), lr=1e-2, precondition_frequency=3, **kwargs)
        gen = torch.Generator().manual_seed(0)
        worst = 0.0
        for _ in range(STEPS):
            x = torch.randn(24, plain[0].in_features, generator=gen)
            y = torch.randn(24, plain[-1].out_features, generator=gen)
            mine = slice(rank * 24 // world_size, (rank + 1) * 24 // world_size) \
                if split_batch else slice(None)
            losses = []
            for model, optimizer, part in ((parallel, opt, mine), (plain, reference, slice(None))):
                loss = torch.nn.functional.mse_loss(model(x[part]), y[part])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.detach())
            if split_batch:
                dist.all_reduce(losses[0])
                losses[0] /= world_size
            worst = max(worst, abs(losses[0].item() / losses[1].item() - 1))
        diff = max((full(p) - q).abs().max().item()
                   for p, q in zip(parallel.parameters(), plain.parameters(), strict=True))
        if kwargs:
            assert diff <= 1e-6, f"identity basis: parameters differ by {diff:.3g}"
        assert worst <= 1e-2, f"{kwargs}: losses differ from one process by {worst:.2%}"
        if rank == 0:
            print(f"{label} {kwargs or 'SOAP'}, {world_size} ranks: largest relative loss "
                  f"difference {worst:.2g}, parameter difference {diff:.2g}")
