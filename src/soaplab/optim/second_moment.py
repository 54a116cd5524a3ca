"""Adam's second moment, full or Adafactor-factored, kept in the eigenbasis.

State tensors carry a leading batch axis B (same-shape parameters stacked). The factored form
keeps row and column means of g² over the last two axes (Shazeer & Stern 2018) and rebuilds
v̂_ij = r_i c_j / mean(r), which is what makes SOAP-factorized cheaper than AdamW in memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from soaplab.optim.kronecker import permute_axis

FULL = ("exp_avg_sq",)
FACTORED = ("exp_avg_sq_row", "exp_avg_sq_col")


def is_factored(shape: tuple[int, ...], factorized: bool) -> bool:
    """Factoring needs two axes; vectors keep the full second moment."""
    return factorized and len(shape) >= 2


def zeros(shape: tuple[int, ...], factored: bool, **like) -> dict[str, Tensor]:
    """Fresh second-moment state for one parameter whose plan shape is ``shape``."""
    if not factored:
        return {"exp_avg_sq": torch.zeros(shape, **like)}
    return {"exp_avg_sq_row": torch.zeros(shape[:-1], **like),
            "exp_avg_sq_col": torch.zeros(shape[:-2] + shape[-1:], **like)}


def update(v: dict[str, Tensor], g: Tensor, beta2: float) -> None:
    """In place EMA of g² (or of its row and column means) with coefficient ``beta2``."""
    sq = g * g
    if "exp_avg_sq" in v:
        v["exp_avg_sq"].mul_(beta2).add_(sq, alpha=1 - beta2)
        return
    v["exp_avg_sq_row"].mul_(beta2).add_(sq.mean(-1), alpha=1 - beta2)
    v["exp_avg_sq_col"].mul_(beta2).add_(sq.mean(-2), alpha=1 - beta2)


def estimate(v: dict[str, Tensor]) -> Tensor:
    """The (B, ...) second-moment estimate that divides the first moment."""
    if "exp_avg_sq" in v:
        return v["exp_avg_sq"]
    row, col = v["exp_avg_sq_row"], v["exp_avg_sq_col"]
    scale = row.mean(-1, keepdim=True).clamp_min(torch.finfo(row.dtype).tiny)
    return (row / scale).unsqueeze(-1) * col.unsqueeze(-2)


def clip_rms(ratio: Tensor, correction: float, threshold: float = 1.0) -> Tensor:
    """Adafactor's update clipping: scale each item of the batch so that the RMS of
    ``correction``·ratio (the bias-corrected m/√v̂) is at most ``threshold``.

    A factored v̂ = r cᵀ/mean(r) can be far below g² in some coordinates (at the first step,
    one coordinate of a 2×2 layer moved 11.8·lr), which is why Adafactor clips (Shazeer &
    Stern 2018, §6, threshold 1); an unfactored Adam step has RMS at most about 1 already."""
    dims = tuple(range(1, ratio.dim()))
    rms = ratio.square().mean(dims, keepdim=True).sqrt() * correction
    return ratio / (rms / threshold).clamp_min(1.0)


def permute(v: dict[str, Tensor], order: Tensor, axis: int, ndim: int) -> None:
    """Reorder the second moment along plan axis ``axis`` to follow a sorted basis."""
    if "exp_avg_sq" in v:
        v["exp_avg_sq"] = permute_axis(v["exp_avg_sq"], order, axis)
        return
    if axis <= ndim - 2:
        v["exp_avg_sq_row"] = permute_axis(v["exp_avg_sq_row"], order, axis)
    if axis != ndim - 2:
        col_axis = axis if axis < ndim - 2 else ndim - 2
        v["exp_avg_sq_col"] = permute_axis(v["exp_avg_sq_col"], order, col_axis)
