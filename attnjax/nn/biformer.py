"""BiFormer's bi-level routing attention as a Flax NNX module on NHWC feature maps (core: ``attnjax.sparse.biformer``).

Zhu et al. 2023, "BiFormer: Vision Transformer with Bi-Level Routing Attention", CVPR 2023, Sec. 3.2,
Eqs. (1)-(5); official code ``rayleizhu/BiFormer`` (``ops/bra_legacy.py`` ``BiLevelRoutingAttention`` with
the released models' settings: ``param_attention='qkvo'``, no KV downsampling, non-differentiable
routing without routing weights; ``ops/bra_nchw.py`` for non-divisible sizes).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.masks import Explicit
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.sparse.biformer import PAPER, biformer_attention, routed_token_mask

LINEAR_INIT = jax.nn.initializers.truncated_normal(0.02)
"""The official ``_init_weights``: linear kernels ``trunc_normal(std=0.02)``, biases zero."""


def lce_kernel_init(key: jax.Array, shape: tuple, dtype=jnp.float32) -> jax.Array:
    """PyTorch's ``Conv2d`` default for the depthwise LCE kernel ``[k, k, C]``: ``U(±1/sqrt(k·k))``."""
    bound = (shape[0] * shape[1]) ** -0.5
    return jax.random.uniform(key, shape, dtype, -bound, bound)


class BiLevelRoutingAttention(nnx.Module):
    """Bi-level routing attention (official ``BiLevelRoutingAttention``) on ``[B, H, W, C]``::

        Q, K, V = x W_qkv + b_qkv                                   # C -> 3C; heads of d = C / num_heads
        region  = (max(1, H // n_win), max(1, W // n_win))          # official nchwBRA's region size
        A = BRA(Q, K, V; region, top_k)                             # Eqs. (2)-(4), attnjax.sparse.biformer
        y = (A + DWConv_k×k(V)) W_o + b_o                           # Eq. (5): + LCE(V), then the output projection

    The routing (region means of the full ``C``-channel q and k, one top-k for all heads, own region not
    forced, not differentiated) and the token-to-token attention run through ``attnjax.sparse.biformer``'s
    ``biformer_attention`` on the block-sparse engine (``implementation``). Sizes the regions don't tile
    (the official legacy code needs ``auto_pad``): the grid is padded to whole regions, region means over
    the real tokens, padded keys masked (``attnjax.sparse.biformer``'s module docstring).

    Under ``attnjax.analysis.capture_attention`` it records q, k and the routed pattern as an ``Explicit``
    ``[B, 1, H·W, H·W]`` mask (``routed_token_mask``): the softmax map of the token-to-token attention (the LCE
    term is no attention map).

    The logit scale defaults to the official ``qk_scale or qk_dim ** -0.5`` with ``qk_dim = C`` (the whole
    channel count, not the head dim: "to be consistent with old models" in ``bra_nchw.py``).

    Example::

      attn = BiLevelRoutingAttention(64, num_heads=2, n_win=7, top_k=4, rngs=nnx.Rngs(0))
      y = attn(x)                                                   # x, y: [B, 56, 56, 64]

    Parameters: ``3C² + 3C`` (QKV) ``+ k²C + C`` (LCE) ``+ C² + C`` (output).

    Args:
      channels: ``C``, a multiple of ``num_heads``.
      num_heads: attention heads (official: ``C / 32``).
      n_win: regions per side (official 7); the region is ``(H // n_win, W // n_win)`` tokens (at least 1).
      top_k: regions each region attends to (BiFormer-T/S/B stages: 1, 4, 16).
      lce_kernel_size: the depthwise LCE kernel (official ``side_dwconv=5``), odd.
      scale: logit scale, default ``C ** -0.5`` (official).
      implementation: the engine path, "auto", "xla", "pallas" or "reference".
      dtype, param_dtype: computation and parameter dtypes; the output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers.
    """

    def __init__(self, channels: int, *, num_heads: int = 8, n_win: int = 7, top_k: int = 4,
                 lce_kernel_size: int = 5, scale: Optional[float] = None, implementation: str = "auto",
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads, n_win=n_win, top_k=top_k,
                       lce_kernel_size=lce_kernel_size)
        if channels % num_heads:
            raise ValueError(f"channels ({channels}) must be a multiple of num_heads ({num_heads})")
        if lce_kernel_size % 2 == 0:
            raise ValueError(f"lce_kernel_size must be odd (a centred depthwise kernel), got {lce_kernel_size}")
        if scale is not None and not isinstance(scale, (int, float)):
            raise TypeError(f"scale must be a number or None, got {describe(scale)}")
        self.channels, self.num_heads, self.n_win, self.top_k = channels, num_heads, n_win, top_k
        self.scale = channels ** -0.5 if scale is None else float(scale)
        self.implementation = implementation
        common = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=LINEAR_INIT, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, **common)
        self.out = nnx.Linear(channels, channels, **common)
        shape = (lce_kernel_size, lce_kernel_size, channels)
        self.lce_kernel = nnx.Param(lce_kernel_init(rngs.params(), shape, param_dtype))
        bound = lce_kernel_size ** -1.0
        self.lce_bias = nnx.Param(jax.random.uniform(rngs.params(), (channels,), param_dtype, -bound, bound))

    def region(self, height: int, width: int) -> tuple[int, int]:
        """The region size on an ``height × width`` map: ``(max(1, H // n_win), max(1, W // n_win))``."""
        return max(1, height // self.n_win), max(1, width // self.n_win)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        q, k, v = (t.reshape(B, H * W, self.num_heads, C // self.num_heads)
                   for t in jnp.split(self.qkv(x), 3, axis=-1))
        if is_capturing():
            routed = routed_token_mask(q, k, grid=(H, W), region=self.region(H, W), top_k=self.top_k)
            sow_attention_inputs(self, q, k, mask=Explicit(routed), scale=self.scale, mechanism="softmax")
        out = biformer_attention(q, k, v, grid=(H, W), region=self.region(H, W), top_k=self.top_k, scale=self.scale,
                                 lce_kernel=self.lce_kernel[...], lce_bias=self.lce_bias[...],
                                 implementation=self.implementation)
        return self.out(out.reshape(B, H, W, C)).astype(x.dtype)


register_module(ModuleSpec("biformer", BiLevelRoutingAttention, dict(channels=8, num_heads=2, n_win=3, top_k=2),
                           (1, 6, 7, 8), kind="image", paper=PAPER))

__all__ = ["BiLevelRoutingAttention"]
