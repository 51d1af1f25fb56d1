"""Focal modulation: a query modulated by gated, multi-level context, in place of self-attention.

Yang et al., "Focal Modulation Networks", NeurIPS 2022 (arXiv:2203.11926), sec. 3, as in the official code
(microsoft/FocalNet, ``classification/focalnet.py``, ``FocalModulation``). With ``x [B, H, W, C]``:

* one linear projection gives the query, the level-0 context and ``L + 1`` gates:
  ``[q, Z⁰, G] = x W_f + b_f`` (``C``, ``C`` and ``L + 1`` channels);
* hierarchical contextualization: ``Zˡ = GELU(DWConvₗ(Zˡ⁻¹))`` for ``ℓ = 1..L`` with depthwise kernels
  ``kₗ = focal_factor·(ℓ − 1) + focal_window`` (3, 5, 7, ... by default), then a global level
  ``Z^{L+1} = GELU(mean_{h,w} Z^L)``;
* gated aggregation: ``Z_out = Σ_{ℓ=1}^{L+1} Gˡ ⊙ Zˡ`` (each gate one channel, broadcast over ``C``;
  divided by ``L + 1`` with ``normalize_modulator``, an option of the official code);
* modulation: ``y = proj(q ⊙ h(Z_out))`` with ``h`` a ``1×1`` convolution (the modulator) and ``proj`` a
  linear layer.

GELU is the exact (erf) form, as ``torch.nn.GELU`` in the official code. Cost ``O(B·H·W·C·(3C + Σ kₗ²))``.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from attnjax.checks import check_positive
from attnjax.vision.large_kernel import depthwise_conv, pointwise_conv


def focal_kernel_sizes(focal_level: int = 2, focal_window: int = 3, focal_factor: int = 2) -> tuple[int, ...]:
    """The depthwise kernel size of each focal level, ``kₗ = focal_factor·(ℓ − 1) + focal_window`` for
    ``ℓ = 1..L`` (Yang et al. 2022, sec. 3; official code: ``kernel_size = focal_factor*k + focal_window``).
    ``(3, 5)`` for the defaults. Every size must be odd so the convolutions keep ``H`` and ``W``."""
    if not isinstance(focal_level, int) or isinstance(focal_level, bool) or focal_level < 0:
        raise ValueError(f"focal_level must be a non-negative int, got {focal_level!r}")
    check_positive(focal_window=focal_window, focal_factor=focal_factor)
    sizes = tuple(focal_factor * level + focal_window for level in range(focal_level))
    if any(size % 2 == 0 for size in sizes):
        raise ValueError(f"focal_window={focal_window}, focal_factor={focal_factor} give even kernel sizes "
                         f"{list(sizes)}; they must be odd to keep H and W")
    return sizes


def focal_modulator(x: jax.Array, f_kernel: jax.Array, f_bias: jax.Array | None, focal_kernels: Sequence[jax.Array],
                    h_kernel: jax.Array, h_bias: jax.Array | None, *,
                    normalize_modulator: bool = False) -> tuple[jax.Array, jax.Array]:
    """The query ``q`` and the modulator ``h(Z_out)`` of focal modulation (Yang et al. 2022, sec. 3).

    Args:
      x: ``[B, H, W, C]``.
      f_kernel, f_bias: ``[C, 2C + L + 1]``, ``[2C + L + 1]`` or ``None``: the projection to ``q``, ``Z⁰``
        and the ``L + 1`` gates, in that order along the last axis.
      focal_kernels: ``L`` depthwise kernels ``[kₗ, kₗ, 1, C]`` (no bias, as in the official code).
      h_kernel, h_bias: ``[C, C]``, ``[C]`` or ``None``: ``h``, the ``1×1`` convolution giving the modulator.
      normalize_modulator: divide ``Z_out`` by ``L + 1`` (official code option, off in the paper's models).

    Returns:
      ``(q, modulator)``, both ``[B, H, W, C]``; the global average is taken in float32.
    """
    channels, levels = x.shape[-1], len(focal_kernels)
    if f_kernel.shape != (channels, 2 * channels + levels + 1):
        raise ValueError(f"f_kernel must have shape [C, 2C + L + 1] = {[channels, 2 * channels + levels + 1]} for "
                         f"C={channels} and L={levels} focal kernels, got {list(f_kernel.shape)}")
    z = pointwise_conv(x, f_kernel, f_bias)
    q, context, gates = z[..., :channels], z[..., channels:2 * channels], z[..., 2 * channels:]
    aggregated = jnp.zeros_like(q)
    for level, kernel in enumerate(focal_kernels):
        context = jax.nn.gelu(depthwise_conv(context, kernel), approximate=False)
        aggregated = aggregated + context * gates[..., level:level + 1]
    mean = jnp.mean(context, axis=(1, 2), keepdims=True, dtype=jnp.float32).astype(context.dtype)
    aggregated = aggregated + jax.nn.gelu(mean, approximate=False) * gates[..., levels:]
    if normalize_modulator:
        aggregated = aggregated / (levels + 1)
    return q, pointwise_conv(aggregated, h_kernel, h_bias)


def focal_modulation(x: jax.Array, f_kernel: jax.Array, f_bias: jax.Array | None,
                     focal_kernels: Sequence[jax.Array], h_kernel: jax.Array, h_bias: jax.Array | None,
                     proj_kernel: jax.Array, proj_bias: jax.Array | None, *,
                     normalize_modulator: bool = False) -> jax.Array:
    """Focal modulation ``y = (q ⊙ h(Σₗ Gˡ ⊙ Zˡ)) W_p + b_p`` (Yang et al. 2022, sec. 3).

    Args:
      x: ``[B, H, W, C]``.
      f_kernel, f_bias, focal_kernels, h_kernel, h_bias, normalize_modulator: as ``focal_modulator``.
      proj_kernel, proj_bias: ``[C, C]``, ``[C]`` or ``None``: the output projection.

    Returns:
      ``[B, H, W, C]``.
    """
    q, modulator = focal_modulator(x, f_kernel, f_bias, focal_kernels, h_kernel, h_bias,
                                   normalize_modulator=normalize_modulator)
    return pointwise_conv(q * modulator, proj_kernel, proj_bias)


__all__ = ["focal_kernel_sizes", "focal_modulator", "focal_modulation"]
