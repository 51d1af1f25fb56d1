"""Low-rank factorized multi-head attention queried by a global context vector (LAMA).

Mehta, Rangwala and Ramakrishnan, "Low Rank Factorization for Compact Multi-Head Self-Attention"
(arXiv:1912.00835, 2019; v2 "Compact Multi-Head Self-Attention for Learning Supervised Text
Representations"). Instead of a query per token and ``W_q, W_k`` per head, the score of token ``i`` in
head ``h`` is a bilinear form between a global context vector ``c`` and the token, whose ``d × d``
affinity matrix is factorized to low rank, one rank-one factor per head:

    s_{i,h} = tanh(c^T (p_h q_h^T) x_i) = tanh((p_h · c)(q_h · x_i)),    P = [p_1..p_H], Q = [q_1..q_H] ∈ R^{d×H}
    a_{h,·} = softmax_i(s_{·,h}),    M_h = Σ_i a_{h,i} x_i          (the structured embedding M = A X)

Each head is a distribution over tokens; the values are the tokens themselves. The parameters are
``2·d·H + d`` instead of the ``4·d²`` of a Transformer attention layer.

Where the paper text could not be read here, this follows its abstract ("low-rank matrix factorization
of the affinity matrix", "querying a global context vector") and the PyTorch port
github.com/JohnGiorgi/compact-multi-head-self-attention-pytorch (``modules/lama.py``: scores
``tanh((Pᵀc) ⊙ (Qᵀ h_i))``, ``c`` a learned vector, softmax over tokens). That port notes an L2
normalization it leaves out; so does this code.

As a token mixer ``[B, T, d] -> [B, T, H, d]``: non-causal, every position gets the sequence's ``M``;
causal, position ``t`` gets the pooling over tokens ``<= t``:
``M_{t,h} = Σ_{i≤t} e^{s_{i,h}} x_i / Σ_{i≤t} e^{s_{i,h}}``.

Paths:
- ``low_rank_attention_reference``: the dense ``[B, H, T, T]`` attention matrix, masked softmax, ``A X``.
- ``low_rank_attention``: the scores do not depend on the query, so one pooling (non-causal) or prefix
  sums of ``e^{s} x`` and ``e^{s}`` (causal); ``|s| <= 1`` keeps ``e^{s}`` in ``[1/e, e]``, so no running
  maximum is needed. ``O(B·T·H·d)`` time and memory (the output's size), no ``T²`` term.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def check_low_rank(x: jax.Array, p: jax.Array, q: jax.Array, c: jax.Array) -> None:
    """ValueError naming the argument unless ``x [B, T, d]``, ``p, q [d, H]`` and ``c [d]`` agree;
    TypeError unless ``x`` is floating point."""
    if not hasattr(x, "ndim") or x.ndim != 3:
        raise ValueError(f"x must have shape [batch, seq, d], got {getattr(x, 'shape', None)}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array, got dtype {x.dtype}")
    d = x.shape[2]
    if p.ndim != 2 or p.shape[0] != d:
        raise ValueError(f"p must have shape [d, H] with d={d}, got {p.shape}")
    if q.shape != p.shape:
        raise ValueError(f"q must have p's shape [d, H] = {list(p.shape)}, got {list(q.shape)}")
    if c.shape != (d,):
        raise ValueError(f"c must have shape [d] = [{d}], got {list(c.shape)}")


def low_rank_scores(x: jax.Array, p: jax.Array, q: jax.Array, c: jax.Array) -> jax.Array:
    """Per-head token scores ``s_{i,h} = tanh((p_h · c)(q_h · x_i))`` (Mehta et al. 2019), float32.

    Args:
      x: ``[B, T, d]`` tokens; p, q: ``[d, H]`` the low-rank factors; c: ``[d]`` the global context.
    Returns:
      ``[B, T, H]`` float32 scores in ``[-1, 1]``.
    """
    check_low_rank(x, p, q, c)
    hp = jax.lax.Precision.HIGHEST
    context = jnp.einsum("d,dh->h", c.astype(jnp.float32), p.astype(jnp.float32), precision=hp)
    tokens = jnp.einsum("btd,dh->bth", x.astype(jnp.float32), q.astype(jnp.float32), precision=hp)
    return jnp.tanh(context * tokens)


def low_rank_attention_reference(x: jax.Array, p: jax.Array, q: jax.Array, c: jax.Array, *,
                                 causal: bool = False) -> jax.Array:
    """LAMA pooling from the dense attention matrix: ``out[t, h] = Σ_i A_h[t, i] x_i``.

    ``A_h[t, i] = softmax_i(s_{i,h})`` over all ``i`` (non-causal) or ``i <= t`` (causal); the rows of
    one head are equal in the non-causal case. ``O(B·H·T²)`` memory.

    Args:
      x: ``[B, T, d]``; p, q: ``[d, H]``; c: ``[d]``.
      causal: pool over the prefix ``i <= t`` only.
    Returns:
      ``[B, T, H, d]`` in x's dtype.
    """
    s = low_rank_scores(x, p, q, c)                                          # [B, T, H]
    T = x.shape[1]
    logits = jnp.broadcast_to(jnp.swapaxes(s, 1, 2)[:, :, None, :], (s.shape[0], s.shape[2], T, T))
    if causal:
        logits = jnp.where(jnp.tril(jnp.ones((T, T), bool)), logits, -jnp.inf)
    weights = jax.nn.softmax(logits, axis=-1)                                # [B, H, T, T]
    out = jnp.einsum("bhti,bid->bthd", weights, x.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return out.astype(x.dtype)


def low_rank_attention(x: jax.Array, p: jax.Array, q: jax.Array, c: jax.Array, *, causal: bool = False) -> jax.Array:
    """LAMA pooling without the attention matrix: one weighted sum, or prefix sums when causal.

    ``out[t, h] = Σ_{i∈I_t} e^{s_{i,h}} x_i / Σ_{i∈I_t} e^{s_{i,h}}`` with ``I_t`` all tokens or ``i <= t``;
    equal to ``low_rank_attention_reference``. Float32 sums (``e^{s} ∈ [1/e, e]``, no overflow).
    ``O(B·T·H·d)`` time and memory.

    Args: as ``low_rank_attention_reference``.
    Returns:
      ``[B, T, H, d]`` in x's dtype.
    """
    s = low_rank_scores(x, p, q, c)                                          # [B, T, H]
    w = jnp.exp(s)
    xf = x.astype(jnp.float32)
    weighted = w[:, :, :, None] * xf[:, :, None, :]                          # [B, T, H, d]
    if causal:
        out = jnp.cumsum(weighted, axis=1) / jnp.cumsum(w, axis=1)[:, :, :, None]
    else:
        pooled = jnp.sum(weighted, axis=1) / jnp.sum(w, axis=1)[:, :, None]   # [B, H, d]
        out = jnp.broadcast_to(pooled[:, None], weighted.shape)
    return out.astype(x.dtype)


__all__ = ["check_low_rank", "low_rank_scores", "low_rank_attention_reference", "low_rank_attention"]
