"""SE, cSE, sSE and scSE gates as Flax NNX modules on NHWC feature maps (functional core:
``attnjax.vision.squeeze_excite``).

``SqueezeExcite`` is SE (Hu et al., CVPR 2018) and, with ``reduction=2``, Roy et al.'s cSE (the same
formula); ``SpatialSqueezeExcite`` is sSE and ``ConcurrentSqueezeExcite`` is scSE (Roy et al., MICCAI 2018).
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.squeeze_excite import (COMBINE, channel_gate, concurrent_squeeze_excite, spatial_gate,
                                           spatial_squeeze_excite, squeeze_excite)


def reduced(channels: int, reduction: int) -> int:
    """SE's bottleneck width ``C / r``, at least 1 (Hu et al. 2018, sec. 3.2)."""
    check_positive(channels=channels, reduction=reduction)
    return max(1, channels // reduction)


class SqueezeExcite(nnx.Module):
    """Squeeze-and-Excitation: ``y = σ(W₂ δ(W₁ mean_{h,w}(x) + b₁) + b₂) ⊙ x`` (Hu et al. 2018, eqs. 2-4).

    Example::

      se = SqueezeExcite(64, rngs=nnx.Rngs(0))
      y = se(x)                                      # x, y: [B, H, W, 64]

    Parameters: ``2·C·(C/r)`` weights, plus ``C/r + C`` biases with ``use_bias``.

    Args:
      channels: ``C``, the channels of ``x``.
      reduction: ``r``; the bottleneck has ``max(1, C // r)`` units (16 in the paper; Roy et al.'s cSE uses 2).
      use_bias: biases in both fully connected layers (the paper's equations omit them, its code has them).
      activation: ``δ`` (ReLU in the paper; MaxViT's MBConv uses SiLU).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the two layers (flax's ``nnx.Linear`` defaults).
    """

    def __init__(self, channels: int, *, reduction: int = 16, use_bias: bool = True,
                 activation: Callable[[jax.Array], jax.Array] = jax.nn.relu, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        hidden = reduced(channels, reduction)
        self.channels, self.activation = channels, activation
        self.reduce = nnx.Linear(channels, hidden, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.expand = nnx.Linear(hidden, channels, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def gate(self, x: jax.Array) -> jax.Array:
        """The channel gate ``[B, 1, 1, C]``."""
        check_image("x", x, self.channels)
        return channel_gate(x, *linear_weights(self.reduce, x.dtype), *linear_weights(self.expand, x.dtype),
                            self.activation)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return squeeze_excite(x, *linear_weights(self.reduce, x.dtype), *linear_weights(self.expand, x.dtype),
                              self.activation)


class SpatialSqueezeExcite(nnx.Module):
    """sSE: ``y = σ(x · w + b) ⊙ x``, a per-pixel gate from a 1×1 convolution to one channel (Roy et al. 2018,
    sec. 2.2). ``C + 1`` parameters (``C`` without ``use_bias``).

    Args:
      channels: ``C``; use_bias: the convolution's bias; dtype, param_dtype: as ``SqueezeExcite``.
      rngs: ``params`` initializes the 1×1 convolution (flax's ``nnx.Conv`` defaults).
    """

    def __init__(self, channels: int, *, use_bias: bool = True, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        self.channels = channels
        self.squeeze = nnx.Conv(channels, 1, (1, 1), use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                                rngs=rngs)

    def gate(self, x: jax.Array) -> jax.Array:
        """The spatial gate ``[B, H, W, 1]``."""
        check_image("x", x, self.channels)
        return spatial_gate(x, *conv1x1_weights(self.squeeze, x.dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return spatial_squeeze_excite(x, *conv1x1_weights(self.squeeze, x.dtype))


class ConcurrentSqueezeExcite(nnx.Module):
    """scSE: ``y = cSE(x) + sSE(x)`` (Roy et al. 2018, sec. 2.3), or their ``max`` (Roy et al., IEEE TMI 2019).

    Args:
      channels: ``C``.
      reduction: cSE's ``r`` (2 in Roy et al.).
      combine: "add" (the MICCAI paper) or "max" (the journal version's best).
      use_bias, dtype, param_dtype, rngs: as ``SqueezeExcite``.
    """

    def __init__(self, channels: int, *, reduction: int = 2, combine: str = "add", use_bias: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        if combine not in COMBINE:
            raise ValueError(f"combine must be one of {COMBINE}, got {combine!r}")
        self.combine = combine
        self.channel = SqueezeExcite(channels, reduction=reduction, use_bias=use_bias, dtype=dtype,
                                     param_dtype=param_dtype, rngs=rngs)
        self.spatial = SpatialSqueezeExcite(channels, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                                            rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        return concurrent_squeeze_excite(x, self.channel.gate(x), self.spatial.gate(x), self.combine)


def linear_weights(layer: nnx.Linear, dtype) -> tuple[jax.Array, Optional[jax.Array]]:
    """``(kernel, bias or None)`` of an ``nnx.Linear``, cast to ``dtype``."""
    bias = None if layer.bias is None else layer.bias[...].astype(dtype)
    return layer.kernel[...].astype(dtype), bias


def conv1x1_weights(layer: nnx.Conv, dtype) -> tuple[jax.Array, Optional[jax.Array]]:
    """``(w [C], b [] or None)`` of a 1×1 ``nnx.Conv`` to one channel, cast to ``dtype``."""
    bias = None if layer.bias is None else layer.bias[...][0].astype(dtype)
    return layer.kernel[...][0, 0, :, 0].astype(dtype), bias


PAPER = "Hu et al. 2018 (SE); Roy et al. 2018 (cSE, sSE, scSE)"
register_module(ModuleSpec("se", SqueezeExcite, dict(channels=16, reduction=4), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("cse", SqueezeExcite, dict(channels=16, reduction=2), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("sse", SpatialSqueezeExcite, dict(channels=16), (2, 5, 6, 16), kind="image", paper=PAPER))
register_module(ModuleSpec("scse", ConcurrentSqueezeExcite, dict(channels=16), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("scse_max", ConcurrentSqueezeExcite, dict(channels=16, combine="max"), (2, 5, 6, 16),
                           kind="image", paper=PAPER))
