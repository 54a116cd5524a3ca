"""``soaplab compare --jobs``: runs trained side by side are bitwise the runs trained one after
another, the report keeps what needs a trained model, and a worker's error is one line."""

import json

from soaplab.cli import main
from soaplab.experiments.tuning import default_lr

MICRO = ["--size", "micro", "--steps", "12", "--eval-every", "4", "--batch-size", "4",
         "--threads", "1", "--no-progress"]


def _summaries(folder):
    return {run.name: json.loads((run / "summary.json").read_text())
            for run in (folder / "runs").iterdir()}


def _results(summary):
    return summary["final_train_loss"], [e["val_loss"] for e in summary["evals"]]


def test_jobs_train_the_same_runs_bitwise(tmp_path):
    lm = ["compare", "lm", "--optimizers", "adamw,muon,soap", "--max-chars", "40000", *MICRO]
    assert main([*lm, "--out", str(tmp_path / "one")]) == 0
    assert main([*lm, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    one, two = _summaries(tmp_path / "one"), _summaries(tmp_path / "two")
    assert sorted(one) == sorted(two) and len(one) == 3
    for name in one:
        assert _results(one[name]) == _results(two[name]), name
    report = (tmp_path / "two" / "report.md").read_text()
    assert "2 runs side by side (--jobs" in report
    assert "side by side" not in (tmp_path / "one" / "report.md").read_text()
    assert json.loads((tmp_path / "two" / "config.json").read_text())["config"]["jobs"] == 2


def test_jobs_bring_the_trained_models_back_for_the_colorization_strip(tmp_path):
    colorize = ["compare", "colorize", "--optimizers", "adamw,soap", *MICRO]
    assert main([*colorize, "--out", str(tmp_path / "one")]) == 0
    assert main([*colorize, "--jobs", "2", "--out", str(tmp_path / "two")]) == 0
    strips = [(tmp_path / name / "colorization.png").read_bytes() for name in ("one", "two")]
    assert len(strips[0]) > 5000 and strips[0] == strips[1]


def test_a_workers_error_is_one_line_and_the_others_are_kept(tmp_path, capsys):
    lm = ["compare", "lm", "--optimizers", "adamw,muon", "--max-chars", "40000", *MICRO,
          "--out", str(tmp_path)]
    assert main(lm) == 0
    broken = tmp_path / "runs" / f"muon-lr{default_lr('lm', 'muon'):g}-s0" / "summary.json"
    broken.write_text('{"steps": "twelve"}\n')
    capsys.readouterr()
    assert main([*lm, "--resume", "--jobs", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"soaplab: error: {broken}")
    kept = tmp_path / "runs" / f"adamw-lr{default_lr('lm', 'adamw'):g}-s0" / "summary.json"
    assert kept.is_file()
