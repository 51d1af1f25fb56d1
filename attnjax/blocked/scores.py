"""Logit tiles shared by the softmax-family paths (reference and blocked).

Internal layout: queries grouped by KV head, ``q [B, Hkv, G, tq, D]`` with ``G = Hq // Hkv``
(query head ``h = hk·G + g`` uses KV head ``hk``), keys and values ``[B, Hkv, tk, D]``. So GQA
never repeats K/V. A logit is ``s = cap·tanh((scale·q·k + bias) / cap)`` (the soft cap is
optional), and a mask or a padded key column removes it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.bias import Bias
from attnjax.dropout import keep_mask
from attnjax.masks import Mask


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    """Static description of one attention call's logits."""

    T: int
    S: int
    num_kv_heads: int
    scale: float
    logits_soft_cap: Optional[float] = None
    dropout_rate: float = 0.0


def score_spec(q: jax.Array, k: jax.Array, scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
               dropout_rate: float = 0.0) -> ScoreSpec:
    """The ``ScoreSpec`` of ``q [B, T, Hq, D]`` against ``k [B, S, Hkv, D]``; ``scale`` defaults to ``1/sqrt(D)``."""
    return ScoreSpec(T=q.shape[1], S=k.shape[1], num_kv_heads=k.shape[2],
                     scale=q.shape[-1] ** -0.5 if scale is None else scale, logits_soft_cap=logits_soft_cap,
                     dropout_rate=dropout_rate)


def dense_operands(q: jax.Array, k: jax.Array, v: jax.Array):
    """Whole-sequence operands of a dense (reference) path in the internal layout.

    Returns ``(qg [B, Hkv, G, T, D], kt [B, Hkv, S, D], vt [B, Hkv, S, Dv], q_idx [T], kv_idx [S])``.
    """
    qg = to_groups(q.transpose(0, 2, 1, 3), k.shape[2])
    return qg, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), jnp.arange(q.shape[1]), jnp.arange(k.shape[1])


def repeat_to_common_heads(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """K ``[B, S, Hk, D]`` and V ``[B, S, Hv, Dv]`` repeated to ``L = lcm(Hk, Hv)`` heads each, for the
    dense references of the "kv_heads" option (DiffQKV, Lin et al. 2025, "Sigma", Fig. 3).

    Head ``c`` of the result holds K head ``c // (L // Hk)`` and V head ``c // (L // Hv)``, so with
    ``Hq % L == 0`` query head ``h`` (group ``c = h // (Hq // L)``) reads K head ``h // (Hq // Hk)``
    and V head ``h // (Hq // Hv)``: the calling convention of ``attnjax.attention`` with one shared
    head count. O(L·S·(D + Dv)) memory; the fast paths read the right head by index instead.
    """
    L = math.lcm(k.shape[2], v.shape[2])
    return jnp.repeat(k, L // k.shape[2], axis=2), jnp.repeat(v, L // v.shape[2], axis=2)


def to_groups(x: jax.Array, num_kv_heads: int) -> jax.Array:
    """``[Bx, Hx, ...]`` with ``Hx`` in {1, Hq} -> ``[Bx, Hkv or 1, G or 1, ...]``."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, x.shape[1] // num_kv_heads, *x.shape[2:])


def raw_logits(q: jax.Array, k: jax.Array, q_idx: jax.Array, kv_idx: jax.Array,
               bias: Optional[Bias], spec: ScoreSpec) -> jax.Array:
    """``scale·q·kᵀ + bias`` in float32, ``[B, Hkv, G, tq, tk]`` (before the soft cap).

    A bias that ``reads_queries`` gets this tile's queries ``q`` as ``[B, Hq, tq, D]``.
    """
    s = jnp.einsum("bhgqd,bhkd->bhgqk", q, k, preferred_element_type=jnp.float32) * spec.scale
    if bias is None:
        return s
    if bias.reads_queries:
        B, Hkv, G, tq, D = q.shape
        b = bias.query_tile(q.reshape(B, Hkv * G, tq, D), q_idx, kv_idx, spec.T, spec.S)
    else:
        b = bias.tile(q_idx, kv_idx, spec.T, spec.S)
    return with_bias(s, b, spec)


def with_bias(s: jax.Array, bias_tile: jax.Array, spec: ScoreSpec) -> jax.Array:
    """``s + bias_tile`` (``[B|1, Hq|1, tq, tk]`` grouped by KV head) behind ``jax.lax.optimization_barrier``.

    The barrier asks XLA to keep the biased logits as one value rather than fusing a rule's elementwise tile
    into each consumer (max, exp). On CPU it does nothing: XLA's CPU pipeline expands the barrier before
    fusion (the optimized HLO has no ``opt-barrier``). There, what decides is XLA's fusion per tile: in the
    softmax ``xla`` path's full tiles ``s + bias`` is materialized once and both the max and the exp read it; in
    tiles that apply a mask (partial tiles: the causal diagonal, padded key columns) the bias chain is fused
    into both, so a rule's elementwise work (not a gather or dot output that is materialized anyway, e.g.
    ``RelativeGridBias``'s conditional) runs twice there. Forcing one materialization (a conditional around
    ``s + bias``) measured no faster for the grid and polyline rules at T = 8k (ratios within 3%, one
    interleaved CPU run)."""
    return jax.lax.optimization_barrier(s + to_groups(bias_tile.astype(jnp.float32), spec.num_kv_heads))


def soft_cap(s: jax.Array, cap: Optional[float]) -> jax.Array:
    """Gemma-2 logit soft cap ``cap·tanh(s/cap)``; identity when ``cap`` is None."""
    return s if cap is None else cap * jnp.tanh(s / cap)


def allowed(mask: Optional[Mask], q_idx: jax.Array, kv_idx: jax.Array, spec: ScoreSpec) -> jax.Array:
    """Mask tile AND "key column is real, not padding": ``[Bm, Hkv|1, G|1, tq, tk]`` bool."""
    in_range = (kv_idx < spec.S)[None, None, None, None, :]
    if mask is None:
        return in_range
    return to_groups(mask.tile(q_idx, kv_idx, spec.T, spec.S), spec.num_kv_heads) & in_range


def dropout_multiplier(seed: jax.Array, batch: int, num_heads: int, q_idx: jax.Array,
                       kv_idx: jax.Array, spec: ScoreSpec) -> jax.Array:
    """``keep / (1 - rate)`` in float32, ``[B, Hkv, G, tq, tk]``."""
    keep = keep_mask(seed, jnp.arange(batch), jnp.arange(num_heads), q_idx, kv_idx, spec.dropout_rate)
    return to_groups(keep, spec.num_kv_heads).astype(jnp.float32) / (1.0 - spec.dropout_rate)
