"""Optimizer state policy: which dtype the state lives in, and how a checkpoint is checked and
loaded.

torch's ``Optimizer.load_state_dict`` casts every floating state tensor to its parameter's dtype:
the fp32 factors of a bf16 parameter would come back as bf16. Here every state tensor is cast
to :func:`state_dtype` of the *receiving* parameter and ``matrix_dtype`` instead: the dtype
the optimizer itself would have made it in, and entries that a storage option keeps in a
format of its own (bf16, int8, packed; see storage.py) keep it. A round trip into an
identically built optimizer is therefore bitwise exact, and a checkpoint loads onto parameters
of another dtype too. As in
torch, the saved param groups replace the optimizer's (keeping its parameters), so the factor
plan follows the saved settings, and keys missing from an older checkpoint take the defaults.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from itertools import chain
from typing import Any

import torch
from torch import Tensor

from soaplab.optim.interface import Shell
from soaplab.optim.kronecker import FactorPlan, plan_factors
from soaplab.optim.storage import layouts

_MATRIX_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64,
                  torch.float32: torch.float32, torch.float64: torch.float64}


def resolve_matrix_dtype(value: Any) -> torch.dtype | None:
    """Validate the ``matrix_dtype`` argument (None, float32 or float64)."""
    if value not in _MATRIX_DTYPES:
        raise ValueError("matrix_dtype must be None, torch.float32 or torch.float64, "
                         f"got {value!r}")
    return _MATRIX_DTYPES[value]


def state_dtype(param: Tensor, matrix_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a parameter's factors, bases and moments.

    Default: float64 for float64 parameters and float32 otherwise (bf16/fp16 parameters keep
    fp32 statistics); ``matrix_dtype`` forces one.
    """
    if matrix_dtype is not None:
        return matrix_dtype
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def loaded_groups(optimizer: Shell, saved: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """torch's rule: the saved groups with the optimizer's parameters (and names, unless
    saved), plus the defaults for keys an older checkpoint lacks."""
    groups = optimizer.param_groups
    if len(groups) != len(saved):
        raise ValueError(f"the state dict has {len(saved)} param groups, the optimizer "
                         f"{len(groups)}")
    out = []
    for k, (group, new) in enumerate(zip(groups, copy.deepcopy(saved), strict=True)):
        if len(new["params"]) != len(group["params"]):
            raise ValueError(f"the state dict has {len(new['params'])} parameters in param "
                             f"group {k}, the optimizer {len(group['params'])}")
        new["params"] = group["params"]
        if "param_names" in group and "param_names" not in new:
            new["param_names"] = group["param_names"]
        out.append({**optimizer.defaults, **new})
    return out


def checked_state(optimizer: Shell, state_dict: Any) -> tuple[list[dict[str, Any]],
                                                              dict[Tensor, dict[str, Any]]]:
    """The param groups and the per-parameter state that loading ``state_dict`` gives, cast
    to this optimizer's dtype policy; ValueError (and nothing changed) if it does not fit."""
    if not isinstance(state_dict, dict) or "state" not in state_dict \
            or "param_groups" not in state_dict:
        raise ValueError("not an optimizer state dict: 'state' or 'param_groups' is missing")
    groups = loaded_groups(optimizer, state_dict["param_groups"])
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    places = [(group, i) for group in groups for i in range(len(group["params"]))]
    by_id = dict(zip(saved_ids, places, strict=True))
    state: dict[Tensor, dict[str, Any]] = defaultdict(dict)
    for key, entry in state_dict["state"].items():
        if key not in by_id:
            raise ValueError(f"state_dict has state for parameter id {key!r}, which is in no "
                             "param group")
        group, index = by_id[key]
        state[group["params"][index]] = _checked_entry(optimizer, group, index, entry)
    return groups, state


def _checked_entry(optimizer: Shell, group: dict[str, Any], index: int,
                   entry: Any) -> dict[str, Any]:
    """One parameter's saved state, checked to be what this optimizer would have made for it
    under the group's settings, and cast to its dtype policy (``step`` becomes an int)."""
    param = group["params"][index]
    name = optimizer.describe(group, index)
    step = entry.get("step") if isinstance(entry, dict) else None
    if torch.is_tensor(step) and step.numel() == 1:
        step = step.item()  # torch's optimizers keep 'step' as a tensor
    if isinstance(step, float) and step.is_integer():
        step = int(step)
    if not isinstance(step, int) or isinstance(step, bool) or step < -1:  # -1: allocated
        raise ValueError(f"state of {name} has no valid 'step': the checkpoint is corrupt")
    plan = plan_factors(tuple(param.shape), **optimizer.plan_kwargs(group))
    for axis in plan.axes:
        if f"factor_{axis}" not in entry:
            raise ValueError(f"state of {name} lacks 'factor_{axis}', which the factor settings "
                             "of its param group (max_precond_dim, merge_dims, one_sided, ...) "
                             "call for: the checkpoint is of other settings")
    dtype = state_dtype(param, optimizer.matrix_dtype)
    stored = layouts(group, plan.shape, plan.axes, dtype)
    for key in stored:
        if key not in entry and key.removesuffix("_scale") in entry:
            raise ValueError(f"state of {name} lacks '{key}', which the group's "
                             "basis_storage='int8' keeps beside the basis: the checkpoint is "
                             "corrupt or of other storage settings")
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if not torch.is_tensor(value):
            out[key] = copy.deepcopy(value)
            continue
        _check_tensor(key, value, name, param, plan, stored.get(key))
        cast = stored[key][1] if key in stored else \
            dtype if value.is_floating_point() else value.dtype
        out[key] = value.to(device=param.device, dtype=cast, copy=True)
    out["step"] = step
    return out


def _check_tensor(key: str, value: Tensor, name: str, param: Tensor, plan: FactorPlan,
                  layout: tuple[tuple[int, ...], torch.dtype] | None) -> None:
    kind, _, axis = key.rpartition("_")
    if key in ("exp_avg", "exp_avg_sq", "graft_sq"):
        if value.numel() != param.numel():
            raise ValueError(f"state '{key}' of {name} has {value.numel()} elements but the "
                             f"parameter has {param.numel()}: the checkpoint is of another "
                             "model")
    elif layout is not None:  # factors and bases, as the group's storage keeps them
        if tuple(value.shape) != layout[0]:
            raise ValueError(f"state '{key}' of {name} has shape {tuple(value.shape)}, but "
                             f"this optimizer stores it as {layout[0]} (its factor and storage "
                             "settings): the checkpoint is of another model or other settings")
    elif kind in ("factor", "basis", "root", "diagonal"):  # (d, d); (d,) for a diagonal
        d = plan.shape[int(axis)] if axis.isdigit() and int(axis) in plan.axes else None
        if d is None or tuple(value.shape) != ((d,) if kind == "diagonal" else (d, d)):
            raise ValueError(f"state '{key}' of {name} has shape {tuple(value.shape)}, which "
                             "this optimizer's factors do not have: the checkpoint is of "
                             "another model or other factor settings")
    if value.is_floating_point() and not bool(torch.isfinite(value).all()):
        raise ValueError(f"state '{key}' of {name} contains NaN or Inf: the checkpoint is "
                         "corrupt")


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (what the optimizer adds to the model)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))
