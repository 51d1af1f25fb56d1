"""Attention sinks: the attention mass each key receives, blockwise, and the sink metric.

Gu et al., "When Attention Sink Emerges in Language Models: An Empirical View", ICLR 2025, sec. 3.1:
the importance score of key ``k`` in head ``h`` is its mean attention over the queries that see it,
``α_k = (1 / |Q_k|) Σ_{i ∈ Q_k} p_ik`` (``|Q_k| = T − k + 1`` under a causal mask), and the sink metric
is the fraction of heads (over layers) where ``α_k > ε``, ``Sink_k^ε = (1/(L·H)) Σ_l Σ_h 1(α_k^{l,h} > ε)``,
with ``ε = 0.3`` in the paper.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.api import attention
from attnjax.bias import Bias
from attnjax.checks import check_positive, check_qk, check_scalar
from attnjax.masks import Mask

SINK_THRESHOLD = 0.3
"""``ε`` of Gu et al.'s sink metric (sec. 3.1)."""


def window_of(mask: Optional[Mask], T: int, S: int) -> Optional[tuple[Optional[int], Optional[int]]]:
    """``(left, right)`` of a mask that is a band ``i − left <= j <= i + right`` on a square map (None, Full,
    Causal, SlidingWindow with ``T == S``; ``None`` bounds are unbounded), else ``None``."""
    if T != S:
        return None
    if mask is None or isinstance(mask, masks.Full):
        return None, None
    if isinstance(mask, masks.Causal):
        return None, 0
    if isinstance(mask, masks.SlidingWindow):
        return mask.left, mask.right
    return None


def attention_received(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                       bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                       logits_soft_cap: Optional[float] = None, block_q: int = 128) -> tuple[jax.Array, jax.Array]:
    """Per key: the attention mass it receives and the number of queries that see it.

    Two paths. On a square map with no bias or soft cap, under no mask, ``Full``, ``Causal`` or a
    ``SlidingWindow``, two blocked forwards that skip masked tiles: ``lse_i`` from ``attnjax.attention(q, k,
    ·, return_lse=True)``, then ``log mass_j = log Σ_i exp(s_ij − lse_i)``, the log-sum-exp of the transposed
    map (keys as queries, the band mirrored, ``−lse_i`` folded into one more feature of q and k, so no bias
    tile is formed); ``seen_by`` in closed form. Otherwise
    ``scan_query_tiles`` (memory ``O(B·Hq·block_q·S)``, every key of each query tile).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step of the scan.

    Returns:
      ``(mass, seen_by)``, both ``[B, Hq, S]`` float32: ``mass_k = Σ_i p_ik`` and ``seen_by_k = |{i: p_ik's
      logit is allowed}|``.
    """
    check_qk(q, k)
    check_positive(block_q=block_q)
    band = window_of(mask, q.shape[1], k.shape[1]) if bias is None and logits_soft_cap is None else None
    if band is not None:
        return received_by_transposed_attention(q, k, band, scale)

    def columns(log_p, logits, q_idx, kv_idx):
        ones = jnp.ones(q_idx.shape, jnp.float32)  # sums over the tile's rows as products: faster on XLA:CPU
        return None, (jnp.einsum("bhqs,q->bhs", jnp.exp(log_p), ones),
                      jnp.einsum("bhqs,q->bhs", jnp.isfinite(logits).astype(jnp.float32), ones))

    return scan_query_tiles(q, k, columns, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[1]


def received_by_transposed_attention(q: jax.Array, k: jax.Array, band: tuple[Optional[int], Optional[int]],
                                     scale: Optional[float]) -> tuple[jax.Array, jax.Array]:
    """``attention_received`` on a square map masked to the band ``i − left <= j <= i + right``, by two
    blocked forwards in float32 (see there)."""
    B, T, Hq, _ = q.shape
    left, right = band
    mask = None if band == (None, None) else masks.SlidingWindow(left, right)
    qf, kf = q.astype(jnp.float32), k.astype(jnp.float32)
    kf = jnp.repeat(kf, Hq // k.shape[2], axis=2)
    _, lse = attention(qf, kf, jnp.zeros((B, T, Hq, 1), jnp.float32), mask=mask, scale=scale, return_lse=True)
    mirrored = None if mask is None else masks.SlidingWindow(right, left)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    # −lse_i folded into one more feature: (k_j, 1)·(q_i, −lse_i/scale)·scale = scale·k_j·q_i − lse_i
    row_offset = jnp.where(jnp.isfinite(lse), -lse, -1e30)[..., None] / scale  # [B, T, Hq, 1]
    keys_as_queries = jnp.concatenate([kf, jnp.ones((B, T, Hq, 1), jnp.float32)], axis=-1)
    queries_as_keys = jnp.concatenate([qf, row_offset], axis=-1)
    _, log_mass = attention(keys_as_queries, queries_as_keys, jnp.zeros((B, T, Hq, 1), jnp.float32), mask=mirrored,
                            scale=scale, return_lse=True)
    j = jnp.arange(T)
    hi = T - 1 if left is None else jnp.minimum(T - 1, j + left)
    lo = 0 if right is None else jnp.maximum(0, j - right)
    seen_by = jnp.broadcast_to(jnp.maximum(hi - lo + 1, 0).astype(jnp.float32), (B, Hq, T))
    return jnp.exp(log_mass).transpose(0, 2, 1), seen_by


def sink_scores(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                block_q: int = 128) -> jax.Array:
    """Gu et al.'s importance score ``α_k``: the mean attention key ``k`` receives from the queries that see
    it, ``[B, Hq, S]`` float32 (0 for a key no query sees). Arguments as ``attention_received``."""
    mass, seen_by = attention_received(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                                       block_q=block_q)
    return jnp.where(seen_by > 0, mass / jnp.maximum(seen_by, 1.0), 0.0)


def sink_scores_of_map(probabilities: jax.Array, allowed: Optional[jax.Array] = None) -> jax.Array:
    """``α_k`` from a dense map ``[..., T, S]`` -> ``[..., S]``; ``allowed`` (bool, broadcastable to the map)
    says which queries see each key (default: all of them)."""
    p = jnp.asarray(probabilities, jnp.float32)
    seen = jnp.ones_like(p) if allowed is None else jnp.broadcast_to(allowed, p.shape).astype(jnp.float32)
    count = jnp.sum(seen, axis=-2)
    return jnp.where(count > 0, jnp.sum(p * seen, axis=-2) / jnp.maximum(count, 1.0), 0.0)


def sink_metric(scores: jax.Array | Sequence[jax.Array], threshold: float = SINK_THRESHOLD) -> jax.Array:
    """``Sink_k^ε``: the fraction of (layer, head) pairs whose score ``α_k`` exceeds ``threshold``.

    Args:
      scores: ``[B, H, S]`` for one layer, or a sequence of them (one per layer), or ``[L, B, H, S]``.
      threshold: ``ε`` (0.3 in the paper).

    Returns:
      ``[B, S]`` float32 in ``[0, 1]``.
    """
    check_scalar("threshold", threshold)
    scores = jnp.asarray(scores) if not isinstance(scores, (list, tuple)) else jnp.stack(scores)
    if scores.ndim == 3:
        scores = scores[None]
    if scores.ndim != 4:
        raise ValueError(f"scores must be [B, H, S] or [L, B, H, S] (or a list of [B, H, S]), got shape "
                         f"{list(scores.shape)}")
    return jnp.mean(scores > threshold, axis=(0, 2), dtype=jnp.float32)


def detect_sinks(scores: jax.Array | Sequence[jax.Array], threshold: float = SINK_THRESHOLD,
                 min_fraction: float = 0.5) -> list[np.ndarray]:
    """The sink positions of each batch element: keys whose ``sink_metric`` is at least ``min_fraction``.

    Returns one sorted int array of key positions per batch element (concrete, for reporting).
    """
    check_scalar("min_fraction", min_fraction)
    metric = np.asarray(sink_metric(scores, threshold))
    return [np.flatnonzero(row >= min_fraction) for row in metric]


__all__ = ["SINK_THRESHOLD", "attention_received", "sink_scores", "sink_scores_of_map", "sink_metric",
           "detect_sinks"]
