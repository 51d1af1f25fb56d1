"""Large-kernel attention (LKA) of the Visual Attention Network: a decomposed large convolution used as a gate.

Guo et al., "Visual Attention Network", arXiv:2202.09741 (2022; Computational Visual Media 2023), section
"Large Kernel Attention": a ``K×K`` convolution is decomposed into a ``(2d−1)×(2d−1)`` depthwise convolution,
a ``⌈K/d⌉×⌈K/d⌉`` depthwise convolution with dilation ``d`` and a ``1×1`` convolution (``K = 21, d = 3``:
``5×5``, ``7×7`` dilated by 3, ``1×1``, as in the official code, Visual-Attention-Network/VAN-Classification
``models/van.py``):

* ``Attention = Conv1×1(DW-D-Conv(DW-Conv(F)))`` (eq. 1),
* ``Output = Attention ⊙ F`` (eq. 2).

Shapes: ``x [B, H, W, C]`` (NHWC); depthwise kernels ``[kh, kw, 1, C]`` (HWIO, the layout of a depthwise
``flax.nnx.Conv``); cost ``O(B·H·W·C·((2d−1)² + ⌈K/d⌉² + C))``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnjax.checks import check_positive


def lka_kernel_sizes(kernel_size: int = 21, dilation: int = 3) -> tuple[int, int]:
    """The decomposition of a ``K×K`` convolution (Guo et al. 2022, section "Large Kernel Attention"):
    ``(2d − 1, ⌈K/d⌉)``, the sizes of the local depthwise kernel and of the depthwise kernel dilated by ``d``.
    ``(5, 7)`` for ``K=21, d=3``."""
    check_positive(kernel_size=kernel_size, dilation=dilation)
    dilated = math.ceil(kernel_size / dilation)
    if dilated % 2 == 0:
        raise ValueError(f"kernel_size={kernel_size}, dilation={dilation} give a {dilated}x{dilated} dilated kernel "
                         "(ceil(kernel_size / dilation)); it must be odd so the convolution keeps H and W")
    return 2 * dilation - 1, dilated


def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None, *, dilation: int = 1) -> jax.Array:
    """A depthwise convolution that keeps ``H, W``: each channel convolved with its own ``kh×kw`` kernel,
    zero padding ``d·(k − 1)/2`` on each side (stride 1, odd ``kh, kw``).

    Args:
      x: ``[B, H, W, C]``.
      kernel: ``[kh, kw, 1, C]`` (HWIO with ``C`` groups).
      bias: ``[C]`` or ``None``.
      dilation: the kernel's dilation ``d``.

    Returns:
      ``[B, H, W, C]``.
    """
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel must have odd spatial sizes to keep H and W, got kernel shape {list(kernel.shape)}")
    padding = ((dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2)
    y = jax.lax.conv_general_dilated(x, kernel, window_strides=(1, 1), padding=padding,
                                     rhs_dilation=(dilation, dilation), feature_group_count=x.shape[-1],
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias


def pointwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """A ``1×1`` convolution ``y = x W + b`` over channels. ``x [B, H, W, C_in]``, ``kernel [C_in, C_out]``,
    ``bias [C_out]`` or ``None`` -> ``[B, H, W, C_out]``."""
    y = jnp.einsum("bhwc,cd->bhwd", x, kernel)
    return y if bias is None else y + bias


def lka_attention(x: jax.Array, local_kernel: jax.Array, local_bias: jax.Array | None, dilated_kernel: jax.Array,
                  dilated_bias: jax.Array | None, mix_kernel: jax.Array, mix_bias: jax.Array | None, *,
                  dilation: int = 3) -> jax.Array:
    """LKA's attention map ``Conv1×1(DW-D-Conv(DW-Conv(x)))`` (Guo et al. 2022, eq. 1).

    Args:
      x: ``[B, H, W, C]``.
      local_kernel, local_bias: ``[2d−1, 2d−1, 1, C]``, ``[C]`` or ``None`` (DW-Conv).
      dilated_kernel, dilated_bias: ``[⌈K/d⌉, ⌈K/d⌉, 1, C]``, ``[C]`` or ``None`` (DW-D-Conv, dilation ``d``).
      mix_kernel, mix_bias: ``[C, C]``, ``[C]`` or ``None`` (the ``1×1`` convolution across channels).
      dilation: ``d``.

    Returns:
      The attention map ``[B, H, W, C]`` (not normalized; it multiplies ``x`` in eq. 2).
    """
    a = depthwise_conv(x, local_kernel, local_bias)
    a = depthwise_conv(a, dilated_kernel, dilated_bias, dilation=dilation)
    return pointwise_conv(a, mix_kernel, mix_bias)


def large_kernel_attention(x: jax.Array, local_kernel: jax.Array, local_bias: jax.Array | None,
                           dilated_kernel: jax.Array, dilated_bias: jax.Array | None, mix_kernel: jax.Array,
                           mix_bias: jax.Array | None, *, dilation: int = 3) -> jax.Array:
    """LKA: ``y = lka_attention(x) ⊙ x`` (Guo et al. 2022, eqs. 1-2). ``x [B, H, W, C] -> [B, H, W, C]``;
    arguments as ``lka_attention``."""
    return lka_attention(x, local_kernel, local_bias, dilated_kernel, dilated_bias, mix_kernel, mix_bias,
                         dilation=dilation) * x


__all__ = ["lka_kernel_sizes", "depthwise_conv", "pointwise_conv", "lka_attention", "large_kernel_attention"]
