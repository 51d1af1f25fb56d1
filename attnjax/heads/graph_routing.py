"""Graph-of-tokens routing for sparse mixture of experts, and the MoE feed-forward it routes.

Nguyen, Tran, Nguyen and Baraniuk, "Improving Routing in Sparse Mixture of Experts with Graph of
Tokens", 2025 (arXiv:2505.00792). A softmax router picks each token's experts from that token alone,
``P = softmax(x W_g)``; the paper's probabilistic graphical model lets token ``i`` instead draw its
expert through a token ``j`` it is linked to, so the expert probabilities of ``i`` are a mixture of
the others' router probabilities (Sections 2-3):

- Similarity-aware (S)MoE (Section 2): ``P̃ = S·P`` with ``S_ij = softmax_j(f_i·f_j / τ)``, a
  row-normalized token-similarity graph (``similarity_mix``).
- Attention-aware (S)MoE (Section 3): ``P̃ = A·P`` with ``A = softmax(q kᵀ/√D)`` the attention matrix of
  the attention layer before the MoE layer (``attention_mix``).

Top-k then reads ``P̃`` (``top_k_routing``). Both mixes are ``attention(q, k, P)`` calls, blocked
(``attnjax.attention``, O(T) memory), so ``S`` and ``A`` are never stored; the ``*_reference`` forms
build them densely. Only the paper's abstract and section titles could be consulted here, so three
details are this library's choices, not checked against the paper's equations: the features ``f`` of
S-MoE are an argument (``attnjax.nn.graph_moe.GraphMoE`` passes the router logits, i.e. ``W_s = W_gᵀW_g``,
so S-MoE adds no parameters), the temperature ``τ`` defaults to 1, and A-MoE averages the attention
matrices of the heads. Routing runs in float32 whatever the input dtype.

The MoE feed-forward ``y_n = Σ_{e ∈ top-k(n)} g_ne · W2_e·GELU(W1_e·x_n + b1_e) + b2_e`` has a dense
reference (``moe_ffn_reference``: every expert on every token, masked) and a capacity-dispatch fast
path (``moe_ffn_dispatch``, GShard/Switch style: each expert gets a buffer of ``capacity`` tokens).
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.checks import check_positive, check_qk, check_scalar, describe
from attnjax.masks import Mask

ROUTERS = ("softmax", "similarity", "attention")
"""``softmax``: plain SMoE, ``P̃ = P``; ``similarity``: S-MoE, ``P̃ = S·P``; ``attention``: A-MoE, ``P̃ = A·P``."""

DEFAULT_TAU = 1.0
"""Temperature ``τ`` of the similarity graph (``S_ij ∝ exp(f_i·f_j / τ)``)."""


def _check_probs(name: str, probs: jax.Array, batch: int, length: int) -> None:
    if not hasattr(probs, "ndim") or probs.ndim != 3 or probs.shape[:2] != (batch, length):
        raise ValueError(f"{name} must have shape [batch, seq, experts] = [{batch}, {length}, E], "
                         f"got {describe(probs)}")
    if not jnp.issubdtype(probs.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating-point array, got dtype {probs.dtype}")


def _check_features(query_features: jax.Array, key_features: jax.Array, probs: jax.Array) -> None:
    for name, f in (("query_features", query_features), ("key_features", key_features)):
        if not hasattr(f, "ndim") or f.ndim != 3:
            raise ValueError(f"{name} must have shape [batch, seq, features], got {describe(f)}")
        if not jnp.issubdtype(f.dtype, jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got dtype {f.dtype}")
    if query_features.shape[0] != key_features.shape[0] or query_features.shape[2] != key_features.shape[2]:
        raise ValueError(f"query_features {list(query_features.shape)} and key_features {list(key_features.shape)} "
                         "must agree on batch and features")
    _check_probs("probs", probs, key_features.shape[0], key_features.shape[1])


def _allowed(mask: Optional[Mask], batch: int, heads: int, T: int, S: int) -> jax.Array:
    """The mask's dense ``[Bm, Hm, T, S]`` booleans (all True without one), after checking it fits."""
    if mask is None:
        return jnp.ones((1, 1, T, S), bool)
    if not isinstance(mask, Mask):
        raise TypeError(f"mask must be an attnjax.masks value (e.g. masks.Causal()), got {type(mask).__name__}")
    mask.check(batch, heads, T, S)
    return mask.dense(T, S)


def _masked_softmax(s: jax.Array, allowed: jax.Array) -> jax.Array:
    """Row softmax over the allowed entries; 0 elsewhere and on rows with none (finite, so NaN-free grads)."""
    p = jax.nn.softmax(jnp.where(allowed, s, jnp.finfo(jnp.float32).min), axis=-1)
    return jnp.where(allowed, p, 0.0)


def _check_tau(tau: float) -> None:
    check_scalar("tau", tau)
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")


def similarity_mix_reference(query_features: jax.Array, key_features: jax.Array, probs: jax.Array, *,
                             tau: float = DEFAULT_TAU, mask: Optional[Mask] = None) -> jax.Array:
    """S-MoE's mixed router probabilities with the similarity graph built densely (Section 2).

    ``P̃_i = Σ_j S_ij P_j`` with ``S_ij = exp(f_i·f_j/τ) / Σ_{j' allowed} exp(f_i·f_j'/τ)`` over the keys
    ``j`` the mask allows (a row with none gives 0).

    Args:
      query_features: ``[B, T, F]`` features ``f_i`` of the routed tokens.
      key_features: ``[B, S, F]`` features ``f_j`` of the tokens they link to (``query_features`` itself
        for self-similarity).
      probs: ``[B, S, E]`` router probabilities ``P_j`` of those tokens.
      tau: temperature ``τ > 0``.
      mask: an ``attnjax.masks`` value over ``[B, 1, T, S]`` (e.g. ``masks.Causal()`` for a decoder).
    Returns:
      ``[B, T, E]`` float32.
    """
    _check_features(query_features, key_features, probs)
    _check_tau(tau)
    fq, fk = query_features.astype(jnp.float32), key_features.astype(jnp.float32)
    s = jnp.einsum("btf,bsf->bts", fq, fk) / tau
    graph = _masked_softmax(s, _allowed(mask, s.shape[0], 1, *s.shape[1:])[:, 0])
    return jnp.einsum("bts,bse->bte", graph, probs.astype(jnp.float32))


def similarity_mix(query_features: jax.Array, key_features: jax.Array, probs: jax.Array, *,
                   tau: float = DEFAULT_TAU, mask: Optional[Mask] = None, implementation: str = "auto") -> jax.Array:
    """S-MoE's mixed router probabilities ``S·P`` without storing ``S`` (Section 2).

    The graph is one softmax attention head: ``S·P = attention(f, f, P, scale=1/τ)``, so the blocked
    path (``implementation="xla"``, the default on CPU) costs O(T·S·(F + E)) time and O(T·(F + E))
    memory. Same arguments and result as ``similarity_mix_reference``; ``implementation`` is passed to
    ``attnjax.attention``.
    """
    _check_features(query_features, key_features, probs)
    _check_tau(tau)
    fq, fk = query_features.astype(jnp.float32)[:, :, None], key_features.astype(jnp.float32)[:, :, None]
    out = attention(fq, fk, probs.astype(jnp.float32)[:, :, None], mask=mask, scale=1.0 / float(tau),
                    implementation=implementation)
    return out[:, :, 0]


def _check_qk(q: jax.Array, k: jax.Array, probs: jax.Array) -> None:
    check_qk(q, k)
    _check_probs("probs", probs, k.shape[0], k.shape[1])


def attention_mix_reference(q: jax.Array, k: jax.Array, probs: jax.Array, *, mask: Optional[Mask] = None,
                            scale: Optional[float] = None) -> jax.Array:
    """A-MoE's mixed router probabilities with the attention matrix built densely (Section 3).

    ``P̃ = Ā·P`` with ``Ā = (1/Hq)·Σ_h softmax(scale·q_h k_hᵀ)`` (masked; a row with no allowed key is
    0), the head-averaged attention matrix of the attention layer before the MoE layer.

    Args:
      q: ``[B, T, Hq, D]`` and k: ``[B, S, Hkv, D]``: that layer's queries and keys (after RoPE, if
        any), ``Hq % Hkv == 0`` (query head ``h`` reads key head ``h // (Hq // Hkv)``).
      probs: ``[B, S, E]`` router probabilities of the MoE layer's tokens.
      mask: an ``attnjax.masks`` value, the attention layer's.
      scale: logit scale, default ``1/√D``.
    Returns:
      ``[B, T, E]`` float32.
    """
    _check_qk(q, k, probs)
    B, T, Hq, D = q.shape
    S, Hkv = k.shape[1], k.shape[2]
    scale = D ** -0.5 if scale is None else scale
    kr = jnp.repeat(k.astype(jnp.float32), Hq // Hkv, axis=2)
    s = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), kr) * scale
    a = _masked_softmax(s, _allowed(mask, B, Hq, T, S)).mean(axis=1)
    return jnp.einsum("bts,bse->bte", a, probs.astype(jnp.float32))


def attention_mix(q: jax.Array, k: jax.Array, probs: jax.Array, *, mask: Optional[Mask] = None,
                  scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """A-MoE's mixed router probabilities ``Ā·P`` without storing ``A`` (Section 3).

    ``P`` is the value of every key head: ``Ā·P = mean_h attention(q, k, P)_h``, blocked under
    ``implementation="xla"`` (O(T·S·Hq·(D + E)) time, O(T·Hq·E) memory). Same arguments and result as
    ``attention_mix_reference``; q and k are cast to float32 so routing does not depend on their dtype.
    """
    _check_qk(q, k, probs)
    p = jnp.broadcast_to(probs.astype(jnp.float32)[:, :, None], (*probs.shape[:2], k.shape[2], probs.shape[2]))
    out = attention(q.astype(jnp.float32), k.astype(jnp.float32), p, mask=mask, scale=scale,
                    implementation=implementation)
    return out.mean(axis=2)


def top_k_routing(probs: jax.Array, top_k: int, *, renormalize: bool = False) -> tuple[jax.Array, jax.Array]:
    """Each token's ``top_k`` experts and gate weights from its (mixed) probabilities.

    ``g_ne = P̃_ne`` for ``e`` among the ``top_k`` largest entries of ``P̃_n`` (ties to the lower
    expert index, ``jax.lax.top_k``), else 0: the SMoE gate ``TopK(softmax(·))`` of the paper's Section 2
    with ``P̃`` in place of ``P``. ``renormalize=True`` divides the kept weights by their sum (GShard /
    Mixtral); the default keeps ``P̃``, so a top-1 gate still passes gradients to the router.

    Args:
      probs: ``[..., E]`` probabilities.
      top_k: experts per token, ``1 <= top_k <= E``.
    Returns:
      ``(indices [..., top_k] int32, weights [..., top_k] float32)``, largest first.
    """
    check_positive(top_k=top_k)
    if top_k > probs.shape[-1]:
        raise ValueError(f"top_k ({top_k}) must be at most the number of experts ({probs.shape[-1]})")
    weights, indices = jax.lax.top_k(probs.astype(jnp.float32), top_k)
    if renormalize:
        total = weights.sum(axis=-1, keepdims=True)
        weights = weights / jnp.where(total > 0, total, 1.0)
    return indices.astype(jnp.int32), weights


def load_balancing_loss(probs: jax.Array, indices: jax.Array) -> jax.Array:
    """The Switch Transformer load-balancing loss ``E · Σ_e f_e · p̄_e`` (Fedus et al. 2022, eq. 4-6).

    ``f_e`` is the fraction of the ``N·k`` routing slots sent to expert ``e`` and ``p̄_e`` the mean
    probability of ``e`` over the ``N`` tokens; 1 when both are uniform. Gradients flow through ``p̄``.

    Args:
      probs: ``[..., E]`` the probabilities top-k read (``P̃`` for a graph router).
      indices: ``[..., k]`` the chosen experts (``top_k_routing``).
    Returns:
      a float32 scalar.
    """
    E = probs.shape[-1]
    if indices.shape[:-1] != probs.shape[:-1]:
        raise ValueError(f"indices {list(indices.shape)} must match probs {list(probs.shape)} but in the last axis")
    p = probs.astype(jnp.float32).reshape(-1, E)
    counts = jax.nn.one_hot(indices.reshape(-1), E, dtype=jnp.float32).sum(axis=0)
    fraction = counts / max(indices.size, 1)
    return E * jnp.sum(fraction * p.mean(axis=0))


def _check_experts(x: jax.Array, indices: jax.Array, weights: jax.Array, w1, b1, w2, b2) -> None:
    if not hasattr(x, "ndim") or x.ndim < 1 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x must be a floating-point array [..., d], got {describe(x)}")
    E, d, f = w1.shape if getattr(w1, "ndim", 0) == 3 else (None, None, None)
    if E is None or d != x.shape[-1]:
        raise ValueError(f"w1 must have shape [E, d, d_ff] with d = {x.shape[-1]}, got {describe(w1)}")
    expected = {"b1": (E, f), "w2": (E, f, d), "b2": (E, d)}
    for name, a in (("b1", b1), ("w2", w2), ("b2", b2)):
        if tuple(a.shape) != expected[name]:
            raise ValueError(f"{name} must have shape {list(expected[name])}, got {describe(a)}")
    if indices.shape != weights.shape or indices.shape[:-1] != x.shape[:-1]:
        raise ValueError(f"indices and weights must be [..., k] over x's tokens {list(x.shape[:-1])}, got "
                         f"indices {list(indices.shape)}, weights {list(weights.shape)}")


def expert_mlp(x: jax.Array, w1: jax.Array, b1: jax.Array, w2: jax.Array, b2: jax.Array) -> jax.Array:
    """Every expert on its own tokens: ``x [E, C, d] -> W2_e·GELU(W1_e·x + b1_e) + b2_e``, ``[E, C, d]``.

    The two-layer expert of Switch / GLaM with exact GELU (fastmoe's default MLP expert).
    """
    h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", x, w1) + b1[:, None], approximate=False)
    return jnp.einsum("ecf,efd->ecd", h, w2) + b2[:, None]


def moe_ffn_reference(x: jax.Array, indices: jax.Array, weights: jax.Array, w1: jax.Array, b1: jax.Array,
                      w2: jax.Array, b2: jax.Array) -> jax.Array:
    """The MoE feed-forward, densely: every expert on every token, gated ``y_n = Σ_e g_ne·expert_e(x_n)``.

    Args:
      x: ``[..., d]`` tokens.
      indices, weights: ``[..., k]`` from ``top_k_routing``.
      w1 ``[E, d, d_ff]``, b1 ``[E, d_ff]``, w2 ``[E, d_ff, d]``, b2 ``[E, d]``: the experts.
    Returns:
      ``[..., d]`` in x's dtype. Costs O(N·E·d·d_ff): E times the routed work.
    """
    _check_experts(x, indices, weights, w1, b1, w2, b2)
    E, d = w1.shape[0], x.shape[-1]
    tokens = x.reshape(-1, d)
    gates = jnp.einsum("nke,nk->ne", jax.nn.one_hot(indices.reshape(tokens.shape[0], -1), E, dtype=jnp.float32),
                       weights.reshape(tokens.shape[0], -1).astype(jnp.float32))
    every = expert_mlp(jnp.broadcast_to(tokens, (E, *tokens.shape)), w1, b1, w2, b2)  # [E, N, d]
    y = jnp.einsum("ne,end->nd", gates, every.astype(jnp.float32))
    return y.reshape(x.shape).astype(x.dtype)


def expert_capacity(num_tokens: int, num_experts: int, top_k: int, capacity_factor: Optional[float]) -> int:
    """Tokens an expert's buffer holds: ``ceil(capacity_factor·k·N/E)`` clipped to ``[1, N]``, or ``N``
    (no token is ever dropped) when ``capacity_factor`` is None (GShard, Lepikhin et al. 2021, Sec. 2.2)."""
    check_positive(num_tokens=num_tokens, num_experts=num_experts, top_k=top_k)
    if capacity_factor is None:
        return num_tokens
    check_scalar("capacity_factor", capacity_factor)
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be positive, got {capacity_factor}")
    return max(1, min(num_tokens, math.ceil(capacity_factor * top_k * num_tokens / num_experts)))


def moe_ffn_dispatch(x: jax.Array, indices: jax.Array, weights: jax.Array, w1: jax.Array, b1: jax.Array,
                     w2: jax.Array, b2: jax.Array, *, capacity: Optional[int] = None) -> jax.Array:
    """The MoE feed-forward by capacity dispatch: each expert runs on a buffer of ``capacity`` tokens.

    Routing slots are queued slot-major (every token's first choice, then every token's second, ...,
    token order within a slot: GShard's priority), an expert takes the first ``capacity`` slots
    queued to it, and a slot past that is dropped (adds 0). Tokens are scattered into ``[E, capacity, d]``
    buffers, the experts run batched, and each slot gathers its result back; no ``[N, E, C]`` dispatch
    tensor is formed. Cost O(E·C·d·d_ff) time and O(E·C·(d + d_ff) + N·k·E) memory. With
    ``capacity=None`` (``C = N``) nothing is dropped and the result equals ``moe_ffn_reference``.

    Args:
      x, indices, weights, w1, b1, w2, b2: as in ``moe_ffn_reference``; tokens of every leading axis
        share the experts' buffers.
      capacity: tokens per expert (``expert_capacity``), or None for ``N``.
    Returns:
      ``[..., d]`` in x's dtype.
    """
    _check_experts(x, indices, weights, w1, b1, w2, b2)
    E, d = w1.shape[0], x.shape[-1]
    tokens = x.reshape(-1, d)
    N, k = tokens.shape[0], indices.shape[-1]
    C = N if capacity is None else capacity
    check_positive(capacity=C)
    expert = indices.reshape(N, k).T.reshape(-1)  # slot-major queue [k·N]
    gate = weights.reshape(N, k).T.reshape(-1).astype(jnp.float32)
    onehot = jax.nn.one_hot(expert, E, dtype=jnp.int32)
    position = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=-1) - 1  # rank of the slot in its expert's queue
    kept = position < C
    source = jnp.tile(jnp.arange(N), k)
    buffers = jnp.zeros((E, C, d), x.dtype).at[expert, position].set(tokens[source], mode="drop")
    results = expert_mlp(buffers, w1, b1, w2, b2)
    slots = results[expert, jnp.minimum(position, C - 1)].astype(jnp.float32) * jnp.where(kept, gate, 0.0)[:, None]
    return slots.reshape(k, N, d).sum(axis=0).reshape(x.shape).astype(x.dtype)


__all__ = [
    "ROUTERS", "DEFAULT_TAU", "similarity_mix_reference", "similarity_mix", "attention_mix_reference",
    "attention_mix", "top_k_routing", "load_balancing_loss", "expert_mlp", "moe_ffn_reference", "expert_capacity",
    "moe_ffn_dispatch",
]
