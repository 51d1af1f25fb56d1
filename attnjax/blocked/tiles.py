"""Tile layouts of the blocked XLA paths of the softmax family (flash, stick-breaking, block-sparse).

Queries are cut into ``[nq, B, Hkv, G, block, E]`` tiles (grouped by KV head, so GQA never repeats
K/V; ``G = Hq // Hkv``), keys and values into ``[B, Hkv, S_padded, E]``; with separate K and V head
counts a tile is grouped by K's heads and ``regroup``-ed to V's for the value products.
Accumulators along the sequence and the gradient of a broadcastable bias are updated one tile at a time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.bias import ArrayBias
from attnjax.tiling import num_tiles, pad_axis, rank4


def q_tiles(x: jax.Array, block: int, num_kv_heads: int) -> jax.Array:
    """``[B, T, Hq, E]`` -> ``[nq, B, Hkv, G, block, E]`` (zero-padded)."""
    B, _, H, E = x.shape
    x = pad_axis(x, 1, block)
    x = x.reshape(B, -1, block, num_kv_heads, H // num_kv_heads, E)
    return x.transpose(1, 0, 3, 4, 2, 5)


def row_tiles(x: jax.Array, block: int, num_kv_heads: int) -> jax.Array:
    """``[B, T, Hq]`` -> ``[nq, B, Hkv, G, block]`` (zero-padded)."""
    return q_tiles(x[..., None], block, num_kv_heads)[..., 0]


def regroup(x: jax.Array, num_heads: int) -> jax.Array:
    """``[B, H1, G1, ...]`` -> ``[B, num_heads, Hq // num_heads, ...]`` with ``Hq = H1·G1``: the query
    heads of a tile grouped by another head count (K's -> V's under the "kv_heads" option, where
    query head ``h = hk·Gk + g = hv·Gv + g'``). A reshape, no copy of K or V."""
    if x.shape[1] == num_heads:
        return x
    return x.reshape(x.shape[0], num_heads, x.shape[1] * x.shape[2] // num_heads, *x.shape[3:])


def untile(x: jax.Array, T: int) -> jax.Array:
    """Inverse of ``q_tiles``/``row_tiles``: ``[nq, B, Hkv, G, bq, ...]`` -> ``[B, T, Hq, ...]``."""
    nq, B, Hkv, G, bq = x.shape[:5]
    x = jnp.moveaxis(x, 4, 1)  # [nq, bq, B, Hkv, G, ...]
    x = jnp.moveaxis(x, (0, 1), (1, 2))  # [B, nq, bq, Hkv, G, ...]
    return x.reshape(B, nq * bq, Hkv * G, *x.shape[5:])[:, :T]


def kv_tiles(x: jax.Array, block: int) -> jax.Array:
    """``[B, S, Hkv, E]`` -> ``[B, Hkv, S_padded, E]``."""
    return pad_axis(x, 1, block).transpose(0, 2, 1, 3)


def add_slice(acc: jax.Array, update: jax.Array, start) -> jax.Array:
    """``acc[:, :, start:start+n] += update`` along the sequence axis (axis 2)."""
    current = lax.dynamic_slice_in_dim(acc, start, update.shape[2], axis=2)
    return lax.dynamic_update_slice_in_dim(acc, current + update, start, axis=2)


def padded_bias_shape(shape: tuple, T: int, bq: int, S: int, bk: int) -> tuple:
    """A rank-4 bias shape with its non-broadcast sequence axes padded to whole tiles."""
    Bb, Hb, Tb, Sb = shape
    return (Bb, Hb, num_tiles(T, bq) * bq if Tb > 1 else 1, num_tiles(S, bk) * bk if Sb > 1 else 1)


def add_bias_tile(dbias: jax.Array, ds: jax.Array, bias_shape, q_start, kv_start) -> jax.Array:
    """Add a ``[B, Hkv, G, bq, bk]`` logit gradient into the (padded) bias gradient."""
    B, Hkv, G, bq, bk = ds.shape
    ds = ds.reshape(B, Hkv * G, bq, bk)
    axes = tuple(a for a, d in enumerate(bias_shape) if d == 1 and ds.shape[a] != 1)
    ds = ds.sum(axis=axes, keepdims=True)
    starts = (0, 0, q_start if bias_shape[2] > 1 else 0, kv_start if bias_shape[3] > 1 else 0)
    current = lax.dynamic_slice(dbias, starts, ds.shape)
    return lax.dynamic_update_slice(dbias, current + ds, starts)


def bias_grad_init(bias, T: int, block_q: int, S: int, block_kv: int):
    """``(bias4, dbias0)``: a rank-4 view of an array bias and its float32 zero gradient over the padded
    tiles (``(None, 0.0)`` when the bias is not a learnable array)."""
    if not isinstance(bias, ArrayBias):
        return None, jnp.zeros((), jnp.float32)
    bias4 = rank4(bias.array)
    return bias4, jnp.zeros(padded_bias_shape(bias4.shape, T, block_q, S, block_kv), jnp.float32)


def finish_grads(dq_tiles: jax.Array, dk: jax.Array, dv: jax.Array, dbias: jax.Array, q: jax.Array, k: jax.Array,
                 v: jax.Array, bias):
    """Tiled float32 gradients back to the inputs' layouts and dtypes: ``(dq, dk, dv, d_bias)``.

    ``dq_tiles [nq, B, Hkv, G, bq, D]``, ``dk``/``dv [B, Hkv, S_padded, E]``, ``dbias`` from
    ``bias_grad_init`` (``d_bias`` is an ``ArrayBias`` for an array bias, else None).
    """
    T, S = q.shape[1], k.shape[1]
    dq = untile(dq_tiles, T).astype(q.dtype)
    dk = dk.transpose(0, 2, 1, 3)[:, :S].astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3)[:, :S].astype(v.dtype)
    if not isinstance(bias, ArrayBias):
        return dq, dk, dv, None
    Tb, Sb = rank4(bias.array).shape[2:]
    return dq, dk, dv, ArrayBias(dbias[:, :, :Tb, :Sb].reshape(bias.array.shape).astype(bias.array.dtype))


__all__ = ["q_tiles", "row_tiles", "regroup", "untile", "kv_tiles", "add_slice", "padded_bias_shape", "add_bias_tile",
           "bias_grad_init", "finish_grads"]
