"""Matplotlib PNGs (headless backend): the line plots every report uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *,
              xlabel: str, ylabel: str, title: str = "", logy: bool = False,
              logx: bool = False) -> Path:
    """One line per entry of ``series`` (label -> (xs, ys)), saved as a PNG at ``path``."""
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), label=label, linewidth=1.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
