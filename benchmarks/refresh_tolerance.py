"""Pick SOAP's adaptive refresh on the lm task: loss, time and refreshes for each setting.

Run (CPU; one line per setting and seed, then the mean over seeds)::

    python benchmarks/refresh_tolerance.py --freqs 10 --taus 0,0.05,0.1,0.2,inf --steps 200
    python benchmarks/refresh_tolerance.py --freqs 1 --taus 0.1,0.2 --budgets none,0.3

Every run trains the default lm task (tiny GPT, tuned SOAP lr and settings of ``soaplab compare
lm``) with ``SOAP(..., precondition_frequency=f, refresh_tolerance=τ, refresh_budget=b)`` for
every f, τ and b given (``none``: no budget). τ = 0 without a budget is the fixed schedule
(``soap``), τ = inf keeps the first bases. Settings run one after another in one process, so
their seconds are comparable. Reported: final validation loss, training seconds, and the bases
refreshed and skipped over the run (from ``opt.refresh_stats()``, kept in the run's summary).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
from pathlib import Path

import torch

from soaplab.experiments import tuning
from soaplab.experiments.loop import TrainConfig, train
from soaplab.experiments.tasks import TaskOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--freqs", default="10", help="precondition_frequency values")
    ap.add_argument("--taus", default="0,0.05,0.1,0.2,inf", help="refresh_tolerance values")
    ap.add_argument("--budgets", default="none", help="refresh_budget values ('none': no budget)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    budgets = [None if b == "none" else float(b) for b in args.budgets.split(",")]
    print("| f | τ | budget | seed | final val loss | train s | refreshed | skipped |")
    print("|---|---|---|---|---|---|---|---|")
    for freq, tau, budget in itertools.product((int(f) for f in args.freqs.split(",")),
                                               (float(t) for t in args.taus.split(",")),
                                               budgets):
        kwargs = {**tuning.optimizer_kwargs("soap", freq), "refresh_tolerance": tau,
                  "refresh_budget": budget}
        setting = f"| {freq} | {tau:g} | {budget if budget is not None else '-'} |"
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = TrainConfig(optimizer="soap", lr=tuning.default_lr("lm", "soap"),
                              optimizer_kwargs=kwargs, steps=args.steps, seed=seed,
                              progress=False)
            with tempfile.TemporaryDirectory() as folder:
                summary = train(TaskOptions(), cfg, Path(folder)).summary
            stats = summary["refreshes"]
            rows.append((summary["evals"][-1]["val_loss"], summary["train_seconds"],
                         stats["refreshes"], stats["skipped"]))
            print(f"{setting} {seed} | {rows[-1][0]:.4f} | {rows[-1][1]:.1f} | {rows[-1][2]} | "
                  f"{rows[-1][3]} |", flush=True)
        if len(rows) > 1:
            means = [statistics.mean(r[i] for r in rows) for i in range(4)]
            print(f"{setting} mean | {means[0]:.4f} | {means[1]:.1f} | {means[2]:.0f} | "
                  f"{means[3]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
