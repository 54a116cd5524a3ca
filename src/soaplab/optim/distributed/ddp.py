"""DDP mode: each rank runs SOAP/Shampoo only for the parameters it owns, then one all-gather
per param group (and dtype) copies every owner's updated values to all ranks.

Under DDP every rank holds the same parameters and, after the backward all-reduce, the same
gradients, so the owner's update is exactly the update the unsplit optimizer would make, and
copying the updated *values* (not the updates) keeps the replicas bitwise identical. The
gathered layout is fixed (every parameter of the group, in group order, padded to the largest
rank's share), so no rank can disagree with another about message sizes.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.device_mesh import DeviceMesh

from soaplab.optim.distributed.ownership import assign_owners, param_cost
from soaplab.optim.interface import Shell, Target
from soaplab.optim.kronecker import plan_factors

# ``all_gather_into_tensor`` is deprecated from torch 2.13 on, in favour of this name.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class OwnerSplit:
    """Who owns which parameter of one optimizer, and the collectives of a split step."""

    def __init__(self, optimizer: Shell, process_group: Any) -> None:
        self.optimizer = optimizer
        self.process_group = process_group
        self.rank = dist.get_rank(process_group)
        self.world_size = dist.get_world_size(process_group)
        self._owners: dict[Tensor, int] = {}
        self._layout: tuple[int, ...] = ()
        self._assignment: dict[Tensor, int] = {}
        self._assigned: tuple[int, ...] = ()

    @classmethod
    def create(cls, optimizer: Shell, process_group: Any) -> OwnerSplit | None:
        """None (the plain optimizer) without a process group or with a group of one rank."""
        if process_group is None:
            return None
        if not dist.is_initialized():
            raise ValueError("process_group was given but torch.distributed is not initialized; "
                             "call torch.distributed.init_process_group first")
        if dist.get_rank(process_group) < 0:
            raise ValueError("this process is not a member of the given process_group")
        if dist.get_world_size(process_group) == 1:
            return None
        return cls(optimizer, process_group)

    # -- ownership ------------------------------------------------------------------------------
    def assignment(self) -> dict[Tensor, int]:
        """Owner rank of every parameter, a pure function of the shapes (no communication);
        recomputed only when the parameter list changes."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        layout = tuple(id(p) for p in params)
        if layout != self._assigned:
            owners = dict(zip(params, assign_owners(self._costs(), self.world_size),
                              strict=True))
            moved = [p for p, r in self._assignment.items()
                     if p in owners and owners[p] != r and self.optimizer.state.get(p)]
            if moved:
                raise RuntimeError("adding parameters would move existing optimizer state to "
                                   "another rank; add every param group before the first step")
            self._assignment, self._assigned = owners, layout
        return self._assignment

    def owners(self) -> dict[Tensor, int]:
        """:meth:`assignment`, after the ranks checked that they agree on it (a collective,
        once per parameter list)."""
        owners = self.assignment()
        if self._assigned != self._layout:
            params = list(owners)
            self._check_ranks_agree(self._costs(), params)
            self._owners, self._layout = owners, self._assigned
            self._new_layout(params)
        return self._owners

    def mesh(self) -> DeviceMesh:
        """The 1-D device mesh of the process group, on which checkpoints place the state."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return DeviceMesh.from_group(self.process_group, self._device(params).type)

    def _new_layout(self, params: list[Tensor]) -> None:
        """Hook for what else must follow the parameter list (collective: every rank calls it)."""

    def owns(self, p: Tensor) -> bool:
        """From the assignment of the last :meth:`owners` call (made by every rank each step)."""
        return self._owners[p] == self.rank

    def _costs(self) -> list[int]:
        costs = []
        for group in self.optimizer.param_groups:
            kwargs = self.optimizer.plan_kwargs(group)
            for p in group["params"]:
                plan = plan_factors(tuple(p.shape), **kwargs)
                costs.append(param_cost(plan.shape, plan.axes))
        return costs

    def _check_ranks_agree(self, costs: list[int], params: list[Tensor]) -> None:
        """Ranks with different parameter lists would assign different owners: fail loudly."""
        digest = sum((i + 1) * c for i, c in enumerate(costs)) % (2**61 - 1)
        mine = torch.tensor([len(costs), digest], dtype=torch.int64, device=self._device(params))
        everyone = torch.empty(self.world_size * 2, dtype=torch.int64, device=mine.device)
        all_gather_single(everyone, mine, group=self.process_group)
        if not bool((everyone.view(-1, 2) == mine).all()):
            raise ValueError("ranks disagree on the optimizer's parameters (count or shapes); "
                             "every rank must build the same model and param groups")

    @staticmethod
    def _device(params: list[Tensor]) -> torch.device:
        return params[0].device if params else torch.device("cpu")

    # -- collectives of a step ---------------------------------------------------------------
    def all_agree(self, ok: bool) -> bool:
        """True on every rank iff it is True on every rank (one tiny all-reduce).

        Every rank passes here at the start of each step, so this is also where the ownership
        is (re)computed: that may run a collective, which must never happen on one rank alone.
        The same all-reduce checks that every rank has gradients for the same parameters.
        """
        self.owners()
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        flags = torch.tensor([int(ok), *(int(p.grad is not None) for p in params)],
                             dtype=torch.int32, device=self._device(params))
        dist.all_reduce(flags, group=self.process_group)
        if any(f not in (0, self.world_size) for f in flags[1:].tolist()):
            raise RuntimeError("ranks disagree on which parameters have a gradient; every rank "
                               "must run the same backward")
        return int(flags[0]) == self.world_size

    def any_error(self, error: str | None) -> str | None:
        """This rank's error message, else the first other rank's, else None: on every rank
        (a collective), so that all ranks raise together instead of some waiting forever."""
        errors: list[str | None] = [None] * self.world_size
        dist.all_gather_object(errors, error, group=self.process_group)
        if error is not None:
            return error
        return next((f"on rank {r}: {e}" for r, e in enumerate(errors) if e is not None), None)

    def targets(self, group: dict[str, Any]) -> list[Target]:
        """What this rank steps: its own parameters that have a gradient, as they are."""
        return [(p, p, p.grad) for p in group["params"] if p.grad is not None and self.owns(p)]

    def finish(self, group: dict[str, Any], targets: list[Target]) -> None:
        """Copy each owner's parameter values of ``group`` to every rank."""
        owners = self.owners()
        for params in kinds(p for p in group["params"] if p.numel() > 0):
            shares = [[p for p in params if owners[p] == r] for r in range(self.world_size)]
            width = max(sum(p.numel() for p in share) for share in shares)
            send = params[0].new_zeros(width)
            if shares[self.rank]:
                flat = torch.cat([p.detach().reshape(-1) for p in shares[self.rank]])
                send[:flat.numel()] = flat
            received = params[0].new_empty(self.world_size * width)
            all_gather_single(received, send, group=self.process_group)
            for r, share in enumerate(shares):
                if r == self.rank:
                    continue
                offset = r * width
                for p in share:
                    p.copy_(received[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()


def kinds(params: Iterable[Tensor]) -> list[list[Tensor]]:
    """Parameters split by (dtype, device): one message each, in parameter order."""
    out: dict[tuple, list[Tensor]] = defaultdict(list)
    for p in params:
        out[(p.dtype, p.device)].append(p)
    return list(out.values())
