"""Tile layouts of the blocked XLA paths of the softmax family (flash, stick-breaking, block-sparse).

Queries are cut into ``[nq, B, Hkv, G, block, E]`` tiles (grouped by KV head, so GQA never repeats
K/V; ``G = Hq // Hkv``), keys and values into ``[B, Hkv, S_padded, E]``; with separate K and V head
counts a tile is grouped by K's heads and ``regroup``-ed to V's for the value products.
Accumulators along the sequence and the gradient of a bias (an array, or a rule's learned leaves) are
updated one tile at a time.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.bias import ArrayBias, Bias
from attnjax.blocked.scores import ScoreSpec, raw_logits, with_bias
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


def switch_key_tile(code, visit: Callable, small, tile_zeros):
    """One key tile under its block-summary code (0 empty, 1 partial, 2 full, as ``masks.block_schedule``).

    ``visit(small, apply_mask) -> (small, tiles)``; an empty tile gives ``(small, tile_zeros)``. Backward
    passes return a key tile's gradients (dK, dV, an array bias's) as ``tiles`` and add them to their
    full-length accumulators after the switch: a full-length buffer passed through a conditional is copied
    at every key tile, which makes a backward grow as S².
    """
    return lax.switch(code, [lambda c: (c, tile_zeros), lambda c: visit(c, True), lambda c: visit(c, False)], small)


def padded_bias_shape(shape: tuple, T: int, bq: int, S: int, bk: int) -> tuple:
    """A rank-4 bias shape with its non-broadcast sequence axes padded to whole tiles."""
    Bb, Hb, Tb, Sb = shape
    return (Bb, Hb, num_tiles(T, bq) * bq if Tb > 1 else 1, num_tiles(S, bk) * bk if Sb > 1 else 1)


def _sum_to(x: jax.Array, shape: tuple) -> jax.Array:
    """Sum the axes of ``x`` that ``shape`` broadcasts (size 1), keeping rank."""
    return x.sum(axis=tuple(a for a, d in enumerate(shape) if d == 1 and x.shape[a] != 1), keepdims=True)


def _float_leaves(bias: Bias) -> tuple[list, list[bool], jax.tree_util.PyTreeDef]:
    leaves, treedef = jax.tree_util.tree_flatten(bias)
    return leaves, [jnp.issubdtype(jnp.result_type(x), jnp.floating) for x in leaves], treedef


def _with_float_leaves(bias: Bias, values: list) -> Bias:
    leaves, floating, treedef = _float_leaves(bias)
    it = iter(values)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if f else x for x, f in zip(leaves, floating)])


def bias_grad_init(bias: Optional[Bias], T: int, block_q: int, S: int, block_kv: int):
    """The float32 zero gradient accumulator of a learnable bias, ``None`` when it has no gradient.

    An array bias: its rank-4 shape padded to whole tiles. A rule (``bias.differentiable``, e.g. T5's
    table): zeros like its float leaves.
    """
    if isinstance(bias, ArrayBias):
        shape = padded_bias_shape(rank4(bias.array).shape, T, block_q, S, block_kv)
        return jnp.zeros(shape, jnp.float32)
    if bias is None or not bias.differentiable:
        return None
    leaves, floating, _ = _float_leaves(bias)
    return [jnp.zeros(jnp.shape(x), jnp.float32) for x, f in zip(leaves, floating) if f]


def logits_with_bias_pullback(qi: jax.Array, kj: jax.Array, q_idx: jax.Array, kv_idx: jax.Array,
                              bias: Optional[Bias], spec: ScoreSpec, dbias):
    """``raw_logits`` of a backward tile, and the pullback of its bias tile, built once for ``add_bias_grad``.

    Returns ``(raw [B, Hkv, G, tq, tk] float32, pullback)``. ``pullback`` is None unless the bias is a rule
    whose float leaves get gradients (``dbias`` is not None) or that reads the queries: then it is the
    ``jax.vjp`` of its ``tile`` (or ``query_tile`` at the float32 queries) and that tile's shape.
    """
    rule = bias is not None and not isinstance(bias, ArrayBias)
    if not (rule and (dbias is not None or bias.reads_queries)):
        return raw_logits(qi, kj, q_idx, kv_idx, bias, spec), None
    leaves, floating, _ = _float_leaves(bias)
    params = [x for x, f in zip(leaves, floating) if f]
    if bias.reads_queries:
        B, Hkv, G, tq, D = qi.shape
        q_flat = qi.reshape(B, Hkv * G, tq, D).astype(jnp.float32)
        tile, pull = jax.vjp(lambda p, x: _with_float_leaves(bias, p).query_tile(x, q_idx, kv_idx, spec.T, spec.S),
                             params, q_flat)
    else:
        tile, pull = jax.vjp(lambda p: _with_float_leaves(bias, p).tile(q_idx, kv_idx, spec.T, spec.S), params)
    return with_bias(raw_logits(qi, kj, q_idx, kv_idx, None, spec), tile, spec), (pull, tile.shape)


def add_bias_grad(dbias, ds: jax.Array, bias: Optional[Bias], pullback, q_idx: jax.Array, kv_idx: jax.Array):
    """Add one tile's raw-logit gradient ``ds [B, Hkv, G, tq, tk]`` to the bias gradient ``dbias``.

    Returns ``(dbias, dq)``: ``dq [B, Hkv, G, tq, D]`` is the bias's share of the queries' gradient when
    it reads them (``bias.reads_queries``, e.g. Music Transformer's ``q·E_(j−i)``), else 0. An array
    bias adds ``ds`` (summed over its broadcast axes) into its padded slice; a rule applies the
    ``pullback`` from ``logits_with_bias_pullback`` (no second tile evaluation).
    """
    B, Hkv, G, tq, tk = ds.shape
    flat = ds.reshape(B, Hkv * G, tq, tk)
    if isinstance(bias, ArrayBias):
        shape = rank4(bias.array).shape
        flat = _sum_to(flat, shape)
        starts = (0, 0, q_idx[0] if shape[2] > 1 else 0, kv_idx[0] if shape[3] > 1 else 0)
        current = lax.dynamic_slice(dbias, starts, flat.shape)
        return lax.dynamic_update_slice(dbias, current + flat, starts), 0.0
    if pullback is None:
        return dbias, 0.0
    pull, shape = pullback
    if bias.reads_queries:
        d_params, dq = pull(_sum_to(flat, shape))
        dq = dq.reshape(B, Hkv, G, tq, -1)
    else:
        (d_params,), dq = pull(_sum_to(flat, shape)), 0.0
    if dbias is not None:
        dbias = [acc + g.astype(jnp.float32) for acc, g in zip(dbias, d_params)]
    return dbias, dq


def finish_grads(dq_tiles: jax.Array, dk: jax.Array, dv: jax.Array, dbias, q: jax.Array, k: jax.Array,
                 v: jax.Array, bias: Optional[Bias]):
    """Tiled float32 gradients back to the inputs' layouts and dtypes: ``(dq, dk, dv, d_bias)``.

    ``dq_tiles [nq, B, Hkv, G, bq, D]``, ``dk``/``dv [B, Hkv, S_padded, E]``, ``dbias`` from
    ``bias_grad_init``; ``d_bias`` is the bias's cotangent (same type; zeros for integer leaves) or None.
    """
    T, S = q.shape[1], k.shape[1]
    dq = untile(dq_tiles, T).astype(q.dtype)
    dk = dk.transpose(0, 2, 1, 3)[:, :S].astype(k.dtype)
    dv = dv.transpose(0, 2, 1, 3)[:, :S].astype(v.dtype)
    if dbias is None:
        return dq, dk, dv, None
    if isinstance(bias, ArrayBias):
        Tb, Sb = rank4(bias.array).shape[2:]
        return dq, dk, dv, ArrayBias(dbias[:, :, :Tb, :Sb].reshape(bias.array.shape).astype(bias.array.dtype))
    leaves, floating, treedef = _float_leaves(bias)
    grads = iter(dbias)
    cotangents = [next(grads).astype(jnp.result_type(x)) if f else np.zeros(jnp.shape(x), jax.dtypes.float0)
                  for x, f in zip(leaves, floating)]
    return dq, dk, dv, jax.tree_util.tree_unflatten(treedef, cotangents)


__all__ = ["q_tiles", "row_tiles", "regroup", "untile", "kv_tiles", "add_slice", "padded_bias_shape", "bias_grad_init",
           "logits_with_bias_pullback", "add_bias_grad", "finish_grads"]
