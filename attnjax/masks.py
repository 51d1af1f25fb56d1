"""Attention masks as values.

A mask is a predicate ``allowed(b, h, i, j)`` on query row ``i`` and key column ``j``. Masks are
small frozen pytrees, not ``[T, S]`` arrays: the reference asks a mask for its dense matrix, a
blocked kernel asks it for one tile at a time and for a *block summary* that says which tiles are
empty, partial or full, so that empty tiles are skipped and full tiles skip the element mask.

Alignment when ``T != S`` (one rule for the whole library): queries are the **last** ``T`` of the
``S`` key positions ("bottom-right" alignment, as in FlashAttention 2.1+ and KV-cache decoding).
Query row ``i`` sits at position ``i + (S - T)``; key column ``j`` sits at position ``j``. So
``Causal()`` with ``T=1`` lets the single query see every key, and with ``T == S`` it is the usual
lower triangle. Structural masks (``Causal``, ``SlidingWindow``, ``ChunkedCausal``) are defined on
these positions; data masks (``Segments``, ``Lengths``, ``Explicit``) are indexed by row and column.

Masks combine with ``&`` (both allow) and ``|`` (either allows)::

    mask = masks.Causal() & masks.Segments(segment_ids)
    mask = masks.SlidingWindow(128, 0) | masks.Explicit(global_tokens)
    mask = masks.Causal() & masks.from_lengths(kv_lengths=lengths)  # padding, as jax.nn's *_seq_lengths
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.tiling import check_broadcastable, num_tiles, rank4, take_tile

EMPTY, PARTIAL, FULL = 0, 1, 2
"""Block-summary codes: no pair allowed / some pairs allowed / every pair allowed."""

Array = jax.Array
Summary = Union[np.ndarray, jax.Array]


def query_positions(q_idx: Array, T: int, S: int) -> Array:
    """Positions of query rows under bottom-right alignment: ``i + (S - T)``."""
    return q_idx + (S - T)


class Mask:
    """Base class of all masks.

    Subclasses implement ``tile`` and ``block_summary``; ``dense`` and the operators come free.
    """

    def tile(self, q_idx: Array, kv_idx: Array, T: int, S: int) -> Array:
        """Booleans for query rows ``q_idx`` [tq] and key columns ``kv_idx`` [tk].

        Returns an array of shape ``[Bm, Hm, tq, tk]`` broadcastable to ``[B, H, tq, tk]``.
        """
        raise NotImplementedError

    def block_summary(self, T: int, S: int, block_q: int, block_kv: int) -> Summary:
        """Per-tile codes EMPTY / PARTIAL / FULL, shape ``[Bm, Hm, ceil(T/bq), ceil(S/bk)]``.

        Only the valid (unpadded) part of a tile counts. The summary is *sound*: EMPTY means no
        allowed pair in the tile and FULL means all pairs allowed; PARTIAL promises nothing.
        Structural masks return a NumPy array (known at trace time), data masks a jax array.
        """
        raise NotImplementedError

    def check(self, batch: int, num_heads: int, T: int, S: int) -> None:
        """Raise ``ValueError`` if the mask's arrays don't fit ``[batch, num_heads, T, S]``."""

    def dense(self, T: int, S: int) -> Array:
        """The boolean matrix, shape ``[Bm, Hm, T, S]`` broadcastable to ``[B, H, T, S]``."""
        return self.tile(jnp.arange(T), jnp.arange(S), T, S)

    def __and__(self, other: Mask) -> Mask:
        return And(self, _as_mask(other))

    def __or__(self, other: Mask) -> Mask:
        return Or(self, _as_mask(other))


def _as_mask(m) -> Mask:
    if not isinstance(m, Mask):
        raise TypeError(f"masks combine only with masks, got {type(m).__name__}")
    return m


def _static(cls):
    """Register a mask whose fields are all static (hashable Python values)."""
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=[], meta_fields=fields)


def _data(cls):
    """Register a mask whose fields are all pytree children (arrays or masks); its repr shows arrays by
    dtype and shape only, so error messages that name the mask never embed array values."""
    cls = dataclasses.dataclass(frozen=True, eq=False, repr=False)(cls)
    cls.__repr__ = _short_repr
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


def _short_repr(mask: Mask) -> str:
    """``Name(field=value, ...)`` with each array written as ``dtype[shape]``."""
    def describe(x):
        return f"{x.dtype}{list(x.shape)}" if hasattr(x, "shape") and hasattr(x, "dtype") else repr(x)
    fields = ", ".join(f"{f.name}={describe(getattr(mask, f.name))}" for f in dataclasses.fields(mask))
    return f"{type(mask).__name__}({fields})"


def _tile_ranges(T: int, S: int, block_q: int, block_kv: int):
    """First/last valid query position per q tile, and first/last key position per kv tile."""
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    qa = np.arange(nq) * block_q
    qb = np.minimum(qa + block_q, T) - 1
    ka = np.arange(nk) * block_kv
    kb = np.minimum(ka + block_kv, S) - 1
    off = S - T
    return (qa + off)[:, None], (qb + off)[:, None], ka[None, :], kb[None, :]


def _codes(empty: np.ndarray, full: np.ndarray) -> np.ndarray:
    code = np.where(empty, EMPTY, np.where(full, FULL, PARTIAL)).astype(np.int8)
    return code[None, None]


@_static
class Full(Mask):
    """Every query sees every key."""

    def tile(self, q_idx, kv_idx, T, S):
        return jnp.ones((1, 1, q_idx.shape[0], kv_idx.shape[0]), bool)

    def block_summary(self, T, S, block_q, block_kv):
        shape = (1, 1, num_tiles(T, block_q), num_tiles(S, block_kv))
        return np.full(shape, FULL, np.int8)


@_static
class Causal(Mask):
    """Query at position ``p`` sees keys at positions ``<= p`` (bottom-right aligned)."""

    def tile(self, q_idx, kv_idx, T, S):
        qp = query_positions(q_idx, T, S)
        return (qp[:, None] >= kv_idx[None, :])[None, None]

    def block_summary(self, T, S, block_q, block_kv):
        qa, qb, ka, kb = _tile_ranges(T, S, block_q, block_kv)
        return _codes(empty=ka > qb, full=kb <= qa)


@_static
class SlidingWindow(Mask):
    """Query at position ``p`` sees keys in ``[p - left, p + right]``.

    ``left``/``right`` count keys before/after the query; ``None`` means unbounded. So
    ``SlidingWindow(w, 0)`` is causal attention over the ``w + 1`` most recent keys, matching
    ``jax.nn.dot_product_attention(local_window_size=(left, right))``.
    """

    left: Optional[int] = None
    right: Optional[int] = None

    def __post_init__(self):
        for name in ("left", "right"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                shown = value if isinstance(value, int) else type(value).__name__
                raise ValueError(f"SlidingWindow.{name} must be a non-negative int or None, got {shown!r}")

    def _bounds(self):
        left = math.inf if self.left is None else self.left
        right = math.inf if self.right is None else self.right
        return left, right

    def tile(self, q_idx, kv_idx, T, S):
        qp = query_positions(q_idx, T, S)[:, None]
        kp = kv_idx[None, :]
        ok = jnp.ones((qp.shape[0], kp.shape[1]), bool)
        if self.left is not None:
            ok &= kp >= qp - self.left
        if self.right is not None:
            ok &= kp <= qp + self.right
        return ok[None, None]

    def block_summary(self, T, S, block_q, block_kv):
        qa, qb, ka, kb = _tile_ranges(T, S, block_q, block_kv)
        left, right = self._bounds()
        empty = (ka > qb + right) | (kb < qa - left)
        full = (kb <= qa + right) & (ka >= qb - left)
        return _codes(empty, full)


@_static
class ChunkedCausal(Mask):
    """Causal attention inside consecutive chunks of ``chunk`` positions (Llama 4 style).

    Query at position ``p`` sees keys at positions ``k <= p`` with ``k // chunk == p // chunk``.
    """

    chunk: int

    def __post_init__(self):
        if not isinstance(self.chunk, int) or self.chunk <= 0:
            raise ValueError(f"ChunkedCausal.chunk must be a positive int, got {self.chunk!r}")

    def tile(self, q_idx, kv_idx, T, S):
        qp = query_positions(q_idx, T, S)[:, None]
        kp = kv_idx[None, :]
        return ((kp <= qp) & (kp // self.chunk == qp // self.chunk))[None, None]

    def block_summary(self, T, S, block_q, block_kv):
        qa, qb, ka, kb = _tile_ranges(T, S, block_q, block_kv)
        c = self.chunk
        empty = (ka > qb) | (kb // c < qa // c) | (ka // c > qb // c)
        same_chunk = (qa // c == qb // c) & (ka // c == kb // c) & (qa // c == ka // c)
        return _codes(empty, (kb <= qa) & same_chunk)


@_data
class Segments(Mask):
    """Packed variable-length sequences: query and key see each other iff their ids are equal.

    Args:
      q_segment_ids: int ``[B, T]``.
      kv_segment_ids: int ``[B, S]``; defaults to ``q_segment_ids`` (self-attention).
    Combine with ``Causal()`` for causal packing.
    """

    q_segment_ids: Array
    kv_segment_ids: Optional[Array] = None

    def kv_ids(self) -> Array:
        """The key segment ids ``[Bs, S]``: ``kv_segment_ids``, or the query ids for self-attention."""
        return self.q_segment_ids if self.kv_segment_ids is None else self.kv_segment_ids

    def check(self, batch, num_heads, T, S):
        for name, ids, length in (("q_segment_ids", self.q_segment_ids, T), ("kv_segment_ids", self.kv_ids(), S)):
            if ids.ndim != 2 or ids.shape[0] not in (1, batch) or ids.shape[1] != length:
                raise ValueError(
                    f"Segments.{name} has shape {tuple(ids.shape)}, expected ({batch}, {length}) "
                    f"for batch={batch}, T={T}, S={S}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise TypeError(f"Segments.{name} must be integers, got {ids.dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        qs = jnp.take(self.q_segment_ids, q_idx, axis=1, mode="clip")
        ks = jnp.take(self.kv_ids(), kv_idx, axis=1, mode="clip")
        return (qs[:, :, None] == ks[:, None, :])[:, None]

    def block_summary(self, T, S, block_q, block_kv):
        qmin, qmax = _tile_min_max(self.q_segment_ids, block_q)
        kmin, kmax = _tile_min_max(self.kv_ids(), block_kv)
        qmin, qmax = qmin[:, :, None], qmax[:, :, None]
        kmin, kmax = kmin[:, None, :], kmax[:, None, :]
        empty = (qmax < kmin) | (kmax < qmin)
        full = (qmin == qmax) & (kmin == kmax) & (qmin == kmin)
        code = jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int8)
        return code[:, None]


def _tile_min_max(ids: Array, block: int):
    """Per-tile min and max of ``ids`` [B, L]; the last tile is padded with its edge value."""
    n = num_tiles(ids.shape[1], block)
    padded = jnp.pad(ids, ((0, 0), (0, n * block - ids.shape[1])), mode="edge")
    tiles = padded.reshape(ids.shape[0], n, block)
    return tiles.min(-1), tiles.max(-1)


@_data
class Lengths(Mask):
    """Padding from sequence lengths, the value ``from_lengths`` returns (build it there: it checks).

    Row ``t`` of batch ``b`` is a real query iff ``t < q_lengths[b]`` and column ``s`` a real key iff
    ``s < kv_lengths[b]``; a pair is allowed iff both are real. ``None`` means every row (column) is real.

    Attributes:
      q_lengths: int ``[Bl]`` or None.
      kv_lengths: int ``[Bl]`` or None (``Bl`` in ``{1, B}``).
    """

    q_lengths: Optional[Array] = None
    kv_lengths: Optional[Array] = None

    def check(self, batch, num_heads, T, S):
        for name, lengths in (("q_lengths", self.q_lengths), ("kv_lengths", self.kv_lengths)):
            if lengths is not None and _checked_lengths(name, lengths).shape[0] not in (1, batch):
                raise ValueError(f"from_lengths: {name} has shape {tuple(jnp.shape(lengths))}, expected "
                                 f"({batch},) for batch={batch}")

    def tile(self, q_idx, kv_idx, T, S):
        real_q = _below(q_idx, self.q_lengths)
        real_k = _below(kv_idx, self.kv_lengths)
        return (real_q[:, :, None] & real_k[:, None, :])[:, None]

    def block_summary(self, T, S, block_q, block_kv):
        q_any, q_all = _tiles_below(T, block_q, self.q_lengths)
        k_any, k_all = _tiles_below(S, block_kv, self.kv_lengths)
        empty = ~(q_any[:, :, None] & k_any[:, None, :])
        full = q_all[:, :, None] & k_all[:, None, :]
        code = jnp.where(empty, EMPTY, jnp.where(full, FULL, PARTIAL)).astype(jnp.int8)
        return code[:, None]

    def segments(self, T: int, S: int) -> Segments:
        """The same mask as ``Segments`` ids ``[Bl, T]``, ``[Bl, S]``, for paths that evaluate segment ids.

        Real queries and keys get id 1, padded queries 2 and padded keys 0, so padding matches nothing.
        """
        q_ids = jnp.where(_below(jnp.arange(T), self.q_lengths), 1, 2)
        kv_ids = jnp.where(_below(jnp.arange(S), self.kv_lengths), 1, 0)
        return Segments(q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32))


def _below(idx: Array, lengths: Optional[Array]) -> Array:
    """``idx < lengths[b]`` as bool ``[Bl, n]`` (``[1, n]`` of True when ``lengths`` is None)."""
    if lengths is None:
        return jnp.ones((1, idx.shape[0]), bool)
    return idx[None, :] < jnp.asarray(lengths)[:, None]


def _tiles_below(length: int, block: int, lengths: Optional[Array]):
    """Per tile of ``length`` rows: whether any / every row index is below ``lengths[b]``, ``[Bl, n]``."""
    first = np.arange(num_tiles(length, block)) * block
    last = np.minimum(first + block, length) - 1
    return _below(jnp.asarray(first), lengths), _below(jnp.asarray(last), lengths)


def _checked_lengths(name: str, lengths) -> Array:
    """``lengths`` as an array, or raise unless it is rank-1 integers."""
    lengths = jnp.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"from_lengths: {name} must have shape [B], got shape {tuple(lengths.shape)}")
    if not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise TypeError(f"from_lengths: {name} must be integers, got dtype {lengths.dtype}")
    return lengths


def from_lengths(q_lengths: Optional[Array] = None, kv_lengths: Optional[Array] = None) -> Mask:
    """Padding from per-example lengths, as ``jax.nn.dot_product_attention(query_seq_lengths=,
    key_value_seq_lengths=)``.

    Key ``s`` of example ``b`` is allowed iff ``s < kv_lengths[b]``; query rows ``t >= q_lengths[b]``
    are padding and see no key, so their output is 0 (and gives zero gradients), as in ``jax.nn``.
    Rows and columns are counted from the start (no bottom-right offset). Combine with ``&``/``|``
    like any mask, e.g. ``Causal() & from_lengths(kv_lengths=lens)`` or ``& Segments(ids)``.

    The value is a ``Lengths`` mask: its tiles compare indices with the lengths (no ``[B, T, S]``
    array), and its block summary is exact, so blocked paths skip tiles that are all padding for
    every example (as they skip ``Segments`` tiles). The Pallas kernels evaluate it as
    ``Lengths.segments`` ids (two int32 arrays ``[B, T]``, ``[B, S]``, the cost of ``Segments``).

    Args:
      q_lengths: int ``[B]`` (or ``[1]``), the number of real query rows; None: all ``T``.
      kv_lengths: int ``[B]`` (or ``[1]``), the number of real keys; None: all ``S``.

    Returns:
      ``Lengths(q_lengths, kv_lengths)``, or ``Full()`` when both are None.

    Raises:
      ValueError: a lengths array that is not rank 1, or two batch sizes that differ.
      TypeError: lengths that are not integers.
    """
    checked = {name: _checked_lengths(name, lengths)
               for name, lengths in (("q_lengths", q_lengths), ("kv_lengths", kv_lengths)) if lengths is not None}
    if not checked:
        return Full()
    batches = {x.shape[0] for x in checked.values()} - {1}
    if len(batches) > 1:
        raise ValueError(f"from_lengths: q_lengths {tuple(checked['q_lengths'].shape)} and kv_lengths "
                         f"{tuple(checked['kv_lengths'].shape)} have different batch sizes")
    return Lengths(**checked)


@_data
class Explicit(Mask):
    """A boolean array broadcastable to ``[B, H, T, S]`` (True = attend).

    Shapes follow NumPy broadcasting from the right, the rule of ``jax.nn.dot_product_attention``'s
    ``mask``: rank 4 is ``[B, H, T, S]``, rank 3 ``[H, T, S]`` and rank 2 ``[T, S]`` (any dim may be 1).
    A rank-2 array is therefore never read as ``[B, S]``: for a key-padding mask ``[B, S]`` use
    ``Explicit.keys(key_mask)`` (or ``from_lengths(kv_lengths=...)``, whose tiles need no array).
    """

    mask: Array

    @classmethod
    def keys(cls, key_mask: Array) -> Explicit:
        """A key-padding mask from bool ``[B, S]`` (True = real key), the same for every head and query.

        Equal to ``Explicit(key_mask[:, None, None, :])``. Raises ValueError for another rank and
        TypeError for a non-bool array.
        """
        m = jnp.asarray(key_mask)
        if m.ndim != 2:
            raise ValueError(f"Explicit.keys takes a [B, S] key mask, got shape {tuple(m.shape)}")
        if m.dtype != jnp.bool_:
            raise TypeError(f"Explicit.keys takes a bool key mask, got {m.dtype}")
        return cls(m[:, None, None, :])

    def check(self, batch, num_heads, T, S):
        m = jnp.asarray(self.mask)
        if m.dtype != jnp.bool_:
            raise TypeError(f"Explicit mask must be bool, got {m.dtype}")
        if m.ndim == 2 and m.shape == (batch, S) and m.shape[0] not in (1, T):
            raise ValueError(f"Explicit mask has shape {tuple(m.shape)}: a rank-2 mask is [T, S] = [{T}, {S}]; "
                             f"for a [B, S] = [{batch}, {S}] key mask use masks.Explicit.keys(mask)")
        check_broadcastable("Explicit mask", m, (batch, num_heads, T, S))

    def tile(self, q_idx, kv_idx, T, S):
        return take_tile(rank4(self.mask), q_idx, kv_idx)

    def block_summary(self, T, S, block_q, block_kv):
        m = rank4(self.mask)
        any_ = _tile_reduce(m, T, S, block_q, block_kv, jnp.any, False)
        all_ = _tile_reduce(m, T, S, block_q, block_kv, jnp.all, True)
        return jnp.where(~any_, EMPTY, jnp.where(all_, FULL, PARTIAL)).astype(jnp.int8)


def _tile_reduce(m: Array, T: int, S: int, block_q: int, block_kv: int, reduce, pad_value) -> Array:
    """Reduce a [Bm, Hm, Tm, Sm] array (Tm in {1, T}, Sm in {1, S}) over each tile."""
    bm, hm, tm, sm = m.shape
    nq = num_tiles(T, block_q) if tm == T else 1
    nk = num_tiles(S, block_kv) if sm == S else 1
    bq = block_q if tm == T else 1
    bk = block_kv if sm == S else 1
    padded = jnp.pad(m, ((0, 0), (0, 0), (0, nq * bq - tm), (0, nk * bk - sm)), constant_values=pad_value)
    reduced = reduce(padded.reshape(bm, hm, nq, bq, nk, bk), axis=(3, 5))
    return jnp.broadcast_to(reduced, (bm, hm, num_tiles(T, block_q), num_tiles(S, block_kv)))


@dataclasses.dataclass(frozen=True, eq=False)
class _Combination(Mask):
    """Two masks joined elementwise by ``_op``; summaries join by ``_summary_op``."""

    a: Mask
    b: Mask

    def check(self, batch, num_heads, T, S):
        self.a.check(batch, num_heads, T, S)
        self.b.check(batch, num_heads, T, S)

    def tile(self, q_idx, kv_idx, T, S):
        return self._op(self.a.tile(q_idx, kv_idx, T, S), self.b.tile(q_idx, kv_idx, T, S))

    def block_summary(self, T, S, block_q, block_kv):
        a = self.a.block_summary(T, S, block_q, block_kv)
        b = self.b.block_summary(T, S, block_q, block_kv)
        xp = np if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) else jnp
        return getattr(xp, self._summary_op)(a, b)


@_data
class And(_Combination):
    """Allowed where both masks allow (summary: EMPTY wins, FULL only if both are)."""

    _op = staticmethod(operator.and_)
    _summary_op = "minimum"


@_data
class Or(_Combination):
    """Allowed where either mask allows (summary: FULL wins, EMPTY only if both are)."""

    _op = staticmethod(operator.or_)
    _summary_op = "maximum"


def block_schedule(mask: Optional[Mask], T: int, S: int, block_q: int, block_kv: int):
    """The work plan of a blocked kernel: which key tiles each query tile visits, and how.

    Returns:
      codes: int32 ``[nq, nk]``, the block summary reduced over batch and heads (EMPTY only if
        empty for all, FULL only if full for all); the last key tile is at most PARTIAL when
        ``S`` is not a multiple of ``block_kv`` (its padding must be masked).
      lo, hi: int32 ``[nq]``, the span ``[lo, hi)`` of non-empty key tiles per query tile
        (``lo == hi`` when a query tile sees nothing). Empty tiles inside the span stay EMPTY.
    """
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    if mask is None:
        codes = jnp.full((nq, nk), FULL, jnp.int32)
    else:
        summary = jnp.asarray(mask.block_summary(T, S, block_q, block_kv))
        nonempty = jnp.any(summary != EMPTY, axis=(0, 1))
        full = jnp.all(summary == FULL, axis=(0, 1))
        codes = jnp.where(nonempty, jnp.where(full, FULL, PARTIAL), EMPTY).astype(jnp.int32)
    if S % block_kv:
        codes = codes.at[:, -1].min(PARTIAL)
    nonempty = codes != EMPTY
    lo = jnp.argmax(nonempty, axis=1).astype(jnp.int32)
    hi = (nk - jnp.argmax(nonempty[:, ::-1], axis=1)).astype(jnp.int32)
    return codes, lo, jnp.where(nonempty.any(axis=1), hi, lo)


__all__ = [
    "EMPTY", "PARTIAL", "FULL", "Mask", "Full", "Causal", "SlidingWindow", "ChunkedCausal",
    "Segments", "Lengths", "from_lengths", "Explicit", "And", "Or", "query_positions", "block_schedule",
]
