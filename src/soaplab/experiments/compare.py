"""Compare optimizers on one task: optimizers × frequencies × lrs (× β1s, β2s, momenta, weight
decays) × seeds
(× batch sizes × training lengths) -> one run folder.

The headline measure is the SOAP paper's: how many steps (and seconds of training) each
optimizer needs to reach the final validation loss of AdamW run for the full budget. The
target is AdamW's (best lr's) final loss in the same cell: same seed, batch size and length.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from soaplab import torchrun
from soaplab.experiments import paired, sweeps, tuning
from soaplab.experiments.inputs import legacy_defaults, resolved_optimizer, run_inputs
from soaplab.experiments.loop import RunResult, TrainConfig, run_settings
from soaplab.experiments.parallel import TrainCall, train_side_by_side
from soaplab.experiments.report import write_report
from soaplab.experiments.run_folder import RunFolder
from soaplab.experiments.tasks import Task, TaskOptions, build_task, spec
from soaplab.reporting.manifest import manifest, prepare, read_manifest
from soaplab.reporting.runs import atomic_write, read_config, write_config

# TrainConfig fields that each run sets for itself (the rest are shared by the comparison).
PER_RUN = ("optimizer", "optimizer_kwargs", "lr", "seed")


@dataclass
class CompareConfig:
    task: TaskOptions = field(default_factory=TaskOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    optimizers: list[str] = field(default_factory=lambda: ["adamw", "muon", "soap"])
    freqs: list[int] | None = None
    lrs: list[float] | None = None
    lrs_of: dict[str, list[float]] = field(default_factory=dict)  # per optimizer, over lrs
    # per optimizer and knob (tuning.KNOBS, by name), over the knob's sweep
    settings_of: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    beta1s: list[float] | None = None  # the sweeps of tuning.KNOBS, each where it applies
    beta2s: list[float] | None = None
    momenta: list[float] | None = None
    weight_decays: list[float] | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_sizes: list[int] | None = None  # a batch-size sweep (steps held fixed)
    lengths: list[int] | None = None  # a training-length sweep: step budgets
    out: Path = Path("runs/compare")
    resume: bool = False
    overwrite: bool = False
    reuse: list[Path] = field(default_factory=list)  # folders whose finished runs may be copied
    against: str | None = None  # a paired-seed section against this optimizer (report only)
    ns_dtype: str | None = None  # Muon-type optimizers' Newton–Schulz dtype (None: bfloat16)
    jobs: int = 1  # runs trained side by side, in worker processes (experiments.parallel),
    # each with this process's torch threads

    def settings(self) -> dict[str, Any]:
        """What defines the comparison's results: its manifest's settings."""
        train = run_settings(self.task, self.train, {})["train"]
        return {"task": asdict(self.task),
                "train": {k: v for k, v in train.items() if k not in PER_RUN},
                "optimizers": self.optimizers, "freqs": self.freqs, "lrs": self.lrs,
                "seeds": self.seeds, "batch_sizes": self.batch_sizes, "lengths": self.lengths,
                **({"ns_dtype": self.ns_dtype} if self.ns_dtype else {}),
                **({"lrs_of": self.lrs_of} if self.lrs_of else {}),
                **({"settings_of": self.settings_of} if self.settings_of else {}),
                # only when swept, so that folders made before these sweeps still resume
                **{k.flag: getattr(self, k.flag) for k in tuning.KNOBS if getattr(self, k.flag)}}


@dataclass
class Run:
    optimizer: str
    freq: int | None
    lr: float
    seed: int
    batch_size: int | None = None  # None: the task's
    steps: int | None = None  # None: the training config's
    beta2: float | None = None  # None: the optimizer's tuned setting (tuning.COMMON)
    momentum: float | None = None
    beta1: float | None = None
    weight_decay: float | None = None

    @property
    def knobs(self) -> dict[str, float | None]:
        return {k.name: getattr(self, k.name) for k in tuning.KNOBS}

    @property
    def label(self) -> str:
        freq = f"-f{self.freq}" if self.freq is not None else ""
        knobs = "".join(f"{k.tag}{_exact(getattr(self, k.name))}" for k in tuning.KNOBS
                        if getattr(self, k.name) is not None)
        batch = f"-b{self.batch_size}" if self.batch_size is not None else ""
        steps = f"-n{self.steps}" if self.steps is not None else ""
        return (f"{self.optimizer}{freq}-lr{_exact(self.lr)}{knobs}{batch}{steps}"
                f"-s{self.seed}")

    @property
    def cell(self) -> tuple[int | None, int | None, int]:
        """The runs that share one AdamW target: same batch size, length and seed."""
        return self.batch_size, self.steps, self.seed

    @property
    def curve(self) -> str:
        """Legend label: the runs that one line stands for."""
        return sweeps.curve_name({"optimizer": self.optimizer, "freq": self.freq, **self.knobs}
                                 ) + "".join(f" {k}={v}" for k, v in (
                                     ("b", self.batch_size), ("n", self.steps)) if v is not None)


def _exact(value: float) -> str:
    """``value`` short where that is exact (0.001), else in full (0.0010000001)."""
    return f"{value:g}" if float(f"{value:g}") == value else repr(value)


def plan_runs(cfg: CompareConfig) -> list[Run]:
    runs = []
    for name in cfg.optimizers:
        freqs = cfg.freqs if cfg.freqs and tuning.uses_frequency(name) else [None]
        lrs = cfg.lrs_of.get(name) or cfg.lrs or [tuning.default_lr(cfg.task.task, name)]
        own = cfg.settings_of.get(name, {})
        values = [own.get(k.name) or (getattr(cfg, k.flag) if getattr(cfg, k.flag)
                                      and k.applies(name) else [None]) for k in tuning.KNOBS]
        runs += [Run(name, f, lr, s, b, n, **dict(zip((k.name for k in tuning.KNOBS), knobs,
                                                      strict=True)))
                 for f in freqs for lr in lrs for knobs in itertools.product(*values)
                 for b in cfg.batch_sizes or [None] for n in cfg.lengths or [None]
                 for s in cfg.seeds]
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
           "lr": run.lr, **run.knobs, "seed": run.seed,
           "batch_size": run.batch_size, "steps": run.steps,
           "final_train_loss": s["final_train_loss"],
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

    Nothing is written before the data loads, every run's optimizer is constructed, the
    ``--reuse`` folders and ``cfg.out`` pass their checks (see ``reporting.manifest.prepare``).
    """
    if cfg.jobs > 1 and torchrun.world_size() > 1:
        raise ValueError("--jobs trains runs side by side in one machine's processes; under "
                         "torchrun the processes already share each run, so drop --jobs")
    spec(cfg.task.task).load(cfg.task)
    runs = plan_runs(cfg)
    probe = build_task(replace(cfg.task, batch_size=1), torch.device("cpu"))
    inputs = {run.label: run_inputs(_task(cfg, run), resolved_optimizer(
        run.optimizer, probe.model, run.lr, _train(cfg, run).optimizer_kwargs)) for run in runs}
    settings = {**cfg.settings(), "inputs": {
        k: v for k, v in inputs[runs[0].label].items() if k != "optimizer"}
        | {"optimizers": {label: i["optimizer"] for label, i in inputs.items()}}}
    record = manifest("compare", cfg.task.task, settings)
    for folder in cfg.reuse:
        _check_reuse_source(folder, cfg.task.task)
    torchrun.from_main(lambda: prepare(cfg.out, record, resume=cfg.resume,
                                       overwrite=cfg.overwrite,
                                       defaults=legacy_defaults(cfg.out, cfg.task.task)))
    if torchrun.is_main() and not (cfg.out / "config.json").exists():  # kept on --resume
        write_config(cfg.out, {**cfg.settings(), "device": cfg.train.device,
                               "checkpoint_every": cfg.train.checkpoint_every,
                               **({"jobs": cfg.jobs} if cfg.jobs > 1 else {}),
                               "out": str(cfg.out)})
    began = torchrun.from_main(lambda: read_config(cfg.out))  # where the comparison began
    environment = {**began["environment"], "jobs": began["config"].get("jobs", 1)}
    defaults = legacy_defaults(cfg.out, cfg.task.task)
    results: dict[str, RunResult] = {}
    calls = []
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.label}", flush=True)
        reused = torchrun.from_main(lambda run=run: _reuse(cfg, run, inputs[run.label]))
        call = TrainCall(_task(cfg, run), _train(cfg, run), cfg.out / "runs" / run.label,
                         cfg.resume or reused, inputs[run.label], defaults)
        if cfg.jobs == 1:
            results[run.label] = call()
        else:
            calls.append(call)
    for call, result in train_side_by_side(calls, cfg.jobs):
        results[call.run_dir.name] = result
        print(f"  finished {call.run_dir.name}", flush=True)
    if not torchrun.is_main():
        return cfg.out / "report.md"
    targets = _adamw_targets(runs, results)
    rows = [summarize(run, results[run.label], targets.get(run.cell)) for run in runs]
    per_example = _tokens_per_param_per_example(probe)
    for row, run in zip(rows, runs, strict=True):
        row["tokens_per_param"] = _train(cfg, run).steps * _task(cfg, run).batch_size * per_example
    sections, figures = sweeps.sections(rows, cfg.out, len(cfg.seeds) > 1,
                                        bool(cfg.batch_sizes), bool(cfg.lengths))
    if cfg.against is not None:
        sections += paired.section(rows, sweeps.summary(rows), cfg.against)
    return write_report(cfg.out, cfg.task, rows, results, targets, environment, sections,
                        figures, steps=cfg.train.steps, warmup=cfg.train.warmup)


def _check_reuse_source(folder: Path, task: str) -> None:
    """A ``--reuse`` folder must be a comparison of ``task``: refused in one line otherwise."""
    if not folder.is_dir():
        raise ValueError(f"--reuse {folder}: no such folder")
    if not (folder / "manifest.json").is_file():
        raise ValueError(f"--reuse {folder}: it has no manifest.json, so no soaplab compare "
                         "run made it")
    old = read_manifest(folder / "manifest.json")
    if (old["command"], old["task"]) != ("compare", task):
        raise ValueError(f"--reuse {folder}: it holds a soaplab {old['command']} "
                         f"{old['task']} run, not compare {task}")


def _reuse(cfg: CompareConfig, run: Run, inputs: dict[str, Any]) -> bool:
    """Copy ``run``'s finished folder from a ``--reuse`` folder into ``cfg.out``, if one holds
    it under exactly this run's settings and inputs (the checks of ``--resume``); True if so."""
    target = cfg.out / "runs" / run.label
    if (target / "summary.json").is_file():
        return False
    settings = run_settings(_task(cfg, run), _train(cfg, run), inputs)
    for folder in cfg.reuse:
        source = RunFolder(folder / "runs" / run.label, settings,
                           legacy_defaults(folder, cfg.task.task))
        try:
            if source.summary.is_file() and source.read() is not None:
                target.mkdir(parents=True, exist_ok=True)
                for name in ("config.json", "summary.json"):
                    if (source.path / name).is_file():
                        atomic_write(target / name, (source.path / name).read_bytes())
                print(f"  reused from {source.path}", flush=True)
                return True
        except ValueError as err:
            print(f"  not reused: {err}", flush=True)
    return False


def _task(cfg: CompareConfig, run: Run) -> TaskOptions:
    return cfg.task if run.batch_size is None else replace(cfg.task, batch_size=run.batch_size)


def _train(cfg: CompareConfig, run: Run) -> TrainConfig:
    length = {} if run.steps is None else {"steps": run.steps,
                                           "warmup": min(cfg.train.warmup, run.steps)}
    return replace(cfg.train, optimizer=run.optimizer, lr=run.lr, seed=run.seed,
                   optimizer_kwargs=tuning.optimizer_kwargs(run.optimizer, run.freq, cfg.ns_dtype,
                                                            **run.knobs), **length)


def _tokens_per_param_per_example(probe: Task) -> float:
    """Tokens of one example (characters of a sequence for lm, pixels of a patch for
    colorize) of a task built with batch size 1, over the model's parameter count."""
    tokens = probe.sample(torch.Generator().manual_seed(0))[0].numel()
    return tokens / sum(p.numel() for p in probe.model.parameters())


def _adamw_targets(runs: list[Run], results: dict[str, RunResult]
                   ) -> dict[tuple[int | None, int | None, int], float]:
    """Per cell (batch size, length, seed): AdamW's best final validation loss over its lrs
    (the paper's target)."""
    targets: dict[tuple[int | None, int | None, int], float] = {}
    for run in runs:
        s = results[run.label].summary
        if run.optimizer == "adamw" and not s["diverged"] and s["evals"]:
            final = s["evals"][-1]["val_loss"]
            targets[run.cell] = min(final, targets.get(run.cell, final))
    return targets
