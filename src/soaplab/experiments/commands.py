"""``soaplab compare lm|colorize``: parse flags into a CompareConfig and run it."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from soaplab.experiments import ddp
from soaplab.experiments.compare import CompareConfig, compare
from soaplab.experiments.loop import TrainConfig
from soaplab.experiments.tasks import TaskOptions
from soaplab.registry import OPTIMIZERS

# lm: 1200 steps takes AdamW past the bigram plateau (val <= 1.8 nats/char; docs/results.md)
DEFAULT_STEPS = {"lm": 1200, "colorize": 400}


def _list(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
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
    return names


def register(sub: argparse._SubParsersAction) -> None:
    compare_parser = sub.add_parser("compare", help="train and compare optimizers on a task")
    tasks = compare_parser.add_subparsers(dest="task", required=True)
    for task, help_text in (("lm", "character-level Shakespeare with a nanoGPT"),
                            ("colorize", "grey photo -> colour with a small U-Net")):
        p = tasks.add_parser(task, help=help_text)
        p.add_argument("--steps", type=int, default=DEFAULT_STEPS[task],
                       help="training steps per run (default %(default)s)")
        p.add_argument("--optimizers", type=_optimizers,
                       default=["adamw", "muon", "soap"],
                       help="comma-separated registry names (default adamw,muon,soap)")
        p.add_argument("--freqs", type=_list(int), default=None,
                       help="preconditioning frequencies to sweep for soap/shampoo, e.g. 1,10,100")
        p.add_argument("--lrs", type=_list(float), default=None,
                       help="learning rates to sweep (default: the tuned lr of each optimizer)")
        p.add_argument("--seeds", type=_list(int), default=[0],
                       help="seeds (default 0); with several, the report gives the mean and "
                            "spread of the final loss and of the ratios to AdamW")
        p.add_argument("--batch-sizes", type=_list(int), default=None,
                       help="batch sizes to sweep, steps held fixed (overrides --batch-size)")
        p.add_argument("--lengths", type=_list(int), default=None,
                       help="training lengths (step budgets) to sweep, each a full schedule "
                            "(overrides --steps)")
        p.add_argument("--out", type=Path, default=Path(f"runs/compare-{task}"),
                       help="run folder (default %(default)s)")
        p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
        p.add_argument("--threads", type=int, default=None,
                       help="CPU threads for torch (default: torch's choice; 1 is faster on a "
                            "busy shared machine, where threads spin-wait on each other)")
        p.add_argument("--size", default="tiny", choices=["micro", "tiny", "small", "paper"],
                       help="model size (default tiny; micro is for smoke tests)")
        p.add_argument("--batch-size", type=int, default=32, help="examples per step")
        p.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
        p.add_argument("--warmup", type=int, default=20, help="linear warm-up steps")
        p.add_argument("--checkpoint-every", type=int, default=0,
                       help="save a checkpoint every N steps (0: never)")
        p.add_argument("--resume", action="store_true",
                       help="continue each run from its checkpoint in --out; runs already "
                            "finished there are read back, not retrained")
        p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
        if task == "lm":
            p.add_argument("--text", default=None, help="train on this text file instead")
            p.add_argument("--max-chars", type=int, default=None,
                           help="use only the first N characters of the corpus")
        else:
            p.add_argument("--images", default=None,
                           help="folder of JPEG/PNG colour photos instead of the bundled set")
        p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    sweeps = (args.batch_sizes or []) + (args.lengths or [])
    for name, value in (("--steps", args.steps), ("--batch-size", args.batch_size),
                        ("--batch-sizes/--lengths", min(sweeps, default=1)),
                        ("--eval-every", args.eval_every),
                        ("--threads", 1 if args.threads is None else args.threads)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if args.threads:
        torch.set_num_threads(args.threads)
    with ddp.session(args.device):
        report = compare(_config(args))
        if ddp.is_main():
            print(f"report: {report}")
            print(report.read_text())
    return 0


def _config(args: argparse.Namespace) -> CompareConfig:
    """The comparison the flags ask for. Under torchrun, a restarted worker (after a rank
    failed) resumes: every run continues from its checkpoint, as with ``--resume``."""
    task = TaskOptions(task=args.task, size=args.size, text=getattr(args, "text", None),
                       max_chars=getattr(args, "max_chars", None),
                       images=getattr(args, "images", None), batch_size=args.batch_size)
    train = TrainConfig(steps=args.steps, warmup=min(args.warmup, args.steps),
                        eval_every=args.eval_every, device=ddp.device(args.device),
                        checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
    return CompareConfig(task=task, train=train, optimizers=args.optimizers, freqs=args.freqs,
                         lrs=args.lrs, seeds=args.seeds, batch_sizes=args.batch_sizes,
                         lengths=args.lengths, out=args.out,
                         resume=args.resume or ddp.restarted())
