"""Additive score biases as values: an array, or a rule computed from positions per tile."""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.tiling import check_broadcastable, rank4, take_tile


class Bias:
    """An additive logit term ``b[b, h, i, j]``, asked for one tile at a time.

    Subclasses implement ``tile`` (a rule of positions: ALiBi, T5, …), or set ``reads_queries`` and
    implement ``query_tile`` (a rule that also reads the tile's queries: Music Transformer's
    ``q_i·E_(j−i)``, …). A rule never materializes ``[T, S]``.
    """

    differentiable = False
    """Whether the blocked paths return a gradient for this bias's float leaves (arrays, learned tables)."""

    reads_queries = False
    """Whether the logit term reads the queries (``query_tile``) as well as positions."""

    def tile(self, q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int) -> jax.Array:
        """Bias for query rows ``q_idx`` [tq] and key columns ``kv_idx`` [tk]: ``[Bb, Hb, tq, tk]``.

        Every path that takes a bias passes tiles: ``q_idx`` and ``kv_idx`` are runs of consecutive
        indices (rules such as ``RelativeEmbeddingBias`` rely on it)."""
        raise NotImplementedError

    def query_tile(self, q: jax.Array, q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int) -> jax.Array:
        """For a bias that ``reads_queries``: the tile's queries ``q [B, Hq, tq, D]`` (as given, before
        the logit scale) -> ``[B, Hq or 1, tq, tk]``; the blocked paths pull gradients back to ``q``."""
        raise NotImplementedError

    def prepare(self, T: int, S: int, rows: Optional[int] = None, columns: Optional[int] = None) -> Bias:
        """This rule ready for the tiles of one ``[T, S]`` call: a ``Bias`` whose ``tile`` / ``query_tile``
        equal this one's for query rows ``q_idx < rows`` and key columns ``kv_idx < columns`` (default ``T``,
        ``S``; the blocked paths pass their extents padded to whole tiles).

        The hook for rules with a per-call table: work that every tile would repeat (Transformer-XL's
        projected sinusoids ``W_R R`` over the call's offsets) is done here once, ``O(T + S)`` memory, and the
        returned rule's tiles slice it. The blocked ``xla`` path calls it once per call, before its tile loop
        and outside its custom VJP, so the table's gradient reaches this rule's leaves by ordinary autodiff.
        The default returns ``self``."""
        return self

    def for_tile(self, q_idx: jax.Array, kv_idx: jax.Array, T: int, S: int) -> Bias:
        """The part of this rule that the tile of query rows ``q_idx`` [tq] and key columns ``kv_idx`` [tk] reads:
        a ``Bias`` whose ``tile`` / ``query_tile`` at these indices equal this one's (default: ``self``).

        A prepared rule (``prepare``) returns its table's slice for the tile, so the blocked ``xla`` backward
        differentiates the tile against that slice (``O(tq + tk)``) and adds the slice's gradient into the
        table's outside the tile's conditional, instead of carrying an ``O(T + S)`` gradient through it."""
        return self

    def check(self, batch: int, num_heads: int, T: int, S: int) -> None:
        """Raise ``ValueError`` if the bias doesn't fit ``[batch, num_heads, T, S]``."""

    def dense(self, T: int, S: int) -> jax.Array:
        """The full bias, ``[Bb, Hb, T, S]`` broadcastable to ``[B, H, T, S]`` (not for one that reads queries)."""
        if self.reads_queries:
            raise NotImplementedError(f"{type(self).__name__} reads the queries: it has no dense form without them")
        return self.tile(jnp.arange(T), jnp.arange(S), T, S)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class ArrayBias(Bias):
    """A bias array broadcastable to ``[B, H, T, S]`` (rank 2 to 4)."""

    array: jax.Array
    differentiable = True

    def check(self, batch, num_heads, T, S):
        check_broadcastable("bias", self.array, (batch, num_heads, T, S))
        if not jnp.issubdtype(self.array.dtype, jnp.floating):
            raise TypeError(f"bias must be a float array, got {self.array.dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        return take_tile(rank4(self.array), q_idx, kv_idx).astype(jnp.float32)


def as_bias(bias) -> Bias | None:
    """Wrap a user ``bias`` argument (None, an array, or a ``Bias``) as a ``Bias``."""
    if bias is None or isinstance(bias, Bias):
        return bias
    if isinstance(bias, (jax.Array, jnp.ndarray)) or hasattr(bias, "__array__"):
        return ArrayBias(jnp.asarray(bias))
    raise TypeError(f"bias must be an array or an attnjax Bias (e.g. positional.ALiBi), got {type(bias).__name__}")
