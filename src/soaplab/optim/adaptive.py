"""Which bases to refresh at a scheduled check: those that drifted, within a compute budget.

A basis Q of factor A has drifted by ‖QᵀAQ − diag(QᵀAQ)‖_F / ‖A‖_F (the criterion of
"Purifying Shampoo", arXiv 2506.03595). Checking it needs no matmul: ‖QᵀAQ‖_F = ‖A‖_F for
orthogonal Q, and diag(QᵀAQ) is tracked step by step from the rotated gradient that Adam uses
anyway (:func:`track_diagonals`), so a check costs O(d²) and can run at every step. With a
tolerance τ, every basis whose drift reaches τ is refreshed (τ = 0 refreshes all of them: the
fixed schedule). With a budget b, a bucket earns b times its ordinary step's matmul flops per
step and spends them on the most-drifted bases first.
"""

from __future__ import annotations

import math

from torch import Tensor

from soaplab.optim.kronecker import gram_diagonals

# Cost of one orthonormalization of a d×d basis in matmul-equivalent flops per d³: LAPACK's
# Householder QR takes about 3.5 times the power step's 2d³-flop product A·Q on CPU
# (benchmarks/step_time.py --parts).
QR_FLOPS_PER_D3 = 7.0


def ordinary_flops(shape: tuple[int, ...], axes: tuple[int, ...]) -> float:
    """Matmul flops of one ordinary step for one tensor of ``shape``: per factored axis of
    length d, the gram, the projection and the back-projection, 2·d·numel each."""
    numel = math.prod(shape)
    return float(sum(6 * shape[k] * numel for k in axes))


def refresh_flops(shape: tuple[int, ...], axis: int) -> float:
    """Flops of refreshing one basis: the power step A·Q, the orthonormalization, the product
    A·Q_new that restarts the tracked diagonal, and carrying the first moment out of and into
    the basis along that axis (2·d·numel each way)."""
    d = shape[axis]
    return (QR_FLOPS_PER_D3 + 4) * d**3 + 4 * d * math.prod(shape)


def track_diagonals(diagonals: dict[int, Tensor], rotated: Tensor, beta: float) -> None:
    """In place: diag(QᵀLQ) <- β·diag + (1-β)·diag(G'G'ᵀ) per axis, the factors' own EMA seen
    in the current bases. G' = G ×_k Q_kᵀ is Adam's rotated gradient; since the other axes'
    bases are orthogonal, diag(Q_kᵀ G_(k) G_(k)ᵀ Q_k) is the squared norm of G'_(k)'s rows."""
    for axis, gram in gram_diagonals(rotated, tuple(diagonals)).items():
        diagonals[axis].lerp_(gram, 1 - beta)


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
