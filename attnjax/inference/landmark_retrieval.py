"""Landmark attention at inference: each query head retrieves its top-k blocks from a KV cache by landmark score.

Mohtashami & Jaggi 2023, "Landmark Attention: Random-Access Infinite Context Length for Transformers"
(NeurIPS 2023, arXiv:2305.16300), Sec. 3.2 (retrieval from the memory of past blocks); public code
``epfml/landmark-attention``: ``llama/llama_mem.py`` (``LlamaAttention.forward``, the ``mem_freq`` path,
``aggregate=None``: per token and head) and ``lm_benchmark/models/caches/mem_cache.py``
(``cache_selection_method="per_token_and_head"``).

The cache holds ``S`` keys/values laid out as in training (``attnjax.sparse.landmark``): position ``j`` is a
landmark when ``j % block_size == block_size − 1``. Queries ``q [B, T, Hq, D]`` are the last ``T`` positions
(one decode token, or a chunk). For the query at position ``p`` in block ``c = p // block_size``:

- **local blocks**: blocks ``c − local_blocks + 1 .. c`` are always attended (the own, incomplete block and
  ``local_blocks − 1`` blocks before it; the official code's "incomplete block + current chunk");
- **retrieval**: among the earlier blocks ``b < c − local_blocks + 1`` each query head keeps the ``top_k``
  with the largest landmark logit ``s_{p, L_b} = scale · q_p · k_{L_b}`` (the official code ranks the same
  logits, or their softmax: the same order); GQA: query head ``h`` ranks the landmarks of KV head ``h // G``;
- **attention**: the grouped softmax of training (Sec. 3.1, Eq. 1–3) over the retrieved and local blocks
  only: every earlier block's tokens are weighted by their within-block softmax times the block's landmark
  gate, the own block's tokens directly (the official code feeds the retrieved blocks, landmarks included,
  through ``landmark_grouped_softmax`` in the same way).

This equals ``landmark_attention_reference`` restricted by ``retrieval_mask`` (tested). Not implemented:
the official positional remapping of retrieved blocks (RoPE is applied by the caller, to the cache's own
positions) and the ``max_over_tokens`` aggregate (one selection per chunk).

Why not the block-sparse engine: its tiles are plain softmax over the listed key blocks, while the grouped
softmax needs each retrieved block's own normalizer and its landmark gate per query; here the retrieved
blocks are gathered per (query, head), ``O(T · Hq · (top_k + local_blocks) · block_size)`` memory, the
decode-time cost of the paper's method.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import masks
from attnjax.checks import check_positive, check_qk, check_qkv
from attnjax.masks import query_positions
from attnjax.sparse.landmark import grouped_logits


def _check(q, k, block_size, top_k, local_blocks):
    check_qk(q, k)
    check_positive(block_size=block_size, top_k=top_k, local_blocks=local_blocks)
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 (one regular token and the landmark), got {block_size}")
    if q.shape[1] > k.shape[1]:
        raise ValueError(f"queries must be the last T of the S cached positions (T <= S), got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}")


def landmark_scores(q: jax.Array, k: jax.Array, *, block_size: int, scale: Optional[float] = None) -> jax.Array:
    """Landmark logits of every complete block: float32 ``[B, T, Hq, S // block_size]``.

    ``scores[b, t, h, n] = scale · q[b, t, h] · k[b, n·block_size + block_size − 1, h // G]``.
    """
    check_qk(q, k)
    check_positive(block_size=block_size)
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    landmarks = k[:, block_size - 1::block_size][:, :k.shape[1] // block_size]
    s = jnp.einsum("btkgd,bnkd->btkgn", q.reshape(B, T, Hkv, Hq // Hkv, D), landmarks,
                   preferred_element_type=jnp.float32)
    return (s * scale).reshape(B, T, Hq, -1)


def retrieve_blocks(q: jax.Array, k: jax.Array, *, block_size: int, top_k: int, local_blocks: int = 1,
                    scale: Optional[float] = None):
    """The ``top_k`` earlier blocks each query head retrieves by landmark logit (Sec. 3.2).

    Args:
      q: ``[B, T, Hq, D]`` queries at cache positions ``S − T .. S − 1``; k: ``[B, S, Hkv, D]`` cached keys.
      block_size: tokens per block, landmark last; top_k: blocks retrieved per query and head.
      local_blocks: blocks ending at the query's own block that are always attended (not candidates).
      scale: logit scale, default ``1/sqrt(D)``.
    Returns:
      ``(ids, valid)``: int32 ``[B, T, Hq, top_k]`` block indices in decreasing landmark logit, and bool
      ``[B, T, Hq, top_k]``, False for the slots past the number of candidates (their id is 0). Candidates
      of the query at position ``p`` are the blocks ``b < p // block_size − local_blocks + 1``.
    """
    _check(q, k, block_size, top_k, local_blocks)
    T, S = q.shape[1], k.shape[1]
    s = lax.stop_gradient(landmark_scores(q, k, block_size=block_size, scale=scale))
    n = s.shape[-1]
    first_local = query_positions(jnp.arange(T), T, S) // block_size - local_blocks + 1      # [T]
    candidate = jnp.arange(n)[None, :] < first_local[:, None]                                # [T, n]
    s = jnp.where(candidate[None, :, None, :], s, -jnp.inf)
    kk = min(top_k, n)
    if kk == 0:
        shape = s.shape[:3] + (top_k,)
        return jnp.zeros(shape, jnp.int32), jnp.zeros(shape, bool)
    values, ids = lax.top_k(s, kk)
    valid = jnp.isfinite(values)
    pad = ((0, 0),) * 3 + ((0, top_k - kk),)
    return jnp.pad(jnp.where(valid, ids, 0).astype(jnp.int32), pad), jnp.pad(valid, pad)


def retrieval_mask(ids: jax.Array, valid: jax.Array, *, T: int, S: int, block_size: int,
                   local_blocks: int = 1) -> masks.Explicit:
    """The keys a retrieval attends: bool ``[B, Hq, T, S]`` mask of the retrieved and the local blocks.

    ``ids``, ``valid`` as returned by ``retrieve_blocks``. With ``landmark_attention_reference(q, k, v,
    mask=retrieval_mask(...))`` it defines ``landmark_retrieval_attention`` (the causal rule is the
    reference's own).
    """
    S_blocks = jnp.arange(S) // block_size                                                   # [S]
    hit = (ids[..., None] == S_blocks) & valid[..., None]                                    # [B, T, Hq, K, S]
    retrieved = hit.any(3)
    own = query_positions(jnp.arange(T), T, S) // block_size
    local = (S_blocks[None, :] <= own[:, None]) & (S_blocks[None, :] > (own - local_blocks)[:, None])  # [T, S]
    return masks.Explicit(jnp.moveaxis(retrieved | local[None, :, None, :], 2, 1))


def landmark_retrieval_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, block_size: int, top_k: int, local_blocks: int = 1,
    scale: Optional[float] = None,
) -> jax.Array:
    """Queries attend to their retrieved blocks and local blocks with the grouped softmax (Sec. 3.1–3.2).

    Args:
      q: ``[B, T, Hq, D]`` (positions ``S − T .. S − 1``); k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``: the
        KV cache including the queries' own tokens, landmarks at ``j % block_size == block_size − 1``.
      block_size, top_k, local_blocks, scale: as in ``retrieve_blocks``.
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype; equal to ``landmark_attention_reference(q, k, v, block_size=...,
      mask=retrieval_mask(*retrieve_blocks(...), ...))``. With ``top_k`` at least the number of candidate
      blocks it is full landmark attention.
    Cost: gathers ``(top_k + local_blocks) · block_size`` keys per (query, head); memory
    ``O(B · T · Hq · (top_k + local_blocks) · block_size · D)``.
    """
    check_qkv(q, k, v)
    ids, valid = retrieve_blocks(q, k, block_size=block_size, top_k=top_k, local_blocks=local_blocks, scale=scale)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G = Hq // Hkv
    scale = D ** -0.5 if scale is None else scale
    q_pos = query_positions(jnp.arange(T), T, S)
    offsets = jnp.arange(block_size)
    # Retrieved blocks, then the local ones (block-aligned runs of block_size keys each).
    first_local = q_pos // block_size - local_blocks + 1                                      # [T]
    local_ids = first_local[:, None] + jnp.arange(local_blocks)                               # [T, local]
    local_ids = jnp.broadcast_to(local_ids[None, :, None, :], (B, T, Hq, local_blocks))
    block_ids = jnp.concatenate([ids, local_ids], -1)                                         # [B, T, Hq, n]
    block_ok = jnp.concatenate([valid, local_ids >= 0], -1)
    pos = (block_ids[..., None] * block_size + offsets).reshape(B, T, Hq, -1)                 # [B, T, Hq, N]
    ok = jnp.repeat(block_ok, block_size, -1) & (pos < S)
    safe = jnp.clip(pos, 0, S - 1)
    kv_head = jnp.arange(Hq) // G
    b_idx = jnp.arange(B)[:, None, None, None]
    kg = k[b_idx, safe, kv_head[None, None, :, None]]                                         # [B, T, Hq, N, D]
    vg = v[b_idx, safe, kv_head[None, None, :, None]]
    s = jnp.einsum("bthd,bthnd->bthn", q, kg, preferred_element_type=jnp.float32) * scale
    a, *_ = grouped_logits(s, q_pos[None, :, None, None], pos, ok, block_size)
    w = jax.nn.softmax(a, axis=-1)
    out = jnp.einsum("bthn,bthnd->bthd", w.astype(v.dtype), vg, preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


__all__ = ["landmark_scores", "retrieve_blocks", "retrieval_mask", "landmark_retrieval_attention"]
