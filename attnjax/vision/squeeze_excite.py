"""Squeeze-and-Excitation and its spatial variants: gates that rescale channels or pixels of a feature map.

* SE / cSE (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018, eqs. 2-4):
  ``z = mean_{h,w} x`` (squeeze), ``s = σ(W₂ δ(W₁ z + b₁) + b₂)`` (excitation), ``y = s ⊙ x`` per channel.
* sSE (Roy et al., "Concurrent Spatial and Channel 'Squeeze & Excitation' in Fully Convolutional Networks",
  MICCAI 2018, sec. 2.2): ``q = σ(x · w + b)`` a 1×1 convolution to one channel, ``y = q ⊙ x`` per pixel.
* scSE (Roy et al., sec. 2.3): ``y = cSE(x) + sSE(x)``; the journal version (Roy et al., "Recalibrating
  Fully Convolutional Networks with Spatial and Channel 'Squeeze and Excitation' Blocks", IEEE TMI 2019,
  sec. III-D) also compares ``max``, which it found best.

Shapes: ``x [B, H, W, C]`` (NHWC); cost ``O(B·H·W·C)`` plus ``O(C²/r)`` for the excitation.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

COMBINE = ("add", "max")
"""How scSE merges its channel and spatial branches (Roy et al. 2019, sec. III-D)."""


def channel_gate(x: jax.Array, w1: jax.Array, b1: jax.Array | None, w2: jax.Array,
                 b2: jax.Array | None, activation: Callable[[jax.Array], jax.Array] = jax.nn.relu) -> jax.Array:
    """SE's excitation ``s = σ(W₂ δ(W₁ mean_{h,w}(x) + b₁) + b₂)`` (Hu et al. 2018, eqs. 2-3).

    Args:
      x: ``[B, H, W, C]``.
      w1, b1: ``[C, C/r]``, ``[C/r]`` or ``None`` (the reduction).
      w2, b2: ``[C/r, C]``, ``[C]`` or ``None`` (the expansion).
      activation: ``δ``, ReLU in the paper (EfficientNet's and MaxViT's MBConv use SiLU).

    Returns:
      ``s [B, 1, 1, C]`` in ``(0, 1)``, the per-channel gate (squeezed in float32).
    """
    z = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(x.dtype)
    h = z @ w1 if b1 is None else z @ w1 + b1
    s = activation(h) @ w2
    return jax.nn.sigmoid(s if b2 is None else s + b2)


def squeeze_excite(x: jax.Array, w1: jax.Array, b1: jax.Array | None, w2: jax.Array,
                   b2: jax.Array | None, activation: Callable[[jax.Array], jax.Array] = jax.nn.relu) -> jax.Array:
    """SE / cSE: ``y = channel_gate(x) ⊙ x`` (Hu et al. 2018, eq. 4). ``x [B, H, W, C] -> [B, H, W, C]``."""
    return x * channel_gate(x, w1, b1, w2, b2, activation)


def spatial_gate(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """sSE's gate ``q = σ(x · w + b)``, a 1×1 convolution to one channel (Roy et al. 2018, sec. 2.2).

    Args:
      x: ``[B, H, W, C]``; w: ``[C]``; b: ``[]`` or ``None``.

    Returns:
      ``q [B, H, W, 1]`` in ``(0, 1)``, the per-pixel gate.
    """
    q = jnp.einsum("bhwc,c->bhw", x, w)[..., None]
    return jax.nn.sigmoid(q if b is None else q + b)


def spatial_squeeze_excite(x: jax.Array, w: jax.Array, b: jax.Array | None) -> jax.Array:
    """sSE: ``y = spatial_gate(x) ⊙ x``. ``x [B, H, W, C] -> [B, H, W, C]``."""
    return x * spatial_gate(x, w, b)


def concurrent_squeeze_excite(x: jax.Array, channel: jax.Array, spatial: jax.Array, combine: str = "add") -> jax.Array:
    """scSE: ``cSE(x) + sSE(x)`` (Roy et al. 2018, sec. 2.3) or their elementwise ``max`` (Roy et al. 2019).

    Args:
      x: ``[B, H, W, C]``.
      channel: the channel gate ``[B, 1, 1, C]`` (``channel_gate``).
      spatial: the spatial gate ``[B, H, W, 1]`` (``spatial_gate``).
      combine: "add" or "max".
    """
    if combine not in COMBINE:
        raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
    merge = jnp.add if combine == "add" else jnp.maximum
    return merge(x * channel, x * spatial)


__all__ = ["COMBINE", "channel_gate", "squeeze_excite", "spatial_gate", "spatial_squeeze_excite",
           "concurrent_squeeze_excite"]
