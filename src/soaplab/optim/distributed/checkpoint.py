"""Checkpoints of a split optimizer: per-rank shards, a consolidated full state, and the checks
that turn a wrong checkpoint into an error instead of a silently fresh state.

``optimizer.state_dict()`` in DDP mode holds only the rank's own state, marked with the rank and
world size: cheap, and what ``torch.distributed.checkpoint`` (DCP) saves, since DCP keys every
entry by parameter name and so reshards across world sizes by itself. For ``torch.save``,
:func:`full_state_dict` consolidates every rank's state into the state dict a single process
would have; it loads into any world size, split or not.
"""

from __future__ import annotations

from itertools import chain
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from soaplab.optim.kronecker import plan_factors

if TYPE_CHECKING:
    from soaplab.optim.base import KroneckerOptimizer
    from soaplab.optim.distributed.ddp import OwnerSplit

SHARD_KEY = "distributed"


def mark_shard(state_dict: dict[str, Any], split: OwnerSplit | None) -> dict[str, Any]:
    """Tag a split optimizer's state dict as the shard of one rank."""
    if split is not None:
        state_dict[SHARD_KEY] = {"rank": split.rank, "world_size": split.world_size}
    return state_dict


def full_state_dict(optimizer: KroneckerOptimizer) -> dict[str, Any]:
    """The complete state dict on every rank (a collective: call it on all ranks).

    Its tensors are on the CPU; it costs one all-gather of the whole optimizer state, so every
    rank briefly holds all of it. A plain (unsplit) optimizer returns its ``state_dict()``.
    """
    state_dict = optimizer.state_dict()
    split = optimizer._split
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


def state_to_load(optimizer: KroneckerOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """The part of ``state_dict`` this optimizer should load, after checking it fits.

    Raises ValueError for a shard of another rank or world size, for state that does not fit
    its parameter (another model, or other factor settings), for non-finite state (a corrupt
    checkpoint), and for a shard holding state of a parameter this rank does not own. Split
    optimizers compare verdicts, so every rank raises when any rank's part is wrong.
    """
    split = optimizer._split
    if split is None:
        return _checked(optimizer, state_dict)
    split.owners()  # collective on first use: every rank must reach it before any error
    try:
        kept, error = _checked(optimizer, state_dict), None
    except ValueError as err:
        kept, error = {}, str(err)
    error = split.any_error(error)
    if error is not None:
        raise ValueError(error)
    return kept


def _checked(optimizer: KroneckerOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    split = optimizer._split
    shard = state_dict.get(SHARD_KEY) if isinstance(state_dict, dict) else None
    here = None if split is None else {"rank": split.rank, "world_size": split.world_size}
    if shard is not None and shard != here:
        where = "a process without a split" if here is None else \
            f"rank {here['rank']} of {here['world_size']}"
        raise ValueError(f"this state dict is the shard of rank {shard['rank']} of "
                         f"{shard['world_size']} and cannot load on {where}; save "
                         "soaplab.optim.distributed.full_state_dict(optimizer) instead, or use "
                         "torch.distributed.checkpoint, to change the world size")
    if not isinstance(state_dict, dict) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: 'state' or 'param_groups' is missing")
    saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
    places = [(group, i) for group in optimizer.param_groups
              for i in range(len(group["params"]))]
    if len(saved_ids) != len(places):
        raise ValueError(f"the state dict has {len(saved_ids)} parameters, the optimizer "
                         f"{len(places)}")
    by_id = dict(zip(saved_ids, places, strict=True))
    kept = {}
    for key, entry in state_dict["state"].items():
        if key not in by_id:
            raise ValueError(f"state_dict has state for parameter id {key!r}, which is in no "
                             "param group")
        group, index = by_id[key]
        param = group["params"][index]
        _check_entry(optimizer, group, index, entry)
        if split is None or split.owns(param):
            kept[key] = entry
        elif shard is not None:
            raise ValueError(f"this rank's shard holds state of parameter {key!r}, which rank "
                             f"{split.owners()[param]} owns now: the parameter list changed")
    return {**{k: v for k, v in state_dict.items() if k != SHARD_KEY}, "state": kept}


def _check_entry(optimizer: KroneckerOptimizer, group: dict[str, Any], index: int,
                 entry: Any) -> None:
    """One parameter's saved state must be what this optimizer would have made for it."""
    param = group["params"][index]
    name = optimizer._name(group, index)
    if not isinstance(entry, dict) or not isinstance(entry.get("step"), int) \
            or entry["step"] < 0:
        raise ValueError(f"state of {name} has no valid 'step': the checkpoint is corrupt")
    plan = plan_factors(tuple(param.shape), **optimizer._plan_kwargs(group))
    for axis in plan.axes:
        if f"factor_{axis}" not in entry:
            raise ValueError(f"state of {name} lacks 'factor_{axis}': it was saved with other "
                             "factor settings (max_precond_dim, merge_dims, one_sided, ...)")
    for key, value in entry.items():
        if not torch.is_tensor(value):
            continue
        kind, _, axis = key.rpartition("_")
        if kind in ("factor", "basis", "root"):
            d = plan.shape[int(axis)] if axis.isdigit() and int(axis) in plan.axes else None
            if d is None or tuple(value.shape) != (d, d):
                raise ValueError(f"state '{key}' of {name} has shape {tuple(value.shape)}, "
                                 "which this optimizer's factors do not have: the checkpoint "
                                 "is of another model or other factor settings")
        elif key in ("exp_avg", "exp_avg_sq", "graft_sq") and value.numel() != param.numel():
            raise ValueError(f"state '{key}' of {name} has {value.numel()} elements but the "
                             "parameter has "
                             f"{param.numel()}: the checkpoint is of another model")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"state '{key}' of {name} contains NaN or Inf: the checkpoint is "
                             "corrupt")
