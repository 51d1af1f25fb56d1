"""Tile-pooled attention maps, computed without the ``T × S`` map: what content-based selectors rank.

``pooled_attention(q, k, pool="max")`` is SeerAttention's ground truth before row normalization;
``pool="sum"`` is the attention mass per tile that PAROAttention concentrates. Both come from
the softmax map ``P = softmax_s(scale·q_t·k_s | mask)`` pooled over each (query block, key block)
tile. The row log-sum-exp comes from ``flash_attention_xla(..., return_lse=True)``; then each
query tile walks its non-empty key tiles (``masks.block_schedule``) and pools ``exp(s − lse)``, so
memory is O(T·block), never O(T·S). ``pooled_attention_reference`` builds the dense map.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import masks as _masks
from attnjax.masks import Mask, block_schedule
from attnjax.blocked.flash_xla import flash_attention_xla
from attnjax.blocked.scores import allowed, dense_operands, raw_logits, score_spec
from attnjax.blocked.tiles import kv_tiles, q_tiles, row_tiles
from attnjax.meshes import vary_like
from attnjax.tiling import num_tiles, pad_axis

POOLS = ("max", "sum")


def _check_pool(pool: str) -> None:
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")


def pooled_attention_reference(
    q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int, pool: str = "max", mask: Optional[Mask] = None,
    scale: Optional[float] = None,
) -> jax.Array:
    """Dense reference of ``pooled_attention``: builds the whole ``[B, Hq, T, S]`` map."""
    _check_pool(pool)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, T, Hq, _ = q.shape
    S = k.shape[1]
    spec = score_spec(q, k, scale)
    qg, kt, _, q_idx, kv_idx = dense_operands(q, k, k[..., :1])
    s = raw_logits(qg, kt, q_idx, kv_idx, None, spec)
    ok = allowed(mask, q_idx, kv_idx, spec)
    m = jnp.max(jnp.where(ok, s, -jnp.inf), -1, keepdims=True)
    e = jnp.where(ok, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    total = e.sum(-1, keepdims=True)
    p = (e / jnp.where(total > 0, total, 1.0)).reshape(B, Hq, T, S)
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    tiles = pad_axis(pad_axis(p, 2, block_q), 3, block_kv).reshape(B, Hq, nq, block_q, nk, block_kv)
    return tiles.max(axis=(3, 5)) if pool == "max" else tiles.sum(axis=(3, 5))


def pooled_attention(
    q: jax.Array, k: jax.Array, *, block_q: int, block_kv: int, pool: str = "max", mask: Optional[Mask] = None,
    scale: Optional[float] = None,
) -> jax.Array:
    """The softmax attention map pooled per tile, blocked (module docstring).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` (GQA: query head ``h`` reads KV head ``h // G``).
      block_q, block_kv: the pooling tile.
      pool: "max" (``max_{t∈i, s∈j} P[t, s]``) or "sum" (``Σ_{t∈i, s∈j} P[t, s]``).
      mask: optional ``attnjax.masks`` value; scale: default ``1/sqrt(D)``.
    Returns:
      float32 ``[B, Hq, nq, nk]``; a row that sees no key contributes 0. No gradient flows.
    """
    _check_pool(pool)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    B, T, Hq, _ = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    spec = score_spec(q, k, scale)
    _, lse = flash_attention_xla(q, k, vary_like(jnp.zeros((B, S, Hkv, 1), q.dtype), q, k), mask=mask, scale=spec.scale,
                                 return_lse=True)
    nq, nk = num_tiles(T, block_q), num_tiles(S, block_kv)
    codes, lo, hi = block_schedule(mask, T, S, block_q, block_kv)
    kt = kv_tiles(k, block_kv)
    reduce = jnp.max if pool == "max" else jnp.sum

    def q_tile(args):
        i, qi, lse_i = args
        q_idx = i * block_q + jnp.arange(block_q)
        lse_safe = jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)[..., None]
        row_ok = (q_idx < T)[:, None] & jnp.isfinite(lse_i)[..., None]

        def visit(j, acc):
            kv_idx = j * block_kv + jnp.arange(block_kv)
            kj = lax.dynamic_slice_in_dim(kt, j * block_kv, block_kv, axis=2)
            s = raw_logits(qi, kj, q_idx, kv_idx, None, spec)
            ok = allowed(mask, q_idx, kv_idx, spec) & row_ok
            return acc.at[..., j].set(reduce(jnp.where(ok, jnp.exp(s - lse_safe), 0.0), axis=(-1, -2)))

        def body(j, acc):
            return lax.cond(codes[i, j] != _masks.EMPTY, lambda a: visit(j, a), lambda a: a, acc)

        acc0 = vary_like(jnp.zeros((B, Hkv, Hq // Hkv, nk), jnp.float32), q, k, mask)
        return lax.fori_loop(lo[i], hi[i], body, acc0)

    tiles = lax.map(q_tile, (jnp.arange(nq), q_tiles(q, block_q, Hkv), row_tiles(lse, block_q, Hkv)))
    return tiles.transpose(1, 2, 3, 0, 4).reshape(B, Hq, nq, nk)


__all__ = ["pooled_attention", "pooled_attention_reference", "POOLS"]
