"""The Pointer Network tasks as batches: sorting, and the planar convex hull.

Both tasks give ``n`` input points and ask for a sequence of input indices (Vinyals, Fortunato & Jaitly 2015,
"Pointer Networks", §2, eq. 1: ``C^P = (C_1, …, C_m)``, each ``C_i`` an index into ``P``):

- ``"sort"``: ``n`` numbers drawn uniformly from ``[0, 1)``; the answer is the permutation that sorts them,
  ascending (``m = n``; the sorting task of Vinyals, Bengio & Kudlur 2016, "Order Matters: Sequence to sequence
  for sets"; the Ptr-Net paper names sorting as a motivating problem but reports no sorting results).
- ``"hull"``: ``n`` points drawn uniformly from the unit square (Ptr-Net §3.1, "Convex Hull"); the answer is
  the hull's vertices in counter-clockwise order starting from the vertex with the lowest index, then that
  first index again, which closes the polygon (the paper's representation, Fig. 1(b): ``⇒ 1 4 2 1 ⇐``); here
  the closing index itself ends the sequence, with no separate ``⇐``. ``m = h + 1`` for ``h`` hull vertices;
  targets are padded with ``IGNORE`` to ``n + 1`` steps.

A batch is ``(PointerInputs(points, previous), targets)``: ``previous`` is the decoder's teacher-forced
input, ``START`` then the targets shifted by one; ``START``/``IGNORE`` (``-1``) there mean "no point".
"""

from __future__ import annotations

from typing import NamedTuple, Sequence, Union

import numpy as np

from experiments.lib.training import IGNORE

TASKS = ("sort", "hull")
"""The task names."""
START = -1
"""The decoder's first input ("⇒", no point chosen yet); equal to ``IGNORE``, which pads ``previous``."""
FEATURES = {"sort": 1, "hull": 2}
"""Coordinates per input point."""


class PointerInputs(NamedTuple):
    """What the pointer model reads: ``points [B, n, F]`` float32 and ``previous [B, L]`` int32 (teacher forcing:
    the index chosen at the step before, ``START`` at step 0 and ``-1`` after the sequence ends)."""

    points: np.ndarray
    previous: np.ndarray


def output_len(task: str, n: int) -> int:
    """Decoder steps ``L`` of a batch: ``n`` for sorting, ``n + 1`` for the hull (all ``n`` points, closed)."""
    check_task(task)
    return n + 1 if task == "hull" else n


def check_task(task: str) -> None:
    """``ValueError`` unless ``task`` is one of ``TASKS``."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def cross(o: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """``(a − o) × (b − o)``: positive when ``o → a → b`` turns counter-clockwise."""
    return float((a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0]))


def convex_hull(points: np.ndarray) -> list[int]:
    """Hull vertex indices of ``points [n, 2]``, counter-clockwise, starting from the lowest index.

    Andrew's monotone chain (O(n log n)); points on a hull edge but not at a corner are left out. Needs
    ``n >= 3`` points not all on one line (true with probability 1 for uniform points).
    """
    points = np.asarray(points, np.float64)
    n = len(points)
    order = sorted(range(n), key=lambda i: (points[i, 0], points[i, 1]))
    lower: list[int] = []
    upper: list[int] = []
    for chain, seq in ((lower, order), (upper, order[::-1])):
        for i in seq:
            while len(chain) >= 2 and cross(points[chain[-2]], points[chain[-1]], points[i]) <= 0:
                chain.pop()
            chain.append(i)
    hull = lower[:-1] + upper[:-1]
    if len(hull) < 3:
        raise ValueError("the points are collinear: no polygon hull")
    start = hull.index(min(hull))
    return hull[start:] + hull[:start]


def polygon_area(points: np.ndarray, cycle: Sequence[int]) -> float:
    """Signed area of the polygon ``points[cycle]`` (shoelace formula; positive when counter-clockwise).

    ``points [n, 2]``; ``cycle`` lists the vertices once (not closed by repeating the first). A clockwise or
    self-intersecting polygon gets a smaller (possibly negative) area than its hull.
    """
    xy = np.asarray(points, np.float64)[list(cycle)]
    x, y = xy[:, 0], xy[:, 1]
    return float(0.5 * np.sum(x * np.roll(y, -1) - np.roll(x, -1) * y))


def pointer_batch(task: str, batch_size: int, n: int, seed: Union[int, Sequence[int]]
                  ) -> tuple[PointerInputs, np.ndarray]:
    """A batch of one task at ``n`` points: ``(PointerInputs(points, previous), targets [B, L] int32)``.

    ``L = output_len(task, n)``; ``targets`` are input indices (``IGNORE`` after the hull's closing index) and
    ``previous = [START, targets[:-1]]``. A deterministic function of ``(task, batch_size, n, seed)``; ``seed``
    is an int or a tuple of ints.
    """
    check_task(task)
    if n < 3:
        raise ValueError(f"n must be >= 3 points, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    rng = np.random.default_rng(seed)
    points = rng.random((batch_size, n, FEATURES[task]), dtype=np.float32)
    L = output_len(task, n)
    targets = np.full((batch_size, L), IGNORE, np.int64)
    if task == "sort":
        targets[:] = np.argsort(points[..., 0], axis=1, kind="stable")
    else:
        for b in range(batch_size):
            hull = convex_hull(points[b])
            targets[b, :len(hull) + 1] = hull + hull[:1]
    previous = np.concatenate([np.full((batch_size, 1), START), targets[:, :-1]], axis=1)
    return PointerInputs(points, previous.astype(np.int32)), targets.astype(np.int32)


__all__ = ["TASKS", "START", "FEATURES", "PointerInputs", "output_len", "check_task", "cross", "convex_hull",
           "polygon_area", "pointer_batch"]
