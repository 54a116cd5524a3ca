"""Train a comparison's runs side by side in worker processes (``soaplab compare --jobs N``).

The runs of a comparison are independent: each seeds its own weights, batches and dropout, so
a run trained in a worker is bitwise the run trained in the main process with the same number
of threads. On a small CPU several one-thread runs finish sooner than the same runs one after
another with all the threads (torch's threads scale poorly on a tiny model). Workers are
spawned, not forked (a fork after torch has started its thread pool can hang); they ignore
Ctrl-C, which the main process turns into stopping them all. A trained model comes back only
where the report shows its predictions (``Task.examples``: colorization).
"""

from __future__ import annotations

import multiprocessing
import signal
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from soaplab.experiments.loop import RunResult, TrainConfig, train
from soaplab.experiments.tasks import Task, TaskOptions, build_task


@dataclass(frozen=True)
class TrainCall:
    """One run's arguments to ``loop.train``."""

    task: TaskOptions
    train: TrainConfig
    run_dir: Path
    resume: bool
    inputs: dict[str, Any]
    defaults: dict[str, Any]

    def __call__(self) -> RunResult:
        return train(self.task, self.train, self.run_dir, resume=self.resume,
                     inputs=self.inputs, defaults=self.defaults)


def train_side_by_side(calls: list[TrainCall], jobs: int
                       ) -> Iterator[tuple[TrainCall, RunResult]]:
    """Train ``calls`` in ``jobs`` worker processes with this process's torch threads each (so
    a run is bitwise the one this process would train), yielding each call and its result as
    it finishes. A worker's error is raised here, and stops the other workers, as does an
    interrupt of this process."""
    if not calls:
        return
    jobs, threads = min(jobs, len(calls)), torch.get_num_threads()
    context = multiprocessing.get_context("spawn")
    slots, lock = context.Queue(), context.RLock()
    for slot in range(jobs):
        slots.put(slot)
    tqdm.set_lock(lock)  # one lock for every process's bars
    pool = context.Pool(jobs, initializer=_start_worker, initargs=(threads, slots, lock))
    try:
        for i, summary, state in pool.imap_unordered(_train_in_worker, enumerate(calls)):
            call = calls[i]
            yield call, RunResult(summary, None if state is None else _rebuilt(call, state))
        pool.close()
    finally:
        pool.terminate()
        pool.join()


_bar_position = 0  # this worker's line for its progress bar


def _start_worker(threads: int, slots: Any, lock: Any) -> None:
    global _bar_position
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process stops the workers
    torch.set_flush_denormal(True)  # as soaplab's command does (soaplab.cli)
    torch.set_num_threads(threads)
    tqdm.set_lock(lock)
    _bar_position = slots.get()


def _train_in_worker(item: tuple[int, TrainCall]
                     ) -> tuple[int, dict[str, Any], dict[str, torch.Tensor] | None]:
    i, call = item
    result = replace(call, train=replace(call.train, bar_position=_bar_position))()
    task = result.task
    keep = task is not None and task.examples is not None
    state = {k: v.cpu() for k, v in task.model.state_dict().items()} if keep else None
    return i, result.summary, state


def _rebuilt(call: TrainCall, state: dict[str, torch.Tensor]) -> Task:
    """The run's task, its model holding the weights the worker trained."""
    task = build_task(call.task, torch.device(call.train.device))
    task.model.load_state_dict(state)
    return task
