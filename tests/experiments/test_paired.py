"""Paired-seed statistics on synthetic curves whose verdict is known, and `--against` end to
end."""

import math
import statistics

import pytest

from soaplab.cli import main
from soaplab.experiments.paired import first_reach, mean_se, pair, section, verdict
from soaplab.experiments.sweeps import summary


def _curve(final: float, steps: int = 100, every: int = 10) -> list[tuple[int, float]]:
    """A loss falling as 1/step onto ``final`` at the last step."""
    return [(s, final * steps / s) for s in range(every, steps + 1, every)]


def test_mean_and_standard_error_by_hand():
    mean, se = mean_se([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3)
    assert se == pytest.approx(math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2
                                          + (4 - 7 / 3) ** 2) / 2 / 3))
    assert mean_se([3.0]) == (3.0, None)


@pytest.mark.parametrize(("differences", "expected"), [
    ([-0.1, -0.2, -0.3, -0.4, -0.5], "win"),  # mean -0.3, se 0.071
    ([0.1, 0.2, 0.3, 0.4, 0.5], "loss"),
    ([-1, -1, -1, -1, 0.01], "win"),  # 4 of 5 = 80 % agree: enough
    ([-1, -1, -1, 0.01, 0.01], "no significant difference"),  # beyond 2 se, 60 % agree
    ([-0.01, -0.01, -0.01, -0.01, -10], "no significant difference"),  # all agree, mean
    # -2.008 within 2 se = 3.996
    ([0.1, -0.1, 0.1, -0.1, 0.1, -0.1], "no significant difference"),  # a tie
    ([-0.3, -0.3, -0.3, -0.3], "too few seeds (4 < 5)"),
    ([None, None, None, None, -1], "loss"),  # never reached on 4 of 5 seeds
    ([None, -1, -1, -1, -1], "no significant difference"),  # one seed never: no mean, no win
])
def test_verdicts_on_known_cases(differences, expected):
    stat = verdict(differences)
    assert stat.verdict == expected
    assert stat.n == len(differences)
    if None in differences:
        assert stat.mean is None and stat.se is None
    else:
        assert stat.mean == pytest.approx(statistics.fmean(differences))


def test_the_two_standard_error_boundary():
    # mean -0.3, standard error 0.1 exactly (sd 0.1 * sqrt(5)): -0.3 is beyond 2 se, and
    # beyond 2.9 se, not beyond 3.1 se
    sd = 0.1 * math.sqrt(5)
    spread = [-2, -1, 0, 1, 2]
    scale = sd / statistics.stdev(spread)
    differences = [-0.3 + scale * x for x in spread]
    assert all(d < 0 for d in differences)
    assert verdict(differences).se == pytest.approx(0.1)
    assert verdict(differences, sigmas=2.9).verdict == "win"
    assert verdict(differences, sigmas=3.1).verdict == "no significant difference"


def test_first_reach_and_pairing():
    assert first_reach([(10, 3.0), (20, 2.0), (30, 2.5)], 2.0) == 20
    assert first_reach([(10, 3.0)], 2.0) is None
    # The reference ends at 1.0; it was lower (0.9) at step 20, so reaches its own final at 20.
    reference = {0: [(10, 2.0), (20, 0.9), (30, 1.0)], 1: _curve(1.0), 2: None}
    runs = {0: [(10, 1.5), (20, 1.2), (30, 1.1)],  # never reaches 1.0
            1: _curve(0.5),  # 0.5 * 100 / s <= 1.0 from s = 50
            2: _curve(0.5),  # its reference diverged: nothing to pair with
            3: _curve(0.5)}  # no reference run of that seed
    paired = pair(runs, reference)
    assert [p.seed for p in paired] == [0, 1]
    never, fast = paired
    assert never.steps is None and never.reference_steps == 20
    assert never.loss_difference == pytest.approx(0.1)
    assert never.steps_difference is None and never.steps_ratio is None
    assert (fast.steps, fast.reference_steps, fast.steps_ratio) == (50, 100, 0.5)
    assert fast.loss_difference == pytest.approx(-0.5)
    diverged = pair({1: None}, reference)[0]
    assert diverged.final is None and diverged.loss_difference is None


def _row(optimizer: str, lr: float, seed: int, final: float, momentum=None) -> dict:
    evals = [{"step": s, "val_loss": v, "train_time": float(s), "train_loss": v}
             for s, v in _curve(final)]
    return {"run": f"{optimizer}-lr{lr:g}-s{seed}", "curve": optimizer, "optimizer": optimizer,
            "freq": None, "lr": lr, "momentum": momentum, "seed": seed, "batch_size": None,
            "steps": None,
            "final_val_loss": final, "best_val_loss": final, "diverged": False, "evals": evals,
            "tokens_per_param": 1.0}


def test_section_pairs_each_optimizer_at_its_best_lr():
    rows = []
    for seed in range(5):
        rows += [_row("muon", 0.01, seed, 1.0 + 0.01 * seed),
                 _row("muon", 0.02, seed, 1.2),  # muon's worse lr: not the reference
                 _row("soap", 0.01, seed, 0.9 + 0.011 * seed),  # better on every seed
                 _row("adamw", 0.01, seed, 1.5 + 0.02 * (-1) ** seed)]  # worse everywhere
    text = "\n".join(section(rows, summary(rows), "muon"))
    soap = next(line for line in text.splitlines() if line.startswith("| soap | 5 |"))
    assert "| win |" in soap
    adamw = next(line for line in text.splitlines() if line.startswith("| adamw | 5 |"))
    # a loss on final loss, and on steps: adamw never reaches muon's final loss
    assert adamw.count("| loss |") == 2 and "undefined" in adamw and "| never |" in text
    assert text.count("| soap | 4 |") == 1  # the per-seed rows: seed 4 once


def test_the_reference_is_the_best_of_its_swept_settings():
    rows = []
    for seed in range(5):
        rows += [_row("muon", 0.01, seed, 1.1 + 0.01 * seed, momentum=0.9),
                 _row("muon", 0.01, seed, 1.0 + 0.01 * seed, momentum=0.95),
                 _row("soap", 0.01, seed, 1.0 + 0.01 * seed + 0.002 * (-1) ** seed)]
    lines = section(rows, summary(rows), "muon")
    assert "Reference: muon m=0.95, muon's best setting." in lines
    text = "\n".join(lines)
    assert "| muon m=0.9 | 5 | +0.1000 ± 0.0000 | loss |" in text
    assert "| soap | 5 |" in text and "| muon m=0.95 | 5 |" not in text
    soap = next(line for line in text.splitlines() if line.startswith("| soap | 5 |"))
    assert "no significant difference" in soap


def test_against_in_compare(tmp_path, capsys):
    assert main(["compare", "lm", "--optimizers", "adamw,soap", "--against", "muon"]) == 2
    assert "--against muon is not among --optimizers (adamw,soap)" in capsys.readouterr().err
    assert main(["compare", "lm", "--size", "micro", "--steps", "4", "--eval-every", "2",
                 "--batch-size", "4", "--max-chars", "40000", "--optimizers", "adamw,muon",
                 "--seeds", "0,1", "--against", "Muon", "--threads", "1",
                 "--out", str(tmp_path), "--no-progress"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Paired seeds against muon" in report
    assert "too few seeds (2 < 5)" in report
