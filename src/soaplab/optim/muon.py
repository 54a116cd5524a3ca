"""Muon as it is normally used: torch.optim.Muon on the hidden weight matrices, AdamW on the rest.

Which parameters are hidden matrices is said by roles (``soaplab.roles``), not guessed from
shapes (a tied embedding/head is 2-D too, and Muon on it hurts): role ``"hidden"`` gets Muon,
``"stack"`` (3-D expert weights) gets Muon per expert, every other role AdamW. A hidden
parameter with more than two dimensions (a conv kernel ``(out, in, kh, kw)``) is orthogonalized
as the matrix ``(out, in * kh * kw)``, as in Keller Jordan's CIFAR runs.

``MuonAdamW`` takes a model, or param groups that carry ``"role"`` (or ``use_muon``). One ``lr``
drives both halves: Muon's update is rescaled with ``adjust_lr_fn="match_rms_adamw"`` (RMS
0.2, Moonlight's rule) so that an AdamW learning rate suits it, and a scheduler's factor
reaches both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from soaplab.optim.composite import Composite, Half
from soaplab.roles import STACK


def matrices(p: Tensor, role: str) -> list[tuple[Tensor, int | None]] | None:
    """2-D views for Muon: one per expert of a stack, (out, in·k...) for a conv kernel."""
    if role == STACK:
        return [(v.view(v.shape[0], -1), e) for e, v in enumerate(p.detach())]
    return None if p.dim() == 2 else [(p.detach().view(p.shape[0], -1), None)]


class MuonAdamW(Composite):
    """torch.optim.Muon on ``role="hidden"``/``"stack"`` groups, torch.optim.AdamW on the
    others; one object (see ``soaplab.optim.composite``)."""

    def __init__(self, params: nn.Module | Iterable[dict[str, Any]], lr: float = 3e-3,
                 weight_decay: float = 0.0, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adjust_lr_fn: str = "match_rms_adamw") -> None:
        def muon(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return torch.optim.Muon(groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                    adjust_lr_fn=adjust_lr_fn)

        super().__init__("muon", params, [Half(muon, matrices)], lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps, shards=False)
