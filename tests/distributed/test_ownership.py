"""The ownership rule alone, without processes: costs, balance, determinism, errors."""

from __future__ import annotations

import random

import pytest

from soaplab.optim.distributed import assign_owners, param_cost, rank_loads
from soaplab.optim.kronecker import plan_factors


def test_cost_is_cubed_factor_sizes_plus_numel() -> None:
    assert param_cost((16, 8), (0, 1)) == 16**3 + 8**3 + 128
    assert param_cost((16, 8), ()) == 128
    vector = plan_factors((300,), max_precond_dim=10000)  # no factor: Adam-like work only
    assert param_cost(vector.shape, vector.axes) == 300
    one_sided = plan_factors((64, 8), max_precond_dim=10000, one_sided=True)
    assert param_cost(one_sided.shape, one_sided.axes) == 8**3 + 512


def test_largest_first_to_the_least_loaded_rank() -> None:
    # 7 -> r0, 6 -> r1, 5 -> r1 (6 < 7), 4 -> r0, 3 -> r0 (11 = 11: lower rank), 2 -> r1.
    assert assign_owners([7, 6, 5, 4, 3, 2], 2) == [0, 1, 1, 0, 0, 1]
    assert assign_owners([2, 3, 4, 5, 6, 7], 2) == [1, 0, 0, 1, 1, 0]


def test_ties_are_broken_by_index_then_rank() -> None:
    assert assign_owners([1] * 7, 3) == [0, 1, 2, 0, 1, 2, 0]
    assert assign_owners([], 4) == []
    assert assign_owners([5, 9], 1) == [0, 0]
    assert assign_owners([5, 9, 1], 8) == [1, 0, 2]


def test_balance_is_within_the_lpt_bound_on_random_costs() -> None:
    rng = random.Random(0)
    for _ in range(200):
        costs = [rng.randint(0, 10**6) for _ in range(rng.randint(1, 40))]
        world = rng.randint(1, 6)
        owners = assign_owners(costs, world)
        assert owners == assign_owners(list(costs), world)  # deterministic
        loads = rank_loads(costs, owners, world)
        assert sum(loads) == sum(costs)
        # Greedy LPT: the busiest rank exceeds the mean by at most one item.
        assert max(loads) <= sum(costs) / world + max(costs)
        if len(costs) <= world:
            assert len(set(owners)) == len(costs)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        assign_owners([1], 0)
    with pytest.raises(ValueError, match="costs must be >= 0"):
        assign_owners([1, -1], 2)
