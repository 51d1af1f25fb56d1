"""HaloNet's halo attention layer as a Flax NNX module on NHWC feature maps (functional core:
``attnjax.vision.halo``).

Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones", CVPR 2021, sec. 2:
queries from the pixels of each ``b × b`` block, keys and values from the block's ``(b + 2h)²`` haloed
neighbourhood, factorized relative position logits, and query subsampling for strided downsampling. The layer
follows timm's ``HaloAttn`` (``timm/layers/halo_attn.py``), which HaloNet models use in place of a bottleneck's
3×3 convolution: 1×1 projections, no output projection (the value projection sets the output width).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax import masks
from attnjax.checks import check_positive
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.halo import (BLOCK_SIZE, HALO_SIZE, HaloLayout, halo_attention, halo_windows, query_blocks,
                                 relative_logits)


class HaloAttention(nnx.Module):
    """HaloNet's blocked local self-attention layer (Vaswani et al. 2021, sec. 2; timm ``HaloAttn``)::

        q = x[::s, ::s] W_q,   [k | v] = x W_kv                     (1×1 convolutions, per head)
        out[p] = Σ_{p' ∈ N(block(p))} softmax(q_p·k_{p'}/√D + q_p·r_h[Δ_y] + q_p·r_w[Δ_x]) v_{p'}

    ``N`` is the block's ``(b + 2h)²`` halo window (keys outside the map masked), ``r_h``, ``r_w`` timm's
    ``PosEmbedRel`` tables (``attnjax.vision.halo``); the relative logits are not scaled (timm's default).

    Example::

      layer = HaloAttention(64, num_heads=8, block_size=8, halo_size=3, rngs=nnx.Rngs(0))
      y = layer(x)                                   # x: [B, H, W, 64] -> y: [B, H, W, 64]
      down = HaloAttention(64, 128, stride=2, rngs=nnx.Rngs(0))
      z = down(x)                                    # z: [B, ⌈H/2⌉, ⌈W/2⌉, 128]

    Parameters: ``C·heads·(2·D + Dv)`` projection weights (``heads·(2·D + Dv)`` biases with ``use_bias``) and
    ``2·(2·(b + 2h) − 1)·D`` relative position table entries (with ``relative_position``), ``Dv = C_out / heads``.

    Args:
      channels: ``C``, the input channels.
      out_channels: ``C_out`` (default ``C``), a multiple of ``num_heads``: the value width.
      num_heads: heads (timm's default 8).
      head_dim: ``D``, the query/key width per head (default ``C_out // num_heads``; timm rounds
        ``C_out`` to a multiple of 8 first).
      block_size: ``b`` (8); halo_size: ``h`` (3): timm's defaults, HaloNet's models' values.
      stride: 1, or the query subsampling of strided downsampling (sec. 2; ``block_size % stride == 0``).
      use_bias: biases in the q and kv projections (timm's ``qkv_bias``, off by default).
      relative_position: the relative position logits (on, as HaloNet).
      dtype: computation dtype; param_dtype: parameter dtype.
      rngs: ``params`` initializes the 1×1 convolutions (flax's ``nnx.Conv`` default, LeCun normal: timm's
        fan-in truncated normal) and the tables (truncated normal of std ``D^-1/2``, as timm).
    """

    def __init__(self, channels: int, out_channels: Optional[int] = None, *, num_heads: int = 8,
                 head_dim: Optional[int] = None, block_size: int = BLOCK_SIZE, halo_size: int = HALO_SIZE,
                 stride: int = 1, use_bias: bool = False, relative_position: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        out_channels = channels if out_channels is None else out_channels
        check_positive(channels=channels, out_channels=out_channels, num_heads=num_heads)
        if out_channels % num_heads:
            raise ValueError(f"out_channels ({out_channels}) must be a multiple of num_heads ({num_heads}): "
                             "the values are split into heads")
        head_dim = out_channels // num_heads if head_dim is None else head_dim
        check_positive(head_dim=head_dim)
        table_size = HaloLayout(block_size, block_size, block_size, halo_size, stride).table_size  # checks them
        self.block_size, self.halo_size, self.stride = block_size, halo_size, stride
        self.channels, self.out_channels, self.num_heads, self.head_dim = channels, out_channels, num_heads, head_dim
        self.value_dim = out_channels // num_heads
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = nnx.Conv(channels, num_heads * head_dim, (1, 1), strides=stride, **common)
        self.kv = nnx.Conv(channels, num_heads * (head_dim + self.value_dim), (1, 1), **common)
        if relative_position:
            init = nnx.initializers.truncated_normal(head_dim ** -0.5)
            shape = (table_size, head_dim)
            self.relative_height = nnx.Param(init(rngs.params(), shape, param_dtype))
            self.relative_width = nnx.Param(init(rngs.params(), shape, param_dtype))
        else:
            self.relative_height = self.relative_width = None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, ⌈H/s⌉, ⌈W/s⌉, C_out]``."""
        check_image("x", x, self.channels)
        B, H, W, _ = x.shape
        q = self.q(x)
        q = q.reshape(*q.shape[:3], self.num_heads, self.head_dim)
        k, v = jnp.split(self.kv(x).reshape(B, H, W, self.num_heads, self.head_dim + self.value_dim),
                         [self.head_dim], axis=-1)
        tables = {}
        if self.relative_height is not None:
            tables = dict(relative_height=self.relative_height[...].astype(q.dtype),
                          relative_width=self.relative_width[...].astype(q.dtype))
        if is_capturing():  # halo_attention_xla's call: blocks as the batch, keys off the map masked, relative logits
            layout = HaloLayout(H, W, self.block_size, self.halo_size, self.stride)
            qb, kw = query_blocks(q, layout), halo_windows(k, layout)
            rel = relative_logits(qb, tables["relative_height"], tables["relative_width"], layout) if tables else None
            n, tq, tk = B * layout.num_blocks, qb.shape[2], kw.shape[2]
            valid = masks.Explicit(jnp.tile(jnp.asarray(layout.key_valid()), (B, 1))[:, None, None, :])
            sow_attention_inputs(self, qb.reshape(n, tq, *qb.shape[3:]), kw.reshape(n, tk, *kw.shape[3:]), mask=valid,
                                 bias=None if rel is None else rel.reshape(n, self.num_heads, tq, tk),
                                 scale=self.head_dim ** -0.5, mechanism="softmax")
        out = halo_attention(q, k, v, block_size=self.block_size, halo_size=self.halo_size, stride=self.stride,
                             scale=self.head_dim ** -0.5, **tables)
        return out.reshape(*out.shape[:3], self.out_channels)


PAPER = "Vaswani et al. 2021 (HaloNet, Scaling Local Self-Attention for Parameter Efficient Visual Backbones, CVPR)"
register_module(ModuleSpec("halo_attention", HaloAttention, dict(channels=16, num_heads=2, block_size=4, halo_size=1),
                           (2, 5, 6, 16), kind="image", paper=PAPER))
register_module(ModuleSpec("halo_attention_stride2", HaloAttention,
                           dict(channels=16, out_channels=8, num_heads=2, block_size=4, halo_size=2, stride=2),
                           lambda key: (jax.random.normal(key, (2, 5, 6, 16)),), kind="other", paper=PAPER))
