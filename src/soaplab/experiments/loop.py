"""THE training loop, shared by both tasks and every optimizer.

Fixed seeds make every optimizer see the same initial weights and the same batches. The loop
does linear warm-up then cosine decay, gradient clipping, evaluation every ``eval_every``
steps, checkpoints with ``--resume``, a progress bar and one JSON line of metrics per step.
Under torchrun the same loop runs data-parallel on the global batch (``ddp.py``).
"""

from __future__ import annotations

import math
import pickle
import resource
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

import soaplab
from soaplab.experiments import ddp
from soaplab.experiments.tasks import Task, TaskOptions, build_task
from soaplab.optim.state import state_bytes
from soaplab.reporting.runs import append_jsonl, read_jsonl, write_config


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
    device: str = "cpu"
    checkpoint_every: int = 0
    stop_at: int | None = None  # end this session early (the schedule still spans `steps`)
    progress: bool = True


@dataclass
class RunResult:
    records: list[dict[str, Any]]
    state_bytes: int
    diverged: bool
    task: Task | None  # None for a finished run read back from its metrics


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated CUDA memory, or the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def train(task_opts: TaskOptions, cfg: TrainConfig, run_dir: Path,
          resume: bool = False) -> RunResult:
    """Train one model with one optimizer; metrics go to ``run_dir/metrics.jsonl``.

    Under torchrun (see ``ddp``) every rank calls this with the same arguments: each trains on
    its slice of the global batch, and only rank 0 writes files.
    """
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for, but no CUDA device is available")
    torch.manual_seed(cfg.seed)
    task = build_task(task_opts, device)
    model = ddp.wrap(task.model)
    opt = soaplab.optimizer(cfg.optimizer, task.model, process_group=ddp.group(),
                            lr=cfg.lr, **cfg.optimizer_kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, cfg))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    metrics, ckpt = run_dir / "metrics.jsonl", run_dir / "checkpoint.pt"
    main = ddp.is_main()
    start, train_time, records = 0, 0.0, []
    saved = ddp.from_main(lambda: _read_run(metrics, ckpt, cfg.steps)) if resume else None
    if saved is not None and saved.checkpoint is None:  # finished: e.g. runs made in parallel
        return RunResult(saved.records, saved.records[-1]["state_bytes"], False, None)
    if saved is not None:
        start, train_time = _restore(ckpt, saved.checkpoint, task, opt, sched, gen)
        records = saved.records
        if main:
            _rewrite(metrics, records)
    elif main:
        metrics.unlink(missing_ok=True)
        write_config(run_dir, {"task": asdict(task_opts), "train": asdict(cfg)})
    end = cfg.steps if cfg.stop_at is None else min(cfg.steps, cfg.stop_at)
    bar = tqdm(total=cfg.steps, initial=start, desc=run_dir.name,
               disable=not (cfg.progress and main), leave=False)
    diverged = False
    for step in range(start, end):
        record = _train_step(task, model, opt, gen, cfg, device)
        sched.step()
        train_time += record["step_time"]
        record.update(step=step + 1, train_time=train_time, lr=opt.param_groups[0]["lr"])
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            task.model.eval()  # every rank, on its replica: they are identical
            record["val_loss"] = task.evaluate(task.model)
            task.model.train()
        record["peak_memory_mb"] = peak_memory_mb(device)
        records.append(record)
        if main:
            append_jsonl(metrics, record)
        bar.update(1)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                        val=f"{records[-1].get('val_loss', float('nan')):.3f}")
        if not math.isfinite(record["train_loss"]):
            diverged = True
            break
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _save_checkpoint(ckpt, task, opt, sched, gen, step + 1, train_time)
    bar.close()
    # Under torchrun: the largest rank's state (a split optimizer holds a share on each rank),
    # and rank 0's records (timings differ between ranks; losses do not).
    size = ddp.maximum(state_bytes(opt))
    records = ddp.from_main(lambda: records)
    if records:  # the state size goes with the metrics, so a finished run can be read back
        records[-1]["state_bytes"] = size
        if main:
            _rewrite(metrics, records)
    return RunResult(records, size, diverged, task)


@dataclass
class _Saved:
    """What rank 0 read of an earlier session of a run: its records up to the checkpoint, and
    the checkpoint (None when the run had finished)."""

    records: list[dict[str, Any]]
    checkpoint: dict[str, Any] | None


def _read_run(metrics: Path, ckpt: Path, steps: int) -> _Saved | None:
    """The finished run, or its checkpoint, or None to start afresh (rank 0 only)."""
    records = read_jsonl(metrics) if metrics.exists() else []
    if records and records[-1]["step"] >= steps and "state_bytes" in records[-1]:
        return _Saved(records, None)
    if not ckpt.exists():
        return None
    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        return _Saved([r for r in records if r["step"] <= state["step"]], state)
    except (RuntimeError, KeyError, TypeError, ValueError, EOFError,
            pickle.UnpicklingError) as err:
        raise RuntimeError(f"cannot resume from {ckpt}: {err}") from None


def _rewrite(metrics: Path, records: list[dict[str, Any]]) -> None:
    metrics.unlink(missing_ok=True)
    for r in records:
        append_jsonl(metrics, r)


def _train_step(task: Task, model: torch.nn.Module, opt: torch.optim.Optimizer,
                gen: torch.Generator, cfg: TrainConfig, device: torch.device
                ) -> dict[str, float]:
    """One step on this rank's slice of the global batch; the loss logged is the global one."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    loss = task.loss(model, ddp.shard(task.sample(gen)))
    global_loss = ddp.mean(loss.detach())  # so that every rank takes the same branch below
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


def _save_checkpoint(path: Path, task: Task, opt: torch.optim.Optimizer, sched: Any,
                     gen: torch.Generator, step: int, train_time: float) -> None:
    """Every rank calls this (the optimizer state is consolidated by a collective); rank 0
    writes. The state is the one a single process would hold, so it resumes on any world size."""
    optimizer = ddp.optimizer_state(opt)
    if not ddp.is_main():
        return
    tmp = path.with_suffix(".tmp")
    torch.save({"model": task.model.state_dict(), "optimizer": optimizer,
                "scheduler": sched.state_dict(), "generator": gen.get_state(), "step": step,
                "train_time": train_time, "torch_rng": torch.get_rng_state()}, tmp)
    tmp.replace(path)  # atomic: a crash mid-save never leaves a half-written checkpoint


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
        raise RuntimeError(f"cannot resume from {path}: {err}") from None
