"""ConViT's gated positional self-attention (GPSA) on a 2-D patch grid, and its locality initialization.

d'Ascoli et al., "ConViT: Improving Vision Transformers with Soft Convolutional Inductive Biases" (ICML 2021),
sec. 3 (GPSA, eqs. 5-6) and sec. 2 (positional self-attention and its local initialization, eqs. 3-4). Official
code: facebookresearch/convit, ``convit.py`` (``GPSA.get_attention``, ``local_init``, ``get_rel_indices``); timm's
``convit.py`` is the same.

Per head ``h``, with ``σ`` the logistic function, ``λ_h`` the gating parameter and ``r_ij = (δx, δy, δx² + δy²)`` the
offset from query patch ``i`` to key patch ``j`` (``attnjax.positional.gpsa_position``)::

    A_ij^h = (1 − σ(λ_h))·softmax_j(scale·Q_i^h·K_j^hᵀ) + σ(λ_h)·softmax_j(v_pos^hᵀ r_ij)        (eq. 6)
    GPSA^h(X) = normalize[A^h]·V^h,   normalize[A]_ij = A_ij / Σ_j' A_ij'                         (eq. 5)

``scale = 1/√D`` follows the official code (``qk_scale or head_dim ** -0.5``); the paper's equations omit it.

* ``gpsa_attention_reference``: eqs. 5-6 literally, dense ``[B, H, N, N]`` maps (``N = height·width``), with the
  official code's row normalization ``attn /= attn.sum(-1)``.
* ``gpsa_attention``: the fast path. Both terms of eq. 6 are row-stochastic, so their gated mixture already sums
  to 1 and ``normalize`` is the identity; its Jacobian only removes changes of a row's sum, which no input can
  cause, so the gradients agree too. Eq. 5 therefore splits into two softmax attentions,
  ``out = (1 − σ(λ))·softmax(scale·QKᵀ)·V + σ(λ)·softmax(v_posᵀ r)·V``, each run by ``attnjax.attention``: the
  content term as plain softmax attention, the positional term as attention with zero content logits and the
  bias rule ``GPSAPositionBias`` (tiles of ``v_posᵀ r_ij`` from positions, gradient to ``v_pos`` from the engine).
  The positional weights do not depend on the batch, so that pass folds the batch into the value channels.
  Memory: the blocked ``xla`` path keeps ``O(B·H·N·tile)`` logits for the content pass and ``O(H·N·tile)`` for the
  positional pass, plus the inputs and a ``[N, H, B·Dv]`` copy of the values; never ``[N, N]``. Gradients reach
  q, k, v, ``gate`` and ``v_pos`` through the engine's custom VJP.

Layout: image-like ``[B, height, width, heads, D]``, as the rest of ``attnjax.vision`` (the grid is the map's
shape; tokens are its row-major pixels). Self-attention only, the same heads for q, k, v.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.api import attention
from attnjax.checks import check_image_qkv, check_positive, check_scalar, describe
from attnjax.positional.gpsa_position import GPSAPositionBias, grid_offsets

LOCALITY_STRENGTH = 1.0
"""``α``, the locality strength of the initialization (the paper's and the official code's default)."""


def check_gpsa(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, v_pos: jax.Array) -> None:
    """``ValueError``/``TypeError`` naming the argument unless q, k are ``[B, height, width, heads, D]``, v
    ``[B, height, width, heads, Dv]``, ``gate`` float ``[heads]`` and ``v_pos`` float ``[heads, 3]``."""
    heads = check_image_qkv(q, k, v)[3]
    for name, value, shape in (("gate", gate, (heads,)), ("v_pos", v_pos, (heads, 3))):
        if jnp.shape(value) != shape:
            raise ValueError(f"{name} must have shape {list(shape)} for {heads} heads, got {describe(value)}")
        if not jnp.issubdtype(jnp.result_type(value), jnp.floating):
            raise TypeError(f"{name} must be a floating-point array, got {describe(value)}")


def resolve_scale(scale: Optional[float], head_dim: int) -> float:
    """The content logit scale: ``scale``, or ``1/√D`` when None (the official ``head_dim ** -0.5``)."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    check_scalar("scale", scale)
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    return float(scale)


def gpsa_attention_reference(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, v_pos: jax.Array, *,
                             scale: Optional[float] = None) -> jax.Array:
    """GPSA (ConViT, eqs. 5-6) with dense ``[B, heads, N, N]`` attention maps, ``N = height·width`` (for tests).

    ``A = (1 − σ(λ_h))·softmax_j(scale·q_i·k_j) + σ(λ_h)·softmax_j(v_pos^hᵀ r_ij)``, normalized by its row sums
    as the official code does, then ``out_i = Σ_j A_ij v_j``. Float32 throughout.

    Args:
      q, k: ``[B, height, width, heads, D]``; v: ``[B, height, width, heads, Dv]``.
      gate: ``[heads]``, the gating parameters ``λ_h`` (before the sigmoid; 1 at initialization).
      v_pos: ``[heads, 3]``, per head the weights of ``r_ij = (δx, δy, δx² + δy²)``.
      scale: content logit scale, default ``1/√D`` (the official code).

    Returns:
      ``[B, height, width, heads, Dv]`` in q's dtype.
    """
    check_gpsa(q, k, v, gate, v_pos)
    B, height, width, heads, D = q.shape
    scale = resolve_scale(scale, D)
    N = height * width
    qf, kf, vf = (a.astype(jnp.float32).reshape(B, N, heads, a.shape[-1]) for a in (q, k, v))
    hp = jax.lax.Precision.HIGHEST
    content = jax.nn.softmax(scale * jnp.einsum("bihd,bjhd->bhij", qf, kf, precision=hp), axis=-1)
    r = grid_offsets(jnp.arange(N), jnp.arange(N), width)
    positional = jax.nn.softmax(jnp.einsum("ijc,hc->hij", r, jnp.asarray(v_pos, jnp.float32), precision=hp), axis=-1)
    g = jax.nn.sigmoid(jnp.asarray(gate, jnp.float32))[:, None, None]
    attn = (1.0 - g) * content + g * positional
    attn = attn / jnp.sum(attn, axis=-1, keepdims=True)
    out = jnp.einsum("bhij,bjhd->bihd", attn, vf, precision=hp)
    return out.reshape(B, height, width, heads, v.shape[-1]).astype(q.dtype)


def gpsa_attention(q: jax.Array, k: jax.Array, v: jax.Array, gate: jax.Array, v_pos: jax.Array, *,
                   scale: Optional[float] = None, implementation: str = "auto") -> jax.Array:
    """GPSA (ConViT, eqs. 5-6) as two softmax attentions mixed by the gate; no ``[N, N]`` array.

    ``out = (1 − σ(λ_h))·softmax(scale·QKᵀ)·V + σ(λ_h)·softmax(v_posᵀ r)·V`` per head, which equals eq. 5's
    normalized mixture exactly (module docstring). Both passes go through ``attnjax.attention`` with
    ``implementation``: the positional pass has zero content logits (``[1, N, heads, 1]`` zero queries and keys)
    and the bias rule ``GPSAPositionBias(v_pos, width)``, the batch folded into its value channels. The blocked
    ``xla`` path holds ``O(B·heads·N·tile)`` (content) and ``O(heads·N·tile)`` (positional) logits at a time; a path
    that serves no rule bias (the current Pallas kernels) refuses the positional pass and "auto" falls back.

    Args:
      q, k, v, gate, v_pos, scale: as ``gpsa_attention_reference``.
      implementation: as ``attnjax.attention`` ("auto", "xla", "reference", "pallas").

    Returns:
      ``[B, height, width, heads, Dv]`` in q's dtype. Gradients reach q, k, v, ``gate`` and ``v_pos``.
    """
    check_gpsa(q, k, v, gate, v_pos)
    B, height, width, heads, D = q.shape
    Dv = v.shape[-1]
    N = height * width
    scale = resolve_scale(scale, D)
    content = attention(q.reshape(B, N, heads, D), k.reshape(B, N, heads, D), v.reshape(B, N, heads, Dv),
                        scale=scale, implementation=implementation)
    folded = v.reshape(B, N, heads, Dv).transpose(1, 2, 0, 3).reshape(1, N, heads, B * Dv)
    zeros = jnp.zeros((1, N, heads, 1), q.dtype)
    positional = attention(zeros, zeros, folded, bias=GPSAPositionBias(v_pos, width=width), scale=1.0,
                           implementation=implementation)
    positional = positional.reshape(N, heads, B, Dv).transpose(2, 0, 1, 3)
    g = jax.nn.sigmoid(jnp.asarray(gate, jnp.float32))[:, None]
    out = (1.0 - g) * content.astype(jnp.float32) + g * positional.astype(jnp.float32)
    return out.reshape(B, height, width, heads, Dv).astype(q.dtype)


def locality_offsets(num_heads: int) -> np.ndarray:
    """The attention centres ``Δ^h = (Δx, Δy)`` of the locality initialization, float32 ``[K², 2]``, ``K = ⌊√heads⌋``.

    ConViT sec. 2 (eq. 4) places the ``K × K`` heads' centres on a grid around the query; the official
    ``local_init`` gives head ``h = h1 + K·h2`` the centre ``(Δx, Δy) = (h2 − c, h1 − c)``, ``c = (K − 1)/2`` (a
    half-integer for even ``K``). Heads ``h ≥ K²`` get no centre (they keep a random initialization).
    """
    check_positive(num_heads=num_heads)
    kernel = math.isqrt(num_heads)
    center = (kernel - 1) / 2
    h = np.arange(kernel * kernel)
    return np.stack([h // kernel - center, h % kernel - center], axis=-1).astype(np.float32)


def locality_v_pos(num_heads: int, locality_strength: float = LOCALITY_STRENGTH) -> np.ndarray:
    """ConViT's local ``v_pos`` (eq. 4) for the first ``K²`` heads, float32 ``[K², 3]`` on ``(δx, δy, δx² + δy²)``.

    ``v_pos^h = α·(2Δx^h, 2Δy^h, −1)`` (the paper's ``−α(1, −2Δ1, −2Δ2)`` on ``(‖δ‖², δ1, δ2)``), so the positional
    logit is ``−α·(‖δ − Δ^h‖² − ‖Δ^h‖²)``: a softmax peaked at the offset ``δ = Δ^h``, sharper for larger ``α``.
    """
    offsets = locality_offsets(num_heads)
    quadratic = -np.ones((offsets.shape[0], 1), np.float32)
    return (locality_strength * np.concatenate([2.0 * offsets, quadratic], axis=-1)).astype(np.float32)


__all__ = ["LOCALITY_STRENGTH", "check_gpsa", "resolve_scale", "gpsa_attention_reference", "gpsa_attention", "locality_offsets",
           "locality_v_pos"]
