"""Trainable Dynamic Mask Attention (DMA): per-key biases from the values choose each head's keys.

Shi et al. 2025, "Trainable Dynamic Mask Sparse Attention" (arXiv:2508.02124); public code
SmallDoges/flash-dmattn (``examples/modeling/modeling_doge.py`` ``DogeAttention``,
``flash_dmattn/integrations/modeling_flash_dynamic_mask_attention_utils.py``). Two parts:

- **Content-aware dynamic mask** (the paper's method section; its text was not available here, so no
  equation numbers are cited and the official code is followed throughout): each key gets a per-head
  score from its *value*, ``δ_j = A_h · softplus(v_j W_Δ)_h`` with ``v_j`` all KV heads' values of
  token ``j`` flattened, ``W_Δ: [Hkv·Dv, Hkv]`` and a learned per-head ``A``. The official code's
  comment gives the original formula as ``exp(A · softplus(v W_Δ))`` and uses ``A · softplus(·)``
  "for numerical stability"; ``dynamic_mask_bias`` computes the latter. The ``keep`` keys with the highest
  ``δ`` are kept (``torch.topk`` on the detached bias, official ``topk_mask``), and ``δ`` is added to
  the logits of the kept keys, so gradients reach ``W_Δ`` and ``A`` through the bias (the choice
  itself is not differentiated)::

      out_i = Σ_{j ∈ keep(i)} softmax_j(scale · q_i·k_j + δ_j) v_j

- **Position-aware skipping**: the kernel skips every tile with no kept pair (no kept key, or above
  the causal diagonal). Here the token engine (``attnjax.sparse.tokens``) runs only the kept keys:
  on the block-sparse engine over the key blocks they touch with a per-row bitmask, or by gathering
  them (its ``key_path="auto"`` rule picks), so skipped tiles cost nothing.

Which keys a query sees (``dynamic_mask_lists``):

- non-causal (the official path with a key-only bias ``[B, H, S]``): one top-``keep`` list per KV head,
  the same for every query (``KeyLists [B, Hq, 1, keep]``);
- causal (the official path with a 4-D causal mask, which fills masked bias entries with the dtype's
  minimum *before* the top-k): each query keeps the top ``keep`` keys among those at or before its
  position (``[B, Hq, T, keep]``). This is what makes the layer causal: with one list for all
  queries, a later key could push an earlier one out of an early query's list. The lists come from a
  running top-``keep`` over the key axis (``lax.scan``, O(S·keep) per head), not from a ``T×S``
  matrix.

The bias is applied without changing the engine: because it depends on the key only, it is folded
into one extra feature, ``q' = [q, 1]``, ``k' = [k, δ/scale]``, so ``scale · q'·k' = scale · q·k + δ``
exactly (in float32); the engine's gradient with respect to ``k'`` carries ``∂L/∂δ``.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from attnjax import masks
from attnjax.checks import check_positive, check_qkv
from attnjax.dispatch import dispatch
from attnjax.masks import Mask
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.sparse.tokens import KeyLists, token_sparse_attention

PAPER = "Shi et al. 2025, Trainable Dynamic Mask Sparse Attention (arXiv:2508.02124)"


def dynamic_mask_bias(v: jax.Array, w_dt: jax.Array, a: jax.Array, b_dt: Optional[jax.Array] = None) -> jax.Array:
    """Per-key, per-head bias ``δ = A · softplus(v W_Δ (+ b_Δ))``, float32 ``[B, Hkv, S]``.

    Args:
      v: values ``[B, S, Hkv, Dv]``; their heads are flattened to ``Hkv·Dv`` features (official
        ``dt_proj`` on ``value_states`` reshaped to ``[B, S, Hkv·Dv]``).
      w_dt: ``[Hkv·Dv, Hkv]``; b_dt: optional ``[Hkv]``; a: ``[Hkv]``.
    """
    B, S, H, Dv = v.shape
    if w_dt.shape != (H * Dv, H) or a.shape != (H,) or (b_dt is not None and b_dt.shape != (H,)):
        raise ValueError(f"dynamic_mask_bias: for v {v.shape} expected w_dt ({H * Dv}, {H}), a ({H},), b_dt ({H},); "
                         f"got w_dt {w_dt.shape}, a {a.shape}, b_dt {None if b_dt is None else b_dt.shape}")
    dt = v.reshape(B, S, H * Dv).astype(jnp.float32) @ w_dt.astype(jnp.float32)
    if b_dt is not None:
        dt = dt + b_dt.astype(jnp.float32)
    return (a.astype(jnp.float32) * jax.nn.softplus(dt)).transpose(0, 2, 1)


def _running_top(bias: jax.Array, keep: int) -> jax.Array:
    """``[B, H, S, keep]``: after key ``j``, the ids of the ``keep`` largest ``bias`` among keys ``0..j``
    (``-1`` while fewer than ``keep`` keys have been seen; ties keep the earlier key)."""
    B, H, S = bias.shape

    def step(state, inputs):
        values, ids = state
        b, j = inputs
        values, where = lax.top_k(jnp.concatenate([values, b[..., None]], -1), keep)
        ids = jnp.take_along_axis(jnp.concatenate([ids, jnp.broadcast_to(j, (B, H, 1))], -1), where, -1)
        return (values, ids), ids

    init = (jnp.full((B, H, keep), -jnp.inf, jnp.float32), jnp.full((B, H, keep), -1, jnp.int32))
    _, ids = lax.scan(step, init, (jnp.moveaxis(bias, -1, 0), jnp.arange(S, dtype=jnp.int32)))
    return jnp.moveaxis(ids, 0, 2)


def dynamic_mask_lists(bias: jax.Array, keep: int, *, num_heads: int, T: int, causal: bool) -> KeyLists:
    """The kept keys of each query head (the selection is not differentiated).

    Args:
      bias: ``[B, Hkv, S]`` (``dynamic_mask_bias``).
      keep: keys per list (official ``keep_window_size``); all ``S`` when ``keep >= S``.
      num_heads: query heads ``Hq`` (a multiple of ``Hkv``); query head ``h`` uses KV head ``h // G``.
      T: number of queries (bottom-right aligned with the ``S`` keys under ``causal``).
      causal: per query, the top ``keep`` among keys at or before its position, ``[B, Hq, T, keep]``;
        else one list per head, ``[B, Hq, 1, keep]``.
    """
    B, H, S = bias.shape
    keep = min(keep, S)
    bias = lax.stop_gradient(bias.astype(jnp.float32))
    if not causal:
        ids = lax.top_k(bias, keep)[1][:, :, None].astype(jnp.int32)
    else:
        running = _running_top(bias, keep)
        pos = jnp.arange(T) + (S - T)
        ids = jnp.where((pos >= 0)[:, None], jnp.take(running, jnp.clip(pos, 0, S - 1), axis=2), -1)
    return KeyLists(jnp.repeat(ids, num_heads // H, axis=1))


def _check(q, k, v, bias, keep):
    check_qkv(q, k, v)
    check_positive(keep=keep)
    B, S, Hkv = k.shape[0], k.shape[1], k.shape[2]
    if bias.shape != (B, Hkv, S):
        raise ValueError(f"bias must be [B, Hkv, S] = {(B, Hkv, S)} for k {tuple(k.shape)}, got {tuple(bias.shape)}")
    if not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must be a float array, got {bias.dtype}")


def dynamic_mask_attention_reference(q, k, v, bias, *, keep: int, mask: Optional[Mask] = None,
                                     scale: Optional[float] = None, return_lse: bool = False):
    """Dense DMA: softmax over ``scale·q·k + δ_j`` on the kept keys that ``mask`` allows (O(T·S) memory).

    Args as ``dynamic_mask_attention``. The kept set is ``dynamic_mask_lists`` (causal when ``mask``
    is ``masks.Causal()``), written out as a dense ``[B, Hq, T, S]`` mask.
    """
    B, T, Hq, _ = q.shape
    S = k.shape[1]
    lists = dynamic_mask_lists(bias, keep, num_heads=Hq, T=T, causal=isinstance(mask, masks.Causal))
    kept = masks.Explicit(lists.dense(T, S))
    full_bias = jnp.repeat(bias.astype(jnp.float32), Hq // bias.shape[1], axis=1)[:, :, None, :]
    return softmax_attention_reference(q, k, v, mask=kept if mask is None else kept & mask, bias=full_bias,
                                       scale=scale, return_lse=return_lse)


def biased_token_attention(q, k, v, bias, selection: KeyLists, *, mask: Optional[Mask] = None,
                           scale: Optional[float] = None, return_lse: bool = False, implementation: str = "xla"):
    """The token engine with a per-key additive bias: ``softmax_j(scale·q_i·k_j + δ_j)`` over ``selection``.

    The bias rides in one extra float32 feature, ``q' = [q, 1]``, ``k' = [k, δ/scale]``, so that
    ``scale·q'·k' = scale·q·k + δ`` exactly for a bias that depends on the key only (not on the query);
    gradients reach ``δ`` through ``k'``. q, k and v enter the engine in float32. Args as
    ``dynamic_mask_attention`` plus ``selection`` (the kept keys, ``attnjax.sparse.KeyLists``) and the
    engine's ``implementation``. The output takes q's dtype.
    """
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    q1 = jnp.concatenate([q.astype(jnp.float32), jnp.ones(q.shape[:-1] + (1,), jnp.float32)], -1)
    k1 = jnp.concatenate([k.astype(jnp.float32), (bias.astype(jnp.float32) / scale).transpose(0, 2, 1)[..., None]],
                         -1)
    out = token_sparse_attention(q1, k1, v.astype(jnp.float32), selection, mask=mask, scale=scale,
                                 return_lse=return_lse, implementation=implementation)
    if return_lse:
        return out[0].astype(q.dtype), out[1]
    return out.astype(q.dtype)


def dynamic_mask_attention_xla(q, k, v, bias, *, keep: int, mask: Optional[Mask] = None,
                               scale: Optional[float] = None, return_lse: bool = False):
    """DMA on the token engine's key lists (``biased_token_attention``; block union + bitmask or gathers,
    ``attnjax.sparse.tokens.choose_key_path``): at most O(T·keep·D) gathered, plus the O(S·keep)
    running top-k under ``Causal()``."""
    lists = dynamic_mask_lists(bias, keep, num_heads=q.shape[2], T=q.shape[1], causal=isinstance(mask, masks.Causal))
    return biased_token_attention(q, k, v, bias, lists, mask=mask, scale=scale, return_lse=return_lse)


_PATHS = {"reference": dynamic_mask_attention_reference, "xla": dynamic_mask_attention_xla}


def dynamic_mask_attention(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array, *, keep: int,
                           mask: Optional[Mask] = None, scale: Optional[float] = None, return_lse: bool = False,
                           implementation: str = "auto"):
    """Dynamic mask attention (Shi et al. 2025): each query attends to its kept keys with bias ``δ``.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``; ``Hq % Hkv == 0``.
      bias: float ``[B, Hkv, S]``, the per-key bias ``δ`` (``dynamic_mask_bias``); differentiable.
      keep: keys each query keeps (official ``keep_window_size``, 2048 in Doge).
      mask: ``masks.Causal()`` selects per query among earlier keys (see the module docstring); any
        other mask is applied on top of the per-head lists.
      scale: logit scale, default ``1/sqrt(D)``; return_lse: also return the float32 lse ``[B, T, Hq]``.
      implementation: "reference", "xla" or "auto".
    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype (or ``(out, lse)``); a query with no kept allowed key gets 0.
    """
    _check(q, k, v, bias, keep)
    if mask is not None:
        mask.check(q.shape[0], q.shape[2], q.shape[1], k.shape[1])
    return dispatch(_PATHS, implementation, q, k, v, bias, keep=keep, mask=mask, scale=scale,
                    return_lse=return_lse, what="dynamic mask attention")


__all__ = ["PAPER", "biased_token_attention", "dynamic_mask_attention", "dynamic_mask_attention_reference",
           "dynamic_mask_attention_xla", "dynamic_mask_bias", "dynamic_mask_lists"]
