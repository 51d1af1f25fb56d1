"""Plotting: matplotlib's ``pyplot`` on the non-interactive Agg backend, and the finishing touches of a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Optional, Sequence

import matplotlib
import matplotlib.pyplot as plt
from matplotlib import lines, patches, ticker

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


def pack_rows(sizes: Mapping[str, int], width: int) -> list[list[str]]:
    """Names in rows, first fit in the given order: a name joins the first row whose sizes still sum to at
    most ``width`` (a name larger than ``width`` gets a row of its own)."""
    rows: list[list[str]] = []
    for name, size in sizes.items():
        row = next((r for r in rows if sum(sizes[n] for n in r) + size <= width), None)
        if row is None:
            rows.append([name])
        else:
            row.append(name)
    return rows


def ratio_panels(panels: Mapping[str, Mapping[str, Sequence[Optional[float]]]], series: Sequence[str], path: Path,
                 *, title: str, ylabel: str, reference_label: str) -> Path:
    """Small multiples of ratios, saved to ``path``.

    One panel per key of ``panels`` (a family, say); in it one group of bars per item (a mechanism) with one
    bar per entry of ``series`` (a length and mode; each item holds one value per series, ``None`` when not
    measured, drawn as "n/a"), on a shared log y axis, starting at a dashed line at 1 (``reference_label``):
    up is above 1, down below. Panels are packed into rows (``pack_rows``) with widths in proportion to their
    item counts, so a panel of twenty items and one of a single item both read well."""
    sizes = {name: max(len(items), 2) for name, items in panels.items()}
    width = max(max(sizes.values(), default=2), 12)
    rows = pack_rows(sizes, width)
    values = [v for items in panels.values() for vs in items.values() for v in vs if v]
    low, high = min(values + [1.0]), max(values + [1.0])
    n, bar = len(series), 0.8 / max(len(series), 1)
    fig = plt.figure(figsize=(max(8.0, 0.32 * width * max(n, 2) + 1.5), 3.4 * len(rows) + 1.0), layout="constrained")
    for subfig, row in zip(fig.subfigures(len(rows), 1, squeeze=False)[:, 0], rows):
        axes = subfig.subplots(1, len(row), width_ratios=[sizes[name] for name in row], squeeze=False)[0]
        for ax, name in zip(axes, row):
            items = panels[name]
            for j, label in enumerate(series):
                for i, values_of_item in enumerate(items.values()):
                    x, y = i + (j - (n - 1) / 2) * bar, values_of_item[j]
                    if y is None:
                        ax.text(x, 1.0, "n/a", rotation=90, ha="center", va="center", fontsize=7, color="0.4")
                        continue
                    ax.bar(x, y - 1.0, bar, bottom=1.0, color=f"C{j}")
                    if n <= 2:
                        ax.text(x, y * (1.06 if y >= 1 else 1 / 1.06), f"{y:.2g}", ha="center",
                                va="bottom" if y >= 1 else "top", fontsize=6)
            ax.axhline(1.0, color="k", ls="--", lw=1)
            ax.set_yscale("log")
            ax.set_ylim(low / 1.8, high * 1.8)
            ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda y, _: f"{y:g}"))
            ax.yaxis.set_minor_locator(ticker.NullLocator())
            ax.set_xticks(range(len(items)), list(items), rotation=60, ha="right", rotation_mode="anchor", fontsize=8)
            ax.set_xlim(-0.6, max(len(items), 1) - 0.4)
            ax.set_title(f"{name} ({len(items)})")
            ax.grid(True, axis="y", alpha=0.3)
        axes[0].set_ylabel(ylabel)
    handles = [patches.Patch(color=f"C{j}", label=label) for j, label in enumerate(series)]
    handles.append(lines.Line2D([], [], color="k", ls="--", label=reference_label))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 4), fontsize=8)
    fig.suptitle(title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


__all__ = ["plt", "label_x", "finish_figure", "pack_rows", "ratio_panels"]
