"""Shared set-up of the distributed tests: gloo process groups on CPU, a tiny problem, and
gradients that every process (and the single-process reference) can regenerate exactly."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from soaplab import SOAP, Shampoo

# Matrices (square and not), a 4-D conv weight, vectors and a shape with a 1-sized axis, in two
# param groups: every kind of factor plan, and two all-gathers per step.
SHAPES = [(16, 8), (8, 12), (12, 12), (12, 12), (4, 3, 3, 3), (5, 1)]
VECTOR_SHAPES = [(8,), (12,)]
STEPS = 20
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "soap": lambda groups, **kw: SOAP(groups, lr=1e-2, precondition_frequency=3, **kw),
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
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, world_size, *args)
    finally:
        dist.destroy_process_group()


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


def set_grads(model: torch.nn.ParameterList, grads: list[torch.Tensor]) -> None:
    for p, g in zip(model, grads, strict=True):
        p.grad = g.clone()


def max_diff(a: torch.nn.ParameterList, b: torch.nn.ParameterList) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a, b, strict=True))
