"""Attention entropy per query, blockwise from q and k, or from a dense map.

``H_i = −Σ_j p_ij log p_ij`` in nats, ``p_i`` the softmax attention distribution of query ``i``
(Shannon entropy; used to study attention concentration, e.g. Zhai et al., "Stabilizing Transformer
Training by Preventing Attention Entropy Collapse", ICML 2023, eq. 2). ``0 log 0 = 0``; a query with
no allowed key has entropy 0. Bounded by ``log n_i`` for ``n_i`` allowed keys.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.bias import Bias
from attnjax.masks import Mask


def entropy_terms(log_p: jax.Array) -> jax.Array:
    """``−p·log p`` elementwise from ``log p`` (0 where ``p = 0``, with a zero gradient there), float32."""
    finite = jnp.isfinite(log_p)
    safe = jnp.where(finite, log_p, 0.0)
    return jnp.where(finite, -jnp.exp(safe) * safe, 0.0)


def attention_entropy(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                      bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                      logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """The entropy in nats of each query's softmax attention distribution, without a ``[T, S]`` map.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` (GQA: ``Hq % Hkv == 0``).
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step; memory ``O(B·Hq·block_q·S)``, time one attention forward.

    Returns:
      ``[B, Hq, T]`` float32.
    """
    def rows(log_p, logits, q_idx, kv_idx):
        return jnp.sum(entropy_terms(log_p), axis=-1), None

    return scan_query_tiles(q, k, rows, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[0]


def entropy_of_map(probabilities: jax.Array) -> jax.Array:
    """The entropy in nats of each row of a dense attention map ``[..., T, S] -> [..., T]`` (rows summing
    to 1, or to 0 for a query that attends to nothing), e.g. the maps another library returns."""
    p = jnp.asarray(probabilities, jnp.float32)
    return jnp.sum(jnp.where(p > 0, -p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)


__all__ = ["attention_entropy", "entropy_of_map", "entropy_terms"]
