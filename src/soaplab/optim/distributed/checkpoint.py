"""Checkpoints of a split optimizer: the exported layout, a consolidated full state, and the
checks that turn a wrong checkpoint into an error instead of a silently fresh state.

Inside, a parameter's state lives whole on its owner rank. ``optimizer.state_dict()`` in a
split mode exports it in the layout torch's checkpoint helpers expect of a sharded model (see
"State layout" in docs/distributed.md): every rank has an entry for every parameter with
state, each tensor a DTensor placed ``Shard(0)`` on the split's 1-D mesh (scattered from the
owner), every other value (``step``) the owner's. So ``get/set_optimizer_state_dict`` at
``strict=True`` find every parameter, DCP saves each rank's slice and reshards across world
sizes, and their ``full_state_dict=True`` path gathers every entry whole, whoever owns it.
Loading gathers each entry whole and keeps it on its owner. :func:`full_state_dict`
consolidates for ``torch.save``. The checks that do not depend on the split (shapes,
finiteness, dtypes) are ``soaplab.optim.state``'s.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from soaplab.optim.distributed.ddp import OwnerSplit
from soaplab.optim.interface import Shell
from soaplab.optim.state import checked_state

SHARD_KEY = "distributed"


def export(optimizer: Shell, state_dict: dict[str, Any]) -> dict[str, Any]:
    """A split optimizer's state dict in the exported layout (a collective: every rank), tagged
    with the rank and world size; a plain optimizer's as it is.

    One all-gather of each entry's shape and dtype (or value), then one scatter per tensor
    entry from its owner: each rank ends with 1/world size of every entry."""
    split = optimizer.split
    if split is None:
        return state_dict
    params = [p for g in optimizer.param_groups for p in g["params"]]
    owners = split.owners()
    mine = {index: {key: ("tensor", tuple(v.shape), v.dtype) if torch.is_tensor(v) else v
                    for key, v in entry.items()}
            for index, entry in state_dict["state"].items()}
    parts: list[Any] = [None] * split.world_size
    dist.all_gather_object(parts, mine, group=split.process_group)
    layout = {index: entry for part in parts for index, entry in part.items()}
    mesh = split.mesh()
    state = {}
    for index in sorted(layout):
        p, entry = params[index], {}
        owner = owners[p]
        for key, spec in layout[index].items():
            if not (isinstance(spec, tuple) and spec[:1] == ("tensor",)):
                entry[key] = spec
                continue
            _, shape, dtype = spec
            value = state_dict["state"][index][key] if owner == split.rank else \
                torch.empty(shape, dtype=dtype, device=mesh.device_type)
            entry[key] = distribute_tensor(value, mesh, [Shard(0) if shape else Replicate()],
                                           src_data_rank=owner)
        state[index] = entry
    return {"state": state, "param_groups": state_dict["param_groups"],
            SHARD_KEY: {"rank": split.rank, "world_size": split.world_size}}


def full_state_dict(optimizer: Shell) -> dict[str, Any]:
    """The complete state dict on every rank (a collective: call it on all ranks).

    Its tensors are on the CPU; every rank briefly holds all of the optimizer state. A plain
    (unsplit) optimizer returns its ``state_dict()``.
    """
    state_dict = optimizer.state_dict()
    if optimizer.split is None:
        return state_dict
    return {"state": _gathered(state_dict["state"], cpu=True),
            "param_groups": state_dict["param_groups"]}


def _gathered(state: dict[Any, dict[str, Any]], cpu: bool = False) -> dict[Any, dict[str, Any]]:
    """``state`` with every DTensor entry gathered whole (a collective per entry, in order)."""
    out = {}
    for index, entry in state.items():
        out[index] = {}
        for key, value in entry.items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            if cpu and torch.is_tensor(value):
                value = value.detach().cpu().clone()
            out[index][key] = value
    return out


def state_to_load(optimizer: Shell, state_dict: Any) -> tuple[list[dict[str, Any]],
                                                              dict[Tensor, dict[str, Any]]]:
    """The param groups and the state this rank should load, after checking they fit.

    Raises ValueError for a shard of another rank or world size and for what
    ``state.checked_state`` refuses. Ranks compare verdicts, so every rank raises when any
    rank's part is wrong. In a split, each rank keeps the state of the parameters it owns.
    """
    split = optimizer.split
    if split is None:
        return _checked(optimizer, state_dict, None)
    split.owners()  # collective on first use: every rank must reach it before any error
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state"), dict):
        # the exported layout: gather each entry whole (every rank, in the same order)
        state_dict = {**state_dict, "state": _gathered(state_dict["state"])}
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
    if split is not None:
        for param in list(state):
            if not split.owns(param):
                del state[param]
    return groups, state
