"""Steps-to-target on synthetic curves, and the compare command end to end."""

import json

import pytest

from soaplab.cli import main
from soaplab.experiments.compare import steps_to_target
from soaplab.experiments.report import _target_text
from soaplab.experiments.tuning import default_lr, optimizer_kwargs, uses_frequency


def test_steps_to_target_on_synthetic_curves():
    records = [{"step": s, "train_time": 0.5 * s, "train_loss": 1.0}
               | ({"val_loss": 2.0 / s} if s % 10 == 0 else {}) for s in range(1, 101)]
    assert steps_to_target(records, 0.1) == (20, 10.0)
    assert steps_to_target(records, 0.025) == (80, 40.0)
    assert steps_to_target(records, 0.02) == (100, 50.0)
    assert steps_to_target(records, 0.019) == (None, None)


@pytest.mark.parametrize("task", ["lm", "colorize"])
def test_compare_writes_report_and_plots(tmp_path, task):
    extra = ["--max-chars", "40000"] if task == "lm" else []
    code = main(["compare", task, "--size", "micro", "--steps", "6", "--eval-every", "3",
                 "--batch-size", "4", "--optimizers", "adamw,soap", "--freqs", "2,4",
                 "--threads", "1", "--out", str(tmp_path), "--no-progress", *extra])
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    assert "steps_to_target" in report and report.count("| soap |") == 2
    pngs = ["val_loss_vs_steps.png", "val_loss_vs_time.png", "train_loss_vs_steps.png",
            "drift.png"]
    for png in pngs + (["colorization.png"] if task == "colorize" else []):
        assert (tmp_path / png).stat().st_size > 5000
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["config"]["freqs"] == [2, 4]
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    adamw, soap = default_lr(task, "adamw"), default_lr(task, "soap")
    assert runs == [f"adamw-lr{adamw:g}-s0", f"soap-f2-lr{soap:g}-s0", f"soap-f4-lr{soap:g}-s0"]


def test_compare_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "lm", "--optimizers", "adamw,sgdx"])
    err = capsys.readouterr().err
    assert "unknown optimizer(s) sgdx" in " ".join(err.split())
    assert main(["compare", "lm", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["compare", "lm", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    for lrs in ("inf", "0", "-1e-3", "nan"):
        assert main(["compare", "lm", "--lrs", f"1e-3,{lrs}"]) == 2
        assert "--lrs must be positive and finite" in capsys.readouterr().err
    assert main(["compare", "lm", "--freqs", "0"]) == 2
    assert "--freqs must be >= 1" in capsys.readouterr().err


def test_target_line_tells_a_diverged_adamw_from_a_missing_one():
    assert _target_text([{"optimizer": "soap"}], None) == " (none: no AdamW run)"
    assert _target_text([{"optimizer": "adamw"}], None) == " (none: AdamW diverged at every lr)"
    assert _target_text([{"optimizer": "adamw"}], 2.5) == " = **2.5000**"


def test_variants_use_their_familys_tuned_lr_and_settings():
    assert default_lr("colorize", "soap_one_sided_factorized") == default_lr("colorize", "soap")
    assert optimizer_kwargs("shampoo-half", 5) == {"betas": (0.95, 0.95), "weight_decay": 0.0,
                                                   "precondition_frequency": 5}
    assert uses_frequency("soap_eigh") and not uses_frequency("adafactor")
