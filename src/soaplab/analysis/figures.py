"""Plot types the shared line_plot does not cover: side-by-side panels sharing a y axis."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

from soaplab.reporting.plots import save_figure

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

Series = Mapping[str, tuple[Sequence[float], Sequence[float]]]


def panel_plot(panels: Mapping[str, Series], path: Path, *, xlabel: str, ylabel: str,
               title: str = "", logx: bool = False) -> Path:
    """One panel per entry of ``panels`` (title -> series), same axes, one legend, as a PNG."""
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=120,
                             sharey=True, squeeze=False)
    for ax, (panel_title, series) in zip(axes[0], panels.items(), strict=True):
        for label, (xs, ys) in series.items():
            ax.plot(list(xs), list(ys), marker="o", markersize=3, linewidth=1.4, label=label)
        ax.set_title(panel_title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if logx:
            ax.set_xscale("log", base=2)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(frameon=False, fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)
