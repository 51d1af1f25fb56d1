"""ELA, Efficient Local Attention: two 1-D positional gates, one along the height and one along the width,
from strip pooling, a shared 1-D convolution, GroupNorm and a sigmoid (Xu & Wan, "ELA: Efficient Local Attention
for Deep Convolutional Neural Networks", arXiv:2403.01123, 2024, sec. 3).

* Strip pooling (as in Coordinate Attention): ``z^h_c(h) = mean_w x_c(h, w)``, ``z^w_c(w) = mean_h x_c(h, w)``.
* Gates: ``y^h = σ(G_n(F(z^h)))``, ``y^w = σ(G_n(F(z^w)))``, ``F`` one 1-D convolution (kernel ``k``, zero
  "same" padding, ``groups`` channel groups, no bias) and ``G_n`` one GroupNorm (``norm_groups`` groups), both
  shared by the two directions.
* Output: ``y_c(h, w) = x_c(h, w) · y^h_c(h) · y^w_c(w)``.

The paper's four versions differ in ``k``, the convolution's groups and GroupNorm's groups (``VARIANTS``):
ELA-T ``(5, C, 32)`` and ELA-B ``(7, C, 16)`` use a depthwise convolution and are meant for shallow and light
networks, ELA-S ``(5, C/8, 16)`` and ELA-L ``(7, C/8, 16)`` mix 8 channels per group for deeper and large ones.

Shapes: ``x [B, H, W, C]`` (NHWC); cost ``O(B·H·W·C)`` plus ``O(B·(H + W)·k·C·C/groups)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

VARIANTS = {"T": (5, 1, 32), "B": (7, 1, 16), "S": (5, 8, 16), "L": (7, 8, 16)}
"""ELA's versions (Xu & Wan 2024, sec. 3): ``name -> (kernel_size, channels per convolution group, GroupNorm
groups)``, as the authors' code sets them: ``groups = C`` for T and B (depthwise), ``groups = C / 8`` for S and
L; GroupNorm with 32 groups for T and 16 otherwise."""

DEFAULT_VARIANT = "B"
"""ELA-B: kernel 7, depthwise, 16 GroupNorm groups, the configuration of the paper's reference code."""


def variant_config(variant: str, channels: int) -> tuple[int, int, int]:
    """``(kernel_size, groups, norm_groups)`` of ELA-``variant`` on ``channels`` channels (``VARIANTS``)."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {tuple(VARIANTS)}, got {variant!r}")
    kernel_size, per_group, norm_groups = VARIANTS[variant]
    return kernel_size, max(1, channels // per_group), norm_groups


def group_norm(z: jax.Array, scale: jax.Array, bias: jax.Array, num_groups: int, epsilon: float = 1e-5) -> jax.Array:
    """GroupNorm (Wu & He, "Group Normalization", ECCV 2018) of ``z [B, L, C]``: each sample's
    ``C / num_groups`` channels of a group are normalized together over all ``L`` positions, then
    ``· scale + bias`` per channel. Statistics in float32; returns float32 ``[B, L, C]``."""
    B, L, C = z.shape
    g = z.astype(jnp.float32).reshape(B, L, num_groups, C // num_groups)
    mean = jnp.mean(g, axis=(1, 3), keepdims=True)
    var = jnp.var(g, axis=(1, 3), keepdims=True)
    g = ((g - mean) * jax.lax.rsqrt(var + epsilon)).reshape(B, L, C)
    return g * scale.astype(jnp.float32) + bias.astype(jnp.float32)


def strip_gate(z: jax.Array, kernel: jax.Array, groups: int, norm_scale: jax.Array, norm_bias: jax.Array,
               norm_groups: int, epsilon: float = 1e-5) -> jax.Array:
    """One direction's gate ``σ(G_n(F(z)))`` (Xu & Wan 2024, sec. 3). ``z [B, L, C]`` (a strip-pooled
    profile), ``kernel [k, C / groups, C]`` (odd ``k``, zero padding ``k // 2`` each side); returns ``[B, L, C]``
    in ``(0, 1)`` in ``z``'s dtype."""
    k = kernel.shape[0]
    f = jax.lax.conv_general_dilated(z, kernel.astype(z.dtype), window_strides=(1,), padding=[(k // 2, k // 2)],
                                     feature_group_count=groups, dimension_numbers=("NWC", "WIO", "NWC"))
    return jax.nn.sigmoid(group_norm(f, norm_scale, norm_bias, norm_groups, epsilon)).astype(z.dtype)


def efficient_local_gates(x: jax.Array, kernel: jax.Array, groups: int, norm_scale: jax.Array, norm_bias: jax.Array,
                          norm_groups: int, epsilon: float = 1e-5) -> tuple[jax.Array, jax.Array]:
    """ELA's two positional gates ``(y^h [B, H, 1, C], y^w [B, 1, W, C])`` (Xu & Wan 2024, sec. 3): strip
    average pooling along W and along H (in float32), then ``strip_gate`` with the same convolution and GroupNorm.

    Args:
      x: ``[B, H, W, C]``.
      kernel: ``[k, C / groups, C]``, the shared 1-D convolution (odd ``k``).
      groups: the convolution's channel groups.
      norm_scale, norm_bias: ``[C]``, GroupNorm's affine parameters; norm_groups: its groups (divides ``C``).
      epsilon: GroupNorm's variance epsilon (1e-5, PyTorch's default used by the reference code).
    """
    z_h = jnp.mean(x, axis=2, dtype=jnp.float32).astype(x.dtype)
    z_w = jnp.mean(x, axis=1, dtype=jnp.float32).astype(x.dtype)
    y_h = strip_gate(z_h, kernel, groups, norm_scale, norm_bias, norm_groups, epsilon)
    y_w = strip_gate(z_w, kernel, groups, norm_scale, norm_bias, norm_groups, epsilon)
    return y_h[:, :, None, :], y_w[:, None, :, :]


def efficient_local_attention(x: jax.Array, kernel: jax.Array, groups: int, norm_scale: jax.Array,
                              norm_bias: jax.Array, norm_groups: int, epsilon: float = 1e-5) -> jax.Array:
    """ELA: ``y = x ⊙ y^h ⊙ y^w`` (Xu & Wan 2024, sec. 3). ``x [B, H, W, C] -> [B, H, W, C]``; the arguments
    are those of ``efficient_local_gates``."""
    g_h, g_w = efficient_local_gates(x, kernel, groups, norm_scale, norm_bias, norm_groups, epsilon)
    return x * g_h * g_w


__all__ = ["VARIANTS", "DEFAULT_VARIANT", "variant_config", "group_norm", "strip_gate", "efficient_local_gates",
           "efficient_local_attention"]
