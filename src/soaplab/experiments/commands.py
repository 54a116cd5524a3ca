"""``soaplab compare <task>``: parse flags into a CompareConfig and run it."""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path

import torch

from soaplab import torchrun
from soaplab.experiments import tuning
from soaplab.experiments.compare import CompareConfig, compare
from soaplab.experiments.loop import PRECISIONS, TrainConfig
from soaplab.experiments.tasks import TASKS, TaskOptions
from soaplab.optim.muon import NS_DTYPES
from soaplab.registry import OPTIMIZERS, canonical

INTERRUPTED = ("rerun the same command with --resume to continue: finished runs are kept, and "
               "a run with --checkpoint-every continues from its last checkpoint")


def _list(kind: type):
    """A comma-separated list, each value once, in the order given."""
    def parse(text: str) -> list:
        try:
            return list(dict.fromkeys(kind(item) for item in text.split(",") if item.strip()))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of "
                                             f"{kind.__name__}, got {text!r}") from None
    return parse


def _optimizers(text: str) -> list[str]:
    names = [n.strip().lower().replace("-", "_") for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in OPTIMIZERS]
    if unknown or not names:
        which = ", ".join(unknown) or repr(text)
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {which}; "
                                         f"known: {', '.join(sorted(OPTIMIZERS))}")
    return list(dict.fromkeys(names))


def _lrs_of(text: str) -> tuple[str, list[float]]:
    """``NAME=LR[,LR...]``: one optimizer's lrs."""
    name, sep, values = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=LR[,LR...], e.g. muon=0.008, got "
                                         f"{text!r}")
    return _optimizers(name)[0], _list(float)(values)


def _setting_of(text: str) -> tuple[str, str, list[float]]:
    """``NAME.SETTING=VALUE[,VALUE...]``: one optimizer's values of a swept setting."""
    target, sep, values = text.partition("=")
    name, dot, knob = target.rpartition(".")
    if not (sep and dot):
        raise argparse.ArgumentTypeError(f"expected NAME.SETTING=VALUE[,VALUE...], e.g. "
                                         f"soap_muon.momentum=0.95, got {text!r}")
    knobs = [k.name for k in tuning.KNOBS]
    if knob not in knobs:
        raise argparse.ArgumentTypeError(f"unknown setting {knob!r} in {text!r}; choose one "
                                         f"of {', '.join(knobs)}")
    return _optimizers(name)[0], knob, _list(float)(values)


def register(sub: argparse._SubParsersAction) -> None:
    compare_parser = sub.add_parser("compare", help="train and compare optimizers on a task")
    tasks = compare_parser.add_subparsers(dest="task", required=True)
    for task, spec in TASKS.items():
        p = tasks.add_parser(task, help=spec.help)
        p.add_argument("--steps", type=int, default=spec.steps,
                       help="training steps per run (default %(default)s)")
        p.add_argument("--optimizers", type=_optimizers,
                       default=["adamw", "muon", "soap"],
                       help="comma-separated registry names (default adamw,muon,soap)")
        p.add_argument("--freqs", type=_list(int), default=None,
                       help="preconditioning frequencies to sweep for soap/shampoo, e.g. 1,10,100")
        p.add_argument("--lrs", type=_list(float), default=None,
                       help="learning rates to sweep (default: the tuned lr of each optimizer)")
        p.add_argument("--lr", type=_lrs_of, action="append", default=[], metavar="NAME=LRS",
                       help="one optimizer's lrs, in place of --lrs or its tuned lr "
                            "(repeatable), e.g. --lr muon=0.008 --lr soap=0.004,0.008")
        for knob in tuning.KNOBS:
            p.add_argument(f"--{knob.flag.replace('_', '-')}", type=_list(float), default=None,
                           help=knob.help)
        p.add_argument("--set", type=_setting_of, action="append", default=[],
                       dest="settings_of", metavar="NAME.SETTING=VALUES",
                       help="one optimizer's values of a setting above (beta1, beta2, momentum, "
                            "weight_decay), in place of its sweep flag (repeatable), e.g. "
                            "--momenta 0.9 --set soap_muon.momentum=0.95")
        p.add_argument("--seeds", type=_list(int), default=[0],
                       help="seeds (default 0); with several, the report gives the mean and "
                            "spread of the final loss and of the ratios to AdamW")
        p.add_argument("--batch-sizes", type=_list(int), default=None,
                       help="batch sizes to sweep, steps held fixed (overrides --batch-size)")
        p.add_argument("--lengths", type=_list(int), default=None,
                       help="training lengths (step budgets) to sweep, each a full schedule "
                            "(overrides --steps)")
        p.add_argument("--out", type=Path, default=Path(f"runs/compare-{task}"),
                       help="run folder (default %(default)s); must be empty or new unless "
                            "--resume or --overwrite")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--precision", default="fp32", choices=PRECISIONS,
                       help="fp32, or bf16 autocast for the model's forward and loss (params "
                            "and optimizer state stay fp32; default fp32)")
        p.add_argument("--ns-dtype", default=None, choices=list(NS_DTYPES),
                       help="dtype of the Newton–Schulz iteration of muon, normuon and "
                            "soap_muon (default bfloat16, torch's; float32 was 27x faster on "
                            "an AVX2-only CPU without native bfloat16: docs/optimizers.md)")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice; 1 is faster on a "
                            "busy shared machine, where threads spin-wait on each other)")
        p.add_argument("--jobs", type=int, default=1,
                       help="runs to train side by side, each in its own process (default 1; "
                            "each gets --threads threads, or torch's default divided by "
                            "--jobs). Results are bitwise those of one process with as many "
                            "threads; several one-thread runs finish sooner than one run after "
                            "another on a small CPU")
        p.add_argument("--size", default="tiny", choices=["micro", "tiny", "small", "paper"],
                       help="model size (default tiny; micro is for smoke tests)")
        p.add_argument("--batch-size", type=int, default=32,
                       help="examples per step (default %(default)s)")
        p.add_argument("--eval-every", type=int, default=25,
                       help="steps between evaluations, after one at step 0 (default "
                            "%(default)s)")
        p.add_argument("--warmup", type=int, default=20,
                       help="linear warm-up steps (default %(default)s)")
        p.add_argument("--checkpoint-every", type=int, default=0,
                       help="save a checkpoint every N steps (default 0: never)")
        p.add_argument("--resume", action="store_true",
                       help="continue the comparison in --out (its manifest.json must match "
                            "these settings): finished runs are read back, not retrained, and "
                            "others continue from their checkpoints")
        p.add_argument("--overwrite", action="store_true",
                       help="move a non-empty --out aside (to <out>.old-<time>) and start afresh")
        p.add_argument("--reuse", type=Path, action="append", default=[], metavar="FOLDER",
                       help="copy finished runs from this earlier comparison's folder instead "
                            "of training them, where their settings are identical (repeatable)")
        p.add_argument("--against", default=None, metavar="NAME",
                       help="add paired-seed statistics of every optimizer against this one "
                            "(one of --optimizers) to the report: per seed, the difference of "
                            "final losses and the steps to its final loss, with a verdict")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        for flag, kwargs in spec.flags:
            p.add_argument(flag, **kwargs)
        p.set_defaults(func=run, interrupted=INTERRUPTED)


SEEDS = 2**32  # seeds lie in [0, SEEDS): torch seeds its generators with seed and seed + 1


def _check(args: argparse.Namespace) -> None:
    """Every flag argparse cannot check alone, one line naming the flag; nothing is written
    before these pass."""
    for name in ("seeds", "lrs", "freqs", "batch_sizes", "lengths",
                 *(k.flag for k in tuning.KNOBS)):
        if getattr(args, name) == []:
            raise ValueError(f"--{name.replace('_', '-')} is empty; give at least one value "
                             "or leave the flag out")
    sweeps = (args.batch_sizes or []) + (args.lengths or [])
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--batch-sizes/--lengths", min(sweeps, default=1)),
                        ("--eval-every", args.eval_every),
                        ("--threads", 1 if args.threads is None else args.threads),
                        ("--jobs", args.jobs)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    for name, value in (("--warmup", args.warmup), ("--checkpoint-every", args.checkpoint_every)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not 0 <= getattr(args, "dropout", 0.0) < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
    knobs = {k.name: k for k in tuning.KNOBS}
    given = [(f"--{k.flag.replace('_', '-')}", k, getattr(args, k.flag) or [])
             for k in tuning.KNOBS]
    for name, setting, values in args.settings_of:
        flag = f"--set {name}.{setting}"
        if name not in args.optimizers:
            raise ValueError(f"{flag}=...: {name} is not among --optimizers "
                             f"({','.join(args.optimizers)}); add it there")
        if not knobs[setting].applies(name):
            raise ValueError(f"{flag}=...: {name} has no {setting} (it applies to "
                             f"{', '.join(knobs[setting].families or ())})")
        if [(n, k) for n, k, _ in args.settings_of].count((name, setting)) > 1:
            raise ValueError(f"{flag}=... is given twice; list its values once")
        if not values:
            raise ValueError(f"{flag}= has no value; give at least one")
        given.append((flag, knobs[setting], values))
    for flag, knob, values in given:
        if knob.name == "weight_decay" and any(not (math.isfinite(v) and v >= 0) for v in values):
            raise ValueError(f"{flag} must be >= 0 and finite, got {values}")
        if knob.name != "weight_decay" and any(not 0 <= v < 1 for v in values):
            raise ValueError(f"{flag} must be in [0, 1), got {values}")
    if any(f < 1 for f in args.freqs or []):
        raise ValueError(f"--freqs must be >= 1, got {args.freqs}")
    named = [name for name, _ in args.lr]
    for name in named:
        if name not in args.optimizers:
            raise ValueError(f"--lr {name}=...: {name} is not among --optimizers "
                             f"({','.join(args.optimizers)}); add it there")
        if named.count(name) > 1:
            raise ValueError(f"--lr {name}=... is given twice; list its lrs once, e.g. "
                             f"--lr {name}=0.004,0.008")
    if any(values == [] for _, values in args.lr):
        raise ValueError("--lr NAME= has no lr; give at least one, e.g. --lr muon=0.008")
    for flag, values in (("--lrs", args.lrs or []),
                         *((f"--lr {name}=", values) for name, values in args.lr)):
        if any(not (math.isfinite(lr) and lr > 0) for lr in values):
            raise ValueError(f"{flag.rstrip('=')} must be positive and finite (an lr of 0 "
                             f"trains nothing), got {values}")
    if args.against is not None and canonical(args.against) not in args.optimizers:
        raise ValueError(f"--against {args.against} is not among --optimizers "
                         f"({','.join(args.optimizers)}); add it there")
    if any(not 0 <= s < SEEDS for s in args.seeds):
        raise ValueError(f"--seeds must lie in [0, 2**32), got {args.seeds}")
    if getattr(args, "max_chars", None) is not None and args.max_chars < 1:
        raise ValueError(f"--max-chars must be >= 1, got {args.max_chars}")
    _check_device(args.device)
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite moves it aside; "
                         "pass one of them")
    if args.resume and not torchrun.restarted() and not (
            args.out.is_dir() and any(args.out.iterdir())):
        raise ValueError(f"--resume: {args.out} is missing or empty, so there is nothing to "
                         "continue; drop --resume to start the comparison there")


def _check_device(name: str) -> None:
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name!r} is not a device; choose cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: choose cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available on this machine")


def run(args: argparse.Namespace) -> int:
    _check(args)
    if args.threads or args.jobs > 1:  # with --jobs, the threads of each run
        torch.set_num_threads(args.threads or max(1, torch.get_num_threads() // args.jobs))
    with torchrun.session(args.device):
        report = compare(_config(args))
        if torchrun.is_main():
            print(f"report: {report}")
            print(report.read_text())
    return 0


def _config(args: argparse.Namespace) -> CompareConfig:
    """The comparison the flags ask for. Under torchrun, a restarted worker (after a rank
    failed) resumes: every run continues from its checkpoint, as with ``--resume``."""
    given = vars(args)  # the task's own flags (tasks.TASKS) are named after TaskOptions fields
    task = TaskOptions(**{f.name: given[f.name] for f in fields(TaskOptions) if f.name in given})
    train = TrainConfig(steps=args.steps, warmup=min(args.warmup, args.steps),
                        eval_every=args.eval_every, precision=args.precision,
                        device=torchrun.device(args.device),
                        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    return CompareConfig(task=task, train=train, optimizers=args.optimizers, freqs=args.freqs,
                         lrs=args.lrs, lrs_of=dict(args.lr),
                         settings_of=_settings_of(args.settings_of),
                         **{k.flag: getattr(args, k.flag) for k in tuning.KNOBS},
                         seeds=args.seeds, batch_sizes=args.batch_sizes,
                         lengths=args.lengths, out=args.out,
                         against=None if args.against is None else canonical(args.against),
                         ns_dtype=args.ns_dtype, jobs=args.jobs,
                         resume=args.resume or torchrun.restarted(), reuse=args.reuse,
                         overwrite=args.overwrite and not torchrun.restarted())


def _settings_of(given: list[tuple[str, str, list[float]]]) -> dict[str, dict[str, list[float]]]:
    settings: dict[str, dict[str, list[float]]] = {}
    for name, setting, values in given:
        settings.setdefault(name, {})[setting] = values
    return settings
