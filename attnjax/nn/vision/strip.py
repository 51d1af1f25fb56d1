"""S2AFormer's strip self-attention (SSA) as a Flax NNX module on NHWC feature maps (core: ``attnjax.vision.strip``).

Xu et al., "S2AFormer: Strip Self-Attention for Efficient Vision Transformer", IEEE TIP 2025 (arXiv 2505.22195).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.capture import sow_attention_inputs
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.strip import spatial_reduction, strip_attention
from attnjax.vision.window import Window, window_shape


class StripSelfAttention(nnx.Module):
    """Strip self-attention (S2AFormer, sec. III, SSA): full-resolution queries over a spatially reduced map::

        x_s = DWConv_{r×r, stride r}(x)                      # [B, ⌊H/rh⌋, ⌊W/rw⌋, C]
        Q = x W_q + b_q,  K = x_s W_k,  V = x_s W_v + b_v     # Q, K: heads·d_k channels (d_k < d_v); V: C
        y = concat_h(softmax(Q_h K_hᵀ / √d_k) V_h) W_o + b_o

    K and V come from ``(H·W)/(rh·rw)`` tokens (spatial reduction), Q and K have ``d_k = d_v / qk_reduction``
    channels per head (channel compression), so the ``N × N/(rh·rw)`` attention map costs
    ``N²·heads·(d_k + d_v)/(rh·rw)`` multiply-adds instead of ``2N²·C``.

    Example::

      ssa = StripSelfAttention(64, num_heads=2, rngs=nnx.Rngs(0))
      y = ssa(x)                                        # x, y: [B, H, W, 64]

    Parameters: ``rh·rw·C + C`` (depth-wise reduction) ``+ 2·C·heads·d_k + heads·d_k`` (Q with bias, K without)
    ``+ 2·(C² + C)`` (V and output projections).

    Inferred, not read from the paper (only its abstract and secondary summaries were available): the
    reduction is a depth-wise convolution with kernel = stride = ``reduction`` on the block input, before the K/V
    projections, without normalization (PVT's spatial reduction with a depth-wise kernel); the compression is a
    linear projection per head; the default ratios. The key projection has no bias: it would add ``q·b_k``, the
    same for every key, to a query's logits, which the softmax cancels (a parameter without gradient).

    Args:
      channels: ``C``, the channels of ``x`` (a multiple of ``num_heads``).
      num_heads: attention heads; ``d_v = C / num_heads``.
      reduction: ``r`` or ``(rh, rw)``, the spatial reduction of K and V (maps need ``H ≥ rh``, ``W ≥ rw``; the
        last ``H mod rh`` rows and ``W mod rw`` columns feed no key, as a strided convolution without padding).
      qk_reduction: channel compression of Q and K, ``d_k = d_v / qk_reduction`` (a divisor of ``d_v``).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, channels: int, *, num_heads: int = 1, reduction: Window = 2, qk_reduction: int = 2,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads, qk_reduction=qk_reduction)
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be a multiple of num_heads ({num_heads})")
        value_dim = channels // num_heads
        if value_dim % qk_reduction:
            raise ValueError(f"qk_reduction ({qk_reduction}) must divide the head dimension channels // num_heads "
                             f"= {value_dim}")
        self.reduction = window_shape(reduction, "reduction")
        self.channels, self.num_heads = channels, num_heads
        self.key_dim = value_dim // qk_reduction
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.reduce = nnx.Conv(channels, channels, self.reduction, strides=self.reduction, padding="VALID",
                               feature_group_count=channels, **common)
        self.query = nnx.Linear(channels, num_heads * self.key_dim, **common)
        self.key = nnx.Linear(channels, num_heads * self.key_dim, use_bias=False, **common)
        self.value = nnx.Linear(channels, channels, **common)
        self.out = nnx.Linear(channels, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        reduced = spatial_reduction(x, self.reduce.kernel[...], self.reduce.bias[...])
        h, w = reduced.shape[1:3]
        q = self.query(x).reshape(B, H, W, self.num_heads, self.key_dim)
        k = self.key(reduced).reshape(B, h, w, self.num_heads, self.key_dim)
        v = self.value(reduced).reshape(B, h, w, self.num_heads, C // self.num_heads)
        sow_attention_inputs(self, q.reshape(B, H * W, self.num_heads, self.key_dim),
                             k.reshape(B, h * w, self.num_heads, self.key_dim), mask=None, scale=None,
                             mechanism="softmax")
        return self.out(strip_attention(q, k, v).reshape(B, H, W, C)).astype(x.dtype)


PAPER = "Xu et al. 2025 (S2AFormer, IEEE TIP), strip self-attention"
register_module(ModuleSpec("strip_attention", StripSelfAttention, dict(channels=16, num_heads=2), (2, 5, 7, 16),
                           kind="image", paper=PAPER))
