"""BAM: a mixture of attention experts upcycled from dense attention, and the MoE router helpers.

Zhang et al., "BAM! Just Like That: Simple and Efficient Parameter Upcycling for Mixture of Experts"
(NeurIPS 2024, arXiv:2408.08274), the mixture-model phase (abstract and Fig. 1): the attention block
becomes ``E`` attention experts, each a full multi-head attention initialized from one dense model, in
"a soft variant of Mixture of Attention": every expert attends for every token, weighted by its router
probability. (Only the abstract and Fig. 1's caption were readable here; the equation below is that
description written out with the notation of MoA, Zhang et al. 2022, "Mixture of Attention Heads".)

    y_t = Σ_e p_e(x_t) · MHA_e(x)_t,    p(x_t) = softmax(x_t W_r),
    MHA_e(x)_t = Σ_h attention(q^{e,h}_t, K^{e,h}, V^{e,h}) W_o^{e,h}   (+ b_o^e)

In the KV-sharing variant all experts read one set of keys and values (``K^{e,h} = K^h``), so the KV
cache is that of one dense layer. With ``top_k`` routing (the Mixture-of-Attention form of Zhang et al.
2022, "Mixture of Attention Heads", which BAM compares against) only the ``k`` largest probabilities are
kept, renormalized to sum to 1.

Shapes: ``q [B, T, E, H, D]``; ``k, v [B, S, Ekv, Hkv, D]`` with ``Ekv = E`` (separate experts) or
``Ekv = 1`` (shared K/V); ``gates [B, T, E]``; ``w_o [E, H, D, d]``; ``b_o [E, d]``; out ``[B, T, d]``.

Paths:
- ``bam_attention_reference``: one ``attention`` call per expert, then the weighted sum: the equation.
- ``bam_attention``: every expert as one multi-head call with ``E·H`` query heads (GQA over the shared
  K/V, never repeated), gates folded into one output contraction. Same FLOPs as the reference,
  ``O(B·T·S·E·H·D)``; one fused call and, with the blocked path, ``O(B·T·E·H·D)`` memory.
- ``bam_attention_routed``: top-k routing with shared K/V: only the ``k`` routed experts' queries attend
  (``k·H`` query heads per token, GQA over the shared K/V), ``O(B·T·S·k·H·D)``, a factor ``k/E`` of the
  attention work. Projections stay linear in ``T`` for all experts.

Router helpers shared by the head-routing modules: ``top_k_gates`` (the selection rule),
``load_balancing_loss`` (Switch Transformer, Fedus et al. 2022, eq. 4-6) and ``router_z_loss``
(ST-MoE, Zoph et al. 2022, eq. 5).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.api import attention
from attnjax.checks import check_positive
from attnjax.masks import Mask


def top_k_gates(logits: jax.Array, k: Optional[int] = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router probabilities and the top-k selection rule.

    ``p = softmax(logits)`` over the last (expert) axis; the ``k`` largest (ties: the lower index
    first, as ``jax.lax.top_k``) keep their probability renormalized over the selected,
    ``g_e = p_e / Σ_{e' ∈ top-k} p_{e'}`` (Mixture of Attention Heads, Zhang et al. 2022: a softmax over
    the top-k logits; Mixtral's rule), the others 0. ``k=None`` is BAM's soft routing: ``g = p``.

    Args:
      logits: ``[..., E]`` router logits (any float dtype; computed in float32).
      k: experts kept per token, ``1 <= k <= E``, or ``None`` for all (soft routing).
    Returns:
      ``(gates [..., E], indices [..., k], probs [..., E])``, float32 gates and probabilities, int32
      indices of the kept experts in decreasing probability (``k = E`` when ``k`` is None).
    """
    num_experts = logits.shape[-1]
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    if k is None:
        indices = jnp.broadcast_to(jnp.arange(num_experts, dtype=jnp.int32), probs.shape)
        return probs, indices, probs
    check_positive(k=k)
    if k > num_experts:
        raise ValueError(f"k must be at most the number of experts ({num_experts}), got {k}")
    values, indices = jax.lax.top_k(probs, k)
    weights = values / jnp.sum(values, axis=-1, keepdims=True)
    gates = jnp.einsum("...s,...se->...e", weights, jax.nn.one_hot(indices, num_experts, dtype=jnp.float32))
    return gates, indices.astype(jnp.int32), probs


def load_balancing_loss(probs: jax.Array, selected: jax.Array) -> jax.Array:
    """The Switch Transformer load-balancing loss ``E · Σ_e f_e P_e`` (Fedus et al. 2022, eq. 4-6).

    ``f_e``: the fraction of routing slots that go to expert ``e`` (``selected`` summed over tokens,
    divided by the number of selections, so ``Σ_e f_e = 1`` for any ``k``); ``P_e``: the mean router
    probability of ``e``. It is 1 for a uniform router and grows as routing concentrates; only ``P``
    carries gradients.

    Args:
      probs: ``[..., E]`` router probabilities (each row sums to 1).
      selected: ``[..., E]`` bool (or 0/1), the experts each token is routed to.
    Returns:
      float32 scalar.
    """
    if probs.shape != selected.shape:
        raise ValueError(f"probs and selected must have one shape [..., E], got {probs.shape} and {selected.shape}")
    num_experts = probs.shape[-1]
    p = probs.astype(jnp.float32).reshape(-1, num_experts)
    s = jax.lax.stop_gradient(selected.astype(jnp.float32).reshape(-1, num_experts))
    f = jnp.sum(s, axis=0) / jnp.maximum(jnp.sum(s), 1.0)
    return num_experts * jnp.sum(f * jnp.mean(p, axis=0))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """The router z-loss ``mean_tokens (log Σ_e exp(z_e))²`` (ST-MoE, Zoph et al. 2022, eq. 5).

    ``logits [..., E]``; returns a float32 scalar that keeps router logits small.
    """
    lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(lse * lse)


def check_experts(q: jax.Array, k: jax.Array, v: jax.Array, w_o: jax.Array) -> tuple[int, int, int]:
    """``(E, Ekv, d)`` after checking ``q [B, T, E, H, D]``, ``k/v [B, S, Ekv, Hkv, D]`` with ``Ekv`` in
    ``{1, E}`` and ``w_o [E, H, D, d]``; ValueError naming the argument and the shapes otherwise."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if a.ndim != 5:
            raise ValueError(f"{name} must have rank 5 [batch, seq, experts, heads, head_dim], got shape {a.shape}")
    _, _, num_experts, num_heads, head_dim = q.shape
    if k.shape[:4] != v.shape[:4] or k.shape[0] != q.shape[0] or k.shape[4] != head_dim:
        raise ValueError(f"k and v must agree on [batch, seq, experts, heads] with q's batch, and k on q's "
                         f"head_dim: q {q.shape}, k {k.shape}, v {v.shape}")
    if k.shape[2] not in (1, num_experts):
        raise ValueError(f"k/v must have 1 (shared) or E={num_experts} experts on axis 2, got k {k.shape}")
    if num_heads % k.shape[3]:
        raise ValueError(f"q heads ({num_heads}) must be a multiple of kv heads ({k.shape[3]}): q {q.shape}, "
                         f"k {k.shape}")
    if w_o.ndim != 4 or w_o.shape[:3] != (num_experts, num_heads, v.shape[4]):
        raise ValueError(f"w_o must have shape [E, H, Dv, d] = [{num_experts}, {num_heads}, {v.shape[4]}, d], "
                         f"got {w_o.shape}")
    return num_experts, k.shape[2], w_o.shape[3]


def _check_gates(gates: jax.Array, q: jax.Array) -> None:
    if gates.shape != q.shape[:3]:
        raise ValueError(f"gates must have shape [B, T, E] = {list(q.shape[:3])}, got {list(gates.shape)}")


def _mix(out: jax.Array, gates: jax.Array, w_o: jax.Array, b_o: Optional[jax.Array]) -> jax.Array:
    """``Σ_e g_e (o_e W_o^e + b_o^e)`` for ``out [B, T, E, H, Dv]``; float32 accumulation, q's dtype out."""
    g = gates.astype(jnp.float32)
    y = jnp.einsum("btehk,bte,ehkm->btm", out.astype(jnp.float32), g, w_o.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    if b_o is not None:
        y = y + jnp.einsum("bte,em->btm", g, b_o.astype(jnp.float32))
    return y.astype(out.dtype)


def bam_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array, w_o: jax.Array,
                            b_o: Optional[jax.Array] = None, *, mask: Optional[Mask] = None,
                            scale: Optional[float] = None) -> jax.Array:
    """The mixture of attention experts, expert by expert: ``y = Σ_e g_e · (MHA_e + b_o^e)``.

    BAM (Zhang et al. 2024): each expert ``e`` is a full multi-head attention
    ``attention(q_e, k_e, v_e) W_o^e`` (``k_e = k`` when K/V are shared), weighted by its gate.

    Args:
      q: ``[B, T, E, H, D]`` queries of every expert; k, v: ``[B, S, Ekv, Hkv, D]``, ``Ekv in {1, E}``.
      gates: ``[B, T, E]`` mixture weights (``top_k_gates``: soft, or zero outside the top-k).
      w_o: ``[E, H, Dv, d]`` output projections; b_o: ``[E, d]`` output biases or ``None``.
      mask: an ``attnjax.masks`` value the same for every head (e.g. ``Causal()``).
      scale: logit scale, default ``1/sqrt(D)``.
    Returns:
      ``[B, T, d]`` in q's dtype.
    """
    num_experts, num_kv_experts, _ = check_experts(q, k, v, w_o)
    _check_gates(gates, q)
    outs = [attention(q[:, :, e], k[:, :, e % num_kv_experts], v[:, :, e % num_kv_experts], mask=mask,
                      scale=scale, implementation="reference") for e in range(num_experts)]
    return _mix(jnp.stack(outs, axis=2), gates, w_o, b_o)


def bam_attention(q: jax.Array, k: jax.Array, v: jax.Array, gates: jax.Array, w_o: jax.Array,
                  b_o: Optional[jax.Array] = None, *, mask: Optional[Mask] = None, scale: Optional[float] = None,
                  implementation: str = "auto") -> jax.Array:
    """``bam_attention_reference`` as one attention call over ``E·H`` heads (the soft-routing path).

    With shared K/V the query heads are ordered ``(h, e)`` so that GQA maps query head ``h·E + e`` to
    the shared KV head of ``h`` (K/V are never repeated); with separate experts the heads are ``(e, h)``
    over ``E·Hkv`` KV heads. The gates and the ``E`` output projections are then one contraction.
    Cost ``O(B·T·S·E·H·D)`` as the reference; memory ``O(B·T·E·H·D)`` on the blocked path.

    Args: as ``bam_attention_reference``, plus ``implementation`` for ``attnjax.attention``.
    Returns:
      ``[B, T, d]`` in q's dtype.
    """
    num_experts, num_kv_experts, _ = check_experts(q, k, v, w_o)
    _check_gates(gates, q)
    B, T, E, H, D = q.shape
    if num_kv_experts == 1:
        heads = jnp.swapaxes(q, 2, 3).reshape(B, T, H * E, D)
        out = attention(heads, k[:, :, 0], v[:, :, 0], mask=mask, scale=scale, implementation=implementation)
        out = jnp.swapaxes(out.reshape(B, T, H, E, -1), 2, 3)
    else:
        S, Hkv = k.shape[1], k.shape[3]
        out = attention(q.reshape(B, T, E * H, D), k.reshape(B, S, E * Hkv, D), v.reshape(B, S, E * Hkv, -1),
                        mask=mask, scale=scale, implementation=implementation).reshape(B, T, E, H, -1)
    return _mix(out, gates, w_o, b_o)


def bam_attention_routed(q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, weights: jax.Array,
                         w_o: jax.Array, b_o: Optional[jax.Array] = None, *, mask: Optional[Mask] = None,
                         scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """Top-k routed mixture of attention experts with shared K/V: only the routed experts attend.

    Equal to ``bam_attention_reference`` with ``gates = Σ_s weights_s · onehot(indices_s)``. Token
    ``t``'s ``k`` routed query sets ``q[t, indices[t, s]]`` become ``k·H`` query heads ordered ``(h, s)``,
    one GQA call over the shared K/V; outputs go back to their experts' output projections. Attention
    cost ``O(B·T·S·k·H·D)``, a factor ``k/E`` of the soft path; the output contraction is
    ``O(B·T·E·H·Dv·d)``, linear in ``T``.

    Args:
      q: ``[B, T, E, H, D]``; k, v: ``[B, S, 1, Hkv, D]`` (shared K/V; separate experts would need a
        per-query choice of KV heads, which no attention path serves: ``NotImplementedError``).
      indices: ``[B, T, k]`` int routed experts; weights: ``[B, T, k]`` their gates.
      w_o, b_o, mask, scale, implementation: as ``bam_attention``.
    Returns:
      ``[B, T, d]`` in q's dtype.
    """
    num_experts, num_kv_experts, _ = check_experts(q, k, v, w_o)
    if num_kv_experts != 1:
        raise NotImplementedError("bam_attention_routed serves shared K/V (k, v with 1 expert on axis 2); with "
                                  "separate K/V experts use bam_attention with top-k gates (every expert attends)")
    B, T, E, H, D = q.shape
    if indices.ndim != 3 or indices.shape[:2] != (B, T) or weights.shape != indices.shape:
        raise ValueError(f"indices and weights must have shape [B, T, k] with [B, T] = {[B, T]}, "
                         f"got {list(indices.shape)} and {list(weights.shape)}")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise TypeError(f"indices must be an integer array, got dtype {indices.dtype}")
    top = indices.shape[2]
    routed = jnp.take_along_axis(q, indices[:, :, :, None, None], axis=2)        # [B, T, k, H, D]
    heads = jnp.swapaxes(routed, 2, 3).reshape(B, T, H * top, D)
    out = attention(heads, k[:, :, 0], v[:, :, 0], mask=mask, scale=scale, implementation=implementation)
    out = jnp.swapaxes(out.reshape(B, T, H, top, -1), 2, 3)                        # [B, T, k, H, Dv]
    onehot = jax.nn.one_hot(indices, num_experts, dtype=jnp.float32)              # [B, T, k, E]
    per_expert = jnp.einsum("btshk,bts,btse->btehk", out.astype(jnp.float32), weights.astype(jnp.float32),
                            onehot, precision=jax.lax.Precision.HIGHEST)
    gates = jnp.einsum("bts,btse->bte", weights.astype(jnp.float32), onehot)
    y = jnp.einsum("btehk,ehkm->btm", per_expert, w_o.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    if b_o is not None:
        y = y + jnp.einsum("bte,em->btm", gates, b_o.astype(jnp.float32))
    return y.astype(q.dtype)


__all__ = ["top_k_gates", "load_balancing_loss", "router_z_loss", "check_experts", "bam_attention_reference",
           "bam_attention", "bam_attention_routed"]
