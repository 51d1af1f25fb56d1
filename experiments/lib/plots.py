"""Plotting: matplotlib's ``pyplot`` on the non-interactive Agg backend, and the finishing touches of a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib
import matplotlib.pyplot as plt

matplotlib.use("Agg")


def label_x(ax, xs: Sequence[int]) -> None:
    """Label a log-scale x axis at exactly ``xs`` (the measured lengths), with no minor ticks."""
    ax.set_xticks(list(xs), [str(x) for x in xs])
    ax.set_xticks([], minor=True)


def finish_figure(fig, axes, xs: Sequence[int], title: str, path: Path) -> Path:
    """Label each axis at the lengths ``xs``, add grids and legends and the title, save to ``path``, close."""
    for ax in axes:
        label_x(ax, xs)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["plt", "label_x", "finish_figure"]
