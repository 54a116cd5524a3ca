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

from dataclasses import dataclass
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
    "soap_muon": {"betas": (0.95, 0.95), "weight_decay": 0.0},  # betas: SOAP's and AdamW's
}
UNTUNED_LR = 3e-3  # for a family no sweep has tuned yet


@dataclass(frozen=True)
class Knob:
    """A setting a comparison may sweep beside the lr (``--beta2s`` sweeps ``beta2``).

    ``families`` are the optimizer families it applies to (None: every one); ``tag`` and
    ``legend`` name its value in run folders and in report legends.
    """

    name: str  # the Run field and the report column
    flag: str  # the CompareConfig field and the command-line flag (with - for _)
    tag: str
    legend: str
    families: tuple[str, ...] | None
    help: str

    def applies(self, optimizer: str) -> bool:
        return self.families is None or entry(optimizer).family in self.families

    def set(self, kwargs: dict[str, Any], value: float) -> None:
        if self.name == "beta1":
            kwargs["betas"] = (value, kwargs["betas"][1])
        elif self.name == "beta2":
            kwargs["betas"] = (kwargs["betas"][0], value)
        else:
            kwargs[self.name] = value


# β2 also sets the Kronecker factors' EMA, which follows it; β1 of muon and normuon is their
# AdamW half's (their own momentum is ``momentum``); weight decay never reaches vectors.
_WITH_BETAS = tuple(f for f, kw in COMMON.items() if "betas" in kw)
KNOBS = (
    Knob("beta1", "beta1s", "-beta1", "beta1", _WITH_BETAS,
         "β1 values to sweep (the momentum of the Adam-type optimizers, and of muon's and "
         "normuon's AdamW half), e.g. 0.9,0.95"),
    Knob("beta2", "beta2s", "-beta2", "beta2",
         ("adamw", "shampoo", "soap", "kl_shampoo", "soap_muon"),
         "β2 values to sweep for the Adam-type optimizers (adamw, soap, shampoo, kl_shampoo "
         "and their variants; soap_muon's SOAP half), e.g. 0.95,0.99"),
    Knob("momentum", "momenta", "-mom", "m", ("muon", "normuon", "soap_muon"),
         "momentum values to sweep for the Muon-type optimizers (muon, normuon; soap_muon's "
         "NorMuon half), e.g. 0.9,0.95"),
    Knob("weight_decay", "weight_decays", "-wd", "wd", None,
         "weight decays to sweep, for every optimizer (never on vectors: biases, norm gains), "
         "e.g. 0,0.1"),
)


# The families with a Newton–Schulz iteration, whose dtype ``--ns-dtype`` sets
# (soaplab.optim.muon: float32 where bfloat16 matmuls are slow).
NEWTON_SCHULZ = ("muon", "normuon", "soap_muon")


def optimizer_kwargs(name: str, freq: int | None, ns_dtype: str | None = None,
                     **knobs: float | None) -> dict[str, Any]:
    """The settings of ``name`` in a comparison: its family's (``COMMON``), its frequency, its
    Newton–Schulz dtype (None: the optimizer's, torch's bfloat16), and the swept ``knobs`` (by
    ``Knob.name``; None keeps the family's)."""
    kwargs = dict(COMMON.get(entry(name).family, {}))
    if freq is not None:
        kwargs["precondition_frequency"] = freq
    if ns_dtype is not None and entry(name).family in NEWTON_SCHULZ:
        kwargs["ns_dtype"] = ns_dtype
    for knob in KNOBS:
        if knobs.get(knob.name) is not None:
            knob.set(kwargs, knobs[knob.name])
    return kwargs


def default_lr(task: str, name: str) -> float:
    return spec(task).tuned_lrs.get(entry(name).family, UNTUNED_LR)


def uses_frequency(name: str) -> bool:
    return entry(name).frequency
