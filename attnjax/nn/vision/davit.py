"""DaViT's channel group attention and dual-attention block as Flax NNX modules on NHWC feature maps.

Ding et al., "DaViT: Dual Attention Vision Transformers", ECCV 2022, sec. 3 (functional core of the channel
attention: ``attnjax.vision.channel_attention``; of the window attention: ``attnjax.vision.window``). Parameter
names follow the official code (dingmyu/davit ``timm/models/davit.py``: ``ChannelAttention``, ``WindowAttention``,
``ConvPosEnc``, ``SpatialBlock``, ``ChannelBlock``: ``qkv``, ``proj``, ``cpe``, ``norm1``, ``attn``, ``norm2``,
``mlp.fc1``, ``mlp.fc2``) so that its weights load without reshaping.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_image, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.nn.vision.swin import LAYER_NORM_EPSILON, TransformerMLP
from attnjax.vision.channel_attention import channel_group_attention
from attnjax.vision.window import Window, window_attention, window_attention_inputs, window_shape


class ChannelAttention(nnx.Module):
    """Channel group attention (DaViT, sec. 3.2; official ``ChannelAttention``)::

        q, k, v = x W_qkv + b_qkv                       # each [N, C], split into G groups of C_g = C/G channels
        A_g = softmax(C_g^{-1/2} · k_gᵀ v_g)             # [C_g, C_g], softmax over the last axis
        y = concat_g((A_g q_gᵀ)ᵀ) W_proj + b_proj

    In the paper's notation ``A_g = softmax(Q_gᵀ K_g / √C_g)`` and ``out_g = (A_g V_gᵀ)ᵀ``: the official code's
    ``k``, ``v`` and ``q`` (the 2nd, 3rd and 1st thirds of ``qkv``) play the paper's ``Q``, ``K`` and ``V``. This
    module keeps the official roles, so that its weights load; the layer's function is the same either way up to
    a permutation of ``qkv``'s output blocks. Cost ``O(N·C·C_g)``: linear in the number of pixels ``N = H·W``.

    Example::

      attn = ChannelAttention(96, 3, rngs=nnx.Rngs(0))
      y = attn(x)                                                  # x, y: [B, H, W, 96]

    Parameters: ``3C² + 3C`` (qkv; ``3C²`` without ``qkv_bias``) + ``C² + C`` (proj).

    Args:
      channels: ``C``.
      num_heads: ``G``, the channel groups (3, 6, 12, 24 in DaViT-Tiny's stages: ``C_g = 32``).
      qkv_bias: biases in ``qkv`` (True in every DaViT model).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, channels: int, num_heads: int = 8, *, qkv_bias: bool = True, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_head_dim(channels, num_heads, None)
        self.channels, self.num_heads = channels, num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, use_bias=qkv_bias, **common)
        self.proj = nnx.Linear(channels, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, H * W, 3 * self.num_heads, self.head_dim), 3, axis=2)
        if is_capturing():  # the channel tokens it attends with: official k over v's channels, head dim = the N pixels
            sow_attention_inputs(self, jnp.transpose(k, (0, 3, 2, 1)), jnp.transpose(v, (0, 3, 2, 1)), mask=None,
                                 scale=self.head_dim ** -0.5, mechanism="softmax")
        o = channel_group_attention(k, v, q)
        return self.proj(o.reshape(B, H, W, C)).astype(x.dtype)


class SpatialWindowAttention(nnx.Module):
    """DaViT's window attention (sec. 3.1; official ``WindowAttention``): multi-head softmax attention
    inside non-overlapping ``M × M`` windows, ``y = concat_h(softmax(Q_h K_hᵀ/√d) V_h) W_proj + b_proj``, with no
    relative position bias (DaViT's position information comes from ``ConvPosEnc``) and no shift.

    Maps that are not multiples of the window are zero-padded at the bottom and right, as the official code pads;
    the padded keys are masked here (``attnjax.vision.window``), where the official code lets them in (identical
    when ``H`` and ``W`` are multiples of ``M``, as in DaViT's 224² and 384² models).

    Parameters: ``3C² + 3C`` (qkv; ``3C²`` without ``qkv_bias``) + ``C² + C`` (proj).

    Args:
      channels: ``C``; num_heads: heads of ``d = C / heads`` channels.
      window_size: ``M`` or ``(Mh, Mw)`` (7 in DaViT-T/S/B, 12 in DaViT-L at 384²).
      qkv_bias, dtype, param_dtype, rngs: as ``ChannelAttention``.
    """

    def __init__(self, channels: int, num_heads: int, *, window_size: Window = 7, qkv_bias: bool = True,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_head_dim(channels, num_heads, None)
        self.window_size = window_shape(window_size, "window_size")
        self.channels, self.num_heads = channels, num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, use_bias=qkv_bias, **common)
        self.proj = nnx.Linear(channels, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, H, W, 3 * self.num_heads, self.head_dim), 3, axis=3)
        if is_capturing():
            qw, kw, mask, bias = window_attention_inputs(q, k, window_size=self.window_size)
            sow_attention_inputs(self, qw, kw, mask=mask, bias=bias, scale=None, mechanism="softmax")
        o = window_attention(q, k, v, window_size=self.window_size)
        return self.proj(o.reshape(B, H, W, C)).astype(x.dtype)


class ConvPosEnc(nnx.Module):
    """DaViT's convolutional position encoding (official ``ConvPosEnc``): ``x + DWConv_{k×k}(x)``, a depth-wise
    convolution with zero padding ``k // 2`` and a bias. Parameters: ``k²C + C``.

    Args:
      channels: ``C``; kernel_size: ``k`` (3 in DaViT; odd).
      dtype, param_dtype, rngs: as ``ChannelAttention``.
    """

    def __init__(self, channels: int, kernel_size: int = 3, *, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, kernel_size=kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd to keep H and W, got {kernel_size}")
        self.channels = channels
        self.proj = nnx.Conv(channels, channels, (kernel_size, kernel_size), feature_group_count=channels,
                             dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return x + self.proj(x).astype(x.dtype)


class DualAttentionHalf(nnx.Module):
    """One half of a DaViT block (official ``SpatialBlock`` / ``ChannelBlock``), around a token mixer ``attn``::

        x ← CPE₁(x);  x ← x + attn(LN(x));  x ← CPE₂(x);  x ← x + MLP(LN(x))

    Parameters: ``20C`` (two ``ConvPosEnc``) + ``4C`` (two LayerNorms) + the mixer's + ``TransformerMLP``'s.

    Args:
      channels: ``C``; num_heads: the mixer's heads (window attention) or groups (channel attention).
      mixer: ``"spatial"`` (``SpatialWindowAttention``) or ``"channel"`` (``ChannelAttention``).
      window_size: the spatial mixer's window. mlp_ratio: the MLP's hidden units per channel (4 in DaViT).
      qkv_bias, dtype, param_dtype, rngs: as ``ChannelAttention``. Left out: stochastic depth (drop path).
    """

    def __init__(self, channels: int, num_heads: int, mixer: str, *, window_size: Window = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        if mixer == "spatial":
            attn = SpatialWindowAttention(channels, num_heads, window_size=window_size, qkv_bias=qkv_bias, **common)
        elif mixer == "channel":
            attn = ChannelAttention(channels, num_heads, qkv_bias=qkv_bias, **common)
        else:
            raise ValueError(f"mixer must be 'spatial' or 'channel', got {mixer!r}")
        self.channels = channels
        self.cpe = nnx.List([ConvPosEnc(channels, 3, **common), ConvPosEnc(channels, 3, **common)])
        self.norm1 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.attn = attn
        self.norm2 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.mlp = TransformerMLP(channels, mlp_ratio=mlp_ratio, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = self.cpe[0](x)
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        x = self.cpe[1](x)
        return x + self.mlp(self.norm2(x)).astype(x.dtype)


class DaViTBlock(nnx.Module):
    """A DaViT dual-attention block (DaViT, sec. 3 and Fig. 2; the official ``attention_types=("spatial",
    "channel")`` pair): a spatial-window half, then a channel-group half, each ``DualAttentionHalf``::

        x ← CPE(x);  x ← x + WindowAttn(LN(x));   x ← CPE(x);  x ← x + MLP(LN(x))     # spatial tokens, local
        x ← CPE(x);  x ← x + ChannelAttn(LN(x));  x ← CPE(x);  x ← x + MLP(LN(x))     # channel tokens, global

    Both attentions are linear in the number of pixels: ``O(N·M²·C)`` and ``O(N·C·C_g)``.

    Example::

      block = DaViTBlock(96, 3, rngs=nnx.Rngs(0))
      y = block(x)                                                 # x, y: [B, 56, 56, 96]

    Parameters: ``2·(4C² + 4C + 24C + 2CE + E + C)`` with ``E = int(mlp_ratio·C)`` (``-6C`` without ``qkv_bias``).

    Args:
      channels: ``C``; num_heads: the heads of the window attention and the groups of the channel attention
        (DaViT uses one number for both).
      window_size: ``M`` of the window attention (7).
      mlp_ratio: 4 in DaViT. qkv_bias: True in DaViT.
      dtype, param_dtype, rngs: as ``ChannelAttention``. Left out: stochastic depth (drop path).
    """

    def __init__(self, channels: int, num_heads: int, *, window_size: Window = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        common = dict(mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.channels = channels
        self.spatial = DualAttentionHalf(channels, num_heads, "spatial", window_size=window_size, **common)
        self.channel = DualAttentionHalf(channels, num_heads, "channel", **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        return self.channel(self.spatial(x))


PAPER = "Ding et al. 2022 (DaViT, ECCV), sec. 3; official dingmyu/davit"
register_module(ModuleSpec("davit_channel_attention", ChannelAttention, dict(channels=8, num_heads=2),
                           (2, 5, 7, 8), kind="image", paper=PAPER))
register_module(ModuleSpec("davit_window_attention", SpatialWindowAttention, dict(channels=8, num_heads=2, window_size=3),
                           (2, 5, 7, 8), kind="image", paper=PAPER))
register_module(ModuleSpec("davit_conv_pos_enc", ConvPosEnc, dict(channels=8), (2, 5, 7, 8), kind="image", paper=PAPER))
register_module(ModuleSpec("davit_channel_half", DualAttentionHalf, dict(channels=8, num_heads=2, mixer="channel"),
                           (2, 5, 7, 8), kind="image", paper=PAPER))
register_module(ModuleSpec("davit_block", DaViTBlock, dict(channels=8, num_heads=2, window_size=3), (2, 5, 7, 8),
                           kind="image", paper=PAPER))
