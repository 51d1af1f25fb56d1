"""Attention-entropy losses: AEM's entropy maximization and the entropy-guided head regularizer.

AEM (Zhang et al., "AEM: Attention Entropy Maximization for Multiple Instance Learning based Whole Slide
Image Classification", arXiv:2406.15303, 2024): the MIL loss gains the negative entropy of the attention
distribution over a bag's instances, ``L = L_cls + λ·L_AEM`` with ``L_AEM = −H(a) = Σ_i a_i log a_i``, so
that minimizing ``L`` maximizes the entropy and penalizes attention that concentrates on few instances.
The official code (``main.py`` of github.com/dazhangyu123/AEM) uses ``λ = 0.1`` and averages over heads.

Entropy-guided attention (Jha & Reagen, "Entropy-Guided Attention for Private LLMs", arXiv:2501.03489v2,
2025, Algorithm 1, "Entropy Regularization Loss Computation", lines 2, 3, 11, 12, 15, 18, 19): with
``E_max = log T`` (``T`` the sequence length: the number of keys) and ``E^(l,h)`` the mean over queries of
head ``h``'s attention entropy in layer ``l`` (eq. 7),

    ``δ^(l,h) = E^(l,h) − θ^(l,h)·E_max``,  ``penalty^(l,h) = (δ^(l,h))² · 1(|δ^(l,h)| > γ·E_max)``,
    ``L_entropy = (1/L) Σ_l (1/H) Σ_h penalty^(l,h)``,  ``L_total = L_CE + λ·L_entropy``,

with learnable head-wise thresholds ``θ`` and a tolerance margin ``γ`` (``0.2`` and ``λ = 1e-5`` by default
in the official ``entropy_regularization.py``, github.com/Nandan91/entropy-guided-attention-llm, which
penalizes each query's deviation and sums over batch and queries where Algorithm 1 averages over queries
first). Their "entropic overload" (sec. 3, Fig. 2a) is a disproportionately large share of heads whose mean
entropy lies in ``[¾·max, max]``, ``max`` being **the largest entropy observed among all heads** of the model
(not ``log T``; the paper's well-behaved baseline has ≈90 % of heads in ``[max/4, ¾·max)``).
``entropy_profile`` gives each head's mean entropy over ``E_max`` (a common scale that leaves those ratios
unchanged) and ``entropic_overload`` the share of heads per layer at or above ``¾`` of the profile's maximum.
Verified against the paper's text (sec. 3, Algorithm 1) and the official code.

The blockwise forms walk the query tiles with ``scan_query_tiles`` and are differentiable: masked keys and
rows without keys give zero gradient (``entropy_terms`` never forms ``0·log 0``). ``row_entropies`` is
``attnjax.analysis.attention_entropy`` plus whether each row sees a key.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.analysis.entropy import entropy_of_map, entropy_terms
from attnjax.bias import Bias
from attnjax.checks import check_qk, check_scalar, describe
from attnjax.masks import Mask

OVERLOAD_FRACTION = 0.75
"""The fraction of the largest head entropy from which Jha & Reagen count a head as overloaded (``¾·max``)."""

ENTROPY_TOLERANCE = 0.2
"""``γ``, the tolerance margin as a fraction of ``E_max`` (the official code's default)."""


def row_entropies(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                  scale: Optional[float] = None, logits_soft_cap: Optional[float] = None,
                  block_q: int = 128) -> tuple[jax.Array, jax.Array]:
    """Each query's attention entropy in nats and whether it sees any key, blockwise and differentiable.

    ``attnjax.analysis.attention_entropy`` (finite gradients under masks) and whether each row sees a key.
    Memory and time as ``attention_entropy`` (one attention forward without values).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step; memory ``O(B·Hq·block_q·S)``.

    Returns:
      ``(entropy, has_keys)``: ``[B, Hq, T]`` float32 and bool.
    """
    def rows(log_p, logits, q_idx, kv_idx):
        return (jnp.sum(entropy_terms(log_p), axis=-1), jnp.any(jnp.isfinite(log_p), axis=-1)), None

    return scan_query_tiles(q, k, rows, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[0]


def _masked_mean(values: jax.Array, keep: jax.Array, axis) -> jax.Array:
    count = jnp.sum(keep, axis=axis, dtype=jnp.float32)
    total = jnp.sum(jnp.where(keep, values, 0.0), axis=axis)
    return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


def _dense_entropies(attention: jax.Array, valid: Optional[jax.Array],
                     from_logits: bool) -> tuple[jax.Array, jax.Array]:
    """Entropy and "has an instance" per row of dense pooling attention ``[B, N]`` / ``[B, H, N]``."""
    if attention.ndim not in (2, 3) or not jnp.issubdtype(attention.dtype, jnp.floating):
        raise ValueError(f"attention must be float logits or weights [B, N] or [B, H, N], got {describe(attention)}")
    keep = jnp.ones(attention.shape, bool)
    if valid is not None:
        valid = jnp.asarray(valid)
        if valid.shape != (attention.shape[0], attention.shape[-1]):
            raise ValueError(f"valid must be a bool [B, N] = {[attention.shape[0], attention.shape[-1]]} array "
                             f"(the real instances of each bag), got {describe(valid)}")
        keep = jnp.broadcast_to(valid[:, None, :] if attention.ndim == 3 else valid, attention.shape).astype(bool)
    x = attention.astype(jnp.float32)
    if from_logits:
        s = jnp.where(keep, x, -jnp.inf)
        lse = jax.nn.logsumexp(s, axis=-1, keepdims=True)
        log_p = jnp.where(jnp.isfinite(lse), s - lse, -jnp.inf)
        return jnp.sum(entropy_terms(log_p), axis=-1), jnp.any(jnp.isfinite(log_p), axis=-1)
    p = jnp.where(keep, x, 0.0)
    return entropy_of_map(p), jnp.any(p > 0, axis=-1)


def attention_entropy_regularizer(attention: jax.Array, k: Optional[jax.Array] = None, *, from_logits: bool = True,
                                  valid: Optional[jax.Array] = None, mask: Optional[Mask] = None,
                                  bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                                  logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """AEM's ``L_AEM = −H(a)``: minus the mean attention entropy; add ``λ·L_AEM`` to the task loss.

    Two inputs:

    - an attention-pooling head's scores (``k`` omitted): ``attention`` is ``[B, N]`` or ``[B, H, N]`` over
      ``N`` instances, logits (``from_logits=True``, softmax over ``N``) or weights summing to 1; ``valid``
      (bool ``[B, N]``) marks the real instances of padded bags;
    - queries and keys: ``attention`` is q ``[B, T, Hq, D]`` and ``k`` is ``[B, S, Hkv, D]``, the entropy of
      each query's softmax map is computed blockwise (``mask``, ``bias``, ``scale``, ``logits_soft_cap``,
      ``block_q`` as ``attnjax.analysis.attention_entropy``).

    The mean is over the rows (bag × head, or batch × head × query) that attend to at least one instance;
    the AEM paper and code use one bag per step and average over heads, so this is their ``div_loss``
    divided by the number of rows. Differentiable (zero gradient through masked entries).

    Returns:
      a float32 scalar in ``[−log N, 0]``.
    """
    if k is None:
        entropy, has_keys = _dense_entropies(jnp.asarray(attention), valid, from_logits)
    else:
        if valid is not None or not from_logits:
            raise ValueError("valid and from_logits apply to dense pooling attention; with q and k pass mask= "
                             "(an attnjax.masks value) instead")
        entropy, has_keys = row_entropies(attention, k, mask=mask, bias=bias, scale=scale,
                                          logits_soft_cap=logits_soft_cap, block_q=block_q)
    return -_masked_mean(entropy, has_keys, axis=None)


def mean_head_entropy(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                      bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                      logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """Jha & Reagen's ``E^(l,h)`` for one layer: each head's attention entropy averaged over the queries that
    see a key, ``[B, Hq]`` float32, blockwise and differentiable. Arguments as ``row_entropies``."""
    entropy, has_keys = row_entropies(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                                      block_q=block_q)
    return _masked_mean(entropy, has_keys, axis=-1)


def mean_head_entropy_of_map(probabilities: jax.Array) -> jax.Array:
    """``E^(l,h)`` from a dense map ``[..., H, T, S] -> [..., H]``: the mean row entropy over rows with mass."""
    p = jnp.asarray(probabilities, jnp.float32)
    return _masked_mean(entropy_of_map(p), jnp.any(p > 0, axis=-1), axis=-1)


def _check_layers(layers: Sequence[tuple[jax.Array, jax.Array]]) -> int:
    """The number of keys shared by every layer's ``(q, k)``."""
    if not isinstance(layers, (list, tuple)) or not layers or any(
            not isinstance(layer, (list, tuple)) or len(layer) != 2 for layer in layers):
        raise ValueError("layers must be a non-empty sequence of (q, k) pairs, one per layer")
    for q, k in layers:
        check_qk(q, k)
    shapes = {(q.shape[0], q.shape[2], k.shape[1]) for q, k in layers}
    if len(shapes) != 1:
        raise ValueError(f"every layer must share B, Hq and S, got (B, Hq, S) = {sorted(shapes)}")
    return layers[0][1].shape[1]


def _normalized(entropy: jax.Array, num_keys: int) -> jax.Array:
    max_entropy = jnp.log(jnp.float32(num_keys))
    return jnp.where(max_entropy > 0, entropy / jnp.where(max_entropy > 0, max_entropy, 1.0), 0.0)


def entropy_profile(layers: Sequence[tuple[jax.Array, jax.Array]], *, mask: Optional[Mask] = None,
                    bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                    logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """Each head's mean attention entropy over ``E_max = log S``, per layer: Jha & Reagen's head-wise
    entropy analysis, averaged over the batch.

    Args:
      layers: one ``(q [B, T, Hq, D], k [B, S, Hkv, D])`` pair per layer (same ``B``, ``Hq``, ``S``).
      mask, bias, scale, logits_soft_cap, block_q: as ``mean_head_entropy``, for every layer.

    Returns:
      ``[L, Hq]`` float32 in ``[0, 1]`` (0 when ``S = 1``).
    """
    num_keys = _check_layers(layers)
    profile = jnp.stack([jnp.mean(mean_head_entropy(q, k, mask=mask, bias=bias, scale=scale,
                                                    logits_soft_cap=logits_soft_cap, block_q=block_q), axis=0)
                         for q, k in layers])
    return _normalized(profile, num_keys)


def entropy_profile_of_maps(maps: jax.Array | Sequence[jax.Array]) -> jax.Array:
    """``entropy_profile`` from dense maps: ``[L, B, H, T, S]`` or a sequence of ``[B, H, T, S]`` -> ``[L, H]``."""
    maps = jnp.stack(maps) if isinstance(maps, (list, tuple)) else jnp.asarray(maps)
    if maps.ndim != 5:
        raise ValueError(f"maps must be [L, B, H, T, S] (or a list of [B, H, T, S]), got {describe(maps)}")
    return _normalized(jnp.mean(mean_head_entropy_of_map(maps), axis=1), maps.shape[-1])


def entropic_overload(profile: jax.Array, threshold: float = OVERLOAD_FRACTION) -> jax.Array:
    """Jha & Reagen's entropic overload per layer: the share of the layer's heads whose entropy is at least
    ``threshold`` times the largest entropy among all the model's heads (sec. 3, Fig. 2a: heads in
    ``[¾·max, max]``), ``[L, H] -> [L]`` float32.

    ``profile`` holds the heads' mean entropies on any common scale (``entropy_profile``'s ``E / log S``, or
    nats); the model-wide share of Fig. 2a is the mean over layers. A profile of zeros gives 1 (every head at
    the maximum).
    """
    check_scalar("threshold", threshold)
    profile = jnp.asarray(profile)
    if profile.ndim != 2:
        raise ValueError(f"profile must be [L, H] (from entropy_profile), got {describe(profile)}")
    return jnp.mean(profile >= threshold * jnp.max(profile), axis=-1, dtype=jnp.float32)


def entropy_guided_penalty(head_entropies: jax.Array, thresholds: jax.Array, *, max_entropy: float | jax.Array,
                           tolerance: float = ENTROPY_TOLERANCE) -> jax.Array:
    """Jha & Reagen's ``L_entropy`` (Algorithm 1) from head entropies; add ``λ·L_entropy`` to the task loss.

    Args:
      head_entropies: ``E^(l,h)``, ``[L, B, H, ...]`` (or ``[B, H, ...]`` for one layer): per sequence, e.g.
        ``mean_head_entropy`` stacked over layers. Trailing axes are penalized elementwise and averaged, so
        per-query entropies ``[L, B, H, T]`` give the official code's variant (which penalizes each query's
        deviation and sums where this averages).
      thresholds: the learnable ``θ``, ``[L, H]`` or ``[H]`` (shared by the layers, as in the official code),
        as fractions of ``E_max``; differentiable.
      max_entropy: ``E_max = log S`` for ``S`` keys.
      tolerance: ``γ``; deviations within ``γ·E_max`` are free.

    Returns:
      a float32 scalar: ``mean_l mean_h mean_{b,...} δ²·1(|δ| > γ·E_max)``.
    """
    check_scalar("tolerance", tolerance)
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    e = jnp.asarray(head_entropies, jnp.float32)
    if e.ndim == 2:
        e = e[None]
    if e.ndim < 3:
        raise ValueError(f"head_entropies must be [L, B, H, ...] or [B, H], got {describe(e)}")
    L, H = e.shape[0], e.shape[2]
    theta = jnp.asarray(thresholds, jnp.float32)
    if theta.shape not in ((H,), (L, H)):
        raise ValueError(f"thresholds must be [H] = [{H}] or [L, H] = [{L}, {H}] for head_entropies of shape "
                         f"{list(e.shape)}, got {describe(theta)}")
    theta = jnp.broadcast_to(theta, (L, H)).reshape(L, 1, H, *([1] * (e.ndim - 3)))
    delta = e - theta * max_entropy
    penalty = jnp.where(jnp.abs(delta) > tolerance * max_entropy, jnp.square(delta), 0.0)
    return jnp.mean(jnp.mean(jnp.moveaxis(penalty, 2, 1).reshape(L, H, -1), axis=-1))


def entropy_guided_regularizer(layers: Sequence[tuple[jax.Array, jax.Array]], thresholds: jax.Array, *,
                               tolerance: float = ENTROPY_TOLERANCE, mask: Optional[Mask] = None,
                               bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                               logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """``entropy_guided_penalty`` of every layer's heads computed blockwise from q and k, ``E_max = log S``.

    Args:
      layers: one ``(q [B, T, Hq, D], k [B, S, Hkv, D])`` pair per layer (same ``B``, ``Hq``, ``S``).
      thresholds: ``θ``, ``[L, Hq]`` or ``[Hq]``.
      tolerance: ``γ``.
      mask, bias, scale, logits_soft_cap, block_q: as ``mean_head_entropy``, for every layer.

    Returns:
      a float32 scalar, differentiable in q, k and ``thresholds``.
    """
    num_keys = _check_layers(layers)
    entropies = jnp.stack([mean_head_entropy(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                                             block_q=block_q) for q, k in layers])
    return entropy_guided_penalty(entropies, thresholds, max_entropy=jnp.log(jnp.float32(num_keys)),
                                  tolerance=tolerance)


__all__ = ["OVERLOAD_FRACTION", "ENTROPY_TOLERANCE", "row_entropies",
           "attention_entropy_regularizer", "mean_head_entropy", "mean_head_entropy_of_map", "entropy_profile",
           "entropy_profile_of_maps", "entropic_overload", "entropy_guided_penalty", "entropy_guided_regularizer"]
