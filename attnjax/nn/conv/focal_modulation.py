"""Focal modulation as a Flax NNX module on NHWC feature maps (functional core:
``attnjax.vision.focal_modulation``).

Yang et al., "Focal Modulation Networks", NeurIPS 2022. Parameter names follow the official code
(microsoft/FocalNet, ``classification/focalnet.py``, ``FocalModulation``: ``f``, ``focal_layers``, ``h``,
``proj``); its ``1×1`` convolution ``h`` is an ``nnx.Linear`` over channels here (kernel ``[C, C]``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image
from attnjax.nn.conv.large_kernel import conv_weights, depthwise
from attnjax.nn.conv.squeeze_excite import linear_weights
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.focal_modulation import focal_kernel_sizes, focal_modulation, focal_modulator


class FocalModulation(nnx.Module):
    """Focal modulation: ``y = proj(q ⊙ h(Σ_{ℓ=1}^{L+1} Gˡ ⊙ Zˡ))`` (Yang et al. 2022, sec. 3).

    ``[q, Z⁰, G] = f(x)`` (one linear layer to ``2C + L + 1`` channels); ``Zˡ = GELU(DWConvₗ(Zˡ⁻¹))`` with
    kernel sizes ``focal_factor·(ℓ−1) + focal_window`` for ``ℓ = 1..L`` (hierarchical contextualization);
    ``Z^{L+1} = GELU(mean_{h,w} Z^L)`` (the global level); the gates ``Gˡ`` (one channel each, no
    squashing, as in the official code) weight the levels (gated aggregation); ``h`` (a ``1×1``
    convolution) gives the modulator, which multiplies the query ``q`` elementwise before the output
    projection.

    Example::

      fm = FocalModulation(96, rngs=nnx.Rngs(0))
      y = fm(x)                                      # x, y: [B, H, W, 96]
      m = fm.modulator(x)                            # [B, H, W, 96], the paper's visualized modulator

    Parameters: ``C(2C + L + 1) + C·Σ kₗ² + 2C²`` weights, plus ``2C + L + 1 + C`` biases with ``use_bias``
    and ``C`` for ``proj`` (which always has one, as in the official code).

    Args:
      channels: ``C``, the channels of ``x``.
      focal_level: ``L``, the number of depthwise levels (2: FocalNet's small-receptive-field "SRF" models,
        the default of the official ``FocalNet`` class, ``focal_levels=[2, 2, 2, 2]``; 3 for "LRF").
      focal_window: the first level's kernel size (3, the official default ``focal_windows=[3, 3, 3, 3]``).
      focal_factor: how much the kernel grows per level (2 in the official code).
      use_bias: biases in ``f`` and ``h`` (the official ``bias=True``).
      normalize_modulator: divide the aggregated context by ``L + 1`` (official option, default off).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the layers (flax's ``nnx.Linear`` / ``nnx.Conv`` defaults).
    """

    def __init__(self, channels: int, *, focal_level: int = 2, focal_window: int = 3, focal_factor: int = 2,
                 use_bias: bool = True, normalize_modulator: bool = False, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        sizes = focal_kernel_sizes(focal_level, focal_window, focal_factor)
        self.channels, self.normalize_modulator = channels, normalize_modulator
        layers = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.f = nnx.Linear(channels, 2 * channels + focal_level + 1, use_bias=use_bias, **layers)
        self.focal_layers = nnx.List([depthwise(channels, size, use_bias=False, **layers) for size in sizes])
        self.h = nnx.Linear(channels, channels, use_bias=use_bias, **layers)
        self.proj = nnx.Linear(channels, channels, **layers)

    def context_weights(self, dtype) -> tuple:
        """``(f_kernel, f_bias, focal_kernels, h_kernel, h_bias)`` of ``focal_modulator``, cast to ``dtype``."""
        kernels = [conv_weights(layer, dtype)[0] for layer in self.focal_layers]
        return (*linear_weights(self.f, dtype), kernels, *linear_weights(self.h, dtype))

    def modulator(self, x: jax.Array) -> jax.Array:
        """The modulator ``h(Σₗ Gˡ ⊙ Zˡ)``, ``[B, H, W, C]``."""
        check_image("x", x, self.channels)
        return focal_modulator(x, *self.context_weights(x.dtype), normalize_modulator=self.normalize_modulator)[1]

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return focal_modulation(x, *self.context_weights(x.dtype), *linear_weights(self.proj, x.dtype),
                                normalize_modulator=self.normalize_modulator)


PAPER = "Yang et al. 2022 (Focal Modulation Networks), sec. 3"
register_module(ModuleSpec("focal_modulation", FocalModulation, dict(channels=16), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("focal_modulation_l3_normalized", FocalModulation,
                           dict(channels=16, focal_level=3, normalize_modulator=True), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
