"""Run folders as a user meets them: the ``soaplab`` command run as a subprocess on micro
models. Each failure is one line on stderr with its exit code, and leaves every file that was
there before untouched (bytes and modification times)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

SRC = str(Path(__file__).resolve().parents[2] / "src")
LM = ["compare", "lm", "--size", "micro", "--steps", "4", "--eval-every", "2", "--batch-size",
      "4", "--max-chars", "20000", "--threads", "1", "--optimizers", "adamw",
      "--checkpoint-every", "2"]
COLORIZE = ["compare", "colorize", "--size", "micro", "--steps", "2", "--eval-every", "2",
            "--batch-size", "4", "--threads", "1", "--optimizers", "adamw", "--no-progress"]
ANALYZE = ["analyze", "kronecker", "--steps", "30", "--probe", "24", "--hidden", "4",
           "--batch-sizes", "1,8", "--batch-repeats", "2", "--hessian-max-size", "0",
           "--threads", "1"]


def environment() -> dict[str, str]:
    path = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def soaplab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "soaplab", *args], capture_output=True,
                          text=True, env=environment(), timeout=300)


def files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (and its siblings' names): bytes and mtime."""
    found = {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
             for p in sorted(folder.rglob("*")) if p.is_file()}
    return found | {f"../{p.name}": (b"", 0) for p in folder.parent.iterdir()}


def refused(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit code 2 and one line on stderr holding ``message``."""
    assert result.returncode == 2, result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("soaplab: error: ") \
        and not result.stderr.startswith("soaplab: error: '"), result.stderr
    assert message in result.stderr, result.stderr


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A finished micro lm comparison, progress bars on, AdamW named twice."""
    out = tmp_path_factory.mktemp("lm") / "run"
    result = soaplab(*LM, "--optimizers", "adamw,adamw", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "nan" not in result.stderr  # the progress bar shows no val=nan between evaluations
    return out


@pytest.fixture(scope="module")
def analysis(tmp_path_factory) -> Path:
    """A finished kronecker analysis of 30 steps, with the default snapshots."""
    out = tmp_path_factory.mktemp("analysis") / "run"
    result = soaplab(*ANALYZE, "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def copy(tmp_path):
    def make(folder: Path) -> Path:
        target = tmp_path / "x" / folder.name
        shutil.copytree(folder, target)  # copy2: the modification times travel
        return target
    return make


def test_a_run_folder_holds_manifest_config_summary_and_report(lm):
    assert [p.name for p in (lm / "runs").iterdir()] == ["adamw-lr0.004-s0"]  # trained once
    manifest = json.loads((lm / "manifest.json").read_text())
    assert (manifest["command"], manifest["task"], manifest["torch"]) == \
        ("compare", "lm", torch.__version__)
    assert manifest["settings"]["optimizers"] == ["adamw"]
    assert manifest["settings"]["train"]["steps"] == 4
    config = json.loads((lm / "config.json").read_text())["config"]
    assert "optimizer" not in config["train"] and config["optimizers"] == ["adamw"]
    summary = json.loads((lm / "runs" / "adamw-lr0.004-s0" / "summary.json").read_text())
    assert [p["step"] for p in summary["evals"]] == [0, 2, 4] and summary["steps"] == 4
    report = (lm / "report.md").read_text()
    assert "1 thread," in report and f"| {summary['evals'][-1]['val_loss']:.4g} |" in report


def test_resume_refuses_another_tasks_folder(tmp_path):
    out = tmp_path / "colorize"
    assert soaplab(*COLORIZE, "--out", str(out)).returncode == 0
    before = files(out)
    refused(soaplab(*LM, "--resume", "--out", str(out)),
            "holds a different run (task: the folder has 'colorize', this command 'lm')")
    assert files(out) == before


def test_resume_refuses_an_analysis_folder(analysis, copy):
    out = copy(analysis)
    before = files(out)
    refused(soaplab(*LM, "--resume", "--out", str(out)),
            "(command: the folder has 'analyze', this command 'compare')")
    refused(soaplab(*ANALYZE, "--out", str(out)), "is not empty")
    assert files(out) == before


def test_resume_refuses_other_settings(lm, copy):
    out = copy(lm)
    before = files(out)
    refused(soaplab(*LM, "--steps", "6", "--resume", "--out", str(out)),
            "(settings.train.steps: the folder has 4, this command 6)")
    assert files(out) == before


def test_resume_refuses_a_folder_without_manifest(lm, copy):
    out = copy(lm)
    (out / "manifest.json").unlink()
    before = files(out)
    refused(soaplab(*LM, "--resume", "--out", str(out)), "has no manifest.json")
    assert files(out) == before


def test_non_empty_out_is_refused_without_resume_or_overwrite(lm, copy):
    out = copy(lm)
    before = files(out)
    refused(soaplab(*LM, "--out", str(out)), "is not empty; pass --resume")
    assert files(out) == before


def test_overwrite_moves_the_old_run_aside(lm, copy):
    out = copy(lm)
    before = files(out)
    result = soaplab(*LM, "--no-progress", "--overwrite", "--out", str(out))
    assert result.returncode == 0, result.stderr
    [aside] = out.parent.glob("run.old-*")
    assert f"moved the old contents of {out} to {aside}" in result.stdout
    assert {k: v for k, v in files(aside).items() if not k.startswith("../")} == \
        {k: v for k, v in before.items() if not k.startswith("../")}
    assert (out / "report.md").is_file()


def test_failed_validation_writes_nothing(lm, copy, tmp_path):
    out = copy(lm)
    before = files(out)
    (tmp_path / "empty").mkdir()
    refused(soaplab(*COLORIZE, "--images", str(tmp_path / "empty"), "--overwrite",
                    "--out", str(out)), "need at least 5 JPEG/PNG photos")
    refused(soaplab(*LM, "--lrs", "0", "--overwrite", "--out", str(out)),
            "--lrs must be positive and finite")
    assert files(out) == before


def test_out_that_is_a_file_or_unwritable(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    before = files(tmp_path)
    refused(soaplab(*LM, "--out", str(path)), f"--out {path} is a file, not a folder")
    assert files(tmp_path) == before
    if os.geteuid() == 0:  # root writes anywhere but where the kernel says no
        locked = Path("/sys/soaplab-test")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        locked = tmp_path / "locked" / "run"
    refused(soaplab(*LM, "--out", str(locked)), "permission denied")


def test_ctrl_c_then_torn_metrics_line_then_resume(tmp_path):
    out = tmp_path / "run"
    # Long enough that a poller starved by a loaded machine still interrupts it mid-run.
    flags = [*LM, "--steps", "1000", "--eval-every", "250", "--checkpoint-every", "5",
             "--no-progress", "--out", str(out)]
    # Ctrl-C as at a terminal: SIGINT at its default in the child, which Python turns into
    # KeyboardInterrupt. A test runner started as a background job of a non-interactive shell
    # ignores SIGINT, and its children would inherit that and never see this signal.
    proc = subprocess.Popen([sys.executable, "-m", "soaplab", *flags], env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    metrics = out / "runs" / "adamw-lr0.004-s0" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 12):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.count("\n") == 1 and "soaplab: interrupted; rerun the same command with " \
        "--resume" in stderr, stderr
    with metrics.open("a") as f:
        f.write('{"train_loss": 2.1, "st')  # what a kill mid-write leaves
    result = soaplab(*flags, "--resume")
    assert result.returncode == 0, result.stderr
    assert f"soaplab: warning: {metrics}: dropped its torn last line" in result.stderr
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(0, 1001))


class Planted:
    """A pickle that runs code when loaded: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def test_planted_pickle_in_a_checkpoint_is_refused(lm, copy, tmp_path):
    out = copy(lm)
    run = out / "runs" / "adamw-lr0.004-s0"
    (run / "summary.json").unlink()  # unfinished, so --resume loads its checkpoint
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "model": Planted(marker)}, run / "checkpoint.pt")
    torch.save({"step": 2, "model": Planted(tmp_path / "proof")}, tmp_path / "proof.pt")
    torch.load(tmp_path / "proof.pt", weights_only=False)
    assert (tmp_path / "proof").exists()  # the pickle does run code when trusted
    before = files(out)
    refused(soaplab(*LM, "--resume", "--out", str(out)),
            f"cannot resume from {run / 'checkpoint.pt'}: it holds objects other than tensors")
    assert not marker.exists()
    assert files(out) == before


def test_analyze_steps_follow_the_default_snapshots(analysis, tmp_path):
    records = [json.loads(line) for line in (analysis / "metrics.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in records if r["kind"] == "snapshot"}) == [0, 25, 30]
    assert [r["step"] for r in records if r["kind"] == "train"] == [0, 10, 20, 29]
    refused(soaplab("analyze", "kronecker", "--steps", "-3", "--out", str(tmp_path / "neg")),
            "--steps must be >= 1, got -3")


def test_version_and_python_m():
    result = soaplab("--version")
    assert result.returncode == 0 and result.stdout.strip() == \
        f"soaplab {__import__('soaplab').__version__} (torch {torch.__version__})"


def test_reuse_copies_finished_runs_only_under_identical_settings(lm, tmp_path):
    (label,) = {p.name for p in (lm / "runs").iterdir()}
    same = soaplab(*LM, "--reuse", str(lm), "--out", str(tmp_path / "same"), "--no-progress")
    assert same.returncode == 0, same.stderr
    assert f"reused from {lm / 'runs' / label}" in same.stdout
    copied = tmp_path / "same" / "runs" / label / "summary.json"
    assert copied.read_bytes() == (lm / "runs" / label / "summary.json").read_bytes()
    longer = soaplab(*LM, "--steps", "6", "--reuse", str(lm), "--out", str(tmp_path / "longer"),
                     "--no-progress")
    assert longer.returncode == 0, longer.stderr
    assert "not reused: cannot resume" in longer.stdout and "other settings" in longer.stdout
    trained = json.loads((tmp_path / "longer" / "runs" / label / "summary.json").read_text())
    assert trained["evals"][-1]["step"] == 6
