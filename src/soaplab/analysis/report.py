"""report.md and PNG plots of an analysis run folder, from its metrics.jsonl alone.

Everything shown is read back from the run folder, so a report can be rebuilt (or compared)
without re-running the study.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from soaplab.analysis.figures import panel_plot
from soaplab.reporting.plots import line_plot
from soaplab.reporting.runs import NUMBER, atomic_write, check, read_config, read_jsonl
from soaplab.reporting.tables import markdown_table

KRONECKER = {"optimal": "optimal Kronecker", "shampoo2": "Shampoo² (L⊗R)",
             "shampoo": "Shampoo (L^½⊗R^½)"}
WHITENING = {"adam": "Adam diag(C)^-½", "shampoo": "Shampoo (L⊗R/tr C)^-½",
             "shampoo_quarter": "Shampoo L^-¼⊗R^-¼", "soap": "SOAP"}


# What the report reads back (reporting.runs.check): the study's settings and its records.
CONFIG = {"kind": str, "dataset": str, "optimizer": str, "lr": NUMBER, "steps": int,
          "batch_size": int, "hidden": int, "activation": str, "probe": int}
SNAPSHOT = {"layer": str, "shape": str, "train_loss": NUMBER, "test_acc": NUMBER}

def _layer(record: dict[str, Any]) -> str:
    return f"{record['layer']} ({record['shape']})"


def _table(rows: list[dict[str, Any]], prefix: str, names: dict[str, str],
           suffix: str = "") -> str:
    """One row per (step, layer) with the columns ``prefix/name[suffix]``."""
    out = [{"step": r["step"], "layer": _layer(r), "train loss": r["train_loss"],
            **{label: r.get(f"{prefix}/{key}{suffix}") for key, label in names.items()}}
           for r in rows]
    return markdown_table(out)


def _per_layer_plots(rows: list[dict[str, Any]], run_dir: Path, stem: str, prefix: str,
                     names: dict[str, str], suffix: str, ylabel: str) -> list[Path]:
    paths = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        series = {label: ([r["step"] for r in mine], [r[f"{prefix}/{key}{suffix}"] for r in mine])
                  for key, label in names.items()}
        path = run_dir / f"{stem}_{layer.replace('.', '_')}.png"
        paths.append(line_plot(series, path, xlabel="training step", ylabel=ylabel,
                               title=f"{_layer(mine[0])} against {prefix}"))
    return paths


def _batch_effect(rows: list[dict[str, Any]], run_dir: Path) -> tuple[str, list[Path]]:
    """Table (every snapshot) and per-layer plots of cosine(GGN, L_b⊗R_b) against b."""
    sizes = sorted({int(k.split("/")[2]) for k in rows[0] if k.startswith("batch/real/")})
    table = [{"step": r["step"], "layer": _layer(r), "labels": labels,
              **{f"b={b}": r[f"batch/{labels}/{b}"] for b in sizes}}
             for r in rows for labels in ("real", "sampled")]
    paths = []
    for layer in dict.fromkeys(r["layer"] for r in rows):
        mine = [r for r in rows if r["layer"] == layer]
        panels = {f"{labels} labels": {f"step {r['step']}": (sizes, [r[f"batch/{labels}/{b}"]
                                                                    for b in sizes])
                                       for r in mine}
                  for labels in ("real", "sampled")}
        path = run_dir / f"batch_size_{layer.replace('.', '_')}.png"
        paths.append(panel_plot(panels, path, xlabel="batch size b", logx=True,
                                ylabel="cosine(GGN, L_b⊗R_b)", title=_layer(mine[0])))
    return markdown_table(table), paths


def _loss_plot(records: list[dict[str, Any]], run_dir: Path, batch_size: int) -> Path:
    train = [r for r in records if r["kind"] == "train"]
    return line_plot({"train batch loss": ([r["step"] for r in train], [r["loss"] for r in train])},
                     run_dir / "loss.png", xlabel="training step", ylabel="cross-entropy (nats)",
                     title=f"training loss on one batch of {batch_size}, every 10 steps and "
                           "the last")


def _kronecker_sections(rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    batch_table, batch_plots = _batch_effect(rows, run_dir)
    plots = _per_layer_plots(rows, run_dir, "kronecker", "ggn", KRONECKER, "", "cosine with GGN")
    hessian = [{"step": r["step"], "layer": _layer(r), "cosine(Hessian, GGN)": r[key]}
               for r in rows if (key := "hessian/ggn_cosine") in r]
    return [
        "## Cosine similarity with the Gauss-Newton matrix (per-example factors)\n",
        _table(rows, "ggn", KRONECKER),
        *[f"![{p.stem}]({p.name})\n" for p in plots],
        "## Cosine similarity with the empirical Fisher (real labels)\n",
        _table(rows, "fisher", KRONECKER),
        "## Batch gradients: cosine(GGN, L_b⊗R_b)\n",
        batch_table, *[f"![{p.stem}]({p.name})\n" for p in batch_plots],
        *(["## Exact layer Hessian against the GGN\n", markdown_table(hessian)] if hessian else []),
    ]


def _whitening_sections(rows: list[dict[str, Any]], run_dir: Path) -> list[str]:
    sections = []
    for target, title in (("fisher", "empirical Fisher C"), ("ggn", "GGN as C")):
        plots = _per_layer_plots(rows, run_dir, f"whitening_{target}", target, WHITENING,
                                 "/cosine", "cosine with C^-½")
        sections += [
            f"## {title}: cosine(P, C^-½)\n", _table(rows, target, WHITENING, "/cosine"),
            *[f"![{p.stem}]({p.name})\n" for p in plots],
            f"## {title}: whiteness cosine(P C Pᵀ, I)\n",
            _table(rows, target, WHITENING, "/whiteness"),
        ]
    return sections


def write_report(run_dir: Path, command: str) -> Path:
    """Write run_dir/report.md (tables, PNG links) from run_dir/metrics.jsonl."""
    run_dir = Path(run_dir)
    cfg = check(run_dir / "config.json", read_config(run_dir)["config"], CONFIG, "config")
    metrics = run_dir / "metrics.jsonl"
    records = read_jsonl(metrics, {"kind": str, "step": int})
    rows = [check(metrics, r, SNAPSHOT, f"step {r['step']}") for r in records
            if r["kind"] == "snapshot"]
    for r in records:
        if r["kind"] == "train":
            check(metrics, r, {"loss": NUMBER}, f"step {r['step']}")
    if not rows:
        raise RuntimeError(f"{run_dir} holds no snapshot records; was any snapshot step reached?")
    body = _kronecker_sections if cfg["kind"] == "kronecker" else _whitening_sections
    final = rows[-1]
    lines = [
        f"# soaplab analyze {cfg['kind']}\n",
        f"Reproduce: `{command}`\n",
        f"{cfg['dataset']}, MLP hidden={cfg['hidden']} ({cfg['activation']}), "
        f"{cfg['optimizer']} lr={cfg['lr']}, batch {cfg['batch_size']}, {cfg['steps']} steps; "
        f"matrices on {cfg['probe']} training examples in float64. Final train loss "
        f"{final['train_loss']:.4g}, test accuracy {final['test_acc']:.4g}.\n",
        f"![loss]({_loss_plot(records, run_dir, cfg['batch_size']).name})\n",
        *body(rows, run_dir),
    ]
    return atomic_write(run_dir / "report.md", "\n".join(lines))
