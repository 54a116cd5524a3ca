"""Per-optimizer learning rates and settings used when ``--lrs`` is not given.

The learning rates (``TaskSpec.tuned_lrs`` in tasks.py, one per optimizer family) come from
the sweep recorded in docs/experiments.md ("Learning-rate sweep"): each optimizer ran with
every lr of the sweep on the default task and size, and the lr with the lowest final
validation loss is the one kept. Rerun the sweep with
``soaplab compare lm --optimizers soap --lrs 3e-3,1e-2,3e-2`` (Adafactor, whose lr is a
relative step size, with ``--lrs 1e-2,3e-2,1e-1``). The lm lrs of AdamW and Muon come from
the 1200-step grids of the same page ("The 1200-step lm budget"); the colorize lrs of AdamW,
Muon, Shampoo and SOAP from the 600-step grids on the Debian photos in docs/results.md
("Colorization"). A
variant (``soap_factorized``) uses its family's (``soap``) lr and settings; see
soaplab/registry.py.
"""

from __future__ import annotations

from typing import Any

from soaplab.experiments.tasks import spec
from soaplab.registry import entry

# One setting shared by the Adam-family optimizers, as in the SOAP paper's comparisons.
COMMON: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.95, 0.95), "weight_decay": 0.0},
    "adafactor": {"weight_decay": 0.0},
    "shampoo": {"betas": (0.95, 0.95), "weight_decay": 0.0},
    "soap": {"betas": (0.95, 0.95), "weight_decay": 0.0},
    "kl_shampoo": {"betas": (0.95, 0.95), "weight_decay": 0.0},
    "muon": {"betas": (0.95, 0.95), "weight_decay": 0.0},  # betas: its AdamW half
    "normuon": {"betas": (0.95, 0.95), "weight_decay": 0.0},  # betas: its AdamW half
}
UNTUNED_LR = 3e-3  # for a family no sweep has tuned yet
# What `--beta2s` sweeps: β2 of the Adam-type families (and of the Kronecker factors' EMA,
# which follows β2); what `--momenta` sweeps: the momentum of the Muon-type ones.
BETA2_FAMILIES = ("adamw", "shampoo", "soap", "kl_shampoo")
MOMENTUM_FAMILIES = ("muon", "normuon")


def optimizer_kwargs(name: str, freq: int | None, beta2: float | None = None,
                     momentum: float | None = None) -> dict[str, Any]:
    kwargs = dict(COMMON.get(entry(name).family, {}))
    if freq is not None:
        kwargs["precondition_frequency"] = freq
    if beta2 is not None:
        kwargs["betas"] = (kwargs["betas"][0], beta2)
    if momentum is not None:
        kwargs["momentum"] = momentum
    return kwargs


def default_lr(task: str, name: str) -> float:
    return spec(task).tuned_lrs.get(entry(name).family, UNTUNED_LR)


def uses_frequency(name: str) -> bool:
    return entry(name).frequency


def sweeps_beta2(name: str) -> bool:
    return entry(name).family in BETA2_FAMILIES


def sweeps_momentum(name: str) -> bool:
    return entry(name).family in MOMENTUM_FAMILIES
