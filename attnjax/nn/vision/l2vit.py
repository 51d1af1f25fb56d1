"""L²ViT's linear global attention (LGA), local concentration module (LCM), local window attention (LWA) and
blocks, as Flax NNX modules on NHWC maps (core: ``attnjax.vision.l2vit``, ``attnjax.vision.window``).

Zheng, "The Linear Attention Resurrection in Vision Transformer", arXiv 2501.16182 (2025), sec. 3; official code
ChuanyangZheng/L2ViT ``classification/models/l2vit.py`` (``LinearAttention``, ``LCM``, ``WindowAttention``,
``LGABlock``, ``LWABlock``, ``CPE``), whose parameter names are kept. The paper's text beyond its abstract was not
available here; the structure follows the official code. A stage alternates the two blocks, local first
(``build_block('mix_local_enhanced_vit', index)``: even index LWA, odd index LGA).
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
from attnjax.nn.vision.swin import TransformerMLP
from attnjax.vision.l2vit import DENOMINATOR_FLOOR, linear_global_attention, local_concentration
from attnjax.vision.large_kernel import depthwise_conv
from attnjax.vision.window import Window, window_attention, window_attention_inputs, window_shape

EPSILON = 1e-5
"""``ε`` of the blocks' LayerNorms and the LCM's BatchNorm: PyTorch's default, which the official code keeps."""
MOMENTUM = 0.9
"""The LCM BatchNorm's running-statistics momentum in flax's convention (PyTorch's default 0.1)."""
ATTENTIONS = ("local", "global")
"""``L2ViTBlock``'s token mixer: local window attention (LWA) or linear global attention with the LCM (LGA)."""


def depthwise(channels: int, kernel_size: int, common: dict) -> nnx.Conv:
    """A depth-wise ``k × k`` ``nnx.Conv`` with bias, holding a ``[k, k, 1, C]`` kernel."""
    check_positive(kernel_size=kernel_size)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (the convolution keeps H and W), got {kernel_size}")
    return nnx.Conv(channels, channels, (kernel_size, kernel_size), feature_group_count=channels, **common)


def conditional_position_encoding(conv: nnx.Conv, x: jax.Array) -> jax.Array:
    """L²ViT's CPE (official ``CPE`` with ``act=False``): ``x + DWConv₃ₓ₃(x)``."""
    return x + depthwise_conv(x, conv.kernel[...].astype(x.dtype), conv.bias[...].astype(x.dtype))


class LinearGlobalAttention(nnx.Module):
    """L²ViT's linear global attention (sec. 3; official ``LinearAttention``) over the whole map::

        Q, K, V = x W_qkv + b_qkv
        O_h = τ_h · ReLU(Q_h)(ReLU(K_h)ᵀV_h) / max(ReLU(Q_h)(ReLU(K_h)ᵀ1), c)         c = 100
        y = concat_h(O_h) W_proj + b_proj

    with a learned per-head temperature ``τ`` (initialized to ``1/√d``). Right product first
    (``attnjax.vision.l2vit.linear_global_attention``): O(H·W·C·d), no ``[HW, HW]`` array.

    Example::

      lga = LinearGlobalAttention(96, 3, rngs=nnx.Rngs(0))
      y = lga(x)                                                  # x, y: [B, H, W, 96]

    Parameters: ``3C² + 3C`` (qkv) ``+ heads`` (temperature) ``+ C² + C`` (proj).

    Args:
      channels: ``C``; num_heads: heads, ``d = C // num_heads`` unless ``head_dim`` is given.
      qkv_bias: biases in ``qkv`` (True in L²ViT's blocks).
      denominator_floor: ``c`` (the official clamp, 100).
      head_dim: channels per head.
      dtype: computation dtype; param_dtype: parameter dtype. The output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (flax's defaults).
    """

    def __init__(self, channels: int, num_heads: int, *, qkv_bias: bool = True,
                 denominator_floor: float = DENOMINATOR_FLOOR, head_dim: Optional[int] = None,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        self.head_dim = resolve_head_dim(channels, num_heads, head_dim)
        if not (isinstance(denominator_floor, (int, float)) and denominator_floor > 0):
            raise ValueError(f"denominator_floor must be a positive number, got {describe(denominator_floor)}")
        self.channels, self.num_heads, self.denominator_floor = channels, num_heads, float(denominator_floor)
        inner = num_heads * self.head_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * inner, use_bias=qkv_bias, **common)
        self.temperature = nnx.Param(jnp.full((num_heads,), self.head_dim ** -0.5, param_dtype))
        self.proj = nnx.Linear(inner, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, H, W, 3 * self.num_heads, self.head_dim), 3, axis=3)
        o = linear_global_attention(q, k, v, self.temperature[...], denominator_floor=self.denominator_floor)
        return self.proj(o.reshape(B, H, W, self.num_heads * self.head_dim)).astype(x.dtype)


class LocalConcentration(nnx.Module):
    """L²ViT's local concentration module (sec. 3; official ``LCM``): ``conv2(BN(GELU(conv1(x))))``, two
    depth-wise ``k × k`` convolutions with biases (``k = 7``), exact GELU and a BatchNorm between them
    (``attnjax.vision.l2vit.local_concentration``). It sharpens the dispersed weights of linear attention with
    local context. Training mode uses batch statistics (call it through ``nnx.jit``); ``model.eval()`` for inference.

    Parameters: ``2·(k²C + C)`` (two convolutions) ``+ 2C`` (BatchNorm).

    Args:
      channels: ``C``; kernel_size: ``k``, odd (7).
      use_running_average: the BatchNorm's inference mode (``model.eval()`` sets it).
      dtype, param_dtype, rngs: as ``LinearGlobalAttention``.
    """

    def __init__(self, channels: int, *, kernel_size: int = 7, use_running_average: bool = False,
                 dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels)
        self.channels = channels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = depthwise(channels, kernel_size, common)
        self.bn = nnx.BatchNorm(channels, use_running_average=use_running_average, momentum=MOMENTUM,
                                epsilon=EPSILON, **common)
        self.conv2 = depthwise(channels, kernel_size, common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        weights = [a[...].astype(x.dtype) for a in (self.conv1.kernel, self.conv1.bias, self.conv2.kernel,
                                                    self.conv2.bias)]
        return local_concentration(x, *weights, norm=lambda h: self.bn(h).astype(x.dtype))


class LocalWindowAttention(nnx.Module):
    """L²ViT's local window attention (official ``WindowAttention``): softmax attention inside non-overlapping
    ``M × M`` windows, ``softmax(Q Kᵀ/√d) V`` per head, with ``qkv`` and ``proj`` linear layers and no relative
    position bias (the blocks' CPE carries position) and no shift (``attnjax.vision.window.window_attention``).

    Maps that are not multiples of ``M`` are zero-padded at the bottom and right, as in the official code; here
    the padded keys are masked out (the official code lets them in as keys projected from zeros).

    Parameters: ``3C² + 3C`` (qkv) ``+ C² + C`` (proj).

    Args:
      channels, num_heads, qkv_bias, head_dim, dtype, param_dtype, rngs: as ``LinearGlobalAttention``.
      window_size: ``M`` or ``(Mh, Mw)`` (7 in L²ViT).
    """

    def __init__(self, channels: int, num_heads: int, *, window_size: Window = 7, qkv_bias: bool = True,
                 head_dim: Optional[int] = None, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        self.head_dim = resolve_head_dim(channels, num_heads, head_dim)
        self.window_size = window_shape(window_size, "window_size")
        self.channels, self.num_heads = channels, num_heads
        inner = num_heads * self.head_dim
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.qkv = nnx.Linear(channels, 3 * inner, use_bias=qkv_bias, **common)
        self.proj = nnx.Linear(inner, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, _ = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(B, H, W, 3 * self.num_heads, self.head_dim), 3, axis=3)
        if is_capturing():
            qw, kw, mask, bias = window_attention_inputs(q, k, window_size=self.window_size)
            sow_attention_inputs(self, qw, kw, mask=mask, bias=bias, scale=None, mechanism="softmax")
        o = window_attention(q, k, v, window_size=self.window_size)
        return self.proj(o.reshape(B, H, W, self.num_heads * self.head_dim)).astype(x.dtype)


class L2ViTBlock(nnx.Module):
    """An L²ViT block: local window attention (LWA) or linear global attention with the LCM (LGA).

    ``attention="local"`` (official ``LWABlock``) and ``attention="global"`` (official ``LGABlock``,
    ``enhanced=True``)::

        local:   x ← CPE₁(x);  x ← x + LWA(LN₁(x));  x ← CPE₂(x);  x ← x + MLP(LN₂(x))
        global:  x ← CPE₁(x);  x ← x + LGA(LN₁(x));  x ← x + LCM(LN₃(x));  x ← x + MLP(LN₂(x))

    with ``CPE(x) = x + DWConv₃ₓ₃(x)``. Stack them alternating, local first, as L²ViT's stages do::

      blocks = [L2ViTBlock(96, 3, attention=ATTENTIONS[i % 2], rngs=nnx.Rngs(i)) for i in range(2)]

    Parameters: ``9C + C`` per CPE, ``2C`` per LayerNorm, ``TransformerMLP``'s, and ``LocalWindowAttention``'s
    (local: two CPEs, two LayerNorms) or ``LinearGlobalAttention``'s plus ``LocalConcentration``'s (global: one
    CPE, three LayerNorms).

    Args:
      channels, num_heads, qkv_bias, head_dim: as ``LinearGlobalAttention``.
      attention: one of ``ATTENTIONS``.
      window_size: LWA's window (7).
      mlp_ratio: the MLP's hidden units per channel (4).
      lcm_kernel_size: the LCM's depth-wise kernel (7).
      denominator_floor: LGA's ``c`` (100).
      use_running_average: the LCM BatchNorm's inference mode (``model.eval()`` sets it).
      dtype, param_dtype, rngs: as ``LinearGlobalAttention``. Left out: stochastic depth (drop path).
    """

    def __init__(self, channels: int, num_heads: int, *, attention: str, window_size: Window = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, lcm_kernel_size: int = 7,
                 denominator_floor: float = DENOMINATOR_FLOOR, head_dim: Optional[int] = None,
                 use_running_average: bool = False, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(channels=channels)
        if attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {describe(attention)}")
        self.channels, self.attention = channels, attention
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cpe1 = depthwise(channels, 3, common)
        self.norm1 = nnx.LayerNorm(channels, epsilon=EPSILON, **common)
        if attention == "local":
            self.attn = LocalWindowAttention(channels, num_heads, window_size=window_size, qkv_bias=qkv_bias,
                                             head_dim=head_dim, **common)
            self.cpe2 = depthwise(channels, 3, common)
        else:
            self.attn = LinearGlobalAttention(channels, num_heads, qkv_bias=qkv_bias,
                                              denominator_floor=denominator_floor, head_dim=head_dim, **common)
            self.norm3 = nnx.LayerNorm(channels, epsilon=EPSILON, **common)
            self.local_mp = LocalConcentration(channels, kernel_size=lcm_kernel_size,
                                               use_running_average=use_running_average, **common)
        self.norm2 = nnx.LayerNorm(channels, epsilon=EPSILON, **common)
        self.mlp = TransformerMLP(channels, mlp_ratio=mlp_ratio, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        x = conditional_position_encoding(self.cpe1, x)
        x = x + self.attn(self.norm1(x).astype(x.dtype))
        if self.attention == "local":
            x = conditional_position_encoding(self.cpe2, x)
        else:
            x = x + self.local_mp(self.norm3(x).astype(x.dtype))
        return x + self.mlp(self.norm2(x).astype(x.dtype)).astype(x.dtype)


PAPER = "Zheng 2025 (L2ViT, arXiv 2501.16182)"
register_module(ModuleSpec("l2vit_linear_global_attention", LinearGlobalAttention, dict(channels=8, num_heads=2),
                           (2, 5, 7, 8), kind="image", paper=PAPER))
# Eval mode: a training-mode BatchNorm updates its running statistics, which the conformance suite's closures and
# Linen bridge cannot hold; training mode is tested under nnx.jit in tests/nn/vision/test_l2vit.py.
register_module(ModuleSpec("l2vit_local_concentration", LocalConcentration,
                           dict(channels=8, kernel_size=3, use_running_average=True), (2, 5, 7, 8), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("l2vit_local_window_attention", LocalWindowAttention,
                           dict(channels=8, num_heads=2, window_size=3), (2, 5, 7, 8), kind="image", paper=PAPER))
register_module(ModuleSpec("l2vit_block_global", L2ViTBlock, dict(channels=8, num_heads=2, attention="global",
                                                                  lcm_kernel_size=3, use_running_average=True),
                           (2, 5, 7, 8), kind="image", paper=PAPER))
register_module(ModuleSpec("l2vit_block_local", L2ViTBlock, dict(channels=8, num_heads=2, attention="local",
                                                                 window_size=3), (2, 5, 7, 8),
                           kind="image", paper=PAPER))
