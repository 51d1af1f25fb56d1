"""GIN attention: the attention matrix read as the adjacency matrix of a graph isomorphism network.

Buehler, "Graph-Aware Isomorphic Attention for Adaptive Dynamics in Transformers", 2025
(arXiv:2501.02393; code: github.com/lamm-mit/Graph-Aware-Transformers). Per head, the softmax
attention matrix ``A = softmax(q kᵀ/√D)`` is a weighted (causal) adjacency matrix over the tokens and
the value product ``A·h`` is replaced by a GIN layer (Xu et al., "How Powerful are Graph Neural
Networks?", 2019, eq. 4.1)::

    h' = MLP((1 + ε)·h + A·h)

The sparse variant keeps only part of each row of ``A`` (the paper's Sparse-GIN reads the attention
matrix of a pretrained model as a *sparse* adjacency matrix). Here: the ``top_k`` largest entries of
each row, exactly ``min(top_k, allowed keys)`` of them (ties to the lower key index). The kept edges
carry their attention weight, not renormalized (``top_k_weights="attention"``: the official Sparse-GIN
scales its edges by the attention-derived adjacency, ``GIN_edge_weight_scaling=True``), or weight 1
(``"binary"``: the official GIN-attention's ``threshold_mode="top_k"``, a 0/1 adjacency).

Paths: ``gin_attention_reference`` builds ``A`` densely; ``gin_aggregate`` never stores ``[T, S]``:
the dense product is ``attnjax.attention(q, k, h)`` (blocked), and the top-k product finds the
indices with a running top-k over key tiles (``top_k_indices``), then gathers the ``k`` chosen keys
and values per query, with the row normalizer from the blocked attention's log-sum-exp.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax.api import attention
from attnjax.blocked.scores import to_groups
from attnjax.checks import check_options, check_positive, check_qkv, describe
from attnjax.masks import Mask
from attnjax.tiling import num_tiles, pad_axis

TOP_K_WEIGHTS = ("attention", "binary")
"""Weights of the kept edges: the attention weight ``A_ij`` (not renormalized) or 1."""

DEFAULT_BLOCK_Q = 128
DEFAULT_BLOCK_KV = 512
"""Tile sizes of the top-k index search (``top_k_indices``)."""


def _check(q, k, h, mask, scale, top_k, top_k_weights) -> None:
    check_qkv(q, k, h)
    check_options(q, k, mask=mask, bias=None, scale=scale, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
                  rng=None)
    if top_k is not None:
        check_positive(top_k=top_k)
    if top_k_weights not in TOP_K_WEIGHTS:
        raise ValueError(f"top_k_weights must be one of {TOP_K_WEIGHTS}, got {top_k_weights!r}")


def gin_adjacency_reference(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, top_k: Optional[int] = None,
                            top_k_weights: str = "attention", scale: Optional[float] = None) -> jax.Array:
    """The adjacency matrix of GIN attention, dense: ``A = softmax(scale·q kᵀ)`` per head, sparsified.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``, ``Hq % Hkv == 0`` (query head ``h`` reads key head
        ``h // (Hq // Hkv)``).
      mask: an ``attnjax.masks`` value; a masked entry is no edge (and a row with none is all 0).
      top_k: keep the ``top_k`` largest entries of each row among the allowed ones (all of them when a
        row has fewer); None keeps every entry.
      top_k_weights: "attention" (kept entries keep ``A_ij``) or "binary" (kept entries are 1).
      scale: logit scale, default ``1/√D``.
    Returns:
      ``[B, Hq, T, S]`` float32.
    """
    _check(q, k, k, mask, scale, top_k, top_k_weights)
    T, Hq, D = q.shape[1:]
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kr = jnp.repeat(k.astype(jnp.float32), Hq // Hkv, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * scale
    allowed = jnp.ones((1, 1, T, S), bool) if mask is None else mask.dense(T, S)
    a = jnp.where(allowed, jax.nn.softmax(jnp.where(allowed, s, jnp.finfo(jnp.float32).min), axis=-1), 0.0)
    if top_k is None:
        return a
    _, chosen = lax.top_k(jnp.where(allowed, a, -1.0), min(top_k, S))
    kept = jnp.any(jax.nn.one_hot(chosen, S, dtype=bool), axis=-2) & allowed
    return jnp.where(kept, a if top_k_weights == "attention" else 1.0, 0.0)


def gin_attention_reference(q: jax.Array, k: jax.Array, h: jax.Array, *, mask: Optional[Mask] = None,
                            top_k: Optional[int] = None, top_k_weights: str = "attention",
                            scale: Optional[float] = None) -> jax.Array:
    """GIN attention's neighbour sum ``A·h`` with ``A`` built densely (``gin_adjacency_reference``).

    Args:
      q, k, mask, top_k, top_k_weights, scale: as in ``gin_adjacency_reference``.
      h: ``[B, S, Hkv, Dh]`` node features (query head ``h`` reads feature head ``h // (Hq // Hkv)``).
    Returns:
      ``[B, T, Hq, Dh]`` in q's dtype. O(T·S) memory.
    """
    _check(q, k, h, mask, scale, top_k, top_k_weights)
    a = gin_adjacency_reference(q, k, mask=mask, top_k=top_k, top_k_weights=top_k_weights, scale=scale)
    hr = jnp.repeat(h.astype(jnp.float32), q.shape[2] // k.shape[2], axis=2)
    return jnp.einsum("bhts,bshd->bthd", a, hr).astype(q.dtype)


def top_k_indices(q: jax.Array, k: jax.Array, *, top_k: int, mask: Optional[Mask] = None,
                  scale: Optional[float] = None, block_q: int = DEFAULT_BLOCK_Q,
                  block_kv: int = DEFAULT_BLOCK_KV) -> tuple[jax.Array, jax.Array]:
    """The keys of each row's ``top_k`` largest attention weights, found tile by tile.

    Softmax is monotone within a row, so the largest weights are the largest allowed logits. Each
    tile of ``block_q`` queries sweeps the key tiles keeping a running top-k (``lax.top_k`` of the
    ``top_k`` kept so far and the tile's ``block_kv`` logits; earlier keys first, so ties go to the
    lower key index as in ``lax.top_k`` over the whole row). Cost O(T·S·D) time and
    O(B·Hq·block_q·(top_k + block_kv)) memory per step; not differentiable (selection).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; mask, scale: as in ``gin_adjacency_reference``.
      top_k: keys per row; ``min(top_k, S)`` slots are returned.
    Returns:
      ``(indices [B, T, Hq, min(top_k, S)] int32, kept [B, T, Hq, min(top_k, S)] bool)``, largest first.
      ``kept`` is False on slots past a row's allowed keys (their index is meaningless).
    """
    check_qkv(q, k, k)
    check_options(q, k, mask=mask, bias=None, scale=scale, logits_soft_cap=None, sinks=None, dropout_rate=0.0,
                  rng=None)
    check_positive(top_k=top_k, block_q=block_q, block_kv=block_kv)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    G, kk = Hq // Hkv, min(top_k, S)
    scale = D ** -0.5 if scale is None else scale
    bq, bk = min(block_q, T), min(block_kv, S)
    nq, nk = num_tiles(T, bq), num_tiles(S, bk)
    q, k = lax.stop_gradient(q), lax.stop_gradient(k)
    qt = pad_axis(q, 1, bq).reshape(B, nq, bq, Hkv, G, D).transpose(1, 0, 3, 4, 2, 5)  # [nq, B, Hkv, G, bq, D]
    kt = pad_axis(k, 1, bk).reshape(B, nk, bk, Hkv, D).transpose(1, 0, 3, 2, 4)  # [nk, B, Hkv, bk, D]

    def q_tile(args):
        i, qi = args
        q_idx = i * bq + jnp.arange(bq)

        def kv_tile(carry, xs):
            values, index = carry
            j, kj = xs
            kv_idx = j * bk + jnp.arange(bk)
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kj, preferred_element_type=jnp.float32) * scale
            ok = (kv_idx < S)[None, None, None, None, :]
            if mask is not None:
                ok = ok & to_groups(mask.tile(q_idx, kv_idx, T, S), Hkv)
            s = jnp.where(ok, s, -jnp.inf)
            values, pos = lax.top_k(jnp.concatenate([values, s], axis=-1), kk)
            candidates = jnp.concatenate([index, jnp.broadcast_to(kv_idx, s.shape).astype(jnp.int32)], axis=-1)
            return (values, jnp.take_along_axis(candidates, pos, axis=-1)), None

        shape = (B, Hkv, G, bq, kk)
        init = (jnp.full(shape, -jnp.inf, jnp.float32), jnp.zeros(shape, jnp.int32))
        (values, index), _ = lax.scan(kv_tile, init, (jnp.arange(nk), kt))
        return values, index

    values, index = lax.map(q_tile, (jnp.arange(nq), qt))  # [nq, B, Hkv, G, bq, kk]

    def untile(x):
        return x.transpose(1, 0, 4, 2, 3, 5).reshape(B, nq * bq, Hq, kk)[:, :T]

    return jnp.minimum(untile(index), S - 1), jnp.isfinite(untile(values))


def _take_rows(x: jax.Array, index: jax.Array, group: int) -> jax.Array:
    """``x [B, S, Hkv, F]`` at ``index [B, T, Hq, kk]`` (query head ``h`` reads head ``h // group``):
    ``[B, T, Hq, kk, F]``, without repeating ``x`` per query head."""
    B, _, Hq, _ = index.shape
    heads = (jnp.arange(Hq) // group)[None, None, :, None]
    return x[jnp.arange(B)[:, None, None, None], index, heads]


def gin_aggregate(q: jax.Array, k: jax.Array, h: jax.Array, *, mask: Optional[Mask] = None,
                  top_k: Optional[int] = None, top_k_weights: str = "attention", scale: Optional[float] = None,
                  implementation: str = "auto", block_q: int = DEFAULT_BLOCK_Q,
                  block_kv: int = DEFAULT_BLOCK_KV) -> jax.Array:
    """GIN attention's neighbour sum ``A·h`` without storing ``A``; equals ``gin_attention_reference``.

    - ``top_k=None``: ``A·h = attnjax.attention(q, k, h)`` (``implementation`` is passed on; the blocked
      "xla" path costs O(T·S·(D + Dh)) time and O(T) memory).
    - ``top_k``: ``top_k_indices`` finds each row's kept keys (O(B·Hq·block_q·(top_k + block_kv)) memory
      per tile); their logits ``s_ij`` are recomputed from the gathered keys, the weights are
      ``exp(s_ij − lse_i)`` with the row's log-sum-exp from ``attnjax.attention(..., return_lse=True)``
      (blocked, differentiable), and ``h`` is gathered at the kept keys: O(T·Hq·top_k·(D + Dh)) memory,
      never ``[T, S]``. Gradients reach q, k (through the kept logits and the normalizer) and h; the
      selection itself is piecewise constant.

    Args:
      q, k, h, mask, top_k, top_k_weights, scale: as in ``gin_attention_reference``.
      implementation: of the ``attnjax.attention`` call ("auto", "reference", "xla", "pallas").
      block_q, block_kv: tiles of the top-k index search.
    Returns:
      ``[B, T, Hq, Dh]`` in q's dtype.
    """
    _check(q, k, h, mask, scale, top_k, top_k_weights)
    if top_k is None:
        return attention(q, k, h, mask=mask, scale=scale, implementation=implementation)
    Hq, D = q.shape[2:]
    group = Hq // k.shape[2]
    index, kept = top_k_indices(q, k, top_k=top_k, mask=mask, scale=scale, block_q=block_q, block_kv=block_kv)
    if top_k_weights == "attention":
        scale = D ** -0.5 if scale is None else scale
        k_kept = _take_rows(k, index, group)  # [B, T, Hq, kk, D]
        s = jnp.einsum("bthd,bthkd->bthk", q, k_kept, preferred_element_type=jnp.float32) * scale
        probe = jnp.zeros((*k.shape[:3], 1), q.dtype)
        _, lse = attention(q, k, probe, mask=mask, scale=scale, implementation=implementation, return_lse=True)
        lse = jnp.where(jnp.isfinite(lse), lse, 0.0)[..., None]
        weights = jnp.where(kept, jnp.exp(jnp.where(kept, s, 0.0) - lse), 0.0)
    else:
        weights = kept.astype(jnp.float32)
    h_kept = _take_rows(h, index, group)  # [B, T, Hq, kk, Dh]
    return jnp.einsum("bthk,bthkd->bthd", weights, h_kept, preferred_element_type=jnp.float32).astype(q.dtype)


def _check_epsilon(h: jax.Array, epsilon: jax.Array) -> None:
    if jnp.shape(epsilon) not in ((), (h.shape[2],)):
        raise ValueError(f"epsilon must be a scalar or [heads] = [{h.shape[2]}], got {describe(epsilon)}")


def gin_combine(h: jax.Array, aggregated: jax.Array, epsilon: jax.Array) -> jax.Array:
    """The GIN node update's input ``(1 + ε)·h + A·h`` (Xu et al. 2019, eq. 4.1, as Buehler 2025 writes it; the
    official ``GINLayer`` computes ``ε·h + A·h``, with ``ε`` starting at 0 in both).

    Args:
      h: ``[B, T, H, Dh]`` node features; aggregated: ``[B, T, H, Dh]``, ``A·h`` (``gin_aggregate``).
      epsilon: a scalar or per-head ``[H]`` learnable ``ε``.
    Returns:
      ``[B, T, H, Dh]`` float32.
    """
    if h.shape != aggregated.shape:
        raise ValueError(f"h {list(h.shape)} and aggregated {list(aggregated.shape)} must have one shape")
    _check_epsilon(h, epsilon)
    eps = jnp.asarray(epsilon, jnp.float32)
    eps = eps[:, None] if eps.ndim else eps
    return (1.0 + eps) * h.astype(jnp.float32) + aggregated.astype(jnp.float32)


def gin_head_mlp(z: jax.Array, w1: jax.Array, b1: jax.Array, norm_scale: jax.Array, w2: jax.Array, b2: jax.Array,
                 *, norm_eps: float = 1e-5) -> jax.Array:
    """Each head's GIN MLP: ``W2_h·SiLU(RMSNorm(W1_h·z + b1_h)) + b2_h`` (the official ``GINLayer``).

    Args:
      z: ``[B, T, H, Dh]`` (``gin_combine``).
      w1 ``[H, Dh, F]``, b1 ``[H, F]``, norm_scale ``[H, F]``, w2 ``[H, F, Dh]``, b2 ``[H, Dh]``: per head.
      norm_eps: RMSNorm's epsilon.
    Returns:
      ``[B, T, H, Dh]`` float32.
    """
    H, Dh, _ = w1.shape
    if z.ndim != 4 or z.shape[2:] != (H, Dh):
        raise ValueError(f"z must have shape [B, T, {H}, {Dh}] to match w1 [H, Dh, F] = {list(w1.shape)}, "
                         f"got {list(z.shape)}")
    u = jnp.einsum("bthd,hdf->bthf", z.astype(jnp.float32), w1.astype(jnp.float32)) + b1
    u = u * lax.rsqrt(jnp.mean(jnp.square(u), axis=-1, keepdims=True) + norm_eps) * norm_scale
    return jnp.einsum("bthf,hfd->bthd", jax.nn.silu(u), w2.astype(jnp.float32)) + b2


__all__ = [
    "TOP_K_WEIGHTS", "DEFAULT_BLOCK_Q", "DEFAULT_BLOCK_KV", "gin_adjacency_reference", "gin_attention_reference",
    "top_k_indices", "gin_aggregate", "gin_combine", "gin_head_mlp",
]
