"""--beta2s and --momenta: which optimizers each sweeps, the settings they reach, run names that
name every setting that varies."""

from soaplab.cli import main
from soaplab.experiments.compare import CompareConfig, _train, plan_runs, summarize
from soaplab.experiments.sweeps import _curve


def test_each_flag_sweeps_its_family_and_names_the_setting():
    cfg = CompareConfig(optimizers=["adamw", "muon", "kl_shampoo", "adafactor"],
                        lrs=[1e-3, 2e-3], beta2s=[0.95, 0.99], momenta=[0.9, 0.95],
                        seeds=[0, 1])
    runs = plan_runs(cfg)
    assert len(runs) == (2 + 2 + 2 + 1) * 2 * 2  # adafactor has neither setting
    assert len({r.label for r in runs}) == len(runs)
    adamw = [r for r in runs if r.optimizer == "adamw" and r.seed == 0 and r.lr == 1e-3]
    assert [r.label for r in adamw] == ["adamw-lr0.001-beta20.95-s0", "adamw-lr0.001-beta20.99-s0"]
    assert _train(cfg, adamw[1]).optimizer_kwargs["betas"] == (0.95, 0.99)
    muon = next(r for r in runs if r.optimizer == "muon" and r.momentum == 0.9)
    assert muon.label == f"muon-lr{muon.lr:g}-mom0.9-s{muon.seed}" and muon.beta2 is None
    assert _train(cfg, muon).optimizer_kwargs["momentum"] == 0.9
    kl = next(r for r in runs if r.optimizer == "kl_shampoo" and r.beta2 == 0.99)
    assert _train(cfg, kl).optimizer_kwargs["betas"] == (0.95, 0.99)
    assert [r.label for r in runs if r.optimizer == "adafactor"][0] == "adafactor-lr0.001-s0"
    # a report curve per setting, so the best lr is chosen for each
    assert _curve({"optimizer": "muon", "freq": None, "momentum": 0.9}) == "muon m=0.9"
    assert _curve({"optimizer": "soap", "freq": 10, "beta2": 0.99}) == "soap f=10 beta2=0.99"


def test_settings_name_the_sweeps_only_when_given():
    assert "beta2s" not in CompareConfig().settings()  # folders made before still resume
    assert CompareConfig(momenta=[0.9]).settings()["momenta"] == [0.9]


def test_bad_values_are_refused(capsys):
    assert main(["compare", "lm", "--beta2s", "0.9,1.0"]) == 2
    assert "--beta2s must be in [0, 1), got [0.9, 1.0]" in capsys.readouterr().err
    assert main(["compare", "lm", "--momenta", "-0.1"]) == 2
    assert "--momenta must be in [0, 1)" in capsys.readouterr().err


def test_summarize_keeps_the_settings():
    from soaplab.experiments.compare import Run
    from soaplab.experiments.loop import RunResult

    run = Run("muon", None, 1e-3, 0, momentum=0.9)
    summary = {"evals": [], "train_seconds": 1.0, "final_train_loss": 2.0,
               "optimizer_seconds": 0.5, "state_bytes": 0, "diverged": False}
    row = summarize(run, RunResult(summary, None), None)
    assert (row["momentum"], row["beta2"], row["curve"]) == (0.9, None, "muon m=0.9")
