"""Pick SOAP's ``refresh_tolerance`` on the lm task: loss, time and refreshes for each τ.

Run (CPU; one line per τ and seed, then the mean over seeds)::

    python benchmarks/refresh_tolerance.py --taus 0,0.05,0.1,0.2,inf --freq 10 --steps 200

Every run trains the default lm task (tiny GPT, tuned SOAP lr and settings of ``soaplab compare
lm``) with ``SOAP(..., refresh_tolerance=τ)``. τ = 0 is the fixed schedule (``soap``), τ = inf
keeps the first bases. Reported: final validation loss, training seconds, and the bases
refreshed and skipped over the run (from ``opt.refresh_stats()``, kept in the run's summary).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from soaplab.experiments import tuning
from soaplab.experiments.loop import TrainConfig, train
from soaplab.experiments.tasks import TaskOptions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--taus", default="0,0.05,0.1,0.2,inf")
    ap.add_argument("--freq", type=int, default=10, help="precondition_frequency")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_flush_denormal(True)
    torch.set_num_threads(args.threads)
    kwargs = tuning.optimizer_kwargs("soap", args.freq)
    print("| τ | seed | final val loss | train s | refreshed | skipped |")
    print("|---|---|---|---|---|---|")
    for tau in (float(t) for t in args.taus.split(",")):
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            cfg = TrainConfig(optimizer="soap", lr=tuning.default_lr("lm", "soap"),
                              optimizer_kwargs={**kwargs, "refresh_tolerance": tau},
                              steps=args.steps, seed=seed, progress=False)
            with tempfile.TemporaryDirectory() as folder:
                result = train(TaskOptions(), cfg, Path(folder))
            summary = result.summary
            stats = summary["refreshes"]
            rows.append((summary["evals"][-1]["val_loss"], summary["train_seconds"],
                         stats["refreshes"], stats["skipped"]))
            print(f"| {tau:g} | {seed} | {rows[-1][0]:.4f} | {rows[-1][1]:.1f} | "
                  f"{rows[-1][2]} | {rows[-1][3]} |", flush=True)
        if len(rows) > 1:
            means = [statistics.mean(r[i] for r in rows) for i in range(4)]
            print(f"| {tau:g} | mean | {means[0]:.4f} | {means[1]:.1f} | {means[2]:.0f} | "
                  f"{means[3]:.0f} |", flush=True)


if __name__ == "__main__":
    main()
