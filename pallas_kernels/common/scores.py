"""In-kernel score helpers on 2-D float32 tiles, shared by the GPU and TPU kernels.

Bias rules computed from the tile's row/column iotas (never a ``[T, S]`` array): ALiBi's distance
penalty (``alibi_tile``) and T5's bucketed relative position bias (``t5_bucket_tile``, ``t5_tile``,
and the table gradient ``t5_table_grad``); the logit soft cap and its derivative.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.positional.t5 import t5_relative_buckets


def alibi_tile(slope, rows: jax.Array, cols: jax.Array, T: int, S: int) -> jax.Array:
    """ALiBi ``−m_h·|pos_q − pos_k|`` on a tile from its row/column iotas (bottom-right aligned)."""
    distance = jnp.abs(rows + (S - T) - cols).astype(jnp.float32)
    return -slope * distance


@dataclasses.dataclass(frozen=True)
class T5Buckets:
    """The static part of a T5 bias in a kernel (``attnjax.positional.T5Bias``): the table's bucket
    count, the bucketing mode and the distance where the last bucket starts (Raffel et al. 2020, §2.1)."""

    num_buckets: int
    bidirectional: bool
    max_distance: int


def t5_bucket_tile(rows: jax.Array, cols: jax.Array, offset, spec: T5Buckets) -> jax.Array:
    """T5's bucket ``[bq, bk]`` int32 of ``key position − query position`` on a tile.

    Query row ``i`` sits at position ``i + offset`` (``offset = S − T``: the library's bottom-right
    alignment, as in ``alibi_tile``; a decode step's ``T5Bias.query_offset`` otherwise), key column
    ``j`` at ``j``. The buckets are ``attnjax.positional.t5_relative_buckets`` itself, applied to the
    tile's int32 offsets: the same float32 formula, so they equal the xla path's bit for bit.
    """
    return t5_relative_buckets(cols - (rows + offset), bidirectional=spec.bidirectional,
                               num_buckets=spec.num_buckets, max_distance=spec.max_distance)


def t5_tile(values: Sequence, buckets: jax.Array) -> jax.Array:
    """The bias ``table[bucket, h]`` on a tile: ``values[b]`` (the head's table column, float32
    scalars) wherever ``buckets == b``, by a static chain of selects (no gather: lowers on Triton and
    Mosaic). Cost: ``num_buckets`` compare-selects per logit."""
    out = jnp.zeros(buckets.shape, jnp.float32)
    for b, value in enumerate(values):
        out = jnp.where(buckets == b, value, out)
    return out


def t5_table_grad(ds: jax.Array, buckets: jax.Array, acc: jax.Array, num_buckets: int) -> jax.Array:
    """``acc`` plus, at index ``b`` of its last axis, ``Σ_tile ds·[bucket == b]`` for each bucket.

    ``ds [bq, bk]``: the loss gradient w.r.t. the tile's logits (what an additive bias receives);
    ``acc``: a ``[width]`` (Triton) or ``[rows, width]`` (Mosaic: every row gets the sums) float32
    accumulator with ``width >= num_buckets``; lanes past ``num_buckets`` stay unchanged. Two
    one-axis reductions per bucket (Triton reduces one axis at a time).
    """
    keep = acc.ndim == 2
    lanes = lax.broadcasted_iota(jnp.int32, acc.shape, acc.ndim - 1)
    for b in range(num_buckets):
        total = jnp.sum(jnp.sum(jnp.where(buckets == b, ds, 0.0), axis=1, keepdims=keep), axis=0, keepdims=keep)
        acc = acc + jnp.where(lanes == b, total, 0.0)
    return acc


def apply_soft_cap(s: jax.Array, cap: Optional[float]) -> jax.Array:
    """``cap·tanh(s/cap)`` (identity when ``cap`` is None)."""
    return s if cap is None else cap * jnp.tanh(s / cap)


def soft_cap_grad(capped: jax.Array, cap: Optional[float]) -> jax.Array:
    """``d capped / d raw = 1 − (capped/cap)²`` (1 when ``cap`` is None)."""
    return 1.0 if cap is None else 1.0 - jnp.square(capped / cap)


__all__ = ["alibi_tile", "T5Buckets", "t5_bucket_tile", "t5_tile", "t5_table_grad", "apply_soft_cap",
           "soft_cap_grad"]
