"""The token-granular sparse engine: attention where each query picks keys one by one.

Block selectors (``attnjax.sparse.engine``) choose tiles; content-routed methods that choose single
tokens need a token-level path. Two selections cover them, behind one op with one reference:

- ``Buckets(q_ids, kv_ids, num_buckets)``: a partition. Query ``i`` of head ``h`` sees key ``j`` iff
  they share a bucket, ``q_ids[b, h, i] == kv_ids[b, h // G, j]`` (Routing Transformer clusters, Roy et
  al. 2021; Reformer/HyperAttention LSH buckets, Kitaev et al. 2020, Han et al. 2024).
- ``KeyLists(indices)``: each query's own keys, ``indices[b, h, i, :]`` (``-1`` = empty slot), or one
  list per head shared by all queries when the query axis has size 1 (top-k per query: Sparsifiner,
  Wei et al. 2023; SPT top-L; DMA's per-head key choice, Shi et al. 2025).

On top of the selection, the request's ``mask`` (``Causal()``, padding, ...) applies pair by pair::

    out_i = Σ_j softmax_j(s_ij | j ∈ selected(i), mask(i, j)) v_j,   s_ij = scale · q_i · k_j

Paths:

- ``reference``: dense softmax attention under ``selection & mask`` (O(T·S) memory).
- ``xla``, buckets: sort queries and keys by (bucket, position) per head (``bucket_layout``), so that
  each bucket is contiguous and attention inside it is dense, and run the block-sparse gather engine
  (``block_sparse_attention_xla``, custom VJP) on the sorted rows; rows go back by the inverse
  permutation (scattered, not a second sort). When the expected bucket fills ``ALIGNED_MIN_TILES``
  tiles (``T, S ≥ 2·nb·block``), each bucket starts on a tile boundary (padding slots between
  buckets): a query tile holds one bucket and lists exactly its bucket's key tiles (under ``Causal()``
  up to its last query's position, ``aligned_bucket_block_lists``), the fine mask only drops padding
  keys and applies the request's mask (``AlignedBuckets``), and a gather step covers an expected
  bucket (``aligned_steps``). Smaller buckets share tiles instead: each sorted query tile lists the
  key tiles spanning its buckets (``bucket_block_lists``) and the fine mask tests bucket equality
  (``SortedBuckets``) at ``KEYS_PER_STEP`` keys per step. Cost: two sorts, the permutations, and
  O(Σ_buckets n_q·n_k) logits rounded up to tiles (aligned: ⌈n_q/bq⌉·⌈n_k/bk⌉ tiles per bucket, at
  most ``nb·(block − 1)`` padding rows per side); memory O(T·block). Default tiles grow with the
  expected bucket (``bucket_tiles``). Measured (CPU, 2 cores at load 2.3-4.3, 8 random buckets per head
  = density 1/8, non-causal, B = 1, H = 4, D = 64, float32, ratio to dense ``flash_attention_xla`` in
  the same interleaved loop, bucket ids as jit arguments): forward 0.20-0.22× at T = 8k (the previous
  unaligned layout 0.34-0.35×) and 0.17× at 16k (previously 0.27×); forward + backward 0.14× at 8k
  (previously 0.27×); under ``Causal()`` 0.35-0.45× dense causal at 8k (previously 0.41-0.59×).
  Of the 8k forward, sorting, permuting and scattering back take about 0.02-0.03× dense; the engine
  runs as fast per logit as dense attention does on 1024-long slices (0.18× vs 0.20×).
- ``xla``, key lists, ``key_path="blocks"``: each query tile lists the union of the key blocks its
  rows' keys lie in, and a packed per-row bitmask (``KeyBits``, ``T·S/8`` bytes per head) is the fine
  mask that keeps exactly each row's keys (``key_list_blocks``); the block-sparse gather engine runs
  them (custom VJP). Cost: ``T·K`` scattered writes and ``T·S`` booleans streamed to build the lists,
  then dense tile math over the union (O(union·D)): fast when a tile's rows share their keys (top-k
  lists of structured inputs), no better than dense when the lists are scattered (the union is dense).
- ``xla``, key lists, ``key_path="gather"``: queries in chunks gather their ``K`` keys (GQA reads K/V
  head ``h // G``, never repeats them), a float32 softmax over the slots; each chunk is rematerialized
  in the backward (``jax.checkpoint``), so memory is O(chunk·K·D) on top of the outputs. Cost
  O(T·K·D), but memory-bound: a gathered slot costs about 16 tile pairs of the block path on CPU.
- ``key_path="auto"`` (default): "blocks" when even a dense union costs no more than the gathers
  (``choose_key_path``: ``K ≥ S/16``, ``S/32`` under ``Causal()``, at 64-wide tiles); for shorter
  lists and at least ``RUNTIME_CHOICE_MIN_TILES`` query tiles, the block lists are built and taken
  when their union costs less than the gathers (a run-time ``lax.cond``: local lists go to blocks,
  scattered ones to the gathers); for fewer tiles, "gather".
  The Pallas block-sparse kernel can't take a data fine mask, so key lists have no ``pallas`` path.

Rows with no allowed key get 0 (and lse −inf). Duplicate ids within a list count once.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax import masks
from attnjax.blocked.lists import BlockSparse, allowed_blocks, from_block_mask
from attnjax.checks import check_qkv
from attnjax.dispatch import dispatch
from attnjax.masks import Mask
from attnjax.meshes import accepts_explicit_meshes
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse.engine import static_allowed_blocks
from attnjax.sparse.gather import block_sparse_attention_xla
from attnjax.tiling import num_tiles, pad_axis

PATHS = ("reference", "xla")

KEYS_PER_STEP = 512
"""Keys per gather step of the unaligned sorted-bucket layout (buckets of fewer than
``ALIGNED_MIN_TILES`` expected tiles; the aligned layout sizes its steps by ``aligned_steps``): its
lists are padded to every key tile (a range's length is known only at run time), so steps shorter
than the engine's default waste fewer slots past a range's end. Measured when 8 random buckets at
density 1/8 (T = 8k) still took this layout: 0.33× dense at 512 against 0.47× at 1024; the aligned
layout with 17-tile steps now runs that case at 0.20-0.22×."""

ELEMENTS_PER_CHUNK = 2 ** 18
"""Gathered key slots (over batch, heads and rows) that one key-list chunk holds at a time."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_ids", "kv_ids"], meta_fields=["num_buckets"])
@dataclasses.dataclass(frozen=True, eq=False)
class Buckets:
    """A partition of queries and keys into buckets: query ``i`` sees key ``j`` iff their ids match.

    Args:
      q_ids: int ``[B, Hq, T]`` bucket of each query, in ``[0, num_buckets)``.
      kv_ids: int ``[B, Hkv, S]`` bucket of each key (query head ``h`` reads key head ``h // G``).
      num_buckets: static number of buckets.
    """

    q_ids: jax.Array
    kv_ids: jax.Array
    num_buckets: int

    def check(self, B: int, Hq: int, Hkv: int, T: int, S: int) -> None:
        """ValueError/TypeError naming the field and shapes when the ids don't fit q ``[B, T, Hq, ·]``."""
        for name, ids, want in (("q_ids", self.q_ids, (B, Hq, T)), ("kv_ids", self.kv_ids, (B, Hkv, S))):
            if tuple(ids.shape) != want:
                raise ValueError(f"Buckets.{name} has shape {tuple(ids.shape)}, expected {want} "
                                 f"for q [B={B}, T={T}, Hq={Hq}], k [S={S}, Hkv={Hkv}]")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise TypeError(f"Buckets.{name} must be integers, got {ids.dtype}")
        if not isinstance(self.num_buckets, int) or self.num_buckets < 1:
            raise ValueError(f"Buckets.num_buckets must be a positive int, got {self.num_buckets!r}")

    def dense(self, T: int, S: int) -> jax.Array:
        """Bool ``[B, Hq, T, S]``: the pairs this partition allows."""
        kv = jnp.repeat(self.kv_ids, self.q_ids.shape[1] // self.kv_ids.shape[1], axis=1)
        return self.q_ids[..., :, None] == kv[..., None, :]


@functools.partial(jax.tree_util.register_dataclass, data_fields=["indices"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class KeyLists:
    """The keys each query sees, by position.

    Args:
      indices: int ``[B, Hq, T, K]`` (or ``[B, Hq, 1, K]``: one list per head for every query) of key
        positions in ``[0, S)``; ``-1`` (or any id outside ``[0, S)``) marks an empty slot. Duplicates count once.
    """

    indices: jax.Array

    def check(self, B: int, Hq: int, Hkv: int, T: int, S: int) -> None:
        """ValueError/TypeError naming the shapes when the lists don't fit q ``[B, T, Hq, ·]``."""
        idx = self.indices
        if idx.ndim != 4 or idx.shape[:2] != (B, Hq) or idx.shape[2] not in (1, T):
            raise ValueError(f"KeyLists.indices has shape {tuple(idx.shape)}, expected [{B}, {Hq}, {T} or 1, K] "
                             f"for q [B={B}, T={T}, Hq={Hq}]")
        if not jnp.issubdtype(idx.dtype, jnp.integer):
            raise TypeError(f"KeyLists.indices must be integers, got {idx.dtype}")

    def dense(self, T: int, S: int) -> jax.Array:
        """Bool ``[B, Hq, T, S]``: the pairs the lists hold."""
        idx = self.indices
        hits = idx[..., None] == jnp.arange(S)
        return jnp.broadcast_to(hits.any(-2), idx.shape[:2] + (T, S))


Selection = Union[Buckets, KeyLists]


# ----------------------------------------------------------------------------- reference


def token_sparse_attention_reference(q, k, v, selection: Selection, *, mask: Optional[Mask] = None, scale=None,
                                     logits_soft_cap=None, return_lse: bool = False, **_):
    """Dense softmax attention under ``selection & mask`` (O(T·S) memory)."""
    allowed = masks.Explicit(selection.dense(q.shape[1], k.shape[1]))
    return softmax_attention_reference(q, k, v, mask=allowed if mask is None else allowed & mask, scale=scale,
                                       logits_soft_cap=logits_soft_cap, return_lse=return_lse)


# ----------------------------------------------------------------------------- buckets: sort, then tiles


def _inner_tile(inner: Mask, oq: jax.Array, ok: jax.Array, T: int, S: int) -> jax.Array:
    """``inner`` on original positions ``oq [B, H, tq]``, ``ok [B, H, tk]`` per (batch, head): ``[B, H, tq, tk]``."""
    if isinstance(inner, masks.Causal):
        return masks.query_positions(oq, T, S)[..., :, None] >= ok[..., None, :]
    per_head = jax.vmap(jax.vmap(lambda a, b: inner.tile(a, b, T, S)))(oq, ok)
    B, H = oq.shape[:2]
    b = jnp.arange(B)[:, None] if per_head.shape[2] > 1 else 0
    h = jnp.arange(H)[None, :] if per_head.shape[3] > 1 else 0
    return per_head[jnp.arange(B)[:, None], jnp.arange(H)[None, :], b, h]


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["q_ids", "kv_ids", "q_order", "kv_order", "inner"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False)
class SortedBuckets(Mask):
    """The fine mask of the sorted layout: same bucket, and ``inner`` on the original positions.

    ``q_ids``/``q_order`` int ``[B, Hq, T]`` and ``kv_ids``/``kv_order`` int ``[B, Hq, S]`` are the
    bucket ids in sorted order and each sorted row's original position; ``inner`` is the request's
    mask (or None). Its block summary says nothing (every tile partial): the lists come from the buckets.
    """

    q_ids: jax.Array
    kv_ids: jax.Array
    q_order: jax.Array
    kv_order: jax.Array
    inner: Optional[Mask]

    def tile(self, q_idx, kv_idx, T, S):
        def rows(x, idx):
            return jnp.take(x, idx, axis=2, mode="clip")

        same = rows(self.q_ids, q_idx)[..., :, None] == rows(self.kv_ids, kv_idx)[..., None, :]
        if self.inner is None:
            return same
        return same & _inner_tile(self.inner, rows(self.q_order, q_idx), rows(self.kv_order, kv_idx), T, S)

    def block_summary(self, T, S, block_q, block_kv):
        return jnp.full((1, 1, num_tiles(T, block_q), num_tiles(S, block_kv)), masks.PARTIAL, jnp.int8)


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q_pos", "kv_pos", "inner"],
                   meta_fields=["T", "S"])
@dataclasses.dataclass(frozen=True, eq=False)
class AlignedBuckets(Mask):
    """The fine mask of the tile-aligned layout (``bucket_layout(aligned=True)``), where each bucket
    starts on a tile boundary: a listed tile's rows and keys share one bucket, so only the padding
    slots (position ``-1``) and ``inner`` on the original positions remain to mask.

    ``q_pos`` int ``[B, Hq, Tp]`` and ``kv_pos`` int ``[B, Hkv, Sp]`` are the original position at
    each padded slot (``-1`` for padding; query head ``h`` reads key head ``h // G``); ``T``, ``S``
    the original lengths ``inner`` is evaluated at. Without ``inner`` a tile is ``[B, Hq, 1, tk]``
    (the same for every row). Every tile is partial: the lists come from the buckets.
    """

    q_pos: jax.Array
    kv_pos: jax.Array
    inner: Optional[Mask]
    T: int
    S: int

    def tile(self, q_idx, kv_idx, T, S):
        G = self.q_pos.shape[1] // self.kv_pos.shape[1]
        ok = jnp.repeat(jnp.take(self.kv_pos, kv_idx, axis=2, mode="clip"), G, axis=1)
        keys = (ok >= 0)[..., None, :]
        if self.inner is None:
            return keys
        oq = jnp.maximum(jnp.take(self.q_pos, q_idx, axis=2, mode="clip"), 0)
        return keys & _inner_tile(self.inner, oq, jnp.maximum(ok, 0), self.T, self.S)

    def block_summary(self, T, S, block_q, block_kv):
        return jnp.full((1, 1, num_tiles(T, block_q), num_tiles(S, block_kv)), masks.PARTIAL, jnp.int8)


def _along_time(x: jax.Array, order: jax.Array) -> jax.Array:
    """``x [B, L, H, E]`` with each head's rows taken in ``order [B, H, L']``: ``[B, L', H, E]``."""
    return jnp.take_along_axis(x, order.transpose(0, 2, 1)[..., None], axis=1)


def _per_head(fn, *args):
    """``fn`` on each (batch, head) row of ``[B, H, ...]`` arguments."""
    return jax.vmap(jax.vmap(fn))(*args)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["order", "ids", "starts", "offsets", "src", "dst"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class BucketLayout:
    """One side (queries or keys) of the sorted-bucket layout, per (batch, head).

    ``order``/``ids`` int32 ``[B, H, L]``: original position and bucket of each sorted row (by bucket,
    then position); ``starts`` int32 ``[B, H, nb + 1]``: each bucket's first sorted row (and ``L``);
    ``offsets`` int32 ``[B, H, nb]``: each bucket's first slot in the layout; ``src`` int32
    ``[B, H, Lp]``: the original position at each slot (``-1`` for padding); ``dst`` int32 ``[B, H, L]``:
    each original row's slot.
    """

    order: jax.Array
    ids: jax.Array
    starts: jax.Array
    offsets: jax.Array
    src: jax.Array
    dst: jax.Array


def sort_by_bucket(ids: jax.Array, num_buckets: int) -> tuple[jax.Array, jax.Array]:
    """``(order, sorted_ids)`` int32 ``[B, H, L]`` of ids int32 ``[B, H, L]`` in ``[0, num_buckets)``: rows
    sorted by (bucket, position). One sort of the key ``id·L + position`` (3.4x faster than a stable
    argsort on CPU at L = 8k), or the stable argsort when that key would overflow int32."""
    L = ids.shape[-1]
    if num_buckets * L >= 2 ** 31:
        order = jnp.argsort(ids, axis=-1, stable=True).astype(jnp.int32)
        return order, jnp.take_along_axis(ids, order, -1)
    key = jnp.sort(ids * L + jnp.arange(L, dtype=jnp.int32), axis=-1)
    return key % L, key // L


def bucket_layout(ids: jax.Array, num_buckets: int, *, block: int, aligned: bool) -> BucketLayout:
    """Sort each (batch, head)'s rows by (bucket, position); with ``aligned`` each bucket also starts on a
    ``block`` boundary (padding slots between buckets), in ``Lp = ⌈(L + nb·(block − 1)) / block⌉·block``
    slots; else ``Lp = L``.

    Cost: one sort, ``nb + 1`` binary searches and two scatters per (batch, head) (the inverse
    permutation ``dst`` is scattered, not sorted).

    Args:
      ids: int ``[B, H, L]`` in ``[0, num_buckets)``.
      num_buckets: ``nb``; block: tile size of the aligned layout; aligned: pad buckets to whole tiles.
    Returns:
      ``BucketLayout``.
    """
    B, H, L = ids.shape
    order, sorted_ids = sort_by_bucket(ids.astype(jnp.int32), num_buckets)
    starts = _per_head(lambda s: jnp.searchsorted(s, jnp.arange(num_buckets + 1, dtype=jnp.int32)),
                       sorted_ids).astype(jnp.int32)
    if aligned:
        padded = -(-jnp.diff(starts, axis=-1) // block) * block
        offsets = (jnp.cumsum(padded, axis=-1) - padded).astype(jnp.int32)
        length = num_tiles(L + num_buckets * (block - 1), block) * block
    else:
        offsets, length = starts[..., :-1], L
    shift = jnp.take_along_axis(offsets - starts[..., :-1], sorted_ids, -1)
    slots = shift + jnp.arange(L, dtype=jnp.int32)
    src = _per_head(lambda s, o: jnp.full((length,), -1, jnp.int32).at[s].set(o), slots, order)
    dst = _per_head(lambda o, s: jnp.zeros((L,), jnp.int32).at[o].set(s), order, slots)
    return BucketLayout(order, sorted_ids, starts, offsets, src, dst)


def bucket_block_lists(q_ids: jax.Array, kv_ids: jax.Array, q_order: jax.Array, kv_order: jax.Array, *,
                       num_buckets: int, causal: bool, S: int, block_q: int, block_kv: int) -> BlockSparse:
    """Block lists of the sorted layout: each sorted query tile lists the key tiles of its buckets.

    Args:
      q_ids, q_order: int ``[B, Hq, T]``, sorted bucket ids and each row's original position.
      kv_ids, kv_order: int ``[B, Hq, S]``, the same for keys (one copy per query head).
      num_buckets: ids lie in ``[0, num_buckets)``.
      causal: also stop at the tile's last query position (keys of a bucket are in position order);
        skipped, still exact, when ``num_buckets · (S + 1)`` overflows int32.
    Returns:
      ``BlockSparse`` ``[B, Hq, nq, nk]``: a contiguous range of key tiles per query tile.
    """
    T = q_ids.shape[-1]
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)

    def tiles(x):
        widths = [(0, 0)] * (x.ndim - 1) + [(0, nq * block_q - T)]
        return jnp.pad(x, widths, mode="edge").reshape(*x.shape[:-1], nq, block_q)

    search = jax.vmap(jax.vmap(jnp.searchsorted, (0, 0, None)), (0, 0, None))
    lo = search(kv_ids, tiles(q_ids).min(-1), "left")
    if causal and num_buckets * (S + 1) < 2 ** 31:
        def keyed(ids, pos):
            return ids * (S + 1) + pos

        last = tiles(keyed(q_ids, masks.query_positions(q_order, T, S))).max(-1)
        hi = search(keyed(kv_ids, kv_order), last, "right")
    else:
        hi = search(kv_ids, tiles(q_ids).max(-1), "right")
    first = lo // block_kv
    counts = jnp.maximum(-(-hi // block_kv) - first, 0).astype(jnp.int32)
    return _range_lists(first, counts, block_q, block_kv, nk, nk)


def _range_lists(first: jax.Array, counts: jax.Array, block_q: int, block_kv: int, nk: int,
                 width: int) -> BlockSparse:
    """``BlockSparse`` ``[B, H, nq, width]`` listing key tiles ``first + [0, counts)`` of ``nk``."""
    slot = jnp.minimum(jnp.arange(width), jnp.maximum(counts, 1)[..., None] - 1)
    indices = jnp.where(counts[..., None] > 0, first[..., None] + slot, 0).astype(jnp.int32)
    return BlockSparse(indices, counts.astype(jnp.int32), block_q, block_kv, nk)


def aligned_bucket_block_lists(q: BucketLayout, kv: BucketLayout, *, causal: bool, T: int, S: int, block_q: int,
                               block_kv: int, width: int) -> BlockSparse:
    """Block lists of the tile-aligned layout: a query tile (one bucket) lists its bucket's key tiles.

    Args:
      q, kv: ``bucket_layout(..., aligned=True)`` of the queries (``[B, Hq, ·]``, ``block_q``) and keys
        (``[B, Hkv, ·]``, ``block_kv``); query head ``h`` reads key head ``h // G``.
      causal: stop at the last key of the bucket at or before the tile's last query position
        (skipped, still exact, when ``nb · (S + 1)`` overflows int32).
      T, S: original lengths; width: list length (at least the padded key tiles ``Sp / block_kv``).
    Returns:
      ``BlockSparse`` ``[B, Hq, Tp / block_q, width]``: the range ``first + [0, count)`` per query tile;
      tiles of padding only list nothing.
    """
    B, Hq, Tp = q.src.shape
    Hkv, nb = kv.src.shape[1], kv.offsets.shape[-1]
    G, nq = Hq // Hkv, Tp // block_q
    q_sizes = jnp.diff(q.starts, axis=-1)
    tile_end = jnp.cumsum(-(-q_sizes // block_q), axis=-1)
    bucket = _per_head(lambda e: jnp.searchsorted(e, jnp.arange(nq), side="right"), tile_end)  # nb: padding

    def per_kv_head(x, at):
        """``x [B, Hkv, n]`` at query heads' ``at [B, Hq, nq]`` (head ``h`` reads ``h // G``)."""
        at = jnp.minimum(at, x.shape[-1] - 1).reshape(B, Hkv, G * nq)
        return jnp.take_along_axis(x, at, -1).reshape(B, Hq, nq)

    start = per_kv_head(kv.starts, bucket)
    end = per_kv_head(kv.starts, bucket + 1)
    if causal and nb * (S + 1) < 2 ** 31:
        pos = jnp.where(q.src >= 0, masks.query_positions(q.src, T, S), -1)
        last = jnp.clip(pos.reshape(B, Hq, nq, block_q).max(-1), -1, S - 1)
        keyed = (kv.ids * (S + 1) + kv.order)
        wanted = (jnp.minimum(bucket, nb - 1) * (S + 1) + last).reshape(B, Hkv, G * nq)
        end = jnp.minimum(end, _per_head(functools.partial(jnp.searchsorted, side="right"), keyed,
                                         wanted).reshape(B, Hq, nq))
    counts = jnp.where(bucket < nb, -(-(end - start) // block_kv), 0)
    first = per_kv_head(kv.offsets, bucket) // block_kv
    return _range_lists(first, counts, block_q, block_kv, kv.src.shape[-1] // block_kv, width)


ALIGNED_MIN_TILES = 2
"""The sorted-bucket path starts each bucket on a tile boundary (``bucket_layout(aligned=True)``) when
the expected bucket (``T / nb`` queries, ``S / nb`` keys) fills at least this many tiles; smaller
buckets would waste more padding than the unaligned layout's tiles shared by buckets."""


CAUSAL_STEP_FRACTION = 3
"""Under ``Causal()`` an aligned gather step is this fraction of an expected bucket: a bucket's query
tiles list from a few of its key tiles up to all of them (the frontier moves with their positions),
so a whole-bucket step would pad most lists (CPU, 8 buckets, T = 8k, forward, two runs at load 2.4-3.0:
0.35-0.36× dense causal against 0.39-0.40× with whole-bucket steps)."""


def aligned_steps(S: int, num_buckets: int, block_kv: int, *, causal: bool = False) -> int:
    """Key tiles per gather step of the aligned path: a bucket of ``n = S / nb`` expected keys, plus two
    standard deviations of a uniform draw (``2·√n``), so that one step covers most lists; under
    ``causal`` a ``CAUSAL_STEP_FRACTION``-th of that."""
    n = S / num_buckets
    tiles = math.ceil((n + 2 * math.sqrt(n)) / block_kv)
    return max(1, -(-tiles // CAUSAL_STEP_FRACTION) if causal else tiles)


def _buckets_xla(q, k, v, sel: Buckets, *, mask, scale, logits_soft_cap, return_lse, block_q, block_kv):
    T, S, nb = q.shape[1], k.shape[1], sel.num_buckets
    engine = dict(scale=scale, logits_soft_cap=logits_soft_cap, return_lse=True)
    causal = isinstance(mask, masks.Causal)
    aligned = T >= ALIGNED_MIN_TILES * nb * block_q and S >= ALIGNED_MIN_TILES * nb * block_kv
    ql = bucket_layout(sel.q_ids, nb, block=block_q, aligned=aligned)
    kl = bucket_layout(sel.kv_ids, nb, block=block_kv, aligned=aligned)
    qs, ks, vs = (_along_time(x, jnp.maximum(lay.src, 0)) for x, lay in ((q, ql), (k, kl), (v, kl)))
    if aligned:
        nk = kl.src.shape[-1] // block_kv
        step = min(nk, aligned_steps(S, nb, block_kv, causal=causal))
        blocks = aligned_bucket_block_lists(ql, kl, causal=causal, T=T, S=S, block_q=block_q, block_kv=block_kv,
                                            width=num_tiles(nk, step) * step)
        fine = AlignedBuckets(ql.src, kl.src, mask, T, S)
        out, lse = block_sparse_attention_xla(qs, ks, vs, blocks, mask=fine, keys_per_step=step * block_kv, **engine)
    else:
        G = q.shape[2] // k.shape[2]
        kv_ids, kv_order = (jnp.repeat(x, G, axis=1) if G > 1 else x for x in (kl.ids, kl.order))
        blocks = bucket_block_lists(ql.ids, kv_ids, ql.order, kv_order, num_buckets=nb, causal=causal, S=S,
                                    block_q=block_q, block_kv=block_kv)
        fine = SortedBuckets(ql.ids, kv_ids, ql.order, kv_order, mask)
        out, lse = block_sparse_attention_xla(qs, ks, vs, blocks, mask=fine, keys_per_step=KEYS_PER_STEP, **engine)
    out = _along_time(out, ql.dst)
    if not return_lse:
        return out
    return out, jnp.take_along_axis(lse, ql.dst.transpose(0, 2, 1), axis=1)


# ----------------------------------------------------------------------------- key lists: gather per chunk


def _distinct_slots(indices: jax.Array, S: int) -> tuple[jax.Array, jax.Array]:
    """``(ids, held)``: each list sorted, and whether a slot holds a key in ``[0, S)`` that no earlier slot holds."""
    ids = jnp.sort(indices, axis=-1)
    first = jnp.concatenate([jnp.ones_like(ids[..., :1], bool), ids[..., 1:] != ids[..., :-1]], -1)
    return ids, first & (ids >= 0) & (ids < S)


def _allowed_at(mask: Optional[Mask], rows: jax.Array, idx: jax.Array, T: int, S: int) -> jax.Array:
    """Bool ``[B, Hq, c, K]``: the slots of ``idx [B, Hq, c|1, K]`` that ``mask`` allows for ``rows [c]``."""
    shape = idx.shape[:2] + (rows.shape[0], idx.shape[-1])
    if mask is None:
        return jnp.ones(shape, bool)
    safe = jnp.clip(idx, 0, S - 1)
    if isinstance(mask, masks.Causal):
        return jnp.broadcast_to(masks.query_positions(rows, T, S)[:, None] >= safe, shape)

    def one(b, h, ids):
        if ids.shape[0] == 1:
            t = mask.tile(rows, ids[0], T, S)
        else:
            t = jnp.moveaxis(jax.vmap(lambda r, i: mask.tile(r[None], i, T, S)[:, :, 0])(rows, ids), 0, 2)
        return t[b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0]

    B, H = idx.shape[:2]
    return jax.vmap(jax.vmap(one, (None, 0, 0)), (0, None, 0))(jnp.arange(B), jnp.arange(H), safe)


def _key_lists_xla(q, k, v, sel: KeyLists, *, mask, scale, logits_soft_cap, return_lse, **_):
    B, T, Hq, D = q.shape
    S, G = k.shape[1], Hq // k.shape[2]
    idx, held = _distinct_slots(sel.indices.astype(jnp.int32), S)
    K = idx.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    chunk = max(1, min(T, ELEMENTS_PER_CHUNK // max(1, B * Hq * K)))
    n = num_tiles(T, chunk)
    qh = pad_axis(q.transpose(0, 2, 1, 3), 2, chunk)
    kh, vh = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    shared = idx.shape[2] == 1
    idx_rows, held_rows = (idx, held) if shared else (pad_axis(idx, 2, chunk), pad_axis(held, 2, chunk))
    bi, hi = jnp.arange(B)[:, None, None, None], (jnp.arange(Hq) // G)[None, :, None, None]

    @jax.checkpoint
    def one_chunk(c):
        rows = c * chunk + jnp.arange(chunk)
        ids, ok = (idx_rows, held_rows) if shared else (
            lax.dynamic_slice_in_dim(x, c * chunk, chunk, axis=2) for x in (idx_rows, held_rows))
        safe = jnp.clip(ids, 0, S - 1)
        kg, vg = kh[bi, hi, safe], vh[bi, hi, safe]
        qc = lax.dynamic_slice_in_dim(qh, c * chunk, chunk, axis=2).astype(jnp.float32)
        s = jnp.einsum("bhcd,bhckd->bhck", qc, kg.astype(jnp.float32)) * scale
        if logits_soft_cap is not None:
            s = logits_soft_cap * jnp.tanh(s / logits_soft_cap)
        ok = ok & _allowed_at(mask, rows, ids, T, S) & (rows < T)[:, None]
        s = jnp.where(ok, s, -jnp.inf)
        m = s.max(-1, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m)
        l = p.sum(-1, keepdims=True)
        o = jnp.einsum("bhck,bhcke->bhce", p, vg.astype(jnp.float32)) / jnp.where(l > 0, l, 1.0)
        return o, jnp.where(l[..., 0] > 0, m[..., 0] + jnp.log(jnp.where(l[..., 0] > 0, l[..., 0], 1.0)), -jnp.inf)

    o, lse = lax.map(one_chunk, jnp.arange(n))
    out = jnp.moveaxis(o, 0, 2).reshape(B, Hq, n * chunk, -1)[:, :, :T].transpose(0, 2, 1, 3).astype(q.dtype)
    if not return_lse:
        return out
    return out, jnp.moveaxis(lse, 0, 2).reshape(B, Hq, n * chunk)[:, :, :T].transpose(0, 2, 1)


# ----------------------------------------------------------------------------- key lists: block union + bitmask

WORD_BITS = 32
"""Keys per word of ``KeyBits`` (uint32 words)."""


@functools.partial(jax.tree_util.register_dataclass, data_fields=["bits"], meta_fields=[])
@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class KeyBits(Mask):
    """Each query row's listed keys as a packed bitmask: row ``t`` may see key ``s`` iff bit
    ``s % 32`` of word ``s // 32`` of ``bits[b, h, t]`` is set.

    Attributes:
      bits: uint32 ``[Bm, Hm, T | 1, ceil(S / 32)]`` (one row for every query when the axis has size 1).

    ``tile`` reads one word per pair (O(tq·tk) work, no list scan). ``block_summary`` says nothing
    (every tile PARTIAL): the block lists come from the key lists (``key_list_blocks``).
    """

    bits: jax.Array

    def __repr__(self) -> str:
        return f"KeyBits(bits={self.bits.dtype}{list(self.bits.shape)})"

    def check(self, batch: int, num_heads: int, T: int, S: int) -> None:
        shape, words = tuple(self.bits.shape), num_tiles(S, WORD_BITS)
        if (len(shape) != 4 or shape[0] not in (1, batch) or shape[1] not in (1, num_heads)
                or shape[2] not in (1, T) or shape[3] != words):
            raise ValueError(f"KeyBits.bits has shape {shape}, expected [1 or {batch}, 1 or {num_heads}, "
                             f"{T} or 1, {words}] for T={T}, S={S}")
        if self.bits.dtype != jnp.uint32:
            raise TypeError(f"KeyBits.bits must be uint32, got {self.bits.dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        rows = self.bits if self.bits.shape[2] == 1 else jnp.take(self.bits, q_idx, axis=2, mode="clip")
        safe = jnp.clip(kv_idx, 0, S - 1)
        words = jnp.take(rows, safe // WORD_BITS, axis=3)  # [Bm, Hm, tq | 1, tk]
        hit = (words >> (safe % WORD_BITS).astype(jnp.uint32)) & 1 == 1
        hit = hit & ((kv_idx >= 0) & (kv_idx < S))
        return jnp.broadcast_to(hit, hit.shape[:2] + (q_idx.shape[0], kv_idx.shape[0]))

    def block_summary(self, T, S, block_q, block_kv):
        return jnp.full((1, 1, num_tiles(T, block_q), num_tiles(S, block_kv)), masks.PARTIAL, jnp.int8)


BOOLEANS_PER_CHUNK = 2 ** 24
"""Row-by-key booleans (over batch and heads) that one step of ``key_bits_and_union`` sets and packs."""


def _row_chunk(num_rows: int, rows_per_tile: int, B: int, H: int, width: int) -> int:
    """Rows per step of ``key_bits_and_union``: whole tiles, about ``BOOLEANS_PER_CHUNK`` booleans.

    NotImplementedError when one tile's booleans over batch and heads don't fit int32 positions."""
    per_tile = B * H * rows_per_tile * width
    if per_tile >= 2 ** 31:
        raise NotImplementedError(f"key lists' block path: one query tile's B·H·block_q·S = {per_tile} row-key "
                                  "booleans overflow int32 positions; use key_path='gather' or fewer heads per call")
    tiles = max(1, BOOLEANS_PER_CHUNK // per_tile)
    return rows_per_tile * min(tiles, num_tiles(num_rows, rows_per_tile))


def key_bits_and_union(ids: jax.Array, held: jax.Array, S: int, *, block_q: int,
                       block_kv: int) -> tuple[jax.Array, jax.Array]:
    """Each row's held keys packed into bits, and the key blocks each query tile's rows hold.

    Rows are taken in chunks; a chunk's keys are set in a boolean ``[B, H, c, S]`` row block by one
    scatter (duplicates set the same element, so no sort is needed), then packed into uint32 words
    and reduced over ``block_q × block_kv`` tiles. Cost: ``R·K`` scattered writes plus ``R·S``
    booleans streamed; memory one chunk (about ``BOOLEANS_PER_CHUNK`` booleans) plus the bits.

    Args:
      ids: int ``[B, H, R, K]`` key positions; held: bool, same shape (slots that count; an id outside
        ``[0, S)`` must not be held).
      S: number of keys; block_q: rows per query tile (``R`` rows form ``ceil(R / block_q)`` tiles);
        block_kv: keys per key block.
    Returns:
      ``(bits, union)``: uint32 ``[B, H, R, ceil(S/32)]`` (``KeyBits``) and bool ``[B, H, ceil(R/block_q),
      ceil(S/block_kv)]``.
    """
    B, H, R, _ = ids.shape
    words, nk = num_tiles(S, WORD_BITS), num_tiles(S, block_kv)
    unit = math.lcm(WORD_BITS, block_kv)
    width = num_tiles(S, unit) * unit
    chunk = _row_chunk(R, block_q, B, H, width)
    steps = num_tiles(R, chunk)
    held = pad_axis(held, 2, chunk)  # padded rows hold no key
    ids = jnp.where(held, pad_axis(ids, 2, chunk), width)  # slots not held fall outside every row: dropped
    ids = ids.reshape(B, H, steps, chunk, -1)
    row_base = (jnp.arange(B * H * chunk, dtype=jnp.int32) * width).reshape(B, H, chunk, 1)
    shifts = jnp.arange(WORD_BITS, dtype=jnp.uint32)

    def one(ids_c):
        flat = jnp.where(ids_c < width, row_base + ids_c, B * H * chunk * width).reshape(-1)
        hit = jnp.zeros(B * H * chunk * width, bool).at[flat].set(True, mode="drop").reshape(B, H, chunk, width)
        bits = (hit.reshape(B, H, chunk, -1, WORD_BITS).astype(jnp.uint32) << shifts).sum(-1, dtype=jnp.uint32)
        union = hit.reshape(B, H, chunk // block_q, block_q, -1, block_kv).any((3, 5))
        return bits, union

    bits, union = lax.map(one, jnp.moveaxis(ids, 2, 0))
    bits = jnp.moveaxis(bits, 0, 2).reshape(B, H, steps * chunk, -1)[:, :, :R, :words]
    union = jnp.moveaxis(union, 0, 2).reshape(B, H, -1, width // block_kv)[:, :, :num_tiles(R, block_q), :nk]
    return bits, union


def key_list_blocks(selection: KeyLists, T: int, S: int, *, mask: Optional[Mask], block_q: int,
                    block_kv: int) -> tuple[BlockSparse, Mask]:
    """Block lists and fine mask that run ``selection & mask`` exactly on the block-sparse engine.

    Query tile ``(b, h, i)`` lists the union of the key blocks its rows' keys lie in (as per-token
    MoBA's ``TokenBlocks.union``), cut to the blocks ``mask`` allows; the fine mask is the rows' keys
    as a packed bitmask (``KeyBits``), both from ``key_bits_and_union``. With one list per query row
    the request's mask is folded into the bits (keys it forbids are dropped before the union, so
    under ``Causal()`` a tile lists no block past its last query); with one list per head the fine
    mask is ``KeyBits & mask``. Duplicates count once; ids outside ``[0, S)`` are empty slots.

    Args:
      selection: ``KeyLists`` ``[B, Hq, T | 1, K]``.
      T, S: query and key lengths; mask: the request's mask or None.
      block_q, block_kv: the engine's tiles.
    Returns:
      ``(blocks, fine)``: ``BlockSparse [B, Hq, nq, min(nk, block_q·K)]`` (``min(nk, K)`` for
      per-head lists) and the fine mask. Memory: the bitmask is ``T·S/8`` bytes per (batch, head).
    """
    idx = selection.indices.astype(jnp.int32)
    B, H, R, K = idx.shape
    shared = R == 1
    held = (idx >= 0) & (idx < S)
    if not shared:
        held = held & _allowed_at(mask, jnp.arange(T), idx, T, S)
    bits, union = key_bits_and_union(idx, held, S, block_q=1 if shared else block_q, block_kv=block_kv)
    fine = KeyBits(bits)
    if shared and mask is not None:
        fine = fine & mask
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    union = jnp.broadcast_to(union, (B, H, nq, nk)) & allowed_blocks(mask, T, S, block_q, block_kv)
    return from_block_mask(union, block_q, block_kv, max_blocks=min(nk, K if shared else block_q * K)), fine


KEY_LIST_KEYS_PER_STEP = 256
"""Keys per gather step of the key lists' block path: a union's count is known only at run time and
the lists are padded to ``nk``, so short steps waste fewer slots past it (CPU, T = 4k, K = 512,
causal, vs 1024: forward 1.12x against 1.28x dense for local lists, 2.17x against 2.40x for uniform
ones; forward + backward on local lists 0.51x against 0.66x dense)."""


def _key_lists_blocks(q, k, v, sel: KeyLists, *, mask, scale, logits_soft_cap, return_lse, block_q, block_kv):
    blocks, fine = key_list_blocks(sel, q.shape[1], k.shape[1], mask=mask, block_q=block_q, block_kv=block_kv)
    return block_sparse_attention_xla(q, k, v, blocks, mask=fine, scale=scale, logits_soft_cap=logits_soft_cap,
                                      return_lse=return_lse, keys_per_step=KEY_LIST_KEYS_PER_STEP)


GATHER_COST_RATIO = 16.0
"""Listed tile pairs of the block path that cost as much as one gathered key-list slot, whole calls
compared (the block path's list building included). Measured on CPU, T = 4k, D = 64, uniform lists
(so the block union is dense): 16 in the forward at K = 512 (21 at K = 64), 15 in forward + backward."""


RUNTIME_CHOICE_MIN_TILES = 8
"""Query tiles from which ``key_path="auto"`` decides an ambiguous case at run time (below, the static
rule alone: both paths would be compiled for a difference of a few tiles)."""


def choose_key_path(K: int, T: int, S: int, *, shared: bool, mask: Optional[Mask], block_q: int,
                    block_kv: int) -> str:
    """The static part of ``key_path="auto"``: "blocks" when even the densest block union costs no more
    than the gathers, ``worst ≤ GATHER_COST_RATIO · T·K``; else "runtime" (decide on the actual union,
    from ``RUNTIME_CHOICE_MIN_TILES`` query tiles on) or, for fewer tiles, "gather".

    ``worst`` is the tile pairs of the largest union the lists can make: per query tile, the key
    blocks ``mask`` may allow (``static_allowed_blocks``), at most ``block_q·K`` (``K`` for one
    list per head), times ``block_q·block_kv``, for the (batch, head) with the most. For ``T = S``
    and 64-wide tiles "blocks" is ``K ≥ S/16`` (``K ≥ S/32`` under ``Causal()``).
    """
    allowed = static_allowed_blocks(mask, T, S, block_q, block_kv)
    per_tile = np.minimum(allowed.sum(-1), K if shared else block_q * K)
    worst = int(per_tile.sum(-1).max(initial=0)) * block_q * block_kv
    if worst <= GATHER_COST_RATIO * T * K:
        return "blocks"
    return "runtime" if num_tiles(T, block_q) >= RUNTIME_CHOICE_MIN_TILES else "gather"


def _key_lists_auto(q, k, v, sel: KeyLists, *, mask, scale, logits_soft_cap, return_lse, block_q, block_kv):
    """``choose_key_path``; its "runtime" answer builds the block lists and takes them (``lax.cond``)
    while ``Σ counts · block_q · block_kv ≤ GATHER_COST_RATIO · B·Hq·T·K``, else gathers (both compiled)."""
    B, T, Hq, _ = q.shape
    K, shared = sel.indices.shape[-1], sel.indices.shape[2] == 1
    kwargs = dict(mask=mask, scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
                  block_q=block_q, block_kv=block_kv)
    path = choose_key_path(K, T, k.shape[1], shared=shared, mask=mask, block_q=block_q, block_kv=block_kv)
    if path != "runtime":
        return _KEY_PATHS[path](q, k, v, sel, **kwargs)
    blocks, fine = key_list_blocks(sel, T, k.shape[1], mask=mask, block_q=block_q, block_kv=block_kv)
    listed = jnp.sum(blocks.counts, dtype=jnp.float32) * (block_q * block_kv)
    engine = dict(scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse)
    return lax.cond(listed <= GATHER_COST_RATIO * float(B * Hq * T * K),
                    lambda: block_sparse_attention_xla(q, k, v, blocks, mask=fine, keys_per_step=KEY_LIST_KEYS_PER_STEP,
                                                       **engine),
                    lambda: _key_lists_xla(q, k, v, sel, **kwargs))


KEY_LIST_PATHS = ("auto", "blocks", "gather")
"""How the ``xla`` path runs ``KeyLists``: "blocks" (block union + bitmask on the block-sparse engine),
"gather" (per-query gathers) or "auto" (``choose_key_path``)."""

_KEY_PATHS = {"auto": _key_lists_auto, "blocks": _key_lists_blocks, "gather": _key_lists_xla}


DEFAULT_BLOCK = 64
"""Tiles of the key lists' block path and the sorted-bucket path's key tiles when none are given."""

BUCKET_BLOCKS_Q = (64, 128, 256)
"""Query tiles the sorted-bucket path chooses from when none is given (``bucket_tiles``)."""


def bucket_tiles(T: int, num_buckets: int) -> tuple[int, int]:
    """Default ``(block_q, block_kv)`` of the sorted-bucket path: ``block_kv = DEFAULT_BLOCK``; ``block_q``
    the largest of ``BUCKET_BLOCKS_Q`` that is at most a quarter of an expected bucket (``T / nb``
    queries): the aligned layout's padding (about ``block_q / 2`` rows per bucket) stays near 1/8 of
    the rows while each gathered key tile serves more rows. Measured (CPU, 8 random buckets, density
    1/8, B = 1, H = 4, D = 64, load 2.6-4.3 on 2 cores, ratios to dense in one loop): T = 16k forward
    0.18× dense at ``block_q = 256``, 0.20× at 128, 0.22× at 64; T = 8k forward 0.204× at 256, 0.211× at
    128, 0.25× at 64; forward + backward 0.140× at 256, 0.151× at 128, 0.16-0.18× at 64.
    """
    fits = [b for b in BUCKET_BLOCKS_Q if 4 * b * num_buckets <= T]
    return (max(fits) if fits else BUCKET_BLOCKS_Q[0]), DEFAULT_BLOCK


def token_sparse_attention_xla(q, k, v, selection: Selection, *, mask: Optional[Mask] = None, scale=None,
                               logits_soft_cap=None, return_lse: bool = False, block_q: Optional[int] = None,
                               block_kv: Optional[int] = None, key_path: str = "auto"):
    """The sorted-bucket path, or for ``KeyLists`` the ``key_path`` (see the module docstring for the costs).

    Args and returns as ``token_sparse_attention``. Raises ValueError for a ``key_path`` not in ``KEY_LIST_PATHS``.
    """
    if key_path not in KEY_LIST_PATHS:
        raise ValueError(f"key_path must be one of {KEY_LIST_PATHS}, got {key_path!r}")
    if isinstance(selection, Buckets):
        run, default = _buckets_xla, bucket_tiles(q.shape[1], selection.num_buckets)
    else:
        run, default = _KEY_PATHS[key_path], (DEFAULT_BLOCK, DEFAULT_BLOCK)
    tiles = dict(block_q=default[0] if block_q is None else block_q,
                 block_kv=default[1] if block_kv is None else block_kv)
    return run(q, k, v, selection, mask=mask, scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse,
               **tiles)


def pair_density(selection: Selection, T: int, S: int, *, causal: bool) -> float:
    """Selected (query, key) pairs over the pairs dense attention computes (all ``T·S``, or the
    bottom-right causal triangle), averaged over batch and query heads: what the selection keeps.

    Memory: ``[B, Hkv, S, num_buckets]`` running counts for ``Buckets``, ``[B, Hq, T, K]`` flags for ``KeyLists``.
    """
    pos = masks.query_positions(jnp.arange(T), T, S)
    if isinstance(selection, Buckets):
        G = selection.q_ids.shape[1] // selection.kv_ids.shape[1]
        counts = jnp.cumsum(jax.nn.one_hot(selection.kv_ids, selection.num_buckets, dtype=jnp.int32), axis=2)
        counts = jnp.repeat(counts, G, axis=1)
        upto = jnp.clip(pos, -1, S - 1) if causal else jnp.full((T,), S - 1)
        seen = jnp.take_along_axis(counts[:, :, jnp.maximum(upto, 0)], selection.q_ids[..., None], -1)[..., 0]
        pairs = jnp.where(upto >= 0, seen, 0).sum(-1)
    else:
        ids, held = _distinct_slots(selection.indices, S)
        allowed = _allowed_at(masks.Causal() if causal else None, jnp.arange(T), ids, T, S)
        pairs = (held & allowed).sum((-2, -1))
    dense = int(jnp.clip(pos + 1, 0, S).sum()) if causal else T * S
    return float(pairs.mean()) / dense


_PATHS = {"reference": token_sparse_attention_reference, "xla": token_sparse_attention_xla}


@accepts_explicit_meshes
def token_sparse_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, selection: Selection, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
    block_q: Optional[int] = None, block_kv: Optional[int] = None, implementation: str = "auto",
    key_path: str = "auto",
):
    """Softmax attention restricted to the keys a token-level selection allows.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      selection: ``Buckets`` (a partition of queries and keys) or ``KeyLists`` (each query's keys).
      mask: optional ``attnjax.masks`` value applied pair by pair on the original positions.
      scale: logit scale, default ``1/sqrt(D)``; logits_soft_cap: ``cap·tanh(s/cap)``.
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]``.
      block_q, block_kv: tiles of the sorted-bucket path and of the key lists' block path; None: 64, and
        for ``Buckets`` a query tile chosen from the expected bucket size (``bucket_tiles``).
      implementation: "reference", "xla" or "auto".
      key_path: how ``xla`` runs ``KeyLists``: "blocks", "gather" or "auto" (``choose_key_path``).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse)``. Rows with no allowed key are 0.
    """
    check_qkv(q, k, v)
    if not isinstance(selection, (Buckets, KeyLists)):
        raise TypeError(f"selection must be attnjax.sparse.Buckets or KeyLists, got {type(selection).__name__}")
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    selection.check(B, Hq, Hkv, T, S)
    if mask is not None:
        mask.check(B, Hq, T, S)
    kwargs = dict(mask=mask, scale=scale, logits_soft_cap=logits_soft_cap, return_lse=return_lse, block_q=block_q,
                  block_kv=block_kv, key_path=key_path)
    return dispatch(_PATHS, implementation, q, k, v, selection, what="token-sparse attention", **kwargs)


class TokenSelector:
    """Base class of registered token selectors (decorate subclasses with ``registry.register``).

    A subclass is a frozen dataclass with class attributes ``name`` and ``paper`` and a method
    ``select(q, k, *, mask) -> Buckets | KeyLists``; it inherits the engine's paths, so
    ``attnjax.attention(q, k, v, mechanism=Selector(...))`` runs attention restricted to its choice.
    Fields ``block_q``/``block_kv``, when present, set the sorted-bucket tiles.
    """

    family: ClassVar[str] = "sparse"
    supports: ClassVar[frozenset] = frozenset({"mask", "logits_soft_cap", "return_lse", "gqa", "cross"})
    decodes: ClassVar[bool] = False
    sequence_parallel: ClassVar[tuple] = ()

    def select(self, q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None) -> Selection:
        """The token selection for these queries and keys."""
        raise NotImplementedError(f"{type(self).__name__} must implement select()")

    def implementations(self):
        return {name: functools.partial(routed_attention, self, name) for name in PATHS}


def routed_attention(selector: TokenSelector, implementation: str, q, k, v, *, mask=None, scale=None,
                     logits_soft_cap=None, return_lse=False):
    """``attnjax.attention`` signature (after the two bound arguments): ``selector.select``, then the engine."""
    tiles = {f: getattr(selector, f) for f in ("block_q", "block_kv") if hasattr(selector, f)}
    return token_sparse_attention(q, k, v, selector.select(q, k, mask=mask), mask=mask, scale=scale,
                                  logits_soft_cap=logits_soft_cap, return_lse=return_lse,
                                  implementation=implementation, **tiles)


__all__ = ["ALIGNED_MIN_TILES", "AlignedBuckets", "BucketLayout", "Buckets", "KEY_LIST_PATHS", "KeyBits", "KeyLists",
           "Selection", "SortedBuckets", "TokenSelector", "aligned_bucket_block_lists", "aligned_steps",
           "bucket_block_lists", "bucket_layout", "bucket_tiles", "choose_key_path", "key_bits_and_union",
           "key_list_blocks", "pair_density", "routed_attention", "sort_by_bucket", "token_sparse_attention",
           "token_sparse_attention_reference", "token_sparse_attention_xla"]
