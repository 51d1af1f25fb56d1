"""T5's relative position bias: a learned scalar per (bucket of ``key − query``, head).

Raffel et al., "Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
(JMLR 2020), §2.1: "each 'embedding' is simply a scalar added to the corresponding logit", offsets
bucketed logarithmically up to a maximum distance. The bucketing follows the published
``_relative_position_bucket`` of Mesh TensorFlow / T5 (and HuggingFace's port) exactly.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.bias import Bias
from attnjax.masks import query_positions


def t5_relative_buckets(relative_position: jax.Array, *, bidirectional: bool, num_buckets: int = 32,
                        max_distance: int = 128) -> jax.Array:
    """T5's bucket of each ``relative_position = key_position − query_position`` (int32, same shape).

    Bidirectional: half the buckets for keys after the query (``relative_position > 0``), half for the
    rest. Within a half of ``n`` buckets, distances below ``n // 2`` get their own bucket, larger ones
    share ``n − n//2`` log-spaced buckets up to ``max_distance`` (and the last bucket beyond it).
    Causal (``bidirectional=False``): keys after the query share bucket 0 with distance 0.
    """
    if num_buckets < 2 or (bidirectional and num_buckets < 4):
        raise ValueError(f"num_buckets must be >= 2 (>= 4 when bidirectional), got {num_buckets}")
    n = -jnp.asarray(relative_position, jnp.int32)
    buckets = jnp.zeros(n.shape, jnp.int32)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (n < 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(n)
    else:
        n = jnp.maximum(n, 0)
    max_exact = num_buckets // 2
    if max_distance <= max_exact:
        raise ValueError(f"max_distance must exceed the exact range {max_exact}, got {max_distance}")
    safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (jnp.log(safe / max_exact) / math.log(max_distance / max_exact)
                         * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(n < max_exact, n, large)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, eq=False)
class T5Bias(Bias):
    """T5's learned relative position bias ``b[h, i, j] = table[bucket(pos_k − pos_q), h]``, per tile.

    Pass as ``attention(..., bias=T5Bias(table, bidirectional=False))``. Query positions follow the
    library's bottom-right alignment (``attnjax.masks``), or start at ``query_offset`` when given: a
    decode step against a cache of ``max_len`` slots, of which the first ``length`` are filled, passes
    ``query_offset=length``. Every blocked path that returns bias
    gradients (the softmax ``xla`` path, stick-breaking, the flash kernels) returns one for ``table``;
    no path forms ``[T, S]`` beyond its tiles.

    Args:
      table: ``[num_buckets, H]`` float (one column per query head; ``H = 1`` shares it).
      bidirectional: encoder-style (True) or causal decoder-style (False) bucketing.
      max_distance: offsets at or beyond it share the last bucket (128 in T5).
      query_offset: ``None`` (bottom-right alignment) or an int scalar: query row ``i`` sits at
        position ``query_offset + i``.
    """

    table: jax.Array
    bidirectional: bool = dataclasses.field(default=True, metadata=dict(static=True))
    max_distance: int = dataclasses.field(default=128, metadata=dict(static=True))
    query_offset: Optional[jax.Array] = None
    differentiable = True

    @property
    def num_buckets(self) -> int:
        """The table's bucket count."""
        return self.table.shape[0]

    def check(self, batch, num_heads, T, S):
        if jnp.ndim(self.table) != 2 or jnp.shape(self.table)[1] not in (1, num_heads):
            raise ValueError(f"T5Bias table has shape {jnp.shape(self.table)}, expected (num_buckets, {num_heads}) "
                             "or (num_buckets, 1)")
        if not jnp.issubdtype(jnp.asarray(self.table).dtype, jnp.floating):
            raise TypeError(f"T5Bias table must be a float array, got {jnp.asarray(self.table).dtype}")

    def tile(self, q_idx, kv_idx, T, S):
        rows = query_positions(q_idx, T, S) if self.query_offset is None else q_idx + self.query_offset
        table = jnp.asarray(self.table, jnp.float32)
        shape = (1, table.shape[1], q_idx.shape[0], kv_idx.shape[0])
        # The bucket is monotone in the offset on each side of 0, so a tile whose extreme offsets share a
        # bucket is constant: far from the diagonal (beyond max_distance) every tile is, and costs a broadcast.
        extremes = self.buckets(jnp.stack([kv_idx.min() - rows.max(), kv_idx.max() - rows.min()]))

        def constant():
            return jnp.broadcast_to(table[extremes[0]][None, :, None, None], shape)

        def gathered():
            values = jnp.take(table, self.buckets(kv_idx[None, :] - rows[:, None]), axis=0)  # [tq, tk, H]
            return jnp.moveaxis(values, -1, 0)[None]

        return jax.lax.cond(extremes[0] == extremes[1], constant, gathered)

    def buckets(self, relative_position: jax.Array) -> jax.Array:
        """``t5_relative_buckets`` with this rule's settings."""
        return t5_relative_buckets(relative_position, bidirectional=self.bidirectional, num_buckets=self.num_buckets,
                                   max_distance=self.max_distance)

__all__ = ["t5_relative_buckets", "T5Bias"]
