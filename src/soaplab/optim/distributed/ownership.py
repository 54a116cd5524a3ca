"""Which rank owns which parameter's preconditioner work: a pure function of shapes.

The cost of a parameter is dominated by its basis refreshes (an eigh or QR of each d×d factor,
O(d³)) plus the element-wise Adam/grafting work (O(numel)). Parameters are assigned largest
first, each to the least-loaded rank (LPT scheduling: at most 4/3 of the optimal makespan).
Ties go to the lower index and the lower rank, so every rank computes the same answer from
the same parameter list, with no communication.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def param_cost(shape: Sequence[int], axes: Sequence[int]) -> int:
    """Estimated work of one parameter: Σ d_k³ over its factored axes, plus its size."""
    return sum(shape[k] ** 3 for k in axes) + math.prod(shape)


def assign_owners(costs: Sequence[int], world_size: int) -> list[int]:
    """The owner rank of each item, balancing the summed cost per rank (largest first)."""
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if any(c < 0 for c in costs):
        raise ValueError("costs must be >= 0")
    loads = [0] * world_size
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (loads[r], r))
        owners[i] = rank
        loads[rank] += costs[i]
    return owners


def rank_loads(costs: Sequence[int], owners: Sequence[int], world_size: int) -> list[int]:
    """Summed cost per rank under an assignment (for reports and balance checks)."""
    loads = [0] * world_size
    for cost, owner in zip(costs, owners, strict=True):
        loads[owner] += cost
    return loads
