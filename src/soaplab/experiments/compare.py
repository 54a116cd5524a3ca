"""Compare optimizers on one task: optimizers × frequencies × lrs × seeds -> one run folder.

The headline measure is the SOAP paper's: how many steps (and seconds of training) each
optimizer needs to reach the final validation loss of AdamW run for the full budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from soaplab.experiments import ddp, tuning
from soaplab.experiments.loop import RunResult, TrainConfig, train
from soaplab.experiments.report import write_report
from soaplab.experiments.tasks import TaskOptions
from soaplab.reporting.runs import write_config


@dataclass
class CompareConfig:
    task: TaskOptions = field(default_factory=TaskOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "adafactor", "shampoo",
                                                           "soap"])
    freqs: list[int] | None = None
    lrs: list[float] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    out: Path = Path("runs/compare")
    resume: bool = False


@dataclass
class Run:
    optimizer: str
    freq: int | None
    lr: float
    seed: int

    @property
    def label(self) -> str:
        freq = f"-f{self.freq}" if self.freq is not None else ""
        return f"{self.optimizer}{freq}-lr{self.lr:g}-s{self.seed}"

    @property
    def curve(self) -> str:
        """Legend label: the runs that one line stands for."""
        return self.optimizer + (f" f={self.freq}" if self.freq is not None else "")


def plan_runs(cfg: CompareConfig) -> list[Run]:
    runs = []
    for name in cfg.optimizers:
        freqs = cfg.freqs if cfg.freqs and tuning.uses_frequency(name) else [None]
        lrs = cfg.lrs or [tuning.default_lr(cfg.task.task, name)]
        runs += [Run(name, f, lr, s) for f in freqs for lr in lrs for s in cfg.seeds]
    return runs


def steps_to_target(records: Sequence[dict[str, Any]], target: float
                    ) -> tuple[int | None, float | None]:
    """First evaluated step (and its training seconds) whose validation loss is <= target."""
    for r in records:
        if "val_loss" in r and r["val_loss"] <= target:
            return r["step"], r["train_time"]
    return None, None


def summarize(run: Run, result: RunResult, target: float | None) -> dict[str, Any]:
    recs = result.records
    evals = [r for r in recs if "val_loss" in r]
    total = sum(r["step_time"] for r in recs)
    opt_time = sum(r["optimizer_time"] for r in recs)
    tail = recs[-max(1, len(recs) // 10):]  # the last 10% of steps smooth out batch noise
    row = {"run": run.label, "optimizer": run.optimizer, "freq": run.freq, "lr": run.lr,
           "seed": run.seed, "final_train_loss": sum(r["train_loss"] for r in tail) / len(tail),
           "final_val_loss": evals[-1]["val_loss"] if evals else None,
           "best_val_loss": min((r["val_loss"] for r in evals), default=None),
           "train_seconds": total, "optimizer_share": opt_time / total if total else None,
           "state_mb": result.state_bytes / 2**20, "diverged": result.diverged}
    if target is not None:
        row["steps_to_target"], row["seconds_to_target"] = steps_to_target(recs, target)
    return row


def compare(cfg: CompareConfig) -> Path:
    """Run every planned run, then write ``report.md`` and the plots into ``cfg.out`` (rank 0
    only, under torchrun: every rank trains, and returns the report's path)."""
    if ddp.is_main():
        cfg.out.mkdir(parents=True, exist_ok=True)
        write_config(cfg.out, cfg)
    runs = plan_runs(cfg)
    results: dict[str, RunResult] = {}
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.label}", flush=True)
        train_cfg = replace(cfg.train, optimizer=run.optimizer, lr=run.lr, seed=run.seed,
                            optimizer_kwargs=tuning.optimizer_kwargs(run.optimizer, run.freq))
        results[run.label] = train(cfg.task, train_cfg, cfg.out / "runs" / run.label,
                                   resume=cfg.resume)
    if not ddp.is_main():
        return cfg.out / "report.md"
    target = _adamw_target(runs, results)
    rows = [summarize(run, results[run.label], target) for run in runs]
    return write_report(cfg.out, cfg.task.task, runs, results, rows, target)


def _adamw_target(runs: list[Run], results: dict[str, RunResult]) -> float | None:
    """AdamW's best final validation loss over its lrs and seeds (the paper's target)."""
    finals = [r.records[-1]["val_loss"] for run in runs if run.optimizer == "adamw"
              for r in [results[run.label]] if not r.diverged and "val_loss" in r.records[-1]]
    return min(finals) if finals else None

