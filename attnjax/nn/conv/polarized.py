"""Polarized Self-Attention (Liu et al., arXiv:2107.00782, 2021) as a Flax NNX module on NHWC feature maps
(functional core: ``attnjax.vision.polarized``)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.polarized import LAYOUTS, polarized_channel_gate, polarized_self_attention, polarized_spatial_gate


class PolarizedSelfAttention(nnx.Module):
    """Polarized Self-Attention, parallel ``A^ch(X) ⊙^ch X + A^sp(X) ⊙^sp X`` or sequential
    ``A^sp(Z) ⊙^sp Z`` with ``Z = A^ch(X) ⊙^ch X`` (Liu et al. 2021, sec. 3: the channel-only and spatial-only
    branches and their composition; see ``attnjax.vision.polarized`` for the branch equations).

    Example::

      psa = PolarizedSelfAttention(64, layout="sequential", rngs=nnx.Rngs(0))
      y = psa(x)                                     # x, y: [B, H, W, 64]

    Parameters: ``2·C² + 3·C`` for even ``C`` without biases (channel branch: ``W_q`` C, ``W_v`` C·C/2,
    ``W_z`` C/2·C, LayerNorm 2C; spatial branch: ``W_q`` and ``W_v`` C·C/2 each); ``use_bias`` adds
    ``C/2 + C`` (channel) and ``2·C/2`` (spatial).

    Args:
      channels: ``C``, the channels of ``x``; the branches' internal width is ``C // 2`` (the paper's ``C/2``).
      layout: "parallel" (``PSA_p``) or "sequential" (``PSA_s``); the paper finds them within noise of each other.
      use_bias: biases in the 1×1 convolutions (not in the channel branch's ``W_q``, where a bias cannot change
        the softmax). The paper's equations and the authors' code have none.
      epsilon: the LayerNorm's epsilon (1e-5, PyTorch's default, as in the reference code).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the 1×1 convolutions (flax's ``nnx.Conv`` defaults) and the LayerNorm (1, 0).
    """

    def __init__(self, channels: int, *, layout: str = "parallel", use_bias: bool = False, epsilon: float = 1e-5,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        if channels < 2:
            raise ValueError(f"channels must be at least 2 (the branches use channels // 2), got {channels}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        inner = channels // 2
        self.channels, self.layout, self.epsilon = channels, layout, epsilon

        def conv(features_in: int, features_out: int, bias: bool) -> nnx.Conv:
            return nnx.Conv(features_in, features_out, (1, 1), use_bias=bias, dtype=dtype, param_dtype=param_dtype,
                            rngs=rngs)

        self.channel_query = conv(channels, 1, False)
        self.channel_value = conv(channels, inner, use_bias)
        self.channel_out = conv(inner, channels, use_bias)
        self.channel_norm = nnx.LayerNorm(channels, epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spatial_query = conv(channels, inner, use_bias)
        self.spatial_value = conv(channels, inner, use_bias)

    def channel_gate(self, x: jax.Array) -> jax.Array:
        """The channel-only gate ``A^ch(x)``: ``[B, H, W, C] -> [B, 1, 1, C]`` in ``(0, 1)``."""
        check_image("x", x, self.channels)
        wq, _ = pointwise_weights(self.channel_query, x.dtype)
        return polarized_channel_gate(x, wq[:, 0], *pointwise_weights(self.channel_value, x.dtype),
                                      *pointwise_weights(self.channel_out, x.dtype), self.channel_norm.scale[...],
                                      self.channel_norm.bias[...], self.epsilon)

    def spatial_gate(self, x: jax.Array) -> jax.Array:
        """The spatial-only gate ``A^sp(x)``: ``[B, H, W, C] -> [B, H, W, 1]`` in ``(0, 1)``."""
        check_image("x", x, self.channels)
        return polarized_spatial_gate(x, *pointwise_weights(self.spatial_query, x.dtype),
                                      *pointwise_weights(self.spatial_value, x.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return polarized_self_attention(x, self.channel_gate, self.spatial_gate, self.layout)


def pointwise_weights(layer: nnx.Conv, dtype) -> tuple[jax.Array, Optional[jax.Array]]:
    """``(w [C_in, C_out], b [C_out] or None)`` of a 1×1 ``nnx.Conv``, cast to ``dtype``."""
    bias = None if layer.bias is None else layer.bias[...].astype(dtype)
    return layer.kernel[...][0, 0].astype(dtype), bias


PAPER = "Liu et al. 2021, Polarized Self-Attention: Towards High-quality Pixel-wise Regression (arXiv:2107.00782)"
register_module(ModuleSpec("psa_parallel", PolarizedSelfAttention, dict(channels=16), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("psa_sequential", PolarizedSelfAttention, dict(channels=16, layout="sequential"),
                           (2, 5, 6, 16), kind="image", paper=PAPER))
