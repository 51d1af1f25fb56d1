"""How alike two layers' attention maps are: cosine similarity, blockwise from the two layers' q and k.

EchoAtt (Rajabzadeh et al., "EchoAtt: Attend, Copy, then Adjust for More Efficient Large Language Models",
2024) measures the similarity of the attention matrices of two layers on the same tokens with the cosine
similarity, and shares attention between inner layers where it is high. The paper does not spell out the
reduction; we follow the plain reading, the cosine of head ``h``'s two maps flattened,

    ``sim_h = Σ_ij p¹_ij p²_ij / (‖p¹‖_F ‖p²‖_F)``,

and offer the mean over queries of the per-row cosines (``per_row=True``) as the alternative. Both come
from three per-row sums, ``Σ_j p¹_ij p²_ij``, ``Σ_j (p¹_ij)²`` and ``Σ_j (p²_ij)²``, which the blockwise form
accumulates over the two maps' query tiles with ``scan_query_tiles_pair``; no ``[T, S]`` map is formed.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.analysis.blockwise import scan_query_tiles_pair
from attnjax.bias import Bias
from attnjax.checks import describe
from attnjax.masks import Mask


def _cosine(dot: jax.Array, sq1: jax.Array, sq2: jax.Array, per_row: bool) -> jax.Array:
    """Cosine similarity from per-row sums ``[..., T]``: of the flattened maps, or the mean of the rows'
    cosines over rows where both maps are non-zero (0 when there are none)."""
    if per_row:
        valid = (sq1 > 0) & (sq2 > 0)
        rows = jnp.where(valid, dot / jnp.sqrt(jnp.where(valid, sq1 * sq2, 1.0)), 0.0)
        count = jnp.sum(valid, axis=-1)
        return jnp.where(count > 0, jnp.sum(rows, axis=-1) / jnp.maximum(count, 1), 0.0)
    dot, sq1, sq2 = (jnp.sum(x, axis=-1) for x in (dot, sq1, sq2))
    norm = jnp.sqrt(sq1 * sq2)
    return jnp.where(norm > 0, dot / jnp.where(norm > 0, norm, 1.0), 0.0)


def attention_similarity(q1: jax.Array, k1: jax.Array, q2: jax.Array, k2: jax.Array, *,
                         mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                         scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                         block_q: int = 128, per_row: bool = False) -> jax.Array:
    """Cosine similarity per head of two layers' softmax maps over the same tokens, without a ``[T, S]`` map.

    Args:
      q1, k1: the first layer, ``[B, T, Hq, D1]`` and ``[B, S, Hkv1, D1]``.
      q2, k2: the second layer, ``[B, T, Hq, D2]`` and ``[B, S, Hkv2, D2]`` (same ``B, T, Hq, S``; head dims and
        KV head counts may differ). Head ``h`` of one layer is compared with head ``h`` of the other.
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``, applied to both maps (``scale`` defaults
        to each layer's ``1/√D``).
      block_q: query rows per step; memory ``O(B·Hq·block_q·S)`` for each map.
      per_row: the mean of the per-query cosines instead of the cosine of the flattened maps.

    Returns:
      ``[B, Hq]`` float32 in ``[0, 1]`` (maps are non-negative).
    """
    def rows(log_p1, log_p2, q_idx, kv_idx):
        p1, p2 = jnp.exp(log_p1), jnp.exp(log_p2)
        return (jnp.sum(p1 * p2, axis=-1), jnp.sum(p1 * p1, axis=-1), jnp.sum(p2 * p2, axis=-1)), None

    sums = scan_query_tiles_pair(q1, k1, q2, k2, rows, mask=mask, bias=bias, scale=scale,
                                 logits_soft_cap=logits_soft_cap, block_q=block_q)[0]
    return _cosine(*sums, per_row)


def attention_similarity_of_maps(probabilities1: jax.Array, probabilities2: jax.Array, *,
                                 per_row: bool = False) -> jax.Array:
    """The cosine similarity of dense maps ``[..., T, S]`` (broadcasting) -> ``[...]``, as
    ``attention_similarity``. For EchoAtt's layer-by-layer matrix of stacked maps ``[L, B, H, T, S]``, pass
    ``maps[:, None]`` and ``maps[None]`` to get ``[L, L, B, H]``."""
    p1 = jnp.asarray(probabilities1, jnp.float32)
    p2 = jnp.asarray(probabilities2, jnp.float32)
    if p1.ndim < 2 or p2.ndim < 2 or p1.shape[-2:] != p2.shape[-2:]:
        raise ValueError(f"probabilities1 and probabilities2 must be maps [..., T, S] of the same T and S, got "
                         f"{describe(p1)} and {describe(p2)}")
    return _cosine(jnp.sum(p1 * p2, axis=-1), jnp.sum(p1 * p1, axis=-1), jnp.sum(p2 * p2, axis=-1), per_row)


__all__ = ["attention_similarity", "attention_similarity_of_maps"]
