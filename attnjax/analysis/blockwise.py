"""Statistics of softmax attention maps computed one query tile at a time, never a ``[T, S]`` map.

``scan_query_tiles`` walks the queries in tiles of ``block_q`` rows. Each step forms the tile's logits
against every key, ``s = scale·q·kᵀ + bias`` (optionally soft-capped, masked to ``-inf``), its exact
row log-normalizer ``lse`` and log-probabilities ``log p = s − lse``, and hands them to a reducer that
returns per-row values (kept, ``[B, Hq, tq, ...]``) and per-key values (summed over the tile's rows,
``[B, Hq, S, ...]``). Peak memory is ``O(B·Hq·block_q·S)``, time that of one attention forward
without values. Per-query statistics (entropy, attention distance) are row values, per-key ones (the
attention mass a key receives, sink scores) column sums.

The maps are those of ``attnjax.attention(q, k, v, mask=..., bias=..., scale=...,
logits_soft_cap=...)`` with the softmax mechanism: the same scale, bias, soft cap, masks and GQA
layout (query head ``h`` reads key head ``h // (Hq // Hkv)``). A row with no allowed key has
``log p = -inf`` everywhere (it attends to nothing), as do the padding rows of the last tile.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.bias import Bias, as_bias
from attnjax.blocked.scores import allowed, raw_logits, score_spec, soft_cap, to_groups
from attnjax.checks import check_options, check_positive, check_qk
from attnjax.masks import Mask
from attnjax.meshes import vary_like
from attnjax.tiling import num_tiles

TileReducer = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[Any, Any]]
"""``(log_p, logits, q_idx, kv_idx) -> (rows, columns)``: ``log_p`` and ``logits`` are float32
``[B, Hq, tq, S]`` (``-inf`` where masked), ``q_idx [tq]`` the query rows (``>= T`` for padding),
``kv_idx [S]``; ``rows`` a pytree of ``[B, Hq, tq, ...]`` arrays, ``columns`` a pytree of ``[B, Hq, S, ...]``
arrays that the scan sums over tiles (``None`` for either when unused)."""


PairReducer = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], tuple[Any, Any]]
"""``(log_p1, log_p2, q_idx, kv_idx) -> (rows, columns)``: the two maps' float32 log-probabilities of one query
tile, ``[B, Hq, tq, S]`` each (``-inf`` where masked and on padding rows ``q_idx >= T``); ``rows`` and
``columns`` as in ``TileReducer``."""


def tile_log_probabilities(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias: Optional[Bias] = None,
                           scale: Optional[float] = None,
                           logits_soft_cap: Optional[float] = None) -> Callable[[jax.Array], tuple[jax.Array, jax.Array]]:
    """``q_idx -> (log_p, logits)``: the map's rows ``q_idx [tq]`` (``>= T`` for padding rows), float32
    ``[B, Hq, tq, S]``, ``-inf`` where masked; ``q [B, T, Hq, D]``, ``k [B, S, Hkv, D]`` and the options as
    ``scan_query_tiles`` (already checked; ``bias`` a ``Bias`` or None)."""
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale, logits_soft_cap)
    kt, kv_idx = k.transpose(0, 2, 1, 3), jnp.arange(S)

    def rows(q_idx: jax.Array) -> tuple[jax.Array, jax.Array]:
        qi = to_groups(jnp.take(q, q_idx, axis=1, mode="clip").transpose(0, 2, 1, 3), Hkv)
        s = soft_cap(raw_logits(qi, kt, q_idx, kv_idx, bias, spec), logits_soft_cap)
        keep = allowed(mask, q_idx, kv_idx, spec) & (q_idx < T)[:, None]
        s = jnp.where(keep, s, -jnp.inf).reshape(B, Hq, q_idx.shape[0], S)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        return jnp.where(jnp.isfinite(lse), s - lse, -jnp.inf), s

    return rows


def scan_query_tiles(q: jax.Array, k: jax.Array, reduce_tile: TileReducer, *, mask: Optional[Mask] = None,
                     bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                     logits_soft_cap: Optional[float] = None, block_q: int = 128) -> tuple[Any, Any]:
    """Per-row and per-key reductions of the attention map of ``q`` against ``k``, one query tile at a time.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` with ``Hq % Hkv == 0``.
      reduce_tile: see ``TileReducer``.
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention`` (an array bias broadcastable to
        ``[B, Hq, T, S]`` is accepted).
      block_q: query rows per step (memory ``O(B·Hq·block_q·S)``).

    Returns:
      ``(rows, columns)``: the reducer's row values over all queries, ``[B, Hq, T, ...]``, and its column
      values summed over all queries, ``[B, Hq, S, ...]``.
    """
    check_qk(q, k)
    check_positive(block_q=block_q)
    check_options(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=None,
                  dropout_rate=0.0, rng=None)
    bias = as_bias(bias)
    B, T, Hq, _ = q.shape
    block_q = min(block_q, max(T, 1))
    nq = num_tiles(T, block_q)
    log_probabilities = tile_log_probabilities(q, k, mask=mask, bias=bias, scale=scale,
                                               logits_soft_cap=logits_soft_cap)
    kv_idx = jnp.arange(k.shape[1])

    def tile(start: jax.Array):
        q_idx = start + jnp.arange(block_q)
        return reduce_tile(*log_probabilities(q_idx), q_idx, kv_idx)

    cols_struct = jax.eval_shape(tile, jnp.int32(0))[1]

    def step(columns, start):
        rows, cols = tile(start)
        return jax.tree.map(jnp.add, columns, cols), rows

    init = vary_like(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), cols_struct), q, k)
    columns, rows = lax.scan(step, init, jnp.arange(nq) * block_q)
    rows = jax.tree.map(lambda r: jnp.moveaxis(r, 0, 2).reshape(B, Hq, nq * block_q, *r.shape[4:])[:, :, :T], rows)
    return rows, columns


def scan_query_tiles_pair(q1: jax.Array, k1: jax.Array, q2: jax.Array, k2: jax.Array, reduce_tile: PairReducer, *,
                          mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                          scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                          block_q: int = 128) -> tuple[Any, Any]:
    """Per-row and per-key reductions of two softmax maps over the same tokens, one query tile at a time
    (a teacher's and a student's, two layers'): both maps' rows of a tile are formed side by side.

    Args:
      q1, k1: the first map's ``[B, T, Hq, D1]`` and ``[B, S, Hkv1, D1]``.
      q2, k2: the second map's ``[B, T, Hq, D2]`` and ``[B, S, Hkv2, D2]``; head dims and KV heads may differ.
      reduce_tile: see ``PairReducer``.
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``, applied to both maps (``scale`` defaults
        to each map's ``1/√D``).
      block_q: query rows per step; memory ``O(B·Hq·block_q·S)`` per map.

    Returns:
      ``(rows, columns)`` as ``scan_query_tiles``. Differentiable in all four inputs.
    """
    check_qk(q1, k1)
    check_qk(q2, k2)
    if q1.shape[:3] != q2.shape[:3] or k1.shape[:2] != k2.shape[:2]:
        raise ValueError(f"the two maps must share B, T, Hq and S: q1 {list(q1.shape)}, k1 {list(k1.shape)}, "
                         f"q2 {list(q2.shape)}, k2 {list(k2.shape)}")
    check_options(q2, k2, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap, sinks=None,
                  dropout_rate=0.0, rng=None)
    second = tile_log_probabilities(q2, k2, mask=mask, bias=as_bias(bias), scale=scale,
                                    logits_soft_cap=logits_soft_cap)

    def tile(log_p1, logits1, q_idx, kv_idx):
        return reduce_tile(log_p1, second(q_idx)[0], q_idx, kv_idx)

    return scan_query_tiles(q1, k1, tile, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)


def dense_log_probabilities(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                            bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                            logits_soft_cap: Optional[float] = None) -> jax.Array:
    """The whole map's ``log p [B, Hq, T, S]`` (``-inf`` where masked): the small-input reference of
    ``scan_query_tiles`` and the entry point for tools that need the full map."""
    def whole(log_p, s, q_idx, kv_idx):
        return log_p, None

    return scan_query_tiles(q, k, whole, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=max(q.shape[1], 1))[0]


__all__ = ["TileReducer", "PairReducer", "tile_log_probabilities", "scan_query_tiles",
           "scan_query_tiles_pair", "dense_log_probabilities"]
