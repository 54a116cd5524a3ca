"""Muon as it is normally used: torch.optim.Muon on the hidden weight matrices, AdamW on the rest.

Which parameters are hidden matrices is said by name, not guessed from shapes (a tied
embedding/head is 2-D too, and Muon on it hurts). The convention, in one place:

- a model names roles with ``param_roles() -> {parameter name: role}``;
- role ``"hidden"`` gets Muon; every other role (``"embedding"``, ``"head"``, ``"input"``,
  ``"vector"`` ...) gets AdamW;
- a hidden parameter with more than two dimensions (a conv kernel ``(out, in, kh, kw)``) is
  orthogonalized as the matrix ``(out, in * kh * kw)``, as in Keller Jordan's CIFAR runs.

``MuonAdamW`` takes such a model, or param groups that carry ``"role"``. One ``lr`` drives both
halves: Muon's update is rescaled with ``adjust_lr_fn="match_rms_adamw"`` (RMS 0.2, Moonlight's
rule) so that an AdamW learning rate suits it, and a scheduler's factor reaches both.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from soaplab.optim._checks import check_kind

HIDDEN = "hidden"


def role_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The model's parameters as two groups, ``role="hidden"`` and ``role="other"``."""
    if not hasattr(model, "param_roles"):
        raise ValueError(f"{type(model).__name__} has no param_roles(); Muon needs to know its "
                         "hidden matrices: add param_roles() or pass groups with role='hidden'")
    roles = model.param_roles()
    named = dict(model.named_parameters())
    if set(roles) != set(named):
        missing = sorted(set(named) ^ set(roles))
        raise ValueError(f"param_roles() of {type(model).__name__} does not match its "
                         f"parameters: {', '.join(missing)}")
    hidden = [p for n, p in named.items() if roles[n] == HIDDEN]
    return [{"params": hidden, "role": HIDDEN},
            {"params": [p for n, p in named.items() if roles[n] != HIDDEN], "role": "other"}]


class MuonAdamW(torch.optim.Optimizer):
    """torch.optim.Muon on ``role="hidden"`` groups, torch.optim.AdamW on the others.

    The two inner optimizers share this object's ``param_groups`` and ``state``, so
    schedulers, ``zero_grad``, ``state_dict`` and ``load_state_dict`` see one optimizer.
    """

    def __init__(self, params: nn.Module | Iterable[dict[str, Any]], lr: float = 3e-3,
                 weight_decay: float = 0.0, momentum: float = 0.95,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 adjust_lr_fn: str = "match_rms_adamw") -> None:
        groups = role_groups(params) if isinstance(params, nn.Module) else list(params)
        if not groups or not all(isinstance(g, dict) and "role" in g for g in groups):
            raise ValueError("muon needs parameter roles: pass a model with param_roles(), or "
                             "groups like [{'params': hidden, 'role': 'hidden'}, "
                             "{'params': rest, 'role': 'other'}]")
        hidden = [g for g in groups if g["role"] == HIDDEN]
        other = [g for g in groups if g["role"] != HIDDEN]
        # Muon steps 2-D views of the hidden parameters (sharing their storage); step() hands
        # each view its parameter's gradient.
        self._views = []
        for g in hidden:
            params_ = list(g["params"])
            views = [p.detach().view(p.shape[0], -1) for p in params_]
            self._views += zip(views, params_, strict=True)
            g["params"] = views
        self._muon = torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay,
                                      momentum=momentum, adjust_lr_fn=adjust_lr_fn) \
            if hidden else None
        self._adamw = torch.optim.AdamW(other, lr=lr, betas=betas, eps=eps,
                                        weight_decay=weight_decay) if other else None
        inner = [o for o in (self._muon, self._adamw) if o is not None]
        super().__init__([g for o in inner for g in o.param_groups], {})
        self._link()

    def _link(self) -> None:
        """Point the inner optimizers at this object's groups and state (again after a load,
        which replaces both)."""
        n = len(self._muon.param_groups) if self._muon is not None else 0
        if self._muon is not None:
            self._muon.param_groups, self._muon.state = self.param_groups[:n], self.state
        if self._adamw is not None:
            self._adamw.param_groups, self._adamw.state = self.param_groups[n:], self.state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for view, p in self._views:
            view.grad = None if p.grad is None else p.grad.view(view.shape)
        for o in (self._muon, self._adamw):
            if o is not None:
                o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for _, p in self._views:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_kind(self, state_dict)
        super().load_state_dict(state_dict)
        self._link()
