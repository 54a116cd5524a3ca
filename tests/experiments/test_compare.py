"""Steps-to-target on synthetic curves, and the compare command end to end."""

import json

import pytest

from soaplab.cli import main
from soaplab.experiments.commands import _config
from soaplab.experiments.compare import plan_runs, steps_to_target
from soaplab.experiments.report import _target_text
from soaplab.experiments.sweeps import crossovers, summary
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
                 "--batch-size", "4", "--optimizers", "adamw,muon,soap", "--freqs", "2,4",
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
    adamw, muon, soap = (default_lr(task, name) for name in ("adamw", "muon", "soap"))
    assert runs == [f"adamw-lr{adamw:g}-s0", f"muon-lr{muon:g}-s0", f"soap-f2-lr{soap:g}-s0",
                    f"soap-f4-lr{soap:g}-s0"]


def test_colorize_report_has_the_mean_colour_baseline_row(tmp_path):
    from soaplab.experiments.tasks import TaskOptions, _mean_colour

    assert main(["compare", "colorize", "--size", "micro", "--steps", "30", "--optimizers",
                 "adamw,soap", "--threads", "1", "--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "report.md").read_text()
    base = _mean_colour(TaskOptions(task="colorize"))
    row = next(line for line in report.splitlines() if line.startswith("| mean colour"))
    assert f"| {base.train_loss:.4g} | {base.val_loss:.4g} |" in row
    finals = {json.loads((run / "summary.json").read_text())["evals"][-1]["val_loss"]
              for run in (tmp_path / "runs").iterdir()}
    assert len(finals) == 2
    beat = [line for line in report.splitlines() if line.startswith("Baseline: predicting")]
    assert len(beat) == 1
    assert "adamw lr" in beat[0] and "soap lr" in beat[0]
    assert beat[0].count(" of 1)") == 2 and beat[0].count("(1 of 1)") == sum(
        f < base.val_loss for f in finals)


def test_compare_rejects_bad_input(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "lm", "--optimizers", "adamw,sgdx"])
    err = capsys.readouterr().err
    assert "unknown optimizer(s) sgdx" in " ".join(err.split())
    assert main(["compare", "lm", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(["compare", "lm", "--threads", "0"]) == 2
    assert "--threads must be >= 1" in capsys.readouterr().err
    assert main(["compare", "lm", "--jobs", "0"]) == 2
    assert "--jobs must be >= 1" in capsys.readouterr().err
    for lrs in ("inf", "0", "-1e-3", "nan"):
        assert main(["compare", "lm", "--lrs", f"1e-3,{lrs}"]) == 2
        assert "--lrs must be positive and finite" in capsys.readouterr().err
    assert main(["compare", "lm", "--freqs", "0"]) == 2
    assert "--freqs must be >= 1" in capsys.readouterr().err


def test_target_line_tells_a_diverged_adamw_from_a_missing_one():
    assert _target_text([{"optimizer": "soap"}], {}) == " (none: no AdamW run)"
    assert _target_text([{"optimizer": "adamw"}], {}) == " (none: AdamW diverged at every lr)"
    assert _target_text([{"optimizer": "adamw"}], {(None, None, 0): 2.5}) == " = **2.5000**"


def test_variants_use_their_familys_tuned_lr_and_settings():
    assert default_lr("colorize", "soap_one_sided_factorized") == default_lr("colorize", "soap")
    assert optimizer_kwargs("shampoo-half", 5) == {"betas": (0.95, 0.95), "weight_decay": 0.0,
                                                   "precondition_frequency": 5}
    assert uses_frequency("soap_eigh") and not uses_frequency("adafactor")


def _runs(argv):
    import argparse

    from soaplab.experiments.commands import _check, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["compare", "lm", *argv])
    _check(args)
    return plan_runs(_config(args))


def _plan(argv):
    return [(r.optimizer, r.lr) for r in _runs(argv)]


def test_lr_sets_one_optimizers_lrs_beside_lrs_and_tuned_ones():
    assert _plan(["--optimizers", "adamw,muon,soap", "--lr", "muon=0.008", "--lr",
                  "SOAP=0.004,0.016"]) == [("adamw", default_lr("lm", "adamw")),
                                          ("muon", 0.008), ("soap", 0.004), ("soap", 0.016)]
    assert _plan(["--optimizers", "adamw,muon", "--lrs", "0.001,0.002", "--lr", "muon=0.008"]
                 ) == [("adamw", 0.001), ("adamw", 0.002), ("muon", 0.008)]


@pytest.mark.parametrize("argv, message", [
    (["--lr", "soap=0.01"], "--lr soap=...: soap is not among --optimizers (adamw,muon)"),
    (["--lr", "muon=0.01", "--lr", "muon=0.02"], "--lr muon=... is given twice"),
    (["--lr", "muon="], "--lr NAME= has no lr"),
    (["--lr", "muon=0"], "--lr muon must be positive and finite (an lr of 0 trains nothing), "
                         "got [0.0]"),
])
def test_a_bad_lr_is_one_line_naming_the_flag(capsys, argv, message):
    assert main(["compare", "lm", "--optimizers", "adamw,muon", *argv]) == 2
    assert message in capsys.readouterr().err


def test_set_gives_one_optimizer_its_own_value_of_a_swept_setting():
    args = ["--optimizers", "muon,soap_muon,adamw", "--momenta", "0.9", "--beta2s", "0.95",
            "--set", "soap_muon.momentum=0.95,0.9", "--set", "adamw.beta2=0.99"]
    runs = _runs(args)
    assert [(r.optimizer, r.momentum, r.beta2) for r in runs] == [
        ("muon", 0.9, None), ("soap_muon", 0.95, 0.95), ("soap_muon", 0.9, 0.95),
        ("adamw", None, 0.99)]
    assert runs[1].label.startswith("soap_muon-") and "-mom0.95-" in runs[1].label
    assert "-beta20.99-" in runs[3].label
    assert optimizer_kwargs("soap_muon", None, **runs[1].knobs)["momentum"] == 0.95


@pytest.mark.parametrize("argv, message", [
    (["--set", "soap.momentum=0.9"], "--set soap.momentum=...: soap is not among --optimizers"),
    (["--set", "adamw.momentum=0.9"], "--set adamw.momentum=...: adamw has no momentum (it "
                                      "applies to muon, normuon, soap_muon)"),
    (["--set", "muon.momentum=0.9", "--set", "muon.momentum=0.95"],
     "--set muon.momentum=... is given twice"),
    (["--set", "muon.momentum="], "--set muon.momentum= has no value"),
    (["--set", "muon.momentum=1.5"], "--set muon.momentum must be in [0, 1), got [1.5]"),
    (["--set", "adamw.weight_decay=-1"], "--set adamw.weight_decay must be >= 0 and finite"),
])
def test_a_bad_set_is_one_line_naming_the_flag(capsys, argv, message):
    assert main(["compare", "lm", "--optimizers", "adamw,muon", *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_set_without_a_known_setting_is_a_usage_error(capsys):
    for text, message in (("muon=0.9", "expected NAME.SETTING=VALUE[,VALUE...]"),
                          ("muon.lr=0.9", "unknown setting 'lr' in 'muon.lr=0.9'; choose one "
                                          "of beta1, beta2, momentum, weight_decay")):
        with pytest.raises(SystemExit):
            main(["compare", "lm", "--set", text])
        assert message in capsys.readouterr().err


def test_an_lr_without_its_optimizer_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        main(["compare", "lm", "--lr", "0.01"])
    assert "expected NAME=LR[,LR...], e.g. muon=0.008, got '0.01'" in capsys.readouterr().err


def test_ns_dtype_reaches_only_the_newton_schulz_optimizers():
    assert optimizer_kwargs("normuon", None, "float32")["ns_dtype"] == "float32"
    assert optimizer_kwargs("soap_muon", 10, "float32")["ns_dtype"] == "float32"
    assert "ns_dtype" not in optimizer_kwargs("soap", 10, "float32")
    assert "ns_dtype" not in optimizer_kwargs("muon", None)


def test_compare_sweeps_batch_sizes_and_summarizes_seeds(tmp_path):
    code = main(["compare", "lm", "--size", "micro", "--steps", "30", "--optimizers",
                 "adamw,muon,soap", "--batch-sizes", "8,16", "--seeds", "0,1", "--eval-every",
                 "5", "--max-chars", "40000", "--threads", "1", "--out", str(tmp_path),
                 "--no-progress"])
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Summary at each optimizer's best lr" in report and "## Batch size" in report
    assert "same number of **steps**" in report
    summary = report.split("## Summary")[1].split("## Batch size")[0]
    for curve in ("adamw", "muon", "soap"):
        for batch in (8, 16):  # one row per curve and batch size, over both seeds
            assert summary.count(f"| {curve} | {batch} |") == 1
    assert summary.count(" ± ") >= 6  # final loss mean ± spread of each of the 6 rows
    for png in ("steps_ratio_vs_batch_size.png", "time_ratio_vs_batch_size.png"):
        assert (tmp_path / png).stat().st_size > 5000
    assert len(list((tmp_path / "runs").iterdir())) == 12


def test_seed_summary_takes_mean_and_spread_at_the_best_lr():
    def row(opt, lr, seed, final, steps):
        return {"optimizer": opt, "freq": None, "lr": lr, "seed": seed, "batch_size": None,
                "steps": None, "tokens_per_param": 1.0, "final_val_loss": final,
                "best_val_loss": final - 0.05, "diverged": False, "steps_to_target": steps,
                "seconds_to_target": steps and steps / 10}
    rows = [row("adamw", 1e-3, 0, 2.0, 100), row("adamw", 1e-3, 1, 2.2, 100),
            row("soap", 1e-3, 0, 1.8, 50), row("soap", 1e-3, 1, 1.9, 70),
            row("soap", 1e-2, 0, 2.5, None), row("soap", 1e-2, 1, 2.6, None)]
    soap = next(r for r in summary(rows) if r["curve"] == "soap")
    assert soap["lr"] == 1e-3 and soap["seeds"] == 2
    assert soap["final_val_loss"] == "1.850 ± 0.071"
    assert soap["best_val_loss"] == "1.800 ± 0.071"
    assert soap["steps_ratio"] == "0.600 ± 0.141"
    assert crossovers({"a": ([1, 10, 100], [0.8, 0.9, 1.2])}) == [
        "- a: crosses 1 between 10 and 100 tokens/parameter"]
