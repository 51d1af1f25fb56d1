"""Masks compiled for in-kernel evaluation on 2-D tiles, shared by the flash, block-sparse and
stick-breaking kernels.

``plan_mask`` compiles an ``attnjax.masks`` value into a static ``MaskPlan`` tree plus the data
arrays it needs; a kernel evaluates the plan on a tile with ``eval_mask`` from iotas (Causal,
SlidingWindow, ChunkedCausal, Full) or from data tiles it loads (Segments ids, Explicit bool
blocks). Combinations with ``&``/``|`` nest.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from attnjax import masks


@dataclasses.dataclass(frozen=True)
class MaskPlan:
    """A static mask tree. ``kind`` in full/causal/window/chunked/segments/explicit/and/or.

    ``params`` holds static numbers (window bounds, chunk); ``slot`` indexes the data arrays
    returned by ``plan_mask`` (segments: one slot = q ids and kv ids; explicit: the bool block).
    """

    kind: str
    params: tuple = ()
    slot: int = -1
    children: tuple = ()

    def data_kinds(self) -> tuple:
        """``(kind, slot)`` of every data leaf, in slot order."""
        if self.kind in ("and", "or"):
            return tuple(sorted(sum((c.data_kinds() for c in self.children), ()), key=lambda x: x[1]))
        if self.kind in ("segments", "explicit"):
            return ((self.kind, self.slot),)
        return ()


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SegmentData:
    """Segment ids padded to the tiled lengths: ``q [Bs, T_pad]``, ``kv [Bs, S_pad]`` int32.

    Padded query rows get id ``-1`` and padded key columns ``-2`` so they never match.
    """

    q: jax.Array
    kv: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExplicitData:
    """An Explicit mask as int8 ``[Bm, Hm, T_pad, S_pad]`` (``Bm ∈ {1,B}``, ``Hm ∈ {1,Hq}``).

    The query and key axes are broadcast to full length (so a tile is always a plain block);
    padding is 0 (not allowed).
    """

    mask: jax.Array


def plan_mask(mask: Optional[masks.Mask], T: int, S: int, T_pad: int, S_pad: int):
    """Compile ``mask`` into ``(MaskPlan or None, [SegmentData | ExplicitData, ...])``.

    Raises NotImplementedError for mask kinds the kernels can't evaluate in-kernel (anything
    other than Full, Causal, SlidingWindow, ChunkedCausal, Segments, Lengths (as its ``segments``),
    Explicit and their ``&``/``|`` combinations, e.g. a future BlockSparse or Neighborhood).
    """
    if mask is None:
        return None, []
    data: list = []

    def build(m) -> MaskPlan:
        if isinstance(m, masks.Full):
            return MaskPlan("full")
        if isinstance(m, masks.Causal):
            return MaskPlan("causal")
        if isinstance(m, masks.SlidingWindow):
            return MaskPlan("window", (m.left, m.right))
        if isinstance(m, masks.ChunkedCausal):
            return MaskPlan("chunked", (m.chunk,))
        if isinstance(m, masks.Lengths):
            return build(m.segments(T, S))
        if isinstance(m, masks.Segments):
            qs = jnp.asarray(m.q_segment_ids, jnp.int32)
            ks = jnp.asarray(m.kv_ids(), jnp.int32)
            bs = max(qs.shape[0], ks.shape[0])
            qs = jnp.broadcast_to(qs, (bs, T))
            ks = jnp.broadcast_to(ks, (bs, S))
            qs = jnp.pad(qs, ((0, 0), (0, T_pad - T)), constant_values=-1)
            ks = jnp.pad(ks, ((0, 0), (0, S_pad - S)), constant_values=-2)
            data.append(SegmentData(qs, ks))
            return MaskPlan("segments", slot=len(data) - 1)
        if isinstance(m, masks.Explicit):
            arr = jnp.asarray(m.mask)
            arr = arr.reshape((1,) * (4 - arr.ndim) + arr.shape)
            arr = jnp.broadcast_to(arr, arr.shape[:2] + (T, S)).astype(jnp.int8)
            arr = jnp.pad(arr, ((0, 0), (0, 0), (0, T_pad - T), (0, S_pad - S)))
            data.append(ExplicitData(arr))
            return MaskPlan("explicit", slot=len(data) - 1)
        if isinstance(m, masks.And):
            return MaskPlan("and", children=(build(m.a), build(m.b)))
        if isinstance(m, masks.Or):
            return MaskPlan("or", children=(build(m.a), build(m.b)))
        raise NotImplementedError(
            f"the Pallas flash kernel can't evaluate mask {type(m).__name__} in-kernel; supported: Full, Causal, "
            "SlidingWindow, ChunkedCausal, Segments, Explicit and &/| combinations (use implementation='xla')")

    return build(mask), data


def eval_mask(plan: MaskPlan, q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int,
              load: Callable[[str, int], object]) -> jax.Array:
    """Evaluate ``plan`` on one tile: bool ``[bq, bk]``.

    Args:
      q_idx: int32 ``[bq, bk]`` query row index of each element (from a 2-D iota).
      kv_idx: int32 ``[bq, bk]`` key column index of each element.
      T, S: true (unpadded) lengths, for bottom-right alignment (query position = i + S − T).
      load: ``load("segments", slot) -> (q_ids [bq, 1], kv_ids [1, bk])`` and
        ``load("explicit", slot) -> bool/int [bq, bk]``; the backend loads the tile's data.
    The result does NOT include the "key column < S" padding test (the kernels add it).
    """
    qp = q_idx + (S - T)
    kind = plan.kind
    if kind == "full":
        return kv_idx >= 0
    if kind == "causal":
        return kv_idx <= qp
    if kind == "window":
        left, right = plan.params
        ok = kv_idx >= 0
        if left is not None:
            ok = ok & (kv_idx >= qp - left)
        if right is not None:
            ok = ok & (kv_idx <= qp + right)
        return ok
    if kind == "chunked":
        (c,) = plan.params
        # Floor division of non-negative ints; a padded/negative query position gives a
        # negative chunk id that matches no key (kv_idx >= 0).
        return (kv_idx <= qp) & (_floordiv(kv_idx, c) == _floordiv(qp, c))
    if kind == "segments":
        qs, ks = load("segments", plan.slot)
        return qs == ks
    if kind == "explicit":
        return load("explicit", plan.slot) != 0
    if kind == "and":
        a, b = plan.children
        return eval_mask(a, q_idx, kv_idx, T, S, load) & eval_mask(b, q_idx, kv_idx, T, S, load)
    if kind == "or":
        a, b = plan.children
        return eval_mask(a, q_idx, kv_idx, T, S, load) | eval_mask(b, q_idx, kv_idx, T, S, load)
    raise ValueError(f"unknown mask plan kind {kind!r}")


def _floordiv(x: jax.Array, c: int) -> jax.Array:
    """Floor division by a positive constant that is exact for negative ``x`` too."""
    q = jax.lax.div(x, jnp.int32(c))  # truncates toward zero
    return jnp.where((x < 0) & (q * c != x), q - 1, q)


def tile_iotas(i, j, block_q: int, block_kv: int):
    """Row and column indices ``[bq, bk]`` int32 of tile ``(i, j)`` from 2-D iotas."""
    rows = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 0) + i * block_q
    cols = jax.lax.broadcasted_iota(jnp.int32, (block_q, block_kv), 1) + j * block_kv
    return rows, cols


__all__ = ["MaskPlan", "SegmentData", "ExplicitData", "plan_mask", "eval_mask", "tile_iotas"]
