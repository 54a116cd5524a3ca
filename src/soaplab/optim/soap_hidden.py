"""SOAP on the hidden matrices, AdamW on embeddings, head, input layer and vectors ("SOAP-H").

The setting of the best SOAP results on the modded-nanogpt track: the same split as ``muon``
(``soaplab.roles``), with soaplab's SOAP, which treats each hidden parameter exactly as ``soap``
does, in place of Muon. A 3-D expert stack is preconditioned per expert (one matrix each,
batched), not with a factor coupling the experts.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from soaplab.optim.composite import Composite, Half
from soaplab.optim.soap import SOAP
from soaplab.roles import STACK


def experts(p: Tensor, role: str) -> list[tuple[Tensor, int | None]] | None:
    """One view per expert of a stack, for SOAP; any other tensor is stepped as itself."""
    return [(v, e) for e, v in enumerate(p.detach())] if role == STACK else None


class SoapAdamW(Composite):
    """soaplab's SOAP on ``role="hidden"``/``"stack"`` groups, torch.optim.AdamW on the others,
    one object with one ``lr``, ``betas``, ``eps`` and ``weight_decay``; the other keyword
    arguments (``precondition_frequency``, ``max_precond_dim``, ...) go to SOAP."""

    def __init__(self, params: nn.Module | Iterable[dict[str, Any]], lr: float = 3e-3,
                 betas: tuple[float, float] = (0.95, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.01, **soap_kwargs: Any) -> None:
        def soap(groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
            return SOAP(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                        **soap_kwargs)

        super().__init__("soap_hidden", params, [Half(soap, experts)], lr=lr,
                         weight_decay=weight_decay, betas=betas, eps=eps, shards=True)
