"""The XLA path of the block-sparse engine: gather the listed key tiles slot by slot.

FlashAttention-2's online softmax (Dao, "FlashAttention-2: Faster Attention with Better
Parallelism and Work Partitioning", 2023) over the key blocks that ``attnjax.sparse.BlockSparse``
lists for each (batch, query head, query block), as in block-sparse FlashAttention (Dao et al.,
"FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", 2022).

Forward: query blocks are taken in chunks (about ``TILE_ELEMENTS_PER_STEP`` logits per step), and
each chunk loops over the list slots ``j`` below its largest count. At slot ``j`` every query block
``(b, h, i)`` of the chunk gathers its key/value tile ``indices[b, h, i, j]`` (from KV head
``h // G``: GQA never repeats K/V, and lists shared by all heads gather once per KV head), computes
the ``[bq, bk]`` logit tile, masks padded keys, unused slots (``j ≥ count``) and the fine mask, and
updates the running max ``m``, normalizer ``l`` and accumulator in float32. Only one slot's tiles
are live at a time: memory is O(B·H·T·Dv) plus one step's tiles, never O(K·T·bk).

Backward (custom VJP, recompute): the same loop rebuilds ``P = exp(s − lse)`` tile by tile; with
``δ_i = dO_i·O_i``, ``dS = P ⊙ (dO·Vᵀ − δ + dlse)`` (times ``1 − (s/cap)²`` under a soft cap).
``dQ`` accumulates per query block, ``dK`` and ``dV`` by scatter-add into the listed key tiles, all
in float32.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.masks import Mask
from attnjax.softmax.tiles import kv_tiles, q_tiles, row_tiles, untile
from attnjax.softmax.scores import ScoreSpec, score_spec, soft_cap, to_groups
from attnjax.softmax.weights import SOFTMAX, backward_stat
from attnjax.sparse.lists import BlockSparse
from attnjax.tiling import pad_axis

TILE_ELEMENTS_PER_STEP = 2 ** 18
"""Logit elements one loop step works on: query blocks are processed in chunks of about this many
``bq × bk`` tile elements (over batch and heads), so a step's tiles stay cache-sized on CPU."""


@dataclasses.dataclass(frozen=True)
class _Static:
    spec: ScoreSpec
    block_q: int
    block_kv: int
    chunk: int
    """Query blocks per chunk; each chunk loops over its own largest count of slots."""


def block_sparse_attention_xla(
    q: jax.Array, k: jax.Array, v: jax.Array, blocks: BlockSparse, *, mask: Optional[Mask] = None,
    scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, return_lse: bool = False,
):
    """Block-sparse softmax attention by gathering the listed key tiles (FlashAttention-2 in XLA).

    ``out_i = Σ_j softmax_j(s_ij) v_j`` over keys ``j`` whose block is listed for ``i``'s block and
    that ``mask`` allows; ``s_ij = cap·tanh(scale·q_i·k_j / cap)`` (cap optional).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      blocks: lists with indices ``[Bl, Hl, nq, K]`` (``Bl ∈ {1, B}``, ``Hl ∈ {1, Hq}``), static
        (NumPy) or dynamic (jax arrays, e.g. computed under jit).
      mask: optional fine mask applied inside the visited tiles.
      scale: logit scale, default ``1/sqrt(D)``; logits_soft_cap: ``cap``.
      return_lse: also return the float32 log-sum-exp ``[B, T, Hq]`` (``-inf`` for rows that see
        no key; their output is 0).
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype, or ``(out, lse)``. Differentiable in q, k, v (and through lse).
    """
    B, _, Hq, _ = q.shape
    bq, bk = blocks.block_q, blocks.block_kv
    chunk = max(1, min(blocks.num_q_blocks, TILE_ELEMENTS_PER_STEP // (B * Hq * bq * bk)))
    st = _Static(score_spec(q, k, scale, logits_soft_cap), block_q=bq, block_kv=bk, chunk=chunk)
    indices = jnp.asarray(blocks.indices, jnp.int32)
    counts = jnp.asarray(blocks.counts, jnp.int32)
    out, lse = _sparse(q, k, v, indices, counts, mask, st)
    return (out, lse) if return_lse else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _sparse(q, k, v, indices, counts, mask, st):
    return _forward(q, k, v, indices, counts, mask, st)


def _chunked(x: jax.Array, chunk: int) -> jax.Array:
    """``[nq, ...]`` -> ``[nc, chunk, ...]``, zero-padded."""
    x = pad_axis(x, 0, chunk)
    return x.reshape(-1, chunk, *x.shape[1:])


def _unchunked(x: jax.Array, nq: int) -> jax.Array:
    """Inverse of ``_chunked``."""
    return x.reshape(-1, *x.shape[2:])[:nq]


def _chunk_lists(indices: jax.Array, counts: jax.Array, st: _Static) -> dict:
    """The lists cut into chunks of query blocks (padded blocks have count 0), leading axis ``nc``.

    ``grouped`` int32 ``[nc, K, c, Bl, Hkv|1, G|1]`` (gathers), ``flat`` ``[nc, K, Bl, Hl, c]``
    (the fine mask works on query heads), ``counts`` ``[nc, c, Bl, Hkv|1, G|1]``, ``first`` ``[nc]``
    (the chunk's first query block).
    """
    c = st.chunk
    indices = pad_axis(indices, 2, c)
    counts = pad_axis(counts, 2, c)
    Bl, Hl, nq_pad, K = indices.shape
    split = indices.reshape(Bl, Hl, -1, c, K)
    grouped = to_groups(split, st.spec.num_kv_heads).transpose(3, 5, 4, 0, 1, 2)
    flat = split.transpose(2, 4, 0, 1, 3)
    counts = to_groups(counts.reshape(Bl, Hl, -1, c), st.spec.num_kv_heads).transpose(3, 4, 0, 1, 2)
    return dict(grouped=grouped, flat=flat, counts=counts, first=jnp.arange(0, nq_pad, c))


def _gather(x: jax.Array, ids: jax.Array) -> jax.Array:
    """Key tiles ``x[b, hk, ids[n, b, hk, g]]`` of ``x [B, Hkv, nk, bk, E]``: ``[c, B, Hkv, G', bk, E]``."""
    B, Hkv = x.shape[:2]
    ids = jnp.broadcast_to(ids, (ids.shape[0], B, Hkv, ids.shape[3]))
    return x[jnp.arange(B)[None, :, None, None], jnp.arange(Hkv)[None, None, :, None], ids]


def _fine_mask(mask: Mask, first: jax.Array, flat_ids: jax.Array, st: _Static) -> jax.Array:
    """``mask.tile`` on each query block's gathered key tile: bool ``[c, Bx, Hkv|1, G|1, bq, bk]``.

    ``flat_ids`` int ``[Bl, Hl, c]`` for query blocks ``first + [0, c)``. Each tile is one
    ``mask.tile`` call; where both the lists and the mask vary over batch (or heads), the call's
    own row is picked.
    """
    bq, bk = st.block_q, st.block_kv
    Bl, Hl, c = flat_ids.shape

    def one(b, h, i, block):
        t = mask.tile(i * bq + jnp.arange(bq), block * bk + jnp.arange(bk), st.spec.T, st.spec.S)
        if Bl > 1 and t.shape[0] > 1:
            t = lax.dynamic_index_in_dim(t, b, axis=0)
        if Hl > 1 and t.shape[1] > 1:
            t = lax.dynamic_index_in_dim(t, h, axis=1)
        return t

    per_block = jax.vmap(one, (None, None, 0, 0))
    per_head = jax.vmap(per_block, (None, 0, None, 0))
    tiles = jax.vmap(per_head, (0, None, None, 0))(jnp.arange(Bl), jnp.arange(Hl), first + jnp.arange(c), flat_ids)
    Bm, Hm = tiles.shape[3:5]
    tiles = tiles.transpose(0, 3, 1, 4, 2, 5, 6).reshape(Bl * Bm, Hl * Hm, c, bq, bk)
    return jnp.moveaxis(to_groups(tiles, st.spec.num_kv_heads), 3, 0)


def _slot(j, qt, kb, vb, lists: dict, mask, st: _Static):
    """Slot ``j`` of one chunk: the gathered ids, K and V tiles, capped logits and the valid pairs."""
    ids = lists["grouped"][j]
    kj, vj = _gather(kb, ids), _gather(vb, ids)
    s = jnp.einsum("nbhgqd,nbhgkd->nbhgqk", qt, kj, preferred_element_type=jnp.float32) * st.spec.scale
    s = soft_cap(s, st.spec.logits_soft_cap)
    kv_pos = ids[..., None] * st.block_kv + jnp.arange(st.block_kv)
    valid = ((kv_pos < st.spec.S) & (j < lists["counts"])[..., None])[..., None, :]
    if mask is not None:
        valid = valid & _fine_mask(mask, lists["first"], lists["flat"][j], st)
    return ids, kj, vj, s, valid


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
    """``[B, S, Hkv, E]`` -> ``[B, Hkv, nk, block, E]`` (zero-padded)."""
    xt = kv_tiles(x, block)
    return xt.reshape(xt.shape[0], xt.shape[1], -1, block, xt.shape[-1])


def _forward(q, k, v, indices, counts, mask, st: _Static):
    T, Hkv, Dv = st.spec.T, st.spec.num_kv_heads, v.shape[-1]
    qt = q_tiles(q, st.block_q, Hkv)  # [nq, B, Hkv, G, bq, D]
    kb, vb = _key_blocks(k, st.block_kv), _key_blocks(v, st.block_kv)

    def chunk(xs):
        qc, lists = xs
        stats = qc.shape[:5]

        def body(j, carry):
            m, l, acc = carry
            _, _, vj, s, valid = _slot(j, qc, kb, vb, lists, mask, st)
            s = jnp.where(valid, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("nbhgqk,nbhgkd->nbhgqd", p.astype(v.dtype), vj, preferred_element_type=jnp.float32)
            return m_new, alpha * l + p.sum(-1), alpha[..., None] * acc + pv

        carry0 = (jnp.full(stats, -jnp.inf, jnp.float32), jnp.zeros(stats, jnp.float32),
                  jnp.zeros(stats + (Dv,), jnp.float32))
        m, l, acc = lax.fori_loop(0, jnp.max(lists["counts"]), body, carry0)
        safe_l = jnp.where(l > 0, l, 1.0)
        out = jnp.where(l[..., None] > 0, acc / safe_l[..., None], 0.0).astype(q.dtype)
        return out, jnp.where(l > 0, m + jnp.log(safe_l), -jnp.inf)

    nq = qt.shape[0]
    out, lse = lax.map(chunk, (_chunked(qt, st.chunk), _chunk_lists(indices, counts, st)))
    return untile(_unchunked(out, nq), T), untile(_unchunked(lse, nq), T)


def _sparse_fwd(q, k, v, indices, counts, mask, st):
    out, lse = _forward(q, k, v, indices, counts, mask, st)
    return (out, lse), (q, k, v, indices, counts, mask, out, lse)


def _sparse_bwd(st: _Static, residuals, cotangents):
    q, k, v, indices, counts, mask, out, lse = residuals
    d_out, d_lse = cotangents
    B, T, Hkv, bq = q.shape[0], st.spec.T, st.spec.num_kv_heads, st.block_q
    delta = jnp.einsum("bthd,bthd->bth", d_out.astype(jnp.float32), out.astype(jnp.float32))
    d_lse = jnp.where(jnp.isfinite(lse), d_lse.astype(jnp.float32), 0.0)  # rows that see nothing: lse is constant
    qt = q_tiles(q, bq, Hkv)
    stat = row_tiles(backward_stat(SOFTMAX, lse), bq, Hkv)[..., None]
    row_term = row_tiles(d_lse - delta, bq, Hkv)[..., None]
    kb, vb = _key_blocks(k, st.block_kv), _key_blocks(v, st.block_kv)
    lists = _chunk_lists(indices, counts, st)
    shared = lists["grouped"].shape[-1] == 1 and qt.shape[3] > 1  # one list for all G heads of a group
    reduce_g = "nbhgqk,nbhgqd->nbhkd" if shared else "nbhgqk,nbhgqd->nbhgkd"
    b_idx, h_idx = jnp.arange(B)[None, :, None, None], jnp.arange(Hkv)[None, None, :, None]

    def scatter(acc, ids, tile):
        if shared:
            tile = tile[:, :, :, None]
        ids = jnp.broadcast_to(ids, (ids.shape[0], B, Hkv, ids.shape[3]))
        return acc.at[b_idx, h_idx, ids].add(tile)

    def chunk(carry, xs):
        qc, doc, stat_c, row_c, lists_c = xs

        def body(j, inner):
            dq, dk, dv = inner
            ids, kj, vj, s, valid = _slot(j, qc, kb, vb, lists_c, mask, st)
            p = jnp.where(valid, jnp.exp(s - stat_c), 0.0)
            dp = jnp.einsum("nbhgqd,nbhgkd->nbhgqk", doc, vj, preferred_element_type=jnp.float32)
            ds = p * (dp + row_c)
            if st.spec.logits_soft_cap is not None:
                ds = ds * (1.0 - jnp.square(s / st.spec.logits_soft_cap))
            ds = (ds * st.spec.scale).astype(q.dtype)
            dq = dq + jnp.einsum("nbhgqk,nbhgkd->nbhgqd", ds, kj, preferred_element_type=jnp.float32)
            dk = scatter(dk, ids, jnp.einsum(reduce_g, ds, qc, preferred_element_type=jnp.float32))
            dv = scatter(dv, ids, jnp.einsum(reduce_g, p.astype(doc.dtype), doc, preferred_element_type=jnp.float32))
            return dq, dk, dv

        dq, dk, dv = lax.fori_loop(0, jnp.max(lists_c["counts"]), body, (jnp.zeros(qc.shape, jnp.float32), *carry))
        return (dk, dv), dq

    xs = tuple(_chunked(x, st.chunk) for x in (qt, q_tiles(d_out, bq, Hkv), stat, row_term)) + (lists,)
    carry0 = (jnp.zeros(kb.shape, jnp.float32), jnp.zeros(vb.shape, jnp.float32))
    (dk, dv), dq = lax.scan(chunk, carry0, xs)
    S = st.spec.S
    dk = dk.reshape(B, Hkv, -1, k.shape[-1]).transpose(0, 2, 1, 3)[:, :S]
    dv = dv.reshape(B, Hkv, -1, v.shape[-1]).transpose(0, 2, 1, 3)[:, :S]
    dq = untile(_unchunked(dq, qt.shape[0]), T)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_sparse.defvjp(_sparse_fwd, _sparse_bwd)

__all__ = ["block_sparse_attention_xla"]
