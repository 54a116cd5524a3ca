"""Checkpoints of a split optimizer: per-rank shards, a consolidated full state, and the checks
that turn a wrong checkpoint into an error instead of a silently fresh state.

``optimizer.state_dict()`` in DDP mode holds only the rank's own state, marked with the rank and
world size: cheap, and what ``torch.distributed.checkpoint`` (DCP) saves, since DCP keys every
entry by parameter name and so reshards across world sizes by itself. For ``torch.save``,
:func:`full_state_dict` consolidates every rank's state into the state dict a single process
would have; it loads into any world size, split or not. The checks that do not depend on the
split (shapes, finiteness, dtypes) are ``soaplab.optim.state``'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from soaplab.optim.distributed.ddp import OwnerSplit
from soaplab.optim.interface import Shell
from soaplab.optim.state import checked_state

SHARD_KEY = "distributed"


def mark_shard(state_dict: dict[str, Any], split: OwnerSplit | None) -> dict[str, Any]:
    """Tag a split optimizer's state dict as the shard of one rank."""
    if split is not None:
        state_dict[SHARD_KEY] = {"rank": split.rank, "world_size": split.world_size}
    return state_dict


def full_state_dict(optimizer: Shell) -> dict[str, Any]:
    """The complete state dict on every rank (a collective: call it on all ranks).

    Its tensors are on the CPU; it costs one all-gather of the whole optimizer state, so every
    rank briefly holds all of it. A plain (unsplit) optimizer returns its ``state_dict()``.
    """
    state_dict = optimizer.state_dict()
    split = optimizer.split
    if split is None:
        return state_dict
    local = {index: {name: value.detach().cpu().clone() if torch.is_tensor(value) else value
                     for name, value in entry.items()}
             for index, entry in state_dict["state"].items()}
    parts: list[Any] = [None] * split.world_size
    dist.all_gather_object(parts, local, group=split.process_group)
    state = {}
    for part in parts:
        state.update(part)
    return {"state": dict(sorted(state.items())), "param_groups": state_dict["param_groups"]}


def state_to_load(optimizer: Shell, state_dict: Any) -> tuple[list[dict[str, Any]],
                                                              dict[Tensor, dict[str, Any]]]:
    """The param groups and the state this rank should load, after checking they fit.

    Raises ValueError for a shard of another rank or world size, for what
    ``state.checked_state`` refuses, and for a shard holding state of a parameter this rank
    does not own. Ranks compare verdicts, so every rank raises when any rank's part is wrong.
    """
    split = optimizer.split
    if split is None:
        return _checked(optimizer, state_dict, None)
    split.owners()  # collective on first use: every rank must reach it before any error
    try:
        kept, error = _checked(optimizer, state_dict, split), None
    except ValueError as err:
        kept, error = ([], {}), str(err)
    error = split.any_error(error)
    if error is not None:
        raise ValueError(error)
    return kept


def _checked(optimizer: Shell, state_dict: Any, split: OwnerSplit | None
             ) -> tuple[list[dict[str, Any]], dict[Tensor, dict[str, Any]]]:
    shard = state_dict.get(SHARD_KEY) if isinstance(state_dict, dict) else None
    here = None if split is None else {"rank": split.rank, "world_size": split.world_size}
    if shard is not None and shard != here:
        where = "a process without a split" if here is None else \
            f"rank {here['rank']} of {here['world_size']}"
        raise ValueError(f"this state dict is the shard of rank {shard['rank']} of "
                         f"{shard['world_size']} and cannot load on {where}; save "
                         "soaplab.optim.distributed.full_state_dict(optimizer) instead, or use "
                         "torch.distributed.checkpoint, to change the world size")
    groups, state = checked_state(optimizer, state_dict)
    if split is None:
        return groups, state
    numbers = {p: i for i, p in enumerate(p for g in groups for p in g["params"])}
    for param in list(state):
        if split.owns(param):
            continue
        if shard is not None:
            raise ValueError(f"this rank's shard holds state of parameter {numbers[param]}, "
                             f"which rank {split.owners()[param]} owns now: the parameter "
                             "list changed")
        del state[param]
    return groups, state
