"""Kronecker-factor machinery shared by SOAP and Shampoo.

A parameter of shape (d_1, ..., d_n) is seen as a tensor whose k-th axis may carry a factor
L_k = EMA(G_(k) G_(k)ᵀ), where G_(k) is the gradient unfolded along axis k (for a matrix,
L_1 = EMA(G Gᵀ) and L_2 = EMA(Gᵀ G)). Everything here works on a *batch* of same-shape
tensors, shape (B, d_1, ..., d_n), so identical layers share one matmul per axis.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class FactorPlan:
    """How one parameter is preconditioned.

    ``shape`` is the (possibly merged) shape the preconditioner sees; ``axes`` lists the axes of
    ``shape`` that carry a factor; ``channels_last`` says the parameter is a 4-D weight stored as
    (O, H, W, I) that must be permuted to (O, I, H, W) first.
    """

    shape: tuple[int, ...]
    axes: tuple[int, ...]
    channels_last: bool = False

    @property
    def key(self) -> tuple:
        """Parameters with equal keys can be stacked into one batch."""
        return (self.shape, self.axes)


def merge_shape(shape: tuple[int, ...], max_dim: int) -> tuple[int, ...]:
    """Merge consecutive axes left to right while their product stays at most ``max_dim``.

    This is the reference SOAP's rule: (1024, 1024, 3, 3) -> (1024, 9216) for max_dim 10000.
    """
    merged: list[int] = []
    running = 1
    for size in shape:
        if running * size > max_dim:
            if running > 1:
                merged.append(running)
                running = size
            else:
                merged.append(size)
        else:
            running *= size
    if running > 1 or not merged:
        merged.append(running)
    return tuple(merged)


@functools.cache  # called for every parameter at every step; plans are immutable
def plan_factors(shape: tuple[int, ...], *, max_precond_dim: int, merge_dims: bool = False,
                 precondition_1d: bool = False, one_sided: bool = False,
                 data_format: str = "channels_first") -> FactorPlan:
    """Decide which axes of a parameter of ``shape`` get a Kronecker factor."""
    channels_last = data_format == "channels_last" and merge_dims and len(shape) == 4
    if channels_last:
        o, h, w, i = shape
        shape = (o, i, h, w)
    vector = len(shape) <= 1
    if merge_dims and not vector:
        shape = merge_shape(shape, max_precond_dim)
    shape = shape or (1,)
    if (vector and not precondition_1d) or 0 in shape:
        axes: tuple[int, ...] = ()
    else:
        # 1×1 factors are skipped: their basis is ±1, the identity up to sign.
        axes = tuple(k for k, d in enumerate(shape) if 1 < d <= max_precond_dim)
    if one_sided and len(axes) > 1:
        axes = (min(axes, key=lambda k: shape[k]),)
    return FactorPlan(tuple(shape), axes, channels_last)


def to_plan_shape(t: Tensor, plan: FactorPlan) -> Tensor:
    """View a parameter-shaped tensor in the plan's (merged, permuted) shape."""
    if plan.channels_last:
        t = t.permute(0, 3, 1, 2)
    return t.reshape(plan.shape)


def from_plan_shape(t: Tensor, plan: FactorPlan, shape: torch.Size) -> Tensor:
    """Inverse of :func:`to_plan_shape` for a tensor of the plan's shape."""
    if plan.channels_last:
        o, h, w, i = shape
        return t.reshape(o, i, h, w).permute(0, 2, 3, 1)
    return t.reshape(shape)


def gram(X: Tensor, axis: int) -> Tensor:
    """G_(k) G_(k)ᵀ for a batch X of shape (B, ...), contracting every axis but ``axis``+1."""
    ax = axis + 1
    if ax == X.dim() - 1:
        flat = X.reshape(X.shape[0], -1, X.shape[-1])
        return flat.mT @ flat
    flat = X.movedim(ax, 1).reshape(X.shape[0], X.shape[ax], -1)
    return flat @ flat.mT


def gram_diagonals(X: Tensor, axes: tuple[int, ...]) -> dict[int, Tensor]:
    """diag(G_(k) G_(k)ᵀ) for each axis k, without the products: X squared once, summed along
    every axis but k."""
    squared = X.square()
    sums = {}
    for axis in axes:
        dims = tuple(d for d in range(1, X.dim()) if d != axis + 1)
        sums[axis] = squared.sum(dim=dims) if dims else squared
    return sums


def update_factors(factors: dict[int, Tensor], X: Tensor, beta: float,
                   layout: Callable[[Tensor], Tensor] | None = None) -> None:
    """In place: L_k <- beta·L_k + (1 - beta)·G_(k) G_(k)ᵀ for every factored axis k.

    ``layout`` maps a Gram batch to the factors' stored layout (e.g. its packed triangle)."""
    for axis, L in factors.items():
        G = gram(X, axis)
        L.lerp_(G if layout is None else layout(G), 1 - beta)


def _along(X: Tensor, M: Tensor, axis: int) -> Tensor:
    """Contract axis ``axis``+1 of the batch X with the batch of matrices M: x_j = Σ_i x_i M_ij."""
    ax = axis + 1
    if X.dim() == 2:  # a batch of vectors
        return (X.unsqueeze(1) @ M).squeeze(1)
    if ax == X.dim() - 1:
        return X @ M.view(M.shape[0], *([1] * (X.dim() - 3)), *M.shape[1:])
    moved = X.movedim(ax, -1)
    out = moved.reshape(X.shape[0], -1, X.shape[ax]) @ M
    return out.reshape(moved.shape).movedim(-1, ax)


def project(X: Tensor, bases: dict[int, Tensor]) -> Tensor:
    """Rotate X into the eigenbasis: X ×_k Q_kᵀ (for a matrix, Q_Lᵀ X Q_R)."""
    for axis, Q in bases.items():
        X = _along(X, Q, axis)
    return X


def project_back(X: Tensor, bases: dict[int, Tensor]) -> Tensor:
    """Rotate X back to parameter coordinates: X ×_k Q_k (for a matrix, Q_L X Q_Rᵀ)."""
    for axis, Q in bases.items():
        X = _along(X, Q.mT, axis)
    return X


def permute_axis(X: Tensor, order: Tensor, axis: int) -> Tensor:
    """Reorder axis ``axis``+1 of the batch X by the per-batch index ``order`` (B, d)."""
    ax = axis + 1
    shape = [X.shape[0]] + [1] * (X.dim() - 1)
    shape[ax] = X.shape[ax]
    index = order.view(shape).expand_as(X)
    return torch.gather(X, ax, index)
