"""Causal attention computed for a subset of query positions: the tokens a learned selection lets attend.

Arora et al. 2023, "Zoology: Measuring and Improving Recall in Efficient Language Models"
(arXiv:2312.04927), Sec. 5: sparse attention layers in which only a few *selected tokens attend*; the
learned selection of the official ``zoology/mixers/selective.py`` (``SelectiveLookups``) keeps, at
inference, the ``k = ⌈√T⌉`` tokens of highest score (``top_positions``, ``selection_size``) and computes
causal softmax attention for those query rows only::

    out[b, r] = Σ_{j ≤ p} softmax_j(scale · q[b, i] · k[b, j]) v[b, j],   i = positions[b, r],  p = i + (S − T)

(row ``i`` of ``q`` sits at key position ``i + S − T``, the library's bottom-right alignment,
``masks.query_positions``; ``T == S`` for self-attention). The module is ``attnjax.nn.SelectiveLookups``.

Paths:

- ``selected_query_attention_reference``: dense causal softmax attention of all ``T`` queries
  (``softmax_attention_reference``, the ``[B, H, T, S]`` logits), then the rows ``positions``.
- ``selected_query_attention``: gather the ``R`` selected query rows and run ``attnjax.attention`` on them
  against all keys, under ``masks.Explicit`` of their original positions (row ``r`` sees keys ``≤ p``).
  Cost ``O(B·Hq·R·S·D)`` flops and an ``[B, 1, R, S]`` boolean mask instead of ``O(B·Hq·T·S·D)``; with the
  rows in ascending position (``top_positions`` sorts them) the blocked path's span of key tiles per query
  tile (``masks.block_schedule``) ends at the tile's last position over the batch.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive, check_qkv, concrete_values, describe
from attnjax.softmax.softmax import softmax_attention_reference


def selection_size(length: int) -> int:
    """``⌈√length⌉``: the tokens the official ``SelectiveLookups`` keeps at inference (``math.ceil(math.sqrt(l))``,
    computed exactly with integers)."""
    check_positive(length=length)
    root = math.isqrt(length)
    return root if root * root == length else root + 1


def top_positions(scores: jax.Array, count: int) -> jax.Array:
    """The ``count`` positions of highest score per sequence, in ascending order.

    Args:
      scores: real ``[B, T]``.
      count: positions kept, ``1 <= count <= T``.
    Returns:
      int32 ``[B, count]``, distinct, ascending; among equal scores the earlier position wins (``lax.top_k``).
    """
    if getattr(scores, "ndim", None) != 2 or not jnp.issubdtype(scores.dtype, jnp.floating):
        raise ValueError(f"scores must be a floating-point [batch, length] array, got {describe(scores)}")
    check_positive(count=count)
    if count > scores.shape[1]:
        raise ValueError(f"count ({count}) must be <= the length of scores {list(scores.shape)}")
    return jnp.sort(jax.lax.top_k(scores, count)[1], axis=-1).astype(jnp.int32)


def check_positions(q: jax.Array, positions: jax.Array) -> None:
    """``ValueError`` unless ``positions`` is an integer ``[B, R]`` of rows of q ``[B, T, Hq, D]`` (values in
    ``[0, T)`` are checked when known at trace time)."""
    if (getattr(positions, "ndim", None) != 2 or positions.shape[0] != q.shape[0]
            or not jnp.issubdtype(positions.dtype, jnp.integer)):
        raise ValueError(f"positions must be integer query rows [batch, R] = [{q.shape[0]}, R] of q {list(q.shape)}, "
                         f"got {describe(positions)}")
    values = concrete_values(positions)
    if values is not None and values.size and (values.min() < 0 or values.max() >= q.shape[1]):
        raise ValueError(f"positions must lie in [0, {q.shape[1]}) (the rows of q {list(q.shape)}), got values in "
                         f"[{int(np.min(values))}, {int(np.max(values))}]")


def _rows(x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x[b, positions[b]]``: ``[B, T, ...]`` and ``[B, R]`` -> ``[B, R, ...]``."""
    return jnp.take_along_axis(x, positions.reshape(positions.shape + (1,) * (x.ndim - 2)), axis=1)


def selected_query_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
                                       scale: Optional[float] = None) -> jax.Array:
    """Dense causal softmax attention at every query position, then the rows ``positions`` (float32 logits).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (GQA as ``attnjax.attention``).
      positions: int ``[B, R]``, query rows in ``[0, T)``.
      scale: logit scale, default ``1/√D``.
    Returns:
      ``[B, R, Hq, Dv]`` in q's dtype; row ``r`` is query ``positions[b, r]``'s causal attention output.
    """
    check_qkv(q, k, v)
    check_positions(q, positions)
    return _rows(softmax_attention_reference(q, k, v, mask=masks.Causal(), scale=scale), positions)


def selected_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
                             scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Causal softmax attention for the query rows ``positions`` only, equal to
    ``selected_query_attention_reference``.

    The ``R`` rows are gathered and attend to all ``S`` keys through ``attnjax.attention`` under
    ``masks.Explicit`` of their original positions: ``O(B·Hq·R·S·D)`` flops, an ``[B, 1, R, S]`` mask.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]`` (GQA as ``attnjax.attention``).
      positions: int ``[B, R]``, query rows in ``[0, T)`` (any order; duplicates give equal rows).
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention``.
    Returns:
      ``[B, R, Hq, Dv]`` in q's dtype.
    """
    check_qkv(q, k, v)
    check_positions(q, positions)
    T, S = q.shape[1], k.shape[1]
    seen = masks.query_positions(positions, T, S)[:, None, :, None] >= jnp.arange(S)  # [B, 1, R, S]
    return attention(_rows(q, positions), k, v, mask=masks.Explicit(seen), scale=scale,
                     implementation=implementation)


__all__ = ["selection_size", "top_positions", "check_positions", "selected_query_attention",
           "selected_query_attention_reference"]
