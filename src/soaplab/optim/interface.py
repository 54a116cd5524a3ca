"""What the optimizer shell (base.py) shows the layers under it: state checks and the
distributed modes see an optimizer only through :class:`Shell`, and never import the shell.

A *target* is (parameter: the key of its state, tensor the maths updates in place, its
gradient). The plain optimizer updates the parameter itself; under FSDP2 the tensor is a
full-size copy gathered from the shards.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

Target = tuple[Tensor, Tensor, Tensor]


class Shell(Protocol):
    """The public face of a soaplab optimizer: torch's attributes plus what a factor plan and
    an error message need. ``split`` is its distributed split (None in a single process)."""

    param_groups: list[dict[str, Any]]
    state: dict[Tensor, dict[str, Any]]
    defaults: dict[str, Any]
    matrix_dtype: torch.dtype | None

    @property
    def split(self) -> Any: ...

    def plan_kwargs(self, group: dict[str, Any]) -> dict[str, Any]:
        """The keyword arguments of ``kronecker.plan_factors`` for the group's parameters."""
        ...

    def describe(self, group: dict[str, Any], index: int) -> str:
        """'parameter <name or number> with shape <shape>', for messages."""
        ...


def local(t: Tensor) -> Tensor:
    """This rank's part of a tensor: the local shard of a DTensor, a plain tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t
