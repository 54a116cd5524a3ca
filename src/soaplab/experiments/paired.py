"""Paired seeds: is an optimizer better than a reference, judged seed by seed?

Runs that share a seed share their initial weights and batch order, so the noise of a seed
cancels in the difference between two optimizers' runs of it. Per seed, against the
reference run of that seed:

- the paired difference of the final validation loss (negative: better than the reference);
- the steps each needs to reach the *reference's* final loss of that seed, the first
  evaluation at or below it (the reference itself may get there before its last step, where
  its loss rose again at the end). A run that never gets there has no number: "never".

Over seeds: the mean of each paired difference and its standard error (sample standard
deviation / √n), and a verdict. A **win** needs at least ``MIN_SEEDS`` seeds, the mean
beyond ``SIGMAS`` standard errors below zero, and at least ``AGREEMENT`` of the seeds below
zero; a **loss** is the same above zero. A seed that never reaches (or a run that diverged)
counts as worse: it makes the mean undefined, so it rules out a win, and a loss is then
decided by the sign rule alone.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from soaplab.experiments.sweeps import curve_name
from soaplab.reporting.tables import markdown_table

MIN_SEEDS = 5
SIGMAS = 2.0
AGREEMENT = 0.8

Curve = Sequence[tuple[int, float]]  # (step, validation loss) at each evaluation


@dataclass(frozen=True)
class Seed:
    """One seed's pairing; ``final`` is None for a run that diverged (or never evaluated)."""

    seed: int
    final: float | None
    reference_final: float
    steps: int | None  # first step at or below the reference's final loss; None: never
    reference_steps: int | None

    @property
    def loss_difference(self) -> float | None:
        return None if self.final is None else self.final - self.reference_final

    @property
    def steps_difference(self) -> int | None:
        if self.steps is None or self.reference_steps is None:
            return None
        return self.steps - self.reference_steps

    @property
    def steps_ratio(self) -> float | None:
        if self.steps is None or not self.reference_steps:
            return None
        return self.steps / self.reference_steps


@dataclass(frozen=True)
class Stat:
    """Mean and standard error of paired differences (None where undefined) and the verdict."""

    n: int
    mean: float | None
    se: float | None
    verdict: str


def first_reach(curve: Curve, target: float) -> int | None:
    """The first evaluated step whose loss is at or below ``target``; None if none is."""
    return next((step for step, loss in curve if loss <= target), None)


def pair(curves: Mapping[int, Curve | None], reference: Mapping[int, Curve | None]
         ) -> list[Seed]:
    """Pair two optimizers' runs by seed (``None`` or an empty curve: the run diverged).
    Seeds without a finished reference run are left out: there is nothing to pair with."""
    seeds = []
    for seed in sorted(set(curves) & set(reference)):
        ref, run = reference[seed], curves[seed]
        if not ref:
            continue
        target = ref[-1][1]
        seeds.append(Seed(seed, run[-1][1] if run else None, target,
                          first_reach(run, target) if run else None,
                          first_reach(ref, target)))
    return seeds


def mean_se(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (None for a single value's error)."""
    if not values:
        return None, None
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else None
    return statistics.fmean(values), se


def verdict(differences: Sequence[float | None], min_seeds: int = MIN_SEEDS,
            sigmas: float = SIGMAS, agreement: float = AGREEMENT) -> Stat:
    """The protocol's verdict on paired differences (negative: better); None: never reached
    or diverged, worse than any number."""
    n = len(differences)
    known = [d for d in differences if d is not None]
    mean, se = mean_se(known) if len(known) == n else (None, None)
    if n < min_seeds:
        return Stat(n, mean, se, f"too few seeds ({n} < {min_seeds})")
    better = sum(d is not None and d < 0 for d in differences)
    worse = sum(d is None or d > 0 for d in differences)
    beyond = mean is not None and se is not None and abs(mean) > sigmas * se
    if beyond and mean < 0 and better >= agreement * n:
        return Stat(n, mean, se, "win")
    if worse >= agreement * n and (mean is None or (beyond and mean > 0)):
        return Stat(n, mean, se, "loss")
    return Stat(n, mean, se, "no significant difference")


def _text(mean: float | None, se: float | None, digits: int, sign: str = "+") -> str:
    if mean is None:
        return "undefined (a seed never reached or diverged)"
    return f"{mean:{sign}.{digits}f}" + (f" ± {se:.{digits}f}" if se is not None else "")


# -- the compare report's section -----------------------------------------------------------
Row = dict[str, Any]  # a report row, as compare.summarize makes it


def _curve(row: Row) -> Curve | None:
    if row["diverged"] or not row["evals"]:
        return None
    return [(e["step"], e["val_loss"]) for e in row["evals"]]


def _reference(best_lrs: Sequence[Row], against: str) -> dict[tuple, str]:
    """Per cell (batch size, length), the curve of ``against`` with the lowest mean final loss
    (several where β2, momentum or frequencies were swept)."""
    chosen: dict[tuple, Row] = {}
    for b in best_lrs:
        cell, score = (b["batch_size"], b["steps"]), b["final_val_loss_mean"]
        if b["curve"].split()[0] == against and score is not None and (
                cell not in chosen or score < chosen[cell]["final_val_loss_mean"]):
            chosen[cell] = b
    return {cell: b["curve"] for cell, b in chosen.items()}


def section(rows: Sequence[Row], best_lrs: Sequence[Row], against: str) -> list[str]:
    """Markdown lines comparing every curve with ``against``, paired by seed, at each one's
    best lr (``best_lrs``: the rows of ``sweeps.summary``) in each cell of batch size ×
    training length; where ``against`` ran with several settings, with its best one."""
    chosen = {(b["curve"], b["batch_size"], b["steps"]): b["lr"] for b in best_lrs}
    runs: dict[tuple, dict[int, Curve | None]] = defaultdict(dict)
    for r in rows:
        name = curve_name(r)
        if chosen.get((name, r["batch_size"], r["steps"])) == r["lr"]:
            runs[(name, r["batch_size"], r["steps"])][r["seed"]] = _curve(r)
    lines = [f"## Paired seeds against {against}", "",
             f"Each optimizer at its best lr against {against} at its best, paired by seed "
             "(same initial weights and batches). Final: the difference of final validation "
             f"losses (negative: better than {against}). Steps: the steps to reach "
             f"{against}'s final loss of that seed, minus the steps {against} needs itself "
             "(`never`: not reached). Mean ± standard error over seeds; a **win** needs "
             f"≥ {MIN_SEEDS} seeds, the mean beyond {SIGMAS:g} standard errors and the same "
             f"sign on ≥ {AGREEMENT:.0%} of the seeds.", ""]
    summary, per_seed = [], []
    reference = _reference(best_lrs, against)
    if not reference:
        return lines + [f"No finished {against} run to pair with.", ""]
    if any(name != against for name in reference.values()):
        lines += [f"Reference: {', '.join(sorted(set(reference.values())))}, {against}'s best "
                  "setting.", ""]
    for (name, b, n), seeds in runs.items():
        if (b, n) not in reference or name == reference[b, n]:
            continue
        paired = pair(seeds, runs[(reference[b, n], b, n)])
        cell = {"curve": name, "batch_size": b, "steps": n}
        final = verdict([s.loss_difference for s in paired])
        steps = verdict([s.steps_difference for s in paired])
        ratios = [s.steps_ratio for s in paired]
        ratio = mean_se(ratios) if None not in ratios else (None, None)
        summary.append({**cell, "seeds": final.n,
                        "final_difference": _text(final.mean, final.se, 4),
                        "final_verdict": final.verdict,
                        "steps_difference": _text(steps.mean, steps.se, 1),
                        "steps_verdict": steps.verdict,
                        "steps_ratio": _text(*ratio, 3, sign="")})
        per_seed += [{**cell, "seed": s.seed, "final": s.final,
                      "final_difference": s.loss_difference,
                      "reach_step": "never" if s.steps is None else s.steps,
                      f"{against}_reach_step": s.reference_steps,
                      "steps_ratio": s.steps_ratio} for s in paired]
    axes = [a for a in ("batch_size", "steps") if any(r[a] is not None for r in summary)]
    lines += [markdown_table(summary, ["curve", *axes, "seeds", "final_difference",
                                       "final_verdict", "steps_difference", "steps_verdict",
                                       "steps_ratio"]),
              "Per seed:", "",
              markdown_table(per_seed, ["curve", *axes, "seed", "final", "final_difference",
                                        "reach_step", f"{against}_reach_step",
                                        "steps_ratio"])]
    return lines
