"""One optimizer object made of several: matrix optimizers on hidden matrices, AdamW on the rest.

``muon`` (Muon), ``normuon`` and ``soap_hidden`` (soaplab's SOAP) are built this way with
one matrix optimizer, ``soap_muon`` with two (SOAP on the MLP, NorMuon on the other matrices).
Groups say which half takes them by ``role`` (``"hidden"`` and ``"stack"`` go to a matrix
optimizer, the first whose ``Half.takes`` accepts the group, e.g. by its ``part``, else the last;
any other role to AdamW), or by the flags other libraries use: ``use_muon`` (Keller Jordan's Muon,
pytorch_optimizer, DeepSpeed) and ``use_fallback`` (timm). A model instead of groups is split by
``soaplab.roles``.

The two inner optimizers share this object's ``param_groups`` and per-parameter ``state``
entries (each half keeps them in its own dict, see ``_link``), so schedulers,
``zero_grad``, ``state_dict`` and ``load_state_dict`` see one optimizer, and each half steps
exactly as the optimizer it wraps. A half that needs another shape (Muon's 2-D matrices, one
per expert of a 3-D stack) steps views of the parameters, made here and handed their
parameter's gradient at every step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from soaplab.optim._checks import check_kind, closure_loss
from soaplab.roles import MATRIX_ROLES, STACK, role_groups

# (groups) -> the matrix half over them.
Build = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]
# (parameter, role) -> [(view, index)] the matrix half steps instead of the parameter (sharing
# its storage; index: which expert of a stack, None for the whole tensor), or None for itself.
Views = Callable[[Tensor, str], list[tuple[Tensor, int | None]] | None]


@dataclass(frozen=True)
class Half:
    """One matrix optimizer of a composite: how it is built over its groups, the views it
    steps, and which hidden/stack groups it takes (the last half also takes those no half
    takes)."""

    build: Build
    views: Views
    takes: Callable[[dict[str, Any]], bool] = lambda group: True


def group_role(group: dict[str, Any]) -> str:
    """A group's role: ``role``, else ``use_muon``/``use_fallback`` as aliases."""
    if "role" in group:
        return group["role"]
    if "use_muon" in group:
        return "hidden" if group["use_muon"] else "other"
    if "use_fallback" in group:
        return "other" if group["use_fallback"] else "hidden"
    raise KeyError("role")


class Composite(torch.optim.Optimizer):
    """``halves`` on the hidden/stack groups, AdamW on the others (see the module docstring).

    ``shards``: whether the matrix halves take FSDP2's sharded (DTensor) parameters; ``parts``:
    whether a model is split by its blocks' parts too (``soaplab.roles.role_groups``).
    """

    def __init__(self, name: str, params: nn.Module | Iterable[dict[str, Any]],
                 halves: Sequence[Half], *, lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, shards: bool,
                 parts: bool = False) -> None:
        self._name, self._shards = name, shards
        groups = role_groups(params, weight_decay, parts=parts) \
            if isinstance(params, nn.Module) else list(params)
        try:
            roles = [group_role(g) for g in groups if isinstance(g, dict)]
        except KeyError:
            roles = []
        if not groups or len(roles) != len(groups):
            raise ValueError(f"{name} needs parameter roles: pass a model, or groups like "
                             "[{'params': hidden, 'role': 'hidden'}, {'params': rest, 'role': "
                             "'other'}] (use_muon / use_fallback flags are accepted too)")
        groups = [{**g, "role": role, "params": list(g["params"])}  # the caller's dicts stay
                  for g, role in zip(groups, roles, strict=True)]
        self._views: list[tuple[Tensor, Tensor, int | None]] = []  # (view, parameter, index)
        self._refuse_shards(groups)
        taken: list[list[dict[str, Any]]] = [[] for _ in halves]
        for g in groups:
            if g["role"] in MATRIX_ROLES:
                i = next((i for i, half in enumerate(halves) if half.takes(g)),
                         len(halves) - 1)
                g["params"] = [v for p in g["params"]
                               for v in self._viewed(p, halves[i].views(p, g["role"]))]
                taken[i].append(g)
        other = [g for g in groups if g["role"] not in MATRIX_ROLES]
        self._inner = [half.build(gs) for half, gs in zip(halves, taken, strict=True) if gs]
        if other:
            self._inner.append(torch.optim.AdamW(other, lr=lr, betas=betas, eps=eps,
                                                 weight_decay=weight_decay))
        super().__init__([g for o in self._inner for g in o.param_groups], {})
        self._link()

    def _viewed(self, p: Tensor, views: list[tuple[Tensor, int | None]] | None) -> list[Tensor]:
        if views is None:
            return [p]
        self._views += [(v, p, i) for v, i in views]
        return [v for v, _ in views]

    def _link(self) -> None:
        """Point the inner optimizers at this object's groups, and each at its own parameters'
        entries of this object's state (again after a load, which replaces both).

        Each half holds its own state dict, sharing the per-parameter entries: torch.compile
        reads every entry of a torch optimizer's state as torch's (a tensor ``step``), which
        SOAP's entries are not. :meth:`_gather` adds the entries a half creates."""
        start = 0
        for o in self._inner:
            groups = self.param_groups[start:start + len(o.param_groups)]
            start += len(groups)
            o.param_groups = groups
            o.state = defaultdict(dict, {p: self.state[p] for g in groups
                                         for p in g["params"] if p in self.state})

    def _gather(self) -> None:
        """Bring the state entries that the halves created into this object's state."""
        for o in self._inner:
            for p, entry in o.state.items():
                self.state.setdefault(p, entry)

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure_loss(closure)
        self._check_groups()
        for view, p, i in self._views:
            grad = p.grad if p.grad is None or i is None else p.grad[i]
            view.grad = None if grad is None else grad.view(view.shape)
        for o in self._inner:
            o.step()
        self._gather()
        return loss

    def _check_groups(self) -> None:
        """The views made at construction must still be what the groups hold: a wrapper that
        rebinds the groups to new tensors (accelerate does, for FSDP2) would leave them stale."""
        held = {id(p) for g in self.param_groups for p in g["params"]}
        if any(id(v) not in held for v, _, _ in self._views):
            raise ValueError(f"{self._name}: its parameter groups were rebound after "
                             "construction (as accelerate does for FSDP2), but its matrix half "
                             "steps views made then; build it on the parameters it will train")
        self._refuse_shards(self.param_groups)

    def _refuse_shards(self, groups: list[dict[str, Any]]) -> None:
        sharded = any(type(p).__name__ == "DTensor" for g in groups for p in g["params"])
        viewed = self._views or any(g["role"] == STACK for g in groups)
        if sharded and (not self._shards or viewed):
            raise ValueError(f"{self._name} does not support FSDP2's sharded (DTensor) "
                             "parameters; use soap or shampoo, which do")

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for _, p, _ in self._views:
            if p.grad is not None:
                if set_to_none:
                    p.grad = None
                else:
                    p.grad.zero_()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        check_kind(self, state_dict)
        super().load_state_dict(state_dict)
        self._link()

    def routes(self) -> Iterator[tuple[Tensor, torch.optim.Optimizer, dict[str, Any]]]:
        """(parameter, the inner optimizer that updates it, its group), once per parameter."""
        origin = {id(v): p for v, p, _ in self._views}
        seen: set[int] = set()
        for o in self._inner:
            for g in o.param_groups:
                for p in (origin.get(id(q), q) for q in g["params"]):
                    if id(p) not in seen:
                        seen.add(id(p))
                        yield p, o, g
