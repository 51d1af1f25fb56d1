"""The pre-norm MBConv (inverted residual) block that MOAT and MaxViT put before their attention.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018 (the inverted residual);
in the pre-norm form of Tu et al., "MaxViT", ECCV 2022, sec. 3.3 (with squeeze-and-excitation) and Yang et al.,
"MOAT", ICLR 2023, sec. 3 (without). Choices where the papers are silent follow the official code
(tensorflow/models ``official/projects/maxvit/modeling/layers.py`` ``MBConvBlock``; google-research/deeplab2
``moat_blocks.py``): exact GELU, BatchNorm epsilon 1e-3, SE with ``⌊C/4⌋`` hidden units and SiLU.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.nn.checks import check_image
from attnjax.nn.conv.squeeze_excite import SqueezeExcite
from attnjax.nn.registry import ModuleSpec, register_module

NORMS = ("batch", "layer")
"""The MBConv's normalization: "batch" (the papers' BatchNorm) or "layer" (LayerNorm over channels)."""

BATCH_NORM_EPSILON = 1e-3
"""The MBConv BatchNorm's epsilon: Keras' default, which the official codes keep."""

LAYER_NORM_EPSILON = 1e-5
"""The LayerNorm epsilon of the official codes (``ln_epsilon``)."""


def mbconv_norm(norm: str, features: int, *, use_bias: bool = True, dtype: Optional[Dtype], param_dtype: Dtype,
                rngs: nnx.Rngs) -> nnx.Module:
    """One normalization layer of the MBConv: ``nnx.BatchNorm`` or ``nnx.LayerNorm`` over ``features``."""
    common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if norm == "batch":
        return nnx.BatchNorm(features, epsilon=BATCH_NORM_EPSILON, **common)
    return nnx.LayerNorm(features, epsilon=LAYER_NORM_EPSILON, **common)


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU, Keras' ``gelu`` default that the official MBConvs use."""
    return jax.nn.gelu(x, approximate=False)


class MBConv(nnx.Module):
    """Pre-norm MBConv, residual::

        x ← x + Proj([SE](GELU(N(DWConv(GELU(N(Expand(N(x)))))))))

    ``Expand`` is a 1×1 convolution to ``E = expansion·C`` channels (no bias), ``DWConv`` a ``k × k`` depthwise
    convolution (no bias), ``SE`` squeeze-and-excitation on the ``E`` channels with ``⌊C/4⌋ = E/(4·expansion)``
    hidden units and SiLU (MaxViT; off for MOAT), ``Proj`` a 1×1 convolution back to ``C`` (with bias). With
    ``norm="batch"`` the first BatchNorm has no shift: the bias-free expansion would pass it as a per-channel
    constant that the next BatchNorm's batch mean removes, so it would never get a gradient.

    Example::

      block = MBConv(64, squeeze_excite=True, rngs=nnx.Rngs(0))     # MaxViT's
      y = block(x)                                                  # x, y: [B, H, W, 64]

    Parameters (``norm="batch"``, ``k = kernel_size``, ``S = E/(4·expansion)``):
    ``C + C·E + 2E + k²E + 2E + E·C + C``, plus ``E·S + S + S·E + E`` with ``squeeze_excite``.

    Args:
      channels: ``C``, the channels of ``x``.
      expansion: the expansion ratio (4 in both papers).
      kernel_size: the depthwise convolution's kernel (3).
      squeeze_excite: add SE after the depthwise convolution (MaxViT: True; MOAT: False).
      norm: one of ``NORMS`` ("batch" in the papers). A training-mode BatchNorm updates its running averages;
        call the module through ``nnx.jit`` / ``nnx.grad`` in training mode and ``model.eval()`` for inference.
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, channels: int, *, expansion: int = 4, kernel_size: int = 3, squeeze_excite: bool = False,
                 norm: str = "batch", dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(channels=channels, expansion=expansion, kernel_size=kernel_size)
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {describe(norm)}")
        self.channels = channels
        hidden = expansion * channels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.pre_norm = mbconv_norm(norm, channels, use_bias=norm != "batch", **common)
        self.expand = nnx.Conv(channels, hidden, (1, 1), use_bias=False, **common)
        self.expand_norm = mbconv_norm(norm, hidden, **common)
        self.depthwise = nnx.Conv(hidden, hidden, (kernel_size, kernel_size), feature_group_count=hidden,
                                  use_bias=False, **common)
        self.depthwise_norm = mbconv_norm(norm, hidden, **common)
        self.squeeze_excite = (SqueezeExcite(hidden, reduction=4 * expansion, activation=jax.nn.silu, **common)
                               if squeeze_excite else None)
        self.project = nnx.Conv(hidden, channels, (1, 1), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        h = gelu(self.expand_norm(self.expand(self.pre_norm(x))))
        h = gelu(self.depthwise_norm(self.depthwise(h)))
        if self.squeeze_excite is not None:
            h = self.squeeze_excite(h)
        return x + self.project(h).astype(x.dtype)


# norm="layer": the conformance suite traces the module in a closure, where a training-mode BatchNorm cannot
# update its averages; the BatchNorm default is tested under nnx.jit (tests/nn/conv/test_moat.py).
register_module(ModuleSpec("mbconv_se", MBConv, dict(channels=8, squeeze_excite=True, norm="layer"), (2, 5, 6, 8),
                           kind="image", paper="Sandler et al. 2018 (MobileNetV2); Tu et al. 2022 (MaxViT, ECCV)"))
