"""Matplotlib PNGs (headless backend): the line plots every report uses."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import torch
from torch import Tensor

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, *,
              xlabel: str, ylabel: str, title: str = "", logy: bool = False,
              logx: bool = False, legend: bool = True) -> Path:
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
        low, high = ax.get_ylim()
        ax.yaxis.set_major_formatter(ScalarFormatter())  # 2.2, not 2.2×10⁰
        # label the minor ticks too when the range is under a decade (else no tick is labelled)
        ax.yaxis.set_minor_formatter(ScalarFormatter() if high < 10 * low else NullFormatter())
    if logx:
        ax.set_xscale("log")
    ax.grid(alpha=0.3)
    if legend and len(series) > 1:
        ax.legend(frameon=False)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def colorization_strip(grey: Tensor, predictions: Mapping[str, Tensor], truth: Tensor,
                       path: Path) -> Path:
    """Rows = held-out photos; columns = grey input, each optimizer's colours, the truth.

    Inputs are scaled Lab halves as produced by ``soaplab.experiments.data.photos``:
    ``grey`` (N, 1, H, W) luminance, predictions and truth (N, 2, H, W) chrominance.
    """
    from soaplab.experiments.data.photos import lab_to_rgb

    columns = {"input (grey)": None, **predictions, "truth": truth}
    n = grey.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(1.8 * len(columns), 1.8 * n), dpi=120,
                             squeeze=False)
    for row in range(n):
        for col, (title, chroma) in enumerate(columns.items()):
            ab = torch.zeros_like(truth[row]) if chroma is None else chroma[row]
            axes[row][col].imshow(lab_to_rgb(torch.cat([grey[row], ab])))
            axes[row][col].set_axis_off()
            if row == 0:
                axes[row][col].set_title(title, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
