"""Swin Transformer's (shifted) window attention and block as Flax NNX modules on NHWC maps.

Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", ICCV 2021, sec. 3.1-3.2:
a Transformer block whose multi-head self-attention works inside non-overlapping ``M × M`` windows (W-MSA) and,
in every other block, inside windows shifted by ``⌊M/2⌋`` (SW-MSA), with a learned relative position bias
(eq. 4). The functional core is ``attnjax.vision.window``; the parameter names and layouts follow the official
code (microsoft/Swin-Transformer ``models/swin_transformer.py``: ``qkv``, ``proj``,
``relative_position_bias_table [(2M − 1)², heads]``), so that its weights load without reshaping.
``WindowAttention`` with ``partition="grid"`` is MaxViT's grid attention (``attnjax.nn.vision.maxvit``).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.nn.capture import is_capturing, sow_attention_inputs
from attnjax.nn.checks import check_image, resolve_head_dim
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.window import (PARTITIONS, Window, grid_attention, grid_attention_inputs, window_attention,
                                   window_attention_inputs, window_shape, window_shape_or_zero)

LAYER_NORM_EPSILON = 1e-5
"""PyTorch's ``nn.LayerNorm`` default, which the official Swin and MaxViT (PyTorch ports) keep."""


class WindowAttention(nnx.Module):
    """Multi-head self-attention within windows with a learned relative position bias (Swin, sec. 3.2, eq. 4)::

        Attention(Q, K, V) = SoftMax(Q·Kᵀ/√d + B)·V        inside each M × M window (or grid group)

    ``Q, K, V`` come from one ``qkv`` linear layer, ``B = table[relative_position_index]`` from the learned
    ``[(2·Mh − 1)·(2·Mw − 1), heads]`` table, and a ``proj`` linear layer mixes the heads. With ``shift_size``
    the windows are Swin's shifted windows (cyclic shift, masked regions, reverse shift); with
    ``partition="grid"`` the groups are MaxViT's ``G × G`` grids spread over the map (``window_size`` is ``G``).

    Example::

      attn = WindowAttention(96, 3, window_size=7, shift_size=3, rngs=nnx.Rngs(0))
      y = attn(x)                                                  # x, y: [B, H, W, 96]

    Parameters: ``3C² + 3C`` (qkv) + ``C² + C`` (proj) + ``heads·(2Mh − 1)(2Mw − 1)`` (table).

    Args:
      channels: ``C``, the channels of ``x``.
      num_heads: attention heads; ``head_dim = C // num_heads`` unless given.
      window_size: ``M`` or ``(Mh, Mw)`` (7 in Swin and MaxViT).
      shift_size: ``s`` or ``(sh, sw)``, ``0 ≤ s < M`` (window partition only; Swin uses ``⌊M/2⌋`` in odd blocks).
        When the map fits in one window the shift is dropped, as Swin does ("if window size is larger than
        input resolution, we don't partition windows").
      partition: one of ``PARTITIONS``.
      qkv_bias: biases in ``qkv`` (True in Swin).
      head_dim: channels per head (MaxViT fixes 32 and sets ``heads = C / 32``).
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults; the table ``N(0, 0.02²)``, Swin's truncated normal
        without the truncation at ±2, which is 100σ away).
    """

    def __init__(self, channels: int, num_heads: int, *, window_size: Window = 7, shift_size: Window = 0,
                 partition: str = "window", qkv_bias: bool = True, head_dim: Optional[int] = None,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_head_dim(channels, num_heads, head_dim)
        self.window_size = window_shape(window_size, "window_size")
        self.shift_size = window_shape_or_zero(shift_size)
        if partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {PARTITIONS}, got {describe(partition)}")
        if partition == "grid" and any(self.shift_size):
            raise ValueError(f"shift_size applies to partition='window' only, got shift_size={shift_size}")
        if any(s >= w for s, w in zip(self.shift_size, self.window_size)):
            raise ValueError(f"shift_size must be smaller than window_size per axis, got shift_size={shift_size}, "
                             f"window_size={window_size}")
        self.channels, self.num_heads, self.partition = channels, num_heads, partition
        inner = num_heads * self.head_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * inner, use_bias=qkv_bias, **common)
        self.proj = nnx.Linear(inner, channels, **common)
        (mh, mw), init = self.window_size, jax.nn.initializers.normal(0.02)
        self.relative_position_bias_table = nnx.Param(init(rngs.params(), ((2 * mh - 1) * (2 * mw - 1), num_heads),
                                                           param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, H, W, 3 * self.num_heads, self.head_dim), 3, axis=3)
        table = self.relative_position_bias_table[...].astype(q.dtype)
        if self.partition == "grid":
            groups = dict(grid_size=self.window_size, relative_bias_table=table)
            attend, inputs = grid_attention, grid_attention_inputs
        else:
            fits = H <= self.window_size[0] and W <= self.window_size[1]
            groups = dict(window_size=self.window_size, shift_size=(0, 0) if fits else self.shift_size,
                          relative_bias_table=table)
            attend, inputs = window_attention, window_attention_inputs
        if is_capturing():
            qg, kg, mask, bias = inputs(q, k, **groups)
            sow_attention_inputs(self, qg, kg, mask=mask, bias=bias, scale=None, mechanism="softmax")
        o = attend(q, k, v, **groups)
        return self.proj(o.reshape(B, H, W, self.num_heads * self.head_dim)).astype(x.dtype)


class TransformerMLP(nnx.Module):
    """The Transformer MLP ``fc2(GELU(fc1(x)))`` on the last axis, ``int(r·C)`` hidden units (exact GELU, as
    PyTorch's ``nn.GELU`` in Swin's and MaxViT's ``Mlp``). Parameters: ``2·C·E + E + C``."""

    def __init__(self, features: int, *, mlp_ratio: float = 4.0, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        ratio_ok = isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool)
        hidden = int(features * mlp_ratio) if ratio_ok else 0
        if hidden < 1:
            raise ValueError(f"mlp_ratio must be a number with int(mlp_ratio * features) >= 1, got "
                             f"{describe(mlp_ratio)} for features={features}")
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1, self.fc2 = nnx.Linear(features, hidden, **common), nnx.Linear(hidden, features, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [..., C] -> [..., C]``."""
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class SwinBlock(nnx.Module):
    """Swin Transformer block (Liu et al. 2021, sec. 3.1, eq. 3), pre-norm with two residuals::

        x ← x + (S)W-MSA(LN(x))
        x ← x + MLP(LN(x))

    Stack blocks alternating ``shift_size=0`` and ``shift_size=⌊M/2⌋``, as Swin's stages do.

    Example::

      blocks = [SwinBlock(96, 3, shift_size=0 if i % 2 == 0 else 3, rngs=nnx.Rngs(i)) for i in range(2)]
      for block in blocks:
          x = block(x)                                             # x: [B, H, W, 96]

    Parameters: ``WindowAttention``'s plus ``4C`` (two LayerNorms) plus ``TransformerMLP``'s.

    Args:
      channels, num_heads, window_size, shift_size, partition, qkv_bias, head_dim: as ``WindowAttention``.
      mlp_ratio: the MLP's hidden units per channel (4 in the paper).
      dtype, param_dtype, rngs: as ``WindowAttention``. Left out: dropout and stochastic depth (drop path).
    """

    def __init__(self, channels: int, num_heads: int, *, window_size: Window = 7, shift_size: Window = 0,
                 partition: str = "window", mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 head_dim: Optional[int] = None, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(channels=channels)
        self.channels = channels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.attn = WindowAttention(channels, num_heads, window_size=window_size, shift_size=shift_size,
                                    partition=partition, qkv_bias=qkv_bias, head_dim=head_dim, **common)
        self.norm2 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.mlp = TransformerMLP(channels, mlp_ratio=mlp_ratio, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        return x + self.mlp(self.norm2(x)).astype(x.dtype)


PAPER = "Liu et al. 2021 (Swin Transformer, ICCV)"
register_module(ModuleSpec("swin_window_attention", WindowAttention, dict(channels=8, num_heads=2, window_size=3,
                                                                         shift_size=1), (2, 5, 7, 8),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("transformer_mlp", TransformerMLP, dict(features=8), (2, 5, 8), kind="other",
                           paper="Vaswani et al. 2017 (Transformer, sec. 3.3); GELU as Swin's and MaxViT's Mlp"))
register_module(ModuleSpec("swin_block", SwinBlock, dict(channels=8, num_heads=2, window_size=3), (2, 6, 6, 8),
                           kind="image", paper=PAPER))
register_module(ModuleSpec("swin_block_shifted", SwinBlock, dict(channels=8, num_heads=2, window_size=3, shift_size=1),
                           (2, 5, 7, 8), kind="image", paper=PAPER))
