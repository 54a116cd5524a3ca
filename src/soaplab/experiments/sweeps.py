"""The report's summaries over seeds, batch sizes and training lengths.

Every optimizer (and frequency) is summarized at its best lr (lowest mean final validation
loss over seeds) in each cell of batch size × training length. Ratios compare a run with
AdamW's run that set its target (same cell and seed): steps and seconds to that target, and
final loss; their mean and spread (sample standard deviation) are over seeds.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from soaplab.experiments.tuning import KNOBS
from soaplab.reporting import plots
from soaplab.reporting.tables import markdown_table

Row = dict[str, Any]


def curve_name(row: Row) -> str:
    """The optimizer and every setting of the row that varies (``None``: not swept) but the
    lr, batch size and length, which the summaries range over."""
    keys = [("f", "freq"), *((k.legend, k.name) for k in KNOBS)]
    return row["optimizer"] + "".join(f" {k}={row[key]}" for k, key in keys
                                      if row.get(key) is not None)


def _final(row: Row) -> float:
    v = row["final_val_loss"]
    return v if v is not None and not row["diverged"] and math.isfinite(v) else math.inf


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _with_ratios(rows: Sequence[Row]) -> list[Row]:
    """Each row plus its ratios to the AdamW run that set its target (same cell)."""
    ref: dict[tuple, Row] = {}
    for r in rows:
        cell = (r["batch_size"], r["steps"], r["seed"])
        if r["optimizer"] == "adamw" and (cell not in ref or _final(r) < _final(ref[cell])):
            ref[cell] = r
    out = []
    for r in rows:
        a = ref.get((r["batch_size"], r["steps"], r["seed"]))
        out.append({**r, "steps_ratio": _ratio(r.get("steps_to_target"),
                                               a and a.get("steps_to_target")),
                    "time_ratio": _ratio(r.get("seconds_to_target"),
                                         a and a.get("seconds_to_target")),
                    "loss_ratio": _ratio(_final(r), a and _final(a))})
    return out


def _spread(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation of the values that exist, and how many exist."""
    ok = [v for v in values if v is not None and math.isfinite(v)]
    if not ok:
        return None, None, 0
    return statistics.fmean(ok), statistics.stdev(ok) if len(ok) > 1 else None, len(ok)


def _cell(mean: float | None, std: float | None, n: int, of: int) -> str:
    if mean is None:
        return "not reached"
    text = f"{mean:.3f}" + (f" ± {std:.3f}" if std is not None else "")
    return text + (f" ({n}/{of} reached)" if n < of else "")


def summary(rows: Sequence[Row]) -> list[Row]:
    """One row per curve × batch size × length, at that curve's best lr there."""
    groups: dict[tuple, dict[float, list[Row]]] = defaultdict(lambda: defaultdict(list))
    for r in _with_ratios(rows):
        groups[(curve_name(r), r["batch_size"], r["steps"])][r["lr"]].append(r)
    out = []
    for (curve, batch, steps), by_lr in groups.items():
        lr, seeds = min(by_lr.items(), key=lambda kv: statistics.fmean(map(_final, kv[1])))
        n = len(seeds)
        stats = {k: _spread([s[k] for s in seeds]) for k in ("final_val_loss", "best_val_loss",
                                                             "steps_ratio", "time_ratio",
                                                             "loss_ratio")}
        out.append({"curve": curve, "batch_size": batch, "steps": steps,
                    "tokens_per_param": seeds[0]["tokens_per_param"], "lr": lr, "seeds": n,
                    **{k: _cell(*v, n) for k, v in stats.items()},
                    **{f"{k}_mean": v[0] for k, v in stats.items()}})
    return out


def _by(table: Sequence[Row], axis: str, key: str, curves: Sequence[str] | None = None
        ) -> dict[str, tuple[list[float], list[float]]]:
    """Lines of ``key`` against ``axis``, one per curve (points without a value skipped)."""
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(table, key=lambda r: r[axis]):
        if r["curve"] != "adamw" and (curves is None or r["curve"] in curves) \
                and r[key] is not None:
            xs, ys = lines.setdefault(r["curve"], ([], []))
            xs.append(r[axis])
            ys.append(r[key])
    return lines


def _soap_over(table: Sequence[Row], other: str, key: str
               ) -> dict[str, tuple[list[float], list[float]]]:
    """SOAP's ``key`` (a ratio to AdamW) over ``other``'s, against tokens per parameter: SOAP
    over AdamW is the ratio itself."""
    theirs = {(r["batch_size"], r["steps"]): r[key] for r in table if r["curve"] == other}
    lines: dict[str, tuple[list[float], list[float]]] = {}
    for r in sorted(table, key=lambda r: r["tokens_per_param"]):
        if r["curve"].startswith("soap") and r[key] is not None \
                and theirs.get((r["batch_size"], r["steps"])) is not None:
            xs, ys = lines.setdefault(f"{r['curve']} / {other}", ([], []))
            xs.append(r["tokens_per_param"])
            ys.append(r[key] / theirs[r["batch_size"], r["steps"]] if other != "adamw"
                      else r[key])
    return lines


def crossovers(lines: dict[str, tuple[list[float], list[float]]]) -> list[str]:
    """Where each ratio line crosses 1 (between which x), or that it stays on one side."""
    notes = []
    for name, (xs, ys) in lines.items():
        cross = [f"between {xs[i]:.3g} and {xs[i + 1]:.3g}" for i in range(len(ys) - 1)
                 if (ys[i] - 1) * (ys[i + 1] - 1) < 0]
        side = "below 1 (SOAP ahead)" if all(y < 1 for y in ys) else \
            "above 1 (SOAP behind)" if all(y > 1 for y in ys) else "touching 1"
        notes.append(f"- {name}: crosses 1 {', '.join(cross)} tokens/parameter" if cross
                     else f"- {name}: no crossover; {side} at every length")
    return notes


def sections(rows: Sequence[Row], out: Path, seeds: bool, batch_sizes: bool, lengths: bool
             ) -> tuple[list[str], list[Path]]:
    """Markdown lines and figures for the seed, batch-size and training-length summaries."""
    if not (seeds or batch_sizes or lengths):
        return [], []
    table = summary(rows)
    axes = [a for a, on in (("batch_size", batch_sizes), ("steps", lengths)) if on]
    lines = ["## Summary at each optimizer's best lr", "",
             "Mean ± spread (sample standard deviation) over seeds. Ratios are to the AdamW run "
             "that set the target (same seed, batch size and length): below 1, fewer steps "
             "(seconds) than AdamW; `not reached`: the run never got to AdamW's final loss.",
             "", markdown_table(table, ["curve", *axes, "tokens_per_param", "lr", "seeds",
                                         "final_val_loss", "best_val_loss", "steps_ratio",
                                         "time_ratio"])]
    figures = []
    if batch_sizes:
        lines += ["## Batch size", "",
                  "Every batch size trains for the same number of **steps** (so larger batches "
                  "see more tokens). Held-fixed steps ask the SOAP paper's question, whether "
                  "the per-iteration advantage over AdamW grows with the batch; held-fixed "
                  "tokens would give small batches more steps and large ones fewer, mixing the "
                  "batch effect with how far each run gets past the early plateau.", ""]
        for key, name in (("steps_ratio_mean", "steps"), ("time_ratio_mean", "time")):
            figures.append(plots.line_plot(
                _by(table, "batch_size", key), out / f"{name}_ratio_vs_batch_size.png",
                xlabel="batch size (sequences per step)", logx=True,
                ylabel=f"{name} to AdamW's final loss / AdamW's",
                title=f"{name}-to-target ratio to AdamW against batch size"))
    if lengths:
        lines += ["## Training length", "",
                  "Each length is its own run (its own warm-up and cosine decay), so every "
                  "point is a finished schedule. Ratios below 1 favour SOAP.", ""]
        for key, name in (("loss_ratio_mean", "final loss"), ("time_ratio_mean", "time")):
            ratio_lines = {**_soap_over(table, "adamw", key), **_soap_over(table, "muon", key)}
            slug = name.replace(" ", "_")
            figures.append(plots.line_plot(
                ratio_lines, out / f"soap_{slug}_ratio_vs_tokens_per_param.png",
                xlabel="tokens per parameter", logx=True, ylabel=f"SOAP {name} / other's",
                title=f"SOAP's {name} over AdamW's and Muon's"))
            lines += [f"Crossovers of SOAP's {name} ratio:", "", *crossovers(ratio_lines), ""]
    return lines, figures
