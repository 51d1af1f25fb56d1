"""Large-kernel attention (LKA) and VAN's spatial-attention sublayer as Flax NNX modules on NHWC feature maps
(functional core: ``attnjax.vision.large_kernel``).

Guo et al., "Visual Attention Network", arXiv:2202.09741 (2022). Parameter names follow the official code
(Visual-Attention-Network/VAN-Classification, ``models/van.py``: ``AttentionModule`` and ``SpatialAttention``);
its ``1×1`` convolutions are ``nnx.Linear`` layers over channels here (kernel ``[C_in, C_out]``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image
from attnjax.nn.conv.squeeze_excite import linear_weights
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.large_kernel import large_kernel_attention, lka_attention, lka_kernel_sizes, pointwise_conv


def depthwise(channels: int, size: int, *, dilation: int = 1, use_bias: bool, dtype: Optional[Dtype],
              param_dtype: Dtype, rngs: nnx.Rngs) -> nnx.Conv:
    """A depthwise ``size×size`` ``nnx.Conv`` holding a ``[size, size, 1, C]`` kernel (flax's default init)."""
    return nnx.Conv(channels, channels, (size, size), kernel_dilation=dilation, feature_group_count=channels,
                    use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def conv_weights(layer: nnx.Conv, dtype) -> tuple[jax.Array, Optional[jax.Array]]:
    """``(kernel [kh, kw, C_in / groups, C_out], bias [C_out] or None)`` of an ``nnx.Conv``, cast to ``dtype``."""
    bias = None if layer.bias is None else layer.bias[...].astype(dtype)
    return layer.kernel[...].astype(dtype), bias


class LargeKernelAttention(nnx.Module):
    """LKA: ``y = Conv1×1(DW-D-Conv(DW-Conv(x))) ⊙ x`` (Guo et al. 2022, eqs. 1-2).

    A ``K×K`` convolution decomposed (section "Large Kernel Attention") into a ``(2d−1)×(2d−1)`` depthwise
    convolution (``conv0``), a ``⌈K/d⌉×⌈K/d⌉`` depthwise convolution with dilation ``d`` (``conv_spatial``) and a
    ``1×1`` convolution (``conv1``); the result gates ``x`` elementwise (no normalization).

    Example::

      lka = LargeKernelAttention(64, rngs=nnx.Rngs(0))
      y = lka(x)                                     # x, y: [B, H, W, 64]

    Parameters: ``(2d−1)²·C + ⌈K/d⌉²·C + C²`` weights, plus ``3C`` biases with ``use_bias``.

    Args:
      channels: ``C``, the channels of ``x``.
      kernel_size: ``K``, the large kernel the decomposition stands for (21 in the paper).
      dilation: ``d`` (3 in the paper: ``5×5`` and ``7×7`` dilated by 3); ``⌈K/d⌉`` must be odd.
      use_bias: biases in the three convolutions (the official code has them).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the convolutions (flax's ``nnx.Conv`` / ``nnx.Linear`` defaults).
    """

    def __init__(self, channels: int, *, kernel_size: int = 21, dilation: int = 3, use_bias: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        local, dilated = lka_kernel_sizes(kernel_size, dilation)
        self.channels, self.dilation = channels, dilation
        layers = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv0 = depthwise(channels, local, **layers)
        self.conv_spatial = depthwise(channels, dilated, dilation=dilation, **layers)
        self.conv1 = nnx.Linear(channels, channels, **layers)

    def weights(self, dtype) -> tuple:
        """The six arrays of ``lka_attention`` in order, cast to ``dtype``."""
        return (*conv_weights(self.conv0, dtype), *conv_weights(self.conv_spatial, dtype),
                *linear_weights(self.conv1, dtype))

    def attention(self, x: jax.Array) -> jax.Array:
        """The attention map ``Conv1×1(DW-D-Conv(DW-Conv(x)))`` (eq. 1), ``[B, H, W, C]``."""
        check_image("x", x, self.channels)
        return lka_attention(x, *self.weights(x.dtype), dilation=self.dilation)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return large_kernel_attention(x, *self.weights(x.dtype), dilation=self.dilation)


class VANSpatialAttention(nnx.Module):
    """VAN's attention sublayer: ``y = x + W₂ LKA(GELU(W₁ x + b₁)) + b₂`` (Guo et al. 2022, sec. 3, the figure
    of a VAN stage: 1×1 conv, GELU, LKA, 1×1 conv; official code ``SpatialAttention``), with the ``1×1``
    convolutions ``W₁`` (``proj_1``) and ``W₂`` (``proj_2``) around ``LargeKernelAttention``
    (``spatial_gating_unit``) and the shortcut inside, as in the official code (a VAN block adds its own
    residual around this sublayer: ``x + γ ⊙ VANSpatialAttention(BN(x))``).

    GELU is the exact (erf) form, as ``torch.nn.GELU``.
    Parameters: ``LargeKernelAttention``'s plus ``2·C²`` weights and ``2C`` biases (``2C²`` without ``use_bias``).

    Args:
      channels, kernel_size, dilation, use_bias, dtype, param_dtype, rngs: as ``LargeKernelAttention``
      (``use_bias`` also for the two projections).
    """

    def __init__(self, channels: int, *, kernel_size: int = 21, dilation: int = 3, use_bias: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        layers = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spatial_gating_unit = LargeKernelAttention(channels, kernel_size=kernel_size, dilation=dilation,
                                                        **layers)
        self.channels = channels
        self.proj_1 = nnx.Linear(channels, channels, **layers)
        self.proj_2 = nnx.Linear(channels, channels, **layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        u = jax.nn.gelu(pointwise_conv(x, *linear_weights(self.proj_1, x.dtype)), approximate=False)
        return x + pointwise_conv(self.spatial_gating_unit(u), *linear_weights(self.proj_2, x.dtype))


PAPER = "Guo et al. 2022 (Visual Attention Network), eqs. 1-2"
register_module(ModuleSpec("lka", LargeKernelAttention, dict(channels=16), (2, 5, 6, 16), kind="image", paper=PAPER))
register_module(ModuleSpec("van_spatial_attention", VANSpatialAttention, dict(channels=16), (2, 5, 6, 16),
                           kind="image", paper=PAPER + "; a VAN stage (official code: SpatialAttention)"))
