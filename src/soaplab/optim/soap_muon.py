"""SOAP on the MLP matrices, NorMuon on the attention matrices, AdamW on the rest (``soap_muon``).

The modded-nanogpt step-count record's split (track 3, "SOAP-preconditioned MLP + NorMuon"):
one optimizer object, one lr. Which hidden matrix is MLP and which attention comes from the
role rule (``soaplab.roles.infer_parts``: the model's metadata and module structure first,
names last and flagged); ``soaplab.describe_roles(model, "soap_muon")`` shows it. A hidden
matrix outside every block (a pooler) goes to NorMuon with the attention: SOAP takes only the
matrices known to be MLP. Each half is the optimizer it wraps (``soaplab.optim.composite``):
soaplab's SOAP (a stack per expert), NorMuon (``soaplab.optim.normuon``), torch's AdamW.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from soaplab.optim.composite import Composite, Half
from soaplab.optim.muon import matrices
from soaplab.optim.normuon import NorMuon
from soaplab.optim.soap import SOAP
from soaplab.optim.soap_hidden import experts
from soaplab.roles import MLP


class SoapMuon(Composite):
    """soaplab's SOAP on ``part="mlp"`` hidden/stack groups, NorMuon on the other hidden/stack
    groups, torch.optim.AdamW on the rest: one ``lr``, ``eps`` and ``weight_decay``; ``betas``
    are SOAP's and AdamW's, ``momentum``, ``beta2`` and ``ns_dtype`` NorMuon's; the other
    keyword arguments (``precondition_frequency``, ``max_precond_dim``, ...) go to SOAP."""

    def __init__(self, params: nn.Module | Iterable[dict[str, Any]], lr: float = 3e-3,
                 betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.01, momentum: float = 0.95, beta2: float = 0.95,
                 ns_dtype: str = "bfloat16", **soap_kwargs: Any) -> None:
        def soap(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return SOAP(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        **soap_kwargs)

        def normuon(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return NorMuon(groups, lr=lr, weight_decay=weight_decay, momentum=momentum,
                           beta2=beta2, ns_dtype=ns_dtype)

        halves = [Half(soap, experts, lambda g: g.get("part") == MLP), Half(normuon, matrices)]
        super().__init__("soap_muon", params, halves, lr=lr, weight_decay=weight_decay,
                         betas=betas, eps=eps, shards=False, parts=True)
