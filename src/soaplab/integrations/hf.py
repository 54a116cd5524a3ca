"""Hugging Face ``Trainer``: optimizer factories that build soaplab optimizers from the model.

``Trainer(..., optimizer_cls_and_kwargs=(soaplab.integrations.hf.Muon, {"lr": 3e-3}))``: the
Trainer calls a class that is not a ``torch.optim.Optimizer`` as ``cls()(model, **kwargs)``,
and the factory builds the groups: roles (``soaplab.roles``) crossed with the Trainer's own
decay / no-decay names (no decay on biases and norms). The Trainer does not pass its
``learning_rate`` or ``weight_decay`` on this path: give both in the kwargs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from soaplab.registry import canonical, entry, optimizer
from soaplab.roles import role_groups


def decay_names(model: nn.Module) -> set[str]:
    """The parameters the Trainer decays (``Trainer.get_decay_parameter_names``, which reads
    only the model)."""
    from transformers import Trainer

    return set(Trainer.get_decay_parameter_names(None, model))


def groups(model: nn.Module, name: str, weight_decay: float,
           roles: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
    """Param groups for the registry optimizer ``name``: by role if it splits by role (muon,
    soap_hidden; soap_muon by part too), each crossed with the Trainer's decay names
    (``weight_decay`` or 0)."""
    decay = decay_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    by_role = role_groups(model, 0.0, roles, entry(name).parts) if entry(name).takes_model \
        else [{"params": [p for p in model.parameters() if p.requires_grad]}]
    out = []
    for g in by_role:
        for decays in (True, False):
            params = [p for p in g["params"] if (names[id(p)] in decay) == decays]
            if params:
                out.append({**g, "params": params, "weight_decay": weight_decay if decays else 0.0})
    return out


class Factory:
    """Builds the registry optimizer ``name`` for the Trainer (see the module docstring)."""

    name = "soap"

    def __call__(self, model: nn.Module, weight_decay: float = 0.0,
                 roles: Mapping[str, str] | None = None, **kwargs: Any) -> torch.optim.Optimizer:
        return optimizer(self.name, groups(model, self.name, weight_decay, roles),
                         weight_decay=weight_decay, **kwargs)


def factory(name: str) -> type[Factory]:
    """A factory class for any registry name, e.g. ``factory("shampoo")``."""
    key = canonical(name)
    return type(f"Factory_{key}", (Factory,), {"name": key})


class SOAP(Factory):
    name = "soap"


class Muon(Factory):
    name = "muon"


class SoapHidden(Factory):
    name = "soap_hidden"
