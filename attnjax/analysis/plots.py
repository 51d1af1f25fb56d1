"""Plots of attention statistics: one map with token labels, per-head heat maps, rollout over an image.

matplotlib is an optional dependency (the ``experiments`` extra): it is imported when a plot is
drawn, never at ``import attnjax``. New figures are plain ``matplotlib.figure.Figure`` objects, not
pyplot ones: no backend is chosen or changed, nothing is kept in pyplot's figure list, and
``ax.figure.savefig(path)`` renders with Agg. Every function draws on ``ax`` when given (e.g. a
subplot of the caller's figure) and returns the axes it drew on.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from attnjax.checks import describe


def new_axes(figsize: tuple[float, float]) -> Any:
    """Axes on a new ``matplotlib.figure.Figure`` of ``figsize`` inches, constrained layout (no pyplot, no
    backend change)."""
    from matplotlib.figure import Figure  # optional dependency: matplotlib (the "experiments" extra)
    return Figure(figsize=figsize, layout="constrained").add_subplot()


def plot_attention_map(probabilities: Any, tokens: Optional[Sequence[str]] = None, ax: Any = None, *,
                       query_tokens: Optional[Sequence[str]] = None, title: Optional[str] = None,
                       cmap: str = "viridis") -> Any:
    """One head's attention map ``[T, S]`` as an image: row ``i`` is query ``i``'s distribution over the keys.

    Args:
      probabilities: ``[T, S]`` (e.g. ``attention_maps(captured)[layer][b, h]``).
      tokens: ``S`` key labels; the queries get the last ``T`` of them (the library's bottom-right alignment)
        unless ``query_tokens`` (``T`` labels) are given. ``None``: positions.
      ax: matplotlib axes to draw on (default: a new figure).
      title, cmap: the axes title and the colormap.

    Returns:
      The axes, with x label "key", y label "query" and a colorbar "attention".
    """
    p = np.asarray(probabilities, np.float32)
    if p.ndim != 2:
        raise ValueError(f"probabilities must be one map [T, S], got {describe(p)}")
    T, S = p.shape
    if tokens is not None and len(tokens) != S:
        raise ValueError(f"tokens must label the S = {S} keys, got {len(tokens)} labels")
    if query_tokens is None and tokens is not None:
        if T > S:
            raise ValueError(f"with T = {T} > S = {S} queries, give query_tokens (the queries cannot take the "
                             "last T key labels)")
        query_tokens = list(tokens)[S - T:]
    if query_tokens is not None and len(query_tokens) != T:
        raise ValueError(f"query_tokens must label the T = {T} queries, got {len(query_tokens)} labels")
    ax = new_axes((max(4.0, 0.25 * S + 2), max(3.5, 0.25 * T + 1.5))) if ax is None else ax
    image = ax.imshow(p, cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="attention")
    if tokens is not None:
        ax.set_xticks(range(S), list(tokens), rotation=90, fontsize=7)
    if query_tokens is not None:
        ax.set_yticks(range(T), list(query_tokens), fontsize=7)
    ax.set(xlabel="key", ylabel="query")
    if title is not None:
        ax.set_title(title)
    return ax


def plot_head_heatmap(values: Any, title: str, ax: Any = None, *, layer_labels: Optional[Sequence[str]] = None,
                      value_label: str = "", cmap: str = "viridis", annotate: bool = False) -> Any:
    """A per-(layer, head) statistic as a heat map: layers down, heads across (e.g. mean entropy, sink score).

    Args:
      values: ``[L, H]``, or one ``[H_l]`` array per layer (layers with fewer heads are padded with NaN,
        drawn blank), e.g. ``[e.mean(axis=(0, 2)) for e in apply_to_layers(attention_entropy, captured)]``.
      title: the axes title.
      ax: matplotlib axes to draw on (default: a new figure).
      layer_labels: ``L`` row labels (default: ``0 .. L-1``), e.g. the captured layers' paths.
      value_label: the colorbar label; cmap: the colormap.
      annotate: write each value in its cell.

    Returns:
      The axes, with x label "head", y label "layer" and the title.
    """
    if isinstance(values, (list, tuple)):
        rows = [np.asarray(v, np.float32).reshape(-1) for v in values]
        grid = np.full((len(rows), max((len(r) for r in rows), default=0)), np.nan, np.float32)
        for i, r in enumerate(rows):
            grid[i, :len(r)] = r
    else:
        grid = np.asarray(values, np.float32)
    if grid.ndim != 2 or 0 in grid.shape:
        raise ValueError(f"values must be [L, H] (or a list of [H] per layer) with L, H >= 1, got {describe(grid)}")
    L, H = grid.shape
    if layer_labels is not None and len(layer_labels) != L:
        raise ValueError(f"layer_labels must label the L = {L} layers, got {len(layer_labels)} labels")
    ax = new_axes((max(4.0, 0.45 * H + 2), max(3.0, 0.35 * L + 1.5))) if ax is None else ax
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label=value_label)
    ax.set_xticks(range(H))
    ax.set_yticks(range(L), [str(label) for label in (range(L) if layer_labels is None else layer_labels)])
    if annotate:
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2g}", ha="center", va="center", fontsize=6, color="w")
    ax.set(xlabel="head", ylabel="layer", title=title)
    return ax


def plot_rollout_on_image(rollout_row: Any, grid: tuple[int, int], image: Any = None, ax: Any = None, *,
                          alpha: float = 0.5, cmap: str = "jet", title: Optional[str] = None) -> Any:
    """One query's attention rollout over the ``h × w`` patch grid, laid over the image it came from.

    The row (e.g. the class token's row of ``attention_rollout``, class tokens dropped) is reshaped
    row-major to ``grid`` and drawn from 0 to its maximum (the usual display: the mask divided by its
    max), stretched bilinearly over the image's pixels with transparency ``alpha``.

    Args:
      rollout_row: ``[N]`` with ``N = h·w``, non-negative.
      grid: ``(h, w)`` patches.
      image: ``[H, W]`` or ``[H, W, C]`` (floats in [0, 1] or uint8), or ``None`` to draw the grid alone.
      ax: matplotlib axes to draw on (default: a new figure).
      alpha, cmap: the overlay's opacity and colormap; title: the axes title (default "attention rollout").

    Returns:
      The axes, with x label "patch column", y label "patch row" and the title.
    """
    row = np.asarray(rollout_row, np.float32)
    if len(grid) != 2 or min(grid) < 1:
        raise ValueError(f"grid must be (h, w) with h, w >= 1, got {grid!r}")
    h, w = int(grid[0]), int(grid[1])
    if row.ndim != 1 or row.shape[0] != h * w:
        raise ValueError(f"rollout_row must be [h*w] = [{h * w}] for grid {(h, w)} (drop class tokens first), "
                         f"got {describe(row)}")
    heat = row.reshape(h, w)
    ax = new_axes((5.0, 5.0 * h / w + 0.5)) if ax is None else ax
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)
    if image is not None:
        picture = np.asarray(image)
        if picture.ndim not in (2, 3):
            raise ValueError(f"image must be [H, W] or [H, W, C], got {describe(picture)}")
        extent = (-0.5, picture.shape[1] - 0.5, picture.shape[0] - 0.5, -0.5)
        ax.imshow(picture, cmap="gray" if picture.ndim == 2 else None)
    overlay = ax.imshow(heat, cmap=cmap, vmin=0.0, vmax=max(float(heat.max()), 1e-12), extent=extent,
                        alpha=alpha if image is not None else 1.0,
                        interpolation="bilinear" if image is not None else "nearest")
    ax.figure.colorbar(overlay, ax=ax, label="rollout")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set(xlabel="patch column", ylabel="patch row", title="attention rollout" if title is None else title)
    return ax


__all__ = ["new_axes", "plot_attention_map", "plot_head_heatmap", "plot_rollout_on_image"]
