"""Sequence layouts for sequence parallelism, and masks evaluated at global positions.

A sequence of ``N`` tokens is split over ``W`` devices of a mesh axis. A *layout* decides which
global positions each device (rank) holds; every rank holds ``N / W`` tokens in increasing order:

- ``"contiguous"``: rank ``r`` holds positions ``[r·N/W, (r+1)·N/W)``. Under a causal mask rank
  ``r`` has ``r + 1/2`` blocks of work, so the last rank does ``2W - 1`` times the first's.
- ``"zigzag"``: the sequence is cut into ``2W`` chunks; rank ``r`` holds chunks ``r`` and
  ``2W-1-r`` (the load-balanced layout of Megatron-LM context parallelism and
  ring-flash-attention), so every rank has the same causal work. Needs ``N % 2W == 0``.
- ``"striped"``: rank ``r`` holds positions ``t`` with ``t mod W == r`` (Brandon et al.,
  "Striped Attention: Faster Ring Attention for Causal Transformers", 2023).

A model keeps one layout end to end: permute the token ids (and targets, and RoPE positions)
once with ``to_layout`` and shard the result over the axis; undo with ``from_layout``.

Inside ``shard_map`` the rank is a traced value, so the mask of a (query shard, key shard) pair
is ``AtPositions(mask, q_positions, kv_positions)``: the structural mask evaluated at global
positions, with a block summary computed from each tile's smallest and largest position (sound
for any set of positions, exact for the increasing positions of these layouts). The blocked
softmax path uses that summary to skip empty tiles, exactly as it does with a plain mask.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.meshes import explicit_axes
from attnjax.tiling import num_tiles

LAYOUTS = ("contiguous", "zigzag", "striped")
"""The layout names every sequence-parallel function accepts."""

Rank = Union[int, jax.Array]


DEFAULT_BLOCK = 512
"""Default tile size of the blocked attention inside the sequence-parallel schemes."""


def default_block(local_len: int, layout: str) -> int:
    """``DEFAULT_BLOCK`` clipped to one layout chunk (``T`` per rank, ``T/2`` for zigzag), so a tile
    never straddles two chunks and tile skipping sees each chunk's exact position range."""
    chunk = local_len // 2 if layout == "zigzag" else local_len
    return max(1, min(DEFAULT_BLOCK, chunk))


def check_layout(layout: str, world: int, seq_len: Optional[int] = None, *, local: bool = False) -> None:
    """``ValueError`` unless ``layout`` is known and ``seq_len`` splits over ``world`` ranks.

    ``seq_len`` is the global length, or the per-rank length when ``local=True``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if not isinstance(world, (int, np.integer)) or world < 1:
        raise ValueError(f"world (number of ranks) must be a positive int, got {world!r}")
    if seq_len is None:
        return
    parts = 2 if layout == "zigzag" else 1
    if local and seq_len % parts:
        raise ValueError(f"layout 'zigzag' needs an even per-device sequence length (2 chunks per rank), "
                         f"got {seq_len}")
    if not local and seq_len % (parts * world):
        raise ValueError(f"sequence length {seq_len} is not divisible by {parts * world} "
                         f"({'2 x ' if parts == 2 else ''}{world} ranks) for layout {layout!r}; "
                         "pad the sequence (and mask the padding with segment ids) first")


def local_positions(layout: str, world: int, rank: Rank, local_len: int) -> jax.Array:
    """Global positions of the ``local_len`` tokens that ``rank`` holds, int32 ``[local_len]``.

    ``rank`` may be traced (``lax.axis_index`` inside ``shard_map``); for a Python int the
    result is a NumPy array (a constant even under ``jit``).
    """
    check_layout(layout, world, local_len, local=True)
    xp = np if isinstance(rank, (int, np.integer)) else jnp
    idx = xp.arange(local_len, dtype=np.int32)
    rank = xp.asarray(rank, np.int32)
    if layout == "contiguous":
        return rank * local_len + idx
    if layout == "striped":
        return idx * world + rank
    half = local_len // 2
    chunk = xp.where(idx < half, rank, 2 * world - 1 - rank)
    return (chunk * half + idx % half).astype(np.int32)


def permutation(layout: str, world: int, seq_len: int) -> np.ndarray:
    """The global positions in layout order: ``x_layout = x[:, permutation(...)]``.

    Rank ``r``'s shard of the laid-out sequence is entries ``[r·N/W, (r+1)·N/W)``.
    """
    check_layout(layout, world, seq_len)
    local_len = seq_len // world
    return np.concatenate([local_positions(layout, world, r, local_len) for r in range(world)])


def to_layout(x: jax.Array, layout: str, world: int, axis: int = 1) -> jax.Array:
    """Reorder ``x`` along ``axis`` (global order) into ``layout`` order for ``world`` ranks.

    An explicitly sharded ``x`` (a ``jax.make_mesh`` mesh) keeps its sharding: each rank's shard
    of the result holds that rank's positions (``local_positions``).
    """
    return _reorder(x, permutation(layout, world, x.shape[axis]), axis)


def from_layout(x: jax.Array, layout: str, world: int, axis: int = 1) -> jax.Array:
    """Inverse of ``to_layout``: ``from_layout(to_layout(x, l, w), l, w) == x`` (sharding kept too)."""
    return _reorder(x, np.argsort(permutation(layout, world, x.shape[axis])), axis)


def _reorder(x, order: np.ndarray, axis: int) -> jax.Array:
    """``x`` indexed by ``order`` along ``axis``, the result sharded like ``x`` if ``x`` has Explicit axes."""
    x = jnp.asarray(x)
    index = (slice(None),) * (axis % x.ndim) + (order,)
    return x.at[index].get(out_sharding=jax.typeof(x).sharding if explicit_axes(x) else None)


def layout_of(positions, world: int) -> Optional[str]:
    """The layout whose order ``positions`` (``[N]`` global positions, concrete) follows, or None."""
    positions = np.asarray(positions)
    for layout in LAYOUTS:
        try:
            if np.array_equal(positions, permutation(layout, world, positions.shape[-1])):
                return layout
        except ValueError:
            continue
    return None


def check_positions(positions, layout: str, world: int) -> None:
    """``ValueError`` unless ``positions`` (``[N]`` or ``[B, N]``) are the order of ``layout``.

    ``positions`` are the global position ids of the tokens as they are laid out (what
    ``to_layout(arange(N), layout, world)`` gives). Traced positions can't be checked (no-op).
    """
    try:
        positions = np.asarray(positions)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return
    rows = positions.reshape(-1, positions.shape[-1])
    expected = permutation(layout, world, positions.shape[-1])
    for row in rows:
        if not np.array_equal(row, expected):
            found = layout_of(row, world)
            what = f"layout {found!r}" if found else "no known layout"
            raise ValueError(f"layout mismatch: the tokens are in the order of {what} for {world} ranks, but "
                             f"layout={layout!r} was requested; permute with to_layout(x, {layout!r}, {world}) "
                             "or pass the layout they are in")


def _tile_bounds(positions: jax.Array, block: int, length: int):
    """Smallest and largest position in each tile of ``block`` entries (valid entries only)."""
    n = num_tiles(length, block)
    padded = jnp.pad(positions[:length], (0, n * block - length), mode="edge").reshape(n, block)
    return padded.min(-1), padded.max(-1)


def interval_summary(mask: masks.Mask, qa, qb, ka, kb) -> jax.Array:
    """Sound EMPTY/PARTIAL/FULL codes of a structural mask for position intervals.

    ``qa``/``qb`` ``[nq, 1]``: smallest/largest query position of each query tile; ``ka``/``kb``
    ``[1, nk]`` likewise for key tiles. EMPTY means no pair in the tile is allowed, FULL that all are.
    """
    if isinstance(mask, masks.Full):
        empty, full = jnp.zeros((), bool), jnp.ones((), bool)
    elif isinstance(mask, masks.Causal):
        empty, full = ka > qb, kb <= qa
    elif isinstance(mask, masks.SlidingWindow):
        empty, full = jnp.zeros((), bool), jnp.ones((), bool)
        if mask.left is not None:
            empty, full = empty | (kb < qa - mask.left), full & (ka >= qb - mask.left)
        if mask.right is not None:
            empty, full = empty | (ka > qb + mask.right), full & (kb <= qa + mask.right)
    elif isinstance(mask, masks.ChunkedCausal):
        c = mask.chunk
        empty = (ka > qb) | (kb // c < qa // c) | (ka // c > qb // c)
        full = (kb <= qa) & (qa // c == qb // c) & (ka // c == kb // c) & (qa // c == ka // c)
    elif isinstance(mask, (masks.And, masks.Or)):
        a, b = interval_summary(mask.a, qa, qb, ka, kb), interval_summary(mask.b, qa, qb, ka, kb)
        return jnp.minimum(a, b) if isinstance(mask, masks.And) else jnp.maximum(a, b)
    else:
        raise NotImplementedError(_UNSUPPORTED.format(type(mask).__name__))
    shape = jnp.broadcast_shapes(qa.shape, ka.shape)
    code = jnp.where(empty, masks.EMPTY, jnp.where(full, masks.FULL, masks.PARTIAL))
    return jnp.broadcast_to(code, shape).astype(jnp.int8)


_UNSUPPORTED = ("sequence-parallel attention takes structural masks (Full, Causal, SlidingWindow, ChunkedCausal "
                "and their & / |), evaluated at global positions; got {}. For packed sequences pass "
                "segment_ids= instead of a Segments mask")


def check_structural(mask: Optional[masks.Mask]) -> masks.Mask:
    """``mask`` (``None`` -> ``Full()``) if it is defined by positions alone, else raise.

    Raises TypeError for a non-mask and NotImplementedError for data masks (Segments, Explicit).
    """
    if mask is None:
        return masks.Full()
    if not isinstance(mask, masks.Mask):
        raise TypeError(f"mask must be an attnjax.masks value (e.g. masks.Causal()), got {type(mask).__name__}")
    zero = jnp.zeros((1, 1), jnp.int32)
    interval_summary(mask, zero, zero, zero, zero)
    return mask


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class AtPositions(masks.Mask):
    """A structural mask evaluated at global positions: row ``i`` is at ``q_positions[i]``,
    column ``j`` at ``kv_positions[j]`` (no bottom-right offset: positions are absolute).

    Attributes:
      mask: a structural mask (``check_structural``).
      q_positions: int ``[T]`` global positions of the query rows.
      kv_positions: int ``[S]`` global positions of the key columns.
    """

    mask: masks.Mask
    q_positions: jax.Array
    kv_positions: jax.Array

    def tile(self, q_idx, kv_idx, T, S):
        qp = jnp.take(self.q_positions, q_idx, mode="clip")
        kp = jnp.take(self.kv_positions, kv_idx, mode="clip")
        return self.mask.tile(qp, kp, 0, 0)

    def block_summary(self, T, S, block_q, block_kv):
        qa, qb = _tile_bounds(self.q_positions, block_q, T)
        ka, kb = _tile_bounds(self.kv_positions, block_kv, S)
        return interval_summary(self.mask, qa[:, None], qb[:, None], ka[None, :], kb[None, :])[None, None]


def mask_at_positions(mask: masks.Mask, q_positions, kv_positions, q_segment_ids=None,
                      kv_segment_ids=None) -> masks.Mask:
    """``AtPositions(mask, q_positions, kv_positions)``, and ``Segments`` when ids are given.

    ``q_segment_ids`` ``[B, T]`` / ``kv_segment_ids`` ``[B, S]`` are indexed like the local rows
    and columns (not by global position).
    """
    pair = AtPositions(mask, jnp.asarray(q_positions, jnp.int32), jnp.asarray(kv_positions, jnp.int32))
    if q_segment_ids is None:
        return pair
    return pair & masks.Segments(q_segment_ids, kv_segment_ids)


def unmasked_tiles(layout: str, world: int, seq_len: int, *, block: int,
                   mask: masks.Mask = masks.Causal()) -> np.ndarray:
    """Per-rank count of ``(query tile, key tile)`` pairs with work, summed over all ring steps.

    Rank ``r`` attends its queries to every rank's keys; a pair of ``block``-sized tiles counts
    when ``mask`` allows at least one of its entries (the tiles the blocked path visits).
    Returns int ``[world]``. Under ``Causal()``, "zigzag" gives every rank the same count.
    """
    check_layout(layout, world, seq_len)
    local_len = seq_len // world
    counts = np.zeros(world, np.int64)
    for rank in range(world):
        q_pos = local_positions(layout, world, rank, local_len)
        for src in range(world):
            pair = AtPositions(mask, q_pos, local_positions(layout, world, src, local_len))
            summary = np.asarray(pair.block_summary(local_len, local_len, block, block))
            counts[rank] += int(np.sum(summary != masks.EMPTY))
    return counts


__all__ = [
    "LAYOUTS", "DEFAULT_BLOCK", "default_block", "check_layout", "local_positions", "permutation", "to_layout",
    "from_layout", "layout_of", "check_positions", "interval_summary", "check_structural", "AtPositions",
    "mask_at_positions", "unmasked_tiles",
]
