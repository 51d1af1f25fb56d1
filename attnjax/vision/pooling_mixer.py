"""PoolFormer's token mixer: average pooling minus the input.

Yu et al., "MetaFormer Is Actually What You Need for Vision", CVPR 2022, eq. 4:
``T' = AvgPool(T) − T`` (the input is subtracted because the block adds it back through its residual).
The pooling is ``pool_size × pool_size``, stride 1, padding ``pool_size // 2``, and averages over the
window's positions inside the image only (``count_include_pad=False``), as the official code does
(sail-sg/poolformer, ``models/poolformer.py``, ``Pooling``: ``nn.AvgPool2d(pool_size, stride=1,
padding=pool_size//2, count_include_pad=False)``).

Shapes: ``x [B, H, W, C]`` (NHWC); no parameters; cost ``O(B·H·W·C·pool_size²)``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.checks import check_positive


def check_pool_size(pool_size: int) -> None:
    """``ValueError`` unless ``pool_size`` is a positive odd int (an even window with padding
    ``pool_size // 2`` and stride 1 would change ``H`` and ``W``)."""
    check_positive(pool_size=pool_size)
    if pool_size % 2 == 0:
        raise ValueError(f"pool_size must be odd to keep H and W (stride 1, padding pool_size // 2), got {pool_size}")


def window_counts(size: int, pool_size: int) -> np.ndarray:
    """How many positions of a length-``size`` axis the centred window of ``pool_size`` covers at each
    position: ``min(i + p, size − 1) − max(i − p, 0) + 1`` with ``p = pool_size // 2``. ``[size]`` int."""
    i, p = np.arange(size), pool_size // 2
    return np.minimum(i + p, size - 1) - np.maximum(i - p, 0) + 1


def average_pool(x: jax.Array, pool_size: int = 3) -> jax.Array:
    """Average pooling that keeps ``H, W``: ``pool_size × pool_size`` windows, stride 1, zero padding
    ``pool_size // 2``, each window's sum divided by its number of positions inside the image
    (``count_include_pad=False``). ``x [B, H, W, C] -> [B, H, W, C]``; summed in float32."""
    check_pool_size(pool_size)
    p = pool_size // 2
    sums = jax.lax.reduce_window(x.astype(jnp.float32), 0.0, jax.lax.add, (1, pool_size, pool_size, 1),
                                 (1, 1, 1, 1), ((0, 0), (p, p), (p, p), (0, 0)))
    counts = np.outer(window_counts(x.shape[1], pool_size), window_counts(x.shape[2], pool_size))
    return (sums / counts[None, :, :, None].astype(np.float32)).astype(x.dtype)


def pooling_mixer(x: jax.Array, pool_size: int = 3) -> jax.Array:
    """PoolFormer's token mixer ``AvgPool(x) − x`` (Yu et al. 2022, eq. 4). ``x [B, H, W, C] -> [B, H, W, C]``."""
    return average_pool(x, pool_size) - x


__all__ = ["check_pool_size", "window_counts", "average_pool", "pooling_mixer"]
