"""The comparison's ``report.md``: the summary table, loss curves and a colorization strip."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from soaplab.experiments.data.photos import lab_to_rgb
from soaplab.experiments.loop import RunResult
from soaplab.experiments.tasks import TaskOptions, spec
from soaplab.experiments.tuning import KNOBS, default_lr
from soaplab.reporting import plots
from soaplab.reporting.runs import atomic_write
from soaplab.reporting.tables import markdown_table

COLUMNS = ["optimizer", "freq", "lr", *(k.name for k in KNOBS), "seed", "batch_size", "steps",
           "final_train_loss", "final_val_loss", "best_val_loss", "steps_to_target",
           "seconds_to_target", "train_seconds", "optimizer_share", "state_mb", "diverged"]


def _curves(rows: list[dict[str, Any]], x: str, y: str = "val_loss"
            ) -> dict[str, tuple[list[float], list[float]]]:
    """Curves of ``y`` against ``x``, one line per optimizer (and frequency): its best lr by
    mean final validation loss, seeds averaged pointwise."""
    by_lr: dict[tuple[str, float], list[list[dict[str, Any]]]] = defaultdict(list)
    for row in rows:
        if row["evals"]:
            by_lr[(row["curve"], row["lr"])].append(row["evals"])
    chosen: dict[str, tuple[float, list[list[dict[str, Any]]]]] = {}
    for (curve, _), seeds in by_lr.items():
        score = sum(s[-1]["val_loss"] for s in seeds) / len(seeds)
        score = score if math.isfinite(score) else math.inf
        if curve not in chosen or score < chosen[curve][0]:
            chosen[curve] = (score, seeds)
    curves = {}
    for curve, (_, seeds) in chosen.items():
        # the steps every seed evaluated with a value (a run made before step-0 evaluations
        # has none at step 0; the mean training loss has none there)
        points = [{p["step"]: p for p in s if p.get(y) is not None} for s in seeds]
        steps = sorted(set.intersection(*(set(p) for p in points)))
        curves[curve] = ([sum(p[t][x] for p in points) / len(points) for t in steps],
                         [sum(p[t][y] for p in points) / len(points) for t in steps])
    return curves


def _drift_curves(rows: list[dict[str, Any]]
                  ) -> tuple[str, dict[str, tuple[list[float], list[float]]]] | None:
    """The smallest, median and largest drift over the factored parameter axes against step,
    for the first run recording it (SOAP's ``refresh_stats``, kept at each evaluation point):
    three labelled lines instead of one unlabelled line per axis."""
    for row in rows:
        points = [p for p in row["evals"] if p.get("drift")]
        if points:
            steps = [p["step"] for p in points]
            values = [sorted(p["drift"].values()) for p in points]
            n = len(points[-1]["drift"])
            return row["run"], {
                f"largest of {n} factors": (steps, [v[-1] for v in values]),
                "median": (steps, [v[(len(v) - 1) // 2] for v in values]),
                "smallest": (steps, [v[0] for v in values])}
    return None


GLOSSARY = {
    "final_train_loss": "mean training loss over the last 10% of steps",
    "final_val_loss": "validation loss at the last step",
    "steps_to_target": "first evaluated step at or below the target (above)",
    "seconds_to_target": "training seconds to that step",
    "train_seconds": "training time of the whole run, evaluations excluded",
    "optimizer_share": "fraction of training time spent in optimizer.step()",
    "state_mb": "memory of the optimizer's state (MiB)",
    "diverged": "the training loss became NaN or infinite (the run stopped there)",
}


def _glossary(columns: list[str]) -> list[str]:
    return ["Columns: " + "; ".join(f"`{c}`: {GLOSSARY[c]}" for c in columns
                                    if c in GLOSSARY) + ".", ""]


TUNED_SIZE, TUNED_BATCH = "tiny", 32  # what the tuned lrs were measured at (tuning.py)


def _caveat(task: TaskOptions, rows: list[dict[str, Any]], steps: int, warmup: int
            ) -> list[str]:
    """A warning where the tuned lrs are used far from the budget they were tuned at: steps
    outside 0.5-2x the task's default, or another model size or batch size."""
    if not any(r["lr"] == default_lr(task.task, r["optimizer"]) for r in rows):
        return []
    tuned = spec(task.task).steps
    budgets = sorted({r["steps"] or steps for r in rows})
    batches = sorted({r["batch_size"] or task.batch_size for r in rows})
    far = [f"{'/'.join(map(str, budgets))} steps" if any(
               not 0.5 * tuned <= b <= 2 * tuned for b in budgets) else "",
           f"size {task.size}" if task.size != TUNED_SIZE else "",
           f"batch {'/'.join(map(str, batches))}" if batches != [TUNED_BATCH] else ""]
    far = [f for f in far if f]
    if not far:
        return []
    return [f"**Caveat:** the default lrs were tuned for {task.task} at size {TUNED_SIZE}, "
            f"batch {TUNED_BATCH}, {tuned} steps; this comparison uses {', '.join(far)}, with "
            f"{warmup} warm-up steps. Its ranking of the optimizers may not hold at the tuned "
            "budget.", ""]


def _target_text(rows: list[dict[str, Any]], targets: dict[tuple, float]) -> str:
    if targets:
        return f" = **{', '.join(f'{t:.4f}' for t in targets.values())}**"
    if any(r["optimizer"] == "adamw" for r in rows):
        return " (none: AdamW diverged at every lr)"
    return " (none: no AdamW run)"


def _baseline(opts: TaskOptions, rows: list[dict[str, Any]]
              ) -> tuple[list[dict[str, Any]], list[str]]:
    """The task's baseline (if it has one) as a table row, and which runs beat it on the
    validation set: a result counts only where a run does."""
    make = spec(opts.task).baseline
    if make is None:
        return [], []
    base = make(opts)
    runs: dict[str, list[bool]] = defaultdict(list)
    for r in rows:
        final = r["final_val_loss"]
        beat = final is not None and not r["diverged"] and final < base.val_loss
        runs[f"{r['curve']} lr {r['lr']:g}"].append(beat)
    tally = [f"{k} ({sum(v)} of {len(v)})" for k, v in runs.items()]
    return ([{"optimizer": f"{base.name} (baseline)", "final_train_loss": base.train_loss,
              "final_val_loss": base.val_loss}],
            [f"Baseline: predicting the {base.name} everywhere scores {base.train_loss:.4f} on "
             f"training batches and {base.val_loss:.4f} on the validation set. Runs whose "
             f"final validation loss beats it: {', '.join(tally)}.", ""])


def write_report(out: Path, task: TaskOptions, rows: list[dict[str, Any]],
                 results: dict[str, RunResult], targets: dict[tuple, float],
                 env: dict[str, Any], sections: list[str] = (),
                 extra_figures: list[Path] = (), steps: int = 0, warmup: int = 0) -> Path:
    """``task`` is the comparison's task options; ``rows`` come from ``compare.summarize``;
    ``steps`` and ``warmup`` are the comparison's (for the caveat on the tuned lrs);
    ``results`` give the trained models (None for runs read back from their summaries) for the
    colorization strip; ``targets`` are AdamW's per cell (batch size, length, seed); ``env``
    is the machine the comparison ran on (``reporting.runs.environment``); ``sections`` and
    ``extra_figures`` (the sweeps' summaries) go after the table of runs and the baseline."""
    baseline_rows, baseline_lines = _baseline(task, rows)
    name, metric = task.task, spec(task.task).metric
    figures = [
        plots.line_plot(_curves(rows, "step"), out / "val_loss_vs_steps.png",
                        xlabel="step", ylabel=f"validation {metric}", logy=True,
                        title=f"{name}: validation loss against steps"),
        plots.line_plot(_curves(rows, "train_time"), out / "val_loss_vs_time.png",
                        xlabel="training seconds (evaluation excluded)",
                        ylabel=f"validation {metric}", logy=True,
                        title=f"{name}: validation loss against wall-clock"),
        plots.line_plot(_curves(rows, "step", "train_loss"),
                        out / "train_loss_vs_steps.png", xlabel="step",
                        ylabel=f"training {metric}\n(mean between evaluations)", logy=True,
                        title=f"{name}: training loss against steps"),
    ]
    figures += extra_figures
    drift = _drift_curves(rows)
    if drift is not None:
        figures.append(plots.line_plot(drift[1], out / "drift.png", xlabel="step",
                                       ylabel="basis drift ‖QᵀLQ − diag‖ / ‖L‖",
                                       title=f"{drift[0]}: drift of the factors' bases"))
    examples = _colorization_strip(out, results, rows)
    if examples is None and (out / "colorization.png").is_file():
        examples = out / "colorization.png"  # every run read back: the strip drawn with them
    if examples is not None:
        figures.append(examples)
    threads = f"{env['threads']} thread" + ("s" if env["threads"] != 1 else "")
    columns = [c for c in COLUMNS if any(r.get(c) is not None for r in rows)]
    lines = [f"# soaplab compare {name}", "",
             f"Machine: {env['machine']}, {threads}, torch {env['torch']}"
             + (f", {env['cuda']}" if env["cuda"] else ", CPU")
             + (f", {env['world_size']} processes (torchrun, the batch split across them)"
                if env.get("world_size", 1) > 1 else "")
             + (f", {env['jobs']} runs side by side (--jobs; each run's seconds share the "
                "machine)" if env.get("jobs", 1) > 1 else "") + ".", "",
             f"Validation metric: {metric}. Target = AdamW's best final validation loss (over "
             "its lrs, for each seed, batch size and length)" + _target_text(rows, targets)
             + "; steps/seconds to target are the first evaluation at or below it "
             "(training time only, evaluations excluded).", "",
             markdown_table(rows + baseline_rows, columns), "", *_glossary(columns),
             *_caveat(task, rows, steps, warmup), *baseline_lines, *sections]
    lines += [f"![{f.stem}]({f.name})" for f in figures]
    return atomic_write(out / "report.md", "\n".join(lines) + "\n")


def _colorization_strip(out: Path, results: dict[str, RunResult],
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
    columns = {"input (grey)": torch.zeros_like(truth), **predictions, "truth": truth}
    images = {title: [lab_to_rgb(torch.cat([g, ab])) for g, ab in zip(grey, chroma, strict=True)]
              for title, chroma in columns.items()}
    return plots.image_grid(images, out / "colorization.png")
