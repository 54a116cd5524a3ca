"""Matplotlib PNGs (headless backend): the line plots every report uses."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
import numpy as np

from soaplab.reporting.runs import atomic_write

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402


def save_figure(fig: Figure, path: Path) -> Path:
    """Save ``fig`` as a PNG at ``path`` atomically (see ``atomic_write``) and close it."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return atomic_write(path, buffer.getvalue())


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
    return save_figure(fig, path)


def image_grid(columns: Mapping[str, Sequence[np.ndarray]], path: Path) -> Path:
    """Images in a grid, one titled column per entry of ``columns`` (title -> RGB images, each
    (H, W, 3) in [0, 1]; every column has as many as there are rows)."""
    rows = len(next(iter(columns.values())))
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.8 * len(columns), 1.8 * rows),
                             dpi=120, squeeze=False)
    for col, (title, images) in enumerate(columns.items()):
        for row, image in enumerate(images):
            axes[row][col].imshow(image)
            axes[row][col].set_axis_off()
        axes[0][col].set_title(title, fontsize=8)
    return save_figure(fig, path)
