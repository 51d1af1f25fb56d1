"""Which heads matter: retrieval heads, head importance by masking, AttentionInfluence.

Retrieval heads (Wu et al., "Retrieval Head Mechanistically Explains Long-Context Factuality", 2024,
sec. 2): on a needle-in-a-haystack prompt, head ``h`` *copy-pastes* at a generation step whose emitted
token ``w`` is in the needle ``k`` when the position ``j = argmax_j a_j`` its attention row attends to most
lies in the needle's span ``i_q`` and holds that token, ``x_j = w``. With ``g_h`` the needle tokens head
``h`` copy-pasted, its retrieval score is ``|g_h ∩ k| / |k|``. ``attention_argmax`` gives the per-step
argmax blockwise (one query tile at a time, never a ``[T, S]`` map); ``retrieval_scores`` the score.

Head masking: a user's ``loss_fn(head_mask) -> loss`` takes a float ``[L, H]`` mask ``ξ`` (1 keeps a head, 0
removes it). From it come the loss change when one head is masked (``head_ablation_loss_change``), the gradient
importance ``I_h = E_x |∂L(x)/∂ξ_h|`` at ``ξ = 1`` (``head_importance``), both from Michel et al., "Are Sixteen
Heads Really Better than One?", NeurIPS 2019, sec. 2.3 and 4.1, where ``ξ`` multiplies each head's output
(``Att_h(x) -> ξ_h · Att_h(x)``), and AttentionInfluence (Hua et al., "AttentionInfluence: Adopting Attention
Head Influence for Weak-to-Strong Pretraining Data Selection", arXiv:2505.07293, 2025): eq. 5,
``AttentionInfluence Score = (L_ref − L_base) / L_base``, the relative increase of a sample's mean token loss
when a reference model is the base model with its top-5 % retrieval heads masked (sec. 4.1-4.2; a higher score
means a more reasoning-intensive sample). The paper's masking (App. C) is not Michel's: it "set[s] the attention
weights provided by the specific attention heads to equal weights", ``1/L`` for a length-``L`` sequence;
``uniform_head_masking`` gives that head output, mixed with the real one by ``ξ``. Verified against the paper's
text (eq. 5, sec. 4, App. C).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.api import attention
from attnjax.bias import Bias
from attnjax.checks import check_positive, check_qk, describe
from attnjax.masks import Mask

LossFn = Callable[[jax.Array], jax.Array]
"""``head_mask [L, H] float32 -> loss``: a scalar, or per-example losses ``[N, ...]``."""


def attention_argmax(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                     bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                     logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """The key each query attends to most, ``argmax_j p_ij``, without a ``[T, S]`` map.

    For Wu et al.'s retrieval score, pass the queries of the generation steps: the row whose output is the
    emitted token (in teacher forcing, the query at position ``p`` for the token at ``p + 1``), against all
    keys (prompt and generated prefix; a ``Causal`` mask aligns the last query with the last key).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` (GQA: ``Hq % Hkv == 0``).
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step; memory ``O(B·Hq·block_q·S)``.

    Returns:
      ``[B, Hq, T]`` int32 key positions (the first one on ties), ``-1`` for a query with no allowed key.
    """
    def rows(log_p, logits, q_idx, kv_idx):
        best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jnp.where(jnp.isfinite(jnp.max(logits, axis=-1)), best, -1), None

    return scan_query_tiles(q, k, rows, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[0]


def _needle_bounds(name: str, value: int | jax.Array, batch: int) -> jax.Array:
    value = jnp.asarray(value)
    if not jnp.issubdtype(value.dtype, jnp.integer) or value.ndim > 1 or value.size not in (1, batch):
        raise ValueError(f"{name} must be an int or an int [B] = [{batch}] array, got {describe(value)}")
    return jnp.broadcast_to(value.reshape(-1), (batch,)).astype(jnp.int32)


def copy_paste_events(argmax_positions: jax.Array, generated_tokens: jax.Array, input_ids: jax.Array,
                      needle_start: int | jax.Array, needle_end: int | jax.Array) -> jax.Array:
    """Wu et al.'s copy-paste test at every generation step: the head's most-attended position ``j`` lies in
    the needle span ``[needle_start, needle_end)`` and ``input_ids[j]`` equals the emitted token.

    Args:
      argmax_positions: int ``[..., B, H, n]`` (``attention_argmax`` of the ``n`` generation steps, stacked
        over layers as leading dims); ``-1`` never copies.
      generated_tokens: int ``[B, n]``, the token emitted at each step.
      input_ids: int ``[B, S]``, the tokens at the key positions (prompt, then generated ones).
      needle_start, needle_end: ints or int ``[B]`` arrays, the needle's token span.

    Returns:
      bool ``[..., B, H, n]``.
    """
    j = jnp.asarray(argmax_positions)
    generated, ids = jnp.asarray(generated_tokens), jnp.asarray(input_ids)
    for name, x, expected, ok in (("argmax_positions", j, "[..., B, H, n]", j.ndim >= 3),
                                  ("generated_tokens", generated, "[B, n]", generated.ndim == 2),
                                  ("input_ids", ids, "[B, S]", ids.ndim == 2)):
        if not ok or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(f"{name} must be an int array {expected}, got {describe(x)}")
    B, n = generated.shape
    if j.shape[-3] != B or j.shape[-1] != n or ids.shape[0] != B:
        raise ValueError(f"argmax_positions [..., B, H, n], generated_tokens [B, n] and input_ids [B, S] must share "
                         f"B and n, got {list(j.shape)}, {list(generated.shape)}, {list(ids.shape)}")
    start = _needle_bounds("needle_start", needle_start, B)[:, None, None]
    end = _needle_bounds("needle_end", needle_end, B)[:, None, None]
    attended = ids[jnp.arange(B)[:, None, None], jnp.clip(j, 0, ids.shape[1] - 1)]
    return (j >= start) & (j < end) & (attended == generated[:, None, :])


def retrieval_scores(argmax_positions: jax.Array, generated_tokens: jax.Array, input_ids: jax.Array,
                     needle_start: int | jax.Array, needle_end: int | jax.Array, *,
                     distinct: bool = True) -> jax.Array:
    """Wu et al.'s retrieval score of each head, ``|g_h ∩ k| / |k|`` (sec. 2).

    Arguments as ``copy_paste_events``. With ``distinct`` (the paper's set definition) ``g_h ∩ k`` counts the
    needle positions the head copy-pasted from, each once, so the score lies in ``[0, 1]``; with
    ``distinct=False`` every copy-paste step counts, as the authors' code accumulates ``1/|k|`` per step
    (the two differ only when a head copies the same needle position twice).

    Returns:
      ``[..., B, H]`` float32 (0 for an empty needle).
    """
    events = copy_paste_events(argmax_positions, generated_tokens, input_ids, needle_start, needle_end)
    B = events.shape[-3]
    length = (_needle_bounds("needle_end", needle_end, B) - _needle_bounds("needle_start", needle_start, B))[:, None]
    if distinct:
        copied = jnp.sort(jnp.where(events, jnp.asarray(argmax_positions), -1), axis=-1)
        previous = jnp.concatenate([jnp.full_like(copied[..., :1], -1), copied[..., :-1]], axis=-1)
        count = jnp.sum((copied >= 0) & (copied != previous), axis=-1)
    else:
        count = jnp.sum(events, axis=-1)
    return jnp.where(length > 0, count / jnp.maximum(length, 1), 0.0).astype(jnp.float32)


def _check_head_mask_shape(shape: tuple[int, int]) -> tuple[int, int]:
    if not isinstance(shape, tuple) or len(shape) != 2:
        raise ValueError(f"head_mask_shape must be a tuple (num_layers, num_heads), got {describe(shape)}")
    check_positive(num_layers=shape[0], num_heads=shape[1])
    return shape


def _loss(loss_fn: LossFn, head_mask: jax.Array) -> jax.Array:
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be a callable head_mask [L, H] -> loss, got {type(loss_fn).__name__}")
    return jnp.asarray(loss_fn(head_mask), jnp.float32)


def head_ablation_loss_change(loss_fn: LossFn, head_mask_shape: tuple[int, int], *,
                              batch_size: Optional[int] = None) -> jax.Array:
    """The loss change when one head is masked: ``ΔL_h = L(ξ = 1 − e_h) − L(ξ = 1)``, every head at once.

    Michel et al. 2019, sec. 3 (ablating one head at test time). The ``L·H`` masked losses run as one
    ``jax.vmap`` of ``loss_fn``, or in vmapped chunks of ``batch_size`` masks (``jax.lax.map``) to bound memory.

    Args:
      loss_fn: ``head_mask [L, H] -> loss`` (scalar or per-example ``[N, ...]``); must be vmappable.
      head_mask_shape: ``(L, H)``.
      batch_size: masks per vmapped chunk; ``None`` vmaps all ``L·H`` at once.

    Returns:
      ``[L, H, ...]`` float32 (the loss's shape after ``[L, H]``); positive where removing the head hurts.
    """
    L, H = _check_head_mask_shape(head_mask_shape)
    if batch_size is not None:
        check_positive(batch_size=batch_size)
    one = functools.partial(_loss, loss_fn)
    base = one(jnp.ones((L, H), jnp.float32))
    masks = 1.0 - jnp.eye(L * H, dtype=jnp.float32).reshape(L * H, L, H)
    losses = jax.vmap(one)(masks) if batch_size is None else jax.lax.map(one, masks, batch_size=batch_size)
    return (losses - base).reshape(L, H, *base.shape)


def head_importance(loss_fn: LossFn, head_mask_shape: tuple[int, int], *, normalize_layers: bool = False) -> jax.Array:
    """Michel et al.'s head importance ``I_h = E_x |∂L(x)/∂ξ_h|`` at ``ξ = 1`` (sec. 4.1).

    The first-order (Taylor) estimate of the loss change when head ``h`` is masked. If ``loss_fn`` returns
    per-example losses ``[N, ...]`` the absolute value is taken per example before the mean, as the paper's
    expectation does (a scalar mean loss gives ``|E_x ∂L(x)/∂ξ_h|`` instead).

    Args:
      loss_fn: ``head_mask [L, H] -> loss``, differentiable in the mask.
      head_mask_shape: ``(L, H)``.
      normalize_layers: divide each layer's scores by their ℓ2 norm, as the paper does before pruning
        (following Molchanov et al. 2017).

    Returns:
      ``[L, H]`` float32, non-negative.
    """
    L, H = _check_head_mask_shape(head_mask_shape)
    ones = jnp.ones((L, H), jnp.float32)
    loss = functools.partial(_loss, loss_fn)
    out_ndim = jax.eval_shape(loss, ones).ndim
    if out_ndim == 0:
        importance = jnp.abs(jax.grad(loss)(ones))
    else:
        jacobian = jax.jacrev(loss)(ones)
        importance = jnp.mean(jnp.abs(jacobian), axis=tuple(range(out_ndim)))
    if normalize_layers:
        norm = jnp.linalg.norm(importance, axis=1, keepdims=True)
        importance = jnp.where(norm > 0, importance / jnp.where(norm > 0, norm, 1.0), 0.0)
    return importance


def uniform_head_masking(q: jax.Array, k: jax.Array, v: jax.Array, out: jax.Array, keep: jax.Array, *,
                         mask: Optional[Mask] = None) -> jax.Array:
    """AttentionInfluence's head masking (Hua et al. 2025, App. C) inside a layer: ``ξ_h·out_h + (1 − ξ_h)·ū_h``.

    ``ū_h`` is the output of head ``h`` with its attention weights set to equal weights, each query averaging the
    values of the keys ``mask`` lets it see (``1/L`` each for full attention over ``L`` tokens, as the paper
    states; ``1/(t + 1)`` over the prefix under a causal mask, our reading for a causal LM). With ``keep = ξ``
    from ``head_mask[layer]`` a ``loss_fn`` built on this masks heads the paper's way (``ξ_h = 0``), and
    ``attention_influence`` then gives eq. 5's score. Computed as ``attnjax.attention`` with zero queries (all
    logits equal), so it costs one attention forward and takes the mask, GQA and implementations of that call.

    Args:
      q: ``[B, T, Hq, D]`` (only its shape and dtype are used); k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``.
      out: ``[B, T, Hq, Dv]``, the layer's attention output before the output projection.
      keep: ``[Hq]`` float, ``ξ`` (1 keeps a head, 0 replaces it by uniform attention); differentiable.
      mask: the layer's ``attnjax.masks`` value.

    Returns:
      ``[B, T, Hq, Dv]`` in ``out``'s dtype.
    """
    check_qk(q, k)
    keep = jnp.asarray(keep)
    if keep.shape != (q.shape[2],) or out.shape != q.shape[:3] + v.shape[3:]:
        raise ValueError(f"keep must be [Hq] = [{q.shape[2]}] and out [B, T, Hq, Dv] = "
                         f"{list(q.shape[:3] + v.shape[3:])}, got keep {describe(keep)} and out {list(out.shape)}")
    uniform = attention(jnp.zeros_like(q), k, v, mask=mask).astype(jnp.float32)
    xi = keep.astype(jnp.float32)[:, None]
    return (xi * out.astype(jnp.float32) + (1.0 - xi) * uniform).astype(out.dtype)


def attention_influence(loss_fn: LossFn, masked_heads: jax.Array) -> jax.Array:
    """Hua et al.'s AttentionInfluence score ``(L_ref − L_base) / L_base`` (eq. 5).

    ``L_base`` is the loss of the base model (every head kept) and ``L_ref`` that of the reference model, the
    same model with ``masked_heads`` removed (in the paper, the top 5 % of heads by retrieval score on a synthetic
    retrieval task; e.g. from ``retrieval_scores``). A higher score means the sample depends more on those heads;
    the paper keeps the top 20 % of samples, comparing scores only within a domain. How a head is removed is
    ``loss_fn``'s business: it receives ``head_mask = 0`` for them; the paper's removal sets the heads' attention
    weights to equal weights (``uniform_head_masking``), Michel et al.'s multiplies their outputs by 0.

    Args:
      loss_fn: ``head_mask [L, H] -> loss > 0`` (a cross entropy); per-sample losses ``[N]`` give one score per
        sample, as the paper scores each sample by its mean token loss.
      masked_heads: bool ``[L, H]``, True for the heads to mask.

    Returns:
      float32 of the loss's shape.
    """
    heads = jnp.asarray(masked_heads)
    if heads.ndim != 2 or heads.dtype != jnp.bool_:
        raise ValueError(f"masked_heads must be a bool [L, H] array, got {describe(heads)}")
    base = _loss(loss_fn, jnp.ones(heads.shape, jnp.float32))
    reference = _loss(loss_fn, jnp.where(heads, 0.0, 1.0).astype(jnp.float32))
    return (reference - base) / base


__all__ = ["LossFn", "attention_argmax", "copy_paste_events", "retrieval_scores", "head_ablation_loss_change",
           "head_importance", "uniform_head_masking", "attention_influence"]
