"""FFNified attention, FFNet's channel mixer and the FFNet block as Flax NNX modules on NHWC feature maps
(functional core: ``attnjax.vision.metamixer``).

Yun, Lee & Ro, "MetaMixer Is All You Need" (arXiv 2406.02021, 2024), official code ysj9909/FFNet
(``models/ffnet.py``: ``Token_Mixer``, ``Channel_Mixer``, ``FFBlock``).

The modules hold the deployed (re-parameterized) form of the official code: every convolution has a bias
and no BatchNorm. The official code trains each projection and depthwise convolution with a BatchNorm after
it, and a 7×7 depthwise convolution as a 7×7 plus a 3×3 branch (RepVGG style); at inference it folds them
(``fuse()``) into exactly the convolutions here, so the mixers compute the same family of functions. What
is left out is the training-time parameterization (and with it the BatchNorm statistics, the only
normalization in an FFNet block).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.metamixer import ffnet_channel_mixer, ffnified_attention


def check_odd(**sizes: int) -> None:
    """``ValueError`` unless every kernel size is a positive odd int ("SAME" padding keeps the grid centred)."""
    check_positive(**sizes)
    for name, size in sizes.items():
        if size % 2 == 0:
            raise ValueError(f"{name} must be odd, got {size}")


def depthwise(channels: int, kernel_size: int, dtype: Optional[Dtype], param_dtype: Dtype,
              rngs: nnx.Rngs) -> nnx.Conv:
    """A ``kernel_size × kernel_size`` depthwise ``nnx.Conv`` with bias, zero "SAME" padding."""
    return nnx.Conv(channels, channels, (kernel_size, kernel_size), padding="SAME", feature_group_count=channels,
                    dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def layer_weights(layer, dtype) -> tuple[jax.Array, Optional[jax.Array]]:
    """``(kernel, bias or None)`` of an ``nnx.Linear`` or ``nnx.Conv``, cast to ``dtype``."""
    bias = None if layer.bias is None else layer.bias[...].astype(dtype)
    return layer.kernel[...].astype(dtype), bias


class FFNifiedAttention(nnx.Module):
    """FFNified attention (Yun et al. 2024, "FFNification", Fig. 1(b)): ``y = DWConv_V(GELU(DWConv_K(x W_Q + b_Q)))``.

    Self-attention with its query-key and coefficient-value interactions replaced by static large-kernel
    depthwise convolutions and softmax by GELU. ``Token_Mixer`` of the official code.

    Example::

      mixer = FFNifiedAttention(64, rngs=nnx.Rngs(0))
      y = mixer(x)                                   # x, y: [B, H, W, 64]

    Parameters: ``C² + C`` (query) plus ``(k_K² + 1)·C`` and ``(k_V² + 1)·C`` (the two depthwise convolutions).

    Args:
      channels: ``C``.
      key_kernel_size, value_kernel_size: the kernels of the query-key and coefficient-value convolutions
        (odd). 7 is the paper's large kernel (FFNet stages 3-4); FFNet uses 3 in stages 1-2
        (``kernel_sizes1``, ``kernel_sizes2`` = [3, 3, 7, 7] in the official code).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the layers (flax's ``nnx.Linear`` / ``nnx.Conv`` defaults).
    """

    def __init__(self, channels: int, *, key_kernel_size: int = 7, value_kernel_size: int = 7,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        check_odd(key_kernel_size=key_kernel_size, value_kernel_size=value_kernel_size)
        self.channels = channels
        self.query = nnx.Linear(channels, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.key = depthwise(channels, key_kernel_size, dtype, param_dtype, rngs)
        self.value = depthwise(channels, value_kernel_size, dtype, param_dtype, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return ffnified_attention(x, *layer_weights(self.query, x.dtype), *layer_weights(self.key, x.dtype),
                                  *layer_weights(self.value, x.dtype))


class FFNetChannelMixer(nnx.Module):
    """FFNet's channel mixer (Yun et al. 2024, the FFNet block; ``Channel_Mixer`` of the official code):
    ``y = W₂ GELU(W₁ DWConv(x) + b₁) + b₂``, the MetaMixer with a depthwise query and 1×1 keys and values.

    Parameters: ``(k² + 1)·C + 2·C·E + E + C`` with ``E = int(expansion · C)``.

    Args:
      channels: ``C``.
      kernel_size: the depthwise query convolution (odd; 7 in FFNet-2/3/4, 3 in FFNet-1).
      expansion: ``E / C`` (3 in every FFNet).
      dtype, param_dtype, rngs: as ``FFNifiedAttention``.
    """

    def __init__(self, channels: int, *, kernel_size: int = 7, expansion: float = 3.0, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        check_odd(kernel_size=kernel_size)
        hidden = int(expansion * channels)
        if hidden < 1:
            raise ValueError(f"expansion * channels must be at least 1, got {expansion} * {channels}")
        self.channels = channels
        self.conv = depthwise(channels, kernel_size, dtype, param_dtype, rngs)
        self.fc1 = nnx.Linear(channels, hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return ffnet_channel_mixer(x, *layer_weights(self.conv, x.dtype), *layer_weights(self.fc1, x.dtype),
                                   *layer_weights(self.fc2, x.dtype))


class FFNetBlock(nnx.Module):
    """The FFNet block (Yun et al. 2024; ``FFBlock`` of the official code): two residual MetaMixers,
    ``x ← x + γ₁ ⊙ FFNifiedAttention(x)``, then ``x ← x + γ₂ ⊙ FFNetChannelMixer(x)``, with no pre-norm.

    Parameters: those of ``FFNifiedAttention`` and ``FFNetChannelMixer``, plus ``2·C`` with ``layer_scale``.

    Args:
      channels: ``C``.
      key_kernel_size, value_kernel_size: of the FFNified attention (7, the paper's large kernel).
      kernel_size, expansion: of the channel mixer (7 and 3).
      layer_scale: the initial per-channel scales ``γ`` (``None``: no layer scale, as FFNet-1/2; FFNet-3/4 use
        1e-6).
      dtype, param_dtype, rngs: as ``FFNifiedAttention``.
    """

    def __init__(self, channels: int, *, key_kernel_size: int = 7, value_kernel_size: int = 7, kernel_size: int = 7,
                 expansion: float = 3.0, layer_scale: Optional[float] = None, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.channels = channels
        self.token_mixer = FFNifiedAttention(channels, key_kernel_size=key_kernel_size,
                                             value_kernel_size=value_kernel_size, dtype=dtype, param_dtype=param_dtype,
                                             rngs=rngs)
        self.channel_mixer = FFNetChannelMixer(channels, kernel_size=kernel_size, expansion=expansion, dtype=dtype,
                                               param_dtype=param_dtype, rngs=rngs)
        if layer_scale is None:
            self.gamma1 = self.gamma2 = None
        else:
            self.gamma1 = nnx.Param(jnp.full((channels,), layer_scale, param_dtype))
            self.gamma2 = nnx.Param(jnp.full((channels,), layer_scale, param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        y = self.token_mixer(x)
        x = x + (y if self.gamma1 is None else self.gamma1[...].astype(x.dtype) * y)
        y = self.channel_mixer(x)
        return x + (y if self.gamma2 is None else self.gamma2[...].astype(x.dtype) * y)


PAPER = "Yun, Lee & Ro 2024, MetaMixer Is All You Need (FFNet)"
register_module(ModuleSpec("ffnified_attention", FFNifiedAttention, dict(channels=16), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("ffnet_channel_mixer", FFNetChannelMixer, dict(channels=16, kernel_size=3),
                           (2, 5, 6, 16), kind="image", paper=PAPER))
register_module(ModuleSpec("ffnet_block", FFNetBlock, dict(channels=16, key_kernel_size=3, value_kernel_size=3,
                                                           layer_scale=1e-6), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
