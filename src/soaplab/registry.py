"""Pick an optimizer by name: ``soaplab.optimizer("soap", model.parameters(), lr=3e-3)``.

``params`` may also be the model itself: ``muon`` then reads its ``param_roles()`` (which
parameters are hidden matrices, see ``soaplab.optim.muon``), the others its parameters.

Experiments and the command line name optimizers as strings; this table is the one place that
maps a name to a constructor and its fixed settings (a variant is a name plus preset kwargs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def _soap(**preset: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
        from soaplab.optim.soap import SOAP

        return SOAP(params, **{**preset, **kw})

    return build


def _shampoo(**preset: Any) -> Callable[..., torch.optim.Optimizer]:
    def build(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
        from soaplab.optim.shampoo import Shampoo

        return Shampoo(params, **{**preset, **kw})

    return build


def _muon(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.muon import MuonAdamW

    return MuonAdamW(params, **kw)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adamw": torch.optim.AdamW,
    "adafactor": torch.optim.Adafactor,
    "muon": _muon,
    "shampoo": _shampoo(),
    "shampoo_half": _shampoo(exponent=0.5),
    "soap": _soap(),
    "soap_eigh": _soap(refresh="eigh"),
    "soap_one_sided": _soap(one_sided=True),
    "soap_factorized": _soap(factorized=True),
    "soap_one_sided_factorized": _soap(one_sided=True, factorized=True),
}

# torch's optimizers: no split mode, so under DDP they run replicated.
REPLICATED = frozenset({"adamw", "adafactor", "muon"})
# optimizers that take the model itself (to read parameter roles) rather than its parameters
TAKES_MODEL = frozenset({"muon"})


def optimizer(name: str, params: Iterable | nn.Module, process_group: Any = None,
              **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered under ``name`` ('-' and '_' are interchangeable).

    ``process_group`` (under DDP, e.g. ``torch.distributed.group.WORLD``) reaches soaplab's
    optimizers, which then split their preconditioner work across its ranks (see
    docs/distributed.md). torch's optimizers (AdamW, Adafactor) have no such mode and ignore
    it: they run replicated, every rank doing the same update on the same all-reduced gradient.
    So does ``muon`` (torch.optim.Muon and AdamW).
    """
    key = name.strip().lower().replace("-", "_")
    if key not in OPTIMIZERS:
        known = ", ".join(sorted(OPTIMIZERS))
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {known}")
    if process_group is not None and key not in REPLICATED:
        kwargs["process_group"] = process_group
    if isinstance(params, nn.Module) and key not in TAKES_MODEL:
        params = params.parameters()
    return OPTIMIZERS[key](params, **kwargs)
