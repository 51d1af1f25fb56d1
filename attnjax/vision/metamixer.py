"""MetaMixer and FFNified attention: the query-key-value framework with convolutions and GELU.

Yun, Lee & Ro, "MetaMixer Is All You Need" (arXiv 2406.02021, 2024; v2 "FFNet: MetaMixer-based Efficient
Convolutional Mixer Design"; official code ysj9909/FFNet, ``models/ffnet.py``):

* MetaMixer (the overview figure, Fig. 1(a)): a mixer ``y = value(σ(key(query(x))))`` whose four
  sub-operations are left unspecified. Self-attention is one instance (``σ = softmax``, key and value the
  token matrices ``K``, ``V``), and so is an FFN read as a key-value memory (Geva et al. 2021): the input is
  the query, ``W₁`` the keys, GELU the coefficient function, ``W₂`` the values.
* FFNification (the paper's section of that name, Fig. 1(b)): self-attention turned into an FFN-like token
  mixer that keeps the framework. The query is a 1×1 projection ``x W_Q + b_Q``; the query-key interaction and the
  coefficient-value interaction become static depthwise convolutions with large kernels; softmax becomes
  GELU. The FFNified attention is ``y = DWConv_V(GELU(DWConv_K(x W_Q + b_Q)))``.
* The FFNet block pairs it with a ConvNeXt-like channel mixer, which is the same framework in the opposite
  dimensions: a depthwise convolution as the query and two 1×1 projections as keys and values,
  ``y = W₂ GELU(W₁ DWConv(x) + b₁) + b₂``.

Shapes: ``x [B, H, W, C]`` (NHWC); depthwise kernels ``[kh, kw, 1, C]`` (HWIO, ``flax.nnx.Conv`` with
``feature_group_count=C``), zero "SAME" padding. Cost ``O(B·H·W·C·(C + kh·kw))``.
"""

from __future__ import annotations

from typing import Callable

import jax

Mix = Callable[[jax.Array], jax.Array]


def gelu(x: jax.Array) -> jax.Array:
    """The exact (erf) GELU, ``x·Φ(x)``, as ``torch.nn.GELU()`` in the official code (not the tanh form)."""
    return jax.nn.gelu(x, approximate=False)


def depthwise_conv(x: jax.Array, kernel: jax.Array, bias: jax.Array | None) -> jax.Array:
    """A depthwise 2-D convolution, stride 1, zero "SAME" padding: ``y_c = x_c ⋆ kernel_c + b_c``.

    Args:
      x: ``[B, H, W, C]``.
      kernel: ``[kh, kw, 1, C]`` (HWIO with one input channel per group).
      bias: ``[C]`` or ``None``.

    Returns:
      ``[B, H, W, C]``.
    """
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(1, 1), padding="SAME",
                                     feature_group_count=x.shape[-1], dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y if bias is None else y + bias.astype(x.dtype)


def metamixer(x: jax.Array, query: Mix, key: Mix, value: Mix, activation: Mix = gelu) -> jax.Array:
    """MetaMixer (Yun et al. 2024, Fig. 1(a)): ``y = value(activation(key(query(x))))``.

    The query-key-value framework with its sub-operations passed in: ``query`` makes the queries from
    ``x``, ``key`` is the query-key interaction, ``activation`` turns similarities into coefficients and
    ``value`` is the coefficient-value interaction.
    """
    return value(activation(key(query(x))))


def ffnified_attention(x: jax.Array, w_q: jax.Array, b_q: jax.Array | None, key_kernel: jax.Array,
                       key_bias: jax.Array | None, value_kernel: jax.Array,
                       value_bias: jax.Array | None) -> jax.Array:
    """FFNified attention (Yun et al. 2024, "FFNification", Fig. 1(b)): ``y = DWConv_V(GELU(DWConv_K(x W_Q + b_Q)))``.

    Args:
      x: ``[B, H, W, C]``.
      w_q, b_q: ``[C, C]``, ``[C]`` or ``None``: the query projection (a 1×1 convolution).
      key_kernel, key_bias: ``[kh, kw, 1, C]``, ``[C]`` or ``None``: the query-key interaction.
      value_kernel, value_bias: ``[kh', kw', 1, C]``, ``[C]`` or ``None``: the coefficient-value interaction.

    Returns:
      ``[B, H, W, C]``.
    """
    def query(t):
        q = t @ w_q.astype(t.dtype)
        return q if b_q is None else q + b_q.astype(t.dtype)

    return metamixer(x, query, lambda q: depthwise_conv(q, key_kernel, key_bias),
                     lambda a: depthwise_conv(a, value_kernel, value_bias))


def ffnet_channel_mixer(x: jax.Array, kernel: jax.Array, bias: jax.Array | None, w1: jax.Array, b1: jax.Array | None,
                        w2: jax.Array, b2: jax.Array | None) -> jax.Array:
    """FFNet's channel mixer, the MetaMixer in the opposite dimensions (Yun et al. 2024, the FFNet block;
    ``Channel_Mixer`` of the official code): ``y = W₂ GELU(W₁ DWConv(x) + b₁) + b₂``.

    Args:
      x: ``[B, H, W, C]``.
      kernel, bias: ``[kh, kw, 1, C]``, ``[C]`` or ``None``: the depthwise query convolution.
      w1, b1: ``[C, E]``, ``[E]`` or ``None``: the keys (``E = expansion · C``).
      w2, b2: ``[E, C]``, ``[C]`` or ``None``: the values.

    Returns:
      ``[B, H, W, C]``.
    """
    def dense(w, b):
        def apply(t):
            y = t @ w.astype(t.dtype)
            return y if b is None else y + b.astype(t.dtype)
        return apply

    return metamixer(x, lambda t: depthwise_conv(t, kernel, bias), dense(w1, b1), dense(w2, b2))


__all__ = ["gelu", "depthwise_conv", "metamixer", "ffnified_attention", "ffnet_channel_mixer"]
