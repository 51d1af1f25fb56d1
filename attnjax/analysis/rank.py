"""Ranks and hardness parameters of attention maps, and the rank of a linear-attention KV state.

- ``numerical_rank``: the number of singular values above ``rtol·σ_max`` (NumPy's and PyTorch's
  ``matrix_rank`` rule, default ``rtol = max(m, n)·ε`` of float32).
- ARank (Luo et al., "γ-MoD: Exploring Mixture-of-Depth Adaptation for Multimodal Large Language Models",
  arXiv:2410.13859, 2024): a layer's mean attention-map rank over heads, ``ARank = (1/H) Σ_h rank(A_h)``;
  γ-MoD replaces the layers of lowest ARank (most redundant tokens) by mixture-of-depth layers. We follow the
  official code (github.com/Yaxin9Luo/Gamma-MOD, ``compute_attention_rank`` in
  ``gamma_mod/model/language_model/llava_llama.py``): ``A_h`` is the softmax map (Hugging Face's
  ``output_attentions``), causal-masked, **with its diagonal set to 0**, and ``rank`` is
  ``torch.linalg.matrix_rank`` (``numerical_rank`` here), averaged over the heads. Zeroing the diagonal matters:
  a causal softmax map is triangular with a positive diagonal, hence always of full rank. The paper's own
  equation could not be read here (no copy of its text was reachable); the definition above is the code's.
- The rank of the KV buffer of linear attention (Fan et al., "Breaking the Low-Rank Dilemma of Linear
  Attention", CVPR 2025, the RALA paper): ``rank(Σ_j φ(k_j) v_jᵀ)``, a ``[D', Dv]`` matrix, whose low rank
  the paper identifies as linear attention's weakness.
- HyperAttention's hardness parameters (Han et al., "HyperAttention: Long-context Attention in Near-Linear
  Time", ICLR 2024, arXiv:2310.05869). With ``A = exp(scale·QKᵀ)`` (masked entries 0) and ``D`` its row sums:
  the column-norm parameter ``α = n · max_j ‖D⁻¹A e_j‖²₂`` (the paper assumes ``‖D⁻¹A e^(i)‖²₂ ≤ α/n`` for
  every column ``i``; ``n`` = number of keys; for a square map 1 under uniform attention and ``n²`` when every
  query attends to one key), the row-ratio parameter ``κ = max_{i,j} ⟨1 − M^H_i, A_i⟩ / ⟨1 − M^H_j, A_j⟩``
  ("the ratio of row norms in the unnormalized attention matrix after detecting and removing large entries",
  ``M^H`` the mask of those large entries; the condition number of the paper's Lemma 1 on approximating
  ``D``), and the stable rank ``srank(D⁻¹A) = ‖D⁻¹A‖²_F / ‖D⁻¹A‖²₂`` (earlier work is sub-quadratic only for
  bounded entries or a low stable rank, the paper's starting point). Checked against the paper's abstract and
  the ICLR 2024 reviews quoting the ``α`` assumption; the full text of Lemma 1 (the exact form of ``κ``) was not
  reachable here, so ``κ`` follows the abstract's wording with the row norms taken as row sums (ℓ1, as ``D``).

``α`` and ``κ`` are computed blockwise: the squared column norms are column sums of ``p²`` over query tiles, and
``log κ = max_i lse_i − min_i lse_i`` with ``lse_i`` the log of row ``i``'s sum of ``exp(logits)`` over its
allowed, non-heavy keys (a shared reference, so no row sum is ever formed in linear space). Every rank needs the
whole matrix and an SVD: those tools take or build dense maps and are meant for small ``T``
(``O(B·H·T·S)`` memory, ``O(B·H·T·S·min(T, S))`` time).
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.analysis.blockwise import scan_query_tiles
from attnjax.bias import Bias
from attnjax.checks import check_qk, check_scalar, describe
from attnjax.linear.feature_maps import FeatureMap, get_feature_map, is_softmax_kernel
from attnjax.masks import Mask, query_positions


def _matrices(name: str, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must be a float array of matrices [..., m, n], got {describe(x)}")
    return x.astype(jnp.float32)


def numerical_rank(matrices: jax.Array, rtol: Optional[float] = None) -> jax.Array:
    """The numerical rank of each matrix ``[..., m, n] -> [...]`` int32: the number of singular values
    ``σ_i > rtol·σ_max``; ``rtol`` defaults to ``max(m, n)·ε(float32)``. A zero matrix has rank 0."""
    x = _matrices("matrices", matrices)
    if rtol is not None:
        check_scalar("rtol", rtol)
    rtol = max(x.shape[-2:]) * float(jnp.finfo(jnp.float32).eps) if rtol is None else float(rtol)
    sv = jnp.linalg.svd(x, compute_uv=False)
    return jnp.sum(sv > rtol * sv[..., :1], axis=-1, dtype=jnp.int32)


def _dense_map(q: jax.Array, k: jax.Array, mask, bias, scale, logits_soft_cap) -> jax.Array:
    """The whole ``[B, Hq, T, S]`` softmax map (0 where masked), one tile of all queries."""
    def whole(log_p, logits, q_idx, kv_idx):
        return jnp.exp(log_p), None

    return scan_query_tiles(q, k, whole, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=max(q.shape[1], 1))[0]


def _without_diagonal(maps: jax.Array) -> jax.Array:
    """``maps [..., T, S]`` with each query's own key (column ``t + S − T``, bottom-right alignment) set to 0."""
    T, S = maps.shape[-2:]
    own = query_positions(jnp.arange(T), T, S)[:, None] == jnp.arange(S)[None, :]
    return jnp.where(own, 0.0, maps)


def arank_of_maps(maps: jax.Array, rtol: Optional[float] = None, *, drop_diagonal: bool = True) -> jax.Array:
    """γ-MoD's ARank of dense maps ``[..., H, T, S] -> [...]`` float32: the heads' mean ``numerical_rank``.

    ``drop_diagonal`` zeroes each query's own key first (row ``t``, column ``t + S − T``), as the official
    ``compute_attention_rank`` does; ``False`` ranks the maps as given.
    """
    maps = _matrices("maps", maps)
    if maps.ndim < 3:
        raise ValueError(f"maps must be [..., H, T, S], got {describe(maps)}")
    if drop_diagonal:
        maps = _without_diagonal(maps)
    return jnp.mean(numerical_rank(maps, rtol).astype(jnp.float32), axis=-1)


def arank(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
          scale: Optional[float] = None, logits_soft_cap: Optional[float] = None, rtol: Optional[float] = None,
          drop_diagonal: bool = True) -> jax.Array:
    """γ-MoD's ARank of one layer from its q and k (dense: small ``T`` only).

    ``(1/Hq) Σ_h rank(A_h)`` with ``A_h`` the head's softmax map with its diagonal zeroed (the official code; see
    the module docstring).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; mask, bias, scale, logits_soft_cap: as ``attnjax.attention``
        (γ-MoD's LLMs: ``mask=masks.Causal()``).
      rtol: ``numerical_rank``'s tolerance (default ``max(T, S)·ε``, ``torch.linalg.matrix_rank``'s).
      drop_diagonal: zero each query's own key before the rank (official code); ``False`` keeps it.

    Returns:
      ``[B]`` float32, the mean over the ``Hq`` heads of each map's rank.
    """
    return arank_of_maps(_dense_map(q, k, mask, bias, scale, logits_soft_cap), rtol, drop_diagonal=drop_diagonal)


def kv_state(k: jax.Array, v: jax.Array, *, feature_map: Union[str, FeatureMap] = "identity",
             scale: Optional[float] = None) -> jax.Array:
    """The linear-attention KV buffer ``Σ_j φ(k_j) v_jᵀ`` over all keys, ``[B, Hkv, D', Dv]`` float32.

    Args:
      k: ``[B, S, Hkv, D]``; v: ``[B, S, Hkv, Dv]``.
      feature_map: as ``attnjax.linear.linear_attention`` (a name in ``FEATURE_MAPS`` or a callable); a
        softmax-kernel map (performer, taylor) sees ``√scale·k`` as there, ``scale`` defaulting to ``1/√D``.
    """
    for name, x in (("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float array [B, S, Hkv, D], got {describe(x)}")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k [B, S, Hkv, D] and v [B, S, Hkv, Dv] must share B, S and Hkv, got {list(k.shape)}, "
                         f"{list(v.shape)}")
    phi = get_feature_map(feature_map)
    if is_softmax_kernel(phi):
        if scale is not None:
            check_scalar("scale", scale)
        k = k * math.sqrt(k.shape[-1] ** -0.5 if scale is None else float(scale))
    return jnp.einsum("bshd,bshe->bhde", phi(k), v.astype(jnp.float32))


def kv_state_rank(k: jax.Array, v: jax.Array, *, feature_map: Union[str, FeatureMap] = "identity",
                  scale: Optional[float] = None, rtol: Optional[float] = None) -> jax.Array:
    """The rank of the KV buffer (RALA): ``numerical_rank(kv_state(k, v))``, ``[B, Hkv]`` int32, at most
    ``min(D', Dv, S)``. For a state returned by ``linear_attention(..., return_state=True)`` call
    ``numerical_rank`` on it directly."""
    return numerical_rank(kv_state(k, v, feature_map=feature_map, scale=scale), rtol)


def stable_rank_of_map(maps: jax.Array) -> jax.Array:
    """The stable rank ``‖A‖²_F / ‖A‖²₂`` of each dense map ``[..., T, S] -> [...]`` float32 (0 for a zero
    map); between 1 and the rank."""
    maps = _matrices("maps", maps)
    sv = jnp.linalg.svd(maps, compute_uv=False)
    top = sv[..., 0] ** 2
    return jnp.where(top > 0, jnp.sum(sv ** 2, axis=-1) / jnp.where(top > 0, top, 1.0), 0.0)


def stable_rank(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None, bias: Optional[Bias | jax.Array] = None,
                scale: Optional[float] = None, logits_soft_cap: Optional[float] = None) -> jax.Array:
    """HyperAttention's stable rank of the (masked) softmax map of each head, ``[B, Hq]`` float32 (dense: small
    ``T`` only). Arguments as ``attnjax.attention``."""
    return stable_rank_of_map(_dense_map(q, k, mask, bias, scale, logits_soft_cap))


def squared_column_norms(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                         bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                         logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """``‖D⁻¹A e_j‖²₂ = Σ_i p_ij²`` for every key ``j``, blockwise, ``[B, Hq, S]`` float32.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]``; mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step (memory ``O(B·Hq·block_q·S)``).
    """
    def columns(log_p, logits, q_idx, kv_idx):
        return None, jnp.sum(jnp.exp(2.0 * log_p), axis=2)

    return scan_query_tiles(q, k, columns, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                            block_q=block_q)[1]


def hyperattention_alpha(q: jax.Array, k: jax.Array, *, mask: Optional[Mask] = None,
                         bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                         logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """HyperAttention's ``α = n · max_j ‖D⁻¹A e_j‖²₂`` per head, blockwise, ``[B, Hq]`` float32, with ``n = S``
    (the paper's maps are square, ``n = T = S``). Arguments as ``squared_column_norms``."""
    norms = squared_column_norms(q, k, mask=mask, bias=bias, scale=scale, logits_soft_cap=logits_soft_cap,
                                 block_q=block_q)
    return k.shape[1] * jnp.max(norms, axis=-1, initial=0.0)


def hyperattention_alpha_of_map(probabilities: jax.Array) -> jax.Array:
    """``α = n · max_j ‖P e_j‖²₂`` of dense maps ``[..., T, S] -> [...]`` float32, ``n = S``."""
    p = _matrices("probabilities", probabilities)
    return p.shape[-1] * jnp.max(jnp.sum(p * p, axis=-2), axis=-1, initial=0.0)


def hyperattention_kappa(q: jax.Array, k: jax.Array, *, heavy: Optional[Mask] = None, mask: Optional[Mask] = None,
                         bias: Optional[Bias | jax.Array] = None, scale: Optional[float] = None,
                         logits_soft_cap: Optional[float] = None, block_q: int = 128) -> jax.Array:
    """HyperAttention's ``κ = max_{i,j} ⟨1 − M^H_i, A_i⟩ / ⟨1 − M^H_j, A_j⟩`` per head, blockwise, ``[B, Hq]`` float32.

    ``A = exp(logits)`` with the logits of ``attnjax.attention`` (``scale·q·kᵀ + bias``, soft-capped) and masked
    entries 0; ``M^H`` (``heavy``) marks the large entries that HyperAttention finds (sortLSH) and computes
    exactly, so they leave the row sums. ``κ`` is invariant to a constant added to every logit; it is computed
    as ``exp(max_i lse_i − min_i lse_i)`` from each row's log-sum-exp over its allowed, non-heavy keys, one
    query tile at a time (memory ``O(B·Hq·block_q·S)``, never a ``[T, S]`` map or a linear-space row sum).

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, S, Hkv, D]`` (GQA: ``Hq % Hkv == 0``).
      heavy: an ``attnjax.masks`` value, True on the heavy pairs ``M^H`` to remove; None removes nothing (``κ``
        is then the ratio of the largest to the smallest row sum of ``A``).
      mask, bias, scale, logits_soft_cap: as ``attnjax.attention``.
      block_q: query rows per step.

    Returns:
      ``[B, Hq]`` float32, ``>= 1`` over the rows that see at least one key; ``inf`` when such a row has
      every key heavy (a zero light row sum) or the ratio overflows float32; 1 for a head with no such row.
    """
    check_qk(q, k)
    if heavy is not None and not isinstance(heavy, Mask):
        raise TypeError(f"heavy must be an attnjax.masks value marking the heavy pairs (or None), got "
                        f"{type(heavy).__name__}")
    T, S = q.shape[1], k.shape[1]

    def rows(log_p, logits, q_idx, kv_idx):
        light = jnp.isfinite(logits)
        sees_keys = jnp.any(light, axis=-1)
        if heavy is not None:
            light = light & ~heavy.tile(q_idx, kv_idx, T, S)
        lse = jax.nn.logsumexp(jnp.where(light, logits, -jnp.inf), axis=-1)
        return (lse, sees_keys), None

    lse, sees_keys = scan_query_tiles(q, k, rows, mask=mask, bias=bias, scale=scale,
                                      logits_soft_cap=logits_soft_cap, block_q=block_q)[0]
    top = jnp.max(jnp.where(sees_keys, lse, -jnp.inf), axis=-1)
    bottom = jnp.min(jnp.where(sees_keys, lse, jnp.inf), axis=-1)
    gap = jnp.where(jnp.isfinite(top), top - bottom, jnp.inf)  # top - (-inf) = inf: a zero light row sum
    return jnp.exp(jnp.where(jnp.any(sees_keys, axis=-1), gap, 0.0))


__all__ = ["numerical_rank", "arank", "arank_of_maps", "kv_state", "kv_state_rank", "stable_rank",
           "stable_rank_of_map", "squared_column_norms", "hyperattention_alpha", "hyperattention_alpha_of_map",
           "hyperattention_kappa"]
