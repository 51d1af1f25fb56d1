"""RALA attention and the RAVLT block as Flax NNX modules on NHWC feature maps (core: ``attnjax.linear.rala``).

Fan, Huang & He, "Breaking the Low-Rank Dilemma of Linear Attention", CVPR 2025 (arXiv 2411.07635), sec. 4
(RALA) and sec. 5 (RAVLT); official code qhfan/RALA, ``classfication/RALA.py`` (``GateLinearAttentionNoSilu``,
``FeedForwardNetwork``, ``Block``), which fixes what the text leaves open.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx
from flax.typing import Dtype

from attnjax.checks import check_positive, describe
from attnjax.linear.rala import rala, rala_rotary
from attnjax.nn.checks import check_image
from attnjax.nn.registry import ModuleSpec, register_module

INIT = jax.nn.initializers.truncated_normal(0.02)
"""The official ``_init_weights``: convolution kernels ``trunc_normal(std=0.02)``, biases zero."""

LAYER_NORM_EPSILON = 1e-6
"""The official ``LayerNorm2d(eps=1e-6)``."""


def gelu(x: jax.Array) -> jax.Array:
    """PyTorch's ``F.gelu`` default: the exact (erf) GELU."""
    return jax.nn.gelu(x, approximate=False)


class RALAttention(nnx.Module):
    """Rank-augmented linear attention (official ``GateLinearAttentionNoSilu``) on ``[B, H, W, C]``::

        Q, K, V, O = x W_qkvo + b_qkvo                          # 1×1 convolution C -> 4C; heads of d = C/heads
        A = RALA(Q, K, V; RoPE₂D)                                # attnjax.linear.rala.rala
        y = ((A + DWConv₅ₓ₅(V)) ⊙ O) W_p + b_p

    ``RALA`` weights every token's KV-buffer contribution by ``α_j = softmax_j(q̄·φ(k_j)/√d)`` from the mean query
    (the KV-buffer rank augmentation) and normalizes per query; the element-wise product with ``O``, a linear
    projection of the input, is the output-feature rank augmentation (sec. 4); ``DWConv₅ₓ₅(V)`` is the LePE term.
    ``φ = elu + 1``; RAVLT's 2-D rotary embedding (``rala_rotary``: rows on the first half of each head's
    features, columns on the second) rotates ``φ(Q)``, ``φ(K)`` in the numerator only, as the official code.

    Example::

      attn = RALAttention(64, num_heads=2, rngs=nnx.Rngs(0))
      y = attn(x)                                              # x, y: [B, H, W, 64]

    Parameters: ``4C² + 4C`` (QKVO) ``+ 25C + C`` (LePE) ``+ C² + C`` (projection) ``= 5C² + 31C``.

    Args:
      channels: ``C``, a multiple of ``num_heads`` with ``C / num_heads`` a multiple of 4 (the 2-D rotary embedding).
      num_heads: attention heads (RAVLT-T: 1, 2, 4, 8 over the four stages).
      dtype, param_dtype: computation and parameter dtypes; the output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (official: kernels ``trunc_normal(0.02)``, biases 0).
    """

    def __init__(self, channels: int, *, num_heads: int = 1, dtype: Optional[Dtype] = None,
                 param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        check_positive(channels=channels, num_heads=num_heads)
        if channels % num_heads or (channels // num_heads) % 4:
            raise ValueError(f"channels ({channels}) must be num_heads ({num_heads}) times a multiple of 4 "
                             "(RAVLT's 2-D rotary embedding splits each head's features into row and column pairs)")
        self.channels, self.num_heads = channels, num_heads
        common = dict(dtype=dtype, param_dtype=param_dtype, kernel_init=INIT, rngs=rngs)
        self.qkvo = nnx.Linear(channels, 4 * channels, **common)
        self.lepe = nnx.Conv(channels, channels, (5, 5), feature_group_count=channels, **common)
        self.proj = nnx.Linear(channels, channels, **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        B, H, W, C = x.shape
        heads, d = self.num_heads, C // self.num_heads
        q, k, v, o = jnp.split(self.qkvo(x), 4, axis=-1)
        attended = rala(*(t.reshape(B, H * W, heads, d) for t in (q, k, v)), rotary=rala_rotary(H, W, d))
        mixed = attended.reshape(B, H, W, C).astype(v.dtype) + self.lepe(v)
        return self.proj(mixed * o).astype(x.dtype)


class RAVLTBlock(nnx.Module):
    """The RAVLT block (official ``Block`` with the linear-attention flag ``'l'``) on ``[B, H, W, C]``::

        x ← x + DWConv₃ₓ₃(x)                                   # conditional position encoding (CPE)
        x ← x + γ₁ ⊙ RALAttention(LN(x))
        x ← x + γ₂ ⊙ FFN(LN(x)),   FFN(u) = fc₂(h + DWConv₃ₓ₃(h)),  h = GELU(fc₁(u))

    ``γ₁``, ``γ₂`` are per-channel layer scales (RAVLT-T/S: on, initialized to 1; RAVLT-B/L's last stages:
    1e-6; ``layer_scale=None`` drops them). ``fc₁`` has ``int(mlp_ratio·C)`` outputs (3.5 in every RAVLT size).

    Example::

      block = RAVLTBlock(64, num_heads=2, rngs=nnx.Rngs(0))
      y = block(x)                                             # x, y: [B, H, W, 64]

    Parameters (``M = int(mlp_ratio·C)``): ``10C`` (CPE) ``+ 4C`` (two LayerNorms) ``+ 5C² + 31C`` (attention)
    ``+ 2CM + 11M + C`` (FFN) ``+ 2C`` (layer scales, when on).

    Left out: stochastic depth and dropout (identity at inference), and the softmax-attention blocks (flag
    ``'v'``) that RAVLT uses in its later stages.

    Args:
      channels, num_heads: as ``RALAttention``.
      mlp_ratio: the FFN's hidden width over ``C``.
      layer_scale: the initial value of ``γ₁``, ``γ₂``, or None for no layer scale.
      dtype, param_dtype: computation and parameter dtypes; the output takes ``x``'s dtype.
      rngs: ``params`` initializes the layers (official: kernels ``trunc_normal(0.02)``, biases 0).
    """

    def __init__(self, channels: int, *, num_heads: int = 1, mlp_ratio: float = 3.5,
                 layer_scale: Optional[float] = 1.0, dtype: Optional[Dtype] = None, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        check_positive(channels=channels)
        ratio_ok = isinstance(mlp_ratio, (int, float)) and not isinstance(mlp_ratio, bool)
        hidden = int(channels * mlp_ratio) if ratio_ok else 0
        if hidden < 1:
            raise ValueError(f"mlp_ratio must be a number with int(mlp_ratio * channels) >= 1, got "
                             f"{describe(mlp_ratio)} for channels={channels}")
        if layer_scale is not None and not isinstance(layer_scale, (int, float)):
            raise TypeError(f"layer_scale must be a number or None, got {describe(layer_scale)}")
        self.channels = channels
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        convs = dict(kernel_init=INIT, **common)
        self.pos = nnx.Conv(channels, channels, (3, 3), feature_group_count=channels, **convs)
        self.norm1 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.attn = RALAttention(channels, num_heads=num_heads, **common)
        self.norm2 = nnx.LayerNorm(channels, epsilon=LAYER_NORM_EPSILON, **common)
        self.fc1 = nnx.Linear(channels, hidden, **convs)
        self.dwconv = nnx.Conv(hidden, hidden, (3, 3), feature_group_count=hidden, **convs)
        self.fc2 = nnx.Linear(hidden, channels, **convs)
        if layer_scale is None:
            self.gamma1 = self.gamma2 = None
        else:
            self.gamma1, self.gamma2 = (nnx.Param(jnp.full((channels,), layer_scale, param_dtype)) for _ in range(2))

    def ffn(self, u: jax.Array) -> jax.Array:
        """``fc₂(h + DWConv₃ₓ₃(h))`` with ``h = GELU(fc₁(u))`` (official ``FeedForwardNetwork``, ``subconv=True``)."""
        h = gelu(self.fc1(u))
        return self.fc2(h + self.dwconv(h))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x [B, H, W, C] -> [B, H, W, C]``."""
        check_image("x", x, self.channels)
        y = x + self.pos(x).astype(x.dtype)
        a = self.attn(self.norm1(y))
        if self.gamma1 is not None:
            a = a * self.gamma1[...]
        y = y + a.astype(x.dtype)
        f = self.ffn(self.norm2(y))
        if self.gamma2 is not None:
            f = f * self.gamma2[...]
        return y + f.astype(x.dtype)


PAPER = "Fan et al. 2025 (RALA / RAVLT, CVPR)"
register_module(ModuleSpec("rala", RALAttention, dict(channels=16, num_heads=2), (2, 5, 7, 16), kind="image",
                           paper=PAPER))
register_module(ModuleSpec("ravlt", RAVLTBlock, dict(channels=16, num_heads=2), (2, 5, 7, 16), kind="image",
                           paper=PAPER))
