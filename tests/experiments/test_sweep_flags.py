"""--beta1s, --beta2s, --momenta and --weight-decays: which optimizers each sweeps, the settings
they reach, run names that name every setting that varies."""

import torch

from soaplab.cli import main
from soaplab.experiments.compare import CompareConfig, _train, plan_runs, summarize
from soaplab.experiments.sweeps import curve_name


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
    assert curve_name({"optimizer": "muon", "freq": None, "momentum": 0.9}) == "muon m=0.9"
    assert curve_name({"optimizer": "soap", "freq": 10, "beta2": 0.99}) == "soap f=10 beta2=0.99"


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


def test_beta1s_and_weight_decays_reach_every_optimizer_they_apply_to():
    cfg = CompareConfig(optimizers=["soap", "muon", "adafactor"], lrs=[1e-3],
                        beta1s=[0.9], weight_decays=[0.0, 0.1])
    runs = plan_runs(cfg)
    assert [r.label for r in runs] == [
        "soap-lr0.001-beta10.9-wd0-s0", "soap-lr0.001-beta10.9-wd0.1-s0",
        "muon-lr0.001-beta10.9-wd0-s0", "muon-lr0.001-beta10.9-wd0.1-s0",
        "adafactor-lr0.001-wd0-s0", "adafactor-lr0.001-wd0.1-s0"]  # adafactor has no betas
    kwargs = _train(cfg, runs[1]).optimizer_kwargs
    assert (kwargs["betas"], kwargs["weight_decay"]) == ((0.9, 0.95), 0.1)
    assert _train(cfg, runs[3]).optimizer_kwargs["betas"] == (0.9, 0.95)  # muon's AdamW half
    assert runs[1].curve == "soap beta1=0.9 wd=0.1"
    assert CompareConfig(weight_decays=[0.1]).settings()["weight_decays"] == [0.1]


def test_a_swept_weight_decay_spares_the_vectors():
    """wd 0.1 through a comparison builds the optimizer as a user would: vectors undecayed."""
    import soaplab
    from soaplab.experiments.tasks import TaskOptions, build_task

    model = build_task(TaskOptions(size="micro", batch_size=1), torch.device("cpu")).model
    cfg = CompareConfig(optimizers=["soap"], lrs=[1e-3], weight_decays=[0.1])
    kwargs = _train(cfg, plan_runs(cfg)[0]).optimizer_kwargs
    opt = soaplab.optimizer("soap", model, **{**kwargs, "lr": 1e-3})
    decays = {p.dim(): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decays[1] == 0.0 and decays[2] == 0.1


def test_bad_knob_values_are_refused(capsys):
    assert main(["compare", "lm", "--weight-decays", "-0.1"]) == 2
    assert "--weight-decays must be >= 0 and finite, got [-0.1]" in capsys.readouterr().err
    assert main(["compare", "lm", "--beta1s", ""]) == 2
    assert "--beta1s is empty" in capsys.readouterr().err
