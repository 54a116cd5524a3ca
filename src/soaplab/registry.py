"""Pick an optimizer by name: ``soaplab.optimizer("soap", model.parameters(), lr=3e-3)``.

``params`` may also be the model itself, any ``nn.Module``: ``muon`` and ``soap_hidden`` then
split it by role (``soaplab.roles``: hidden matrices on Muon or SOAP, the rest on AdamW),
``soap_muon`` by role and part (SOAP on the MLP matrices, NorMuon on the attention), and
every optimizer gets its vectors (biases, norm gains) in a group without weight decay.

Experiments and the command line name optimizers as strings; this table is the one place that
says what a name means: its constructor, preset kwargs (a variant is a name plus presets), the
family whose tuned settings it shares, and whether it has a preconditioning frequency to sweep.
Adding an optimizer is one line in ``OPTIMIZERS``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from soaplab.roles import decay_groups, role_groups


def _soap(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.soap import SOAP

    return SOAP(params, **kw)


def _shampoo(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.shampoo import Shampoo

    return Shampoo(params, **kw)


def _muon(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.muon import MuonAdamW

    return MuonAdamW(params, **kw)


def _soap_hidden(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.soap_hidden import SoapAdamW

    return SoapAdamW(params, **kw)


def _soap_muon(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.soap_muon import SoapMuon

    return SoapMuon(params, **kw)


def _kl_shampoo(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.kl_shampoo import KLShampoo

    return KLShampoo(params, **kw)


def _normuon(params: Iterable, **kw: Any) -> torch.optim.Optimizer:
    from soaplab.optim.normuon import NorMuonAdamW

    return NorMuonAdamW(params, **kw)


@dataclass(frozen=True)
class Entry:
    """One registered optimizer.

    ``family`` names the optimizer whose tuned lr and shared settings (experiments/tasks.py,
    experiments/tuning.py) this one uses; ``frequency`` says it takes
    ``precondition_frequency`` (swept by ``--freqs``); ``distributed`` says it accepts a
    ``process_group`` (torch's optimizers do not: under DDP they run replicated);
    ``takes_model`` says it is built from the model itself (see :func:`optimizer`), and
    ``parts`` that it splits the hidden matrices by their part of the block too (attention,
    MLP: ``soaplab.roles.infer_parts``); ``lr`` is the learning rate used when none is given.
    """

    build: Callable[..., torch.optim.Optimizer]
    family: str
    lr: float | None = None  # None: the constructor's own default
    frequency: bool = False
    distributed: bool = False
    presets: Mapping[str, Any] = field(default_factory=dict)
    takes_model: bool = False  # splits the model by role (muon, soap_hidden)
    parts: bool = False  # and its hidden matrices by part (soap_muon)

    def __call__(self, params: Iterable, **kwargs: Any) -> torch.optim.Optimizer:
        return self.build(params, **{**self.presets, **kwargs})


def _kronecker(build: Callable[..., torch.optim.Optimizer], family: str, **presets: Any) -> Entry:
    return Entry(build, family, _DEFAULT_LRS[family], frequency=True, distributed=True,
                 presets=presets)


# Learning rates when none is given, per family: AdamW's and Shampoo's constructor defaults,
# SOAP's and Muon's (match_rms_adamw) the reference's 3e-3, and Adafactor's 1e-1, its tuned lm
# lr: torch's Adafactor lr is a step relative to each parameter's RMS, so an AdamW-sized lr
# barely moves a model initialized at std 0.02. The experiments always pass the lr tuned per
# task (experiments/tasks.py). NorMuon takes Muon's (the same step RMS); KL-Shampoo twice SOAP's,
# as on the micro GPT's lr grid (docs/optimizers.md). soap_muon takes SOAP's and NorMuon's,
# which are the same.
_DEFAULT_LRS = {"adamw": 1e-3, "adafactor": 1e-1, "muon": 3e-3, "shampoo": 1e-3, "soap": 3e-3,
                "normuon": 3e-3, "kl_shampoo": 6e-3, "soap_muon": 3e-3}

OPTIMIZERS: dict[str, Entry] = {
    "adamw": Entry(torch.optim.AdamW, "adamw", _DEFAULT_LRS["adamw"]),
    "adafactor": Entry(torch.optim.Adafactor, "adafactor", _DEFAULT_LRS["adafactor"]),
    "muon": Entry(_muon, "muon", _DEFAULT_LRS["muon"], takes_model=True),
    "normuon": Entry(_normuon, "normuon", _DEFAULT_LRS["normuon"], takes_model=True),
    "shampoo": _kronecker(_shampoo, "shampoo"),
    "shampoo_half": _kronecker(_shampoo, "shampoo", exponent=0.5),
    "kl_shampoo": Entry(_kl_shampoo, "kl_shampoo", _DEFAULT_LRS["kl_shampoo"], frequency=True),
    "soap": _kronecker(_soap, "soap"),
    "soap_eigh": _kronecker(_soap, "soap", refresh="eigh"),
    "soap_adaptive": _kronecker(_soap, "soap", precondition_frequency=1, refresh_tolerance=0.15,
                                refresh_budget=0.45),
    "soap_one_sided": _kronecker(_soap, "soap", one_sided=True),
    "soap_factorized": _kronecker(_soap, "soap", factorized=True),
    "soap_one_sided_factorized": _kronecker(_soap, "soap", one_sided=True, factorized=True),
    # The storage combination that measured best (docs/optimizers.md, "State storage").
    "soap_lowmem": _kronecker(_soap, "soap", factor_storage="packed", basis_storage="int8",
                              momentum_storage="bf16"),
    # Smaller: bf16 factors, which lose the factors' small eigen-directions (docs/optimizers.md).
    "soap_lowmem_bf16_factors": _kronecker(_soap, "soap", factor_storage="packed_bf16",
                                           basis_storage="int8", momentum_storage="bf16"),
    # SOAP on the hidden matrices only, AdamW on the rest ("SOAP-H"; soaplab.optim.soap_hidden).
    "soap_hidden": Entry(_soap_hidden, "soap", _DEFAULT_LRS["soap"], frequency=True,
                         takes_model=True),
    # SOAP on the MLP matrices, NorMuon on the attention, AdamW on the rest (modded-nanogpt's
    # record split; soaplab.optim.soap_muon).
    "soap_muon": Entry(_soap_muon, "soap_muon", _DEFAULT_LRS["soap_muon"], frequency=True,
                       takes_model=True, parts=True),
}


def canonical(name: str) -> str:
    """The registry key of ``name`` ('-' and '_' are interchangeable, case is ignored)."""
    key = name.strip().lower().replace("-", "_")
    if key not in OPTIMIZERS:
        known = ", ".join(sorted(OPTIMIZERS))
        raise ValueError(f"unknown optimizer {name!r}; known optimizers: {known}")
    return key


def entry(name: str) -> Entry:
    return OPTIMIZERS[canonical(name)]


def optimizer(name: str, params: Iterable | nn.Module, process_group: Any = None,
              roles: Mapping[str, str] | None = None, **kwargs: Any) -> torch.optim.Optimizer:
    """Build the optimizer registered under ``name`` ('-' and '_' are interchangeable).

    ``process_group`` (under DDP, e.g. ``torch.distributed.group.WORLD``) reaches soaplab's
    optimizers, which then split their preconditioner work across its ranks (see
    docs/distributed.md). torch's optimizers (AdamW, Adafactor) have no such mode and ignore
    it: they run replicated, every rank doing the same update on the same all-reduced gradient.
    So do ``muon`` (Muon and AdamW) and ``soap_hidden``.

    ``roles`` (with a model): ``{glob on parameter names: role}`` that override the inferred
    roles (see ``soaplab.roles``; ``soaplab.describe_roles`` shows the outcome).
    """
    found = entry(name)
    if process_group is not None and found.distributed:
        kwargs["process_group"] = process_group
    if found.lr is not None:
        kwargs.setdefault("lr", found.lr)
    if isinstance(params, nn.Module):
        params = role_groups(params, kwargs.get("weight_decay"), roles, parts=found.parts) \
            if found.takes_model else decay_groups(params, kwargs.get("weight_decay"), roles)
    elif roles is not None:
        raise ValueError("roles= needs the model itself, not its parameters")
    return found(params, **kwargs)
