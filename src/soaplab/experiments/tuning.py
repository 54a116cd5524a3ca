"""Per-optimizer learning rates and settings used when ``--lrs`` is not given.

The learning rates come from the sweep recorded in docs/experiments.md ("Learning-rate
sweep"): each optimizer ran with every lr of the sweep on the default task and size, and the
lr with the lowest final validation loss is the one below. Rerun the sweep with
``soaplab compare lm --optimizers soap --lrs 3e-3,1e-2,3e-2`` (Adafactor, whose lr is a
relative step size, with ``--lrs 1e-2,3e-2,1e-1``), and likewise for colorize. The lm lrs of
AdamW and Muon come from the 1200-step grids of the same page ("The 1200-step lm budget").
"""

from __future__ import annotations

from typing import Any

# One setting shared by the Adam-family optimizers, as in the SOAP paper's comparisons.
COMMON: dict[str, dict[str, Any]] = {
    "adamw": {"betas": (0.95, 0.95), "weight_decay": 0.0},
    "adafactor": {"weight_decay": 0.0},
    "shampoo": {"betas": (0.95, 0.95), "weight_decay": 0.0},
    "soap": {"betas": (0.95, 0.95), "weight_decay": 0.0},
    "muon": {"betas": (0.95, 0.95), "weight_decay": 0.0},  # betas: its AdamW half
}

TUNED_LRS: dict[str, dict[str, float]] = {
    "lm": {"adamw": 4e-3, "adafactor": 1e-1, "shampoo": 1e-2, "soap": 1e-2, "muon": 5e-3},
    "colorize": {"adamw": 3e-3, "adafactor": 1e-2, "shampoo": 1e-2, "soap": 3e-2, "muon": 1e-2},
}


def family(name: str) -> str:
    """'soap_factorized' -> 'soap', 'shampoo_half' -> 'shampoo'."""
    return name.split("_")[0]


def optimizer_kwargs(name: str, freq: int | None) -> dict[str, Any]:
    kwargs = dict(COMMON.get(family(name), {}))
    if freq is not None:
        kwargs["precondition_frequency"] = freq
    return kwargs


def default_lr(task: str, name: str) -> float:
    return TUNED_LRS[task].get(name, TUNED_LRS[task].get(family(name), 3e-3))


def uses_frequency(name: str) -> bool:
    return family(name) in ("soap", "shampoo")
