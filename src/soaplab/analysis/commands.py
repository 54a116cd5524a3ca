"""``soaplab analyze kronecker|whitening``: parse flags, run the study, write report.md."""

from __future__ import annotations

import argparse
import math
import shlex
from dataclasses import fields

from soaplab.analysis import data
from soaplab.analysis.report import write_report
from soaplab.analysis.study import ACTIVATIONS, StudyConfig, run
from soaplab.registry import OPTIMIZERS

DEFAULTS = StudyConfig()
INTERRUPTED = "rerun the command with --overwrite to start it again (an analysis does not resume)"


def _ints(text: str) -> tuple[int, ...]:
    """'0,25,50' -> (0, 25, 50)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,25,50; got {text!r}") from None


def _csv(values: tuple[int, ...]) -> str:
    return ",".join(str(v) for v in values)


# (flag, config field, argparse kwargs); shared by both analyses unless listed per kind below.
COMMON = [
    ("--out", "out", {"help": "run folder to write (manifest.json, config.json, metrics.jsonl, "
                              "report.md, PNGs); must be empty or new unless --overwrite"}),
    ("--dataset", "dataset", {"choices": data.DATASETS, "help": "image set, pooled to 8x8"}),
    ("--data-dir", "data_dir", {"help": "Fashion-MNIST folder (Debian dataset-fashion-mnist)"}),
    ("--data-limit", "data_limit", {"type": int, "help": "max Fashion-MNIST images loaded"}),
    ("--optimizer", "optimizer", {"choices": sorted(OPTIMIZERS), "help": "training optimizer"}),
    ("--lr", "lr", {"type": float, "help": "learning rate"}),
    ("--steps", "steps", {"type": int, "help": "training steps"}),
    ("--batch-size", "batch_size", {"type": int, "help": "training batch size (examples)"}),
    ("--hidden", "hidden", {"type": int, "help": "MLP width: 64 -> hidden -> hidden -> 10"}),
    ("--activation", "activation", {"choices": sorted(ACTIVATIONS), "help": "MLP nonlinearity"}),
    ("--snapshots", "snapshots",
     {"type": _ints, "help": "comma-separated steps to measure at (default: those of "
                             f"{_csv(DEFAULTS.snapshots)} below --steps, and --steps)"}),
    ("--probe", "probe", {"type": int, "help": "training examples the matrices average over"}),
    ("--max-layer-size", "max_layer_size",
     {"type": int, "help": "study weights with at most this many entries (dense (mn)^2 matrices)"}),
    ("--seed", "seed", {"type": int, "help": "seed for split, init, batches and label sampling"}),
    ("--threads", "threads", {"type": int, "help": "torch CPU threads"}),
]
PER_KIND = {
    "kronecker": [
        ("--batch-sizes", "batch_sizes",
         {"type": _ints, "help": "batch sizes b for the L_b (x) R_b batch-gradient variants"}),
        ("--batch-repeats", "batch_repeats",
         {"type": int, "help": "label draws and random partitions averaged for each b"}),
        ("--hessian-max-size", "hessian_max_size",
         {"type": int, "help": "also compute the exact Hessian for layers up to this size"}),
    ],
    "whitening": [
        ("--damping", "damping", {"type": float, "help": "C + damping*tr(C)/dim*I before C^-1/2"}),
    ],
}
HELP = {
    "kronecker": "optimal Kronecker, Shampoo^2 and Shampoo approximations of the GGN in training",
    "whitening": "Adam/Shampoo/SOAP preconditioners against the whitening matrix C^-1/2",
}


def default_snapshots(steps: int) -> tuple[int, ...]:
    """The default snapshot steps that a run of ``steps`` reaches, and its last step."""
    return tuple(s for s in DEFAULTS.snapshots if s < steps) + (steps,)


def _config(kind: str, args: argparse.Namespace) -> StudyConfig:
    names = {f.name for f in fields(StudyConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    if values["snapshots"] is None:
        values["snapshots"] = default_snapshots(values["steps"])
    return StudyConfig(kind=kind, **values)


def command_line(cfg: StudyConfig) -> str:
    """The shortest ``soaplab analyze`` command that rebuilds ``cfg`` (non-default flags only)."""
    words = ["soaplab", "analyze", cfg.kind]
    for flag, name, _ in COMMON + PER_KIND[cfg.kind]:
        value = getattr(cfg, name)
        if value != getattr(DEFAULTS, name) or name == "out":
            words += [flag, _csv(value) if isinstance(value, tuple) else str(value)]
    return shlex.join(words)


def _check(cfg: StudyConfig) -> None:
    """What ``study.validate`` leaves to the command line, one line naming the flag; the
    sizes that depend on the data are checked once it loads (``study.run``)."""
    for flag, value, low in (("--damping", cfg.damping, 0.0), ("--lr", cfg.lr, None),
                             ("--data-limit", cfg.data_limit, 1),
                             ("--max-layer-size", cfg.max_layer_size, 1),
                             ("--hessian-max-size", cfg.hessian_max_size, 0)):
        if not math.isfinite(value) or (value <= 0 if low is None else value < low):
            bound = "> 0" if low is None else f">= {low}"
            raise ValueError(f"{flag} must be finite and {bound}, got {value}")
    for flag, values in (("--snapshots", cfg.snapshots), ("--batch-sizes", cfg.batch_sizes)):
        if not values:
            raise ValueError(f"{flag} is empty; give at least one value or leave the flag out")
    if cfg.kind == "kronecker" and any(not 1 <= b <= cfg.probe for b in cfg.batch_sizes):
        raise ValueError(f"--batch-sizes must lie in [1, --probe {cfg.probe}], got "
                         f"{_csv(cfg.batch_sizes)}")


def _handler(kind: str):
    def analyze(args: argparse.Namespace) -> int:
        cfg = _config(kind, args)
        _check(cfg)
        report = write_report(run(cfg, overwrite=args.overwrite), command_line(cfg))
        print(f"wrote {report}")
        return 0

    return analyze


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``analyze`` with the sub-subcommands ``kronecker`` and ``whitening``."""
    analyze = sub.add_parser("analyze", help="curvature analyses of a small MLP (papers 2 and 3)")
    kinds = analyze.add_subparsers(dest="analysis", required=True)
    for kind, help_text in HELP.items():
        parser = kinds.add_parser(kind, help=help_text, description=help_text,
                                  formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        for flag, name, kwargs in COMMON + PER_KIND[kind]:
            default = getattr(DEFAULTS, name)
            if name == "out":
                default = f"runs/analysis/{kind}"
            if name == "snapshots":
                default = None  # follows --steps: see default_snapshots
            parser.add_argument(flag, dest=name, default=default, **kwargs)
        parser.add_argument("--overwrite", action="store_true",
                            help="move a non-empty --out aside (to <out>.old-<time>) first")
        parser.set_defaults(func=_handler(kind), interrupted=INTERRUPTED)
