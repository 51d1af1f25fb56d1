"""Block lists: the one data structure that drives the block-sparse engine.

A ``BlockSparse`` value holds, for each (batch, query head, query block), the sorted list of key
blocks that the block attends to. It is also an ``attnjax.masks.Mask`` (query ``i`` may see key
``j`` iff ``j // block_kv`` is in the list of ``(b, h, i // block_q)``), so the dense reference is
plain softmax attention with ``mask=blocks & fine_mask``, and fast paths visit only listed tiles.

Layout (``Bl ∈ {1, B}``, ``Hl ∈ {1, Hq}``; lists are per *query* head, GQA shares K/V only)::

    indices  int32 [Bl, Hl, nq, K]   key-block ids; entries [0, count) are valid, ascending, unique;
                                     entries [count, K) repeat the last valid id (0 if count == 0),
                                     so a kernel that walks a padded slot re-reads a loaded block
    counts   int32 [Bl, Hl, nq]      number of valid entries, 0 ≤ count ≤ K

``nq = ceil(T / block_q)``, ``nk = ceil(S / block_kv)``. The lists are *static* when the arrays are
NumPy (known at trace time: the pattern is a constant and ``K`` is the exact maximum count) and
*dynamic* when they are jax arrays computed inside jit (``K`` is then a static upper bound such as
a top-k). Selectors build them with ``from_block_mask``.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks as _masks
from attnjax.checks import concrete_values
from attnjax.tiling import num_tiles

Array = Union[np.ndarray, jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class BlockSparse(_masks.Mask):
    """Per-(batch, head, query block) lists of key blocks; see the module docstring for the layout.

    Args:
      indices: int32 ``[Bl, Hl, nq, K]``.
      counts: int32 ``[Bl, Hl, nq]``.
      block_q, block_kv: tile sizes (static).
      num_kv_blocks: ``nk = ceil(S / block_kv)`` (static).
    """

    indices: Array
    counts: Array
    block_q: int
    block_kv: int
    num_kv_blocks: int

    @property
    def is_static(self) -> bool:
        """True when the lists are NumPy arrays, known at trace time."""
        return isinstance(self.indices, np.ndarray) and isinstance(self.counts, np.ndarray)

    @property
    def num_q_blocks(self) -> int:
        return self.indices.shape[2]

    @property
    def max_blocks(self) -> int:
        """``K``, the padded list length."""
        return self.indices.shape[3]

    def check(self, batch: int, num_heads: int, T: int, S: int) -> None:
        nq, nk = num_tiles(T, self.block_q), num_tiles(S, self.block_kv)
        bl, hl, nq_l, _ = self.indices.shape
        if self.indices.ndim != 4 or bl not in (1, batch) or hl not in (1, num_heads) or nq_l != nq:
            raise ValueError(
                f"BlockSparse.indices has shape {tuple(self.indices.shape)}, expected "
                f"[1 or {batch}, 1 or {num_heads}, {nq}, K] for T={T}, block_q={self.block_q}")
        if tuple(self.counts.shape) != tuple(self.indices.shape[:3]):
            raise ValueError(f"BlockSparse.counts has shape {tuple(self.counts.shape)}, expected "
                             f"{tuple(self.indices.shape[:3])} (indices without the last axis)")
        if self.num_kv_blocks != nk:
            raise ValueError(f"BlockSparse.num_kv_blocks is {self.num_kv_blocks}, expected {nk} "
                             f"for S={S}, block_kv={self.block_kv}")
        for name in ("indices", "counts"):
            dtype = getattr(self, name).dtype
            if not jnp.issubdtype(dtype, jnp.integer):
                raise TypeError(f"BlockSparse.{name} must be integers, got {dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        bm = to_block_mask(self)
        rows = jnp.take(jnp.asarray(bm), q_idx // self.block_q, axis=2, mode="clip")
        return jnp.take(rows, kv_idx // self.block_kv, axis=3, mode="clip")

    def block_summary(self, T, S, block_q, block_kv):
        if (block_q, block_kv) == (self.block_q, self.block_kv):
            bm = to_block_mask(self)
            xp = np if isinstance(bm, np.ndarray) else jnp
            return xp.where(bm, _masks.PARTIAL, _masks.EMPTY).astype(xp.int8)
        return _masks.Explicit(self.dense(T, S)).block_summary(T, S, block_q, block_kv)


jax.tree_util.register_dataclass(BlockSparse, data_fields=["indices", "counts"],
                                 meta_fields=["block_q", "block_kv", "num_kv_blocks"])


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def from_block_mask(block_mask: Array, block_q: int, block_kv: int, max_blocks: Optional[int] = None) -> BlockSparse:
    """Lists from a boolean block mask ``[Bl, Hl, nq, nk]`` (rank 2 to 4; missing leading axes are 1).

    NumPy in, static lists out (``K`` = the largest count, at least 1, unless ``max_blocks`` is
    given). A jax array in gives dynamic lists with ``K = max_blocks`` (default ``nk``); when a row
    has more than ``K`` blocks, the ``K`` *lowest* ids are kept, so selectors that cap the count
    should select (e.g. top-k) before calling this.
    """
    xp = _xp(block_mask)
    bm = xp.asarray(block_mask).astype(bool)
    bm = bm.reshape((1,) * (4 - bm.ndim) + bm.shape)
    nk = bm.shape[-1]
    counts_all = bm.sum(-1).astype(xp.int32)
    if max_blocks is None:
        max_blocks = max(1, int(counts_all.max())) if xp is np else nk
    if not 1 <= max_blocks <= nk:
        raise ValueError(f"max_blocks must be in [1, {nk}], got {max_blocks}")
    order = xp.argsort(~bm, axis=-1, stable=True)[..., :max_blocks].astype(xp.int32)
    return _padded_lists(order, xp.minimum(counts_all, max_blocks), block_q, block_kv, nk)


def from_block_ids(ids: Array, valid: Array, block_q: int, block_kv: int, num_kv_blocks: int) -> BlockSparse:
    """Lists from chosen key-block ids ``[Bl, Hl, nq, K]`` (in any order) and which of them count
    (bool ``valid``, same shape); ``K`` stays the list length.

    Sorts the ``K`` ids of each row, where ``from_block_mask`` sorts all ``nk`` blocks: the cheap
    way to turn a top-k selection into lists under jit. Row ``(b, h, i)`` lists the set
    ``{ids[b, h, i, s] : valid[b, h, i, s]}``, ascending, and ``counts`` is its size.

    The valid ids of a row must be distinct and in ``[0, num_kv_blocks)``. When ``ids`` and ``valid``
    are concrete (NumPy arrays, Python sequences, jax arrays outside a trace) a repeated or
    out-of-range valid id is a ``ValueError`` naming the first row and slots where it occurs. Traced
    ids can't be checked, so there the result is defined by deduplication: each distinct valid id
    in range is listed once (a key block is visited once however often it was chosen) and the
    others are dropped. NumPy or Python ids give static lists, jax ids dynamic ones.
    """
    ids = ids if isinstance(ids, jax.Array) else np.asarray(ids)
    valid = valid if isinstance(valid, jax.Array) else np.asarray(valid, bool)
    if ids.ndim != 4 or tuple(valid.shape) != tuple(ids.shape):
        raise ValueError(f"from_block_ids: ids must be [Bl, Hl, nq, K] and valid the same shape, got ids "
                         f"{tuple(ids.shape)} and valid {tuple(valid.shape)}")
    if not jnp.issubdtype(ids.dtype, jnp.integer):
        raise TypeError(f"from_block_ids: ids must be integers, got {ids.dtype}")
    concrete_ids, concrete_valid = concrete_values(ids), concrete_values(valid)
    if concrete_ids is not None and concrete_valid is not None:
        _check_distinct_ids(concrete_ids, concrete_valid.astype(bool), num_kv_blocks)
    xp = np if isinstance(ids, np.ndarray) and isinstance(valid, np.ndarray) else jnp
    keep = xp.asarray(valid).astype(bool) & (ids >= 0) & (ids < num_kv_blocks)
    order = xp.sort(xp.where(keep, ids, num_kv_blocks), axis=-1)
    repeat = xp.concatenate([xp.zeros_like(order[..., :1], bool), order[..., 1:] == order[..., :-1]], axis=-1)
    order = xp.sort(xp.where(repeat, num_kv_blocks, order), axis=-1).astype(xp.int32)
    return _padded_lists(order, (order < num_kv_blocks).sum(-1), block_q, block_kv, num_kv_blocks)



def _check_distinct_ids(ids: np.ndarray, valid: np.ndarray, num_kv_blocks: int) -> None:
    """``ValueError`` at the first row of ``from_block_ids`` with a valid id out of range or repeated."""
    shape = tuple(ids.shape)
    outside = valid & ((ids < 0) | (ids >= num_kv_blocks))
    if outside.any():
        where = tuple(int(i) for i in np.argwhere(outside)[0])
        raise ValueError(f"from_block_ids: ids {shape} has a valid id outside [0, num_kv_blocks={num_kv_blocks}) "
                         f"at [b, h, i, slot] = {list(where)} (value {int(ids[where])}); "
                         f"{int(outside.sum())} such entries in all")
    ordered = np.sort(np.where(valid, ids, num_kv_blocks), axis=-1)
    repeated = (ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] < num_kv_blocks)
    if repeated.any():
        b, h, i, slot = (int(x) for x in np.argwhere(repeated)[0])
        block = int(ordered[b, h, i, slot])
        first, second = (int(x) for x in np.flatnonzero(valid[b, h, i] & (ids[b, h, i] == block))[:2])
        rows = int(repeated.any(-1).sum())
        raise ValueError(f"from_block_ids: ids {shape} lists key block {block} more than once in row [b, h, i] = "
                         f"[{b}, {h}, {i}] (slots {first} and {second}); the valid ids of a row must be distinct "
                         f"({rows} of {int(np.prod(shape[:-1]))} rows repeat one). Traced ids are deduplicated "
                         "instead")


def _padded_lists(order: Array, counts: Array, block_q: int, block_kv: int, num_kv_blocks: int) -> BlockSparse:
    """``BlockSparse`` from rows whose first ``counts`` entries are the ascending valid ids: the
    slots past the count repeat the last valid id (0 in an empty row)."""
    xp = _xp(order)
    counts = counts.astype(xp.int32)
    last = xp.take_along_axis(order, xp.maximum(counts - 1, 0)[..., None], axis=-1)
    last = xp.where(counts[..., None] > 0, last, 0)
    indices = xp.where(xp.arange(order.shape[-1]) < counts[..., None], order, last).astype(xp.int32)
    return BlockSparse(indices, counts, block_q, block_kv, num_kv_blocks)


def to_block_mask(blocks: BlockSparse) -> Array:
    """The boolean block mask ``[Bl, Hl, nq, nk]`` of the lists (NumPy for static lists)."""
    xp = np if blocks.is_static else jnp
    slot = xp.arange(blocks.max_blocks)
    valid = slot < xp.asarray(blocks.counts)[..., None]
    hits = (xp.asarray(blocks.indices)[..., None] == xp.arange(blocks.num_kv_blocks)) & valid[..., None]
    return hits.any(-2)


def transpose(blocks: BlockSparse, max_blocks: Optional[int] = None) -> BlockSparse:
    """Key-major lists: for each key block, the query blocks that visit it (for dK/dV passes).

    The result's ``indices`` are query-block ids, shape ``[Bl, Hl, nk, K']``, with the roles of
    ``block_q`` and ``block_kv`` swapped and ``num_kv_blocks = nq``. ``max_blocks`` bounds ``K'``
    for dynamic lists (default ``nq``).
    """
    bm = to_block_mask(blocks)
    swapped = bm.swapaxes(-1, -2)
    return from_block_mask(swapped, blocks.block_kv, blocks.block_q, max_blocks)


def allowed_blocks(mask: Optional[_masks.Mask], T: int, S: int, block_q: int, block_kv: int) -> Array:
    """Blocks that ``mask`` does not rule out: bool ``[Bm, Hm, nq, nk]`` (NumPy for structural masks).

    Selectors AND their pattern with this so that, e.g., a causal request never lists a block
    above the diagonal. ``None`` allows every block.
    """
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    if mask is None:
        return np.ones((1, 1, nq, nk), bool)
    summary = mask.block_summary(T, S, block_q, block_kv)
    return summary != _masks.EMPTY


def density(blocks: BlockSparse) -> float:
    """Fraction of the ``nq × nk`` tiles that the lists visit, averaged over batch and heads."""
    counts = _xp(blocks.counts).asarray(blocks.counts)
    return counts.sum() / (counts.size * blocks.num_kv_blocks)


__all__ = ["BlockSparse", "from_block_mask", "from_block_ids", "to_block_mask", "transpose", "allowed_blocks", "density"]
