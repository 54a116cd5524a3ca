"""Compare optimizers on one task: optimizers × frequencies × lrs × seeds -> one run folder.

The headline measure is the SOAP paper's: how many steps (and seconds of training) each
optimizer needs to reach the final validation loss of AdamW run for the full budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from soaplab import torchrun
from soaplab.experiments import tuning
from soaplab.experiments.loop import RunResult, TrainConfig, run_settings, train
from soaplab.experiments.report import write_report
from soaplab.experiments.tasks import TaskOptions, spec
from soaplab.reporting.manifest import manifest, prepare
from soaplab.reporting.runs import read_config, write_config

# TrainConfig fields that each run sets for itself (the rest are shared by the comparison).
PER_RUN = ("optimizer", "optimizer_kwargs", "lr", "seed")


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
    overwrite: bool = False

    def settings(self) -> dict[str, Any]:
        """What defines the comparison's results: its manifest's settings."""
        train = run_settings(self.task, self.train)["train"]
        return {"task": asdict(self.task),
                "train": {k: v for k, v in train.items() if k not in PER_RUN},
                "optimizers": self.optimizers, "freqs": self.freqs, "lrs": self.lrs,
                "seeds": self.seeds}


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
    """The report's row for one run (its ``evals`` and ``curve`` feed the plots)."""
    s = result.summary
    evals, total = s["evals"], s["train_seconds"]
    row = {"run": run.label, "curve": run.curve, "optimizer": run.optimizer, "freq": run.freq,
           "lr": run.lr, "seed": run.seed, "final_train_loss": s["final_train_loss"],
           "final_val_loss": evals[-1]["val_loss"] if evals else None,
           "best_val_loss": min((r["val_loss"] for r in evals), default=None),
           "train_seconds": total,
           "optimizer_share": s["optimizer_seconds"] / total if total else None,
           "state_mb": s["state_bytes"] / 2**20, "diverged": s["diverged"], "evals": evals}
    if target is not None:
        row["steps_to_target"], row["seconds_to_target"] = steps_to_target(evals, target)
    return row


def compare(cfg: CompareConfig) -> Path:
    """Run every planned run, then write ``report.md`` and the plots into ``cfg.out`` (rank 0
    only, under torchrun: every rank trains, and returns the report's path).

    Nothing is written before the data loads and ``cfg.out`` passes its checks (see
    ``reporting.manifest.prepare``)."""
    spec(cfg.task.task).load(cfg.task)
    record = manifest("compare", cfg.task.task, cfg.settings())
    torchrun.from_main(lambda: prepare(cfg.out, record, resume=cfg.resume,
                                       overwrite=cfg.overwrite))
    if torchrun.is_main() and not (cfg.out / "config.json").exists():  # kept on --resume
        write_config(cfg.out, {**cfg.settings(), "device": cfg.train.device,
                               "checkpoint_every": cfg.train.checkpoint_every,
                               "out": str(cfg.out)})
    runs = plan_runs(cfg)
    results: dict[str, RunResult] = {}
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.label}", flush=True)
        train_cfg = replace(cfg.train, optimizer=run.optimizer, lr=run.lr, seed=run.seed,
                            optimizer_kwargs=tuning.optimizer_kwargs(run.optimizer, run.freq))
        results[run.label] = train(cfg.task, train_cfg, cfg.out / "runs" / run.label,
                                   resume=cfg.resume)
    if not torchrun.is_main():
        return cfg.out / "report.md"
    target = _adamw_target(runs, results)
    rows = [summarize(run, results[run.label], target) for run in runs]
    environment = read_config(cfg.out)["environment"]  # where the comparison began
    return write_report(cfg.out, cfg.task.task, rows, results, target, environment)


def _adamw_target(runs: list[Run], results: dict[str, RunResult]) -> float | None:
    """AdamW's best final validation loss over its lrs and seeds (the paper's target)."""
    finals = [s["evals"][-1]["val_loss"] for run in runs if run.optimizer == "adamw"
              for s in [results[run.label].summary] if not s["diverged"] and s["evals"]]
    return min(finals) if finals else None

