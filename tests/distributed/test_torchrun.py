"""``soaplab compare`` under torchrun (2 gloo processes on CPU): the same experiment as one
process up to rounding, a rank killed mid-run resumed by ``--max-restarts`` without losing a
bit, checkpoints that move between world sizes, and a corrupt checkpoint that fails cleanly.

Why the tolerances: a single process that draws the same global batch and accumulates the
two ranks' slices' gradients reproduces the 2-process run bit for bit (checked below), so the
only difference from the plain single-process run is the rounding of one loss and gradient
summed as two halves. AdamW carries that rounding (~1e-7) along; SOAP amplifies it, because
its eigenbases turn inside nearly degenerate eigenspaces (docs/distributed.md), to about 2e-3
after 8 steps here. Each tolerance is 5-20 times the difference measured.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import soaplab.torchrun
from soaplab.cli import main
from soaplab.experiments import loop
from soaplab.reporting.runs import read_jsonl
from tests.distributed.harness import spawn

STEPS = 8
FLAGS = ["compare", "lm", "--size", "micro", "--steps", str(STEPS), "--eval-every", "1",
         "--batch-size", "8", "--max-chars", "40000", "--checkpoint-every", "2",
         "--threads", "1", "--no-progress"]
TOLERANCE = {"adamw": 1e-5, "soap": 1e-2}
FAULTY_CLI = str(Path(__file__).with_name("faulty_cli.py"))
TIMEOUT = 240  # a hang fails the test instead of blocking CI


class Killed(Exception):
    """The in-process stand-in for a process that dies mid-run."""


def torchrun(out: Path, *flags: str, script: tuple[str, ...] = ("-m", "soaplab.cli"),
             restarts: int = 0, **env: str) -> subprocess.CompletedProcess:
    """``soaplab compare`` on 2 processes; the whole process group is killed on a timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "--max-restarts", str(restarts), *script, *FLAGS, "--out", str(out), *flags]
    proc = subprocess.Popen(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", **env},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def in_process(out: Path, *flags: str) -> int:
    threads = torch.get_num_threads()
    try:
        return main([*FLAGS, "--out", str(out), *flags])
    finally:
        torch.set_num_threads(threads)


def losses(out: Path) -> dict[str, list[tuple[int, float, float]]]:
    """(step, train_loss, val_loss) of every training step of every run (after step 0's
    evaluation)."""
    return {run.name.split("-")[0]: [(r["step"], r["train_loss"], r["val_loss"])
                                     for r in read_jsonl(run / "metrics.jsonl") if r["step"]]
            for run in sorted((out / "runs").iterdir())}


def checkpoint(out: Path, optimizer: str) -> dict[str, Any]:
    [run] = (out / "runs").glob(f"{optimizer}-*")
    return torch.load(run / "checkpoint.pt", weights_only=True)


def assert_bitwise(a: Any, b: Any, where: str = "") -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_bitwise(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_bitwise(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_close(got: list, want: list, tolerance: float) -> None:
    assert [s for s, _, _ in got] == [s for s, _, _ in want] == list(range(1, STEPS + 1))
    for (step, *g), (_, *w) in zip(got, want, strict=True):
        assert g == pytest.approx(w, abs=tolerance), f"step {step}"


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted 2-process run of AdamW and SOAP."""
    out = tmp_path_factory.mktemp("two")
    result = torchrun(out, "--optimizers", "adamw,soap")
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same flags in one process."""
    out = tmp_path_factory.mktemp("one")
    assert in_process(out, "--optimizers", "adamw,soap") == 0
    return out


def _two_slices(task: Any, model: Any, opt: Any, gen: Any, cfg: Any, device: Any
                ) -> dict[str, float]:
    """A training step computed as 2 ranks do: each slice's loss and gradient, then the mean."""
    opt.zero_grad(set_to_none=True)
    sliced = [task.loss(model, part) for part in zip(*(t.chunk(2) for t in task.sample(gen)),
                                                     strict=True)]
    for part in sliced:
        (part / 2).backward()  # x/2 is exact: as DDP's sum of the two gradients, halved
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
    opt.step()
    loss = (sliced[0].detach() + sliced[1].detach()) / 2
    return {"train_loss": loss.item(), "step_time": 0.0, "optimizer_time": 0.0}


def test_two_processes_run_the_single_process_experiment(two: Path, one: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    got, want = losses(two), losses(one)
    assert got.keys() == want.keys() == {"adamw", "soap"}
    for name, tolerance in TOLERANCE.items():
        assert_close(got[name], want[name], tolerance)
    monkeypatch.setattr(loop, "_train_step", _two_slices)
    assert in_process(tmp_path, "--optimizers", "adamw,soap") == 0
    assert losses(tmp_path) == got  # bitwise: only the summation of the halves differs
    report = (two / "report.md").read_text()
    assert "2 processes (torchrun" in report and "| soap |" in report
    assert '"world_size": 2' in next((two / "runs").iterdir()).joinpath("config.json").read_text()


def test_killed_rank_restarts_and_loses_nothing(two: Path, tmp_path: Path):
    # Rank 1 dies before SOAP's step 6 (the 14th step of the command), so rank 0 has finished
    # the step-4 checkpoint: torchrun restarts both ranks, AdamW's finished run is read back
    # and SOAP resumes from step 4.
    result = torchrun(tmp_path, "--optimizers", "adamw,soap", script=(FAULTY_CLI,), restarts=1,
                      FAULT_RANK="1", FAULT_STEP=str(STEPS + 6))
    assert result.returncode == 0, result.stderr
    assert re.search(r"exitcode: -9", result.stderr)  # the kill did happen
    for rank in (0, 1):  # resumed, not trained again: SOAP's steps 5-8 only
        assert f"faulty_cli: attempt 1 rank {rank} trained 4 steps" in result.stderr
    assert losses(tmp_path) == losses(two)
    for name in ("adamw", "soap"):
        saved, whole = checkpoint(tmp_path, name), checkpoint(two, name)
        assert saved["step"] == STEPS
        for key in ("model", "optimizer", "scheduler", "generator", "torch_rng"):
            assert_bitwise(saved[key], whole[key], f"{name}/{key}")


def test_checkpoints_move_between_world_sizes(one: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch):
    # 1 process dies before step 4 (checkpoint at 2); 2 processes resume it and die before
    # step 6 (checkpoint at 4, complete: step 5 needed rank 0); 1 process resumes and finishes.
    step, calls = loop._train_step, iter(range(1, 100))

    def dies_at_step_4(*args: Any) -> dict[str, float]:
        if next(calls) == 4:
            raise Killed
        return step(*args)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "_train_step", dies_at_step_4)
        with pytest.raises(Killed):
            in_process(tmp_path, "--optimizers", "soap")
    assert checkpoint(tmp_path, "soap")["step"] == 2
    result = torchrun(tmp_path, "--optimizers", "soap", "--resume", script=(FAULTY_CLI,),
                      FAULT_RANK="1", FAULT_STEP="4")
    assert result.returncode != 0 and re.search(r"exitcode: -9", result.stderr)
    saved = checkpoint(tmp_path, "soap")
    assert saved["step"] == 4
    reference = checkpoint(one, "soap")["optimizer"]  # consolidated: every entry, every shape
    assert [(k, {n: getattr(v, "shape", None) for n, v in s.items()})
            for k, s in saved["optimizer"]["state"].items()] == \
        [(k, {n: getattr(v, "shape", None) for n, v in s.items()})
         for k, s in reference["state"].items()]
    assert in_process(tmp_path, "--optimizers", "soap", "--resume") == 0
    got, want = losses(tmp_path)["soap"], losses(one)["soap"]
    assert got[:2] == want[:2]  # the first process's steps, unchanged
    assert_close(got, want, TOLERANCE["soap"])


def test_corrupt_checkpoint_fails_on_every_rank(two: Path, tmp_path: Path):
    # Half a real checkpoint, as a copy cut short leaves it (tests/experiments check garbage),
    # in a copy of a finished folder whose SOAP run is marked unfinished again.
    out = tmp_path / "out"
    shutil.copytree(two, out)
    [run] = (out / "runs").glob("soap-*")
    (run / "summary.json").unlink()
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    result = torchrun(out, "--optimizers", "adamw,soap", "--resume")
    assert result.returncode != 0
    assert f"soaplab: error: cannot resume from {path}" in result.stderr
    assert re.search(r"exitcode\s*:\s*2\b", result.stderr)  # the command's own exit code


def _gradients_per_layout(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.Tanh(),
                                torch.nn.Linear(256, 32))
    x = torch.randn(4 * world_size, 32).chunk(world_size)[rank]
    grads = []
    for bucket_cap_mb in (25, 0.01):  # one bucket for all, or about one per parameter
        wrapped = torch.nn.parallel.DistributedDataParallel(copy.deepcopy(model),
                                                            bucket_cap_mb=bucket_cap_mb)
        wrapped.register_comm_hook(None, soaplab.torchrun._sum_in_rank_order)
        for _ in range(2):  # DDP lays its buckets out again after the first backward
            wrapped.zero_grad()
            wrapped(x).square().mean().backward()
        grads.append([p.grad for p in wrapped.parameters()])
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_gradients_do_not_depend_on_the_bucket_layout():
    # On 3 ranks torch's own all-reduce gives different bits for these two layouts, and DDP
    # changes the layout between the first and later steps of every (re)start.
    spawn(_gradients_per_layout, 3)


@pytest.fixture(autouse=True)
def _no_leftover_process_group() -> Iterator[None]:
    yield
    assert not torch.distributed.is_initialized()
