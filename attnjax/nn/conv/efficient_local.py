"""ELA, Efficient Local Attention (Xu & Wan, arXiv:2403.01123, 2024) as a Flax NNX module on NHWC feature maps
(functional core: ``attnjax.vision.efficient_local``)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.efficient_local import (DEFAULT_VARIANT, efficient_local_attention, efficient_local_gates,
                                            variant_config)


class EfficientLocalAttention(nnx.Module):
    """ELA: ``y = x ⊙ σ(GN(F(mean_w x))) ⊙ σ(GN(F(mean_h x)))`` with one 1-D convolution ``F`` and one
    GroupNorm ``GN`` shared by the height and width gates (Xu & Wan 2024, sec. 3; ``attnjax.vision.efficient_local``).

    Example::

      ela = EfficientLocalAttention(64, variant="S", rngs=nnx.Rngs(0))
      y = ela(x)                                     # x, y: [B, H, W, 64]

    Parameters: ``k·(C / groups)·C`` convolution weights (no bias) plus ``2·C`` GroupNorm scales and biases:
    ``k·C + 2·C`` for ELA-T/B, ``8·k·C + 2·C`` for ELA-S/L.

    Args:
      channels: ``C``, the channels of ``x``.
      variant: "T", "B", "S" or "L", the paper's versions (``attnjax.vision.efficient_local.VARIANTS``); "B"
        (kernel 7, depthwise, 16 GroupNorm groups) by default, the configuration of the paper's reference code.
      kernel_size, groups, norm_groups: override the variant's kernel size (odd), convolution groups (dividing
        ``C``) and GroupNorm groups (dividing ``C``).
      epsilon: GroupNorm's epsilon (1e-5, PyTorch's default, as in the reference code).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the convolution (flax's ``nnx.Conv`` default) and GroupNorm (1, 0).
    """

    def __init__(self, channels: int, *, variant: str = DEFAULT_VARIANT, kernel_size: Optional[int] = None,
                 groups: Optional[int] = None, norm_groups: Optional[int] = None, epsilon: float = 1e-5,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        preset = variant_config(variant, channels)
        kernel_size, groups, norm_groups = (preset[0] if kernel_size is None else kernel_size,
                                            preset[1] if groups is None else groups,
                                            preset[2] if norm_groups is None else norm_groups)
        check_positive(kernel_size=kernel_size, groups=groups, norm_groups=norm_groups)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (zero padding kernel_size // 2 keeps the length), "
                             f"got {kernel_size}")
        for name, value in (("groups", groups), ("norm_groups", norm_groups)):
            if channels % value:
                raise ValueError(f"{name} ({value}) must divide channels ({channels}) (variant {variant!r})")
        self.channels, self.groups, self.norm_groups, self.epsilon = channels, groups, norm_groups, epsilon
        self.conv = nnx.Conv(channels, channels, (kernel_size,), padding="SAME", feature_group_count=groups,
                             use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = nnx.GroupNorm(channels, num_groups=norm_groups, epsilon=epsilon, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)

    def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The height and width gates ``(y^h [B, H, 1, C], y^w [B, 1, W, C])`` in ``(0, 1)``."""
        check_image("x", x, self.channels)
        return efficient_local_gates(x, *self.core_arguments())

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return efficient_local_attention(x, *self.core_arguments())

    def core_arguments(self) -> tuple:
        """``(kernel [k, C / groups, C], groups, norm_scale [C], norm_bias [C], norm_groups, epsilon)``, the
        functional core's arguments after ``x``."""
        return (self.conv.kernel[...], self.groups, self.norm.scale[...], self.norm.bias[...], self.norm_groups,
                self.epsilon)


PAPER = "Xu & Wan 2024, ELA: Efficient Local Attention for Deep Convolutional Neural Networks (arXiv:2403.01123)"
register_module(ModuleSpec("ela", EfficientLocalAttention, dict(channels=16), (2, 5, 6, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("ela_s", EfficientLocalAttention, dict(channels=16, variant="S"), (2, 5, 6, 16),
                           kind="image", paper=PAPER))
