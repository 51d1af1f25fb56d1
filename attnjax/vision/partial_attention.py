"""PAT, partial visual attention: attention on part of the channels of a partial convolution (PConv).

Huang et al., "Partial Convolution Meets Visual Attention" (PATNet, arXiv:2503.03148, 2025), the PAT_ch,
PAT_sp and PAT_sf blocks; they are also in the same authors' "Partial Channel Network: Compute Fewer, Perform
Better" (PartialNet, arXiv:2502.01303), whose official code (github.com/haiduo/PartialNet,
``models/partialnet.py``) the formulas here follow for what the block descriptions leave open (normalization
placement, Hard-Sigmoid gates, split sizes, the relative position bias). FasterNet's PConv (Chen et al.,
CVPR 2023) convolves ``C / n`` channels and leaves the rest untouched; PAT gives the untouched channels an
attention branch instead. Channels are split along the last axis,
``x = [x₁, x₂]`` (the code's ``torch.split`` order), and the two results are concatenated back:

* PAT_ch (Partial Channel-Attention): ``x₁ -> Conv3×3``, ``x₂ -> BN(x₂ ⊙ g)`` with the "enhanced Gaussian"
  channel gate ``g = HardSigmoid(BN(W [μ(x₂); σ(x₂)]))`` from each channel's mean and standard deviation
  (SRM's style pooling, Lee et al. ICCV 2019, with a full ``2C₂ -> C₂`` channel mixing ``W``); ``C₁ = C / 4``.
* PAT_sp (Partial Spatial-Attention), at the end of the MLP: ``x₁ -> BN(x₁ ⊙ HardSigmoid(x₁ · w))`` (one
  spatial map from a 1×1 convolution), ``x₂ -> Conv1×1(BN(x₂))``; half the channels each.
* PAT_sf (Partial Self-Attention), in the last stage: ``x₁ -> Conv3×3``, ``x₂ -> MHSA(LN(x₂))``, multi-head
  self-attention over the ``H·W`` positions (``attnjax.attention``) with an iRPE relative position bias
  (Wu et al., "Rethinking and Improving Relative Position Encoding for Vision Transformer", ICCV 2021:
  Euclidean method, bias mode, on keys).

Normalizations are passed in as functions (``None``: identity), so the cores hold no state; the modules in
``attnjax.nn.conv.partial_attention`` pass their BatchNorm / LayerNorm layers. Shapes: ``x [B, H, W, C]``
(NHWC).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.api import attention

Norm = Optional[Callable[[jax.Array], jax.Array]]
"""A normalization ``[B, H, W, C] -> [B, H, W, C]`` (e.g. a BatchNorm layer), or ``None`` for the identity."""


def normalize(norm: Norm, x: jax.Array) -> jax.Array:
    """``norm(x)``, or ``x`` when ``norm`` is ``None``."""
    return x if norm is None else norm(x)


def convolve(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 ``SAME`` convolution without bias: ``x [B, H, W, Cin]``, kernel ``[kh, kw, Cin, Cout]`` (HWIO,
    ``flax.nnx.Conv``'s layout) ``-> [B, H, W, Cout]``."""
    return jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(1, 1), padding="SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def style_pool(x: jax.Array) -> jax.Array:
    """The per-channel Gaussian statistics ``[μ; σ]`` of PAT_ch's gate (SRM's style pooling, Lee et al. 2019):
    ``x [B, H, W, C] -> [B, 1, 1, 2C]``, means first.

    ``σ`` is the standard deviation over the ``H·W`` positions with Bessel's correction (``torch.std`` in the
    official code; ``H·W >= 2``), computed in float32; a constant channel has ``σ = 0`` and a zero gradient
    there (not the ``0/0`` of differentiating ``sqrt`` at 0).
    """
    mean = jnp.mean(x, axis=(1, 2), keepdims=True, dtype=jnp.float32)
    var = jnp.var(x.astype(jnp.float32), axis=(1, 2), keepdims=True, ddof=1)
    positive = var > 0
    std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
    return jnp.concatenate([mean, std], axis=-1).astype(x.dtype)


def gaussian_channel_gate(x: jax.Array, weight: jax.Array, norm: Norm = None) -> jax.Array:
    """PAT_ch's channel gate ``g = HardSigmoid(norm(W [μ(x); σ(x)]))``.

    Args:
      x: ``[B, H, W, C]``, ``H·W >= 2``.
      weight: ``W [2C, C]``, rows ``0..C-1`` read the means, rows ``C..2C-1`` the standard deviations (the
        official code's ``Conv2d(C, C, kernel_size=(1, 2), bias=False)`` on ``[μ, σ]``).
      norm: applied to ``W [μ; σ]`` ``[B, 1, 1, C]`` before the gate (BatchNorm in the official code).

    Returns:
      ``g [B, 1, 1, C]`` in ``[0, 1]``.
    """
    return jax.nn.hard_sigmoid(normalize(norm, style_pool(x) @ weight.astype(x.dtype)))


def partial_channel_attention(x: jax.Array, conv_kernel: jax.Array, gate_weight: jax.Array, *,
                              gate_norm: Norm = None, out_norm: Norm = None) -> jax.Array:
    """PAT_ch: ``[Conv3×3(x₁), out_norm(x₂ ⊙ gaussian_channel_gate(x₂))]`` (Huang et al. 2025, PAT_ch).

    Args:
      x: ``[B, H, W, C]``; ``x₁ = x[..., :C₁]`` is convolved, ``x₂ = x[..., C₁:]`` attended.
      conv_kernel: ``[3, 3, C₁, C₁]``, the partial convolution (no bias); ``C₁`` is read from it.
      gate_weight: ``[2C₂, C₂]``, ``C₂ = C - C₁`` (``gaussian_channel_gate``).
      gate_norm, out_norm: the gate's normalization and the one after the gating (both BatchNorm in the
        official code, ``SRM.bn`` and ``Partial_conv3.norm``).

    Returns:
      ``[B, H, W, C]``.
    """
    c1 = conv_kernel.shape[-1]
    x1, x2 = x[..., :c1], x[..., c1:]
    y2 = normalize(out_norm, x2 * gaussian_channel_gate(x2, gate_weight, gate_norm))
    return jnp.concatenate([convolve(x1, conv_kernel), y2.astype(x.dtype)], axis=-1)


def partial_spatial_attention(x: jax.Array, attn_weight: jax.Array, conv_kernel: jax.Array, *,
                              attn_norm: Norm = None, conv_norm: Norm = None) -> jax.Array:
    """PAT_sp: ``[attn_norm(x₁ ⊙ HardSigmoid(x₁ · w)), conv_norm(x₂) · W]`` (Huang et al. 2025, PAT_sp;
    the official ``partial_spatial_attn_layer_reverse``).

    Args:
      x: ``[B, H, W, C]``; ``x₁ = x[..., :C - C₂]`` gets the spatial gate, ``x₂ = x[..., C - C₂:]`` the 1×1
        convolution.
      attn_weight: ``w [C - C₂]``, the 1×1 convolution to one spatial map (no bias).
      conv_kernel: ``W [C₂, C₂]``, the 1×1 convolution (no bias); ``C₂`` is read from it.
      attn_norm, conv_norm: the normalizations after the gating and before the convolution (BatchNorm in the
        official code).

    Returns:
      ``[B, H, W, C]``.
    """
    c2 = conv_kernel.shape[-1]
    x1, x2 = x[..., :x.shape[-1] - c2], x[..., x.shape[-1] - c2:]
    gate = jax.nn.hard_sigmoid(jnp.einsum("bhwc,c->bhw", x1, attn_weight.astype(x.dtype)))[..., None]
    y1 = normalize(attn_norm, x1 * gate)
    y2 = normalize(conv_norm, x2) @ conv_kernel.astype(x.dtype)
    return jnp.concatenate([y1.astype(x.dtype), y2.astype(x.dtype)], axis=-1)


def rpe_bucket_count(ratio: float) -> int:
    """The buckets of an iRPE table with ``β = 2·ratio``: ``2⌊β⌋ + 1`` (the official ``get_num_buckets``)."""
    return 2 * int(2 * ratio) + 1


def euclidean_rpe_buckets(height: int, width: int, ratio: float) -> np.ndarray:
    """iRPE's Euclidean bucket of every pair of positions, ``[H·W, H·W]`` int (Wu et al. 2021, eq. 18, the
    piecewise index).

    The distance ``d = round(‖p_i - p_j‖₂)`` (row-major positions) maps to ``d`` for ``d <= α`` and to
    ``min(β, round(α + ln(d/α) / ln(γ/α) · (β - α)))`` beyond, offset by ``⌊β⌋``; ``α, β, γ = ratio·(1, 2, 8)``
    (``get_rpe_config`` in the official code; PATNet uses ``ratio = 20``). Static: computed with NumPy from the
    shape.
    """
    alpha, beta, gamma = ratio, 2 * ratio, 8 * ratio
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    pos = np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.float64)
    dist = np.round(np.sqrt(np.sum((pos[:, None, :] - pos[None, :, :]) ** 2, axis=-1)))
    far = np.minimum(beta, np.round(alpha + np.log(np.maximum(dist, alpha) / alpha) / math.log(gamma / alpha)
                                    * (beta - alpha)))
    return (np.where(dist <= alpha, dist, far) + int(beta)).astype(np.int32)


def relative_position_bias(table: jax.Array, height: int, width: int, ratio: float) -> jax.Array:
    """The iRPE bias ``b[h, i, j] = table[h, bucket(i, j)]`` (Wu et al. 2021, bias mode on keys).

    Args:
      table: ``[heads, rpe_bucket_count(ratio)]``, one learned scalar per head and bucket.
      height, width: the feature map's size.
      ratio: iRPE's scale of ``α, β, γ`` (``euclidean_rpe_buckets``).

    Returns:
      ``[1, heads, H·W, H·W]`` float32, an additive logit bias for ``attnjax.attention``.
    """
    buckets = jnp.asarray(euclidean_rpe_buckets(height, width, ratio))
    return table.astype(jnp.float32)[:, buckets][None]


def multi_head_self_attention(x: jax.Array, qkv_kernel: jax.Array, proj_kernel: jax.Array,
                              proj_bias: Optional[jax.Array], num_heads: int,
                              bias: Optional[jax.Array] = None) -> jax.Array:
    """ViT self-attention over the ``H·W`` positions of ``x``: ``proj(softmax(q kᵀ / √d + bias) v)`` with
    ``[q, k, v] = x W_qkv`` (Vaswani et al. 2017, sec. 3.2.2), computed with ``attnjax.attention``.

    Args:
      x: ``[B, H, W, C]``.
      qkv_kernel: ``[C, 3C]``; its outputs are ``(3, heads, C / heads)`` in row-major order (the official
        ``RPEAttention.qkv`` reshape).
      proj_kernel, proj_bias: ``[C, C]``, ``[C]`` or ``None``, the output projection.
      num_heads: heads; ``C % num_heads == 0``.
      bias: ``[1 or B, heads, H·W, H·W]``, an additive logit bias (e.g. ``relative_position_bias``), or ``None``.

    Returns:
      ``[B, H, W, C]``.
    """
    B, H, W, C = x.shape
    qkv = (x.reshape(B, H * W, C) @ qkv_kernel.astype(x.dtype)).reshape(B, H * W, 3, num_heads, C // num_heads)
    out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], bias=bias).reshape(B, H * W, C)
    out = out @ proj_kernel.astype(x.dtype)
    if proj_bias is not None:
        out = out + proj_bias.astype(x.dtype)
    return out.reshape(B, H, W, C)


def partial_self_attention(x: jax.Array, conv_kernel: jax.Array, qkv_kernel: jax.Array, proj_kernel: jax.Array,
                           proj_bias: Optional[jax.Array], num_heads: int, *, norm: Norm = None,
                           bias: Optional[jax.Array] = None) -> jax.Array:
    """PAT_sf: ``[Conv3×3(x₁), MHSA(norm(x₂))]`` (Huang et al. 2025, PAT_sf; the official
    ``Partial_conv3`` with ``channel_type='self'``).

    Args:
      x: ``[B, H, W, C]``; ``x₁ = x[..., :C₁]`` is convolved, ``x₂ = x[..., C₁:]`` attended.
      conv_kernel: ``[3, 3, C₁, C₁]`` (no bias); ``C₁`` is read from it.
      qkv_kernel, proj_kernel, proj_bias, num_heads, bias: the self-attention over ``x₂``'s ``C₂ = C - C₁``
        channels (``multi_head_self_attention``).
      norm: the normalization before the attention (LayerNorm over channels in the official code).

    Returns:
      ``[B, H, W, C]``.
    """
    c1 = conv_kernel.shape[-1]
    x1, x2 = x[..., :c1], x[..., c1:]
    y2 = multi_head_self_attention(normalize(norm, x2).astype(x.dtype), qkv_kernel, proj_kernel, proj_bias,
                                   num_heads, bias)
    return jnp.concatenate([convolve(x1, conv_kernel), y2], axis=-1)


__all__ = ["Norm", "normalize", "convolve", "style_pool", "gaussian_channel_gate", "partial_channel_attention",
           "partial_spatial_attention", "rpe_bucket_count", "euclidean_rpe_buckets", "relative_position_bias",
           "multi_head_self_attention", "partial_self_attention"]
