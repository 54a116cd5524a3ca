"""Which bases to refresh at a scheduled check: those that drifted, within a compute budget.

A basis Q of factor A has drifted by ‖QᵀAQ − diag(QᵀAQ)‖_F / ‖A‖_F (the criterion of
"Purifying Shampoo", arXiv 2506.03595), read for free from the power step's product A·Q
(``matrix_functions.drift``). With a tolerance τ, every basis whose drift reaches τ is refreshed
(τ = 0 refreshes all of them: the fixed schedule). With a budget b, a bucket earns b times its
ordinary step's matmul flops per step and spends them on the most-drifted bases first.
"""

from __future__ import annotations

import math

from torch import Tensor

# Cost of one orthonormalization of a d×d basis in matmul-equivalent flops per d³: LAPACK's
# Householder QR takes about 3.5 times the power step's 2d³-flop product A·Q on CPU
# (benchmarks/step_time.py --parts).
QR_FLOPS_PER_D3 = 7.0


def ordinary_flops(shape: tuple[int, ...], axes: tuple[int, ...]) -> float:
    """Matmul flops of one ordinary step for one tensor of ``shape``: per factored axis of
    length d, the gram, the projection and the back-projection, 2·d·numel each."""
    numel = math.prod(shape)
    return float(sum(6 * shape[k] * numel for k in axes))


def check_flops(shape: tuple[int, ...], axes: tuple[int, ...]) -> float:
    """Flops of a check: the power step's product A·Q for every factor (2d³ each)."""
    return float(sum(2 * shape[k] ** 3 for k in axes))


def refresh_flops(shape: tuple[int, ...], axis: int) -> float:
    """Flops of refreshing one basis after the check: the orthonormalization, and carrying the
    first moment out of and into the basis along that axis (2·d·numel each way)."""
    d = shape[axis]
    return QR_FLOPS_PER_D3 * d**3 + 4 * d * math.prod(shape)


def choose(drifts: dict[int, Tensor], tolerance: float, shape: tuple[int, ...],
           credit: float | None) -> tuple[dict[int, list[int]], float | None]:
    """The batch rows to refresh per axis, and the credit left (None: no budget).

    Rows whose drift is at least ``tolerance`` qualify; with a ``credit`` (flops), they are
    taken most-drifted first while the credit covers their cost. One host read per call.
    """
    values = {axis: d.tolist() for axis, d in drifts.items()}
    wanted = [(drift, axis, row) for axis, column in values.items()
              for row, drift in enumerate(column) if drift >= tolerance]
    if credit is not None:
        wanted.sort(reverse=True)
    chosen: dict[int, list[int]] = {axis: [] for axis in drifts}
    for _, axis, row in wanted:
        if credit is not None:
            cost = refresh_flops(shape, axis)
            if cost > credit:
                continue
            credit -= cost
        chosen[axis].append(row)
    return {axis: sorted(rows) for axis, rows in chosen.items()}, credit
