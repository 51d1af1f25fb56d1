"""TransNeXt's aggregated attention, convolutional GLU and block as Flax NNX modules on NHWC feature maps
(functional core: ``attnjax.vision.aggregated_attention``).

Shi, "TransNeXt: Robust Foveal Visual Perception for Vision Transformers", CVPR 2024; official code
DaiShiResearch/TransNeXt (``AggregatedAttention`` in ``classification/attention_native.py``;
``ConvolutionalGLU`` and ``Block`` in ``classification/transnext.py``).

Everything that depends on the feature map's size (the pooled grid ``(H // sr_ratio, W // sr_ratio)``, the
border mask, ``log N`` and the position-bias coordinates) is computed from the input at trace time, as the
official detection code's ``is_extrapolation=True`` mode does, so one module serves any input size.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive
from attnjax.nn.checks import check_image, resolve_head_dim
from attnjax.nn.conv.metamixer import layer_weights
from attnjax.nn.registry import ModuleSpec, register_module
from attnjax.vision.aggregated_attention import (INITIAL_TEMPERATURE, adaptive_avg_pool, aggregated_attention,
                                                 conv_glu, pooled_relative_coordinates)
from attnjax.vision.metamixer import gelu

Size = Union[int, tuple[int, int]]


def dense(layer: nnx.Linear, x: jax.Array) -> jax.Array:
    """``x W + b`` of an ``nnx.Linear`` in ``x``'s dtype."""
    kernel, bias = layer_weights(layer, x.dtype)
    return x @ kernel if bias is None else x @ kernel + bias


def pair(name: str, value: Optional[Size]) -> Optional[tuple[int, int]]:
    """``(h, w)`` from an int or a pair of positive ints (``None`` stays ``None``)."""
    if value is None:
        return None
    values = (value, value) if isinstance(value, int) else tuple(value)
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or a pair (height, width), got {value!r}")
    check_positive(**{f"{name}[{i}]": v for i, v in enumerate(values)})
    return values


class AggregatedAttention(nnx.Module):
    """TransNeXt's aggregated attention (Shi 2024): each pixel attends, with one softmax, to its ``k×k``
    window at full resolution and to ``P`` pooled keys, with a query embedding, learnable tokens,
    length-scaled cosine attention and relative position biases (``attnjax.vision.aggregated_attention``).

    ``q = x W_q``; ``[k, v] = x W_kv``; ``x_p = LayerNorm(AdaptiveAvgPool(GELU(x W_sr + b_sr)))``,
    ``[k_p, v_p] = x_p W_kv``; the pooled-key bias is ``MLP(coordinates)`` (2 → 512 → heads, ReLU);
    ``y = aggregated_attention(...) W_o + b_o``.

    Example::

      attn = AggregatedAttention(64, num_heads=2, rngs=nnx.Rngs(0))
      y = attn(x)                                    # x, y: [B, H, W, 64], H and W at least sr_ratio = 8

    Parameters (``qkv_bias``, ``D = C / heads``): ``4C² + 4C`` (q, kv, output) + ``C² + C`` (``W_sr``) + ``2C``
    (LayerNorm) + ``3·512 + 513·heads`` (position MLP) + ``heads`` (temperature) + ``C`` (query embedding)
    + ``heads·k²`` (window bias) + ``C·k² + heads·k²`` (learnable tokens and their bias).

    Args:
      channels: ``C``.
      num_heads: heads (8, the official class default; every TransNeXt uses ``C / heads`` = 24).
      window_size: ``k``, odd (3 in every TransNeXt).
      sr_ratio: the pooled grid is ``(H // sr_ratio, W // sr_ratio)`` (8 in stage 1, then 4, 2; the default is
        stage 1's).
      fixed_pool_size: a fixed pooled grid instead (int or ``(ph, pw)``; the official ``fixed_pool_size``).
      qkv_bias: biases in the query and key-value projections (``True`` in every TransNeXt).
      pretrain_size: the feature map size ``(H, W)`` at pre-training, which normalizes the position-bias
        coordinates (``None``: the input's size).
      cpb_hidden: the position MLP's width (512).
      layer_norm_epsilon: of the pooled features' LayerNorm (1e-5, ``torch.nn.LayerNorm``'s default).
      dtype, param_dtype: computation and parameter dtypes (the output takes ``x``'s dtype; the attention
        runs in float32).
      rngs: ``params`` initializes the layers (flax defaults) and the learnable tensors (the official
        initialization: truncated normals of std 0.02 for the query embedding and tokens, 4e-4 for the window
        bias, zeros for the tokens' bias, ``softplus⁻¹(1/0.24)`` for the temperature).
    """

    def __init__(self, channels: int, *, num_heads: int = 8, window_size: int = 3, sr_ratio: int = 8,
                 fixed_pool_size: Optional[Size] = None, qkv_bias: bool = True, pretrain_size: Optional[Size] = None,
                 cpb_hidden: int = 512, layer_norm_epsilon: float = 1e-5, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        head_dim = resolve_head_dim(channels, num_heads, None)
        check_positive(window_size=window_size, sr_ratio=sr_ratio, cpb_hidden=cpb_hidden)
        if window_size % 2 == 0:
            raise ValueError(f"window_size must be odd, got {window_size}")
        self.channels, self.num_heads, self.head_dim = channels, num_heads, head_dim
        self.window_size, self.sr_ratio = window_size, sr_ratio
        self.fixed_pool_size = pair("fixed_pool_size", fixed_pool_size)
        self.pretrain_size = pair("pretrain_size", pretrain_size)
        linear = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = nnx.Linear(channels, channels, use_bias=qkv_bias, **linear)
        self.kv = nnx.Linear(channels, 2 * channels, use_bias=qkv_bias, **linear)
        self.proj = nnx.Linear(channels, channels, **linear)
        self.sr = nnx.Linear(channels, channels, **linear)
        self.norm = nnx.LayerNorm(channels, epsilon=layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                                  rngs=rngs)
        self.cpb_fc1 = nnx.Linear(2, cpb_hidden, **linear)
        self.cpb_fc2 = nnx.Linear(cpb_hidden, num_heads, **linear)
        local = window_size * window_size
        normal = nnx.initializers.truncated_normal
        self.temperature = nnx.Param(jnp.full((num_heads,), math.log(math.expm1(INITIAL_TEMPERATURE)), param_dtype))
        self.query_embedding = nnx.Param(normal(0.02)(rngs.params(), (num_heads, head_dim), param_dtype))
        self.local_bias = nnx.Param(normal(4e-4)(rngs.params(), (num_heads, local), param_dtype))
        self.learnable_tokens = nnx.Param(normal(0.02)(rngs.params(), (num_heads, head_dim, local), param_dtype))
        self.learnable_bias = nnx.Param(jnp.zeros((num_heads, local), param_dtype))

    def pool_size(self, height: int, width: int) -> tuple[int, int]:
        """The pooled grid ``(ph, pw)`` for an ``H×W`` input; ``ValueError`` if it would be empty or larger."""
        size = self.fixed_pool_size or (height // self.sr_ratio, width // self.sr_ratio)
        if not (1 <= size[0] <= height and 1 <= size[1] <= width):
            source = f"fixed_pool_size={self.fixed_pool_size}" if self.fixed_pool_size else f"sr_ratio={self.sr_ratio}"
            raise ValueError(f"x's height and width {[height, width]} give a pooled grid {list(size)} with {source}; "
                             "it must be at least 1x1 and at most the input")
        return size

    def position_bias(self, height: int, width: int, pool: tuple[int, int]) -> jax.Array:
        """The pooled keys' continuous position bias ``[H, W, heads, P]``: the MLP on the distinct relative
        coordinates, gathered per (query, pooled key)."""
        index, table = pooled_relative_coordinates((height, width), pool, self.pretrain_size)
        bias = self.cpb_fc2(jax.nn.relu(self.cpb_fc1(jnp.asarray(table))))
        return jnp.transpose(bias[index].reshape(height, width, pool[0] * pool[1], self.num_heads), (0, 1, 3, 2))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        pool = self.pool_size(H, W)
        heads = (self.num_heads, self.head_dim)
        k, v = jnp.split(dense(self.kv, x), 2, axis=-1)
        pooled = adaptive_avg_pool(gelu(dense(self.sr, x)), pool).reshape(B, pool[0] * pool[1], C)
        k_pool, v_pool = jnp.split(dense(self.kv, self.norm(pooled).astype(x.dtype)), 2, axis=-1)
        out = aggregated_attention(
            dense(self.q, x).reshape(B, H, W, *heads), k.reshape(B, H, W, *heads), v.reshape(B, H, W, *heads),
            k_pool.reshape(B, -1, *heads), v_pool.reshape(B, -1, *heads),
            query_embedding=self.query_embedding[...], temperature=self.temperature[...],
            local_bias=self.local_bias[...], pool_bias=self.position_bias(H, W, pool),
            learnable_tokens=self.learnable_tokens[...], learnable_bias=self.learnable_bias[...],
            window=self.window_size)
        return dense(self.proj, out.reshape(B, H, W, C))


class ConvGLU(nnx.Module):
    """TransNeXt's convolutional GLU (Shi 2024; official ``ConvolutionalGLU``):
    ``[g, u] = x W₁ + b₁``, ``y = (GELU(DWConv₃ₓ₃(g)) ⊙ u) W₂ + b₂``.

    The hidden width is ``E = int(2·int(C·mlp_ratio)/3)``, so that it has about the parameters of an MLP
    with ratio ``mlp_ratio``. Parameters: ``2CE + 2E`` (``fc1``) + ``10E`` (3×3 depthwise) + ``EC + C`` (``fc2``).

    Args:
      channels: ``C`` (input and output).
      mlp_ratio: of the MLP it replaces (4, the official ``Block`` default; TransNeXt uses 8, 8, 4, 4 per stage).
      dtype, param_dtype: computation and parameter dtypes.
      rngs: ``params`` initializes the layers (flax defaults).
    """

    def __init__(self, channels: int, *, mlp_ratio: float = 4.0, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        hidden = int(2 * int(channels * mlp_ratio) / 3)
        if hidden < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} gives no hidden units for {channels} channels")
        self.channels, self.hidden = channels, hidden
        self.fc1 = nnx.Linear(channels, 2 * hidden, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.dwconv = nnx.Conv(hidden, hidden, (3, 3), padding="SAME", feature_group_count=hidden, dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        weights = [p for layer in (self.fc1, self.dwconv, self.fc2)
                   for p in (layer.kernel[...].astype(x.dtype), layer.bias[...].astype(x.dtype))]
        return conv_glu(x, *weights)


class TransNeXtBlock(nnx.Module):
    """A TransNeXt block (Shi 2024; official ``Block`` with ``sr_ratio > 1``), pre-norm residual:
    ``x ← x + AggregatedAttention(LN(x))``, then ``x ← x + ConvGLU(LN(x))``.

    Args:
      channels, num_heads, window_size, sr_ratio, fixed_pool_size, qkv_bias, pretrain_size: as
        ``AggregatedAttention``.
      mlp_ratio: as ``ConvGLU``.
      layer_norm_epsilon: of the two pre-norms (1e-6 in every TransNeXt).
      dtype, param_dtype, rngs: as ``AggregatedAttention``.
    """

    def __init__(self, channels: int, *, num_heads: int = 8, window_size: int = 3, sr_ratio: int = 8,
                 fixed_pool_size: Optional[Size] = None, qkv_bias: bool = True, pretrain_size: Optional[Size] = None,
                 mlp_ratio: float = 4.0, layer_norm_epsilon: float = 1e-6, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.channels = channels
        self.norm1 = nnx.LayerNorm(channels, epsilon=layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.attn = AggregatedAttention(channels, num_heads=num_heads, window_size=window_size, sr_ratio=sr_ratio,
                                        fixed_pool_size=fixed_pool_size, qkv_bias=qkv_bias,
                                        pretrain_size=pretrain_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm2 = nnx.LayerNorm(channels, epsilon=layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.mlp = ConvGLU(channels, mlp_ratio=mlp_ratio, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        return x + self.mlp(self.norm2(x).astype(x.dtype))


PAPER = "Shi 2024, TransNeXt: Robust Foveal Visual Perception for Vision Transformers (CVPR)"
register_module(ModuleSpec("aggregated_attention", AggregatedAttention, dict(channels=16, num_heads=2, sr_ratio=2),
                           (2, 5, 6, 16), kind="image", paper=PAPER))
register_module(ModuleSpec("conv_glu", ConvGLU, dict(channels=16), (2, 5, 6, 16), kind="image", paper=PAPER))
register_module(ModuleSpec("transnext_block", TransNeXtBlock, dict(channels=16, num_heads=2, sr_ratio=2),
                           (2, 5, 6, 16), kind="image", paper=PAPER))
