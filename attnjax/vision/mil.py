"""Attention-based multiple-instance-learning (MIL) pooling: ABMIL and ACMIL's multi-branch attention with
stochastic top-K instance masking.

A bag of ``N`` instance embeddings ``h_n ∈ R^C`` (e.g. the patch features of a whole-slide image) is pooled to
one vector by attention (Ilse et al., "Attention-based Deep Multiple Instance Learning", ICML 2018, sec. 2.4):

    z = Σ_n a_n h_n                                                  (eq. 7)
    a_n = softmax_n(wᵀ tanh(V h_n))                                  (eq. 8, attention)
    a_n = softmax_n(wᵀ (tanh(V h_n) ⊙ sigm(U h_n)))                  (eq. 9, gated attention)

with ``V, U ∈ R^{L×C}`` and ``w ∈ R^L``. The official ABMIL and ACMIL code (``nn.Linear`` layers) adds biases to
``V h`` and ``U h``; a bias on ``wᵀ(·)`` would be a constant shift of every logit of the bag, which a softmax
over the bag ignores, so ``w`` has none here.

ACMIL (Zhang et al., "Attention-Challenging Multiple Instance Learning for Whole Slide Image Classification",
ECCV 2024) fights attention over-concentration with

* multiple-branch attention (MBA): ``M`` attention maps from one (gated) attention network with ``w ∈ R^{L×M}``
  (one column per branch), each pooling its own bag feature ``z_m = Σ_n a_{m,n} h_n``; the slide feature pools
  with the branches' mean map, ``z = Σ_n mean_m(a_{m,n}) h_n = mean_m z_m``;
* stochastic top-K instance masking (STKIM), in training only: in each branch take the ``K`` instances with the
  largest attention logits, choose ``⌊K·p⌋`` of them uniformly at random, and drop them from that branch's softmax
  (the official code, dazhangyu123/ACMIL ``architecture/transformer.py``, ``ACMIL_GA.forward``: ``torch.topk``,
  a random permutation of the ``K`` slots, logits set to ``-1e9``; here they are excluded exactly);
* a diversity loss on the branches' attention maps: the mean pairwise cosine similarity
  ``2/(M(M−1)) Σ_{i<j} cos(a_i, a_j)`` of the (masked) softmax maps (the official training loop,
  ``Step3_WSI_classification_ACMIL.py``, ``diff_loss``).

Padded bags: ``valid`` bool ``[B, N]`` (False on padding) excludes instances from the softmax and from the top-K;
a bag with fewer than ``K`` valid instances masks ``⌊min(K, n_valid)·p⌋`` of them, as the official code does with
``min(K, N)`` for a bag of ``N`` instances.

Every op here is linear in ``N`` (no pairwise term): the functions are their own references, memory ``O(B·M·N)``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.checks import describe


def check_bag(h: jax.Array, valid: Optional[jax.Array]) -> None:
    """ValueError/TypeError naming the argument unless ``h`` is a float ``[B, N, C]`` and ``valid`` bool ``[B, N]``."""
    if getattr(h, "ndim", None) != 3:
        raise ValueError(f"h must have shape [batch, instances, channels], got {describe(h)}")
    if not jnp.issubdtype(h.dtype, jnp.floating):
        raise TypeError(f"h must be a floating-point array, got {describe(h)}")
    if valid is not None and (getattr(valid, "dtype", None) != jnp.bool_ or valid.shape != h.shape[:2]):
        raise ValueError(f"valid must be a bool array [batch, instances] = {list(h.shape[:2])}, got {describe(valid)}")


def masked_softmax(logits: jax.Array, keep: Optional[jax.Array] = None) -> jax.Array:
    """``softmax`` over the last axis among the entries where ``keep`` (broadcastable) is True, 0 elsewhere; a row
    with nothing kept is all zeros (never NaN). float32."""
    logits = logits.astype(jnp.float32)
    if keep is None:
        return jax.nn.softmax(logits, axis=-1)
    keep = jnp.broadcast_to(keep, logits.shape)
    top = jax.lax.stop_gradient(jnp.max(jnp.where(keep, logits, -jnp.inf), axis=-1, keepdims=True))
    shifted = jnp.where(keep, logits - jnp.where(jnp.isfinite(top), top, 0.0), 0.0)
    e = jnp.where(keep, jnp.exp(shifted), 0.0)
    total = jnp.sum(e, axis=-1, keepdims=True)
    return e / jnp.where(total > 0, total, 1.0)


def mil_attention_logits(h: jax.Array, v_kernel: jax.Array, v_bias: Optional[jax.Array], w: jax.Array, *,
                         u_kernel: Optional[jax.Array] = None, u_bias: Optional[jax.Array] = None) -> jax.Array:
    """The attention logits of ABMIL (Ilse et al. 2018, eq. 8; gated with ``u_kernel``, eq. 9), one row per branch.

    ``s_{m,n} = w_mᵀ tanh(h_n V + b_V)`` or ``w_mᵀ (tanh(h_n V + b_V) ⊙ σ(h_n U + b_U))``.

    Args:
      h: ``[B, N, C]`` instances; v_kernel: ``[C, L]``; v_bias: ``[L]`` or None.
      w: ``[L, M]``, one column per attention branch (``M = 1`` for ABMIL).
      u_kernel, u_bias: the gate ``[C, L]``, ``[L]`` (gated attention), or None (eq. 8).

    Returns:
      ``float32 [B, M, N]``.
    """
    check_bag(h, None)
    C = h.shape[2]
    if getattr(v_kernel, "ndim", None) != 2 or v_kernel.shape[0] != C:
        raise ValueError(f"v_kernel must have shape [{C}, hidden] for h of shape {list(h.shape)}, "
                         f"got {describe(v_kernel)}")
    L = v_kernel.shape[1]
    if getattr(w, "ndim", None) != 2 or w.shape[0] != L:
        raise ValueError(f"w must have shape [{L}, branches], got {describe(w)}")
    if u_kernel is not None and jnp.shape(u_kernel) != (C, L):
        raise ValueError(f"u_kernel must have shape [{C}, {L}] (as v_kernel), got {describe(u_kernel)}")
    hp = jax.lax.Precision.HIGHEST
    hf = h.astype(jnp.float32)
    t = jnp.einsum("bnc,cl->bnl", hf, v_kernel.astype(jnp.float32), precision=hp)
    t = jnp.tanh(t if v_bias is None else t + v_bias.astype(jnp.float32))
    if u_kernel is not None:
        g = jnp.einsum("bnc,cl->bnl", hf, u_kernel.astype(jnp.float32), precision=hp)
        t = t * jax.nn.sigmoid(g if u_bias is None else g + u_bias.astype(jnp.float32))
    return jnp.einsum("bnl,lm->bmn", t, w.astype(jnp.float32), precision=hp)


def attention_mil_pooling(h: jax.Array, logits: jax.Array, *, valid: Optional[jax.Array] = None,
                          dropped: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
    """Attention MIL pooling ``z_m = Σ_n a_{m,n} h_n`` with ``a_m = softmax_n(s_m)`` (Ilse et al. 2018, eq. 7).

    Args:
      h: ``[B, N, C]`` instances; logits: ``[B, M, N]`` (``mil_attention_logits``).
      valid: bool ``[B, N]``, False on padding; dropped: bool ``[B, M, N]``, True where a branch drops an
        instance (``stochastic_topk_instance_mask``). Excluded instances get weight 0; a branch with no instance
        left pools to 0.

    Returns:
      ``(z [B, M, C] in h's dtype, a float32 [B, M, N])``.
    """
    check_bag(h, valid)
    B, N, _ = h.shape
    if getattr(logits, "ndim", None) != 3 or logits.shape[0] != B or logits.shape[2] != N:
        raise ValueError(f"logits must have shape [{B}, branches, {N}] for h of shape {list(h.shape)}, "
                         f"got {describe(logits)}")
    if dropped is not None and (getattr(dropped, "dtype", None) != jnp.bool_ or dropped.shape != logits.shape):
        raise ValueError(f"dropped must be a bool array of logits' shape {list(logits.shape)}, got {describe(dropped)}")
    keep = None if valid is None else valid[:, None, :]
    if dropped is not None:
        keep = ~dropped if keep is None else keep & ~dropped
    a = masked_softmax(logits, keep)
    z = jnp.einsum("bmn,bnc->bmc", a, h.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return z.astype(h.dtype), a


def check_topk(top_k: int, mask_drop: float) -> None:
    """ValueError naming the argument unless ``top_k`` is a positive int and ``mask_drop`` in ``[0, 1]``."""
    if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool) or top_k <= 0:
        raise ValueError(f"top_k must be a positive int, got {describe(top_k)}")
    if not isinstance(mask_drop, (int, float)) or isinstance(mask_drop, bool) or not 0 <= mask_drop <= 1:
        raise ValueError(f"mask_drop must be a number in [0, 1], got {describe(mask_drop)}")


def topk_instance_mask(logits: jax.Array, noise: jax.Array, top_k: int, mask_drop: float, *,
                       valid: Optional[jax.Array] = None) -> jax.Array:
    """ACMIL's STKIM rule with its randomness given: which instances each branch drops (Zhang et al., ECCV 2024).

    In each row ``(b, m)``: rank the valid instances by logit, take the first ``k = min(top_k, n_valid)``
    (``lax.top_k`` order; ties go to the lower index), order those ``k`` slots by ``noise[b, m, slot]``
    (ascending) and drop the first ``⌊k·p⌋`` (``p = mask_drop``, ``⌊·⌋`` as Python's ``int(k * p)``). With
    uniform noise this is a uniformly random ``⌊k·p⌋``-subset of the top ``k``, as the official code's
    ``torch.argsort(torch.rand(...))[:, :int(K·p)]``.

    Args:
      logits: ``[B, M, N]``; noise: ``[B, M, min(top_k, N)]`` real values (one per top-K slot, slot 0 the
        largest logit); top_k: ``K``; mask_drop: ``p``; valid: bool ``[B, N]`` or None.

    Returns:
      bool ``[B, M, N]``, True on the dropped instances (never on padding).
    """
    check_topk(top_k, mask_drop)
    if getattr(logits, "ndim", None) != 3:
        raise ValueError(f"logits must have shape [batch, branches, instances], got {describe(logits)}")
    B, M, N = logits.shape
    k = min(int(top_k), N)
    if jnp.shape(noise) != (B, M, k):
        raise ValueError(f"noise must have shape [batch, branches, min(top_k, instances)] = {[B, M, k]}, "
                         f"got {describe(noise)}")
    if valid is not None and (getattr(valid, "dtype", None) != jnp.bool_ or valid.shape != (B, N)):
        raise ValueError(f"valid must be a bool array [batch, instances] = {[B, N]}, got {describe(valid)}")
    scores = logits.astype(jnp.float32)
    n_valid = jnp.full((B,), N, jnp.int32)
    if valid is not None:
        scores = jnp.where(valid[:, None, :], scores, -jnp.inf)
        n_valid = jnp.sum(valid, axis=1, dtype=jnp.int32)
    _, index = jax.lax.top_k(scores, k)  # [B, M, k], largest first
    k_eff = jnp.minimum(n_valid, k)
    count = jnp.asarray([int(j * mask_drop) for j in range(k + 1)], jnp.int32)[k_eff]  # [B]
    slot = jnp.arange(k)
    noise = jnp.where(slot[None, None, :] < k_eff[:, None, None], noise.astype(jnp.float32), jnp.inf)
    order = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1)  # each slot's rank by noise
    drop_slot = order < count[:, None, None]
    rows = (jnp.arange(B)[:, None, None], jnp.arange(M)[None, :, None], index)
    return jnp.zeros((B, M, N), jnp.bool_).at[rows].set(drop_slot)


def stochastic_topk_instance_mask(logits: jax.Array, top_k: int, mask_drop: float, *, rng: jax.Array,
                                  valid: Optional[jax.Array] = None) -> jax.Array:
    """ACMIL's stochastic top-K instance masking (STKIM, Zhang et al., ECCV 2024): ``topk_instance_mask`` with
    uniform noise drawn from ``rng``; bool ``[B, M, N]``, True on the instances each branch drops."""
    if getattr(logits, "ndim", None) != 3:
        raise ValueError(f"logits must have shape [batch, branches, instances], got {describe(logits)}")
    B, M, N = logits.shape
    noise = jax.random.uniform(rng, (B, M, min(int(top_k), N)))
    return topk_instance_mask(logits, noise, top_k, mask_drop, valid=valid)


def acmil_diversity_loss(attention_weights: jax.Array) -> jax.Array:
    """ACMIL's diversity loss on the branches' attention maps: ``2/(M(M−1)) Σ_{i<j} cos(a_i, a_j)``, averaged over
    the batch (Zhang et al., ECCV 2024, MBA; the official ``diff_loss``). 0 for one branch.

    Args:
      attention_weights: ``[B, M, N]``, the branches' softmax maps (``attention_mil_pooling``'s ``a``, masked as
        in training). A zero row (no instance kept) has cosine 0 with every row (norms floored at 1e-8, as
        ``torch.cosine_similarity``).

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    if getattr(attention_weights, "ndim", None) != 3:
        raise ValueError(f"attention_weights must have shape [batch, branches, instances], "
                         f"got {describe(attention_weights)}")
    M = attention_weights.shape[1]
    if M < 2:
        return jnp.zeros((), jnp.float32)
    a = attention_weights.astype(jnp.float32)
    unit = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    cos = jnp.einsum("bin,bjn->bij", unit, unit, precision=jax.lax.Precision.HIGHEST)
    upper = np.triu(np.ones((M, M), bool), k=1)
    return jnp.mean(jnp.sum(jnp.where(upper, cos, 0.0), axis=(1, 2))) / (M * (M - 1) / 2)


__all__ = ["masked_softmax", "mil_attention_logits", "attention_mil_pooling", "topk_instance_mask",
           "stochastic_topk_instance_mask", "acmil_diversity_loss"]
