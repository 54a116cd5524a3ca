"""THE training loop, shared by both tasks and every optimizer.

Fixed seeds make every optimizer see the same initial weights and the same batches. The loop
does linear warm-up then cosine decay, gradient clipping, evaluation at step 0 and every
``eval_every`` steps, checkpoints for ``--resume``, a progress bar and one JSON line of
metrics per step (the files themselves are ``run_folder``'s business). Under torchrun the
same loop runs data-parallel on the global batch (``soaplab.torchrun``).
"""

from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import soaplab
from soaplab import torchrun
from soaplab.experiments.inputs import describe, run_inputs
from soaplab.experiments.run_folder import RunFolder
from soaplab.experiments.tasks import Task, TaskOptions, build_task
from soaplab.optim.state import state_bytes


@dataclass
class TrainConfig:
    optimizer: str = "adamw"
    optimizer_kwargs: dict[str, Any] = field(default_factory=dict)
    steps: int = 400
    lr: float = 3e-3
    warmup: int = 20
    min_lr_ratio: float = 0.1
    clip: float = 1.0
    eval_every: int = 25
    seed: int = 0
    precision: str = "fp32"  # "bf16": autocast the model's forward and loss (see autocast)
    device: str = "cpu"
    checkpoint_every: int = 0
    stop_at: int | None = None  # end this session early (the schedule still spans `steps`)
    progress: bool = True
    bar_position: int = 0  # the progress bar's line (runs side by side: experiments.parallel)


@dataclass
class RunResult:
    summary: dict[str, Any]  # see summarize_records
    task: Task | None  # None for a finished run read back from its summary


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


PRECISIONS = ("fp32", "bf16")


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast for the forward pass and loss (training and evaluation), as real GPU
    training runs; parameters, gradients and the optimizer's state stay fp32."""
    if cfg.precision not in PRECISIONS:
        raise ValueError(f"unknown precision {cfg.precision!r}; choose {' or '.join(PRECISIONS)}")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


# Settings that do not change a run's results, left out of the settings its files record.
RUNTIME = ("device", "checkpoint_every", "stop_at", "progress", "bar_position")


def run_settings(task_opts: TaskOptions, cfg: TrainConfig, inputs: dict[str, Any]
                 ) -> dict[str, Any]:
    """What defines one run (as JSON reads it back): its checkpoints and summary carry it.
    ``inputs``: ``experiments.inputs.run_inputs``."""
    train = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME}
    return json.loads(json.dumps({"task": asdict(task_opts), "train": train, "inputs": inputs}))


def train(task_opts: TaskOptions, cfg: TrainConfig, run_dir: Path, resume: bool = False,
          inputs: dict[str, Any] | None = None, defaults: dict[str, Any] | None = None
          ) -> RunResult:
    """Train one model with one optimizer; metrics go to ``run_dir/metrics.jsonl`` and the
    finished run's summary to ``run_dir/summary.json`` (see ``run_folder``). ``inputs``: the
    run's inputs (``experiments.inputs``; None: found here); ``defaults``: what fields an
    older folder lacks count as.

    Under torchrun (see ``soaplab.torchrun``) every rank calls this with the same arguments:
    each trains on its slice of the global batch, and only rank 0 writes files.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
    torch.manual_seed(cfg.seed)
    task = build_task(task_opts, device)
    opt = soaplab.optimizer(cfg.optimizer, task.model, process_group=torchrun.group(),
                            lr=cfg.lr, **cfg.optimizer_kwargs)
    inputs = run_inputs(task_opts, describe(opt)) if inputs is None else inputs
    folder = RunFolder(run_dir, run_settings(task_opts, cfg, inputs), defaults)
    saved = torchrun.from_main(folder.read) if resume else None
    if saved is not None and saved.summary is not None:  # finished: e.g. runs made in parallel
        return RunResult(saved.summary, None)
    model = torchrun.wrap(task.model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    main = torchrun.is_main()
    if saved is not None:
        start, train_time = _restore(folder.checkpoint, saved.checkpoint, task, opt, sched, gen)
        records = saved.records
    else:  # the untrained model's loss: where every curve starts (it draws no random numbers)
        start, train_time = 0, 0.0
        records = [{"step": 0, "train_time": 0.0, "val_loss": _evaluate(task, cfg, device)}]
    if main:
        folder.start({"task": asdict(task_opts), "train": asdict(cfg), "inputs": inputs},
                     records, fresh=saved is None)
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    bar = tqdm(total=cfg.steps, initial=start, desc=run_dir.name, position=cfg.bar_position,
               disable=not (cfg.progress and main), leave=False)
    diverged = False
    for step in range(start, end):
        record = _train_step(task, model, opt, gen, cfg, device)
        sched.step()
        train_time += record["step_time"]
        record.update(step=step + 1, train_time=train_time, lr=opt.param_groups[0]["lr"])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            record["val_loss"] = _evaluate(task, cfg, device)
            bar.set_postfix_str(f"val={record['val_loss']:.3f} at step {step + 1}",
                                refresh=False)
            if hasattr(opt, "refresh_stats"):  # SOAP's basis drift and refresh counts
                record["refresh_stats"] = opt.refresh_stats()
        record["peak_memory_mb"] = peak_memory_mb(device)
        records.append(record)
        if main:
            folder.append(record)
        bar.set_description(f"{run_dir.name} loss={record['train_loss']:.3f}", refresh=False)
        bar.update(1)
        if not math.isfinite(record["train_loss"]):
            diverged = True
            break
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            state = _checkpoint(task, opt, sched, gen, step + 1, train_time)
            if main:
                folder.save_checkpoint(state, records)
    bar.close()
    # Under torchrun: the largest rank's state (a split optimizer holds a share on each rank),
    # and rank 0's records (timings differ between ranks; losses do not).
    size = torchrun.maximum(state_bytes(opt))
    records = torchrun.from_main(lambda: records)
    summary = summarize_records(records, size, diverged)
    if main and (diverged or summary["steps"] == cfg.steps):
        folder.finish(summary)
    return RunResult(summary, task)


def _evaluate(task: Task, cfg: TrainConfig, device: torch.device) -> float:
    task.model.eval()  # every rank, on its replica: they are identical
    with autocast(cfg, device):
        loss = task.evaluate(task.model)
    task.model.train()
    return loss


def eval_points(records: list[dict[str, Any]]) -> list[dict[str, float | None]]:
    """The evaluation steps (step, training seconds, validation loss), each with the mean
    training loss of the steps since the previous evaluation (one noisy batch says little;
    None at step 0, before any)."""
    points, window = [], []
    for r in records:
        if "train_loss" in r:
            window.append(r["train_loss"])
        if "val_loss" in r:
            point = {"step": r["step"], "train_time": r["train_time"], "val_loss": r["val_loss"],
                     "train_loss": sum(window) / len(window) if window else None}
            drift = _drift(r.get("refresh_stats"))
            if drift:
                point["drift"] = drift
            points.append(point)
            window = []
    return points


def _drift(stats: dict[str, Any] | None) -> dict[str, float]:
    """'parameter/axis' -> basis drift at the last check, from SOAP's ``refresh_stats()``."""
    if not stats:
        return {}
    return {f"{name}/{axis}": e["drift"] for name, axes in stats["parameters"].items()
            for axis, e in axes.items() if e["drift"] is not None}


def summarize_records(records: list[dict[str, Any]], state_size: int,
                      diverged: bool) -> dict[str, Any]:
    """A run's ``summary.json``: what its report row and curves are made of."""
    steps = [r for r in records if "train_loss" in r]  # not the evaluation at step 0
    total = sum(r["step_time"] for r in steps)
    tail = steps[-max(1, len(steps) // 10):]  # the last 10% of steps smooth out batch noise
    stats = next((r["refresh_stats"] for r in reversed(records) if "refresh_stats" in r), None)
    refreshes = {} if stats is None else {"refreshes": {k: stats[k] for k in ("refreshes",
                                                                               "skipped")}}
    return {**refreshes, "steps": records[-1]["step"] if records else 0, "diverged": diverged,
            "final_train_loss": sum(r["train_loss"] for r in tail) / len(tail) if steps
            else None,
            "train_seconds": total,
            "optimizer_seconds": sum(r["optimizer_time"] for r in steps),
            "peak_memory_mb": max((r["peak_memory_mb"] for r in steps), default=None),
            "state_bytes": state_size, "evals": eval_points(records)}


def _train_step(task: Task, model: torch.nn.Module, opt: torch.optim.Optimizer,
                gen: torch.Generator, cfg: TrainConfig, device: torch.device
                ) -> dict[str, float]:
    """One step on this rank's slice of the global batch; the loss logged is the global one."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    with autocast(cfg, device):
        loss = task.loss(model, torchrun.shard(task.sample(gen)))
    global_loss = torchrun.mean(loss.detach())  # so that every rank takes the same branch below
    if not torch.isfinite(global_loss):
        return {"train_loss": float("nan"), "step_time": 0.0, "optimizer_time": 0.0}
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.clip > 0:
        torch.nn.utils.clip_grad_norm_(task.model.parameters(), cfg.clip)
    sync()
    t1 = time.perf_counter()
    opt.step()
    sync()
    t2 = time.perf_counter()
    return {"train_loss": global_loss.item(), "step_time": t2 - t0, "optimizer_time": t2 - t1}


def _checkpoint(task: Task, opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator,
                step: int, train_time: float) -> dict[str, Any]:
    """What resuming needs: tensors and plain data only (it loads with weights_only=True).
    Every rank calls this (the optimizer state is consolidated by a collective); the state is
    the one a single process would hold, so it resumes on any world size."""
    return {"model": task.model.state_dict(), "optimizer": torchrun.optimizer_state(opt),
            "scheduler": sched.state_dict(), "generator": gen.get_state(), "step": step,
            "train_time": train_time, "torch_rng": torch.get_rng_state()}


def _restore(path: Path, state: dict[str, Any], task: Task, opt: torch.optim.Optimizer,
             sched: Any, gen: torch.Generator) -> tuple[int, float]:
    """Load a checkpoint into this rank's objects. Every rank loads the same state, so a
    checkpoint that does not fit fails on every rank alike."""
    try:
        task.model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        return state["step"], state["train_time"]
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise ValueError(f"cannot resume from {path}: {reason}") from None
