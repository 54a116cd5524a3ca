"""Optimizer state policy: which dtype the matrices live in, and a dtype-preserving load.

torch's ``Optimizer.load_state_dict`` casts every floating state tensor, nested ones included, to
the parameter's dtype: the fp32 factors of a bf16 parameter would come back as bf16. The
load here restores every state tensor exactly as it was saved (only moved to the parameter's
device), which is what makes a checkpoint round trip bitwise exact.
"""

from __future__ import annotations

import copy
from itertools import chain
from typing import Any

import torch

_MATRIX_DTYPES = {None: None, "float32": torch.float32, "float64": torch.float64,
                  torch.float32: torch.float32, torch.float64: torch.float64}


def resolve_matrix_dtype(value: Any) -> torch.dtype | None:
    """Validate the ``matrix_dtype`` argument (None, float32 or float64)."""
    if value not in _MATRIX_DTYPES:
        raise ValueError("matrix_dtype must be None, torch.float32 or torch.float64, "
                         f"got {value!r}")
    return _MATRIX_DTYPES[value]


def state_dtype(param: torch.Tensor, matrix_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype of a parameter's factors, bases and moments.

    Default: float64 for float64 parameters and float32 otherwise (bf16/fp16 parameters keep
    fp32 statistics); ``matrix_dtype`` forces one.
    """
    if matrix_dtype is not None:
        return matrix_dtype
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def load_state_preserving_dtypes(optimizer: torch.optim.Optimizer,
                                 state_dict: dict[str, Any]) -> None:
    """``optimizer.load_state_dict`` without torch's cast of state tensors to the param dtype."""
    saved_state = state_dict["state"]
    torch.optim.Optimizer.load_state_dict(optimizer, {**state_dict, "state": {}})
    saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
    params = chain.from_iterable(g["params"] for g in optimizer.param_groups)
    id_map = dict(zip(saved_ids, params, strict=True))
    for key, entry in saved_state.items():
        param = id_map.get(key)
        if param is None:
            raise ValueError(f"state_dict has state for parameter id {key!r}, which is in no "
                             "param group")
        optimizer.state[param] = {
            name: value.to(device=param.device, copy=True) if torch.is_tensor(value)
            else copy.deepcopy(value)
            for name, value in entry.items()
        }


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (what the optimizer adds to the model)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values()
               for v in s.values() if torch.is_tensor(v))
