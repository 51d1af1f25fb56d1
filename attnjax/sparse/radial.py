"""Radial attention: a spatial window that halves each time the frame distance doubles.

Li et al. 2025, "Radial Attention: O(n log n) Sparse Attention with Energy Decay for Long Video
Generation". Tokens lie on a ``(frames, height, width)`` grid, frame-major: position ``p`` is in
frame ``f = ⌊p / s⌋`` at spatial index ``x = p mod s`` (``s = height·width`` tokens per frame).
Query ``p`` and key ``j`` (frame ``g``, index ``y``), at frame distance ``d = |f − g|``, band
``r = ⌊log2 max(d, 1)⌋`` and window ``w = s / 2^r`` tokens, are allowed iff::

    g < sink_frames                                       (attention-sink frames), or
    w ≥ m  and  |x − y| ≤ w                               (the window shrinks with r), or
    w < m  and  |x − y| ≤ m  and  d ≡ 0 (mod ⌈m / w⌉)     (too thin: keep every ⌈m/w⌉-th frame)

with ``m = min_window`` (default: the key block size, as in the authors' reference
``radial_attn/attn_mask.py``, whose "hunyuan" rule is this one with ``decay_factor = 1``). Positions
past the grid (``num_frames·s ≤ p``, e.g. text tokens after the video) attend and are attended
densely, as in that code. Each band ``r`` covers ``2^r`` frames per side with about ``2s`` allowed
keys per query in total, so a query sees ``O(s·log F)`` keys and the density is ``≈ 4·log2(F) / F``
(half that causally): ``O(n log n)`` work over ``n = F·s`` tokens.

The block pattern lists a tile iff the token rule allows at least one pair in it (the authors
instead keep a tile when enough of it is allowed; listing every touched tile never drops an
allowed pair). The engine computes listed tiles densely: the token rule is not re-applied.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Optional

import numpy as np

from attnjax import registry
from attnjax.checks import check_positive
from attnjax.sparse.static import StaticSelector, block_distance, check_nonnegative
from attnjax.tiling import num_tiles

_CHUNK_ELEMENTS = 1 << 22
"""Query rows × frames handled at once (bounds the memory of ``radial_blocks``)."""


def radial_num_frames(S: int, frame_tokens: int, num_frames: Optional[int] = None) -> int:
    """``num_frames``, or by default as many frames as cover the ``S`` key positions."""
    return num_tiles(S, frame_tokens) if num_frames is None else num_frames


def _key_intervals(p: np.ndarray, S: int, s: int, F: int, m: int, sink_frames: int):
    """First and last allowed key position of query positions ``p`` [n] in each frame: ``[n, F]`` each,
    with ``keep`` [n, F] False where the frame contributes no key."""
    f, x = (p // s)[:, None], (p % s)[:, None]
    g = np.arange(F)[None, :]
    d = np.abs(f - g)
    r = np.frexp(np.maximum(d, 1).astype(np.float64))[1] - 1  # ⌊log2 max(d, 1)⌋, exactly
    scale = np.left_shift(np.int64(1), r.astype(np.int64))
    wide = scale * m <= s                                     # w = s / 2^r ≥ m
    period = -(-(m * scale) // s)                             # ⌈m / w⌉
    sink = g < sink_frames
    half = np.where(sink, s, np.where(wide, s // scale, m))
    keep = sink | wide | (d % np.maximum(period, 1) == 0)
    lo = g * s + np.maximum(x - half, 0)
    hi = np.minimum(g * s + np.minimum(x + half, s - 1), S - 1)
    return lo, hi, keep & (lo <= hi)


def radial_blocks(T: int, S: int, block_q: int, block_kv: int, frame_tokens: int,
                  num_frames: Optional[int] = None, min_window: Optional[int] = None, sink_frames: int = 1,
                  causal: bool = False) -> np.ndarray:
    """Radial attention's block pattern, bool ``[nq, nk]``: tiles holding a pair the token rule allows.

    Args:
      T, S: query and key lengths (queries at positions ``i + S − T``).
      block_q, block_kv: tile sizes.
      frame_tokens: ``s = height·width``, tokens per frame.
      num_frames: frames in the grid; default ``⌈S / s⌉``. Positions past the grid are dense.
      min_window: ``m`` in tokens (module docstring); default ``block_kv``.
      sink_frames: leading frames every query sees.
      causal: keep only tiles on or below the diagonal (``δ ≥ 0``).
    """
    check_positive(frame_tokens=frame_tokens)
    m = block_kv if min_window is None else min_window
    check_positive(min_window=m)
    check_nonnegative(sink_frames=sink_frames)
    F = radial_num_frames(S, frame_tokens, num_frames)
    check_positive(num_frames=F)
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    grid_end = F * frame_tokens
    counts = np.zeros(nq * (nk + 1), np.int64)
    rows_per_chunk = max(1, _CHUNK_ELEMENTS // F)
    for start in range(0, T, rows_per_chunk):
        i = np.arange(start, min(start + rows_per_chunk, T))
        lo, hi, keep = _key_intervals(i + (S - T), S, frame_tokens, F, m, sink_frames)
        row = (i // block_q)[:, None] * (nk + 1)
        counts += np.bincount((row + lo // block_kv)[keep], minlength=counts.size)
        counts -= np.bincount((row + hi // block_kv + 1)[keep], minlength=counts.size)
    blocks = np.cumsum(counts.reshape(nq, nk + 1), axis=1)[:, :nk] > 0
    last_position = np.minimum((np.arange(nq) + 1) * block_q, T) - 1 + (S - T)
    blocks |= (last_position >= grid_end)[:, None]
    blocks |= (np.minimum((np.arange(nk) + 1) * block_kv, S) > grid_end)[None, :]
    if causal:
        blocks &= block_distance(T, S, block_q, block_kv) >= 0
    return blocks


@registry.register
@dataclasses.dataclass(frozen=True)
class Radial(StaticSelector):
    """Radial attention (Li et al. 2025) over a ``(num_frames, height, width)`` token grid.

    Key block ``J`` is listed for query block ``I`` iff some query ``p`` in ``I`` and key ``j`` in
    ``J`` satisfy the token rule of the module docstring: frame distance ``d``, window
    ``w = s / 2^⌊log2 max(d, 1)⌋`` tokens around the same spatial index (``s = height·width``),
    frames kept every ``⌈m / w⌉`` once ``w < m``, plus ``sink_frames`` leading frames. Symmetric;
    ``mask=Causal()`` keeps ``δ ≥ 0``. Density ``≈ 4·log2(F) / F`` (half causally) for ``F`` frames.

    Attributes:
      frame_shape: ``(height, width)`` of a frame; tokens are laid out frame-major.
      num_frames: ``F``; default ``⌈S / (height·width)⌉`` (works for any length).
      min_window: ``m`` in tokens; default ``block_kv``.
      sink_frames: leading frames every query sees (the reference code's attention sink).
      block_q, block_kv: tile sizes.
    """

    frame_shape: tuple[int, int] = (16, 16)
    num_frames: Optional[int] = None
    min_window: Optional[int] = None
    sink_frames: int = 1
    block_q: int = 64
    block_kv: int = 64

    name: ClassVar[str] = "radial"
    paper: ClassVar[str] = "Radial Attention (Li et al. 2025)"

    def __post_init__(self):
        super().__post_init__()
        if len(self.frame_shape) != 2:
            raise ValueError(f"frame_shape must be (height, width), got {self.frame_shape!r}")
        check_positive(height=self.frame_shape[0], width=self.frame_shape[1])
        if self.num_frames is not None:
            check_positive(num_frames=self.num_frames)
        if self.min_window is not None:
            check_positive(min_window=self.min_window)
        check_nonnegative(sink_frames=self.sink_frames)

    @property
    def frame_tokens(self) -> int:
        """``s = height·width``."""
        return self.frame_shape[0] * self.frame_shape[1]

    def pattern(self, T: int, S: int, num_heads: int = 1) -> np.ndarray:
        return radial_blocks(T, S, self.block_q, self.block_kv, self.frame_tokens, self.num_frames,
                             self.min_window, self.sink_frames)


__all__ = ["Radial", "radial_blocks", "radial_num_frames"]
