"""InLine attention (injective linear attention with a local residual) as a Flax NNX module on NHWC maps.

Han et al., "Bridging the Divide: Reconsidering Softmax and Linear Attention", NeurIPS 2024 (§4: injectivity,
eq. 5; §5: local modeling). The attention core is ``attnjax.linear.inline``; the module follows the official
``InLineAttention`` (LeapLabTHU/InLine, ``models/inline_pvt.py``: global attention over the feature map).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.dispatch import check_implementation
from attnjax.linear.feature_maps import FeatureMap, get_feature_map, identity
from attnjax.linear.inline import inline_attention
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module


class InLineAttention(nnx.Module):
    """InLine attention with the local residual on ``x [B, H, W, C]`` (all ``N = H·W`` tokens attend globally)::

        Q, K, V = x W_q + b_q, x W_k (+ b_k), x W_v + b_v             # heads of d = C / heads channels
        O = InLine(Q, K, V)                                           # eq. 5, σ = 1/√d (attnjax.linear.inline)
        w = W_2 GELU(W_1 mean_N(x) + b_1) + b_2                       # [B, 9C]: a 3×3 kernel per channel
        y = (O + DWConv3×3_w(V)) W_o + b_o

    ``W_1`` (``C → C``) and ``W_2`` (``C → 9C``) are 1×1 convolutions grouped by head (the official
    ``self.residual``), so each image gets its own depth-wise kernels for the local term that linear attention
    lacks (§5). The official code uses one fused ``qkv`` projection; here it is three, and with the identity map
    the key projection has no bias: ``φ(q)·(k_j + b) − mean_s φ(q)·(k_s + b)`` cancels it (a parameter without
    gradient). Dropout is left out.

    Example::

      attn = InLineAttention(64, num_heads=2, rngs=nnx.Rngs(0))
      y = attn(x)                                       # x, y: [B, H, W, 64]

    Parameters: ``4C² + 3C`` (projections; ``+ C`` for a key bias) ``+ 10C²/heads + 10C`` (the residual branch).

    Args:
      channels: ``C``, the channels of ``x`` (a multiple of ``num_heads``).
      num_heads: attention heads (official default 8).
      qkv_bias: biases in the query, key and value projections (the official models use them).
      feature_map: φ of ``attnjax.linear.inline`` (official default: the identity).
      implementation: of ``inline_attention`` ("reference", "xla", "auto").
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, channels: int, *, num_heads: int = 8, qkv_bias: bool = True,
                 feature_map: Union[str, FeatureMap] = "identity", implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads)
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be a multiple of num_heads ({num_heads})")
        check_implementation(implementation)
        key_bias = qkv_bias and get_feature_map(feature_map) is not identity
        self.channels, self.num_heads, self.feature_map, self.implementation = (channels, num_heads, feature_map,
                                                                                implementation)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.query = nnx.Linear(channels, channels, use_bias=qkv_bias, **common)
        self.key = nnx.Linear(channels, channels, use_bias=key_bias, **common)
        self.value = nnx.Linear(channels, channels, use_bias=qkv_bias, **common)
        self.residual_hidden = nnx.Conv(channels, channels, (1,), feature_group_count=num_heads, **common)
        self.residual_kernel = nnx.Conv(channels, 9 * channels, (1,), feature_group_count=num_heads, **common)
        self.out = nnx.Linear(channels, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        heads = self.num_heads
        tokens = x.reshape(B, H * W, C)
        q, k, v = (p(tokens).reshape(B, H * W, heads, C // heads) for p in (self.query, self.key, self.value))
        o = inline_attention(q, k, v, feature_map=self.feature_map, implementation=self.implementation)
        hidden = jax.nn.gelu(self.residual_hidden(tokens.mean(axis=1, keepdims=True)), approximate=False)
        kernels = self.residual_kernel(hidden).reshape(B, C, 3, 3)
        local = depthwise_conv3x3(v.reshape(B, H, W, C), kernels)
        return self.out(o.reshape(B, H, W, C) + local)


def depthwise_conv3x3(x: jax.Array, kernels: jax.Array) -> jax.Array:
    """A 3×3 depth-wise convolution (zero padding 1, cross-correlation as ``torch.nn.functional.conv2d``) with
    one kernel per image and channel: ``x [B, H, W, C]``, ``kernels [B, C, 3, 3]`` -> ``[B, H, W, C]``."""
    B, H, W, C = x.shape
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(padded[:, dy:dy + H, dx:dx + W, :] * kernels[:, None, None, :, dy, dx]
               for dy in range(3) for dx in range(3))


register_module(ModuleSpec("inline", InLineAttention, dict(channels=16, num_heads=2), (2, 5, 7, 16), kind="image",
                           paper="Han et al. 2024 (Bridging the Divide: Reconsidering Softmax and Linear Attention)"))
