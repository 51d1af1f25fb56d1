"""DCAL: global-local cross-attention (GLCA) and pair-wise cross-attention (PWCA).

Zhu et al., "Dual Cross-Attention Learning for Fine-Grained Visual Categorization and Object Re-Identification",
CVPR 2022, sec. 3. Token sets ``[B, T, heads, D]`` with the class token first (``T = 1 + N`` patches).

* GLCA (sec. 3.2): the attention rollout of the previous self-attention layers, ``Ŝ_i = S̄_i ⊗ ··· ⊗ S̄_1`` with
  ``S̄ = 0.5·S + 0.5·E`` (``attnjax.vision.rollout.attention_rollout``), ranks the tokens by the class token's
  row; the ``R`` highest-ranked queries ``Q^l`` attend to all keys and values:
  ``f_GLCA(Q^l, K^g, V^g) = softmax(Q^l K^gᵀ / √d) V^g``. ``R`` is a ratio of the tokens (10 % for fine-grained
  categorization, 30 % for re-identification, sec. 4.1).
* PWCA (sec. 3.3): the queries of image 1 attend to the keys and values of both images of a pair,
  ``f_PWCA(Q_1, K_c, V_c) = softmax(Q_1 K_cᵀ / √d) V_c`` with ``K_c = [K_1; K_2]``, ``V_c = [V_1; V_2]``: one softmax
  over ``2T`` keys (``T + T₂`` for images of different lengths), the second image a distractor. Training only;
  at inference it is the plain self-attention.

The selection is not differentiable: no gradient reaches the rollout maps; the queries that are not selected get
a zero gradient, and the keys and values get the gradient of the selected rows.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.api import attention
from attnjax.checks import describe
from attnjax.softmax.softmax import softmax_attention_reference
from attnjax.vision.rollout import attention_rollout

GLCA_RATIO = 0.1
"""The fraction of tokens GLCA selects as local queries for fine-grained categorization (sec. 4.1; 0.3 for Re-ID)."""


def local_query_count(num_patches: int, ratio: float = GLCA_RATIO) -> int:
    """``R = max(1, ⌊ratio·N⌋)``: how many patch tokens GLCA selects (the paper gives ``R`` as a percentage only;
    78 of DCAL's 784 patches at 10 %)."""
    if not isinstance(num_patches, (int, np.integer)) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive int, got {describe(num_patches)}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise ValueError(f"ratio must be a number in (0, 1], got {describe(ratio)}")
    return max(1, math.floor(ratio * num_patches + 1e-9))


def cls_rollout_scores(maps: Union[Sequence[jax.Array], jax.Array]) -> jax.Array:
    """The class token's accumulated attention to every patch: row 0 of the rollout ``Ŝ``, columns ``1..N`` (sec. 3.2).

    Args:
      maps: the previous self-attention layers' softmax maps, first layer first: ``[B, H, 1 + N, 1 + N]`` each (a
        list) or ``[L, B, H, 1 + N, 1 + N]``. Heads are averaged, as in Abnar & Zuidema's rollout
        (``attention_rollout``); the paper writes ``S`` for one map and does not say how heads are combined.

    Returns:
      ``[B, N]`` float32.
    """
    tokens = jnp.shape(maps[0] if isinstance(maps, (list, tuple)) and maps else maps)[-1:]
    if tokens and tokens[0] < 2:
        raise ValueError(f"maps must cover a class token and at least one patch, got {tokens[0]} tokens")
    return attention_rollout(maps)[:, 0, 1:]


def select_top_r(scores: jax.Array, r: int) -> jax.Array:
    """The ``r`` highest scores per row, highest first; ties go to the lower index (``jax.lax.top_k``).

    Not differentiable: the scores pass ``stop_gradient``.

    Args:
      scores: ``[B, N]``.
      r: ``1 <= r <= N``.

    Returns:
      int32 ``[B, r]`` indices into ``0..N−1``.
    """
    if getattr(scores, "ndim", None) != 2:
        raise ValueError(f"scores must have shape [batch, tokens], got {describe(scores)}")
    if not isinstance(r, (int, np.integer)) or isinstance(r, bool) or not 1 <= r <= scores.shape[1]:
        raise ValueError(f"r must be an int in [1, {scores.shape[1]}], got {describe(r)}")
    return jax.lax.top_k(jax.lax.stop_gradient(scores), int(r))[1].astype(jnp.int32)


def local_query_positions(maps: Union[Sequence[jax.Array], jax.Array], ratio: float = GLCA_RATIO, *,
                          keep_cls: bool = True) -> jax.Array:
    """GLCA's query positions in the ``1 + N`` tokens: the class token (with ``keep_cls``) then the top-``R`` patches
    by ``cls_rollout_scores``, highest first.

    The class token's own rollout entry is not ranked: it is kept as the first query instead, so the GLCA branch has a
    class token for its classifier (the paper adds the SA and GLCA classifiers' probabilities, sec. 4.1). The paper
    does not say how the class token is treated; this follows its use of a GLCA class token.

    Returns:
      int32 ``[B, 1 + R]`` (``[B, R]`` without ``keep_cls``), ``R = local_query_count(N, ratio)``.
    """
    scores = cls_rollout_scores(maps)
    top = select_top_r(scores, local_query_count(scores.shape[1], ratio)) + 1
    if not keep_cls:
        return top
    return jnp.concatenate([jnp.zeros((top.shape[0], 1), jnp.int32), top], axis=1)


def check_positions(q: jax.Array, positions: jax.Array) -> None:
    """``ValueError`` unless ``positions`` is an integer ``[B, R]`` for q ``[B, T, ...]``."""
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"q must have shape [batch, tokens, heads, head_dim], got {describe(q)}")
    if (getattr(positions, "ndim", None) != 2 or positions.shape[0] != q.shape[0]
            or not jnp.issubdtype(positions.dtype, jnp.integer)):
        raise ValueError(f"positions must be integer indices [batch, R] = [{q.shape[0]}, R] into the {q.shape[1]} "
                         f"tokens, got {describe(positions)}")


def gather_tokens(x: jax.Array, positions: jax.Array) -> jax.Array:
    """``x[b, positions[b]]``: ``[B, T, ...]`` and ``[B, R]`` -> ``[B, R, ...]``."""
    index = positions.reshape(positions.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def global_local_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
                                 scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """GLCA (sec. 3.2, ``f_GLCA``): the selected queries ``Q^l = Q[positions]`` attend to all keys and values.

    ``out[b, r] = Σ_s softmax_s(scale·q[b, p_br]·k[b, s]) v[b, s]``, ``p = positions`` (e.g. from
    ``local_query_positions``). Fast path: gather the ``R`` queries, then ``attnjax.attention``; memory
    ``O(heads·R·T)`` at most (``R ≈ 0.1·T``), not the ``[T, T]`` of self-attention.

    Args:
      q: ``[B, T, Hq, D]``; k: ``[B, T, Hkv, D]``; v: ``[B, T, Hkv, Dv]`` of the same tokens.
      positions: int ``[B, R]`` indices into ``0..T−1``.
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, R, Hq, Dv]`` in q's dtype; row ``r`` is the output for token ``positions[b, r]``.
    """
    check_positions(q, positions)
    return attention(gather_tokens(q, positions), k, v, scale=scale, implementation=implementation)


def global_local_cross_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, *,
                                           scale: Optional[float] = None) -> jax.Array:
    """GLCA as the rows ``positions`` of the dense self-attention of all ``T`` queries (``softmax_attention_reference``)."""
    check_positions(q, positions)
    return gather_tokens(softmax_attention_reference(q, k, v, scale=scale), positions)


def pair_keys_values(k: jax.Array, v: jax.Array, k2: Optional[jax.Array], v2: Optional[jax.Array]
                     ) -> tuple[jax.Array, jax.Array]:
    """``(K_c, V_c) = ([K_1; K_2], [V_1; V_2])`` along the tokens, or ``(k, v)`` without a second image."""
    if (k2 is None) != (v2 is None):
        raise ValueError("k2 and v2 must be given together (the second image's keys and values) or both be None")
    if k2 is None:
        return k, v
    for name, a, b in (("k2", k2, k), ("v2", v2, v)):
        if getattr(a, "ndim", None) != 4 or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
            expected = [b.shape[0], "S2", *b.shape[2:]]
            raise ValueError(f"{name} must have shape [batch, tokens, heads, head_dim] = {expected} like image 1's, "
                             f"got {describe(a)}")
    if k2.shape[1] != v2.shape[1]:
        raise ValueError(f"k2 and v2 must have the same tokens: k2 {list(k2.shape)}, v2 {list(v2.shape)}")
    return jnp.concatenate([k, k2.astype(k.dtype)], axis=1), jnp.concatenate([v, v2.astype(v.dtype)], axis=1)


def pairwise_cross_attention(q: jax.Array, k: jax.Array, v: jax.Array, k2: Optional[jax.Array] = None,
                             v2: Optional[jax.Array] = None, *, scale: Optional[float] = None,
                             implementation: str = "auto") -> jax.Array:
    """PWCA (sec. 3.3, ``f_PWCA``): image 1's queries over both images' keys and values, one softmax.

    ``out = softmax(scale·Q_1 [K_1; K_2]ᵀ) [V_1; V_2]``; without ``k2``/``v2`` it is the self-attention
    ``softmax(scale·Q_1 K_1ᵀ) V_1`` (inference). Through ``attnjax.attention``; memory as self-attention over
    ``T`` queries and ``T + T₂`` keys.

    Args:
      q, k: ``[B, T, Hq | Hkv, D]``, v: ``[B, T, Hkv, Dv]`` of image 1.
      k2: ``[B, T₂, Hkv, D]``, v2: ``[B, T₂, Hkv, Dv]`` of image 2 (the distractor), or None.
      scale: logit scale, default ``1/√D``.
      implementation: as ``attnjax.attention``.

    Returns:
      ``[B, T, Hq, Dv]`` in q's dtype.
    """
    kc, vc = pair_keys_values(k, v, k2, v2)
    return attention(q, kc, vc, scale=scale, implementation=implementation)


def pairwise_cross_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, k2: Optional[jax.Array] = None,
                                       v2: Optional[jax.Array] = None, *,
                                       scale: Optional[float] = None) -> jax.Array:
    """PWCA written plainly: the dense float32 softmax (``softmax_attention_reference``) over ``[K_1; K_2]``."""
    kc, vc = pair_keys_values(k, v, k2, v2)
    return softmax_attention_reference(q, kc, vc, scale=scale)


__all__ = ["GLCA_RATIO", "local_query_count", "cls_rollout_scores", "select_top_r", "local_query_positions",
           "gather_tokens", "global_local_cross_attention", "global_local_cross_attention_reference",
           "pair_keys_values", "pairwise_cross_attention", "pairwise_cross_attention_reference"]
