"""The comparison's ``report.md``: the summary table, loss curves and a colorization strip."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from soaplab.reporting import plots
from soaplab.reporting.runs import environment
from soaplab.reporting.tables import markdown_table

if TYPE_CHECKING:
    from soaplab.experiments.compare import Run
    from soaplab.experiments.loop import RunResult

COLUMNS = ["optimizer", "freq", "lr", "seed", "batch_size", "steps", "final_train_loss",
           "final_val_loss", "steps_to_target", "seconds_to_target", "train_seconds",
           "optimizer_share", "state_mb", "diverged"]


def _eval_points(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation records, each with ``train_loss`` replaced by the mean training loss of
    the steps since the previous evaluation (one noisy batch says little)."""
    points, window = [], []
    for r in records:
        window.append(r["train_loss"])
        if "val_loss" in r:
            points.append({**r, "train_loss": sum(window) / len(window)})
            window = []
    return points


def _curves(runs: list[Run], results: dict[str, RunResult], x: str, y: str = "val_loss"
            ) -> dict[str, tuple[list[float], list[float]]]:
    """Curves of ``y`` against ``x``, one line per optimizer (and frequency): its best lr by
    mean final validation loss, seeds averaged pointwise."""
    by_lr: dict[tuple[str, float], list[list[dict[str, Any]]]] = defaultdict(list)
    for run in runs:
        recs = _eval_points(results[run.label].records)
        if recs:
            by_lr[(run.curve, run.lr)].append(recs)
    chosen: dict[str, tuple[float, list[list[dict[str, Any]]]]] = {}
    for (curve, _), seeds in by_lr.items():
        score = sum(s[-1]["val_loss"] for s in seeds) / len(seeds)
        score = score if math.isfinite(score) else math.inf
        if curve not in chosen or score < chosen[curve][0]:
            chosen[curve] = (score, seeds)
    curves = {}
    for curve, (_, seeds) in chosen.items():
        n = min(len(s) for s in seeds)
        curves[curve] = ([sum(s[i][x] for s in seeds) / len(seeds) for i in range(n)],
                         [sum(s[i][y] for s in seeds) / len(seeds) for i in range(n)])
    return curves


def write_report(out: Path, task: str, runs: list[Run], results: dict[str, RunResult],
                 rows: list[dict[str, Any]], targets: dict[tuple, float],
                 sections: list[str] = (), extra_figures: list[Path] = ()) -> Path:
    """``targets``: AdamW's target per cell (batch size, length, seed); ``sections`` and
    ``extra_figures`` (the sweeps' summaries) go after the table of runs."""
    metric = "cross-entropy (nats/char)" if task == "lm" else "MSE of Lab chrominance"
    figures = [
        plots.line_plot(_curves(runs, results, "step"), out / "val_loss_vs_steps.png",
                        xlabel="step", ylabel=f"validation {metric}", logy=True,
                        title=f"{task}: validation loss against steps"),
        plots.line_plot(_curves(runs, results, "train_time"), out / "val_loss_vs_time.png",
                        xlabel="training seconds (evaluation excluded)",
                        ylabel=f"validation {metric}", logy=True,
                        title=f"{task}: validation loss against wall-clock"),
        plots.line_plot(_curves(runs, results, "step", "train_loss"),
                        out / "train_loss_vs_steps.png", xlabel="step",
                        ylabel=f"training {metric}, mean between evaluations", logy=True,
                        title=f"{task}: training loss against steps"),
    ]
    figures += extra_figures
    examples = _colorization_strip(out, runs, results, rows)
    if examples is not None:
        figures.append(examples)
    env = environment()
    lines = [f"# soaplab compare {task}", "",
             f"Machine: {env['machine']}, {env['threads']} threads, torch {env['torch']}"
             + (f", {env['cuda']}" if env["cuda"] else ", CPU")
             + (f", {env['world_size']} processes (torchrun, the batch split across them)"
                if env["world_size"] > 1 else "") + ".", "",
             f"Validation metric: {metric}. Target = AdamW's best final validation loss (over "
             "its lrs, for each seed, batch size and length)"
             + (f" = **{', '.join(f'{t:.4f}' for t in targets.values())}**" if targets
                else " (no AdamW run)")
             + "; steps/seconds to target are the first evaluation at or below it "
             "(training time only, evaluations excluded).", "",
             markdown_table(rows, [c for c in COLUMNS if any(r.get(c) is not None
                                                             for r in rows)]), "",
             *sections]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _colorization_strip(out: Path, runs: list[Run], results: dict[str, RunResult],
                        rows: list[dict[str, Any]]) -> Path | None:
    """Grey input, each optimizer's best run's prediction, and the truth, for held-out photos."""
    ok = [r for r in rows if r["final_val_loss"] is not None and not r["diverged"]
          and results[r["run"]].task is not None]
    if not ok or results[ok[0]["run"]].task.examples is None:
        return None
    best: dict[str, dict[str, Any]] = {}
    for r in ok:
        if r["optimizer"] not in best or r["final_val_loss"] < best[r["optimizer"]][
                "final_val_loss"]:
            best[r["optimizer"]] = r
    predictions = {}
    for name, row in best.items():
        task = results[row["run"]].task
        grey, pred, truth = task.examples(task.model)
        predictions[name] = pred
    return plots.colorization_strip(grey, predictions, truth, out / "colorization.png")
