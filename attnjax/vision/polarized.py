"""Polarized Self-Attention (PSA): a channel-only and a spatial-only gate, each computed at full resolution
along its own axis by collapsing the other one completely (Liu et al., "Polarized Self-Attention: Towards
High-quality Pixel-wise Regression", arXiv:2107.00782, 2021, sec. 3).

* Channel-only branch: ``A^ch(X) = F_SG[LN(W_z((W_v X) · F_SM(W_q X)))]``: ``W_q`` (1×1 conv, C -> 1) gives
  one logit per pixel, softmax over the ``H·W`` pixels; ``W_v`` (C -> C/2) values pooled with those weights;
  ``W_z`` (C/2 -> C), LayerNorm over the ``C`` channels, sigmoid. ``Z^ch = A^ch(X) ⊙^ch X``.
* Spatial-only branch: ``A^sp(X) = F_SG[F_SM(F_GP(W_q X)) · W_v X]``: ``W_q`` (C -> C/2) globally average
  pooled, softmax over the ``C/2`` channels; the dot product with ``W_v X`` (C -> C/2) at every pixel, sigmoid.
  ``Z^sp = A^sp(X) ⊙^sp X``.
* Composition: parallel ``PSA_p(X) = Z^ch + Z^sp = A^ch(X) ⊙^ch X + A^sp(X) ⊙^sp X``, sequential
  ``PSA_s(X) = Z^sp(Z^ch) = A^sp(A^ch(X) ⊙^ch X) ⊙^sp (A^ch(X) ⊙^ch X)``.

These are the paper's equations (which the External-Attention-pytorch code follows). The authors' code
(DeLightCMU/PSA, ``semantic-segmentation/network/PSA.py``) differs: its parallel block has no LayerNorm, its
sequential block's ``W_z`` is a bottleneck (1×1, LayerNorm, ReLU, 1×1), and its spatial softmax runs over the
pixels instead of the channels. Here the equations are followed.

Shapes: ``x [B, H, W, C]`` (NHWC); cost ``O(B·H·W·C²)`` for the 1×1 convolutions, ``O(B·H·W·C)`` otherwise.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

LAYOUTS = ("parallel", "sequential")
"""How PSA composes its two branches (Liu et al. 2021, sec. 3, "composition")."""

Gate = Callable[[jax.Array], jax.Array]
"""``x [B, H, W, C] -> gate`` broadcastable against ``x``: ``polarized_channel_gate`` or
``polarized_spatial_gate`` with their parameters bound."""


def affine(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """A 1×1 convolution on the last axis: ``x @ w (+ b)``. ``x [..., C_in]``, ``w [C_in, C_out]``, ``b [C_out]``."""
    y = x @ w
    return y if b is None else y + b


def polarized_channel_gate(x: jax.Array, wq: jax.Array, wv: jax.Array, bv: jax.Array | None, wz: jax.Array,
                           bz: jax.Array | None, norm_scale: jax.Array, norm_bias: jax.Array,
                           epsilon: float = 1e-5) -> jax.Array:
    """The channel-only gate ``A^ch(X) = σ(LN(W_z Σ_j softmax_j(W_q x_j) · W_v x_j))`` (Liu et al. 2021, sec. 3,
    channel-only branch): the softmax runs over the ``H·W`` pixels ``j``, LayerNorm over the ``C`` channels.

    Args:
      x: ``[B, H, W, C]``.
      wq: ``[C]``, ``W_q`` (C -> 1). It has no bias: a constant logit shift leaves the softmax unchanged.
      wv, bv: ``[C, C/2]``, ``[C/2]`` or ``None`` (``W_v``).
      wz, bz: ``[C/2, C]``, ``[C]`` or ``None`` (``W_z``).
      norm_scale, norm_bias: ``[C]``, the LayerNorm's affine parameters.
      epsilon: the LayerNorm's variance epsilon (1e-5, PyTorch's default used by the reference code).

    Returns:
      ``[B, 1, 1, C]`` in ``(0, 1)``. The softmax and the LayerNorm run in float32.
    """
    B, H, W, C = x.shape
    logits = jnp.einsum("bhwc,c->bhw", x, wq).reshape(B, H * W)
    weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(x.dtype)
    values = affine(x, wv, bv).reshape(B, H * W, -1)
    z = affine(jnp.einsum("bn,bnd->bd", weights, values), wz, bz).astype(jnp.float32)
    mean = jnp.mean(z, axis=-1, keepdims=True)
    z = (z - mean) * jax.lax.rsqrt(jnp.var(z, axis=-1, keepdims=True) + epsilon)
    gate = jax.nn.sigmoid(z * norm_scale.astype(jnp.float32) + norm_bias.astype(jnp.float32))
    return gate.astype(x.dtype)[:, None, None, :]


def polarized_spatial_gate(x: jax.Array, wq: jax.Array, bq: jax.Array | None, wv: jax.Array,
                           bv: jax.Array | None) -> jax.Array:
    """The spatial-only gate ``A^sp(X) = σ(softmax(F_GP(W_q X)) · W_v x_j)`` at every pixel ``j`` (Liu et al.
    2021, sec. 3, spatial-only branch): ``F_GP`` is the global average over ``H·W``, the softmax runs over the
    ``C/2`` channels.

    Args:
      x: ``[B, H, W, C]``.
      wq, bq: ``[C, C/2]``, ``[C/2]`` or ``None`` (``W_q``).
      wv, bv: ``[C, C/2]``, ``[C/2]`` or ``None`` (``W_v``).

    Returns:
      ``[B, H, W, 1]`` in ``(0, 1)``. The pooling and the softmax run in float32.
    """
    pooled = jnp.mean(affine(x, wq, bq), axis=(1, 2), dtype=jnp.float32)
    weights = jax.nn.softmax(pooled, axis=-1).astype(x.dtype)
    return jax.nn.sigmoid(jnp.einsum("bhwd,bd->bhw", affine(x, wv, bv), weights))[..., None]


def polarized_self_attention(x: jax.Array, channel_gate: Gate, spatial_gate: Gate,
                             layout: str = "parallel") -> jax.Array:
    """PSA's two layouts (Liu et al. 2021, sec. 3, composition). ``x [B, H, W, C] -> [B, H, W, C]``.

    * "parallel": ``PSA_p(X) = A^ch(X) ⊙^ch X + A^sp(X) ⊙^sp X``;
    * "sequential": ``Z^ch = A^ch(X) ⊙^ch X``, ``PSA_s(X) = A^sp(Z^ch) ⊙^sp Z^ch``.

    Args:
      x: ``[B, H, W, C]``.
      channel_gate: ``x -> [B, 1, 1, C]``, e.g. ``polarized_channel_gate`` with its parameters bound.
      spatial_gate: ``x -> [B, H, W, 1]``, e.g. ``polarized_spatial_gate`` with its parameters bound.
      layout: "parallel" or "sequential".
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if layout == "parallel":
        return x * channel_gate(x) + x * spatial_gate(x)
    z = x * channel_gate(x)
    return z * spatial_gate(z)


__all__ = ["LAYOUTS", "Gate", "polarized_channel_gate", "polarized_spatial_gate",
           "polarized_self_attention"]
