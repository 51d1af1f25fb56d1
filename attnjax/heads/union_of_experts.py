"""Union of Experts: selective multi-head attention (SMHA) over equivalently decomposed heads.

Yang, Lian and Li, "Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed
Transformer" (2025, arXiv:2503.02495); official code github.com/YujiaoYang-work/UoE. Multi-head
attention is split, as in tensor parallelism, into ``E = H`` experts: expert ``e`` is head ``e`` with its
column slices of ``W_q, W_k, W_v`` (``[d, D]`` each) and its row slice ``W_o^e`` (``[D, d]``), so the sum
of all experts is the dense layer exactly. Two routing levels:

- patch-wise data selection (per token, ``SMHA_v3.py``): a router ``softmax(x_t W_r + b_r)`` picks the
  top-k experts of each token; expert ``e`` then attends only among the tokens routed to it,
  ``S_e = {t : e ∈ topk(t)}`` (causal inside ``S_e`` when causal), and its output returns to those
  tokens: ``y_t = Σ_{e : t ∈ S_e} g_{t,e} · attention(q^e_t, K^e_{S_e}, V^e_{S_e}) W_o^e``;
- expert selection (per sample, ``SMHA_v1.py``): a sequence-level router keeps ``k_s`` experts per
  sample; tokens then route among those only. It reads the whole sequence, so it is not causal.

Choices where the paper text was not available here (only its abstract and code): the official code
sums the routed experts' outputs unweighted, so its router gets no gradient; here each routed output
is weighted by the router probability ``g_{t,e} = p_{t,e}`` (Switch Transformer's ``p_i(x) E_i(x)``, also
MoH's), which gives the router a gradient for any ``k``. The sample router reads the mean token (the
official ``SMHA_v1`` reads the flattened fixed-length sequence); its probability multiplies the token
gates, and tokens choose among the sample's experts only (softmax over those). A per-expert
``capacity`` (Switch Transformer's, first come by position, so routing stays causal) bounds the tokens
each expert processes, which gives the routed path static shapes. The official code's filler tokens
(it pads every expert to the largest expert's count with unrouted tokens) are left out.

Paths (``x [B, T, d]``, ``w_q, w_k, w_v [d, E, D]``, ``w_o [E, D, d]``, ``selected, gates [B, T, E]``):
- ``selective_attention_reference``: every expert over all ``T`` tokens with the mask
  ``M[b, e, i, j] = sel[b, i, e] ∧ sel[b, j, e] (∧ j ≤ i)``, then gated: ``O(B·E·T²·D)``.
- ``selective_attention``: each expert gathers its (at most ``C = capacity``) tokens, in position order,
  projects and attends among them only, and scatters back: ``O(B·E·C²·D)`` attention and ``O(B·E·C·d·D)``
  projections, ``O(B·E·C·d)`` memory for the gathered tokens; with ``C ≈ k·T/E`` a factor ``k²/E²`` of
  the reference's attention work.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax import masks
from attnjax.api import attention
from attnjax.checks import check_positive


def _router_top_k(logits: jax.Array, k: int, allowed: Optional[jax.Array]) -> tuple[jax.Array, jax.Array]:
    """``(selected bool, gates)`` of the top-k rule, gates ``p = softmax`` over ``allowed``, 0 elsewhere."""
    num_experts = logits.shape[-1]
    check_positive(k=k)
    if k > num_experts:
        raise ValueError(f"top_k must be at most the number of experts ({num_experts}), got {k}")
    z = logits.astype(jnp.float32)
    if allowed is not None:
        z = jnp.where(allowed, z, -jnp.inf)
    probs = jax.nn.softmax(z, axis=-1)
    _, indices = jax.lax.top_k(probs, k)
    selected = jnp.sum(jax.nn.one_hot(indices, num_experts, dtype=jnp.int32), axis=-2) > 0
    return selected, jnp.where(selected, probs, 0.0)


def sample_routing(logits: jax.Array, top_k: int) -> tuple[jax.Array, jax.Array]:
    """UoE's expert selection: the ``top_k`` experts of each sample.

    Args:
      logits: ``[B, E]`` sample-level router logits.
      top_k: experts kept per sample, ``1 <= top_k <= E``.
    Returns:
      ``(allowed [B, E] bool, gates [B, E] float32)``: gates ``p_e = softmax(logits)_e`` on the kept
      experts, 0 elsewhere.
    """
    if logits.ndim != 2:
        raise ValueError(f"sample logits must have shape [B, E], got {logits.shape}")
    return _router_top_k(logits, top_k, None)


def token_routing(logits: jax.Array, top_k: int, *, capacity: Optional[int] = None,
                  allowed: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """UoE's patch-wise data selection: each token's ``top_k`` experts, at most ``capacity`` tokens each.

    ``p = softmax(logits)`` over the experts in ``allowed``; token ``t`` picks its ``top_k`` largest
    (ties: lower index first); then each expert keeps the first ``capacity`` tokens that picked it, in
    position order (a token's fate depends on earlier tokens only, so routing stays causal).

    Args:
      logits: ``[B, T, E]`` token router logits.
      top_k: experts per token, ``1 <= top_k <= E``; a token never gets an expert outside ``allowed``
        (with fewer allowed experts than ``top_k`` it gets just those).
      capacity: tokens per expert (a positive int), or ``None`` for no limit.
      allowed: ``[B, E]`` bool, the experts of each sample (``sample_routing``), or ``None`` for all.
    Returns:
      ``(selected [B, T, E] bool, gates [B, T, E] float32)``: gates ``p_e`` (the softmax over the
      allowed experts) on the kept (token, expert) pairs, 0 elsewhere (a token dropped by an expert's
      capacity keeps its other gates).
    """
    if logits.ndim != 3:
        raise ValueError(f"token logits must have shape [B, T, E], got {logits.shape}")
    if allowed is not None:
        if allowed.shape != (logits.shape[0], logits.shape[2]):
            raise ValueError(f"allowed must have shape [B, E] = {[logits.shape[0], logits.shape[2]]}, "
                             f"got {list(allowed.shape)}")
        allowed = allowed[:, None, :]
    selected, gates = _router_top_k(logits, top_k, allowed)
    if allowed is not None:
        selected = selected & allowed
    if capacity is not None:
        check_positive(capacity=capacity)
        rank = jnp.cumsum(selected.astype(jnp.int32), axis=1) - 1
        selected = selected & (rank < capacity)
    return selected, jnp.where(selected, gates, 0.0)


def check_selective(x: jax.Array, w_q: jax.Array, w_k: jax.Array, w_v: jax.Array, w_o: jax.Array,
                    selected: jax.Array, gates: jax.Array) -> None:
    """ValueError naming the argument unless ``x [B, T, d]``, ``w_q/w_k/w_v [d, E, D]``, ``w_o [E, D, d]``
    and ``selected/gates [B, T, E]`` agree."""
    if x.ndim != 3:
        raise ValueError(f"x must have shape [B, T, d], got {x.shape}")
    B, T, d = x.shape
    if w_q.ndim != 3 or w_q.shape[0] != d:
        raise ValueError(f"w_q must have shape [d, E, D] with d={d}, got {w_q.shape}")
    _, E, D = w_q.shape
    for name, w in (("w_k", w_k), ("w_v", w_v)):
        if w.shape != w_q.shape:
            raise ValueError(f"{name} must have w_q's shape [d, E, D] = {list(w_q.shape)}, got {list(w.shape)}")
    if w_o.shape != (E, D, d):
        raise ValueError(f"w_o must have shape [E, D, d] = {[E, D, d]}, got {list(w_o.shape)}")
    for name, a in (("selected", selected), ("gates", gates)):
        if a.shape != (B, T, E):
            raise ValueError(f"{name} must have shape [B, T, E] = {[B, T, E]}, got {list(a.shape)}")


def selective_attention_reference(x: jax.Array, w_q: jax.Array, w_k: jax.Array, w_v: jax.Array, w_o: jax.Array,
                                  selected: jax.Array, gates: jax.Array, *, causal: bool = True,
                                  scale: Optional[float] = None) -> jax.Array:
    """SMHA, masked: every expert head over all tokens, restricted to the pairs its routing allows.

    ``o^e = attention(x W_q^e, x W_k^e, x W_v^e)`` with key ``j`` visible to query ``i`` iff both were
    routed to ``e`` (and ``j <= i`` when causal); ``y = Σ_e gates_e · sel_e · o^e W_o^e``. A token not
    routed to ``e`` has an empty row there (output 0).

    Args:
      x: ``[B, T, d]``; w_q, w_k, w_v: ``[d, E, D]``; w_o: ``[E, D, d]``.
      selected: ``[B, T, E]`` bool (``token_routing``); gates: ``[B, T, E]`` weights.
      causal: keys at or before the query only.
      scale: logit scale, default ``1/sqrt(D)``.
    Returns:
      ``[B, T, d]`` in x's dtype.
    """
    check_selective(x, w_q, w_k, w_v, w_o, selected, gates)
    q, k, v = (jnp.einsum("btd,dek->btek", x, w) for w in (w_q, w_k, w_v))
    sel = jnp.swapaxes(selected, 1, 2)                                   # [B, E, T]
    mask = masks.Explicit(sel[:, :, :, None] & sel[:, :, None, :])
    if causal:
        mask = masks.Causal() & mask
    out = attention(q, k, v, mask=mask, scale=scale, implementation="reference")
    weight = jnp.where(selected, gates, 0.0).astype(jnp.float32)
    y = jnp.einsum("bted,bte,edm->btm", out.astype(jnp.float32), weight, w_o.astype(jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
    return y.astype(x.dtype)


def dispatch_indices(selected: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The token positions each expert processes: ``(index [B, E, C] int32, valid [B, E, C] bool)``.

    Slot ``c`` of expert ``e`` holds the ``c``-th token (in position order) routed to ``e``; tokens past
    the ``capacity`` ``C`` are dropped, empty slots are invalid (index 0).
    """
    B, T, E = selected.shape
    rank = jnp.cumsum(selected.astype(jnp.int32), axis=1) - 1
    slot = jnp.where(selected & (rank < capacity), rank, capacity)                   # capacity: dropped
    slot = jnp.swapaxes(slot, 1, 2)                                                   # [B, E, T]
    b = jnp.arange(B)[:, None, None]
    e = jnp.arange(E)[None, :, None]
    t = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None, None, :], (B, E, T))
    index = jnp.zeros((B, E, capacity), jnp.int32).at[b, e, slot].set(t, mode="drop")
    valid = jnp.zeros((B, E, capacity), bool).at[b, e, slot].set(True, mode="drop")
    return index, valid


def selective_attention(x: jax.Array, w_q: jax.Array, w_k: jax.Array, w_v: jax.Array, w_o: jax.Array,
                        selected: jax.Array, gates: jax.Array, *, causal: bool = True,
                        capacity: Optional[int] = None, scale: Optional[float] = None,
                        implementation: str = "auto") -> jax.Array:
    """SMHA, routed: each expert gathers its tokens, attends among them only, and scatters back.

    Equal to ``selective_attention_reference`` when every expert has at most ``capacity`` selected
    tokens (``token_routing(..., capacity=capacity)`` guarantees it; any excess is dropped here). The
    gathered tokens stay in position order, so causality is the slot order. Cost ``O(B·E·C²·D)`` for
    the attention (``C`` = capacity), ``O(B·E·C·d·D)`` for the projections.

    Args:
      x, w_q, w_k, w_v, w_o, selected, gates, causal, scale: as ``selective_attention_reference``.
      capacity: slots per expert (``<= T`` is used; default ``T``, exact for any routing).
      implementation: the inner ``attnjax.attention`` implementation.
    Returns:
      ``[B, T, d]`` in x's dtype.
    """
    check_selective(x, w_q, w_k, w_v, w_o, selected, gates)
    B, T, d = x.shape
    if capacity is not None:
        check_positive(capacity=capacity)
    capacity = T if capacity is None else min(capacity, T)
    index, valid = dispatch_indices(selected, capacity)                               # [B, E, C]
    tokens = jax.vmap(lambda xb, ib: xb[ib])(x, index)                               # [B, E, C, d]
    q, k, v = (jnp.einsum("becd,dek->bcek", tokens, w) for w in (w_q, w_k, w_v))     # [B, C, E, D]
    mask = masks.Explicit(valid[:, :, None, :])
    if causal:
        mask = masks.Causal() & mask
    out = attention(q, k, v, mask=mask, scale=scale, implementation=implementation)  # [B, C, E, D]
    weight = jnp.take_along_axis(jnp.swapaxes(jnp.where(selected, gates, 0.0), 1, 2), index, axis=2)
    weight = jnp.where(valid, weight, 0.0).astype(jnp.float32)                       # [B, E, C]
    y_slots = jnp.einsum("bced,bec,edm->becm", out.astype(jnp.float32), weight, w_o.astype(jnp.float32),
                         precision=jax.lax.Precision.HIGHEST)
    y = jax.vmap(lambda ys, ib: jnp.zeros((T, d), jnp.float32).at[ib.reshape(-1)].add(ys.reshape(-1, d)))(
        y_slots, index)
    return y.astype(x.dtype)


__all__ = ["sample_routing", "token_routing", "check_selective", "selective_attention_reference",
           "dispatch_indices", "selective_attention"]
