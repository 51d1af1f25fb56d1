"""Attention distance and future influence per token, blockwise from q and k, or from a dense map.

Li et al., "Attention Illuminates LLM Reasoning: The Preplan-and-Anchor Rhythm Enables Fine-Grained
Policy Optimization", arXiv:2510.13554 (v1 2025, v2 2026), sec. 4.1. For an attention map ``A`` (query ``t``,
key ``s``):

- head span (eq. 7): ``d = (1/|R|) Σ_{t∈R} Σ_{s≤t} A_ts (t − s)``, the mean backward distance over the
  response rows ``R``; the paper sorts heads by ``d`` and calls the bottom / top 30 % local / global heads,
  whose maps it averages (eq. 8);
- windowed average attention distance (Def. 4.1, eq. 9): ``WAAD_t = Σ_{s≤t} Ā^loc_ts · min(t − s, W)`` for a
  response position ``t``, with ``W = 10`` (sec. 5.3.1, App. A.1);
- future attention influence (Def. 4.2, eq. 10): ``FAI_s = (1/|T(s)|) Σ_{t∈T(s)} Ā^glob_ts`` with
  ``T(s) = {t ∈ R : s + H_lo ≤ t ≤ min(N, s + H_hi)}`` and the horizon ``[H_lo, H_hi] = [10, 100]``
  (v2 sec. 5.3.1 and Table 7b; v1 used ``[10, 50]``; the analysis of App. A.1 lets the horizon run to the end
  of the response, ``H_hi = None`` here).

Verified against the text of both arXiv versions (eqs. 7-10, sec. 5.3.1, App. A.1). Both metrics are linear in
the map, so the value on a group-averaged map (eq. 8) is the mean of the per-head values over the group (for
FAI when the mask is the same for every head, so ``|T(s)|`` is). Positions follow the library's alignment:
query row ``t`` sits at ``t + S − T``. Distances are backward; a key after its query (possible only without a
causal mask) counts as distance 0. ``|T(s)|`` counts the horizon's queries that are selected by ``queries``
(the paper's ``R``: response tokens) and allowed to see ``s``: under the paper's causal mask every ``t ≥ s``
sees ``s``, so this is eq. 10; under other masks (windows, packed segments) a query that cannot see ``s`` is
left out of ``T(s)`` rather than counted with weight 0. ``FAI_s = 0`` where ``T(s)`` is empty.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.bias import Bias
from attnjax.checks import check_positive, check_qk, check_scalar, describe
from attnjax.masks import Mask, query_positions

WAAD_WINDOW = 10
"""``W`` of WAAD (sec. 5.3.1 and App. A.1)."""

FAI_HORIZON = (10, 100)
"""``[H_lo, H_hi]`` of FAI (v2 sec. 5.3.1; ``(10, 50)`` in v1); an upper bound of None runs to the end of the
sequence (App. A.1)."""

SPAN_FRACTION = 0.3
"""Fraction of heads called local (smallest span) and global (largest span), sec. 4.1."""


def _backward_distance(q_positions: jax.Array, kv_idx: jax.Array, window: Optional[int]) -> jax.Array:
    """``min(max(p_t − s, 0), window)`` (no clip when ``window`` is None), float32 ``[tq, S]``."""
    d = jnp.maximum(q_positions[:, None] - kv_idx[None, :], 0)
    return (d if window is None else jnp.minimum(d, window)).astype(jnp.float32)


def _check_window(window: Optional[int]) -> None:
    """``window`` is a positive int or None."""
    if window is not None:
        check_positive(window=window)


def _check_horizon(horizon: tuple[int, Optional[int]]) -> None:
    """``horizon = (lo, hi)``: ints with ``0 <= lo <= hi``, or ``hi`` None (no upper bound)."""
    ok = isinstance(horizon, tuple) and len(horizon) == 2 and all(
        isinstance(h, int) and not isinstance(h, bool) for h in horizon if h is not None) and horizon[0] is not None
    if not ok or horizon[0] < 0 or (horizon[1] is not None and horizon[1] < horizon[0]):
        raise ValueError(f"horizon must be a tuple (lo, hi) of ints with 0 <= lo <= hi, or hi None, got "
                         f"{describe(horizon)}")


def _checked_queries(queries: Optional[jax.Array], batch: int, length: int) -> Optional[jax.Array]:
    """``queries`` (bool ``[T]`` or ``[B|1, T]``) as ``[B|1, T]``; ``ValueError``/``TypeError`` naming it."""
    if queries is None:
        return None
    queries = jnp.asarray(queries)
    if queries.dtype != jnp.bool_:
        raise TypeError(f"queries must be a boolean array (the query rows that count), got {describe(queries)}")
    q2 = queries[None] if queries.ndim == 1 else queries
    if q2.ndim != 2 or q2.shape[0] not in (1, batch) or q2.shape[1] != length:
        raise ValueError(f"queries must have shape [T] or [B, T] = [{batch}, {length}], got {list(queries.shape)}")
    return q2


def windowed_attention_distance(q: jax.Array, k: jax.Array, *, window: Optional[int] = WAAD_WINDOW,
                                mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                                scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                                block_q: int = 128) -> jax.Array:
    """Per query: how far back it attends, ``Σ_s p_ts · min(t − s, window)`` (WAAD, Def. 4.1, eq. 9), blockwise.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` (GQA: ``Hq % Hkv == 0``).
      window: the clip ``W`` (10 in the paper); None gives the unclipped mean backward distance, the inner
        sum of the head span (eq. 7).
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step; memory ``O(B·Hq·block_q·S)``.

    Returns:
      ``[B, Hq, T]`` float32 (0 for a query that attends to nothing).
    """
    check_qk(q, k)
    _check_window(window)
    T, S = q.shape[1], k.shape[1]

    def rows(log_p, logits, q_idx, kv_idx):
        d = _backward_distance(query_positions(q_idx, T, S), kv_idx, window)
        return jnp.sum(jnp.exp(log_p) * d, axis=-1), None

    return scan_query_tiles(q, k, rows, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[0]


def future_attention_influence(q: jax.Array, k: jax.Array, *,
                               horizon: tuple[int, Optional[int]] = FAI_HORIZON,
                               queries: Optional[jax.Array] = None, mask: Optional[Mask] = None,
                               bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                               logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """Per key: the mean attention it receives from the queries ``lo <= t − s <= hi`` after it (FAI, Def. 4.2,
    eq. 10).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``.
      horizon: ``(H_lo, H_hi)`` in positions (``(10, 100)`` in the paper; ``H_hi`` None: to the end).
      queries: bool ``[T]`` or ``[B, T]``, the query rows that count (the paper: the response tokens);
        default all.
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step (memory ``O(B·Hq·block_q·S)``).

    Returns:
      ``[B, Hq, S]`` float32: ``Σ_{t∈T(s)} p_ts / |T(s)|``, ``T(s)`` the selected queries in the horizon
      whose logit to ``s`` is allowed; 0 where ``T(s)`` is empty.
    """
    check_qk(q, k)
    _check_horizon(horizon)
    T, S = q.shape[1], k.shape[1]
    lo, hi = horizon
    rows_on = _checked_queries(queries, q.shape[0], T)

    def columns(log_p, logits, q_idx, kv_idx):
        d = query_positions(q_idx, T, S)[:, None] - kv_idx[None, :]
        near = (d >= lo) if hi is None else (d >= lo) & (d <= hi)
        if rows_on is not None:
            near = near & jnp.take(rows_on, q_idx, axis=1, mode="clip")[:, None, :, None]
        counted = jnp.isfinite(logits) & near
        return None, (jnp.sum(jnp.where(counted, jnp.exp(log_p), 0.0), axis=2),
                      jnp.sum(counted, axis=2, dtype=jnp.float32))

    mass, count = scan_query_tiles(q, k, columns, mask=mask, bias=bias, scale=scale,
                                   logits_soft_cap=logits_soft_cap, block_q=block_q)[1]
    return jnp.where(count > 0, mass / jnp.maximum(count, 1.0), 0.0)


def windowed_attention_distance_of_map(probabilities: jax.Array, window: Optional[int] = WAAD_WINDOW) -> jax.Array:
    """WAAD (eq. 9) of each row of a dense map ``[..., T, S] -> [..., T]``; query row ``t`` at position
    ``t + S − T``; ``window`` None: unclipped."""
    _check_window(window)
    p = jnp.asarray(probabilities, jnp.float32)
    T, S = p.shape[-2:]
    return jnp.sum(p * _backward_distance(query_positions(jnp.arange(T), T, S), jnp.arange(S), window), axis=-1)


def future_attention_influence_of_map(probabilities: jax.Array, horizon: tuple[int, Optional[int]] = FAI_HORIZON,
                                      allowed: Optional[jax.Array] = None,
                                      queries: Optional[jax.Array] = None) -> jax.Array:
    """FAI (eq. 10) of each key of a dense map ``[..., T, S] -> [..., S]``.

    ``allowed`` (bool, broadcastable to the map) says which pairs exist (default all); ``queries`` (bool,
    broadcastable to ``[..., T]``) which query rows count (default all).
    """
    _check_horizon(horizon)
    p = jnp.asarray(probabilities, jnp.float32)
    T, S = p.shape[-2:]
    lo, hi = horizon
    d = query_positions(jnp.arange(T), T, S)[:, None] - jnp.arange(S)[None, :]
    counted = jnp.broadcast_to((d >= lo) if hi is None else (d >= lo) & (d <= hi), p.shape)
    if allowed is not None:
        counted = counted & jnp.asarray(allowed, bool)
    if queries is not None:
        counted = counted & jnp.asarray(queries, bool)[..., :, None]
    count = jnp.sum(counted, axis=-2, dtype=jnp.float32)
    return jnp.where(count > 0, jnp.sum(jnp.where(counted, p, 0.0), axis=-2) / jnp.maximum(count, 1.0), 0.0)


def head_span(distances: jax.Array, queries: Optional[jax.Array] = None) -> jax.Array:
    """The head span ``d`` of eq. 7: the mean over the selected query rows of the unclipped distance.

    Args:
      distances: ``[..., T]``, e.g. ``windowed_attention_distance(q, k, window=None, mask=Causal())``.
      queries: bool broadcastable to ``[..., T]``, the rows ``R`` (the paper: the response tokens); default all.

    Returns:
      ``[...]`` float32 (0 where no row is selected).
    """
    x = jnp.asarray(distances, jnp.float32)
    sel = jnp.ones(x.shape, bool) if queries is None else jnp.broadcast_to(jnp.asarray(queries, bool), x.shape)
    n = jnp.sum(sel, axis=-1, dtype=jnp.float32)
    return jnp.where(n > 0, jnp.sum(jnp.where(sel, x, 0.0), axis=-1) / jnp.maximum(n, 1.0), 0.0)


def split_heads_by_span(spans: jax.Array, fraction: float = SPAN_FRACTION) -> tuple[np.ndarray, np.ndarray]:
    """The local and global head groups of sec. 4.1: the ``fraction`` of heads with the smallest and the
    largest span.

    Args:
      spans: the head spans over every head considered, any shape (e.g. ``[L, H]``, averaged over prompts).
      fraction: in ``(0, 0.5]``; 0.3 in the paper. Each group has ``max(1, floor(fraction·n))`` of the
        ``n`` heads (ties broken by flat index).

    Returns:
      ``(local, global)``: boolean NumPy arrays shaped like ``spans`` (concrete, for selecting heads).
    """
    check_scalar("fraction", fraction)
    if not 0 < fraction <= 0.5:
        raise ValueError(f"fraction must be in (0, 0.5], got {fraction}")
    flat = np.asarray(spans, np.float64).ravel()
    if flat.size == 0:
        raise ValueError(f"spans must hold at least one head, got shape {list(np.shape(spans))}")
    n = max(1, int(np.floor(fraction * flat.size)))
    order = np.argsort(flat, kind="stable")
    local, global_ = np.zeros(flat.size, bool), np.zeros(flat.size, bool)
    local[order[:n]] = True
    global_[order[flat.size - n:]] = True
    return local.reshape(np.shape(spans)), global_.reshape(np.shape(spans))


__all__ = ["WAAD_WINDOW", "FAI_HORIZON", "SPAN_FRACTION", "windowed_attention_distance",
           "future_attention_influence", "windowed_attention_distance_of_map", "future_attention_influence_of_map",
           "head_span", "split_heads_by_span"]
