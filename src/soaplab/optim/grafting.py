"""Grafting: borrow the step *size* of a simple optimizer, keep Shampoo's *direction*.

Each function works on a batch (B, ...) of same-shape parameters; norms are per parameter.
"""

from __future__ import annotations

import torch
from torch import Tensor

KINDS = ("adam", "adagrad", "sgd", "none")


def graft_state(kind: str, shape: tuple[int, ...], **like) -> dict[str, Tensor]:
    """Per-parameter state the grafting optimizer needs (Adam's v or Adagrad's sum)."""
    if kind in ("adam", "adagrad"):
        return {"graft_sq": torch.zeros(shape, **like)}
    return {}


def graft_direction(kind: str, state: dict[str, Tensor], grad: Tensor, moment: Tensor,
                    beta2: float, t: int, eps: float) -> Tensor | None:
    """Update the grafting statistics with ``grad``; return the grafted optimizer's direction
    for the (bias-corrected) first moment ``moment``, or None when grafting is off."""
    if kind == "none":
        return None
    if kind == "sgd":
        return moment
    sq = state["graft_sq"]
    if kind == "adam":
        sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        return moment / (sq / (1 - beta2**t)).sqrt_().add_(eps)
    sq.addcmul_(grad, grad)
    return moment / sq.sqrt().add_(eps)


def per_param_norm(X: Tensor) -> Tensor:
    """Frobenius norm of each item of the batch, shaped to broadcast against X."""
    return X.flatten(1).norm(dim=1).view(-1, *([1] * (X.dim() - 1)))


def graft(direction: Tensor, reference: Tensor) -> Tensor:
    """``direction`` rescaled to the norm of ``reference`` (zero stays zero)."""
    norm = per_param_norm(direction)
    return direction * (per_param_norm(reference) / norm.clamp_min(torch.finfo(norm.dtype).tiny))
