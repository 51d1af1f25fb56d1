"""Growth of time with the sequence length: log-log slope fits, extrapolation to the next length, their cells.

A benchmark that times paths at growing ``T`` keeps rows ``{"T", "mode", "path", "run", "median_s"}`` (``run``:
whether the path was timed there); these helpers fit ``log(time) = slope · log(T) + intercept`` by least squares
per path and mode (1 is linear, 2 quadratic), predict whether the next ``T`` fits a time budget, and format a fit
for a markdown table.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def fit_slope(points: Sequence[tuple[int, float]]) -> Optional[dict]:
    """Least-squares slope of log(time) on log(T), or None with fewer than two lengths.

    Returns ``{"slope", "intercept", "T_min", "T_max", "points"}``.
    """
    if len(points) < 2:
        return None
    lens, secs = zip(*points)
    slope, intercept = np.polyfit(np.log(lens), np.log(secs), 1)
    return {"slope": float(slope), "intercept": float(intercept), "T_min": min(lens), "T_max": max(lens),
            "points": len(points)}


def timed_points(rows: Sequence[dict], path: str, mode: str) -> list[tuple[int, float]]:
    """``(T, median seconds)`` of every length at which ``path`` was timed in ``mode``."""
    return [(r["T"], r["median_s"]) for r in rows if r["path"] == path and r["mode"] == mode and r["run"]]


def path_slopes(rows: Sequence[dict], paths: Sequence[str], modes: Sequence[str], min_len: int) -> dict:
    """``{path: {mode: {"all": fit, "from_min_len": fit}}}``: ``fit_slope`` over every length each path was timed
    at, and over the lengths ``>= min_len`` (where fixed overheads matter less); a fit is None below two points."""
    out = {}
    for path in paths:
        out[path] = {}
        for mode in modes:
            timed = timed_points(rows, path, mode)
            late = [p for p in timed if p[0] >= min_len]
            out[path][mode] = {"all": fit_slope(timed), "from_min_len": fit_slope(late)}
    return out


def extrapolate(last: Optional[tuple[int, float]], seq_len: int, order: float) -> Optional[float]:
    """One run's time at ``seq_len`` from the last timed ``(T, seconds)``: ``seconds · (seq_len / T)^order``
    (None when nothing was timed yet)."""
    if last is None:
        return None
    last_len, last_s = last
    return last_s * (seq_len / last_len) ** order


def fitted_line(fit: dict) -> tuple[np.ndarray, np.ndarray]:
    """The fitted power law at its two end lengths, ``(T, seconds)``, for a log-log plot."""
    xs = np.array([fit["T_min"], fit["T_max"]], float)
    return xs, np.exp(fit["intercept"]) * xs ** fit["slope"]


def format_fit(fit: Optional[dict]) -> str:
    """``"1.082 (1024-65536, 7 pts)"``, or ``"n/a"`` for no fit."""
    return "n/a" if fit is None else f"{fit['slope']:.3f} ({fit['T_min']}-{fit['T_max']}, {fit['points']} pts)"
